// The panther._C extension module. Importing it dlopens this library, which runs the
// TORCH_LIBRARY registrations of every op file in csrc/ (one file per op: schema,
// CPU/CUDA kernels and autocast wrapper side by side).
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// The namespace itself; each op file adds its schemas with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(panther, m) {}
