"""backend="panther" on linear layers: the rewrite, the report, numerics vs convert, caching, training mode.

Most compiles use options={"compiler": "aot_eager"} (AOTAutograd without Inductor): it checks that the
rewritten graph with its new buffers is valid for AOT while costing ~1 s instead of a cold Inductor build.
"""
import copy

import pytest
import torch
from torch import nn

import fx_passes
import panther
from fx_passes import sketch_linear
from panther.backend import check_options, panther_backend
from panther.policy import SketchSpec

FAST = {"compiler": "aot_eager"}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 40, bias=False)
        self.head = nn.Linear(40, 6)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


POLICY = {"linear": SketchSpec(num_terms=1, low_rank=8, init="svd"), "head": "skip"}


def compile_panther(model, **options):
    reports = []
    opts = {**FAST, "report": reports.append, **options}
    return torch.compile(model, backend=panther_backend, options=opts), reports


def capturing_backend(graphs, **options):
    """panther_backend with fixed options that also keeps the graph modules it rewrote."""
    def backend(gm, example_inputs):
        out = panther_backend(gm, example_inputs, options={**FAST, **options})
        graphs.append(gm)
        return out

    return backend


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def inference_run(mlp):
    """One no-grad compile of the MLP with POLICY, shared by the report/numerics tests."""
    torch._dynamo.reset()
    graphs, reports = [], []
    compiled = torch.compile(mlp, backend=capturing_backend(graphs, policy=POLICY, report=reports.append))
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = compiled(x)
    return graphs[0], reports, x, y


def test_report_lists_exactly_the_chosen_nodes(inference_run):
    _, reports, x, _ = inference_run
    (rep,) = reports
    assert rep is panther.last_report()
    assert [r.name for r in rep.rows] == ["fc1", "fc2", "head"]
    assert [r.name for r in rep.replaced] == ["fc1", "fc2"]
    head = rep.row("head")
    assert not head.replaced and head.op_after == head.op_before and "skip" in head.reason
    n = x.shape[0]
    for name, d_in, d_out, bias in (("fc1", 32, 48, True), ("fc2", 48, 40, False), ("head", 40, 6, True)):
        r = rep.row(name)
        assert r.kind == "linear" and r.op_before == "torch._C._nn.linear"
        assert r.params_before == d_in * d_out + (d_out if bias else 0)
        assert r.flops_before == 2 * n * d_in * d_out
        if r.replaced:
            assert r.op_after == "panther.sketched_linear"
            assert r.params_after == 2 * 8 * (d_in + d_out) + (d_out if bias else 0)
            assert r.flops_after == 4 * n * 8 * (d_in + d_out)
            assert 0 < r.est_error < 1
    t = rep.totals
    assert t["replaced"] == 2 and t["params_before"] == sum(r.params_before for r in rep.rows)
    text = str(rep)
    assert "fc1" in text and "panther.sketched_linear" in text and "TOTAL" in text
    assert rep.to_markdown().splitlines()[1].startswith("|")
    d = rep.as_dict()
    assert d["rows"][0]["spec"]["low_rank"] == 8 and d["totals"]["layers"] == 3


def test_graph_uses_panther_op_with_buffers(inference_run, mlp):
    gm, _, _, _ = inference_run
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.panther.sketched_linear.default) == 2
    assert targets.count(torch._C._nn.linear) == 1  # head
    buffers = dict(gm.named_buffers())
    assert len(buffers) == 8 and all(name in gm._param_name_to_source for name in buffers)
    # Placeholders untouched: Dynamo still sees the weights as inputs (now unused by fc1/fc2).
    assert sum(n.op == "placeholder" for n in gm.graph.nodes) == 1 + 5
    s1 = next(t for name, t in buffers.items() if name.endswith("fc1_S1s"))
    assert s1.shape == (1, 32, 8)


