"""backend="panther" on conv nets, F.scaled_dot_product_attention and nn.MultiheadAttention: the report
(which nodes, params/FLOPs, reasons) and numerics against panther.convert / the panther ops run eagerly."""
import copy
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import panther
from panther.attention_error import mha_heads
from panther.ops.attention import dropped_keys
from panther.backend import panther_backend
from panther.policy import SketchSpec
import fx_passes
from fx_passes import sdpa_mask

from backend_common import FAST, compile_panther, features, padded_qkv, prompts_dynamic_and_static  # tests/ is on sys.path

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------- conv


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(12, 12, 3, padding="same")
        self.grouped = nn.Conv2d(12, 12, 1, groups=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = self.grouped(F.relu(self.c3(x)))
        return self.fc(x.mean((2, 3)))


CONV_POLICY = {"conv2d": SketchSpec(num_terms=1, low_rank=3, init="svd"), "c3": SketchSpec(num_terms=2, low_rank=2, init="svd")}


@pytest.fixture(scope="module")
def conv_run():
    torch.manual_seed(0)
    model = ConvNet().eval()
    compiled, reports = compile_panther(model, policy=CONV_POLICY)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        y = compiled(x)
    return model, reports[0], x, y


def test_conv_report(conv_run):
    _, rep, x, _ = conv_run
    assert [r.name for r in rep.rows] == ["c1", "c2", "c3", "grouped", "fc"]
    assert [r.name for r in rep.replaced] == ["c1", "c2", "c3"]
    assert "groups=2" in rep.row("grouped").reason
    assert rep.row("fc").reason == "no policy entry matches this layer"
    # (name, C_in, C_out, k, out spatial, bias, L, rank)
    for name, cin, cout, ks, hw, bias, L, k in (("c1", 3, 8, 3, 10, True, 1, 3), ("c2", 8, 12, 3, 5, False, 1, 3),
                                                ("c3", 12, 12, 3, 5, True, 2, 2)):
        r = rep.row(name)
        assert (r.kind, r.op_before, r.op_after) == ("conv2d", "torch.conv2d", "panther.sketched_conv2d")
        pos = x.shape[0] * hw * hw
        fan_in = cin * ks * ks
        assert r.params_before == cout * fan_in + (cout if bias else 0)
        assert r.flops_before == 2 * pos * cout * fan_in
        assert r.params_after == 2 * L * k * fan_in + 2 * L * k * cout + (cout if bias else 0)
        assert r.flops_after == 4 * pos * L * k * (fan_in + cout)
        assert 0 <= r.est_error < 1


def test_conv_compile_equals_convert(conv_run):
    model, _, x, y = conv_run
    converted, rep = panther.convert(copy.deepcopy(model), CONV_POLICY)
    assert [r.name for r in rep.replaced] == ["c1", "c2", "c3"]
    assert isinstance(converted.c3, panther.nn.SKConv2d) and isinstance(converted.grouped, nn.Conv2d)
    with torch.no_grad():
        assert rel(y, converted(x)) <= 1e-4
        assert rel(y, model(x)) > 1e-3


def test_conv_full_rank_svd_reproduces_dense(conv_run):
    model, _, x, _ = conv_run
    # rank 2Lk >= C_out spans every output channel: exact.
    full = {"c1": SketchSpec(low_rank=4, init="svd"), "c2": SketchSpec(low_rank=6, init="svd"),
            "c3": SketchSpec(num_terms=3, low_rank=2, init="svd")}
    compiled, reports = compile_panther(model, policy=full)
    with torch.no_grad():
        assert rel(compiled(x), model(x)) <= 1e-5
    assert len(reports[0].replaced) == 3


def test_conv_under_autocast_is_rewritten(conv_run):
    """Under bf16 autocast c2 and c3 meet bf16 inputs with fp32 weights; the op's autocast kernel casts."""
    model, _, x, _ = conv_run
    torch._dynamo.reset()
    full = {"c1": SketchSpec(low_rank=4, init="svd"), "c2": SketchSpec(low_rank=6, init="svd"),
            "c3": SketchSpec(num_terms=3, low_rank=2, init="svd")}
    compiled, reports = compile_panther(model, policy=full)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y, ref = compiled(x), model(x)
    assert [r.name for r in reports[-1].replaced] == ["c1", "c2", "c3"], str(reports[-1])
    assert y.dtype == ref.dtype == torch.bfloat16 and rel(y.float(), ref.float()) < 3e-2


# ---------------------------------------------------------------------------------------------------- SDPA


class SDPABlock(nn.Module):
    def __init__(self, dim=32, heads=4, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def split(self, t):
        B, L, D = t.shape
        return t.view(B, L, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x, mask=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.o(a.transpose(1, 2).reshape(x.shape))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SDPABlock(causal=True)
        self.masked = SDPABlock(causal=False)

    def forward(self, x, mask):
        return self.masked(self.attn(x), mask)


ATT_SPEC = SketchSpec(num_random_features=24, seed=3)


def rf_reference(block, x, spec, name):
    """The SDPA block computed eagerly with panther's op and the features a seeded layer ``name`` draws."""
    P = features(spec, name, x.shape[-1] // block.heads)
    q, k, v = block.split(block.q(x)), block.split(block.k(x)), block.split(block.v(x))
    a = torch.ops.panther.rf_attention(q, k, v, P, spec.kernel_fn, block.causal, None, None)
    return block.o(a.transpose(1, 2).reshape(x.shape))


@pytest.fixture(scope="module")
def sdpa_model():
    torch.manual_seed(0)
    return TwoBlocks()


def test_sdpa_rewrite_report_and_numerics(sdpa_model):
    compiled, reports = compile_panther(sdpa_model, policy={"attention": ATT_SPEC})
    x = torch.randn(2, 12, 32)
    mask = torch.ones(12, 12, dtype=torch.bool)
    with torch.no_grad():
        y = compiled(x, mask)
    rep = reports[0]
    att = [r for r in rep.rows if r.kind == "attention"]
    assert [(r.name, r.replaced) for r in att] == [("attn", True), ("masked", False)]
    assert "attn_mask" in rep.row("masked").reason
    r = rep.row("attn")
    assert (r.op_before, r.op_after) == ("scaled_dot_product_attention", "panther.rf_attention")
    B, H, L, d, m = 2, 4, 12, 8, 24
    assert r.flops_before == 2 * B * H * L * L * 2 * d // 2  # causal: half of QK^T + PV
    assert r.flops_after == 2 * B * H * 2 * L * d * m + 2 * 2 * B * H * L * m * (d + 1)
    assert (r.params_before, r.params_after) == (0, m * d)
    # The linears are listed too, left dense: the policy only names attention.
    assert {row.name for row in rep.rows if row.kind == "linear"} == {f"{b}.{p}" for b in ("attn", "masked") for p in "qkvo"}
    with torch.no_grad():
        ref = sdpa_model.masked(rf_reference(sdpa_model.attn, x, ATT_SPEC, "attn"), mask)
        dense = sdpa_model(x, mask)
    assert rel(y, ref) <= 1e-4
    assert rel(y, dense) > 1e-3


def test_sdpa_rewrite_also_in_training(sdpa_model):
    # Weight-free: valid with grad enabled; gradients reach the dense projections.
    compiled, reports = compile_panther(sdpa_model.attn, policy={"attention": ATT_SPEC, "linear": SketchSpec()})
    x = torch.randn(2, 12, 32)
    y = compiled(x)
    y.square().mean().backward()
    rep = reports[0]
    att = [r for r in rep.rows if r.kind == "attention"]
    assert len(att) == 1 and att[0].replaced
    assert all(r.reason == fx_passes.TRAINING_REASON for r in rep.rows if r.kind == "linear")
    assert sdpa_model.attn.q.weight.grad is not None and sdpa_model.attn.q.weight.grad.abs().sum() > 0
    sdpa_model.zero_grad()


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_sdpa_is_rewritten(causal):
    """``enable_gqa=True``: each key/value head serves consecutive query heads, as in SDPA."""
    class GQA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 10, 8, generator=g) for h in (6, 2, 2))
    spec = SketchSpec(num_random_features=16, seed=1)
    compiled, reports = compile_panther(GQA(), policy={"attention": spec})
    with torch.no_grad():
        y = compiled(q, k, v)
    (row,) = reports[0].rows
    assert row.replaced and row.op_after == "panther.rf_attention"
    P = features(spec, row.name)
    ref = torch.ops.panther.rf_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), P, "softmax",
                                         causal, None, None)
    torch.testing.assert_close(y, ref)


