"""A/B runs of the fused CAUSAL attention backward at the benchmark's size (65,536 tokens x 16
heads, d = 64, m = 256, bf16; a manual GPU tool, not run by CI). Each variant runs in its own
process (a fault poisons the CUDA context) with its own Triton cache, and prints the relative
errors of the forward output and of dq, dk, dv against the C++ ops in fp32, where the bad rows of
dq lie (segment / chunk within the segment), and the backward's time.

    PYTHONPATH=$PWD python tests/triton_attention_bwd_gpu_ab.py            # all variants
    PYTHONPATH=$PWD python tests/triton_attention_bwd_gpu_ab.py --one V    # one, in-process
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python tests/triton_attention_bwd_gpu_ab.py --one w4 --cpu

History: the earlier causal backward (a chunk walk per segment, its state updated in place in
global memory) gave wrong dq, dk at this size on the H200 with Triton 3.6 unless DISABLE_MMA_V3=1
(no wgmma), and faulted with 8 warps; the interpreter was right. ``nomma3`` keeps that
comparison for the per-chunk kernels that replaced it.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {  # name: (backward kwargs, uses forward stats, extra env)
    "default": (dict(), True, {}),
    "recompute": (dict(), False, {}),
    "w4": (dict(q_warps=4, k_warps=4), True, {}),
    "bf32": (dict(block_f=32), True, {}),
    "nomma3": (dict(), True, {"DISABLE_MMA_V3": "1"}),
}


def run_one(name, cpu):
    import torch
    import panther  # noqa: F401
    from inductor_ext import triton_attention as ta
    from inductor_ext import triton_attention_bwd as tb
    from panther.sketch import orthogonal_random_features

    kwargs, use_stats, _ = VARIANTS[name]
    kwargs = dict(kwargs)
    dev = torch.device("cpu" if cpu else "cuda")
    H, L, seg = (1, 256, 128) if cpu else (16, 65536, None)
    seg = kwargs.pop("seg", seg)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, go = (torch.randn(1, H, L, 64, device=dev, generator=g).bfloat16() for _ in range(4))
    W = orthogonal_random_features(256, 64, device=dev, dtype=torch.float32)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    t = time.time()
    out, stats, *states = torch.ops.panther.rf_attention_triton_train(q, k, v, W, "softmax", True,
                                                                      None, None)
    saved = (out, stats, states) if use_stats else (None, None, None)
    sync()
    dq, dk, dv = tb._backward(go, q, k, v, W, "softmax", True, None, None, *saved, seg=seg,
                              **kwargs)
    sync()
    el = time.time() - t
    if not cpu:  # the backward alone, compiled: median of 5
        times = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            tb._backward(go, q, k, v, W, "softmax", True, None, None, *saved, seg=seg, **kwargs)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        print(f"{name}: backward {sorted(times)[2]:.2f} ms", flush=True)
    f = [x.float() for x in (q, k, v, go)]
    Wb = W.bfloat16().float()  # the backward's operand (the features use W in fp16)
    ref_out = torch.ops.panther.rf_attention(f[0], f[1], f[2], W, "softmax", True, None, None)
    ref = torch.ops.panther.rf_attention_backward(f[3], f[0], f[1], f[2], Wb, "softmax", True,
                                                  None, None, False)[:3]
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    print(f"{name}: {kwargs} stats={use_stats} env={VARIANTS[name][2]}  ({el:.1f} s)\n"
          f"   fwd out {rel(out, ref_out):.2e}  dq {rel(dq, ref[0]):.2e}  dk {rel(dk, ref[1]):.2e}"
          f"  dv {rel(dv, ref[2]):.2e}", flush=True)
    # where dq goes wrong: rows whose error exceeds 10% of the median row norm
    rn = ref[0].norm(dim=-1)
    err = (dq.float() - ref[0]).norm(dim=-1) / rn.flatten().median().clamp_min(1e-30)
    bad = (err > 0.1).flatten(0, 1)
    qseg = seg or ta._splits(H, L, 64, dev, 256)[0]
    if bad.any():
        rows = bad.nonzero()[:, 1]
        print(f"   bad dq rows: {int(bad.sum())} of {bad.numel()}, first {int(rows.min())}; "
              f"by chunk-in-segment: {torch.bincount((rows % qseg) // 64).tolist()[:40]}; "
              f"by segment: {torch.bincount(rows // qseg).tolist()[:40]}; "
              f"max row err {err.max().item():.2e}", flush=True)
    else:
        print("   no bad dq rows", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    if a.one:
        return run_one(a.one, a.cpu)
    for name in a.variants.split(","):
        env = {**os.environ, **VARIANTS[name][2], "TRITON_CACHE_DIR": tempfile.mkdtemp()}
        p = subprocess.run([sys.executable, __file__, "--one", name], env=env, capture_output=True,
                           text=True, timeout=300)
        text = (p.stdout + p.stderr).strip().splitlines()
        keep = [ln for ln in text if not ln.lstrip().startswith(("warn", "/"))]
        print("\n".join(keep if p.returncode == 0 else keep[-6:]), flush=True)
        if p.returncode:
            print(f"{name}: rc={p.returncode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
