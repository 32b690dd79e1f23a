"""``python -m inductor_ext.triton_attention_bench [--no-backward] [--sweep | --profile] [--no-long] [--peers] [--srpe | --srpe-only] [--markdown FILE]``:
SDPA vs the C++ rf_attention op vs the Triton op on CUDA (bf16, H=16, d=64, m=256): non-causal
L=65536 B=1, causal L=65536 B=1, causal L=4096 B=16; forward and forward+backward times in ms (the
Triton op's backward is the fused Triton backward; medians of ``triton.testing.do_bench``, as the
issue's reference numbers, and for the Triton op also replayed from a CUDA graph), the Triton
backward alone, the Triton-vs-C++
relative errors of the output and of the gradients; then a causal L=262144 B=1 H=16
forward+backward of the Triton op with its peak memory (``--no-long`` skips it). ``--sweep`` also
prints the Triton forward's per-kernel times (torch.profiler) over launch parameters, and the
backward's over its own; ``--profile`` prints only the default launch parameters' per-kernel
times, forward and backward. ``--peers`` adds a table of the peers on the same inputs, where
installed: flash-linear-attention's chunked causal kernel with torch feature maps of the same random
features, and performer-pytorch non-causal. ``--srpe`` adds the sine-SRPE contraction of the
queries (16 heads, d = 64, 8 sines, 64 realisations) with its bases built on chip against the bases
materialised (the CPU path's method), forward and forward+backward, with peak memory;
``--srpe-only`` runs that table alone.
``--markdown FILE`` also writes the tables into FILE (e.g. docs/benchmarks.md), in sections named by
the command."""
import argparse
import sys

from inductor_ext.triton_attention import bench_triton_attention


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m inductor_ext.triton_attention_bench",
                                description=__doc__)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-long", action="store_true")
    p.add_argument("--peers", action="store_true")
    p.add_argument("--srpe", action="store_true")
    p.add_argument("--srpe-only", action="store_true")
    p.add_argument("--markdown", metavar="FILE", default=None)
    a = p.parse_args(argv)
    rows = [] if a.srpe_only else bench_triton_attention(
        backward=not a.no_backward, sweep=a.sweep, profile=a.profile,
        long_len=0 if a.no_long else 262144, peers=a.peers)
    srpe = []
    if a.srpe or a.srpe_only:
        from inductor_ext.triton_srpe import bench_srpe
        srpe = bench_srpe()
    if a.markdown and (rows or srpe):
        from panther.bench import command_line, write_markdown
        cmd = command_line("python -m inductor_ext.triton_attention_bench",
                           sys.argv[1:] if argv is None else argv)
        title = "random-feature attention, bf16, H=16, d_head=64, m=256 (times in ms)"
        cases = [r for r in rows if "sdpa fwd ms" in r]
        peers = [r for r in rows if "peer" in r]
        long = [r for r in rows if "sdpa fwd ms" not in r and "peer" not in r]
        if cases:
            write_markdown(a.markdown, cmd, title, cases, device="cuda")
        if peers:
            write_markdown(a.markdown, f"{cmd} [peers]", "peers on the same inputs (times in ms)",
                           peers, device="cuda")
        if long:
            write_markdown(a.markdown, f"{cmd} [long]", "causal forward+backward at length 262,144",
                           long, device="cuda")
        if srpe:
            write_markdown(a.markdown, f"{cmd} [srpe]", "sine-SRPE contraction of the queries: bases "
                           "on chip vs materialised (bf16, times in ms)", srpe, device="cuda")


if __name__ == "__main__":
    main()