class MaskedSDPA(nn.Module):
    """SDPA under a boolean mask built in the model as Hugging Face builds it: the keys a sequence keeps,
    AND a pattern of the query and key indices."""

    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern

    def forward(self, q, k, v, keep):
        L = q.shape[2]
        qi, ki = torch.arange(L)[None, None, :, None], torch.arange(L)[None, None, None, :]
        index = {"none": lambda: qi >= 0, "causal": lambda: ki <= qi, "window": lambda: (ki <= qi) & (qi - ki < 3),
                 "tril": lambda: torch.ones(L, L, dtype=torch.bool).tril(),
                 "both_shifted": lambda: ki + 2 < qi + 3,  # the causal triangle, written otherwise
                 "wide_window": lambda: (ki <= qi) & (qi - ki < 4096),  # causal while L <= 4096 only
                 "strict": lambda: ki < qi, "upper": lambda: ki >= qi,
                 "offset": lambda: ki <= qi + L // 2}[self.pattern]()
        mask = (keep[:, None, None, :] & index).expand(q.shape[0], 1, L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.fixture(scope="module")
def masked_inputs():
    return padded_qkv()


@pytest.mark.parametrize("pattern", ["none", "causal"])
def test_padding_and_causal_masks_become_rf_attention_arguments(pattern, masked_inputs):
    q, k, v, keep = masked_inputs
    spec = SketchSpec(num_random_features=16, seed=1)
    compiled, reports = compile_panther(MaskedSDPA(pattern), policy={"attention": spec})
    with torch.no_grad():
        y = compiled(q, k, v, keep)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    P = features(spec, row.name)
    ref = torch.ops.panther.rf_attention(q, k, v, P, "softmax", pattern == "causal", None, ~keep)
    torch.testing.assert_close(y, ref)
    # the mask mattered: without it the padded sequence's output differs
    no_mask = torch.ops.panther.rf_attention(q, k, v, P, "softmax", pattern == "causal", None, None)
    assert rel(y[1], no_mask[1]) > 1e-2


def test_masks_random_features_cannot_apply_are_left_alone(masked_inputs):
    q, k, v, keep = masked_inputs
    policy = {"attention": SketchSpec(num_random_features=16)}
    cases = [
        (MaskedSDPA("window"), (q, k, v, keep), "neither causal nor key padding"),
        # a per-query mask that is an input, and an additive float mask
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
         (q, k, v, torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.3), sdpa_mask.GRAPH_INPUT),
        (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, torch.zeros(2, 1, 9, 9)),
         "a float term is added to the scores"),
    ]
    for fn, args, reason in cases:
        compiled, reports = compile_panther(fn, policy=policy)
        with torch.no_grad():
            y = compiled(*args)
        (row,) = reports[0].rows
        assert not row.replaced and reason in row.reason, row.reason
        torch.testing.assert_close(y, fn(*args))


def compile_dynamic(model, policy):
    """``torch.compile(model, backend="panther", dynamic=True)``: one graph with the sizes symbolic."""
    torch._dynamo.reset()
    reports = []
    return torch.compile(model, backend=panther_backend, dynamic=True,
                         options={**FAST, "report": reports.append, "policy": policy}), reports


@pytest.mark.parametrize("pattern", ["none", "causal", "tril", "both_shifted"])
def test_index_masks_are_read_for_every_length_under_dynamic_shapes(pattern):
    """Under dynamic shapes one graph serves every length, so the mask's index pattern is read symbolically: the
    causal triangle (or no mask) proved for every length, both lengths run random-feature attention."""
    spec = SketchSpec(num_random_features=16, seed=1)
    compiled, reports = compile_dynamic(MaskedSDPA(pattern), {"attention": spec})
    for length in (9, 13):
        q, k, v, keep = padded_qkv(length)
        with torch.no_grad():
            y = compiled(q, k, v, keep)
        (report,) = reports  # the second length ran the same graph
        (row,) = report.rows
        assert row.replaced, row.reason
        ref = torch.ops.panther.rf_attention(q, k, v, features(spec, row.name), "softmax", pattern != "none", None,
                                             ~keep)
        torch.testing.assert_close(y, ref)


def test_a_causal_mask_of_two_separate_lengths_stays_exact():
    """Without duck sizing the query and key lengths are separate symbols: the mask is the causal triangle only if
    they are equal, which the graph does not promise, and random-feature attention's causal mode needs that."""
    def causal(q, k, v):
        qi, ki = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ki <= qi)

    q, k, v, _ = padded_qkv()
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        compiled, reports = compile_dynamic(causal, {"attention": SketchSpec(num_random_features=16)})
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v), causal(q, k, v))
    (row,) = reports[0].rows
    assert not row.replaced and "not known to be equal" in row.reason, row.reason


