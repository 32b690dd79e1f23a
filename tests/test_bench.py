"""The benchmark harness: its reference implementations compute the same function as panther's ops,
and every subcommand runs (tiny sizes; timings themselves are never asserted)."""
import pytest
import torch

import panther
from panther import bench


def test_per_term_bmm_reference_equals_the_op():
    layer = panther.nn.SKLinear(24, 16, 2, 3)
    x = torch.randn(5, 24)
    args = (layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias)
    torch.testing.assert_close(bench.per_term_bmm(x, *args), layer(x))


def test_per_token_causal_reference_equals_the_op():
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) * 0.35 for _ in range(3))
    P = panther.sketch.orthogonal_random_features(32, 16, dtype=torch.float64)
    torch.testing.assert_close(bench._per_token_causal(q, k, v, P),
                               torch.ops.panther.rf_attention(q, k, v, P, "softmax", True, None, None))


def test_subcommands_run(capsys):
    tiny = ["--repeats", "1", "--batch", "2", "--no-malloc-tuning"]  # keep the test process allocator as is
    bench.main(["linear", "--in-features", "32", "--out-features", "16", "--low-rank", "2", *tiny])
    bench.main(["linear", "--backward", "--in-features", "32", "--out-features", "16", "--low-rank", "2", *tiny])
    bench.main(["attention", "--seq", "16", *tiny])
    out = capsys.readouterr().out
    assert out.count("panther SKLinear") == 2 and "panther rf_attention" in out


def test_decode_bench_keeps_a_state_instead_of_the_cache():
    torch._dynamo.reset()
    rows, headers = bench.bench_decode(context=32, batch=2, embed=16, heads=2, num_features=8, layers=2, repeats=1)
    assert [r[0] for r in rows] == ["exact: KV cache + SDPA", "panther: RandAttentionState",
                                    "panther: RandAttentionState, torch.compile"]
    held = {r[0]: float(r[headers.index("MiB kept of the past")]) * 2 ** 20 for r in rows}
    err = {r[0]: float(r[headers.index("rel. error vs exact")]) for r in rows}
    # per layer, k and v: (B, H, L+1, d) against kv, k_sum, shift: (B, H, m, d), (B, H, m), (B, H, 1, 1)
    assert held["exact: KV cache + SDPA"] == pytest.approx(2 * 2 * 2 * 2 * 33 * 8 * 4, rel=1e-2)
    assert held["panther: RandAttentionState"] == pytest.approx(2 * 2 * 2 * (8 * 8 + 8 + 1) * 4, rel=1e-2)
    assert err["exact: KV cache + SDPA"] == 0 and 0 < err["panther: RandAttentionState"] < 2
    assert err["panther: RandAttentionState, torch.compile"] == pytest.approx(err["panther: RandAttentionState"],
                                                                            rel=1e-3)


def test_attention_bench_times_flex_attention_beside_sdpa():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from panther.report import last_report

    torch._dynamo.reset()
    rows, _ = bench.bench_attention(seq=128, batch=1, heads=2, head_dim=16, num_features=16, causal=True,
                                    repeats=1, flex=True)
    assert [r[0] for r in rows] == ["SDPA (exact)", "panther rf_attention", "flex_attention, torch.compile",
                                    'flex_attention, backend="panther"']
    (row,) = last_report().rows
    assert row.replaced and (row.op_before, row.op_after) == ("flex_attention", "panther.rf_attention")


