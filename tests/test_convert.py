"""panther.convert: the eager module swap (training path), its report, training under torch.compile,
torch.export and state_dict round trips."""
import copy
import re
import subprocess
import sys
import warnings
from collections import UserDict

import pytest
import torch
from torch import nn

import panther
from panther.backend import panther_backend
from panther.policy import SketchSpec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 32)
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))


POLICY = {"fc*": SketchSpec(num_terms=2, low_rank=3, seed=7)}


def fresh():
    torch.manual_seed(1)
    return Net()


def test_convert_swaps_only_what_the_policy_asks():
    model = fresh()
    keep = {n: p for n, p in model.named_parameters() if n.startswith("out.")}
    drop = model.drop
    model.eval()
    converted, report = panther.convert(model, POLICY, example_inputs=torch.randn(5, 24))
    assert converted is model and report is panther.last_report()
    assert isinstance(model.fc1, panther.nn.SKLinear) and isinstance(model.fc2, panther.nn.SKLinear)
    assert model.fc1.num_terms == 2 and model.fc1.low_rank == 3
    assert model.drop is drop and not model.training and not model.fc1.training
    for n, p in model.named_parameters():
        if n.startswith("out."):
            assert p is keep[n]  # untouched layer: the very same Parameter objects
    assert [(r.name, r.replaced) for r in report.rows] == [("fc1", True), ("fc2", True), ("out", False)]
    r = report.row("fc1")
    assert (r.op_before, r.op_after) == ("nn.Linear", "panther.nn.SKLinear")
    assert r.params_after == sum(t.numel() for t in list(model.fc1.parameters()) + list(model.fc1.buffers()))
    assert r.flops_before == 2 * 5 * 24 * 32 and r.flops_after == 4 * 5 * 2 * 3 * (24 + 32)
    assert report.row("out").reason == "no policy entry matches this layer"


def test_convert_warns_about_policy_entries_that_match_no_layer():
    with pytest.warns(UserWarning, match=re.escape("policy entries that match no layer: ['fc_*', 'drop']")):
        _, report = panther.convert(fresh(), {"fc_*": SketchSpec(low_rank=2), "linear": "skip", "drop": "skip"},
                                    overrides={"out": "skip"})
    assert not report.replaced
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry matches: by path, glob or kind
        panther.convert(fresh(), {"fc1": SketchSpec(low_rank=2), "fc*": "skip", "linear": "skip"})


class SelfAttention(nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        with torch.no_grad():
            self.attn.in_proj_weight.mul_(gain)  # the gain sets the query and key norms

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("seed", [None, 3])
def test_the_error_a_policy_weighs_is_the_error_of_the_layer_it_gets(seed):
    """The accuracy measurement and the layer share one draw of random features (unseeded ones included), so the
    policy's number, the report's and the built layer's agree, through convert and the compile backend."""
    x = torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SelfAttention(1.0)
    weighed = {}

    def policy(info):
        spec = SketchSpec(num_random_features=16, seed=seed)
        weighed[info.name] = info.extra["output_error"](16, "softmax", seed)
        return spec

    converted, report = panther.convert(copy.deepcopy(model), policy, example_inputs=x)
    assert report.row("attn").est_error == weighed["attn"]
    torch._dynamo.reset()
    reports = []
    with torch.no_grad():
        torch.compile(model, backend=panther_backend, options={"policy": policy, "report": reports.append})(x)
    (row,) = reports[0].rows
    assert row.est_error == weighed[row.name]
    if seed is not None:  # seeded: the same features both ways
        assert weighed[row.name] == weighed["attn"]


def test_unseeded_attention_features_are_the_global_rngs_next_draw():
    """convert draws an unseeded layer's random features from the global RNG once (the rest of the new layer
    is copied from the dense one), whether or not the policy measured them on example_inputs first."""
    from panther.attention_error import layer_features

    x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    measured = []

    def measuring(info):
        measured.append(info.extra["output_error"](16))  # draws the features the layer then gets
        return SketchSpec(num_random_features=16)

    for policy, example in (({"attention": SketchSpec(num_random_features=16)}, None), (measuring, x)):
        model = SelfAttention(1.0)
        torch.manual_seed(5)
        expected = layer_features("attn", 16, 8, None)
        after = torch.rand(3)  # what the global RNG gives next
        torch.manual_seed(5)
        panther.convert(model, policy, example_inputs=example)
        torch.testing.assert_close(model.attn.projection_matrix, expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)  # one draw, not two
    assert len(measured) == 1


def test_an_attention_called_causally_on_the_example_is_converted_causal():
    """nn.TransformerDecoder calls its self-attention with a causal attn_mask and is_causal=True. Seen so on
    example_inputs, the layer is converted causal (without SketchSpec(causal=True)), runs on the same call,
    and matches the compile backend, which reads causality from the graph."""
    torch.manual_seed(0)
    model = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0), num_layers=1).eval()
    tgt, memory = torch.randn(12, 2, 32), torch.randn(9, 2, 32)
    call = dict(tgt=tgt, memory=memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(12), tgt_is_causal=True)
    policy = {"attention": SketchSpec(num_random_features=16, seed=1)}
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend=panther_backend, options={"policy": policy})(**call)
        converted, report = panther.convert(model, policy, example_inputs=call)
        assert report.row("layers.0.self_attn").spec.causal and not report.row("layers.0.multihead_attn").spec.causal
        torch.testing.assert_close(converted(**call), compiled, rtol=1e-5, atol=1e-5)