def test_t5_zero_position_bias_of_symbolic_sizes_is_read_as_zero():
    """T5's layers without a position bias add ``zeros(1, H, Lq, Lk)`` where the mask keeps keys: under dynamic
    shapes it is built from symbolic sizes and is still read as zero, so the call is the key padding it applies."""
    def t5_cross(q, k, v, keep):
        zeros = torch.zeros(1, q.shape[1], q.shape[2], k.shape[2])
        bias = torch.where(keep[:, None, None, :], zeros, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    spec = SketchSpec(num_random_features=16, seed=1)
    compiled, reports = compile_dynamic(t5_cross, {"attention": spec})
    for length in (9, 13):
        q, k, v, keep = padded_qkv(length)
        with torch.no_grad():
            y = compiled(q, k, v, keep)
        (row,) = reports[-1].rows
        assert row.replaced, row.reason
        torch.testing.assert_close(y, torch.ops.panther.rf_attention(q, k, v, features(spec, row.name), "softmax",
                                                                     False, None, ~keep))


@pytest.mark.parametrize("pattern, reason", [
    ("window", "neither causal nor key padding"), ("wide_window", "neither causal nor key padding"),
    ("strict", "neither causal nor key padding"), ("upper", "neither causal nor key padding"),
    ("offset", "attn_mask under dynamic shapes")])
def test_index_masks_not_causal_at_every_length_stay_exact_under_dynamic_shapes(pattern, reason, masked_inputs):
    """A window wider than the sequence is causal at the traced length but not at every length the graph serves;
    a diagonal shifted by a symbolic size cannot be placed: each stays exact, and says why."""
    q, k, v, keep = masked_inputs
    model = MaskedSDPA(pattern)
    compiled, reports = compile_dynamic(model, {"attention": SketchSpec(num_random_features=16)})
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, keep), model(q, k, v, keep))
    (row,) = reports[0].rows
    assert not row.replaced and reason in row.reason, row.reason


class ScaledSDPA(nn.Module):
    """Causal SDPA whose queries and keys are ``gain`` times the inputs: the gain sets their norms."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(self.gain * q, self.gain * k, v, is_causal=True)


class PreScaled(nn.Module):
    """OPT's attention: the queries scaled as they come out of their projection, then split into heads; the call
    itself unscaled (``scale=1.0``), through SDPA or written out."""

    def __init__(self, written: bool, heads: int = 4):
        super().__init__()
        self.written, self.heads = written, heads

    def forward(self, x, k, v):
        B, L, D = x.shape
        q = (x * (D // self.heads) ** -0.5).view(B, L, self.heads, -1).transpose(1, 2)
        if self.written:
            return torch.matmul(q, k.transpose(-1, -2)).softmax(-1) @ v
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


@pytest.mark.parametrize("written", [False, True])
def test_a_query_factor_before_the_heads_split_goes_into_the_scale(written):
    """Random features split the scale between queries and keys; queries that carry all of it (OPT's, scaled
    before the heads are split) approximate far less accurately, so the factor is taken off them through the
    view and transpose: the result is the random-feature attention of the unscaled queries with the scale,
    and the error the report measures is that one's."""
    from panther.attention_error import sample, sample_error

    g = torch.Generator().manual_seed(0)
    x, k, v = torch.randn(2, 64, 32, generator=g), torch.randn(2, 4, 64, 8, generator=g), torch.randn(2, 4, 64, 8)
    spec = SketchSpec(num_random_features=32, seed=3)
    compiled, reports = compile_panther(PreScaled(written), policy={"attention": spec})
    with torch.no_grad():
        y = compiled(x, k, v)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    q = x.view(2, 64, 4, 8).transpose(1, 2)
    P = features(spec, row.name)
    torch.testing.assert_close(y, torch.ops.panther.rf_attention(q, k, v, P, "softmax", False, 8 ** -0.5, None))
    split = sample_error(sample(q, k, v, None, False, 8 ** -0.5, False), P, "softmax", False)
    on_queries = sample_error(sample(q * 8 ** -0.5, k, v, None, False, 1.0, False), P, "softmax", False)
    assert row.est_error == pytest.approx(split, rel=1e-4) and split < on_queries


class PreScaledByAttribute(PreScaled):
    """OPT's attention as Hugging Face writes it: the factor a float attribute (``self.scaling``), which Dynamo
    turns into a scalar of the graph under ``dynamic=True`` (its sign then unknown to the compiler)."""

    def __init__(self, written: bool, scaling: float):
        super().__init__(written)
        self.scaling = scaling

    def forward(self, x, k, v):
        B, L, _ = x.shape
        q = (x * self.scaling).view(B, L, self.heads, -1).transpose(1, 2)
        if self.written:
            return torch.matmul(q, k.transpose(-1, -2)).softmax(-1) @ v
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


@pytest.mark.parametrize("scaling", [0.35, -0.35])
@pytest.mark.parametrize("written,compiler", [(False, "aot_eager"), (True, "aot_eager"), (False, "eager")])
def test_a_query_factor_of_unknown_sign_goes_into_the_scale_with_its_sign_on_the_queries(written, compiler, scaling):
    # q·k·c = (sign(c)·q)·k·|c|: random features get |c| (they take its square root). Through AOTAutograd the float
    # reaching the op makes Dynamo specialise it (a constant, its sign known); run as it is ("eager"), the graph
    # keeps the scalar and takes its sign at run time.
    from panther.attention_error import sample, sample_error

    g = torch.Generator().manual_seed(0)
    spec = SketchSpec(num_random_features=32, seed=3)
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(PreScaledByAttribute(written, scaling), backend=panther_backend, dynamic=True,
                             options={"compiler": compiler, "report": reports.append, "policy": {"attention": spec}})
    examples = []
    for length in (64, 40):
        x, k, v = torch.randn(2, length, 32, generator=g), torch.randn(2, 4, length, 8, generator=g), \
            torch.randn(2, 4, length, 8, generator=g)
        with torch.no_grad():
            y = compiled(x, k, v)
        q = x.view(2, length, 4, 8).transpose(1, 2) * math.copysign(1.0, scaling)
        P = features(spec, reports[0].rows[0].name)
        torch.testing.assert_close(y, torch.ops.panther.rf_attention(q, k, v, P, "softmax", False, abs(scaling), None))
        examples.append((q, k, v))
    (report,) = reports  # one graph for both lengths
    (row,) = report.rows
    assert row.replaced, row.reason
    q, k, v = examples[0]  # measured on the first call's inputs, as computed
    assert row.est_error == pytest.approx(sample_error(sample(q, k, v, None, False, abs(scaling), False), P, "softmax",
                                                       False), rel=1e-4)


def test_a_negative_scale_puts_its_sign_on_the_queries_and_is_measured_so():
    from panther.attention_error import sample, sample_error

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 8, generator=g) for _ in range(3))
    spec = SketchSpec(num_random_features=32, seed=3)
    compiled, reports = compile_panther(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=-0.5),
                                        policy={"attention": spec})
    with torch.no_grad():
        y = compiled(q, k, v)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    P = features(spec, row.name)
    torch.testing.assert_close(y, torch.ops.panther.rf_attention(-q, k, v, P, "softmax", False, 0.5, None))
    assert row.est_error == pytest.approx(sample_error(sample(-q, k, v, None, False, 0.5, False), P, "softmax", False),
                                          rel=1e-4)


