"""panther::srpe_filter_sines: the sine-SRPE contraction with its bases built on chip.

CPU CI: the kernel's arithmetic in Triton's interpreter (one subprocess, TRITON_INTERPRET=1); the op's
CPU branch against the float64 reference, opcheck and float64 gradcheck of its backward. On a GPU machine:
the kernel against the reference and opcheck of the CUDA branch, and sinSRPE.filter taking it.
"""

import copy

import pytest
import torch

import panther  # noqa: F401
from inductor_ext import triton_srpe as ts
from panther.nn import sinSRPE
from panther.ops.attention import sine_bases, srpe_filter_reference, srpe_filter_sines_backward
from interpret_common import run_interpreter_check  # tests/ is on sys.path

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def inputs(B=2, L=9, H=2, d=3, S=2, R=5, dtype=torch.float64, device="cpu", phase=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    adt = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, dt):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
    x = randn(B, L, H, d, dt=dtype)
    theta = (torch.rand(H, d, S, generator=g, dtype=torch.float64) * 0.5).to(device=device, dtype=adt)
    ph = randn(H, d, S, dt=adt) if phase else None
    w = randn(H, d, 2 * S, R, dt=dtype)
    return x, theta, ph, w


def float64_reference(x, theta, phase, w):
    """The bases of ``sine_bases`` in float64 into the project's oracle, ``srpe_filter_reference``."""
    omega = sine_bases(theta.double(), None if phase is None else phase.double(), x.shape[1])
    return srpe_filter_reference(x.double(), omega, w.double())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(ts.triton is None, reason="needs triton")
def test_kernel_arithmetic_in_triton_interpreter():
    """Tails in positions, features, sines and outputs; one sine; no phase; fp32 / bf16 / fp16."""
    run_interpreter_check("triton_srpe_interpret_check.py", "all srpe interpreter checks passed")


@pytest.mark.parametrize("phase", [True, False])
def test_cpu_branch_matches_float64_reference(phase):
    x, theta, ph, w = inputs(phase=phase)
    assert not ts.kernel_ok(x, theta, w)           # CPU without the interpreter: the C++ op
    torch.testing.assert_close(ts.srpe_filter_sines(x, theta, ph, w), float64_reference(x, theta, ph, w))


@pytest.mark.parametrize("phase", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, phase):
    torch.library.opcheck(torch.ops.panther.srpe_filter_sines.default,
                          inputs(dtype=dtype, phase=phase))


@pytest.mark.parametrize("phase", [True, False])
def test_gradcheck_float64(phase):
    args = [t.requires_grad_() if t is not None else None for t in inputs(L=6, phase=phase)]
    assert torch.autograd.gradcheck(ts.srpe_filter_sines, args)


@pytest.mark.parametrize("phase", [True, False])
def test_cpu_branch_in_chunks_of_positions(monkeypatch, phase):
    """The CPU branch builds the bases a few positions at a time, forward and backward (every
    ``sine_bases`` call covers at most 4 of the 9 positions): the same output and gradients as in
    one go, and gradcheck holds with chunk tails."""
    import panther.ops.attention as pa

    args = [t.requires_grad_() if t is not None else None for t in inputs(phase=phase)]
    go = torch.randn(2, 9, 2, 5, dtype=torch.float64)
    out = ts.srpe_filter_sines(*args)
    whole = torch.autograd.grad(out, [a for a in args if a is not None], go)
    H, d, S = args[1].shape
    lengths, bases = [], pa.sine_bases
    monkeypatch.setattr(pa, "sine_bases", lambda *a, **kw: lengths.append(a[2]) or bases(*a, **kw))
    monkeypatch.setattr(pa, "SRPE_CHUNK_BYTES", 4 * H * d * 2 * S * 8)   # 4 positions (fp64)
    out_chunked = ts.srpe_filter_sines(*args)
    chunked = torch.autograd.grad(out_chunked, [a for a in args if a is not None], go)
    assert lengths == [4, 4, 1] * 2            # forward, then backward
    for a, b in zip((out_chunked, *chunked), (out, *whole)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(ts.srpe_filter_sines, args)


def test_module_gradients_reach_frequencies_and_phases():
    """sinSRPE's learnable sines get gradients through the op (theta = 2 pi sigmoid(freqs) / 2)."""
    pe = sinSRPE(2, 3, 2, num_realizations=4, seed=0, dtype=torch.float64)
    x = torch.randn(1, 7, 2, 3, dtype=torch.float64)
    theta, phase = pe.angles()
    ts.srpe_filter_sines(x, theta, phase, pe.mixing()).square().sum().backward()
    assert pe.freqs.grad.abs().sum() > 0 and pe.phases.grad.abs().sum() > 0 and pe.scales.grad is not None


def test_validation_errors():
    x, theta, ph, w = inputs()
    with pytest.raises(ValueError, match="theta"):
        ts.srpe_filter_sines(x, theta[:, :, :1], ph, w)
    with pytest.raises(ValueError, match="phase"):
        ts.srpe_filter_sines(x, theta, ph[:1], w)
    with pytest.raises(ValueError, match="expected x"):
        ts.srpe_filter_sines(x[0], theta, ph, w)
    with pytest.raises(TypeError, match="x and weight"):
        ts.srpe_filter_sines(x, theta, ph, w.float())


# ------------------------------------------------------------------ GPU
@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_matches_reference(dtype, tol):
    x, theta, ph, w = inputs(B=2, L=300, H=3, d=64, S=8, R=256, dtype=dtype, device="cuda")
    assert ts.kernel_ok(x, theta, w)
    assert rel(ts.srpe_filter_sines(x, theta, ph, w), float64_reference(x, theta, ph, w)) < tol


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_backward_matches_chunked_path(dtype, tol):
    """The backward kernel (bases on chip, rows split, outputs in blocks) against the C++ backward on
    materialised bases: every gradient, with 256 outputs (several output blocks: dx summed)."""
    x, theta, ph, w = inputs(B=2, L=300, H=3, d=64, S=8, R=256, dtype=dtype, device="cuda")
    go = torch.randn(2, 300, 3, 256, device="cuda").to(dtype)
    fused = ts._launch_backward(go, x, theta, ph, w, True, True)
    chunked = srpe_filter_sines_backward(go.double(), x.double(), theta.double(), ph.double(),
                                         w.double(), [True] * 4)
    for name, a, b in zip(("dx", "dtheta", "dphase", "dweight"), fused, chunked):
        assert rel(a, b) < tol, name


@cuda_only
@pytest.mark.cuda
def test_cuda_opcheck():
    torch.library.opcheck(torch.ops.panther.srpe_filter_sines.default,
                          inputs(L=70, d=16, S=3, R=24, dtype=torch.float32, device="cuda"))


@cuda_only
@pytest.mark.cuda
def test_cuda_filter_takes_the_fused_op():
    """sinSRPE.filter on CUDA (the fused op) against the CPU path, outputs and the gradients of the
    sines, the scales and the inputs."""
    from panther.nn import srpe
    pe = sinSRPE(2, 16, 4, num_realizations=32, seed=0)
    assert srpe.triton_srpe.op is not None
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 50, 2, 16, generator=g), torch.randn(2, 40, 2, 16, generator=g)
    grads = []
    for module, dev in ((pe, "cpu"), (copy.deepcopy(pe).cuda(), "cuda")):
        qd, kd = q.to(dev).detach().requires_grad_(), k.to(dev).detach().requires_grad_()
        qh, kh = module.filter(qd, kd)
        (qh.square().sum() + kh.sum()).backward()
        grads.append([t.detach().cpu() for t in (qh, kh, qd.grad, kd.grad, module.freqs.grad,
                                                 module.phases.grad, module.scales.grad)])
    for cpu, gpu in zip(*grads):
        # the sines' gradients sum n·sin(θn) terms over positions: fp32 rounding scales with the largest
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5 * max(1.0, cpu.abs().max().item()))


