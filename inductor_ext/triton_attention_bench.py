"""``python -m inductor_ext.triton_attention_bench [--no-backward] [--sweep] [--no-long]``: SDPA vs
the C++ rf_attention op vs the Triton op on CUDA (bf16, H=16, d=64, m=256): non-causal L=65536 B=1,
causal L=65536 B=1, causal L=4096 B=16; forward and forward+backward times in ms (the Triton op's
backward is the fused Triton backward), the Triton backward alone, the Triton-vs-C++ relative errors
of the output and of the gradients; then a causal L=262144 B=1 H=16 forward+backward of the Triton
op with its peak memory (``--no-long`` skips it). ``--sweep`` also prints the Triton forward's
per-kernel times (torch.profiler) over launch parameters, and the backward's times over its own."""
import sys

from inductor_ext.triton_attention import bench_triton_attention

if __name__ == "__main__":
    bench_triton_attention(backward="--no-backward" not in sys.argv, sweep="--sweep" in sys.argv,
                           long_len=0 if "--no-long" in sys.argv else 262144)
