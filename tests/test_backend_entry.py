"""The backend is found by name through its entry point, in a fresh interpreter, without importing panther."""
import importlib.metadata
import os
import subprocess
import sys


HAS_ENTRY_POINT = any(ep.name == "panther" for ep in importlib.metadata.entry_points(group="torch_dynamo_backends"))

SCRIPT = r"""
import sys, torch
from torch import nn
assert "panther" not in sys.modules
assert "panther" in torch._dynamo.list_backends(exclude_tags=())
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
seen = []
c = torch.compile(m, backend="panther", options={"compiler": "aot_eager", "report": seen.append})
x = torch.randn(3, 64)
with torch.no_grad():
    y = c(x)
import panther  # loaded by the entry point during torch.compile
assert panther.last_report() is seen[0]
# default policy: 64x64 halves at rank 8 -> replaced; 64->4 is too small -> dense
print([(r.name, r.replaced) for r in seen[0].rows])
assert [(r.name, r.replaced) for r in seen[0].rows] == [("0", True), ("2", False)], seen[0]
assert y.shape == (3, 4)
# the entry point loaded the backend before Dynamo traced: an encoder left to detect its causal mask is one graph
from panther.policy import SketchSpec
enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1,
                            enable_nested_tensor=False).eval()
seen.clear()
c = torch.compile(lambda t: enc(t, mask=nn.Transformer.generate_square_subsequent_mask(t.shape[1])),
                  backend="panther", options={"compiler": "aot_eager", "report": seen.append,
                                              "policy": {"attention": SketchSpec(num_random_features=16)}})
with torch.no_grad():
    c(torch.randn(2, 9, 32))
assert len(seen) == 1 and seen[0].graph_break is None, seen
assert [r.replaced for r in seen[0].rows if r.kind == "attention"] == [True], seen[0]
"""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared_entry_point():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["torch_dynamo_backends"]["panther"]


def test_pyproject_declares_the_backend():
    assert _declared_entry_point() == "panther.backend:panther_backend"


def test_backend_by_name_in_fresh_process(tmp_path):
    env = dict(os.environ)
    path = [ROOT]
    if not HAS_ENTRY_POINT:
        # Not pip-installed here: expose pyproject's entry point through a minimal dist-info on the path,
        # which is exactly what `pip install -e .` writes.
        dist = tmp_path / "panther-0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: panther\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text(f"[torch_dynamo_backends]\npanther = {_declared_entry_point()}\n")
        path.append(str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_backend_module_never_registers_itself():
    # Registering by name in the module the entry point loads would make Dynamo's lazy load fail
    # with "duplicate name: panther".
    import panther.backend as backend

    src = open(backend.__file__).read()
    assert "register_backend(" not in src