def test_markdown_sections_are_written_and_replaced(tmp_path, capsys):
    """--markdown FILE puts the table into FILE under its command: the same command again replaces
    its section, another command adds its own, and the rest of the page is kept."""
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nhand-written text\n")
    tiny = ["linear", "--in-features", "32", "--out-features", "16", "--low-rank", "2", "--repeats", "1",
            "--batch", "2", "--no-malloc-tuning"]
    bench.main([*tiny, "--markdown", str(page)])
    first = page.read_text()
    bench.main([*tiny, "--markdown", str(page)])
    bench.main(["attention", "--seq", "16", "--repeats", "1", "--batch", "2", "--no-malloc-tuning",
                "--markdown", str(page)])
    text = page.read_text()
    cmd = "python -m panther bench " + " ".join(tiny)
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    assert text.count(f"<!-- bench: {cmd} -->") == 1 and text.count("<!-- bench: ") == 2
    assert text.count("| panther SKLinear") == 1 and "| panther rf_attention" in text
    assert f"`{cmd}` (CPU" in first and "--markdown" not in text
    # rows as dicts (what the Triton benchmarks return), into a new file
    section = bench.write_markdown(tmp_path / "new.md", "cmd", "title", [{"case": "a", "ms": 1.5}])
    assert "| case" in section and "| a" in section and (tmp_path / "new.md").read_text().endswith(
        "<!-- /bench: cmd -->\n")
    # the title nests one level below the heading it lands under (code fences are not headings)
    assert "\n## title\n" in section
    nested = tmp_path / "nested.md"
    nested.write_text("# B\n\n## GPU\n\n### Conv\n\n```bash\n# a comment, not a heading\n```\n")
    assert "\n#### t\n" in bench.write_markdown(nested, "c1", "t", [{"a": 1}])
    nested.write_text(nested.read_text() + "\n## CPU\n")
    assert "\n### u\n" in bench.write_markdown(nested, "c2", "u", [{"a": 1}])   # appended after the H2
    assert "\n#### t\n" in bench.write_markdown(nested, "c1", "t", [{"a": 2}])  # replaced in place
    # a section right after another one is its sibling, also when it is replaced
    sib = tmp_path / "siblings.md"
    sib.write_text("# B\n\n### Attention\n")
    for _ in range(2):
        assert "\n#### t\n" in bench.write_markdown(sib, "c1", "t", [{"a": 1}])
        assert "\n#### v\n" in bench.write_markdown(sib, "c3", "v", [{"a": 1}])


def test_train_bench_batches_are_the_same_global_batch_for_any_world_size():
    from panther.train_bench import batch

    whole = batch(3, 4, 8, 100, 0, 1, "cpu")
    halves = [batch(3, 4, 8, 100, r, 2, "cpu") for r in range(2)]
    for i in range(2):
        torch.testing.assert_close(torch.cat([h[i] for h in halves]), whole[i])


def test_train_bench_compare_table(tmp_path, capsys):
    import json

    from panther.train_bench import compare

    run = dict(mode="ddp", dense=False, low_rank=64)
    runs = [dict(run, gpus=1, global_batch=16, tokens_per_s=100.0, losses=[2.0, 1.0]),
            dict(run, gpus=2, global_batch=16, tokens_per_s=120.0, losses=[2.0, 1.001]),
            dict(run, gpus=2, global_batch=32, tokens_per_s=190.0, losses=[2.0, 0.9])]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    compare(str(path))
    out = capsys.readouterr().out
    assert "1.90x" in out and "1.00e-03" in out and "1.20x" not in out  # speed-up only at equal batch/GPU


# ---------------------------------------------------------------------------------------------------
# --plot: a size sweep, dense vs sketched, drawn with matplotlib (tiny sizes, one repeat)