def test_attention_error_is_measured_on_the_example_and_guards_the_default_policy(caplog):
    """Random features are accurate for small query/key norms and useless for large ones. The backend runs
    the graph once on the example input and measures the error on a sample: the report shows it, and the
    default policy keeps attention exact where it is too large. The global RNG is left as it was."""
    from panther.attention_error import SAMPLE_QUERIES
    from panther.policy import DEFAULT_MAX_ATTENTION_ERROR

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 8, generator=g) for _ in range(3))
    spec = SketchSpec(num_random_features=32, seed=2)
    errors = {}
    for gain in (0.3, 3.0):
        rng = torch.get_rng_state()
        compiled, reports = compile_panther(ScaledSDPA(gain), policy={"attention": spec})
        caplog.clear()
        with torch.no_grad(), caplog.at_level("WARNING", logger="panther"):
            compiled(q, k, v)
        assert torch.equal(rng, torch.get_rng_state())
        # asked for by the policy, so done; a warning when inaccurate, as the user may not read the report
        warned = [r.getMessage() for r in caplog.records if "misses exact attention" in r.getMessage()]
        assert len(warned) == (gain == 3.0)
        (row,) = reports[0].rows
        assert row.replaced and f"output err {row.est_error:.3g} on the example" in str(reports[0])
        # the same number from its definition: the first sequence, heads 0 and H/2, the last queries
        P = features(spec, row.name)
        qs, ks, vs = gain * q[:1, [0, 2]], gain * k[:1, [0, 2]], v[:1, [0, 2]]
        approx = torch.ops.panther.rf_attention(qs, ks, vs, P, "softmax", True, None, None)[:, :, -SAMPLE_QUERIES:]
        exact = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[:, :, -SAMPLE_QUERIES:]
        assert row.est_error == pytest.approx(rel(approx, exact), rel=1e-4)
        errors[gain] = row.est_error
        compiled, reports = compile_panther(ScaledSDPA(gain), policy=None)
        with torch.no_grad():
            compiled(q, k, v)
        (row,) = reports[0].rows
        assert row.replaced == (gain == 0.3), row.reason
    assert errors[0.3] < DEFAULT_MAX_ATTENTION_ERROR < errors[3.0]
    assert "random features are inaccurate here" in row.reason


def test_a_graph_with_dynamic_shapes_is_measured_too():
    """A dynamic-shape graph (dynamic=True, or Dynamo's recompile on a second shape) takes its sizes as SymInt
    placeholders; the sample runs it at their hints, so the default policy's guard holds there as well."""
    class SplitHeads(ScaledSDPA):
        def forward(self, x):  # x: (B, L, 4 * 8), split with its (symbolic) sizes
            q = x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)
            return super().forward(q, q, q)

    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(SplitHeads(3.0), backend=panther_backend, dynamic=True,
                             options={**FAST, "report": reports.append})
    with torch.no_grad():
        compiled(torch.randn(2, 512, 32, generator=torch.Generator().manual_seed(0)))
    (row,) = reports[0].rows
    assert not row.replaced and "random features are inaccurate here" in row.reason, row.reason


def test_the_sample_is_a_prefix_of_the_sequence_that_sees_the_most_keys():
    from panther.attention_error import SAMPLE_LENGTH, SAMPLE_QUERIES, sample

    L = SAMPLE_LENGTH + 100
    q = k = v = torch.randn(2, 4, L, 8)
    s = sample(q, k, v, None, True, None, False)
    assert s["q"].shape == s["k"].shape == (1, 2, SAMPLE_LENGTH, 8)  # heads 0 and 2, a causal prefix
    assert s["rows"].tolist() == list(range(SAMPLE_LENGTH - SAMPLE_QUERIES, SAMPLE_LENGTH))
    torch.testing.assert_close(s["q"], q[:1, [0, 2], :SAMPLE_LENGTH])
    keep = torch.ones(2, 1, 1, L, dtype=torch.bool)
    keep[0, ..., :SAMPLE_LENGTH] = False  # the first sequence's prefix is all padding
    s = sample(q, k, v, keep, False, None, False)
    torch.testing.assert_close(s["k"], k[1:, [0, 2], :SAMPLE_LENGTH])
    assert s["mask"].shape == (1, 2, SAMPLE_QUERIES, SAMPLE_LENGTH) and s["mask"].all()


def test_measure_attention_false_skips_the_run():
    q = k = v = torch.randn(1, 2, 64, 8)
    compiled, reports = compile_panther(ScaledSDPA(1.0), policy={"attention": SketchSpec(num_random_features=16)},
                                        measure_attention=False)
    with torch.no_grad():
        compiled(q, k, v)
    (row,) = reports[0].rows
    assert row.replaced and row.est_error is None and "output err" not in str(reports[0])


def test_graphs_that_mutate_their_inputs_are_not_run_to_measure():
    class Accumulate(nn.Module):
        def forward(self, q, k, v, total):
            total.add_(1)
            return F.scaled_dot_product_attention(q, k, v)

    q = k = v = torch.randn(1, 2, 64, 8)
    total = torch.zeros(())
    compiled, reports = compile_panther(Accumulate(), policy={"attention": SketchSpec(num_random_features=16)})
    with torch.no_grad():
        compiled(q, k, v, total)
    assert total.item() == 1  # once, by the call itself
    (row,) = reports[0].rows
    assert row.replaced and row.est_error is None


def test_graphs_with_collectives_are_not_run_to_measure():
    """A run that not every rank makes would hang on FSDP's all-gathers (built by hand: no process group)."""
    from fx_passes.attention_sample import _communicates

    def graph(gather):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        if gather:
            x = g.call_function(torch.ops._c10d_functional.all_gather_into_tensor.default, (x, 2, "0"))
        g.output(g.call_function(F.scaled_dot_product_attention, (x, x, x)))
        return torch.fx.GraphModule({}, g)

    assert _communicates(graph(True)) and not _communicates(graph(False))