def test_parametrized_weights_stay_and_are_not_computed():
    """A weight under torch.nn.utils.parametrize (weight_norm, spectral_norm) is a training constraint the
    sketched layer would drop: such layers stay, with the reason. Judging them does not compute the weight
    (a spectral_norm read in training mode runs a power iteration and changes the layer's state)."""
    from torch.nn.utils import parametrizations

    from panther.budget import ErrorBudgetPolicy

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(32, 32)),
                          parametrizations.spectral_norm(nn.Linear(32, 32)), nn.Linear(32, 32),
                          parametrizations.spectral_norm(nn.Conv2d(4, 8, 3)))
    state = copy.deepcopy(model.state_dict())
    budget = ErrorBudgetPolicy(model[:3], [torch.randn(16, 32)], budget=0.5)  # the error-budget policy skips them
    assert set(budget.stats) == {"2"}
    _, report = panther.convert(model, {"linear": SketchSpec(1, 4), "conv2d": SketchSpec(1, 2)})
    assert [r.replaced for r in report.rows] == [False, False, True, False]
    assert "_WeightNorm" in report.row("0").reason and "_SpectralNorm" in report.row("1").reason
    assert report.row("0").params_before == 32 + 32 * 32 + 32  # weight_norm's g and v, and the bias
    for key in ("1.parametrizations.weight.0._u", "3.parametrizations.weight.0._u"):
        assert torch.equal(model.state_dict()[key], state[key])


def test_convert_measures_attention_on_example_inputs():
    """With example_inputs, convert measures random-feature attention's error as the compile backend does:
    the report shows it, and the default policy keeps inaccurate attention exact."""
    x = torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        accurate, inaccurate = SelfAttention(0.1), SelfAttention(8.0)
    _, report = panther.convert(accurate, None, example_inputs=x)
    row = report.row("attn")
    assert row.replaced and row.est_error < 0.25 and f"output err {row.est_error:.3g} on the example" in str(report)
    _, report = panther.convert(inaccurate, None, example_inputs=x)
    assert "random features are inaccurate here" in report.row("attn").reason
    _, report = panther.convert(SelfAttention(8.0), {"attention": SketchSpec(num_random_features=32)},
                                example_inputs=x)
    assert report.row("attn").replaced and report.row("attn").est_error > 0.25  # asked for: done, and said


def test_convert_seeded_spec_is_reproducible_and_per_layer():
    a, _ = panther.convert(fresh(), POLICY)
    b, _ = panther.convert(fresh(), POLICY)
    assert torch.equal(a.fc1.U1s, b.fc1.U1s)  # same seed, same layer -> same draw
    assert not torch.equal(a.fc2.U1s, b.fc1.U1s[:, :, :32])  # layers derive different seeds


