"""The fused Triton sketched-conv2d kernel (inductor_ext/triton_conv.py).

CPU CI: the kernel's arithmetic in Triton's interpreter (one subprocess, TRITON_INTERPRET=1), the
triton_op's CPU branch through opcheck / gradcheck, routing, argument errors, the launch configs'
shared-memory budget, and (slow) an offline sm_90 compile of the main config.
CUDA (the lent H200, ``pytest -m cuda``): odd shapes in fp16/bf16/fp32 against float64, every
autotune config launching, gradients, SKConv2d taking the kernel, Inductor inlining it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import panther  # noqa: F401
from inductor_ext import triton_conv as tc
from panther.nn import SKConv2d
from panther.ops.conv import sketched_conv2d_reference

ROOT = Path(__file__).resolve().parents[1]
OP = torch.ops.panther.sketched_conv2d_triton.default
KERNEL_NAMES = ("_sketched_conv2d_kernel", "_sketched_conv2d_rowtap_kernel", "_tap_sum_mix_kernel")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_triton = pytest.mark.skipif(tc.triton is None, reason="needs triton")


def factors(N=2, C_in=3, C_out=5, H=7, W=9, kh=3, kw=3, L=1, k=2, dtype=torch.float64, device="cpu",
            bias=True, channels_last=False, requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    x, S1s, U1s = mk(N, C_in, H, W), mk(2 * L * k, C_in, kh, kw), mk(2 * L, k, C_out)
    b = mk(C_out) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for t in (x, S1s, U1s, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, S1s, U1s, b


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ interpreter (CPU CI)
@needs_triton
def test_kernel_arithmetic_in_triton_interpreter():
    """Stride 1/2, padding 0/1/'same', dilation 2, non-square kernels, C_in=3, C_out=5, k=1, L=2,
    channel / pixel / output-channel tails, column groups, contiguous and channels_last, fp32 /
    bf16 / fp16, the op (unbatched, autocast, backward): all against float64, output NaN-poisoned."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_conv_interpret_check.py")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "all interpreter checks passed" in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-4000:]