def test_plot_sweep_writes_the_figure_and_prints_its_table(tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "linear.png"
    assert bench.main(["linear", "--plot", str(path), "--sizes", "16,32", "--batch", "4", "--low-rank", "2",
                       "--repeats", "1", "--no-malloc-tuning"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["16"], ["32"])]
    assert [row[0] for row in table] == ["16", "32"]  # one line per size, dense and sketched side by side
    assert "nn.Linear (dense) ms" in out and "panther SKLinear (L=1, k=2) ms" in out and str(path) in out
    pixels = image.imread(str(path))
    assert pixels.shape[:2] == (500, 1200)  # figsize (12, 5) inches at 100 dpi
    assert pixels[..., :3].std() > 0.01  # something was drawn


def test_sweep_rows_and_memory():
    result = bench.sweep("attention", [8, 16], repeats=1)
    assert [(r["size"], r["impl"]) for r in result["rows"]] == [
        (8, "SDPA (exact)"), (8, "panther rf_attention (m=256)"), (16, "SDPA (exact)"),
        (16, "panther rf_attention (m=256)")]
    q_bytes = 16 * 8 * 64 * 4  # heads * seq * head_dim * fp32, batch 1
    for r in result["rows"]:
        assert r["ms"] > 0 and r["mem_bytes"] >= 3 * q_bytes * r["size"] // 8  # at least q, k, v
    assert result["memory"] in bench.MEMORY_LABELS


def test_resident_peak_measures_an_allocation():
    peak = bench._ResidentPeak()
    if not peak.available:
        pytest.skip("no /proc/self/clear_refs or malloc_trim here")
    n = 8 << 20
    peak(lambda: torch.ones(n // 4))          # the first call also pays one-time allocations (1.5 MiB here)
    extra = peak(lambda: torch.ones(n // 4))  # 8 MiB, touched
    assert n <= extra < n + (1 << 20)
    assert peak(lambda: None) < (1 << 20)


def test_plot_errors(tmp_path, monkeypatch, capsys):
    import sys

    with pytest.raises(SystemExit):
        bench.main(["linear", "--sizes", "16"])  # --sizes needs --plot
    for what in ("causal-scaling", "transformer"):
        with pytest.raises(SystemExit):
            bench.main([what, "--plot", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        bench.main(["linear", "--plot", str(tmp_path / "x.png"), "--sizes", "16,-2"])
    assert "--sizes needs --plot" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a clear usage error, not a traceback from inside torch.cuda
        for argv in (["linear", "--device", "cuda"], ["conv2d", "--device", "cuda", "--plot", str(tmp_path / "x.png")]):
            with pytest.raises(SystemExit):
                bench.main(argv)
            assert "--device cuda: no CUDA device available" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'panther\[plot\]'"):
        bench.main(["linear", "--plot", str(tmp_path / "x.png"), "--sizes", "16"])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, said", [
    (["linear", "--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    (["linear", "--low-rank", "-3"], "argument --low-rank: expected a positive integer"),
    (["conv2d", "--backward"], "--backward times linear and attention only, not conv2d"),
    (["linear", "--layers", "2"], "--layers is for decode only"),
    (["linear", "--markdown", "/no/such/folder/x.md"], "--markdown: no such folder '/no/such/folder'"),
    (["linear", "--plot", "/no/such/folder/x.png", "--sizes", "16"], "--plot: no such folder"),
])
def test_bad_flags_are_usage_errors_before_any_run(argv, said, capsys):
    # a value the run cannot use (0 once meant "the default"), a flag the command would ignore, a file it could not
    # write after the whole run: each is argparse's error naming the flag, before anything is timed
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert said in capsys.readouterr().err


def test_plot_file_type_is_checked_before_the_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit):
        bench.main(["linear", "--plot", str(tmp_path / "x.txt"), "--sizes", "16"])
    assert "--plot: FILE must end in one of" in capsys.readouterr().err


def test_graph_timer_says_why_a_call_was_not_captured(monkeypatch):
    """A call that cannot be captured gets no CUDA-graph time and a warning naming the failure (the fp32
    linear's blank once hid a capture bug). CPU: the CUDA calls are stubbed."""
    triton_testing = pytest.importorskip("triton.testing")
    from inductor_ext import _timing

    def refuse(fn, **kw):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton_testing, "do_bench_cudagraph", refuse)
    calls = []
    with pytest.warns(UserWarning, match="RuntimeError: operation not permitted when stream is capturing$"):
        assert _timing.graph_median_ms(lambda: calls.append(1)) is None
    assert calls == [1]   # the warm-up call ran


def test_back_to_back_timer_times_calls_in_a_row():
    """Per call of a batch of back-to-back calls: warm-up, then ``repeats`` batches of ``calls``."""
    import time

    calls = []

    def sleep_2ms():
        calls.append(1)
        time.sleep(0.002)

    ms = bench.back_to_back_time_fn(sleep_2ms, calls=4, repeats=3, warmup=2)
    assert len(calls) == 2 + 4 * 3
    assert 2.0 <= ms < 20.0


def test_timed_table_puts_each_timer_in_its_columns(monkeypatch):
    """On CUDA every row gets three times, each with its ratio to panther's row in the same column, and
    the floor row goes into every column (the CUDA timers are stubbed: each returns its own scale)."""
    scale = {"median": 1.0, "back": 2.0, "graph": 4.0}
    monkeypatch.setattr(bench, "time_fn", lambda fn, **kw: scale["median"] * fn())
    monkeypatch.setattr(bench, "back_to_back_time_fn", lambda fn, **kw: scale["back"] * fn())
    monkeypatch.setattr(bench, "graph_time_fn", lambda fn, **kw: scale["graph"] * fn())
    rows, headers = bench._timed_table({"dense": lambda: 3.0, "ours": lambda: 0.5}, "ours", repeats=4,
                                       device="cuda", floor=("floor", 0.25), graph=True)
    assert headers == ["implementation", "median ms", "time / panther", "back-to-back ms",
                       "time / panther (back-to-back)", "CUDA-graph ms", "time / panther (CUDA-graph)"]
    assert rows == [["dense", "3.000", "6.00x", "6.000", "6.00x", "12.000", "6.00x"],
                    ["ours", "0.500", "1.00x", "1.000", "1.00x", "2.000", "1.00x"],
                    ["floor", "0.250", "0.50x", "0.250", "0.25x", "0.250", "0.12x"]]
    rows, headers = bench._timed_table({"ours": lambda: 0.5}, "ours", repeats=4, device="cpu")
    assert headers == ["implementation", "median ms", "time / panther"] and rows == [["ours", "0.500", "1.00x"]]


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
def test_transformer_bench_rows_errors_and_report(causal):
    rng = torch.get_rng_state()
    rows, headers, report = bench.bench_transformer(d_model=32, heads=2, layers=1, seq=64, batch=2, low_rank=4,
                                                    num_features=16, repeats=1, compiler="aot_eager", causal=causal)
    assert torch.equal(rng, torch.get_rng_state())  # fixed draws, the caller's RNG untouched
    unfused = ["dense, eager, unfused layers (SDPA is_causal)",
               "dense, torch.compile (aot_eager), unfused layers"] if causal else []
    assert [r[0] for r in rows] == ["dense, eager", "dense, torch.compile (aot_eager)", *unfused, 'backend="panther"']
    assert headers[-1] == "rel. error vs dense eager"
    errors = [float(r[-1]) for r in rows]
    # exact attention's paths agree; rank 8 of 32 really approximates
    assert errors[0] == 0 and max(errors[1:-1]) < 1e-4 and 0.01 < errors[-1] < 2
    assert torch.backends.mha.get_fastpath_enabled()  # turned off for the unfused row only
    prefix = "encoder." if causal else ""  # the causal model wraps the encoder to build its mask
    assert [r.name for r in report.replaced] == [prefix + n for n in ("layers.0.self_attn", "layers.0.linear1",
                                                                     "layers.0.linear2")]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_llama_bench_rows_errors_and_report(attention):
    pytest.importorskip("transformers")
    rng = torch.get_rng_state()
    rows, headers, report = bench.bench_llama(hidden=32, heads=4, kv_heads=2, layers=1, seq=32, batch=2, low_rank=4,
                                              num_features=16, vocab=64, repeats=1, compiler="aot_eager",
                                              attention=attention)
    assert torch.equal(rng, torch.get_rng_state())
    assert [r[0] for r in rows] == ["dense, eager", "dense, torch.compile (aot_eager)", 'backend="panther"']
    errors = [float(r[-1]) for r in rows]
    assert errors[0] == 0 and errors[1] < 1e-5 and 0.01 < errors[2] < 2
    # every projection and the (grouped-query, padded) attention; lm_head stays dense
    assert {r.name for r in report.replaced} == {f"model.layers.0.{p}" for p in (
        "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert report.row("lm_head").reason == "no policy entry matches this layer"


def test_layer_benches_leave_the_global_rng_alone():
    rng = torch.get_rng_state()
    bench.bench_linear(64, 64, batch=8, low_rank=4, repeats=1)
    bench.bench_conv2d(channels=8, size=6, batch=1, low_rank=2, repeats=1)
    assert torch.equal(rng, torch.get_rng_state())


def test_transformer_subcommand_wiring(monkeypatch, capsys):
    seen = {}

    def fake(**cfg):
        seen.update(cfg)
        return [["dense, eager", "1.000", "2.00x", "0"]], ["implementation", "median ms", "ratio", "err"], None

    monkeypatch.setattr(bench, "bench_transformer", fake)
    bench.main(["transformer", "--seq", "128", "--repeats", "1", "--no-malloc-tuning"])
    assert seen["seq"] == 128 and seen["low_rank"] == 16 and seen["device"] == "cpu" and not seen["causal"]
    assert "nn.TransformerEncoder inference forward: d_model=256" in capsys.readouterr().out
    seen.clear()
    bench.main(["transformer", "--default-policy", "--repeats", "1", "--no-malloc-tuning"])
    assert seen["default_policy"] and "low_rank" not in seen and "num_features" not in seen
    assert "default_policy=True" in capsys.readouterr().out
    seen.clear()
    bench.main(["transformer", "--causal", "--repeats", "1", "--no-malloc-tuning"])
    assert seen["causal"] and "causal=True" in capsys.readouterr().out
    monkeypatch.setattr(bench, "bench_llama", fake)
    seen.clear()
    bench.main(["llama", "--seq", "64", "--repeats", "1", "--no-malloc-tuning"])
    assert seen["seq"] == 64 and seen["kv_heads"] == 2 and seen["low_rank"] == 16 and seen["attention"] == "sdpa"
    bench.main(["llama", "--attention", "eager", "--repeats", "1", "--no-malloc-tuning"])
    assert seen["attention"] == "eager"
    assert "Hugging Face LlamaForCausalLM inference, last sequence left-padded by 25% forward: hidden=256" \
        in capsys.readouterr().out


def test_entry_point_prints_usage_version_and_errors(capsys):
    from panther import __main__ as entry

    assert entry.main(["--help"]) == 0 and entry.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m panther {demo,bench}") and "``" not in out   # plain text, not RST
    assert entry.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"panther {panther.__version__}"
    assert entry.main(["foo"]) == 2 and "unknown command 'foo'" in capsys.readouterr().err