def test_hf_llama_layers_are_named_as_in_the_model():
    """Hugging Face's forward decorators pass the model through ``*args`` (Dynamo's ``L['args'][0]``): the
    report still names each layer by its path in the model, so exact-name policy entries match and the
    compiled model equals the one ``panther.convert`` makes with the same policy."""
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg).eval()
    policy = {"model.layers.0.mlp.up_proj": SketchSpec(num_terms=1, low_rank=4, init="svd"), "lm_head": "skip"}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    compiled, reports = compile_panther(model, policy=policy)
    with torch.no_grad():
        y = compiled(ids).logits
    names = dict(model.named_modules())
    linears = {r.name: r for r in reports[0].rows if r.kind == "linear"}
    assert set(linears) == {n for n, m in names.items() if isinstance(m, nn.Linear)}
    assert [n for n, r in linears.items() if r.replaced] == ["model.layers.0.mlp.up_proj"]
    assert linears["lm_head"].reason == "policy: 'skip' (entry 'lm_head')"
    converted, _ = panther.convert(copy.deepcopy(model), policy)
    with torch.no_grad():
        torch.testing.assert_close(y, converted(ids).logits, rtol=1e-4, atol=1e-5)
        assert rel(y, model(ids).logits) > 1e-4


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hf_padded_batches_get_random_feature_attention(arch):
    """A padded batch (``attention_mask`` with zeros): Hugging Face's SDPA mask is read as key padding (and
    causality for Llama), so attention is rewritten, and the padded tokens do not reach the others."""
    tf = pytest.importorskip("transformers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if arch == "bert":
            model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               intermediate_size=64, vocab_size=64, max_position_embeddings=32))
        else:
            model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2, max_position_embeddings=32))
    model.eval()
    out = (lambda o: o.last_hidden_state) if arch == "bert" else (lambda o: o.logits)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    pad = slice(8, None) if arch == "bert" else slice(0, 4)  # a decoder's batch is padded on the left
    valid = slice(0, 8) if arch == "bert" else slice(4, None)
    mask[1, pad] = 0
    compiled, reports = compile_panther(model, policy={"attention": SketchSpec(num_random_features=512, seed=0)})
    with torch.no_grad():
        y = out(compiled(ids, attention_mask=mask))
        other = ids.clone()
        other[1, pad] = (other[1, pad] + 1) % 64
        y_other = out(compiled(other, attention_mask=mask))
        dense = out(model(ids, attention_mask=mask))
    (row,) = [r for r in reports[0].rows if r.kind == "attention"]
    assert row.replaced, row.reason
    torch.testing.assert_close(y_other[1, valid], y[1, valid])
    assert rel(y_other[1, pad], y[1, pad]) > 1e-3  # the changed tokens themselves did change
    assert rel(y[1, valid], dense[1, valid]) < 0.02 and rel(y[0], dense[0]) < 0.02


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_prompts_of_every_length_get_random_feature_attention_under_dynamic_shapes(impl):
    """Dynamo compiles a model again with the sizes symbolic once it sees a second length: a left-padded Llama
    batch of two lengths under ``dynamic=True`` runs one graph whose attention is random features at both,
    the same as the static graph of each length."""
    outputs, compiles, rows = prompts_dynamic_and_static(impl, "cpu", FAST)
    assert compiles[0] == compiles[1], compiles  # the second length ran the graphs of the first
    assert rows and all(r.replaced for r in rows), [r.reason for r in rows]
    for dynamic, static in outputs:
        torch.testing.assert_close(dynamic, static)


# ---------------------------------------------------------------------------------------------------- MHA


class MHABlock(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.ff = nn.Linear(32, 32)

    def forward(self, x, pad=None):
        a, _ = self.mha(x, x, x, key_padding_mask=pad)
        return self.ff(a + x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_compile_equals_convert(batch_first):
    torch.manual_seed(0)
    model = MHABlock(batch_first).eval()
    spec = SketchSpec(num_random_features=16, seed=5)
    compiled, reports = compile_panther(model, policy={"attention": spec})
    x = torch.randn(2, 10, 32) if batch_first else torch.randn(10, 2, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 9:] = pad[1, 7:] = True
    with torch.no_grad():
        y = compiled(x, pad)
    rep = reports[0]
    r = rep.row("mha")
    # the output error measured on the example: the first sequence, heads 0 and 2, its padding applied
    x0 = (x[:1] if batch_first else x[:, :1]).reshape(10, 32)
    q, k, v = (F.linear(x0, w, b).view(10, 4, 8).transpose(0, 1)[None, [0, 2]] for w, b in
               zip(model.mha.in_proj_weight.chunk(3), model.mha.in_proj_bias.chunk(3)))
    P = features(spec, "mha")
    with torch.no_grad():
        approx = torch.ops.panther.rf_attention(q, k, v, P, "softmax", False, None, pad[:1])
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:1, None, None, :])
    assert r.est_error == pytest.approx(rel(approx, exact), rel=1e-4)
    assert r.replaced and (r.op_before, r.op_after) == ("F.multi_head_attention_forward", "panther.rf_attention")
    E, B, L, H, d, m = 32, 2, 10, 4, 8, 16
    proj = 2 * B * 4 * L * E * E
    assert r.params_before == 4 * E * E + 4 * E and r.params_after == r.params_before + m * d
    assert r.flops_before == proj + 4 * B * H * L * L * d
    assert r.flops_after == proj + 2 * B * H * 2 * L * d * m + 2 * 2 * B * H * L * m * (d + 1)
    converted, crep = panther.convert(copy.deepcopy(model), {"attention": spec}, example_inputs=(x, pad))
    assert [x.name for x in crep.replaced] == ["mha"]
    assert crep.row("mha").est_error == pytest.approx(r.est_error, rel=1e-4)  # measured alike on both paths
    assert isinstance(converted.mha, panther.nn.RandMultiHeadAttention)
    with torch.no_grad():
        y_conv = converted(x, pad)
        dense = model(x, pad)
    assert rel(y, y_conv) <= 1e-4
    assert rel(y, dense) > 1e-3


@pytest.mark.parametrize("nested", [False, True])
def test_a_panther_layer_compiled_alone_or_nested_keeps_its_projections(nested):
    # The module being compiled is not in Dynamo's nn_module_stack: RandMultiHeadAttention compiled by itself
    # showed its projections as plain linears of the root, and the default policy sketched them again
    torch.manual_seed(0)
    attn = panther.nn.RandMultiHeadAttention(128, 4, 32, iscausal=True, seed=0).eval()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, k, v):
            return self.attn(x, k, v)

    x = torch.randn(2, 16, 128)
    compiled, reports = compile_panther(Block() if nested else attn)
    with torch.no_grad():
        out = compiled(x, x, x)[0]
        want = attn(x, x, x)[0]
    rows = reports[-1].rows
    assert len(rows) == 4 and not any(r.replaced for r in rows)
    assert all("panther's own layer: not sketched again" in r.reason for r in rows)
    torch.testing.assert_close(out, want)