def test_convert_keeps_a_shared_layer_shared():
    """One module used in two places (weight sharing) becomes one sketched module used in both, reported once."""
    torch.manual_seed(0)
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(32, 4))
    _, report = panther.convert(model, {"*": SketchSpec(num_terms=1, low_rank=4, seed=0)},
                                example_inputs=torch.randn(5, 32))
    assert isinstance(model[0], panther.nn.SKLinear) and model[2] is model[0]
    assert [r.name for r in report.rows] == ["0", "3"]
    block = nn.Sequential(nn.Linear(32, 32))  # a shared parent: its child is swapped once, for both uses
    nested = nn.Sequential(block, block)
    panther.convert(nested, {"*": SketchSpec(num_terms=1, low_rank=4, seed=0)})
    assert isinstance(nested[1][0], panther.nn.SKLinear) and nested[1][0] is nested[0][0]


def test_convert_takes_keyword_example_inputs():
    """A mapping of example inputs is keyword arguments, as a tokenizer's output (a UserDict) would be."""
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(24, 32)

        def forward(self, input_ids, scale=1.0):
            return self.fc(input_ids) * scale

    inputs = UserDict(input_ids=torch.randn(5, 24), scale=2.0)
    _, report = panther.convert(Keywords(), {"fc": SketchSpec(num_terms=1, low_rank=3)}, example_inputs=inputs)
    assert report.row("fc").flops_before == 2 * 5 * 24 * 32


class TiedLM(nn.Module):
    """A language model whose output head shares the token embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(100, 32), nn.Linear(32, 32), nn.Linear(32, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.body(self.emb(t))))


def test_convert_says_when_it_breaks_a_weight_tie():
    spec = SketchSpec(num_terms=1, low_rank=4, seed=0)
    model = TiedLM()
    with pytest.warns(UserWarning, match=r"head shared a parameter with emb.weight.*overrides=\{'head': 'skip'\}"):
        _, report = panther.convert(model, {"*": spec})
    assert report.row("head").replaced and report.row("head").reason == "untied from emb.weight"
    assert "untied from emb.weight" in str(report) and report.row("body").reason == ""
    kept = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the untied layer skipped, nothing to warn about
        _, report = panther.convert(kept, {"*": spec}, overrides={"head": "skip"})
    assert kept.head.weight is kept.emb.weight and report.row("body").replaced
    # two swapped layers sharing a weight: one tie, one warning (the second swap breaks nothing more)
    pair = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    pair[1].weight = pair[0].weight
    with pytest.warns(UserWarning) as caught:
        _, report = panther.convert(pair, {"*": spec})
    assert [str(w.message).split(";")[0] for w in caught] == ["panther.convert: 0 shared a parameter with 1.weight"]
    assert [r.reason for r in report.rows] == ["untied from 1.weight", ""]


def test_convert_keeps_frozen_layers_frozen():
    model = fresh()
    model.fc1.requires_grad_(False)
    panther.convert(model, POLICY)
    assert not any(p.requires_grad for p in model.fc1.parameters())
    assert all(p.requires_grad for p in model.fc2.parameters())


def test_convert_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        panther.convert("net", POLICY)
    with pytest.raises(TypeError, match="policy"):
        panther.convert(fresh(), 42)
    with pytest.raises(TypeError, match="overrides"):
        panther.convert(fresh(), POLICY, overrides=["fc1"])


def test_convert_then_compile_trains_like_eager():
    torch._dynamo.reset()
    eager, _ = panther.convert(fresh(), POLICY)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=panther_backend, options={"compiler": "aot_eager"})
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, t = torch.randn(8, 24, generator=g), torch.randn(8, 4, generator=g)
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), t).backward()
            opt.step()
    for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        assert (pe - pc).abs().max().item() <= 1e-5, n
    assert not torch.equal(eager.fc1.S1s, panther.convert(fresh(), POLICY)[0].fc1.S1s)  # it did train


def test_export_keeps_panther_ops():
    model, _ = panther.convert(fresh(), POLICY)
    ep = torch.export.export(model.eval(), (torch.randn(3, 24),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("panther.sketched_linear" in t for t in targets), targets
    params = set(ep.graph_signature.parameters) | set(ep.graph_signature.buffers)
    assert {"fc1.S1s", "fc1.S2s", "fc1.U1s", "fc1.U2s"} <= params
    x = torch.randn(3, 24)
    torch.testing.assert_close(ep.module()(x), model(x))


def test_state_dict_round_trip(tmp_path):
    src, _ = panther.convert(fresh(), POLICY)
    with torch.no_grad():
        src.fc1.S1s.add_(0.5)  # state that only the checkpoint knows about
    path = tmp_path / "ckpt.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(123)
    dst, _ = panther.convert(Net(), {"fc*": SketchSpec(num_terms=2, low_rank=3)})
    dst.load_state_dict(torch.load(path))
    x = torch.randn(4, 24)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert set(src.state_dict()) == set(dst.state_dict())


def _modules_after_import_panther(prefixes):
    code = f"import sys, panther; print([m for m in sys.modules if m.startswith({tuple(prefixes)!r})])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_import_panther_does_not_import_the_compile_stack():
    """Eager users pay nothing for the compile stack: neither panther's nor torch's is imported."""
    loaded = _modules_after_import_panther(("fx_passes", "panther.backend", "inductor_ext", "networkx",
                                            "torch._dynamo", "torch._inductor"))
    for name in ("fx_passes", "panther.backend", "inductor_ext", "networkx", "torch._dynamo", "torch._inductor"):
        assert name not in loaded


class ConvAttn(nn.Module):
    """Conv stem + nn.MultiheadAttention (sequence-first) + a grouped conv convert() must leave alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.mha = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, img):
        t = self.dw(torch.relu(self.conv(img))).flatten(2).permute(2, 0, 1)  # (L, B, E)
        a, _ = self.mha(t, t, t, need_weights=False)
        return self.head(a.mean(0))


