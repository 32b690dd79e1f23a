"""Pictures of graph diff reports (GraphDiffReport.to_png / to_svg): what is drawn and that it is drawn.

One small aot_eager compile (no Inductor) and one panther.convert, shared by the tests."""
import sys

import pytest
import torch
from torch import nn

import panther
from panther import demo
from panther._report_plot import COLORS, figure_size, picture_graph
from panther.backend import panther_backend
from panther.policy import SketchSpec
from panther.report import GraphDiffReport

image = pytest.importorskip("matplotlib.image")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 40)
        self.head = nn.Linear(40, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x)).view(x.shape[0], 2, 24).transpose(1, 2).reshape(x.shape[0], 48)
        return self.head(torch.tanh(self.fc2(h)))


POLICY = {"fc*": SketchSpec(num_terms=1, low_rank=4, init="svd"), "head": "skip"}


@pytest.fixture(scope="module")
def compiled_report():
    torch.manual_seed(0)
    model = Net().eval()
    reports = []
    torch._dynamo.reset()
    c = torch.compile(model, backend=panther_backend,
                      options={"compiler": "aot_eager", "policy": POLICY, "report": reports.append})
    with torch.no_grad():
        c(torch.randn(3, 32))
    (report,) = reports
    return report


@pytest.fixture(scope="module")
def converted_report():
    torch.manual_seed(0)
    model = nn.Sequential(Net(), nn.Sequential(nn.ReLU(), nn.Linear(6, 6)))
    _, report = panther.convert(model, POLICY, example_inputs=torch.randn(3, 32))
    return report


def _check_picture(path, height, width):
    pixels = image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    rgb = pixels[..., :3]
    assert rgb.std() > 0.02  # not blank
    return rgb


def test_report_carries_the_graph_before_rewriting(compiled_report):
    G = compiled_report.graph
    layers = {a["layer"] for _, a in G.nodes(data=True) if "layer" in a}
    assert layers == {r.name for r in compiled_report.rows} == {"fc1", "fc2", "head"}
    params = {a["label"] for _, a in G.nodes(data=True) if a["role"] == "param"}
    assert {"fc1.weight", "fc1.bias", "head.weight"} <= params
    assert any(a["role"] == "shape" and a["label"] in ("view", "transpose") for _, a in G.nodes(data=True))
    assert [a["role"] for _, a in G.nodes(data=True)].count("output") == 1
    # plain data: the report keeps no fx nodes or tensors alive, and the graph stays out of as_dict/==
    assert all(isinstance(n, str) for n in G.nodes)
    assert "graph" not in compiled_report.as_dict()
    assert compiled_report == GraphDiffReport(rows=compiled_report.rows, source="compile",
                                              graph_id=compiled_report.graph_id)


def test_picture_graph_hides_trivial_nodes(compiled_report):
    G, note = picture_graph(compiled_report)
    roles = {a["role"] for _, a in G.nodes(data=True)}
    assert roles == {"input", "op", "output"} and "not drawn" in note
    labels = {a["label"] for _, a in G.nodes(data=True)}
    assert {"relu", "tanh"} <= labels and not labels & {"view", "transpose", "reshape"}
    # the data flow survives the contraction: input -> fc1 -> relu -> fc2 -> tanh -> head -> output
    import networkx as nx

    order = [G.nodes[n]["label"] for n in nx.topological_sort(G)]
    assert [x for x in order if x in ("relu", "tanh")] == ["relu", "tanh"]
    small, note = picture_graph(compiled_report, max_nodes=4)
    assert {a["role"] for _, a in small.nodes(data=True)} == {"input", "op", "output"}
    assert small.number_of_nodes() == 5 and "only inputs, candidate layers and outputs" in note


def test_to_png_pixel_size_and_colours(compiled_report, tmp_path):
    path = compiled_report.to_png(tmp_path / "g.png", dpi=50, figsize=(8, 6))
    rgb = _check_picture(path, 300, 400)
    # both kinds of candidate boxes are there: the replaced (green) and the kept (orange) face colours
    for kind in ("replaced", "kept"):
        face = torch.tensor([int(COLORS[kind][0][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        close = (torch.from_numpy(rgb.copy()) - face).abs().amax(-1) < 0.02
        assert close.sum() > 50, kind


def test_to_png_automatic_size(compiled_report, tmp_path):
    w, h = figure_size(compiled_report)
    assert 6 <= w <= 24 and 4 <= h <= 32
    path = compiled_report.to_png(tmp_path / "auto.png", dpi=40)
    _check_picture(path, round(h * 40), round(w * 40))


def test_to_svg(compiled_report, tmp_path):
    path = compiled_report.to_svg(tmp_path / "g.svg")
    text = open(path).read()
    assert "<svg" in text and "fc1" in text and "kept: policy: 'skip'" in text


def test_convert_report_draws_its_module_tree(converted_report, tmp_path):
    G = converted_report.graph
    assert G.graph["kind"] == "modules"
    assert {"0.fc1", "0.fc2", "0.head", "1.1"} == {a["layer"] for _, a in G.nodes(data=True) if "layer" in a}
    assert set(G.successors("")) == {"0", "1"} and "1.0" not in G  # the ReLU is no candidate: not drawn
    _check_picture(converted_report.to_png(tmp_path / "tree.png", dpi=30, figsize=(10, 5)), 150, 300)


def test_errors(compiled_report, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no graph"):
        GraphDiffReport(rows=compiled_report.rows).to_png(tmp_path / "x.png")
    with pytest.raises(ValueError, match="figsize"):
        compiled_report.to_png(tmp_path / "x.png", figsize=(0, 3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'panther\[plot\]'"):
        compiled_report.to_png(tmp_path / "x.png")


def test_demo_writes_the_picture(compiled_report, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo._write_report_picture(compiled_report, "panther-report.png") == "panther-report.png"
    assert str(tmp_path / "panther-report.png") in capsys.readouterr().out
    _check_picture(tmp_path / "panther-report.png", *[round(v * 100) for v in reversed(figure_size(compiled_report))])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no matplotlib: a note, the demo goes on
    assert demo._write_report_picture(compiled_report, "again.png") is None
    assert "panther[plot]" in capsys.readouterr().out and not (tmp_path / "again.png").exists()