def test_mha_rewrite_shows_its_attention_op_to_the_kernel_routing():
    # The rewrite is recorded as its torch calls: the panther.rf_attention node (which the CUDA routing
    # retargets to the Triton kernels) is in the graph with the example values the routing reads.
    torch.manual_seed(0)
    model = MHABlock(True).eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return panther_backend(gm, example_inputs, options={**FAST, "policy": {"attention": ATT_SPEC}})

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randn(2, 10, 32), None)
    (node,) = [n for n in graphs[0].graph.nodes if n.target in (torch.ops.panther.rf_attention,
                                                                torch.ops.panther.rf_attention.default)]
    q, projection = node.args[0].meta["example_value"], node.args[3].meta["example_value"]
    assert q.shape == (2, 4, 10, 8) and projection.shape == (24, 8)


def test_mha_left_alone_with_reasons():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.kv = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
            self.w = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            a, _ = self.kv(x, x, x)
            b, weights = self.w(x, x, x)
            return a + b, weights

    compiled, reports = compile_panther(M().eval(), policy={"attention": SketchSpec(num_random_features=8)})
    with torch.no_grad():
        compiled(torch.randn(1, 5, 16))
    rep = reports[0]
    assert not rep.replaced
    assert "bias_k" in rep.row("kv").reason
    assert "weights" in rep.row("w").reason


def encoder(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0, norm_first=norm_first,
                                       activation=activation)
    return nn.TransformerEncoder(layer, 2).eval()


def fused_calls(gm):
    return sum(n.target is torch._transformer_encoder_layer_fwd for n in gm.graph.nodes)


ENCODER_POLICIES = {
    "full-rank linear": {"linear": SketchSpec(low_rank=16, init="svd")},
    "seeded attention": {"attention": SketchSpec(num_random_features=16, seed=2)},
    "nothing": {"*": "skip"},
}


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
@pytest.mark.parametrize("policy", list(ENCODER_POLICIES))
def test_fused_transformer_encoder_layers_are_seen(norm_first, activation, policy):
    # In eval mode without gradients nn.TransformerEncoderLayer is one fused native call in Dynamo's graph;
    # panther expands it into the layer's ordinary ops so its attention and linears are candidates, and
    # puts the call back where nothing was rewritten.
    enc = encoder(norm_first, activation)
    spec = ENCODER_POLICIES[policy]
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return panther_backend(gm, example_inputs, options={**FAST, "policy": spec})

    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(enc, backend=backend)(x, src_key_padding_mask=pad)
        ordinary = enc.train()(x, src_key_padding_mask=pad)  # training mode: the unfused forward
        enc.eval()
    rep = panther.last_report()
    names = [f"layers.{i}.{part}" for i in range(2) for part in ("self_attn", "linear1", "linear2")]
    assert [r.name for r in rep.rows] == names
    replaced = [r.name for r in rep.replaced]
    keep = ~pad  # outputs at padded positions are undefined
    if policy == "nothing":
        assert replaced == [] and fused_calls(graphs[0]) == 2
        torch.testing.assert_close(y[keep], ordinary[keep], rtol=1e-4, atol=1e-5)
        return
    assert fused_calls(graphs[0]) == 0
    if policy == "full-rank linear":
        assert replaced == [n for n in names if "linear" in n]
        torch.testing.assert_close(y[keep], ordinary[keep], rtol=1e-4, atol=1e-4)
    else:
        assert replaced == [n for n in names if "self_attn" in n]
        converted, _ = panther.convert(copy.deepcopy(enc), spec)
        with torch.no_grad():
            torch.testing.assert_close(y[keep], converted(x, src_key_padding_mask=pad)[keep], rtol=1e-4, atol=1e-4)
        assert rel(y[keep], ordinary[keep]) > 1e-3


def test_fused_encoder_layer_with_causal_mask_sketches_its_linears():
    # The fused call drops is_causal and carries the mask itself: the attention stays exact (the report
    # says why) and the linears are still sketched.
    enc = encoder(False, "relu")
    x = torch.randn(2, 9, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    compiled, reports = compile_panther(enc, policy={"linear": SketchSpec(low_rank=16, init="svd"),
                                                     "attention": SketchSpec(num_random_features=16)})
    with torch.no_grad():
        y = compiled(x, mask=mask, is_causal=True)
        ordinary = enc.train()(x, mask=mask, is_causal=True)
        enc.eval()
    rep = reports[0]
    assert [r.name for r in rep.replaced] == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1",
                                              "layers.1.linear2"]
    assert rep.row("layers.0.self_attn").reason == sdpa_mask.GRAPH_INPUT  # its values are not known
    torch.testing.assert_close(y, ordinary, rtol=1e-4, atol=1e-4)


class CausalEncoder(nn.Module):
    """A GPT-style nn.TransformerEncoder that builds its causal mask in its forward, as a float mask
    (``generate_square_subsequent_mask``) or a bool one (True = ignore)."""

    def __init__(self, bool_mask: bool):
        super().__init__()
        self.encoder, self.bool_mask = encoder(False, "relu"), bool_mask

    def forward(self, x, pad=None):
        length = x.shape[1]
        if self.bool_mask:
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device)
        return self.encoder(x, mask=mask, src_key_padding_mask=pad, is_causal=True)


# nn.TransformerEncoder warns when a float mask meets a bool padding mask, and Dynamo breaks its graph on the
# warning (the encoder then runs uncompiled); deferring the warning keeps one graph
ONE_GRAPH = torch._dynamo.config.patch(reorderable_logging_functions={warnings.warn})


def left_padded(length):
    x = torch.randn(2, length, 32)
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, :3] = True
    return x, pad


