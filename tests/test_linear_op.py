"""panther::sketched_linear against its plain-torch definition: opcheck, gradcheck, random shapes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import panther  # noqa: F401
from panther.ops import sketched_linear_reference

OPS = [torch.ops.panther.sketched_linear.default, torch.ops.panther.sketched_linear_fwd.default]


def factors(L, d_in, k, d_out, dtype=torch.float64, requires_grad=False, u_grad=False, bias=True, lead=(4,)):
    g = torch.Generator().manual_seed(L * 1000 + d_in * 100 + k * 10 + d_out)
    mk = lambda *s, rg=requires_grad: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(rg)  # noqa: E731
    x = mk(*lead, d_in)
    return (x, mk(L, d_in, k), mk(L, k, d_out), mk(L, k, d_out, rg=u_grad), mk(L, d_in, k, rg=u_grad),
            mk(d_out) if bias else None)


@pytest.mark.parametrize("op", OPS, ids=["sketched_linear", "sketched_linear_fwd"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=["2d", "3d", "1d"])
def test_opcheck(op, bias, lead):
    args = factors(2, 6, 3, 5, dtype=torch.float32, requires_grad=True, bias=bias, lead=lead)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_gradcheck_float64(bias, lead):
    args = factors(2, 6, 3, 5, requires_grad=True, u_grad=True, bias=bias, lead=lead)
    assert torch.autograd.gradcheck(torch.ops.panther.sketched_linear, args)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 3), d_in=st.integers(1, 17), k=st.integers(1, 5), d_out=st.integers(1, 17),
       lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), bias=st.booleans())
def test_matches_reference_random_shapes(L, d_in, k, d_out, lead, bias):
    args = factors(L, d_in, k, d_out, requires_grad=True, u_grad=True, bias=bias, lead=tuple(lead))
    y = torch.ops.panther.sketched_linear(*args)
    y_ref = sketched_linear_reference(*args)
    assert y.shape == (*lead, d_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y)
    inputs = [a for a in args if a is not None]
    got = torch.autograd.grad(y, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(y_ref, inputs, grad, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_non_contiguous_input():
    x, *rest = factors(2, 6, 3, 5)
    xt = torch.randn(6, 7, dtype=torch.float64).t()  # (7, 6), not viewable as rows
    torch.testing.assert_close(torch.ops.panther.sketched_linear(xt, *rest), sketched_linear_reference(xt, *rest))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_dtypes(dtype, tol):
    args = factors(2, 64, 8, 32)
    y64 = sketched_linear_reference(*args)
    y = torch.ops.panther.sketched_linear(*[a.to(dtype) for a in args])
    assert y.dtype == dtype
    assert ((y.double() - y64).norm() / y64.norm()).item() < tol


def test_autocast_cpu_bfloat16():
    args = [a.float() for a in factors(1, 32, 4, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.panther.sketched_linear(*args)
    assert y.dtype == torch.bfloat16
    ref = sketched_linear_reference(*args)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 3e-2


def test_empty_batch():
    x, *rest = factors(1, 6, 2, 5, lead=(0,))
    assert torch.ops.panther.sketched_linear(x, *rest).shape == (0, 5)


def test_backward_is_optimal_six_nlk():
    """Forward xA is reused: dx, dS1s, dS2s cost exactly 6·N·L·k·(d_in+d_out) FLOPs (U's frozen)."""
    N, L, d_in, k, d_out = 64, 2, 48, 4, 40
    x, S1s, S2s, U1s, U2s, b = factors(L, d_in, k, d_out, dtype=torch.float32, requires_grad=True, lead=(N,))
    y = torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, b)
    with FlopCounterMode(display=False) as counter:
        y.backward(torch.ones_like(y))
    assert counter.get_total_flops() == 6 * N * L * k * (d_in + d_out)


def test_bad_factors_raise_value_and_type_errors():
    x, S1s, S2s, U1s, U2s, b = factors(2, 6, 3, 5)
    with pytest.raises(ValueError, match="U2s must be"):
        torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s[:, :, :2], b)
    with pytest.raises(ValueError, match="in_features=6"):
        torch.ops.panther.sketched_linear(x[..., :5], S1s, S2s, U1s, U2s, b)
    with pytest.raises(TypeError, match="factors must have x's dtype Double, got Float"):
        torch.ops.panther.sketched_linear(x, S1s.float(), S2s, U1s, U2s, b)
    with pytest.raises(TypeError, match="bias must have x's dtype Double, got Float"):
        torch.ops.panther.sketched_linear(x, S1s, S2s, U1s, U2s, b.float())


@pytest.mark.parametrize("fwd", ["sketched_linear_fwd", "sketched_linear_triton_fwd"])
def test_fwd_ops_fill_no_zero_gradient_for_xA(fwd):
    """The two-output forward ops (y, xA): a loss on y fills no zero gradient for xA (autograd
    hands None), and a loss on xA alone (y's gradient None) gives what explicit zeros for y give."""
    import inductor_ext.triton_linear  # noqa: F401  (registers the Triton op; CPU runs its CPU branch)
    op = getattr(torch.ops.panther, fwd)
    args = factors(2, 48, 4, 40, dtype=torch.float32, requires_grad=True, u_grad=True, lead=(64,))
    y, xA = op(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y.backward(torch.ones_like(y))
    fills = [e.input_shapes for e in prof.events()
             if e.name in ("aten::fill_", "aten::zero_") and e.input_shapes and list(e.input_shapes[0]) == list(xA.shape)]
    assert not fills, fills
    y, xA = op(*args)
    got = torch.autograd.grad((xA * xA).sum(), args)
    y, xA = op(*args)
    want = torch.autograd.grad((xA * xA).sum() + (y * 0).sum(), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
