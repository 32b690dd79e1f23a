"""Compile the Triton launches a CPU call would make, for Hopper (sm_90), without a GPU.

``record_launches(fn, *modules)`` runs ``fn`` with each module's ``_launcher`` replaced by a recorder:
every ``_launcher(kernel)[grid](*args, **kwargs)`` is kept instead of launched (CPU tensors stand in
for the GPU's). ``compile_sm90(launch)`` then specialises the kernel on those arguments the way
Triton's JIT does on a GPU (pointers 16-byte aligned, integers divisible by 16 marked so, integers
equal to 1 made constants; floats typed fp64, as Inductor types them when it inlines the kernel) and
compiles it with the ptxas that ships with triton. CI has no GPU; this is how it still sees register
spills, shared memory and the instructions the H200 would run.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                  torch.float64: "*fp64", torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}


class Launch(NamedTuple):
    kernel: object     # a JITFunction or an Autotuner
    args: tuple
    kwargs: dict


class Compiled(NamedTuple):
    name: str
    shared: int        # bytes of shared memory per program
    registers: int
    spill_bytes: int   # local memory (STACK) per thread
    sass: str


def record_launches(fn, *modules):
    """The launches ``fn()`` makes through ``module._launcher`` for each of ``modules``."""
    launches = []

    class _Grid:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    patches = [mock.patch.object(m, "_launcher", lambda kernel, *_: _Grid(kernel)) for m in modules]
    for p in patches:
        p.start()
    try:
        fn()
    finally:
        for p in patches:
            p.stop()
    return launches


def _signature(jit, values):
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        v = values.get(name, param.default)
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = _POINTER_TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # the JIT makes 1 a constant
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            # fp64, as Inductor types a float argument of a kernel it inlines (the JIT says fp32): a
            # kernel must bring such a scalar to fp32 itself, or its tiles are computed in fp64
            sig[name] = "fp64"
        elif v is None:
            sig[name], consts[name] = "constexpr", None
        else:
            raise TypeError(f"{jit.__name__}: argument {name} = {v!r} has no Triton type here")
    return sig, consts, attrs


def expand_autotuned(launches):
    """Each launch of an Autotuner as one launch per config (a plain kernel with the config's
    meta-parameters): the GPU's autotuner may pick any of them."""
    import triton

    out = []
    for la in launches:
        if isinstance(la.kernel, triton.runtime.Autotuner):
            out += [Launch(la.kernel.fn, la.args, la.kwargs | c.kwargs | dict(num_warps=c.num_warps,
                                                                             num_stages=c.num_stages))
                    for c in la.kernel.configs]
        else:
            out.append(la)
    return out


def compile_sm90(launch: Launch) -> Compiled:
    """Compile a recorded launch of a plain kernel (see ``expand_autotuned``) for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, launch.args)) | kwargs
    sig, consts, attrs = _signature(kernel, values)
    ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()

        def dump(flag):
            return subprocess.run([str(cuobjdump), flag, f.name], capture_output=True, text=True,
                                  check=True).stdout

        usage, sass = dump("--dump-resource-usage"), dump("--dump-sass")
    number = lambda key: int(re.search(key + r":(\d+)", usage).group(1))  # noqa: E731
    return Compiled(kernel.__name__, ck.metadata.shared, number("REG"), number("STACK"), sass)


def written_arguments(launch: Launch) -> set:
    """The names of the tensor arguments Inductor's mutation analysis (the one that decides which
    tensors a ``wrap_triton`` launch writes, and so which inputs it must not alias) finds stored to,
    on the TTIR of an sm_90 target. Its analysis is coarse: a pointer passed to a helper whose
    result feeds a store address counts as written, and an input counted so makes the compiled
    training graph fail ("a leaf Variable that requires grad is being used in an in-place
    operation")."""
    from unittest import mock

    import triton
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    from triton.backends.compiler import GPUTarget

    kernel = launch.kernel
    values = dict(zip(kernel.arg_names, launch.args)) | {
        k: v for k, v in launch.kwargs.items() if k in kernel.arg_names}

    class _Hopper:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    with mock.patch.object(type(triton.runtime.driver), "active", property(lambda _: _Hopper())):
        if hasattr(tkw, "identify_accessed_tensors"):     # torch >= 2.12
            return {d.name for d in tkw.identify_accessed_tensors(kernel, values, {}).read_writes.writes}
        return set(tkw.identify_mutated_tensors(kernel, values, {}))
