"""The tap-GEMM forward of panther::sketched_conv2d (inductor_ext/triton_conv_tap.py).

CPU CI: the stage-2 kernel in Triton's interpreter (one subprocess, TRITON_INTERPRET=1, which also runs the
bench's smoke mode), the plain-torch tap algorithm against the reference, routing, the stage-2 configs'
budget. CUDA (``pytest -m cuda``): odd shapes against float64, every production config launching.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import panther  # noqa: F401
from inductor_ext import triton_conv as tc
from inductor_ext import triton_conv_tap as tap
from panther.ops.conv import sketched_conv2d_reference

ROOT = Path(__file__).resolve().parents[1]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(tc.triton is None, reason="needs triton")


def factors(N=2, C_in=3, C_out=5, H=7, W=9, kh=3, kw=3, L=1, k=3, dtype=torch.float64, device="cpu", seed=0,
            channels_last=True):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    x = mk(N, C_in, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, mk(2 * L * k, C_in, kh, kw), mk(2 * L, k, C_out), mk(C_out)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@needs_triton
def test_stage2_kernel_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_conv_tap_interpret_check.py")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "all interpreter checks passed" in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("shape,conv", [
    (dict(), ((1, 1), (0, 0), (1, 1))),
    (dict(L=2, k=5), ((2, 2), (1, 1), (1, 1))),
    (dict(kh=5, kw=3), ((2, 1), (1, 0), (1, 2))),
    (dict(kh=1, kw=1, k=1, C_out=37), ((1, 1), (0, 0), (1, 1))),
    (dict(H=6, W=5), ((1, 2), (2, 2), (2, 2))),
], ids=["3x3-p0", "R20-s2-p1", "5x3-mixed", "1x1", "dil2"])
@pytest.mark.parametrize("bias", [True, False])
def test_plain_torch_tap_algorithm_matches_reference(shape, conv, bias):
    """The tap bookkeeping (A_all's column order, U's rows, padding, stride, dilation) in float64."""
    x, S1s, U1s, b = factors(**shape)
    b = b if bias else None
    out = tap.tap_forward_torch(x, S1s, U1s, b, *conv)
    torch.testing.assert_close(out, sketched_conv2d_reference(x, S1s, U1s, b, *conv), rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_plain_torch_tap_algorithm_nchw_and_half():
    x, S1s, U1s, b = factors(channels_last=False)
    out = tap.tap_forward_torch(x, S1s, U1s, b, 1, 1)
    assert out.is_contiguous()
    torch.testing.assert_close(out, sketched_conv2d_reference(x, S1s, U1s, b, 1, 1), rtol=1e-10, atol=1e-10)
    xb, Sb, Ub, bb = (t.to(torch.bfloat16) for t in (x, S1s, U1s, b))
    assert rel(tap.tap_forward_torch(xb, Sb, Ub, bb, 1, 1), sketched_conv2d_reference(x, S1s, U1s, b, 1, 1)) < 2e-2


def test_tap_weight_layout():
    _, S1s, _, _ = factors(kh=2, kw=3)
    a = tap.tap_weight(S1s)
    R = S1s.shape[0]
    for i in range(2):
        for j in range(3):
            t = i * 3 + j
            torch.testing.assert_close(a[:, t * R:(t + 1) * R], S1s[:, :, i, j].t(), rtol=0, atol=0)


def test_cpu_without_interpreter_never_takes_the_path():
    x, S1s, U1s, b = (t.float() for t in factors())
    one = [1, 1]
    assert not tap.tap_ok(x, S1s, U1s, b, one, one, one)
    assert not tap.use_tap(x, S1s, U1s, b, one, one, one)
    assert tap.TAP_GEMM in tap.TAP_GEMM_CHOICES


@needs_triton
@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128, 256])
def test_stage2_configs_fit_hopper(r_pad, elem_size):
    prod = tap.tap_configs(r_pad, elem_size)
    grid = tap.tap_configs(r_pad, elem_size, grid=True)
    assert prod, "no production config for a rank the kernel accepts"
    if r_pad <= 64:
        assert grid
    for bp, bn, warps, stages in prod + grid:
        assert tc.smem_bytes(bp, 16, bn, stages, r_pad, elem_size, r_pad) <= tc.SMEM_LIMIT
        assert min(bp, bn) >= 16


@pytest.mark.slow
@needs_triton
def test_stage2_kernel_compiles_for_hopper():
    """No GPU needed: the first bf16 production config compiles for sm_90 with wgmma (HGMMA) for the mix,
    no local-memory spills, shared memory within the estimate."""
    import tempfile

    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # triton API drift
        pytest.skip(f"cannot compile for sm_90 offline with this triton: {e!r}")
    bp, bn, warps, stages = tap.tap_configs(32, 2)[0]
    kern = tap._tap_sum_mix_kernel
    consts = dict(KH=3, KW=3, R_PAD=32, HAS_BIAS=True, DOT_MIX=0, BLOCK_P=bp, BLOCK_N=bn)
    unit = {"suc", "smn", "soc", "stride_h", "stride_w", "dil_h", "dil_w"}  # the JIT specialises 1s
    div16 = {"C_OUT", "R", "sur", "smr", "son", "soh", "sow"}  # ... and multiples of 16 (issue [D]'s shapes)
    sig, attrs = {}, {}
    for i, n in enumerate(kern.arg_names):
        if n in ("U", "MIX", "BIAS", "OUT"):
            sig[n], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        elif n in consts or n in unit:
            sig[n] = "constexpr"
            consts.setdefault(n, 1)
        else:
            sig[n] = "i32"
            if n in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        ck = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    except (TypeError, KeyError, AttributeError) as e:
        pytest.skip(f"cannot compile for sm_90 offline with this triton: {e!r}")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage, sass = (subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    assert "STACK:0" in usage.replace(" ", "") and "HGMMA" in sass
    assert 0 < ck.metadata.shared <= tc.smem_bytes(bp, 16, bn, stages, 32, 2, 32) <= tc.SMEM_LIMIT


# ------------------------------------------------------------------ CUDA (the lent H200)
@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_tap_against_float64(dtype, tol):
    x, S1s, U1s, b = factors(N=3, C_in=67, C_out=133, H=13, W=11, L=1, k=15, dtype=dtype, device="cuda")
    for conv in (((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2))):
        ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(), b.double(), *conv)
        prev = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            out = tap.tap_forward(x, S1s, U1s, b, *conv)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert rel(out, ref) < tol


@pytest.mark.cuda
@cuda_only
def test_cuda_every_stage2_config_launches():
    x, S1s, U1s, b = factors(N=2, C_in=70, C_out=150, H=9, W=13, L=1, k=15, dtype=torch.bfloat16, device="cuda")
    ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(), b.double(), 1, 1)
    for bp, bn, warps, stages in tap.tap_configs(32, 2):
        for groups in (1, 3):
            out = torch.full_like(ref, float("nan"), dtype=x.dtype).contiguous(memory_format=torch.channels_last)
            tap.tap_forward(x, S1s, U1s, b, 1, 1, 1, out=out, col_groups=groups,
                            config=dict(BLOCK_P=bp, BLOCK_N=bn, num_warps=warps, num_stages=stages))
            assert rel(out, ref) < 2e-2, (bp, bn, warps, stages, groups)


@pytest.mark.cuda
@cuda_only
def test_cuda_skconv2d_and_inductor_take_the_tap_path():
    """A stride-1 channels_last layer whose U is small (9·32 columns <= 2·160 channels): eager SKConv2d
    launches the stage-2 kernel, and Inductor inlines it (the op's GEMM and kernel, no opaque call)."""
    from torch._inductor.utils import run_and_get_code

    from panther.nn import SKConv2d

    layer = SKConv2d(160, 96, 3, padding=1, num_terms=1, low_rank=16, seed=0, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 160, 12, 12, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ref = torch.ops.panther.sketched_conv2d(x, layer.S1s, layer.U1s, layer.bias, [1, 1], [1, 1], [1, 1])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = layer(x)
        torch.cuda.synchronize()
    assert any("_tap_sum_mix_kernel" in e.name for e in prof.events())
    assert out.is_contiguous(memory_format=torch.channels_last) and rel(out, ref) < 2e-2
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(layer), x)
    src = "\n".join(code)
    assert "_tap_sum_mix_kernel" in src and "torch.ops.panther.sketched_conv2d_triton" not in src
    assert rel(out, ref) < 2e-2
