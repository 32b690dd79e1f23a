"""Every Triton kernel panther launches on a GPU compiles for the H200 (sm_90), with CI's CPU only.

Each case runs a CPU call whose launches are recorded instead of run (``hopper_compile``), then
compiles each distinct launch (every autotune config) as Triton would specialise it on the GPU. The
checks are the ones that broke these kernels before: register spills (local memory), shared memory
past Hopper's 227 KiB, products that never reach the tensor cores' wgmma, pipelined loops without
asynchronous copies, fp64 arithmetic from a float argument (Inductor passes floats as fp64). The
triton installed here may be newer than a GPU box's, so this is a proxy for that box's compile (the GPU
tests are the real one).
"""
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from hopper_compile import compile_sm90, expand_autotuned, record_launches  # noqa: E402  (tests/ is on sys.path)
from inductor_ext import triton_attention as tatt  # noqa: E402
from inductor_ext import triton_attention_bwd as tbwd  # noqa: E402
from inductor_ext import triton_conv as tconv  # noqa: E402
from inductor_ext import triton_linear as tlin  # noqa: E402
from inductor_ext import triton_srpe as tsrpe  # noqa: E402

SMEM_LIMIT = 227 * 1024
MODULES = (tlin, tconv, tatt, tbwd, tsrpe)
bf16 = torch.bfloat16


def _randn(*shape, dtype=bf16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float32).to(dtype)


def _linear():
    x, g = _randn(256, 512), _randn(256, 384)
    S1s, U2s, S2s, U1s = _randn(1, 512, 16), _randn(1, 512, 16), _randn(1, 16, 384), _randn(1, 16, 384)
    tlin.lowrank_chain(x, tlin._half_in(S1s), tlin._half_in(U2s), tlin._half_out(U1s), tlin._half_out(S2s),
                       bias=_randn(384), alpha_y=0.5)
    # large outputs: the same chain in two launches
    tlin.split_chain(x, tlin._half_in(S1s), tlin._half_in(U2s), tlin._half_out(U1s), tlin._half_out(S2s),
                     bias=_randn(384), alpha_y=0.5)
    # the backward: one pass over g (the S2 rows and the bias), then dx from its partials; fp32 has
    # its own tiles (shared memory, registers)
    for dt in (bf16, torch.float32):
        gd, xA = g.to(dt), _randn(256, 32, dtype=dt)
        U1d, S2d, S1d, U2d = (t.to(dt) for t in (U1s, S2s, S1s, U2s))
        parts, _, _ = tlin.grad_pass(gd, xA[:, 16:], tlin._half_out(U1d).mT, tlin._half_out(S2d).mT)
        tlin.chain_from_partials(parts, tlin._half_in(S1d).mT, tlin._half_in(U2d).mT, xA, 0.5, dtype=dt)


def _conv():
    x = _randn(2, 64, 16, 16).to(memory_format=torch.channels_last)
    tconv.tap_conv(x, _randn(32, 64, 3, 3), _randn(2, 16, 64), _randn(64), (1, 1), (1, 1), (1, 1))


def _attention(causal, dtype=bf16):
    def run():
        # 1024 tokens: several causal segments, so the segment-prefix and suffix kernels launch too
        q, k, v = (_randn(1, 2, 1024, 64, dtype=dtype) for _ in range(3))
        W = torch.randn(256, 64)
        tbwd._backward(_randn(1, 2, 1024, 64, dtype=dtype), q, k, v, W, "softmax", causal, None, None)
    return run


def _srpe():
    # 8 sines, 256 realisations (bf16, with phases: queries), and 3 sines, 40 of them (fp32, keys)
    for dt, S, R, phase in ((bf16, 8, 256, True), (torch.float32, 3, 40, False)):
        theta = torch.rand(4, 64, S)
        x, w = _randn(1, 100, 4, 64, dtype=dt), _randn(4, 64, 2 * S, R, dtype=dt)
        tsrpe._launch(x, theta, theta if phase else None, w)
        tsrpe._launch_backward(_randn(1, 100, 4, R, dtype=dt), x, theta, theta if phase else None, w,
                               True, True)


# fp32 attention: its products must stay on the tensor cores (tf32x3; wgmma is asserted below)
CASES = {"linear": _linear, "conv": _conv, "attention": _attention(False), "causal attention": _attention(True),
         "fp32 causal attention": _attention(True, torch.float32), "srpe": _srpe}


