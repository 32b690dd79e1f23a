"""The documentation site (docs/, ``make docs``): it builds with warnings as errors, its API reference
documents every public name (each module's ``__all__``), every backend option is described, and the code
of the how-to pages that promise to run does run."""
import importlib
import inspect
import pathlib
import pkgutil
import posixpath
import re
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")

import panther  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Modules documented by name in docs/api/: every name in their __all__ must be in the reference under
# the module's own name (or, for a re-exported class/function, wherever that object is documented).
DOCUMENTED = [
    "panther.nn",
    "panther.sketch",
    "panther.ops",
    "panther.policy",
    "panther.attention_error",
    "panther.report",
    "panther.conversion",
    "panther.budget",
    "panther.backend",
    "panther.bench",
    "panther.demo",
]
# How-to pages whose python blocks run verbatim, in order, in one namespace (they say so). Blocks that call
# torch.compile are left out to keep this file fast; tests/test_convert.py compiles converted models.
RUNNABLE_PAGES = ["explicit-layers.md", "convert.md"]
# Pages whose blocks all run, torch.compile included (small models), given what they need installed.
COMPILED_PAGES = {"huggingface.md": "transformers"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One build of the whole site, warnings as errors (the same command as ``make docs``)."""
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc, out / "html"


@pytest.fixture(scope="module")
def documented(site):
    """(names, ids): the Python objects in the site's inventory, by name and by identity."""
    from sphinx.util.inventory import InventoryFile

    proc, html = site
    if proc.returncode != 0:
        pytest.fail("the docs did not build; see test_site_builds_without_warnings")
    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    names = {name for kind, entries in inventory.items() if kind.startswith("py:") for name in entries}
    ids = set()
    for name in names:
        obj = _resolve(name)
        if obj is not None and _is_code(obj):
            ids.add(id(obj))
    return names, ids


def _resolve(dotted):
    """The object a dotted name documents (None if it is not importable)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _is_code(obj):
    return inspect.isclass(obj) or inspect.isroutine(obj)


def _is_documented(module, name, documented):
    names, ids = documented
    obj = getattr(module, name)
    return f"{module.__name__}.{name}" in names or (_is_code(obj) and id(obj) in ids)


def _panther_modules():
    """Every importable module of the panther package (private ones and ``__main__`` excluded)."""
    out = [panther]
    for info in pkgutil.walk_packages(panther.__path__, "panther."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(importlib.import_module(info.name))
    return out


def test_site_builds_without_warnings(site):
    proc, html = site
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "WARNING" not in proc.stderr, proc.stderr[-6000:]
    pages = [p.relative_to(DOCS).with_suffix(".html") for p in DOCS.rglob("*")
             if p.suffix in (".md", ".rst") and "_build" not in p.parts]
    assert len(pages) >= 10
    for page in pages:
        assert (html / page).is_file(), page


@pytest.mark.parametrize("modname", DOCUMENTED)
def test_every_public_name_is_in_the_reference(modname, documented):
    module = importlib.import_module(modname)
    public = getattr(module, "__all__", None)
    assert public, f"{modname} has no __all__: the reference documents exactly that list"
    missing = [name for name in public if not _is_documented(module, name, documented)]
    assert not missing, f"{modname}: public names missing from the API reference: {missing}"


def test_every_public_module_is_covered(documented):
    """A new module with an ``__all__`` must get an API page (or be part of a documented package whose
    ``__all__`` re-exports its classes and functions)."""
    _, ids = documented
    problems = []
    for module in _panther_modules():
        public = getattr(module, "__all__", None)
        if public is None or module.__name__ in DOCUMENTED:
            continue
        if not any(module.__name__.startswith(pkg + ".") for pkg in DOCUMENTED):
            problems.append(f"{module.__name__}: not in the API reference (add it to docs/api/ and DOCUMENTED)")
            continue
        for name in public:
            obj = getattr(module, name)
            if _is_code(obj) and id(obj) not in ids:
                problems.append(f"{module.__name__}.{name}: not documented")
    assert not problems, "\n".join(problems)


def test_every_backend_option_is_documented(site):
    from panther.backend import OPTIONS, panther_backend

    doc = inspect.getdoc(panther_backend)
    described = re.findall(r"^``(\w+)`` \(default ", doc, flags=re.M)
    assert sorted(described) == sorted(OPTIONS), "panther_backend's option list and OPTIONS disagree"
    page = (site[1] / "api" / "backend.html").read_text()
    for key in OPTIONS:
        assert re.search(rf"<span class=\"pre\">{key}</span>", page), f"option {key!r} not on the backend page"


def _python_blocks(page):
    text = (DOCS / page).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture
def one_thread():
    """The examples are tiny; a multi-threaded LAPACK SVD on a busy shared machine is ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("page", RUNNABLE_PAGES + list(COMPILED_PAGES))
def test_howto_examples_run(page, capsys, one_thread):
    if page in COMPILED_PAGES:
        pytest.importorskip(COMPILED_PAGES[page])
    blocks = _python_blocks(page)
    assert blocks, page
    namespace = {"__name__": f"docs_{page}"}
    for i, code in enumerate(blocks):
        if "torch.compile(" in code and page not in COMPILED_PAGES:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
        out = capsys.readouterr().out
        # what trailing comments promise, e.g.  print(y.shape)  # (64, 256)   or   print(torch.equal(..))  # True
        for line in code.splitlines():
            shape = re.match(r"\s*print\(.*\)\s+# \(([\d, ]+)\)", line)
            if shape:
                assert f"torch.Size([{shape.group(1)}])" in out, (page, i, line, out)
            if re.match(r"\s*print\(.*\)\s+# True", line):
                assert "True" in out and "False" not in out, (page, i, line, out)
            word = re.match(r"\s*print\(.*\)\s+# ([A-Za-z_]\w*)$", line)
            if word:
                assert word.group(1) in out, (page, i, line, out)
