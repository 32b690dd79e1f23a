"""sinSRPE positional codes and the panther::srpe_filter op."""
import math

import pytest
import torch
from torch.nn import functional as F

import panther  # noqa: F401
from panther.nn import RandMultiHeadAttention, sinSRPE
from panther.nn.pawXimpl import sinSRPE as sinSRPE_compat
from panther.ops.attention import srpe_filter_reference

FILTER = torch.ops.panther.srpe_filter
FILTER_B = torch.ops.panther.srpe_filter_backward


def codes_by_formula(pe, length):
    """§6.2 written out term by term (independent of the module's vectorised code)."""
    H, d, S, R = pe.num_heads, pe.perHead_in, pe.sines, pe.num_realizations
    f = torch.sigmoid(pe.freqs.double()) / 2
    ph = pe.phases.double()
    s = F.softplus(pe.scales.double())
    z = pe.z.double()
    qbar = torch.zeros(length, H, d, R, dtype=torch.float64)
    kbar = torch.zeros(length, H, d, R, dtype=torch.float64)
    for n in range(length):
        for j in range(S):
            a = 2 * math.pi * f[..., j] * n  # (H, d)
            qbar[n] += ((torch.cos(a + ph[..., j]) * s[..., j])[..., None] * z[:, :, j]
                        + (torch.sin(a + ph[..., j]) * s[..., j])[..., None] * z[:, :, S + j])
            kbar[n] += ((torch.cos(a) * s[..., j])[..., None] * z[:, :, j]
                        + (torch.sin(a) * s[..., j])[..., None] * z[:, :, S + j])
    c = (R * d) ** 0.25
    return qbar / c, kbar / c


def test_compat_path_and_state(capsys):
    assert sinSRPE_compat is sinSRPE
    pe = sinSRPE(3, 4, 5, num_realizations=7, seed=0)
    assert capsys.readouterr().out == ""  # no debug prints
    params = dict(pe.named_parameters())
    assert set(params) == {"freqs", "phases", "scales"}
    for p in params.values():
        assert p.shape == (3, 4, 5) and p.dtype == torch.get_default_dtype()
    assert pe.z.shape == (3, 4, 10, 7) and "z" in pe.state_dict()
    assert "z" not in params
    torch.testing.assert_close(pe.scales.norm(dim=-1), torch.full((3, 4), 2.0))
    assert pe.freqs.mean() < -3  # N(0,1) - 4
    qbar, kbar = pe(6)
    assert qbar.shape == kbar.shape == (1, 6, 3, 4, 7)
    pe64 = sinSRPE(2, 2, 2, 3, dtype=torch.float64)
    assert pe64.z.dtype == torch.float64 and pe64(3)[0].dtype == torch.float64


def test_codes_match_formula():
    pe = sinSRPE(2, 3, 4, num_realizations=5, seed=1, dtype=torch.float64)
    qbar, kbar = pe(7)
    qf, kf = codes_by_formula(pe, 7)
    torch.testing.assert_close(qbar[0], qf)
    torch.testing.assert_close(kbar[0], kf)


def test_randomness():
    state = torch.get_rng_state()
    a, b = sinSRPE(2, 3, 4, 5, seed=3), sinSRPE(2, 3, 4, 5, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.z, b.z) and torch.equal(a.freqs, b.freqs)
    torch.manual_seed(0)
    c, d = sinSRPE(2, 3, 4, 5), sinSRPE(2, 3, 4, 5)
    assert not torch.equal(c.z, d.z)
    torch.manual_seed(0)
    assert torch.equal(sinSRPE(2, 3, 4, 5).z, c.z)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(num_heads=0), ValueError), (dict(perHead_in=-1), ValueError),
    (dict(sines=2.0), TypeError), (dict(num_realizations=0), ValueError),
    (dict(num_realizations=True), TypeError)])
def test_validation(kwargs, exc):
    args = dict(num_heads=2, perHead_in=3, sines=4, num_realizations=5)
    args.update(kwargs)
    with pytest.raises(exc):
        sinSRPE(**args)


