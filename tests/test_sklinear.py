"""panther.nn.SKLinear: the seed API, its fixed bugs, validation and reproducibility."""
import contextlib
import math
import warnings

import pytest
import torch
from torch import nn

import panther as pr
from panther.nn import SKLinear, SKLinear_triton
from panther.ops import sketched_linear_reference


def run_sklinear(layer, x):
    return sketched_linear_reference(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias)


def test_shapes_and_layout_match_public_library():
    layer = SKLinear(12, 7, num_terms=2, low_rank=3)
    assert layer.S1s.shape == (2, 12, 3) and layer.S2s.shape == (2, 3, 7)
    assert layer.U1s.shape == (2, 3, 7) and layer.U2s.shape == (2, 12, 3)
    assert {n for n, _ in layer.named_parameters()} == {"S1s", "S2s", "bias"}
    assert set(layer.state_dict()) == {"S1s", "S2s", "U1s", "U2s", "bias"}
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), run_sklinear(layer, x))


def test_load_public_library_checkpoint_layout():
    src = SKLinear(10, 6, 1, 2, seed=1)
    dst = SKLinear(10, 6, 1, 2, seed=2)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 10)
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("shape", [(12,), (4, 12), (2, 3, 12)])
def test_any_leading_shape(shape):
    layer = SKLinear(12, 7, 1, 2)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 7)
    torch.testing.assert_close(y, run_sklinear(layer, x))


def test_non_contiguous_input():
    layer = SKLinear(12, 7, 1, 2)
    x = torch.randn(12, 9).t()
    torch.testing.assert_close(layer(x), run_sklinear(layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    layer = SKLinear(24, 10, 1, 4, dtype=dtype)
    assert layer.S1s.dtype == dtype and layer.U1s.dtype == dtype
    x = torch.randn(3, 24, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = run_sklinear(layer.double(), x.double())
    assert ((y.double() - ref).norm() / ref.norm()) < (1e-5 if dtype in (torch.float32, torch.float64) else 3e-2)


def test_default_dtype_is_followed():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = SKLinear(8, 4, 1, 2)
    finally:
        torch.set_default_dtype(old)
    assert layer.S1s.dtype == torch.float64 and layer.U1s.dtype == torch.float64


def test_no_multiple_of_16_rule():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = SKLinear(100, 90, 1, 5)  # not multiples of 16, and cheaper than dense: no warning at all
    assert layer(torch.randn(7, 100)).shape == (7, 90)


def test_parameter_count_warning_kept():
    with pytest.warns(UserWarning, match="more parameters"):
        SKLinear(16, 16, num_terms=2, low_rank=8)


def test_reproducible_under_manual_seed_and_layers_differ():
    torch.manual_seed(3)
    a, b = SKLinear(20, 10, 1, 4), SKLinear(20, 10, 1, 4)
    torch.manual_seed(3)
    a2 = SKLinear(20, 10, 1, 4)
    for name in ("S1s", "S2s", "U1s", "U2s", "bias"):
        torch.testing.assert_close(getattr(a, name), getattr(a2, name))
    assert not torch.equal(a.U1s, b.U1s) and not torch.equal(a.S1s, b.S1s)


def test_seed_keyword_uses_private_rng_and_never_reseeds_global():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = SKLinear(20, 10, 1, 4, seed=11)
    assert torch.equal(torch.get_rng_state(), state), "seed= must not touch the global RNG"
    b = SKLinear(20, 10, 1, 4, seed=11)
    torch.testing.assert_close(a.S1s, b.S1s)
    # The public library reset the global RNG to 42; construction must only advance it.
    torch.manual_seed(7)
    SKLinear(20, 10, 1, 4)
    after = torch.rand(1)
    torch.manual_seed(42)
    assert not torch.equal(after, torch.rand(1))


def test_generator_keyword():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(SKLinear(9, 4, 1, 2, generator=g1).U2s, SKLinear(9, 4, 1, 2, generator=g2).U2s)


def test_init_bound_uses_in_features_like_nn_linear():
    d_in, d_out = 400, 20
    layer = SKLinear(d_in, d_out, 1, 8, seed=0)
    bound = 1 / math.sqrt(d_in)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.5 * bound
    # S1 = W U1ᵀ with W ~ U(±1/sqrt(d_in)): Var = d_out · bound²/3 / k ; the public library used 1/sqrt(d_out).
    expected_var = d_out * bound**2 / 3 / 8
    assert 0.7 < layer.S1s.var().item() / expected_var < 1.3


def test_sketch_init_is_unbiased_for_W_init():
    W = torch.randn(6, 10, dtype=torch.float64)
    x = torch.randn(4, 10, dtype=torch.float64)
    mean = sum(SKLinear(10, 6, 1, 3, W_init=W, bias=False, seed=s)(x) for s in range(400)) / 400
    dense = x @ W.T
    assert ((mean - dense).norm() / dense.norm()) < 0.15


def test_svd_init_full_rank_reproduces_linear_and_from_linear_copies_bias():
    lin = nn.Linear(30, 12)
    layer = SKLinear.from_linear(lin, num_terms=1, low_rank=12, init="svd")
    x = torch.randn(5, 30)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias, lin.bias)
    assert layer.S1s.dtype == lin.weight.dtype


def test_svd_init_is_truncated_svd():
    """Each of the 2L branches holds its own block of k singular triplets: rank 2·L·k."""
    W = torch.randn(16, 24, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W)
    x = torch.randn(3, 24, dtype=torch.float64)
    for L, k in ((1, 5), (2, 3)):
        layer = SKLinear(24, 16, L, k, W_init=W, bias=False, init="svd")
        r = 2 * L * k
        torch.testing.assert_close(layer(x), x @ ((U[:, :r] * S[:r]) @ Vh[:r]).T)


@pytest.mark.parametrize("init", ["sketch", "svd"])
def test_effective_weight_is_the_map_the_layer_applies(init):
    torch.manual_seed(0)
    layer = SKLinear(24, 16, 2, 3, W_init=torch.randn(16, 24, dtype=torch.float64), init=init)
    with torch.no_grad():
        layer.S1s.add_(torch.randn_like(layer.S1s))  # a trained layer: factors no longer from W_init
    x = torch.randn(5, 24, dtype=torch.float64)
    W = layer.effective_weight()
    assert W.shape == (16, 24)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, W, layer.bias))


