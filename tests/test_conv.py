"""panther::sketched_conv2d and panther.nn.SKConv2d: formula, layouts, autograd, init, errors, RNG, dtypes."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import panther
from panther.nn import SKConv2d
from panther.ops.conv import sketched_conv2d, sketched_conv2d_reference

OP = torch.ops.panther.sketched_conv2d
F64 = torch.float64


def _factors(c_in, c_out, two_l, k, kh, kw, *, bias=True, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(two_l * k, c_in, kh, kw, generator=g, dtype=dtype)
    u1 = torch.randn(two_l, k, c_out, generator=g, dtype=dtype)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return s1, u1, b


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes gain nothing from intra-op threads, and on a shared, oversubscribed CPU the thread
    # pool's spin-waits made these tests ~20x slower; restore the setting for other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_imported_from_this_checkout():
    assert panther.nn.SKConv2d is SKConv2d and SKConv2d is not None


# ------------------------------------------------------------------------------------------------
# the user's example (docs/seed: panther-nn-api.rst, "Sketched Convolution"), verbatim. The snippet
# itself does not import torch (the page's earlier examples do), so torch is provided in its globals.
SEED_CONV_EXAMPLE = '''
import panther as pr

# Sketched 2D convolution layer
conv_layer = pr.nn.SKConv2d(
    in_channels=64,
    out_channels=128,
    kernel_size=3,
    stride=1,
    padding=1,
    num_terms=1,
    low_rank=16
)

# Forward pass
x = torch.randn(32, 64, 56, 56)  # (batch, channels, height, width)
y = conv_layer(x)
print(f"Output shape: {y.shape}")  # (32, 128, 56, 56)
'''


@pytest.mark.slow  # about 1 s on an idle core (batch 32, 56x56); -m "not slow" skips it
def test_seed_conv_example_verbatim(capsys):
    ns = {"torch": torch}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the example's sizes are cheaper than dense: no warning
        exec(compile(SEED_CONV_EXAMPLE, "panther-nn-api.rst", "exec"), ns)
    assert ns["y"].shape == (32, 128, 56, 56)
    assert "Output shape: torch.Size([32, 128, 56, 56])" in capsys.readouterr().out
    layer, x = ns["conv_layer"], ns["x"][:2]
    ref = sketched_conv2d_reference(x, layer.S1s, layer.U1s, layer.bias, 1, 1, 1)
    torch.testing.assert_close(ns["y"][:2], ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the op against its reference


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [0, 1, 3])  # 0 = unbatched (C_in, H, W)
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_matches_reference(channels_last, batch, with_bias):
    s1, u1, b = _factors(3, 5, 4, 2, 3, 2, bias=with_bias)
    shape = (batch, 3, 9, 8) if batch else (1, 3, 9, 8)
    x = torch.randn(*shape, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if not batch:
        x = x[0]
    for stride, padding, dilation in [(1, 0, 1), ((2, 1), (1, 2), (1, 2)), (3, (0, 1), (2, 1))]:
        out = sketched_conv2d(x, s1, u1, b, stride, padding, dilation)
        ref = sketched_conv2d_reference(x, s1, u1, b, stride, padding, dilation)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        out4 = out if batch else out.unsqueeze(0)  # layout is kept for unbatched inputs too
        if channels_last:
            assert out4.is_contiguous(memory_format=torch.channels_last) and not out4.is_contiguous()
        else:
            assert out4.is_contiguous()


def test_op_channels_last_weight_and_odd_strides():
    # S1s in channels_last (model.to(memory_format=channels_last)) and a non-contiguous input view.
    s1, u1, b = _factors(4, 6, 2, 3, 3, 3)
    s1 = s1.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 11, 12, dtype=F64)[:, :, 1:, ::2]
    torch.testing.assert_close(sketched_conv2d(x, s1, u1, b, 1, 1, 1),
                               sketched_conv2d_reference(x, s1, u1, b, 1, 1, 1), rtol=1e-10, atol=1e-10)


_CHEAP_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("layout, with_bias, full", [
    ("nchw", True, True), ("nchw", False, True), ("channels_last", True, True),
    ("channels_last", False, False), ("unbatched", True, False), ("unbatched", False, False),
])
def test_opcheck(layout, with_bias, full):
    # test_aot_dispatch_dynamic costs seconds per call: run it on three representative cases; the
    # others still check schema, autograd registration and fake-kernel metadata (incl. strides).
    s1, u1, b = _factors(3, 4, 2, 2, 3, 3, bias=with_bias, dtype=torch.float32)
    x = torch.randn(2, 3, 7, 6)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "unbatched":
        x = x[0]
    for t in (x, s1, u1, b):
        if t is not None:
            t.requires_grad_()
    kwargs = {} if full else {"test_utils": _CHEAP_OPCHECKS}
    torch.library.opcheck(OP, (x, s1, u1, b, [2, 1], [1, 0], [1, 2]), **kwargs)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "unbatched"])
def test_gradcheck_float64(with_bias, layout):
    s1, u1, b = _factors(2, 3, 2, 2, 2, 3, bias=with_bias)
    x = torch.randn(2, 2, 5, 6, dtype=F64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "unbatched":
        x = x[0]
    inputs = [t.clone().requires_grad_() if t is not None else None for t in (x, s1, u1, b)]
    assert torch.autograd.gradcheck(lambda *a: OP(*a, [2, 1], [1, 1], [1, 2]), tuple(inputs))
    assert torch.autograd.gradgradcheck(lambda *a: OP(*a, [1, 1], [0, 1], [1, 1]), tuple(inputs), fast_mode=True)


def test_backward_honours_needs_input_grad():
    s1, u1, b = _factors(3, 4, 2, 2, 3, 3)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    for which in range(4):
        inputs = [x.clone(), s1.clone(), u1.clone(), b.clone()]
        inputs[which].requires_grad_()
        OP(*inputs, [1, 1], [1, 1], [1, 1]).square().sum().backward()
        ref_inputs = [t.clone().requires_grad_(i == which) for i, t in enumerate([x, s1, u1, b])]
        sketched_conv2d_reference(*ref_inputs, 1, 1, 1).square().sum().backward()
        for i, (t, r) in enumerate(zip(inputs, ref_inputs)):
            if i == which:
                torch.testing.assert_close(t.grad, r.grad, rtol=1e-10, atol=1e-10)
            else:
                assert t.grad is None


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 3), c_in=st.integers(1, 4), c_out=st.integers(1, 5), two_l=st.integers(1, 3),
    k=st.integers(1, 3), kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 3), sw=st.integers(1, 2),
    ph=st.integers(0, 2), pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2),
    extra_h=st.integers(0, 4), extra_w=st.integers(0, 4), with_bias=st.booleans(), channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_forward_and_grads(batch, c_in, c_out, two_l, k, kh, kw, sh, sw, ph, pw, dh, dw, extra_h,
                                      extra_w, with_bias, channels_last, seed):
    s1, u1, b = _factors(c_in, c_out, two_l, k, kh, kw, bias=with_bias, seed=seed)
    h = max(dh * (kh - 1) + 1 - 2 * ph, 1) + extra_h  # at least one output row
    w = max(dw * (kw - 1) + 1 - 2 * pw, 1) + extra_w
    x = torch.randn(max(batch, 1), c_in, h, w, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if batch == 0:
        x = x[0]
    args = ((sh, sw), (ph, pw), (dh, dw))
    ins = [t.clone().requires_grad_() if t is not None else None for t in (x, s1, u1, b)]
    refs = [t.clone().requires_grad_() if t is not None else None for t in (x, s1, u1, b)]
    out = sketched_conv2d(*ins, *args)
    ref = sketched_conv2d_reference(*refs, *args)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for t, r in zip(ins, refs):
        if t is not None:
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-9, atol=1e-9)


def test_op_rejects_bad_factors():
    s1, u1, b = _factors(3, 4, 2, 2, 3, 3)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with pytest.raises(ValueError, match="S1s.size"):
        OP(x, s1[:-1], u1, b, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="channels"):
        OP(torch.randn(2, 5, 6, 6, dtype=F64), s1, u1, b, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="bias"):
        OP(x, s1, u1, b[:-1], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="x must be"):
        OP(x[0, 0], s1, u1, b, [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="same dtype"):
        OP(x.float(), s1, u1, b, [1, 1], [0, 0], [1, 1])


# ------------------------------------------------------------------------------------------------
# the module


VARIANTS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=(2, 3), stride=1, padding=(0, 2), dilation=(1, 2)),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=(2, 4), padding="same"),  # even kernels: PyTorch pads asymmetrically
    dict(kernel_size=(2, 3), padding="same", dilation=(3, 2)),
    dict(kernel_size=(3, 2), stride=(2, 3), padding="valid"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # torch's own note (reference)
@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "unbatched"])
def test_module_equals_formula(cfg, layout):
    layer = SKConv2d(4, 6, num_terms=2, low_rank=1, dtype=F64, seed=1, **cfg)
    x = torch.randn(2, 4, 9, 10, dtype=F64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "unbatched":
        x = x[0]
    out = layer(x)
    stride, padding, dilation = layer.stride, cfg.get("padding", 0), layer.dilation
    ref = sketched_conv2d_reference(x, layer.S1s, layer.U1s, layer.bias, stride, padding, dilation)
    dense = F.conv2d(x, layer.effective_weight(), layer.bias, stride, padding, dilation)
    torch_shape = nn.Conv2d(4, 6, device="meta", dtype=F64, **cfg)(x.to("meta")).shape
    assert out.shape == ref.shape == torch_shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight, layer.effective_weight())  # as code written for nn.Conv2d reads it
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_module_gradients_and_buffers():
    layer = SKConv2d(3, 5, 3, padding=1, num_terms=1, low_rank=2, dtype=F64, seed=0)
    assert [n for n, _ in layer.named_parameters()] == ["S1s", "bias"]
    assert [n for n, _ in layer.named_buffers()] == ["U1s"]
    x = torch.randn(2, 3, 6, 6, dtype=F64, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.S1s.grad is not None and layer.bias.grad is not None and x.grad is not None
    assert layer.U1s.grad is None
    assert torch.autograd.gradcheck(lambda s, b, xx: sketched_conv2d(xx, s, layer.U1s, b, 1, 1, 1),
                                    (layer.S1s.detach().clone().requires_grad_(),
                                     layer.bias.detach().clone().requires_grad_(), x.detach()))


def test_init_shapes_scale_and_unbiasedness():
    c_in, c_out, kh, kw, L, k = 3, 6, 3, 2, 150, 4
    with pytest.warns(UserWarning, match="not cheaper"):
        layer = SKConv2d(c_in, c_out, (kh, kw), num_terms=L, low_rank=k, dtype=F64, seed=5)
    assert layer.S1s.shape == (2 * L * k, c_in, kh, kw) and layer.U1s.shape == (2 * L, k, c_out)
    assert torch.equal(layer.U1s.abs(), torch.full_like(layer.U1s, 1 / math.sqrt(k)))
    # effective kernel = G·W with G = 1/(2L) Σ_i U_iᵀU_i: unit diagonal exactly, off-diagonal ~ 1/sqrt(2Lk)
    u = layer.U1s.reshape(-1, c_out)
    gram = u.t() @ u / (2 * L)
    torch.testing.assert_close(gram.diagonal(), torch.ones(c_out, dtype=F64), rtol=0, atol=1e-12)
    off = gram - torch.diag(gram.diagonal())
    assert off.abs().max() < 5 / math.sqrt(2 * L * k)
    # S1s[i·k+r] = Σ_o W[o]·U1s[i,r,o] for the (hidden) seed kernel W => effective = gram·W; recover W:
    w = torch.linalg.solve(gram, layer.effective_weight().reshape(c_out, -1)).reshape(c_out, c_in, kh, kw)
    bound = 1 / math.sqrt(c_in * kh * kw)  # nn.Conv2d's default init: U(±1/sqrt(fan_in)), fan_in = C_in·kh·kw
    assert w.abs().max() <= bound + 1e-9 and w.abs().max() > 0.7 * bound
    assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.3 * bound


@pytest.mark.filterwarnings("ignore:SKConv2d. the sketch holds:UserWarning")  # the exact k = C_out case
def test_w_init_and_from_conv2d():
    conv = nn.Conv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), dtype=F64)
    layer = SKConv2d.from_conv2d(conv, num_terms=1, low_rank=2, seed=0)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((3, 2), (2, 1), (1, 0), (1, 2))
    assert layer.S1s.dtype == F64 and layer.S1s.device == conv.weight.device
    assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    u = layer.U1s.reshape(-1, 8)
    torch.testing.assert_close(layer.S1s.reshape(4, -1), u @ conv.weight.reshape(8, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.effective_weight(),
                               (u.t() @ u / 2 @ conv.weight.reshape(8, -1)).reshape(conv.weight.shape))
    # W_init gives the same S1s for the same seed
    other = SKConv2d(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), num_terms=1, low_rank=2,
                     W_init=conv.weight, dtype=F64, seed=0)
    assert torch.equal(other.S1s, layer.S1s)
    # with a full-rank exact sketch (k = C_out, orthogonal signs) the layer reproduces the conv exactly
    h = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=F64) / 2
    exact = SKConv2d.from_conv2d(nn.Conv2d(3, 4, 3, padding="same", bias=False, dtype=F64), num_terms=1,
                                 low_rank=4, seed=0)
    assert exact.padding == "same" and exact.bias is None
    conv2 = nn.Conv2d(3, 4, 3, padding="same", bias=False, dtype=F64)
    with torch.no_grad():
        exact.U1s.copy_(torch.stack([h, h]))
        exact.S1s.copy_((exact.U1s.reshape(8, 4) @ conv2.weight.reshape(4, -1)).reshape(exact.S1s.shape))
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    torch.testing.assert_close(exact(x), conv2(x), rtol=1e-10, atol=1e-10)


def test_from_conv2d_rejects():
    with pytest.raises(ValueError, match="groups"):
        SKConv2d.from_conv2d(nn.Conv2d(4, 8, 3, groups=2), 1, 2)
    with pytest.raises(TypeError, match="conv"):
        SKConv2d.from_conv2d(nn.Linear(4, 8), 1, 2)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        SKConv2d(4, 8, 3, padding=1, padding_mode="mirror")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel, padding", [(3, 1), ((3, 5), (2, 1)), (4, "same"), (3, "valid")])
def test_padding_modes_match_nn_conv2d(padding_mode, kernel, padding):
    # full rank (2·L·k >= C_out) with init="svd" is the dense conv, so any difference is the padding
    conv = nn.Conv2d(3, 4, kernel, padding=padding, padding_mode=padding_mode, dtype=F64)
    layer = SKConv2d.from_conv2d(conv, num_terms=1, low_rank=2, init="svd")
    assert layer.padding_mode == padding_mode and (padding_mode == "zeros") == ("padding_mode" not in repr(layer))
    for x in (torch.randn(2, 3, 9, 8, dtype=F64), torch.randn(3, 9, 8, dtype=F64)):
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs, exc, needle", [
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(out_channels=-1), ValueError, "out_channels"),
    (dict(in_channels=2.0), TypeError, "in_channels"),
    (dict(num_terms=0), ValueError, "num_terms"),
    (dict(low_rank=True), TypeError, "low_rank"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(padding="same", stride=2), ValueError, "same"),
    (dict(dilation=(1, 0)), ValueError, "dilation"),
    (dict(W_init=[[1.0]]), TypeError, "W_init"),
    (dict(W_init=torch.zeros(8, 4, 3)), ValueError, "W_init"),
    (dict(W_init=torch.zeros(4, 8, 3, 3)), ValueError, "W_init"),
    (dict(W_init=torch.zeros(8, 4, 3, 3, dtype=torch.int64)), TypeError, "W_init"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed"),
    (dict(generator=3), TypeError, "generator"),
    (dict(groups=2), ValueError, "groups must be 1"),
])
def test_constructor_errors(kwargs, exc, needle):
    args = dict(in_channels=4, out_channels=8, kernel_size=3, num_terms=1, low_rank=2)
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        SKConv2d(**args)


def test_groups_one_is_taken_like_nn_conv2d():
    conv = SKConv2d(4, 8, 3, groups=1, num_terms=1, low_rank=2, seed=0)
    assert conv(torch.randn(1, 4, 6, 6)).shape == (1, 8, 4, 4)


def test_forward_errors():
    layer = SKConv2d(4, 8, 3, num_terms=1, low_rank=2)
    with pytest.raises(ValueError, match="in_channels=4"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="in_channels=4"):
        layer(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="input"):
        layer(torch.randn(8, 8))


def test_forward_names_a_dtype_or_device_mismatch():
    layer = SKConv2d(4, 8, 3, num_terms=1, low_rank=2, seed=0)
    with pytest.raises(TypeError, match=r"SKConv2d: input has dtype torch.float64 .*torch.float32"):
        layer(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="SKConv2d: input is on device meta but the layer's parameters are on device cpu"):
        layer(torch.randn(2, 4, 8, 8, device="meta"))
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_empty_batch_forward_and_backward(memory_format):
    """An empty batch (the last, partial batch of some loaders) runs both ways, as in nn.Conv2d."""
    layer = SKConv2d(4, 8, 3, stride=2, padding=1, num_terms=1, low_rank=2, seed=0)
    x = torch.randn(0, 4, 9, 9).to(memory_format=memory_format).requires_grad_()
    y = layer(x)
    assert y.shape == nn.Conv2d(4, 8, 3, stride=2, padding=1)(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert not layer.S1s.grad.any() and not layer.bias.grad.any()


def test_parameter_count_warning():
    # break-even 2Lk(C_in·kh·kw + C_out) >= C_out·C_in·kh·kw: 2·1·8·(36+8)=704 >= 288 -> warn
    with pytest.warns(UserWarning, match="not cheaper"):
        SKConv2d(4, 8, 3, num_terms=1, low_rank=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SKConv2d(16, 32, 3, num_terms=1, low_rank=4)  # 8·(144+32)=1408 < 4608


def test_seeded_reproducibility_and_global_rng():
    kw = dict(in_channels=4, out_channels=8, kernel_size=3, num_terms=1, low_rank=2)
    state = torch.get_rng_state()
    a, b = SKConv2d(**kw, seed=7), SKConv2d(**kw, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # seed= never touches the global RNG
    assert torch.equal(a.S1s, b.S1s) and torch.equal(a.U1s, b.U1s) and torch.equal(a.bias, b.bias)
    c = SKConv2d(**kw, seed=8)
    assert not torch.equal(a.U1s, c.U1s)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(SKConv2d(**kw, generator=g1).S1s, SKConv2d(**kw, generator=g2).S1s)
    # default: global RNG, so manual_seed makes construction reproducible and consecutive layers differ
    torch.manual_seed(11)
    d, e = SKConv2d(**kw), SKConv2d(**kw)
    torch.manual_seed(11)
    d2 = SKConv2d(**kw)
    assert torch.equal(d.S1s, d2.S1s) and torch.equal(d.U1s, d2.U1s)
    assert not torch.equal(d.U1s, e.U1s) and not torch.equal(d.S1s, e.S1s)


def test_reset_parameters_extra_repr_state_dict():
    layer = SKConv2d(4, 8, 3, stride=2, padding="valid", dilation=2, num_terms=1, low_rank=2, seed=0)
    r = repr(layer)
    for part in ("4, 8", "kernel_size=(3, 3)", "stride=(2, 2)", "padding='valid'", "dilation=(2, 2)",
                 "num_terms=1", "low_rank=2", "bias=True"):
        assert part in r
    u, s = layer.U1s.clone(), layer.S1s.detach().clone()
    layer.reset_parameters(generator=torch.Generator().manual_seed(1))
    assert not torch.equal(layer.U1s, u) and not torch.equal(layer.S1s, s)
    other = SKConv2d(4, 8, 3, stride=2, padding="valid", dilation=2, num_terms=1, low_rank=2, seed=99)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 11, 11)
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_forward(dtype, tol):
    layer = SKConv2d(8, 16, 3, padding=1, num_terms=1, low_rank=4, seed=0)
    low = SKConv2d(8, 16, 3, padding=1, num_terms=1, low_rank=4, dtype=dtype, seed=0)
    low.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 10, 10)
    y, y_low = layer(x), low(x.to(dtype))
    assert y_low.dtype == dtype
    assert (y_low.float() - y).abs().max() <= tol * y.abs().max()


def test_autocast_cpu_bf16():
    layer = SKConv2d(8, 16, 3, padding=1, num_terms=1, low_rank=4, seed=0)
    x = torch.randn(2, 8, 10, 10)
    y = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = layer(x)
    assert y_ac.dtype == torch.bfloat16
    assert (y_ac.float() - y).abs().max() <= 3e-2 * y.abs().max()
    y_ac.float().sum().backward()
    assert layer.S1s.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


def test_svd_init_full_rank_reproduces_conv():
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, dtype=torch.float64)
    layer = SKConv2d.from_conv2d(conv, num_terms=1, low_rank=3, init="svd")  # rank 2Lk = 6 = C_out
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    assert "init='svd'" in repr(layer)