def test_expectation_identity_monte_carlo():
    """E_z[qhat_n . khat_m] = sqrt(R/d) sum_i q_i k_i sum_j softplus(s_ij)^2 cos(2 pi f_ij (n-m) + phi_ij)

    qhat.khat is a sum over R i.i.d. realisations, so with one large R the per-realisation
    products give both the Monte-Carlo mean and its standard error."""
    H, d, S, R, L = 1, 3, 4, 40000, 5
    pe = sinSRPE(H, d, S, num_realizations=R, seed=11, dtype=torch.float64)
    with torch.no_grad():
        pe.freqs.add_(3.0)  # faster sines so that the relative kernel visibly varies with n-m
        qbar, kbar = pe(L)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(L, d, generator=g, dtype=torch.float64)
    k = torch.randn(L, d, generator=g, dtype=torch.float64)
    qhat = torch.einsum("nd,ndr->nr", q, qbar[0, :, 0])
    khat = torch.einsum("nd,ndr->nr", k, kbar[0, :, 0])
    f = torch.sigmoid(pe.freqs[0].detach()) / 2
    ph = pe.phases[0].detach()
    s2 = F.softplus(pe.scales[0].detach()) ** 2
    checked = 0
    for n in range(L):
        for m in range(L):
            prods = qhat[n] * khat[m] * R  # R i.i.d. samples of R * (per-realisation term)
            kern = (s2 * torch.cos(2 * math.pi * f * (n - m) + ph)).sum(-1)  # (d,)
            expected = math.sqrt(R / d) * (q[n] * k[m] * kern).sum() * 1.0
            mc = prods.mean() * 1.0
            stderr = prods.std() / math.sqrt(R)
            # qhat.khat = mean(prods) exactly
            torch.testing.assert_close(qhat[n] @ khat[m], mc)
            assert abs(mc - expected) <= 5 * stderr, (n, m, mc.item(), expected.item())
            checked += abs(expected) > 10 * stderr
    assert checked >= 5  # the identity was tested where the expectation is clearly non-zero


# ------------------------------------------------------------------------------------------
# the srpe_filter op

def make(B=2, L=5, H=2, d=3, J=4, R=6, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(*s, generator=g, dtype=dtype)
          for s in ((B, L, H, d), (L, H, d, J), (H, d, J, R))]
    return [t.requires_grad_(requires_grad) for t in ts]


# the op's two routes (csrc): codes where B·J > R, direct (z = x ⊙ omega, one GEMM per head) else
ROUTES = {"codes": dict(B=2, J=4, R=6), "direct": dict(B=1, J=4, R=6)}


@pytest.mark.parametrize("route", ROUTES)
def test_filter_matches_reference_and_grads(route):
    x, om, w = make(**ROUTES[route], requires_grad=True)
    out = FILTER(x, om, w)
    ref = srpe_filter_reference(x, om, w)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, om, w), g), torch.autograd.grad(ref, (x, om, w), g)):
        torch.testing.assert_close(a, b)