def test_svd_compile_equals_convert_eager(inference_run, mlp):
    _, _, x, y = inference_run
    converted, conv_report = panther.convert(copy.deepcopy(mlp), POLICY)
    assert [r.name for r in conv_report.replaced] == ["fc1", "fc2"]
    for name in ("fc1", "fc2"):  # both reports state the same weight error
        compiled_err = inference_run[1][0].row(name).est_error
        assert 0.01 < compiled_err < 1 and conv_report.row(name).est_error == pytest.approx(compiled_err, rel=1e-4)
    assert isinstance(converted.fc1, panther.nn.SKLinear) and isinstance(converted.head, nn.Linear)
    with torch.no_grad():
        y_conv = converted(x)
        y_dense = mlp(x)
    assert rel(y, y_conv) <= 1e-4
    assert rel(y, y_dense) > 1e-3  # rank 8 really is an approximation: the test can fail


def test_full_rank_svd_reproduces_dense(mlp):
    torch._dynamo.reset()
    full = {"fc1": SketchSpec(low_rank=32, init="svd"), "fc2": SketchSpec(low_rank=40, init="svd"),
            "head": SketchSpec(low_rank=6, init="svd")}
    compiled, reports = compile_panther(mlp, policy=full)
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = compiled(x)
        ref = mlp(x)
    assert len(reports[0].replaced) == 3
    assert rel(y, ref) <= 1e-5


class AutocastInside(nn.Module):
    """fc1 and fc2 run in the model's own bf16 autocast block, so fc2 meets a bf16 input with fp32 weights."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 48), nn.Linear(48, 40), nn.Linear(40, 6)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.fc2(torch.relu(self.fc1(x)))
        return self.head(h.float())


@pytest.mark.parametrize("where", ["around the call", "inside the model"])
def test_layers_under_autocast_are_rewritten(mlp, where):
    """Under autocast a layer's input is in the autocast dtype while its weight is fp32. That is no dtype
    mismatch: the sketched op's autocast kernel casts the factors as F.linear casts the weight."""
    torch._dynamo.reset()
    full = {"*": SketchSpec(low_rank=64, init="svd")}  # 2k >= min(in, out): exact up to bf16 rounding
    model = mlp if where == "around the call" else AutocastInside().eval()
    compiled, reports = compile_panther(model, policy=full)
    x = torch.randn(3, 32)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "around the call")
    with amp, torch.no_grad():
        y, ref = compiled(x), model(x)
    assert [r.replaced for r in reports[-1].rows] == [True, True, True], str(reports[-1])
    assert y.dtype == ref.dtype and rel(y.float(), ref.float()) < 2e-2


def test_recompile_for_new_batch_size_reuses_factors(mlp, monkeypatch):
    torch._dynamo.reset()
    fx_passes.factor_cache.clear()
    monkeypatch.setattr(fx_passes.factor_cache, "disk", False)  # count real factorisations
    calls = []
    real = sketch_linear.linear_factors

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(sketch_linear, "linear_factors", counting)
    compiled, reports = compile_panther(mlp, policy=POLICY)
    with torch.no_grad():
        compiled(torch.randn(2, 32))
        compiled(torch.randn(7, 32))  # a new batch size: Dynamo recompiles, the backend runs again
        compiled(torch.randn(9, 32))
    assert len(reports) >= 2, "expected a recompile"
    assert all(len(r.replaced) == 2 for r in reports)
    assert len(calls) == 2  # fc1 and fc2 factorised once each
    assert fx_passes.factor_cache.hits >= 2


def test_grad_enabled_compile_never_bakes_factors(mlp):
    torch._dynamo.reset()
    before = fx_passes.factor_cache.misses
    compiled, reports = compile_panther(mlp, policy=POLICY)
    x = torch.randn(4, 32, requires_grad=True)
    with pytest.warns(UserWarning, match=r"model.eval\(\) does not disable them.*torch.no_grad\(\)"):
        y = compiled(x)
    y.sum().backward()
    (rep,) = reports
    assert not rep.replaced
    for name in ("fc1", "fc2"):
        assert rep.row(name).reason == fx_passes.TRAINING_REASON
    assert fx_passes.factor_cache.misses == before
    assert torch.allclose(y, mlp(x), atol=1e-6)