@cuda_only
@pytest.mark.cuda
def test_cuda_compile_inlines_the_kernel():
    """torch.compile of sinSRPE.filter on CUDA: Inductor's code launches the SRPE kernel itself."""
    from torch._inductor.utils import run_and_get_code
    pe = sinSRPE(2, 16, 4, num_realizations=32, seed=0).cuda()
    q, k = torch.randn(2, 50, 2, 16, device="cuda"), torch.randn(2, 40, 2, 16, device="cuda")
    torch._dynamo.reset()
    (qh, kh), code = run_and_get_code(torch.compile(pe.filter, fullgraph=True), q, k)
    ref_q, ref_k = pe.filter(q, k)
    torch.testing.assert_close(qh, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kh, ref_k, rtol=1e-5, atol=1e-5)
    assert "_srpe_sines_kernel" in "\n".join(code)


@cuda_only
@pytest.mark.cuda
def test_cuda_compile_inlines_the_backward_kernel():
    """A compiled training step through sinSRPE.filter: Inductor's backward launches the SRPE backward
    kernel itself, with the eager gradients."""
    from torch._inductor.utils import run_and_get_code
    pe = sinSRPE(2, 16, 4, num_realizations=32, seed=0).cuda()
    q, k = torch.randn(2, 50, 2, 16, device="cuda"), torch.randn(2, 40, 2, 16, device="cuda")
    compiled = torch.compile(pe.filter, fullgraph=True)
    torch._dynamo.reset()

    def step(filter_fn):
        pe.zero_grad()
        qd, kd = q.clone().requires_grad_(), k.clone().requires_grad_()
        qh, kh = filter_fn(qd, kd)
        (qh.square().sum() + kh.sum()).backward()
        return [t.clone() for t in (qd.grad, kd.grad, pe.freqs.grad, pe.phases.grad, pe.scales.grad)]
    grads, code = run_and_get_code(step, compiled)
    # relative to each gradient's norm: Inductor's own sigmoid and softplus around the op move single
    # elements of d freqs, a sum over positions with cancellation, by up to 6e-4 of their value
    for name, got, want in zip(("dq", "dk", "dfreqs", "dphases", "dscales"), grads, step(pe.filter)):
        assert rel(got, want) < 1e-4, name
    assert "_srpe_sines_bwd_kernel" in "\n".join(code)


@pytest.mark.skipif(ts.triton is None, reason="needs triton")
def test_kernels_write_only_their_outputs():
    """Inductor's mutation analysis of both kernels names only their output buffers as written. It
    once counted theta and the phases as written too (a helper that loaded them also gave the store
    addresses), which made every compiled training step through the backward fail on the GPU."""
    from hopper_compile import record_launches, written_arguments
    x, theta, ph, w = inputs(L=40, d=16, S=3, R=24, dtype=torch.float32)
    launches = record_launches(lambda: (ts._launch(x, theta, ph, w), ts._launch_backward(
        torch.randn(2, 40, 2, 24), x, theta, ph, w, True, True)), ts)
    written = {la.kernel.__name__: written_arguments(la) for la in launches}
    assert written == {"_srpe_sines_kernel": {"OUT"}, "_srpe_sines_bwd_kernel": {"DX", "DW", "DTH", "DPH"}}