# (device, positions): 2^19 values per position (codes: H·d·R; direct: B·H·d·J) make 2 positions
# per block on the CPU (2^20-element budget) and 32 on a GPU (2^24): 3 blocks either way
_BLOCKS = [("cpu", 5), pytest.param("cuda", 70, marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("route", ["codes", "direct"])
@pytest.mark.parametrize("device,length", _BLOCKS)
def test_filter_multiple_position_blocks(route, device, length):
    # d·J = 4 keeps every sum short, so fp32 matches elementwise
    shape = dict(B=3, R=4) if route == "codes" else dict(B=2, R=8)
    x, om, w = make(**shape, L=length, H=1 << 16, d=2, J=2, dtype=torch.float32,
                    requires_grad=True)
    dev = [t.detach().to(device).requires_grad_() for t in (x, om, w)]
    out = FILTER(*dev)
    ref = srpe_filter_reference(x, om, w)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, dev, g.to(device))
    for a, b in zip(got, torch.autograd.grad(ref, (x, om, w), g)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)


def test_filter_opcheck_and_gradcheck():
    x, om, w = make(dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(FILTER, (x, om, w))
    torch.library.opcheck(FILTER_B, (torch.randn(2, 5, 2, 6), x.detach(), om.detach(), w.detach(),
                                     [True, False, True]),
                          test_utils=("test_schema", "test_faketensor"))
    for B in (2, 1):   # codes (B·J = 4 > R = 3), direct (2 <= 3)
        x, om, w = make(B=B, L=3, H=2, d=2, J=2, R=3, requires_grad=True)
        assert torch.autograd.gradcheck(FILTER, (x, om, w))
        # only some inputs need gradients
        x2 = x.detach()
        assert torch.autograd.gradcheck(lambda o, ww: FILTER(x2, o, ww), (om, w))
        assert torch.autograd.gradcheck(lambda xx: FILTER(xx, om.detach(), w.detach()), (x,))


def test_filter_empty_and_errors():
    x, om, w = make(B=0)
    assert FILTER(x, om, w).shape == (0, 5, 2, 6)
    x, om, w = make(L=0)
    assert FILTER(x, om, w).shape == (2, 0, 2, 6)
    x, om, w = make()
    with pytest.raises(ValueError, match="srpe_filter"):
        FILTER(x, om[:4], w)
    with pytest.raises(TypeError, match="dtype"):
        FILTER(x.float(), om, w)


def test_filter_bf16_accumulates_in_fp32():
    x, om, w = make(B=3, L=9, H=2, d=16, J=8, R=32, dtype=torch.float32)
    xb, ob, wb = x.bfloat16(), om.bfloat16(), w.bfloat16()
    out = FILTER(xb, ob, wb)
    assert out.dtype == torch.bfloat16
    ref = FILTER(xb.float(), ob.float(), wb.float())
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_attention_with_srpe_never_builds_batched_codes():
    torch.manual_seed(0)
    B, L, E, H, R = 4, 40, 32, 2, 64
    pe = sinSRPE(H, E // H, 4, num_realizations=R)
    layer = RandMultiHeadAttention(E, H, 16, SRPE=pe)
    x = torch.randn(B, L, E, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        out, _ = layer(x, x, x)
        out.sum().backward()
    biggest = max(math.prod(s) for ev in prof.events() for s in (ev.input_shapes or []) if s)
    assert biggest < B * L * H * (E // H) * R // 2  # codes of all positions: 1/B of it
    for p in (pe.freqs, pe.phases, pe.scales, layer.Wq):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- sinSRPE.filter off CUDA
def test_filter_builds_bases_a_block_of_positions_at_a_time(monkeypatch):
    """Off CUDA the filter never builds the whole sequence's bases, forward or backward: with blocks of
    4 positions over 11 (a tail), every ``sine_bases`` call covers at most 4, and the outputs and every
    gradient (q, k, freqs, phases, scales) equal the codes' formula (``forward``'s materialised
    codes contracted by einsum)."""
    import panther.ops.attention as pa

    pe = sinSRPE(2, 3, 2, num_realizations=5, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 11, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 9, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    params = [q, k, pe.freqs, pe.phases, pe.scales]
    go_q, go_k = torch.randn(2, 11, 2, 5, dtype=torch.float64), torch.randn(2, 9, 2, 5, dtype=torch.float64)

    qbar, _ = pe(11)
    _, kbar = pe(9)
    ref = (torch.einsum("blhd,lhdr->blhr", q, qbar[0]), torch.einsum("blhd,lhdr->blhr", k, kbar[0]))
    ref_grads = torch.autograd.grad(ref, params, (go_q, go_k))

    lengths = []
    bases = pa.sine_bases

    def spy(theta, phase, length, start=0):
        lengths.append(length)
        return bases(theta, phase, length, start)

    monkeypatch.setattr(pa, "sine_bases", spy)
    monkeypatch.setattr(pa, "SRPE_CHUNK_BYTES", 4 * 2 * 3 * 2 * 2 * 8)   # 4 positions (H·d·2S fp64)
    got = pe.filter(q, k)
    n_forward = len(lengths)
    grads = torch.autograd.grad(got, params, (go_q, go_k))
    assert max(lengths) == 4 and n_forward == 3 + 3 and len(lengths) == 2 * n_forward
    for a, b in zip(got + grads, ref + ref_grads):
        torch.testing.assert_close(a, b)


def test_chunked_sines_gradcheck_and_no_positions(monkeypatch):
    """float64 gradcheck of the blockwise contraction across block tails, with and without phases and
    with only some inputs needing gradients; an empty sequence gives an empty output."""
    import panther.ops.attention as pa

    monkeypatch.setattr(pa, "SRPE_CHUNK_BYTES", 2 * 2 * 2 * 2 * 2 * 8)   # 2 positions
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    theta = (torch.rand(2, 2, 2, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    phase = torch.randn(2, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fn = pa.srpe_filter_sines_chunked
    assert torch.autograd.gradcheck(fn, (x, theta, phase, w))
    assert torch.autograd.gradcheck(lambda t, ww: fn(x.detach(), t, None, ww), (theta, w))
    assert torch.autograd.gradcheck(lambda xx: fn(xx, theta.detach(), phase.detach(), w.detach()), (x,))
    assert fn(x[:, :0], theta, phase, w).shape == (2, 0, 2, 3)