# Spills the default launches have today (bytes per thread, the most of triton 3.6, the H200's, and
# 3.9; measured 2026-11-30): the causal chunk kernels run at 255 registers. Lower-pressure launches
# compile without any (dk-dv with 8 warps, dq with 32-feature blocks); the attention bench's sweeps,
# which picked these defaults, include such launches. The causal dk-dv's products with the later
# query segments' state took it from 160 / 168 to 208 / 256 (3.6 / 3.9); on the H200 the 8-warp
# launch without spills measured 3.66 ms against 1.94 (docs/benchmarks.md). Scaling the operands
# instead of the products (no temporary accumulators) brought the chunk outputs from 128 / 120 to
# 32 / 104 and dk-dv to 176 / 216. The backward's feature products in log2 units took dq to
# 48 / 136 and dk-dv to 176 / 224. The persistent non-causal query kernel holds a (64 × 256) fp32
# feature tile at 4 warps: 248 / 264, and measured 8% faster than the spill-free blocked kernel.
# The saved query shift now leaves out the row's |q|^2 term (the forward need not keep the q tile to its
# end): on 3.9 the chunk outputs went 104 -> 32 and the persistent queries 264 -> 120, but dq (earlier
# key segments) 136 -> 376 (these limits are 3.9's alone). The form of ``_causal_query_operands`` that
# spills 80 bytes there (56 on 3.6) ran the H200's causal forward+backward at 65,536 tokens in 4.80 ms
# against 4.72 for this one. The SRPE forward's fp32 launch (products on the FMA units) spills 8 bytes
# on 3.9 at 128 registers, none on 3.6. The fp32 causal kernels multiply as tf32x3 at 255 registers
# and spill up to 2.3 KB; with "ieee" products five of them spilled 8-15 KB and the H200's fp32 causal
# step at 16,384 tokens × 16 heads took 271 ms against 9.3 (docs/benchmarks.md).
# The linear backward's fp32 pass over g spilled 40 bytes on 3.9 on the tiles chosen for the FMA dot;
# its tiles for tf32x3 spill none, and it may not. The SRPE backward's fp32 launch takes the bf16
# tiles with tf32x3 products: 944 / 1016 bytes for this case's 3 sines (736 on 3.6 at 8 sines, where it
# measured 2.53 ms against 18.4 for the spill-free "ieee" launch on smaller tiles). Anything above
# these numbers, or a spill anywhere else, fails. The causal query walk takes 256 features per
# program at 8 warps and 2 stages: 72 bytes on 3.9, and on the H200 0.45 ms against 0.54 for the
# spill-free 128-feature walk (65,536 tokens × 16 heads).
_FP32 = "fp32 causal attention"
KNOWN_SPILLS = {(_FP32, "_causal_state_kernel"): 56, (_FP32, "_causal_out_kernel"): 960,
                (_FP32, "_dq_chunk_kernel"): 1432, (_FP32, "_query_state_kernel"): 280,
                (_FP32, "_dkdv_chunk_kernel"): 2336, ("srpe", "_srpe_sines_bwd_kernel"): 1016,
                ("causal attention", "_dq_chunk_kernel"): 376,
                ("causal attention", "_dkdv_chunk_kernel"): 304,
                ("causal attention", "_query_state_kernel"): 72, ("attention", "_query_persistent_kernel"): 120,
                ("srpe", "_srpe_sines_kernel"): 8}