# ------------------------------------------------------------------ CPU branch of the op
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes gain nothing from intra-op threads on a shared CPU; restore for other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (the C++ op has its own opchecks; these check the triton_op's registration: traced fake, autograd)
@pytest.mark.parametrize("bias,channels_last,conv", [
    (True, True, ((1, 1), (1, 1), (1, 1))), (False, False, ((2, 1), (0, 1), (1, 2)))], ids=["cl-bias", "nchw-s21"])
def test_opcheck(bias, channels_last, conv):
    x, S1s, U1s, b = factors(dtype=torch.float32, bias=bias, channels_last=channels_last, requires_grad=True)
    torch.library.opcheck(OP, (x, S1s, U1s, b, *[list(a) for a in conv]))


def test_opcheck_unbatched():
    x, S1s, U1s, b = factors(dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(OP, (x[0], S1s, U1s, b, [1, 1], [1, 1], [1, 1]))


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    x, S1s, U1s, b = factors(N=1, C_in=2, C_out=3, H=5, W=4, L=2, k=1, bias=bias, requires_grad=True)
    def fn(x, S1s, U1s, *b):
        return tc.sketched_conv2d_triton(x, S1s, U1s, b[0] if b else None, 2, 1, 1)

    assert torch.autograd.gradcheck(fn, (x, S1s, U1s, b) if bias else (x, S1s, U1s))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_matches_cpp_op_and_reference(channels_last):
    x, S1s, U1s, b = factors(L=2, k=3, channels_last=channels_last)
    out = tc.sketched_conv2d_triton(x, S1s, U1s, b, (2, 1), 1, (1, 2))
    cpp = torch.ops.panther.sketched_conv2d(x, S1s, U1s, b, [2, 1], [1, 1], [1, 2])
    torch.testing.assert_close(out, cpp, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, sketched_conv2d_reference(x, S1s, U1s, b, (2, 1), 1, (1, 2)),
                               rtol=1e-10, atol=1e-10)


def test_compile_cpu_branch():
    x, S1s, U1s, b = factors(dtype=torch.float32)
    fn = torch.compile(lambda *a: tc.sketched_conv2d_triton(*a, 1, 1), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, S1s, U1s, b), sketched_conv2d_reference(x, S1s, U1s, b, 1, 1),
                               rtol=1e-5, atol=1e-5)


def test_kernel_ok_routing():
    x, S1s, U1s, b = factors(dtype=torch.float32, channels_last=True)
    one = [1, 1]
    assert not tc.kernel_ok(x, S1s, U1s, b, one, one, one)  # CPU without the interpreter: the C++ op
    m = [t.to("meta") for t in (x, S1s, U1s, b)]
    assert not tc.kernel_ok(*m, one, one, one)
    # what the kernel never takes, whatever the device: float64, rank past MAX_RANK, bad arguments
    x64, S64, U64, b64 = factors(channels_last=True)
    big = torch.empty(2, tc.MAX_RANK, 5)
    for args in ((x64, S64, U64, b64, one, one, one),
                 (x, torch.empty(2 * tc.MAX_RANK, 3, 3, 3), big, b, one, one, one),
                 (x, S1s, U1s, b, [0, 1], one, one),
                 (x, S1s, U1s, b, one, [-1, 0], one),
                 (x, S1s, U1s, b[:3], one, one, one),
                 (x, S1s[:, :2], U1s, b, one, one, one),
                 (x, S1s, U1s.double(), b, one, one, one),
                 (x[:, :, :1, :1], S1s, U1s, b, one, [0, 0], one)):  # output smaller than 1x1
        assert not tc.kernel_ok(*args)


def test_bad_arguments_raise_like_the_cpp_op():
    x, S1s, U1s, b = factors()
    with pytest.raises(ValueError, match="input channels"):
        tc.sketched_conv2d_triton(x, S1s[:, :2], U1s, b)
    with pytest.raises(ValueError, match="bias must be"):
        tc.sketched_conv2d_triton(x, S1s, U1s, b[:3])
    with pytest.raises(ValueError, match="S1s.size"):
        tc.sketched_conv2d_triton(x, S1s[:3], U1s, b)
    with pytest.raises(TypeError, match="stride"):
        tc.sketched_conv2d_triton(x, S1s, U1s, b, stride=(1, 2, 3))


def test_skconv2d_loads_the_triton_op_lazily():
    from panther.nn import conv as nn_conv

    want = tc.sketched_conv2d_triton if tc.triton is not None else None
    assert nn_conv._triton_conv() is want


def test_skconv2d_cpu_unchanged():
    """On CPU SKConv2d keeps the C++ op (bit-identical), with or without triton."""
    layer = SKConv2d(3, 5, 3, padding=1, num_terms=1, low_rank=2, seed=0)
    x = torch.randn(2, 3, 7, 9)
    ref = torch.ops.panther.sketched_conv2d(x, layer.S1s, layer.U1s, layer.bias, [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


# ------------------------------------------------------------------ launch configs
@needs_triton
@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("algo", ["direct", "rowtap"])
def test_every_config_fits_hopper_shared_memory(algo, r_pad, elem_size):
    width = r_pad if algo == "direct" else 3 * r_pad  # rowtap: kw = 3 -> 2 + 1 column taps
    configs = tc.kernel_configs(r_pad, elem_size, algo, kw=3)
    if algo == "rowtap" and width > tc.MAX_ROWTAP_WIDTH:
        assert not tc.rowtap_ok(3, 1, 1, r_pad)  # never asked for
        return
    assert configs, "no config for a rank the kernel accepts"
    for c in configs:
        kw = c.kwargs
        assert tc.smem_bytes(kw["BLOCK_P"], kw["BLOCK_C"], kw["BLOCK_N"], c.num_stages, width, elem_size, r_pad,
                             gather=algo == "rowtap") <= tc.SMEM_LIMIT == 227 * 1024
        assert min(kw["BLOCK_P"], kw["BLOCK_C"], kw["BLOCK_N"]) >= 16  # tl.dot's minimum


def test_rowtap_eligibility():
    assert tc.rowtap_ok(3, 1, 1, 32) and tc.rowtap_ok(1, 1, 1, 256) and tc.rowtap_ok(5, 1, 3, 16)
    assert not tc.rowtap_ok(3, 2, 1, 32)        # column stride 2
    assert not tc.rowtap_ok(3, 1, 8, 32)        # halo 16 >= the smallest tile
    assert not tc.rowtap_ok(3, 1, 1, 128)       # 3 * 128 columns of accumulator
    assert tc.rowtap_ok(7, 1, 1, 32) and not tc.rowtap_ok(7, 1, 1, 64)  # 7 taps: 4 + 4 (3 padded)
    assert [tc._kw_split(k) for k in (1, 2, 3, 4, 5, 7)] == [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 4)]
    x, S1s, U1s, b = factors(dtype=torch.float32)
    with pytest.raises(ValueError, match="algo"):
        tc.conv_forward(x, S1s, U1s, b, (1, 2), (1, 1), (1, 1), algo="rowtap")


def _compile_for_hopper(algo, r_pad, cfg, num_warps, num_stages):
    """Compile a kernel (bf16, 3x3, channels_last strides) for sm_90 without a GPU, with the
    ptxas that ships with triton; returns (shared bytes, resource usage text, SASS)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = tc._sketched_conv2d_kernel if algo == "direct" else tc._sketched_conv2d_rowtap_kernel
    unit = {"sxc", "soc", "smn", "stride_h", "stride_w", "dil_h", "dil_w"}  # the JIT specialises 1s
    div16 = {"C_IN", "C_OUT", "sxn", "sxh", "sxw", "swt", "swi", "swc", "smr", "son", "soh", "sow"}
    consts = dict(KH=3, KW=3, R_PAD=r_pad, HAS_BIAS=True, DOT_CONV=0, DOT_MIX=0, TAPS_INNER=0, X_CA=0, **cfg)
    if algo == "rowtap":
        consts["KW_A"], consts["KW_B"] = 2, 1
    sig, attrs = {}, {}
    for i, n in enumerate(kern.arg_names):
        if n in ("X", "WM", "WR", "MIX", "BIAS", "OUT"):
            sig[n], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        elif n in consts or n in unit:
            sig[n] = "constexpr"
            consts.setdefault(n, 1)
        else:
            sig[n] = "i32"
            if n in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kern, signature=sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                        "num_stages": num_stages})
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        run = lambda *a: subprocess.run([str(bindir / "cuobjdump"), *a, f.name], capture_output=True,  # noqa: E731
                                        text=True, check=True).stdout
        return ck.metadata.shared, run("--dump-resource-usage"), run("--dump-sass")


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("algo", ["direct", "rowtap"])
def test_kernel_compiles_for_hopper(algo):
    """No GPU needed: the first bf16 config of each kernel compiles for sm_90 with wgmma (HGMMA),
    16-byte cp.async loads of x, no local-memory spills, and shared memory within Hopper's limit
    (the real figure, which the estimate bounds)."""
    c = tc.kernel_configs(32, 2, algo, kw=3)[0]
    cfg = {k: v for k, v in c.kwargs.items() if k in ("BLOCK_P", "BLOCK_C", "BLOCK_N")}
    try:
        shared, usage, sass = _compile_for_hopper(algo, 32, cfg, c.num_warps, c.num_stages)
    except (ImportError, TypeError, KeyError, AttributeError, FileNotFoundError) as e:  # triton API drift
        pytest.skip(f"cannot compile for sm_90 offline with this triton: {e!r}")
    width = 32 if algo == "direct" else 96
    assert 0 < shared <= tc.smem_bytes(cfg["BLOCK_P"], cfg["BLOCK_C"], cfg["BLOCK_N"], c.num_stages, width, 2, 32,
                                       gather=algo == "rowtap") <= tc.SMEM_LIMIT
    assert "STACK:0" in usage.replace(" ", "")
    assert "HGMMA" in sass and "LDGSTS.E.BYPASS.128" in sass


# ------------------------------------------------------------------ bench entry point (CPU)
def test_bench_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the bench would run for real")
    from inductor_ext import triton_conv_bench

    assert triton_conv_bench.main([]) == 0
    assert "CUDA is not available" in capsys.readouterr().out


# ------------------------------------------------------------------ CUDA (the lent H200)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
AUTOTUNE_LIMIT = tc._MAX_CONFIGS  # the production list, launched config by config below


@pytest.fixture
def quick_autotune():
    """First calls autotune over 2 configs instead of 4: half the compiles (device time is scarce);
    test_cuda_every_config_launches still runs every production candidate."""
    saved = tc._MAX_CONFIGS, dict(tc._AUTOTUNERS)
    tc._MAX_CONFIGS = 2
    tc._AUTOTUNERS.clear()
    yield
    tc._MAX_CONFIGS = saved[0]
    tc._AUTOTUNERS.clear()
    tc._AUTOTUNERS.update(saved[1])


SHAPES = {"odd": dict(N=3, C_in=67, C_out=133, H=13, W=11, L=1, k=16),
          "L2_5x3": dict(N=2, C_in=64, C_out=96, H=15, W=17, L=2, k=5, kh=5, kw=3),
          "tiny": dict(N=1, C_in=3, C_out=5, H=7, W=9, L=2, k=1)}
CONVS = {"s1": ((1, 1), (1, 1), (1, 1)), "s2": ((2, 2), (1, 0), (1, 1)), "dil": ((1, 2), (2, 2), (2, 1))}
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.cuda
@cuda_only
# a Latin square over (dtype, shape, conv): each pair once, nine first-call autotunes instead of 27
@pytest.mark.parametrize("dtype,shape,conv", [
    (F32, "odd", "s1"), (F32, "L2_5x3", "s2"), (F32, "tiny", "dil"),
    (BF16, "odd", "s2"), (BF16, "L2_5x3", "dil"), (BF16, "tiny", "s1"),
    (F16, "odd", "dil"), (F16, "L2_5x3", "s1"), (F16, "tiny", "s2")])
def test_cuda_against_float64(dtype, shape, conv, quick_autotune):
    shape, conv = SHAPES[shape], CONVS[conv]
    x, S1s, U1s, b = factors(dtype=dtype, device="cuda", channels_last=True, **shape)
    ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(), b.double(), *conv)
    prev = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False  # fp32: ieee dots, so 1e-5 is meaningful
        assert tc.kernel_ok(x, S1s, U1s, b, *[list(a) for a in conv])
        out = tc.sketched_conv2d_triton(x, S1s, U1s, b, *conv)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("r_pad,dtype", [(16, torch.bfloat16), (32, torch.bfloat16), (64, torch.bfloat16),
                                         (256, torch.bfloat16), (32, torch.float32)])
@pytest.mark.parametrize("algo", ["direct", "rowtap"])
def test_cuda_every_config_launches(algo, r_pad, dtype):
    """Each autotune candidate of a bucket compiles, fits the device's shared memory and computes the
    right thing (NaN-poisoned output, tails everywhere, one and three column groups)."""
    if algo == "rowtap" and not tc.rowtap_ok(3, 1, 1, r_pad):
        pytest.skip("rowtap does not take this rank")
    k = (r_pad - 2) // 2 if r_pad > 16 else 5  # R = 2k just under the bucket's width: padded columns
    x, S1s, U1s, b = factors(N=2, C_in=70, C_out=150, H=9, W=13, L=1, k=k, dtype=dtype, device="cuda",
                             channels_last=True)
    ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(), b.double(), 1, 1)
    configs = tc.kernel_configs(r_pad, x.element_size(), algo, kw=3, limit=AUTOTUNE_LIMIT)
    assert configs
    for c in configs:
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        for groups in (1, 3):
            out = torch.full_like(ref, float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
            tc.conv_forward(x, S1s, U1s, b, (1, 1), (1, 1), (1, 1), algo=algo, config=cfg, col_groups=groups,
                            out=out)
            assert rel(out, ref) < (2e-2 if dtype != torch.float32 else 5e-3), (cfg, groups)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_rowtap_against_float64(dtype, quick_autotune):
    """The rowtap kernel on odd shapes: rows wider than one strip, dilation, stride_h 2, 5x3 taps."""
    for shape, conv in ((dict(N=2, C_in=67, C_out=133, H=13, W=150, L=1, k=16), ((1, 1), (1, 1), (1, 1))),
                        (dict(N=1, C_in=64, C_out=96, H=15, W=17, L=2, k=5, kh=5, kw=3), ((2, 1), (2, 2), (1, 2)))):
        x, S1s, U1s, b = factors(dtype=dtype, device="cuda", channels_last=True, **shape)
        ref = sketched_conv2d_reference(x.double(), S1s.double(), U1s.double(), b.double(), *conv)
        prev = torch.backends.cudnn.allow_tf32
        try:
            torch.backends.cudnn.allow_tf32 = False
            out = tc.conv_forward(x, S1s, U1s, b, *conv, algo="rowtap")
        finally:
            torch.backends.cudnn.allow_tf32 = prev
        assert rel(out, ref) < TOL[dtype]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_gradients_against_float64(dtype, tol, quick_autotune):
    x, S1s, U1s, b = factors(N=2, C_in=40, C_out=48, H=11, W=10, L=2, k=4, dtype=dtype, device="cuda",
                             channels_last=True, requires_grad=True)
    y = tc.sketched_conv2d_triton(x, S1s, U1s, b, 2, 1)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, S1s, U1s, b), gy)
    ref_in = [t.detach().double().requires_grad_() for t in (x, S1s, U1s, b)]
    want = torch.autograd.grad(sketched_conv2d_reference(*ref_in, 2, 1), ref_in, gy.double())
    for a, w in zip(got, want):
        assert rel(a, w) < tol


@pytest.mark.cuda
@cuda_only
def test_cuda_skconv2d_takes_the_kernel(quick_autotune):
    layer = SKConv2d(64, 96, 3, padding=1, num_terms=1, low_rank=16, seed=0, device="cuda",
                     dtype=torch.bfloat16)
    x = torch.randn(4, 64, 20, 20, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = layer(x)
        torch.cuda.synchronize()
    assert any(n in e.name for e in prof.events() for n in KERNEL_NAMES)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = torch.ops.panther.sketched_conv2d(x, layer.S1s, layer.U1s, layer.bias, [1, 1], [1, 1], [1, 1])
    assert rel(out, ref) < 2e-2
    out.float().sum().backward()
    assert layer.S1s.grad is not None and torch.isfinite(layer.S1s.grad).all()


@pytest.mark.cuda
@cuda_only
def test_cuda_opcheck(quick_autotune):
    """Fake tensors / AOT dispatch through the Triton branch (wrap_triton) on CUDA."""
    x, S1s, U1s, b = factors(N=2, C_in=16, C_out=24, H=9, W=7, L=1, k=8, dtype=torch.float32, device="cuda",
                             channels_last=True, requires_grad=True)
    torch.library.opcheck(OP, (x, S1s, U1s, b, [2, 1], [1, 1], [1, 1]))


@pytest.mark.cuda
@cuda_only
def test_cuda_inductor_inlines_the_kernel(quick_autotune):
    from torch._inductor.utils import run_and_get_code

    x, S1s, U1s, b = factors(N=2, C_in=32, C_out=48, H=12, W=12, L=1, k=8, dtype=torch.bfloat16,
                             device="cuda", channels_last=True)
    fn = torch.compile(lambda *a: torch.relu(tc.sketched_conv2d_triton(*a, 1, 1)), fullgraph=True)
    torch._dynamo.reset()
    out, code = run_and_get_code(fn, x, S1s, U1s, b)
    src = "\n".join(code)
    assert any(n in src for n in KERNEL_NAMES)
    assert "torch.ops.panther.sketched_conv2d_triton" not in src  # inlined, not an opaque op call
    assert rel(out, torch.relu(tc.sketched_conv2d_triton(x, S1s, U1s, b, 1, 1))) < 1e-2


@pytest.mark.cuda
@cuda_only
def test_cuda_backend_conv_rewrite_inlines_the_fused_kernel(quick_autotune):
    """backend="panther" with Inductor on CUDA: a channels_last conv rewritten to panther.sketched_conv2d
    is retargeted to the Triton op (inductor_ext.kernel_routing) and its kernel inlined; the numbers
    match the same rewrite run by aot_eager (the C++ op, same sketch)."""
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend
    from panther.policy import SketchSpec

    model = torch.nn.Sequential(torch.nn.Conv2d(64, 96, 3, padding=1), torch.nn.ReLU()).cuda().eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 20, 20, device="cuda").contiguous(memory_format=torch.channels_last)
    outs, code = {}, []
    for compiler in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        options = {"policy": {"conv2d": SketchSpec(num_terms=1, low_rank=8, seed=1)}, "compiler": compiler}
        compiled = torch.compile(model, backend=panther_backend, options=options)
        with torch.no_grad():
            outs[compiler], code = run_and_get_code(compiled, x)
    src = "\n".join(code)
    assert any(n in src for n in KERNEL_NAMES)
    assert rel(outs["inductor"], outs["aot_eager"]) < 1e-3  # fp32: TF32 conv phase, as cuDNN's default


def test_kernel_routing_leaves_cpu_graphs_alone():
    from inductor_ext import kernel_routing

    x, S1s, U1s, b = factors(dtype=torch.float32, channels_last=True)
    gm = torch.fx.symbolic_trace(lambda x, S, U, b: torch.ops.panther.sketched_conv2d(
        x, S, U, b, [1, 1], [1, 1], [1, 1]))
    for node, val in zip([n for n in gm.graph.nodes if n.op == "placeholder"], (x, S1s, U1s, b)):
        node.meta["example_value"] = val
    assert len(kernel_routing._nodes(gm, "sketched_conv2d")) == 1  # found (recorded as the packet here)
    assert kernel_routing._route_conv(gm) == 0  # CPU example values: the C++ op stays
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.panther.sketched_conv2d]
