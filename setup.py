"""Native build only: the panther._C op library (metadata lives in pyproject.toml).

CPU kernels always; CUDA sources are added when torch has CUDA and nvcc is found
(override with PANTHER_CUDA=0/1).
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    flag = os.environ.get("PANTHER_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


sources = sorted(glob.glob("csrc/*.cpp"))
cuda = _want_cuda()
if cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    Extension = CUDAExtension
else:
    Extension = CppExtension

ext = Extension(
    name="panther._C",
    sources=sources,
    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]} if cuda else {"cxx": ["-O3"]},
    define_macros=[("Py_LIMITED_API", "0x030A0000")] + ([("PANTHER_WITH_CUDA", "1")] if cuda else []),
    py_limited_api=True,
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