@pytest.mark.parametrize("spelling", ["operator", "method", "mm"])
def test_matmul_spelling(spelling):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(24, 16))  # nn.Linear layout, used as x @ w.t()
            self.p = nn.Parameter(torch.randn(24, 12))  # (d_in, d_out), used as x @ p

        def forward(self, x):
            if spelling == "method":  # Dynamo records x.matmul(w) as a method call, not torch.matmul
                return x.matmul(self.w.T).matmul(self.p)
            if spelling == "mm":
                return torch.mm(x.mm(self.w.t()), self.p)
            return (x @ self.w.t()) @ self.p

    torch._dynamo.reset()
    m = M()
    compiled, reports = compile_panther(m, policy={"w": SketchSpec(low_rank=16, init="svd"),
                                                       "p": SketchSpec(low_rank=12, init="svd")})
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = compiled(x)
    rep = reports[0]
    assert [(r.name, r.replaced) for r in rep.rows] == [("w", True), ("p", True)]
    assert rep.row("w").op_before == "matmul(x, W.t())" and rep.row("p").op_before == "matmul(x, W)"
    with torch.no_grad():
        assert rel(y, m(x)) <= 1e-5  # full rank for both


def test_layer_names_of_a_model_whose_class_defines_getattr():
    """diffusers' ModelMixin defines ``__getattr__``; Dynamo then reads its submodules as
    ``L['self'].__dict__['_modules']['down']``: the names are still the module paths, distinct per layer."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList([nn.Linear(16, 16)])
            self.up = nn.ModuleDict({"last": nn.Linear(16, 16)})

        def __getattr__(self, name):
            return super().__getattr__(name)

        def forward(self, x):
            return self.up["last"](self.down[0](x))

    compiled, reports = compile_panther(Model(), policy={"down.*": SketchSpec(low_rank=4),
                                                         "up.last": SketchSpec(low_rank=4)})
    with torch.no_grad():
        compiled(torch.randn(3, 16))
    assert [(r.name, r.replaced) for r in reports[0].rows] == [("down.0", True), ("up.last", True)]


def test_a_weight_computed_in_the_graph_is_left_with_its_sources():
    """A parametrized weight (weight_norm) and one computed from two parameters stay dense; the reason names
    what they are computed from."""
    from torch.nn.utils import parametrizations

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = parametrizations.weight_norm(nn.Linear(16, 16))
            self.a, self.b = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return torch.nn.functional.linear(self.norm(x), self.a + self.b)

    torch._dynamo.reset()
    compiled, reports = compile_panther(M(), policy={"*": SketchSpec(low_rank=4)})
    with torch.no_grad():
        compiled(torch.randn(3, 16))
    rows = reports[0].rows
    assert not any(r.replaced for r in rows)
    assert "by a parametrization (norm.parametrizations, torch.nn.utils.parametrize)" in rows[0].reason
    assert "computed in the graph from a, b, not a module parameter" in rows[1].reason


@pytest.mark.parametrize(
    "options, exc, needle",
    [
        ({"polcy": None}, ValueError, "polcy"),
        ({"compiler": "tvm"}, ValueError, "inductor"),
        ({"report": 3}, TypeError, "report"),
        ({"policy": 3}, TypeError, "policy"),
        ({"decompose": "yes"}, TypeError, "decompose"),
        ({"measure_attention": 1}, TypeError, "measure_attention"),
        ({"mode": "fastest"}, ValueError, "max-autotune"),
        ({"compiler": "eager", "mode": "max-autotune"}, ValueError, "inductor"),
        ({"inductor_config": {"no_such_flag": 1}}, ValueError, r"unknown key\(s\) \['no_such_flag'\]"),
        ({"policy": {"fc": 3}}, TypeError, "policy"),
        ({"overrides": {"fc": {"rank": 4}}}, TypeError, "unknown SketchSpec field"),
    ],
)
def test_option_validation(options, exc, needle):
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(exc, match=needle):
        panther_backend(gm, [torch.randn(1, 2)], options=options)
    with pytest.raises(exc, match=needle):   # the same check, where the options are built
        check_options(options)


def test_option_errors_reach_the_caller_through_dynamo_at_the_first_call():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(2, 2), backend="panther", options={"polcy": None})   # nothing checked yet
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="unknown option") as e:
        compiled(torch.randn(1, 2))
    assert isinstance(e.value.inner_exception, ValueError)
    assert check_options({"inductor_config": {"triton.cudagraphs": False}})["inductor_config"]


def test_callable_policy_and_overrides_through_options(mlp, caplog):
    torch._dynamo.reset()
    seen = []

    def policy(info):
        seen.append((info.name, info.kind, info.shapes["input"], info.grad_enabled))
        return SketchSpec(low_rank=4) if info.extra["out_features"] >= 40 else None

    compiled, reports = compile_panther(mlp, policy=policy, overrides={"fc2": "skip"}, compiler="eager")
    x = torch.randn(3, 32)
    with caplog.at_level("INFO", logger="panther"), torch.no_grad():
        compiled(x)
    rep = reports[0]
    assert [(r.name, r.replaced) for r in rep.rows] == [("fc1", True), ("fc2", False), ("head", False)]
    assert "fc2" in rep.row("fc2").reason and rep.row("head").reason == "policy returned None"
    # unset num_terms filled in; an unset init is the best approximation, as the rewrite serves inference only
    assert rep.row("fc1").spec == SketchSpec(num_terms=1, low_rank=4, init="svd")
    # the override answered for fc2 before the callable was asked
    assert seen == [("fc1", "linear", (3, 32), False), ("head", "linear", (3, 40), False)]
    assert any("panther graph diff" in rec.getMessage() for rec in caplog.records)


def test_factors_persist_across_processes(mlp, monkeypatch, tmp_path):
    """A fresh process (simulated by clearing the in-memory cache) loads deterministic factors from disk."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cache = fx_passes.factor_cache
    outputs = []
    for _ in range(2):
        torch._dynamo.reset()
        cache.clear()
        compiled, reports = compile_panther(mlp, policy=POLICY, compiler="eager")
        with torch.no_grad():
            outputs.append(compiled(torch.ones(2, 32)))
    assert (cache.misses, cache.disk_hits) == (0, 2)  # second round: both layers from disk
    assert torch.equal(outputs[0], outputs[1])
    assert len(list((tmp_path / "panther_factors").glob("*.pt"))) == 2