@pytest.mark.parametrize("bool_mask", [False, True], ids=["float_mask", "bool_mask"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
def test_a_causal_mask_built_in_the_model_is_read_through_the_fused_encoder_layer(bool_mask, padded):
    # Without gradients each layer is the fused call, which drops is_causal and takes the mask (merged with the
    # key padding as (B, H, L, L)); the mask, built in the graph, is read as the causal triangle. The result is
    # the one the unfused path gets from is_causal, and no output sees a later or a padded position.
    model = CausalEncoder(bool_mask).eval()
    x, pad = left_padded(9)
    pad = pad if padded else None
    policy = {"attention": SketchSpec(num_random_features=16, seed=2)}
    outputs, errors = {}, {}
    for grad in (False, True):
        reports, fused = [], []

        def backend(gm, example_inputs):
            fused.append(fused_calls(gm))  # Dynamo's graph, before panther expands the fused calls
            return panther_backend(gm, example_inputs, options={**FAST, "report": reports.append, "policy": policy})

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        with torch.set_grad_enabled(grad), ONE_GRAPH:
            outputs[grad] = compiled(x, pad).detach()
        assert fused == [0 if grad else 2]  # without gradients both layers were the fused call
        (report,) = reports
        assert [r.name for r in report.replaced] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
        errors[grad] = [r.est_error for r in report.replaced]
        assert report.graph_break is None  # one graph, to the model's return
    torch.testing.assert_close(outputs[False], outputs[True])
    assert errors[False] == pytest.approx(errors[True])  # measured against the same exact attention
    later, padded_keys = x.clone(), x.clone()
    later[:, 6:] += 1.0
    padded_keys[1, :3] += 1.0
    with torch.no_grad(), ONE_GRAPH:
        moved = compiled(later, pad)
        torch.testing.assert_close(moved[:, :6], outputs[True][:, :6])
        assert rel(moved[:, 6:], outputs[True][:, 6:]) > 1e-2  # it did read x
        if padded:
            torch.testing.assert_close(compiled(padded_keys, pad)[1, 3:], outputs[True][1, 3:])


class MaskedMHA(nn.Module):
    """nn.MultiheadAttention given a causal mask (True = ignore) built in the forward, without is_causal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad):
        length = x.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        return self.attn(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False)[0]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_mha_given_a_causal_mask_built_in_the_graph_runs_causal_random_feature_attention(grad):
    model = MaskedMHA().eval()
    x, pad = left_padded(9)
    spec = SketchSpec(num_random_features=16, seed=1)
    compiled, reports = compile_panther(model, policy={"attention": spec})
    with torch.set_grad_enabled(grad):
        y = compiled(x, pad)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    a = model.attn
    with torch.no_grad():
        t = x.transpose(0, 1)
        q, k, v = mha_heads(t, t, t, 4, a.in_proj_weight, a.in_proj_bias)
        o = torch.ops.panther.rf_attention(q, k, v, features(spec, "attn"), "softmax", True, None, pad)
        expected = F.linear(o.permute(0, 2, 1, 3).reshape(2, 9, 32), a.out_proj.weight, a.out_proj.bias)
    torch.testing.assert_close(y.detach(), expected)


class DroppedAttention(nn.Module):
    """Attention with dropout in training, as SDPA's dropout_p, as nn.MultiheadAttention's, or written out."""

    def __init__(self, form):
        super().__init__()
        torch.manual_seed(0)
        self.form, self.attn = form, nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True)

    def forward(self, x):
        if self.form == "mha":
            return self.attn(x, x, x, need_weights=False)[0]
        q = k = v = x.view(2, 9, 4, 8).transpose(1, 2)
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        p = F.dropout((q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1), 0.1, training=self.training)
        return p @ v


@pytest.mark.parametrize("form", ["sdpa", "mha", "written_out"])
def test_attention_dropout_in_training_drops_whole_keys_per_head(form):
    # Random features have no per-(query, key) weights to drop; like RandMultiHeadAttention, the rewrite drops
    # whole keys of each head (their value rows, rescaled), drawn from the global generator as dropout is.
    model = DroppedAttention(form).train()
    x = torch.randn(2, 9, 32)
    spec = SketchSpec(num_random_features=16, seed=1)
    compiled, reports = compile_panther(model, policy={"attention": spec})
    compiled(x)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    P = features(spec, row.name)

    def expected(drop):
        if form == "mha":
            a = model.attn
            q, k, v = mha_heads(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 4, a.in_proj_weight,
                                a.in_proj_bias)
        else:
            q = k = v = x.view(2, 9, 4, 8).transpose(1, 2)
        o = torch.ops.panther.rf_attention(q, k, dropped_keys(v, 0.1) if drop else v, P, "softmax", False, None, None)
        if form != "mha":
            return o
        return F.linear(o.permute(0, 2, 1, 3).reshape(2, 9, 32), model.attn.out_proj.weight, model.attn.out_proj.bias)

    with torch.random.fork_rng():
        torch.manual_seed(7)
        y = compiled(x)
        torch.manual_seed(7)
        torch.testing.assert_close(y, expected(True))
        assert rel(compiled(x), y) > 1e-2  # another draw
    assert rel(y, expected(False)) > 1e-2
    model.eval()  # no dropout: its own graph, the same random features
    torch.testing.assert_close(compiled(x), expected(False))


class Seq2Seq(nn.Module):
    """nn.Transformer as PyTorch's sequence-to-sequence tutorial uses it, the causal target mask built in the
    forward (and flagged, so that PyTorch does not compare its values), source and target padded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(self, src, tgt, src_pad, tgt_pad):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device) == float("-inf")
        return self.transformer(src, tgt, tgt_mask=mask, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                                memory_key_padding_mask=src_pad, tgt_is_causal=True)


def test_nn_transformer_encoder_decoder_attention_is_all_rewritten_and_the_decoder_stays_causal():
    model = Seq2Seq().eval()
    src, src_pad = left_padded(11)
    tgt, tgt_pad = torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool)
    tgt_pad[1, 5:] = True
    compiled, reports = compile_panther(model, policy={"attention": SketchSpec(num_random_features=16, seed=3)})
    later, padded_source = tgt.clone(), src.clone()
    later[:, 4:] += 1.0
    padded_source[1, :3] += 1.0
    with torch.no_grad():
        y = compiled(src, tgt, src_pad, tgt_pad)
        moved = compiled(src, later, src_pad, tgt_pad)
        unmoved = compiled(padded_source, tgt, src_pad, tgt_pad)
    (report,) = reports
    assert [r.name for r in report.replaced] == ["transformer.encoder.layers.0.self_attn",
                                                 "transformer.decoder.layers.0.self_attn",
                                                 "transformer.decoder.layers.0.multihead_attn"]
    torch.testing.assert_close(moved[:, :4], y[:, :4])  # the decoder's self-attention is causal
    assert rel(moved[:, 4:], y[:, 4:]) > 1e-2
    torch.testing.assert_close(unmoved, y)  # padded source positions reach nothing


class UnflaggedEncoder(CausalEncoder):
    """CausalEncoder's float mask without is_causal: PyTorch's encoder then compares the mask's values with the
    causal ones (``_detect_is_causal_mask``), which Dynamo cannot trace. Padded, the float mask meets a bool
    padding mask, and PyTorch warns."""

    def forward(self, x, pad=None):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.encoder(x, mask=mask, src_key_padding_mask=pad, **({} if pad is None else {"is_causal": True}))


@pytest.mark.parametrize("grad", [False, True], ids=["fused", "unfused"])
def test_an_encoder_left_to_detect_its_causal_mask_compiles_to_one_graph_under_panther_only(grad):
    # PyTorch's value-by-value comparison would end the graph; under this backend the encoder is told the mask is
    # not known causal, so it applies it as given, and the rewrite proves it causal: the same compiled model as
    # with is_causal=True, one graph, causal.
    x, _ = left_padded(9)
    policy = {"attention": SketchSpec(num_random_features=16, seed=2)}
    outputs = {}
    for model in (UnflaggedEncoder(False).eval(), CausalEncoder(False).eval()):
        compiled, reports = compile_panther(model, policy=policy)
        with torch.set_grad_enabled(grad):
            outputs[type(model)] = y = compiled(x).detach()
            later = x.clone()
            later[:, 6:] += 1.0
            torch.testing.assert_close(compiled(later)[:, :6].detach(), y[:, :6])  # causal
        (report,) = reports
        assert report.graph_break is None
        assert [r.name for r in report.replaced] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    torch.testing.assert_close(outputs[UnflaggedEncoder], outputs[CausalEncoder])
    # another backend traces PyTorch's own comparison, and breaks there as before
    torch._dynamo.reset()
    explained = torch._dynamo.explain(UnflaggedEncoder(False).eval())(x)
    assert any(f.name == "_detect_is_causal_mask" for b in explained.break_reasons for f in b.user_stack)