CA_POLICY = {"conv2d": SketchSpec(low_rank=4, seed=1), "attention": SketchSpec(num_random_features=8, seed=2)}


def test_convert_conv_and_attention_export_and_state_dict(tmp_path):
    torch.manual_seed(0)
    img = torch.randn(2, 3, 6, 6)
    model, report = panther.convert(ConvAttn().eval(), CA_POLICY, example_inputs=img)
    assert [(r.name, r.replaced) for r in report.rows] == [("conv", True), ("dw", False), ("mha", True), ("head", False)]
    assert "groups=16" in report.row("dw").reason
    assert isinstance(model.conv, panther.nn.SKConv2d) and isinstance(model.mha, panther.nn.RandMultiHeadAttention)
    mha = report.row("mha")
    assert mha.flops_before is not None and mha.params_after == mha.params_before + 8 * 8
    y = model(img)
    assert y.shape == (2, 3)
    ep = torch.export.export(model, (img,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"panther.sketched_conv2d.default", "panther.rf_attention.default"} <= targets, targets
    torch.testing.assert_close(ep.module()(img), y)
    torch.save(model.state_dict(), tmp_path / "ca.pt")
    torch.manual_seed(5)
    other, _ = panther.convert(ConvAttn().eval(), CA_POLICY)
    other.load_state_dict(torch.load(tmp_path / "ca.pt"))
    torch.testing.assert_close(other(img), y, rtol=0, atol=0)


def transformer_encoder():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 2)


@pytest.mark.parametrize("policy", [
    {"linear": SketchSpec(low_rank=16, init="svd")},  # full rank: the dense model, computed sketched
    {"attention": SketchSpec(num_random_features=32, seed=0)},
])
def test_converted_transformer_encoder_runs_in_eval_mode(policy):
    # In eval mode nn.TransformerEncoderLayer runs one fused native kernel over its children's dense
    # weights (and the encoder packs padded batches into nested tensors for it): on sketched children it
    # raised AttributeError. Converted layers take their ordinary forward, the one training mode runs.
    enc = transformer_encoder()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    converted, report = panther.convert(copy.deepcopy(enc), policy)
    assert len(report.replaced) == (4 if "linear" in policy else 2)
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": pad}):
            evaluated = converted.eval()(x, **kwargs)
            trained = converted.train()(x, **kwargs)
            torch.testing.assert_close(evaluated, trained)
            if "linear" in policy:
                torch.testing.assert_close(evaluated, enc.train()(x, **kwargs), rtol=1e-4, atol=1e-4)
            else:  # the padded keys are really ignored: changing them changes nothing else
                x2 = x.clone()
                x2[0, 6:] = 100.0
                changed = converted.eval()(x2, **kwargs)
                torch.testing.assert_close(changed[1], evaluated[1])
                assert torch.allclose(changed[0, :6], evaluated[0, :6]) == ("src_key_padding_mask" in kwargs)


