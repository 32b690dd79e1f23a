"""``python -m inductor_ext.triton_attention_bench [--no-backward] [--sweep]``: SDPA vs the C++
rf_attention op vs the Triton op on CUDA (bf16, H=16, d=64, m=256): non-causal L=65536 B=1, causal
L=65536 B=1, causal L=4096 B=16; forward and forward+backward times in ms, plus the
Triton-vs-C++ relative error. ``--sweep`` also times the Triton forward over launch parameters."""
import sys

from inductor_ext.triton_attention import bench_triton_attention

if __name__ == "__main__":
    bench_triton_attention(backward="--no-backward" not in sys.argv, sweep="--sweep" in sys.argv)