@pytest.mark.parametrize("source", ["input", "attribute"])
def test_a_mask_from_outside_left_to_detect_is_left_to_pytorch(source, caplog):
    # Its values are unknown to the compiler, so PyTorch compares them (a graph break, then its causal kernel,
    # uncompiled), as before: exact attention, and no graph with the encoder's layers; a warning says so.
    model = CausalEncoder(False).eval()
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    if source == "attribute":
        model.mask = mask
        call = lambda x: model.encoder(x, mask=model.mask)  # noqa: E731
    else:
        call = lambda x, m: model.encoder(x, mask=m)  # noqa: E731
    compiled, reports = compile_panther(call, policy={"attention": SketchSpec(num_random_features=16, seed=2)})
    x, _ = left_padded(9)
    with caplog.at_level(logging.WARNING, logger="panther"):
        y = compiled(x) if source == "attribute" else compiled(x, mask)
    torch.testing.assert_close(y, model.encoder(x, mask=mask, is_causal=True))  # exact
    assert not any(rep.rows for rep in reports)
    assert "a mask from outside the compiled code" in caplog.text and "pass is_causal=True" in caplog.text


@pytest.mark.parametrize("grad", [False, True], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", ["causal", "padded", "weights"])
def test_exact_attention_whose_mask_is_read_as_causal_runs_as_is_causal(grad, case, monkeypatch):
    # Attention the policy keeps exact gets back the hint the encoder was not given: its MHA call is flagged
    # is_causal, unless key padding or the attention weights need the mask. The fused layer then runs unfused.
    graphs = []
    run_passes = fx_passes.run_passes
    monkeypatch.setattr(fx_passes, "run_passes", lambda gm, *a, **k: graphs.append(gm) or run_passes(gm, *a, **k))
    x, pad = left_padded(9)
    if case == "weights":
        model = MaskedMHA()  # nn.MultiheadAttention's default need_weights=True, the weights then unused

        def call(x, pad):
            mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
            return model.attn(x, x, x, attn_mask=mask)[0]
    else:
        model = CausalEncoder(bool_mask=True).eval()
        model.forward = lambda x, pad: model.encoder(x, mask=torch.ones(9, 9, dtype=torch.bool).triu(1),
                                                     src_key_padding_mask=pad)

        def call(x, pad):
            return model(x, pad)
    pad = pad if case == "padded" else None
    compiled, reports = compile_panther(call, policy={"attention": "skip"})
    with torch.set_grad_enabled(grad):
        y, expected = compiled(x, pad), call(x, pad)
    torch.testing.assert_close(y, expected, equal_nan=True)  # padded queries see no key: NaN either way
    flags = [n.kwargs.get("is_causal", False) for n in graphs[0].graph.nodes if n.target is F.multi_head_attention_forward]
    hinted = [sdpa_mask.CAUSAL_HINT in r.reason for r in reports[0].rows if r.kind == "attention"]
    flagged = case == "causal"
    assert hinted == [flagged] * len(hinted) and hinted
    assert flags == ([True] * len(hinted) if flagged else [False] * len(flags))
    assert not any(n.target is torch._transformer_encoder_layer_fwd for n in graphs[0].graph.nodes) or not flagged


class TriangleSDPA(nn.Module):
    """SDPA given the causal triangle (True = attend) built in the forward, and a key padding mask if any."""

    def forward(self, q, k, v, pad=None):
        length = q.shape[2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if pad is not None:
            mask = mask & ~pad[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_exact_sdpa_whose_mask_is_read_as_causal_runs_as_is_causal(padded, monkeypatch):
    graphs = []
    run_passes = fx_passes.run_passes
    monkeypatch.setattr(fx_passes, "run_passes", lambda gm, *a, **k: graphs.append(gm) or run_passes(gm, *a, **k))
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, :3] = True
    pad = pad if padded else None
    compiled, reports = compile_panther(TriangleSDPA(), policy={"attention": "skip"})
    torch.testing.assert_close(compiled(q, k, v, pad), TriangleSDPA()(q, k, v, pad), equal_nan=True)
    (call,) = [n for n in graphs[0].graph.nodes if n.target is F.scaled_dot_product_attention]
    (row,) = reports[0].rows
    assert (sdpa_mask.CAUSAL_HINT in row.reason) == (not padded)
    assert (call.kwargs.get("is_causal", False), call.kwargs.get("attn_mask") is None) == (not padded, not padded)


def test_a_graph_break_in_torch_modules_is_reported_with_what_to_do(caplog):
    x, pad = left_padded(9)  # a float mask beside a bool padding mask: PyTorch warns, Dynamo breaks there
    compiled, reports = compile_panther(UnflaggedEncoder(False).eval(), policy={"attention": SketchSpec(seed=2)})
    with torch.no_grad(), caplog.at_level("WARNING", logger="panther"):
        compiled(x, pad)
    first = reports[0]
    assert first.rows == []  # the graph ends at the break: the mask only
    assert "_canonical_mask" in first.graph_break and "one dtype" in first.graph_break, first.graph_break
    assert f"graph break: {first.graph_break}" in str(first) and first.as_dict()["graph_break"] == first.graph_break
    assert first.graph_break in caplog.text
    assert all(not r.rows for r in reports)  # the encoder ran uncompiled: no layer in any report


def test_a_causal_mask_built_in_the_model_is_read_under_dynamic_shapes():
    spec = SketchSpec(num_random_features=16, seed=2)
    compiled, reports = compile_dynamic(CausalEncoder(False).eval(), {"attention": spec})
    for length in (9, 13):
        x, pad = left_padded(length)
        with torch.no_grad(), ONE_GRAPH:
            y = compiled(x, pad)
            broken = reports[0].graph_break or ""
            if "fake tensors" in broken:  # torch 2.11 breaks at the fused call under dynamic shapes
                pytest.skip(f"this torch cannot trace the fused encoder layer under dynamic shapes: {broken}")
            later = x.clone()
            later[:, 7:] += 1.0
            torch.testing.assert_close(compiled(later, pad)[:, :7], y[:, :7])
        (report,) = reports  # the second length ran the same graph
        assert [r.name for r in report.replaced] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