def test_weight_reads_like_nn_linear_weight():
    """Code written for nn.Linear reads ``.weight`` (Hugging Face's T5 checks its dtype): it is the effective
    weight, gradients flow to the factors, and it cannot be assigned."""
    layer = SKLinear(24, 16, 2, 3, dtype=torch.float64, seed=0)
    assert layer.weight.dtype == torch.float64 and layer.weight.shape == (16, 24)
    torch.testing.assert_close(layer.weight, layer.effective_weight())
    layer.weight.sum().backward()
    assert layer.S1s.grad is not None and layer.S1s.grad.abs().sum() > 0
    with pytest.raises(AttributeError, match="weight"):
        layer.weight = torch.zeros(16, 24)
    # a Parameter assigned (weight tying, as Hugging Face's tie_weights does) gets a reason and the way out
    with pytest.raises(TypeError, match=r"no dense weight to set or tie.*'lm_head': 'skip'"):
        layer.weight = torch.nn.Parameter(torch.zeros(16, 24))


def test_an_unused_weight_read_is_dropped_under_compile():
    """T5-style ``x.to(layer.weight.dtype)`` in a compiled forward leaves only the sketched op in the graph:
    the dense product behind ``.weight`` is not computed."""
    from torch._functorch.aot_autograd import aot_module_simplified

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = SKLinear(64, 64, 1, 8, seed=0)

        def forward(self, x):
            return self.lin(x.to(self.lin.weight.dtype))

    graphs = []

    def capture(gm, example_inputs):
        def forward_compiler(g, _):
            graphs.append(g)
            return g.forward
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler)

    torch._dynamo.reset()
    model = M()
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=capture)(x), model(x))
    ops = [n.target for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert torch.ops.panther.sketched_linear_fwd.default in ops
    assert not any(getattr(op, "_opname", "") in ("mm", "bmm", "matmul", "einsum") for op in ops), ops


def test_w_init_layout_follows_nn_linear():
    W = torch.randn(6, 10)
    layer = SKLinear(10, 6, 1, 6, W_init=W, init="svd", bias=False)
    x = torch.randn(2, 10)
    torch.testing.assert_close(layer(x), x @ W.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_terms=0), ValueError, "num_terms"),
    (dict(low_rank=-1), ValueError, "low_rank"),
    (dict(low_rank=2.5), TypeError, "low_rank"),
    (dict(num_terms=True), TypeError, "num_terms"),
    (dict(in_features=0), ValueError, "in_features"),
    (dict(out_features="8"), TypeError, "out_features"),
    (dict(W_init=torch.randn(10, 6)), ValueError, "transposed"),
    (dict(W_init=torch.randn(3, 3)), ValueError, "W_init"),
    (dict(W_init=[[1.0]]), TypeError, "W_init"),
    (dict(init="qr"), ValueError, "init"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed"),
])
def test_constructor_errors(kwargs, exc, match):
    args = dict(in_features=10, out_features=6, num_terms=1, low_rank=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        SKLinear(**args)


def test_forward_errors():
    layer = SKLinear(10, 6, 1, 2)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="SKLinear: input is on device meta but the layer's parameters are on device cpu"):
        layer(torch.randn(3, 10, device="meta"))


@pytest.mark.parametrize("cls", [SKLinear, SKLinear_triton])
def test_forward_names_a_dtype_mismatch(cls):
    layer = cls(10, 6, 1, 2, seed=0)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: input has dtype torch.float64 .*torch.float32"):
        layer(torch.randn(3, 10, dtype=torch.float64))
    # an integer input is never a dtype the layer could be cast to, also under autocast
    for ctx in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        with ctx, pytest.raises(TypeError, match=rf"{cls.__name__}: input must be a floating-point tensor, "
                                                 r"got dtype torch.int64; cast it \(x.to\(torch.float32\)\)"):
            layer(torch.ones(3, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([0.0] * 10)
    # autocast regions cast inputs themselves: a bf16 input reaches the fp32 layer there
    x = torch.randn(3, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="nn.Linear"):
        SKLinear.from_linear(nn.Conv2d(1, 1, 1), 1, 1)


def test_triton_variant_has_same_api_and_unbiased_u2():
    a = SKLinear(20, 10, 1, 4, seed=9)
    b = SKLinear_triton(20, 10, 1, 4, seed=9)
    x = torch.randn(3, 20)
    torch.testing.assert_close(a(x), b(x))
    assert torch.allclose(b.U2s.abs(), torch.full_like(b.U2s, 0.5))  # ±1/sqrt(k), not ±1/sqrt(in_features)


def test_training_step_changes_only_learnable_factors():
    layer = SKLinear(16, 8, 1, 2)
    U1, U2 = layer.U1s.clone(), layer.U2s.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    S1 = layer.S1s.detach().clone()
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.U1s, U1) and torch.equal(layer.U2s, U2)
    assert not torch.equal(layer.S1s, S1)


def test_extra_repr():
    assert "num_terms=2, low_rank=3" in repr(SKLinear(40, 30, 2, 3))