def _distinct(launches):
    seen, out = set(), []
    for launch in expand_autotuned(launches):
        kernel = launch.kernel
        key = (kernel.__name__, tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_launches_compile_for_hopper(case):
    launches = _distinct(record_launches(CASES[case], *MODULES))
    assert launches, "the call launched no kernel"
    wgmma = {}   # kernel name -> whether one of its launches multiplies on wgmma
    for launch in launches:
        try:
            c = compile_sm90(launch)
        except (ImportError, FileNotFoundError, AttributeError) as e:  # triton API drift / no ptxas
            pytest.skip(f"cannot compile for sm_90 offline with this triton: {e!r}")
        allowed = KNOWN_SPILLS.get((case, c.name), 0)
        assert c.spill_bytes <= allowed, (f"{c.name} spills {c.spill_bytes} bytes per thread ({c.registers} "
                                          f"registers; known: {allowed})")
        assert c.shared <= SMEM_LIMIT, f"{c.name}: {c.shared} bytes of shared memory"
        # float arguments come in as fp64 when Inductor inlines a kernel: no tile may be computed in fp64
        assert not re.search(r"\bD(ADD|MUL|FMA)\b", c.sass), \
            f"{c.name}: fp64 arithmetic (a float argument not cast)"
        if any(f in launch.kernel.src for f in ("tl.dot(", "_mm(", "_mma(")):
            wgmma[c.name] = wgmma.get(c.name, False) or "HGMMA" in c.sass
            if launch.kwargs.get("num_stages", 3) >= 2:  # software-pipelined: asynchronous copies
                assert "LDGSTS" in c.sass, f"{c.name}: no cp.async loads at num_stages >= 2"
    # (autotune configs with 32-row tiles use the older mma: wgmma needs 64 rows per warp group)
    assert all(wgmma.values()), f"kernels whose products never reach wgmma: {[k for k, v in wgmma.items() if not v]}"


def test_recorder_sees_what_a_call_launches():
    """The harness itself: a non-causal forward is three launches (key pass, merge, queries) with their
    real arguments, and nothing runs."""
    q = _randn(1, 2, 64, 64)
    launches = record_launches(lambda: tatt._forward(q, q, q, torch.randn(256, 64), "softmax", False, None, None),
                               tatt)
    assert [la.kernel.__name__ for la in launches] == ["_kv_state_kernel", "_merge_kernel", "_query_persistent_kernel"]
    assert launches[0].args[0] is q and launches[0].kwargs["M_PAD"] == 256


@pytest.mark.slow
def test_causal_outputs_with_statistics_compile_near_the_plain_kernel():
    """The training forward's chunk outputs also store per-row statistics. Storing the key running
    max M when the kernel took it as a (C, C) masked max made Triton compute it in the store's layout
    and convert it back: 3104 SASS instructions per program against 2424 without statistics (triton
    3.6). M is now a 1-D scan, stored as it is; this keeps the two kernels within 10% (compared at
    the same pipelining depth: inference launches take one stage more by default)."""
    q, W = _randn(1, 2, 1024, 64), torch.randn(256, 64)

    def sass_lines(stats):
        launches = [la for la in _distinct(record_launches(
            lambda: tatt._forward(q, q, q, W, "softmax", True, None, None, stats=stats,
                                  causal_stages=3), tatt))
            if la.kernel.__name__ == "_causal_out_kernel"]
        assert len(launches) == 1
        try:
            sass = compile_sm90(launches[0]).sass
        except (ImportError, FileNotFoundError, AttributeError) as e:  # triton API drift / no ptxas
            pytest.skip(f"cannot compile for sm_90 offline with this triton: {e!r}")
        return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))

    plain, with_stats = sass_lines(None), sass_lines(torch.zeros(2, 3, 1024))
    assert with_stats <= 1.1 * plain, (with_stats, plain)


@pytest.mark.slow
def test_narrow_factor_halves_load_as_vectors():
    """Factor halves of 8 bf16 columns (k = 8) are zero-padded to 16 before the chain kernel loads them
    (``_vector_halves``). As 8-column views the kernel loaded them element by element: the forward's
    loop had 34 two-byte loads where k = 16 has none, and the backward's dx launch lost its
    asynchronous copies. On the H200 that made k = 8 slower than k = 16 (docs/benchmarks.md)."""
    def chain_launches(k):
        x, g = _randn(256, 512), _randn(256, 384)
        S1s, U2s, S2s, U1s = _randn(1, 512, k), _randn(1, 512, k), _randn(1, k, 384), _randn(1, k, 384)
        xA = _randn(256, 2 * k)

        def run():
            tlin.lowrank_chain(x, tlin._half_in(S1s), tlin._half_in(U2s), tlin._half_out(U1s),
                               tlin._half_out(S2s), bias=_randn(384), alpha_y=0.5)
            parts, _, _ = tlin.grad_pass(g, xA[:, k:], tlin._half_out(U1s).mT, tlin._half_out(S2s).mT)
            tlin.chain_from_partials(parts, tlin._half_in(S1s).mT, tlin._half_in(U2s).mT, xA, 0.5, dtype=bf16)
        fwd, _, _, dx = expand_autotuned(record_launches(run, tlin))
        try:
            return compile_sm90(fwd).sass, compile_sm90(dx).sass
        except (ImportError, FileNotFoundError, AttributeError) as e:  # triton API drift / no ptxas
            pytest.skip(f"cannot compile for sm_90 offline with this triton: {e!r}")

    (fwd8, dx8), (fwd16, _) = chain_launches(8), chain_launches(16)
    vectors = lambda sass: len(re.findall(r"\bLDGSTS\.E\.BYPASS\.128\b", sass))  # noqa: E731
    assert vectors(fwd8) == vectors(fwd16) > 0
    assert len(re.findall(r"\bLDG\.E\.U16\b", fwd8)) <= len(re.findall(r"\bLDG\.E\.U16\b", fwd16))
    assert "LDGSTS" in dx8