def test_module_called_twice_shares_its_factors():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch._dynamo.reset()
    graphs, reports = [], []
    m = Twice().eval()
    compiled = torch.compile(m, backend=capturing_backend(graphs, policy={"fc": SketchSpec(low_rank=16, init="svd")},
                                                          report=reports.append))
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)  # full rank: exact
    assert [(r.name, r.replaced) for r in reports[0].rows] == [("fc", True), ("fc#1", True)]
    assert len(dict(graphs[0].named_buffers())) == 4  # one set of factors for both calls
    fc = reports[0].rows[0]  # and the totals count the layer's parameters once, before and after
    assert reports[0].totals["params_before"] == fc.params_before == 16 * 16 + 16
    assert reports[0].totals["params_after"] == fc.params_after


class TiedHead(nn.Module):
    """A language-model head tied to the embedding: the head applies ``emb.weight``. The same Linear is also
    registered a second time (``alias``), as a shared module is."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.body = nn.Linear(24, 24)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.emb.weight
        self.alias = self.body

    def forward(self, ids):
        return self.head(torch.relu(self.alias(self.body(self.emb(ids)))))


@pytest.mark.parametrize("spec", ["skip", SketchSpec(low_rank=4, init="sketch", seed=3)])
def test_tied_head_is_named_after_the_layer_that_applies_it(spec):
    # The weight's owner is `emb`, but the layer is `head`, as convert names it: an override of "head" takes
    # effect and a seeded spec draws the same numbers on both paths. A module registered twice keeps its
    # first name ("body", "body#1"), not its alias.
    torch.manual_seed(0)
    m = TiedHead().eval()
    policy = {"body": "skip", "head": spec}
    torch._dynamo.reset()
    compiled, reports = compile_panther(m, policy=policy)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        y = compiled(ids)
    assert [r.name for r in reports[0].rows] == ["body", "body#1", "head"]
    head = reports[0].row("head")
    if spec == "skip":
        assert not head.replaced and "skip" in head.reason
        torch.testing.assert_close(y, m(ids))
        return
    assert head.replaced
    with pytest.warns(UserWarning, match="tie is broken"):
        converted, _ = panther.convert(copy.deepcopy(m), policy)
    with torch.no_grad():
        torch.testing.assert_close(y, converted(ids), rtol=1e-4, atol=1e-5)
        assert rel(y, m(ids)) > 1e-3


def test_layers_after_a_graph_break_inside_a_submodule_keep_their_full_names():
    """A graph break inside ``inner``'s forward makes Dynamo compile ``inner``'s frame on its own, with
    ``L['self']`` = ``inner``: the report still names its layers by their path in the compiled model, so an
    exact-name policy entry matches them."""
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.inner = nn.Linear(16, 16), Inner()

        def forward(self, x):
            return self.inner(self.pre(x))

    torch._dynamo.reset()
    reports = []
    policy = {"inner.b": SketchSpec(num_terms=1, low_rank=2, init="svd")}
    model = torch.compile(Root().eval(), backend=panther_backend,
                          options={"compiler": "aot_eager", "report": reports.append, "policy": policy})
    with torch.no_grad():
        model(torch.randn(4, 16))
    rows = {r.name: r for rep in reports for r in rep.rows}
    assert set(rows) == {"pre", "inner.a", "inner.b"}, rows
    assert [n for n, r in rows.items() if r.replaced] == ["inner.b"]


def test_a_rank_beyond_the_layer_is_applied_and_said():
    # the policy asked for it: done, with SKLinear's warning and a note on the row
    torch._dynamo.reset()
    compiled, reports = compile_panther(nn.Sequential(nn.Linear(64, 64)).eval(),
                                        policy={"linear": SketchSpec(low_rank=1000)})
    with pytest.warns(UserWarning, match=r"panther: 0 holds more parameters than the dense layer \(256064 > 4160\)"):
        with torch.no_grad():
            compiled(torch.randn(2, 64))
    row = reports[0].row("0")
    assert row.replaced and row.params_after == 256064 and "a smaller rank would be cheaper" in row.reason


def test_a_policy_entry_that_matches_no_layer_is_warned_about():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    compiled, reports = compile_panther(model, policy={"Linear": SketchSpec(low_rank=2), "1": "skip", "0": "skip"},
                                        overrides={"2": "skip", "3": "skip"})
    with pytest.warns(UserWarning) as caught:
        with torch.no_grad():
            compiled(torch.randn(2, 16))
    said = [str(w.message) for w in caught if "match no layer" in str(w.message)]
    # 'Linear' is not the kind 'linear'; module '1' is the ReLU, not a candidate; '3' does not exist
    assert len(said) == 2
    assert "options['policy'] entries that match no layer of this graph: ['Linear', '1']" in said[0]
    assert "options['overrides'] entries that match no layer of this graph: ['3']" in said[1]
    assert not reports[0].replaced