def test_untouched_transformer_layers_keep_the_fused_kernel():
    enc = transformer_encoder()
    converted, _ = panther.convert(enc, {"layers.1.linear*": SketchSpec(low_rank=8)})
    assert converted.layers[0].activation_relu_or_gelu and not converted.layers[1].activation_relu_or_gelu
    assert not converted.use_nested_tensor
    full = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
    converted, _ = panther.convert(full, {"attention": SketchSpec(num_random_features=16)})
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert converted.eval()(src, tgt).shape == (2, 5, 32)


def test_mha_compatible_attention_takes_additive_padding_masks():
    # nn.TransformerEncoder/Decoder hand MultiheadAttention float masks (0 keep, -inf ignore)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    model, _ = panther.convert(nn.ModuleDict({"attn": mha}), {"attention": SketchSpec(num_random_features=8)})
    attn = model["attn"]
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    additive = torch.zeros(2, 5).masked_fill(pad, float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x, x, key_padding_mask=additive)[0], attn(x, x, x, key_padding_mask=pad)[0])
        with pytest.raises(ValueError, match="only 0 .keep. and -inf"):
            attn(x, x, x, key_padding_mask=additive.masked_fill(pad, -0.5))
    torch.testing.assert_close(attn.in_proj_weight, torch.cat([attn.Wq, attn.Wk, attn.Wv]))
    assert attn.in_proj_bias.shape == (48,)


def test_lazy_layers_need_a_forward_first():
    policy = {"linear": SketchSpec(low_rank=4, init="svd")}
    with pytest.raises(ValueError, match="0 is a lazy layer .* example_inputs="):
        panther.convert(nn.Sequential(nn.LazyLinear(16), nn.ReLU()), policy)
    model, report = panther.convert(nn.Sequential(nn.LazyLinear(16), nn.ReLU()), policy,
                                    example_inputs=torch.randn(2, 8))
    assert isinstance(model[0], panther.nn.SKLinear) and report.row("0").params_before == 8 * 16 + 16


def test_convert_takes_padded_convolutions():
    # reflect/replicate/circular padding was refused by convert although the compile backend rewrote it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    converted, report = panther.convert(model, {"conv2d": SketchSpec(low_rank=2, init="svd")})
    assert report.row("0").replaced and converted[0].padding_mode == "reflect"
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-5)


def test_example_inputs_with_padding_give_transformer_flops():
    # The recording forward keeps padded batches dense (no nested tensors), so FLOPs are known.
    enc = transformer_encoder()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 5:] = True
    _, report = panther.convert(enc, {"linear": SketchSpec(low_rank=4)},
                                example_inputs={"src": x, "src_key_padding_mask": pad})
    assert report.row("layers.0.linear1").flops_before == 2 * 2 * 9 * 32 * 64
    assert report.row("layers.1.self_attn").flops_before is not None
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_compiling_a_converted_model_leaves_panther_layers_alone():
    # The default policy would sketch any linear that halves its FLOPs, RandMultiHeadAttention's own
    # projections included: after convert they belong to the attention the user chose, as in convert.
    enc = transformer_encoder()
    converted, _ = panther.convert(enc, {"attention": SketchSpec(num_random_features=16, seed=0)})
    converted.eval()
    x = torch.randn(2, 9, 32)
    torch._dynamo.reset()
    reports = []
    with torch.no_grad():
        y = torch.compile(converted, backend=panther_backend,
                          options={"compiler": "aot_eager", "report": reports.append})(x)
        torch.testing.assert_close(y, converted(x), rtol=1e-4, atol=1e-5)
    rows = {r.name: r for r in reports[0].rows}
    projections = [n for n in rows if ".self_attn." in n]
    assert len(projections) == 8  # Wq, Wk, Wv, W0 of both layers
    for name in projections:
        assert not rows[name].replaced and "panther.nn.RandMultiHeadAttention" in rows[name].reason
