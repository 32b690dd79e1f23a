"""inductor_ext: the decompositions match the ops, and Inductor turns sketched layers into fused GEMMs."""
import pytest
import torch
from torch import nn

from inductor_ext import panther_decompositions
from inductor_ext.decompositions import sketched_linear_fwd_decomposition
from panther.policy import SketchSpec


@pytest.mark.parametrize("lead, bias", [((5,), True), ((2, 3), False)])
def test_linear_decomposition_matches_op(lead, bias):
    g = torch.Generator().manual_seed(0)
    L, d_in, k, d_out = 2, 7, 3, 5
    args = [torch.randn(*lead, d_in, generator=g), torch.randn(L, d_in, k, generator=g),
            torch.randn(L, k, d_out, generator=g), torch.randn(L, k, d_out, generator=g),
            torch.randn(L, d_in, k, generator=g), torch.randn(d_out, generator=g) if bias else None]
    y, xA = torch.ops.panther.sketched_linear_fwd(*args)
    y2, xA2 = sketched_linear_fwd_decomposition(*args)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(xA2, xA)


def test_table_scoped_to_present_ops():
    table = panther_decompositions()
    assert torch.ops.panther.sketched_linear_fwd.default in table
    # Scoped: the global Inductor table is not modified.
    from torch._inductor.decomposition import decompositions

    assert torch.ops.panther.sketched_linear_fwd.default not in decompositions


def test_inductor_compile_fuses_sketched_linear():
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    reports = []
    c = torch.compile(m, backend=panther_backend,
                      options={"policy": {"0": SketchSpec(low_rank=32, init="svd")}, "report": reports.append})
    x = torch.randn(4, 32)
    with torch.no_grad():
        y, (code,) = run_and_get_code(c, x)
        torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-5)  # full rank: equals the dense model
    assert reports[0].row("0").replaced
    # Decomposed into GEMMs (bias folded into addmm); no opaque call to the custom op remains.
    assert "torch.ops.panther" not in code
    assert code.count("extern_kernels.mm") + code.count("extern_kernels.addmm") >= 3


@pytest.mark.parametrize("stride, padding, dilation, bias", [([1, 1], [1, 1], [1, 1], True), ([2, 1], [0, 2], [1, 2], False)])
def test_conv_decomposition_matches_op(stride, padding, dilation, bias):
    from inductor_ext.decompositions import sketched_conv2d_decomposition

    g = torch.Generator().manual_seed(0)
    L, k, C_in, C_out = 2, 3, 4, 5
    x = torch.randn(2, C_in, 9, 8, generator=g)
    S1s = torch.randn(2 * L * k, C_in, 3, 3, generator=g)
    U1s = torch.randn(2 * L, k, C_out, generator=g)
    b = torch.randn(C_out, generator=g) if bias else None
    ref = torch.ops.panther.sketched_conv2d(x, S1s, U1s, b, stride, padding, dilation)
    torch.testing.assert_close(sketched_conv2d_decomposition(x, S1s, U1s, b, stride, padding, dilation), ref)
    assert torch.ops.panther.sketched_conv2d.default in panther_decompositions()


def test_decompose_option_is_honoured_with_warm_caches(tmp_path, monkeypatch):
    """AOTAutograd's cache does not key on the decomposition table: a graph compiled once with panther's
    decompositions and once without must still get its own code (the backend tags each compile's cache
    key with the table it used). A fresh cache directory: entries an older panther wrote are not this
    test's subject."""
    from torch._inductor.utils import run_and_get_code

    from panther.backend import panther_backend
    from panther.nn import SKLinear

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    layer = SKLinear(64, 48, 1, 4, seed=0)
    x = torch.randn(8, 64)
    seen = []
    with torch._inductor.config.patch(fx_graph_cache=True), \
            torch._functorch.config.patch(enable_autograd_cache=True), torch.no_grad():
        for options in ({"decompose": False}, {}, {"decompose": False}):
            torch._dynamo.reset()
            net = torch.compile(layer, backend=panther_backend, options=options)
            y, (code,) = run_and_get_code(net, x)
            torch.testing.assert_close(y, layer(x))
            seen.append("torch.ops.panther.sketched_linear" in code)
    assert seen == [True, False, True]   # opaque op, decomposed GEMMs, opaque op


@pytest.mark.parametrize("device, gemms", [("cuda", 2), ("cpu", 4)])
def test_linear_decomposition_gemms_by_device(device, gemms):
    """On CUDA the decomposition is the op's two GEMMs over the concatenated factors (x read once, y
    written once); on CPU four GEMMs on the separate factors (no concatenation kernel to compile).
    Traced with fake tensors, so the CUDA branch is checked without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    L, d_in, k, d_out = 2, 7, 3, 5
    with FakeTensorMode():
        args = [torch.empty(4, d_in, device=device), torch.empty(L, d_in, k, device=device),
                torch.empty(L, k, d_out, device=device), torch.empty(L, k, d_out, device=device),
                torch.empty(L, d_in, k, device=device), torch.empty(d_out, device=device)]
        gm = make_fx(sketched_linear_fwd_decomposition)(*args)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(t in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) for t in targets) == gemms
