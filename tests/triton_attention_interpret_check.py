"""Checks the fused random-feature attention Triton kernels' arithmetic in Triton's CPU interpreter.

Run by tests/test_triton_attention.py in ONE subprocess with ``TRITON_INTERPRET=1`` (the variable
must be set before triton is imported). Every case compares the kernels (called through
``inductor_ext.triton_attention._forward`` with small split lengths, so several splits / segments
and chunk tails are exercised) against ``rf_attention_reference`` in float64; prints one line per
case and exits non-zero on the first failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
# tests/ is on sys.path: run as a script
from interpret_common import (ATTENTION_TOL as TOL, check, padding_mask, rel,  # noqa: E402
                              seeded_generators)
from inductor_ext import triton_attention as ta  # noqa: E402
from panther.ops.attention import rf_attention_reference
from panther.sketch import orthogonal_random_features  # noqa: E402

gen = seeded_generators(0)


def case(B, H, L, S, d, dv, m, kernel_fn, causal, scale, masked, dtype, seg, shift=0.0, bf=16,
         chunk=ta.CHUNK, huge=False, ramp=False, q_persist=None, wbf=None):
    g = gen()
    q = torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, d, generator=g, dtype=torch.float64) + shift
    if huge:  # components beyond fp16's range (the feature products take bf16 tiles as fp16)
        q[:, :, 3, 0], k[:, :, 5, 1] = 1.0e5, -1.0e5
    v = torch.randn(B, H, S, dv, generator=g, dtype=torch.float64)
    W = orthogonal_random_features(m, d, generator=g, dtype=torch.float64)
    if ramp:  # exponents grow block after block (features, keys)
        W = W * torch.linspace(0.2, 2.5, m, dtype=torch.float64)[:, None]
        k = k * torch.linspace(0.2, 1.5, S, dtype=torch.float64)[:, None]
        q = q * 2.0
    mask = padding_mask(B, S, g) if masked else None
    q, k, v, W = q.to(dtype), k.to(dtype), v.to(dtype), W.to(dtype)
    ref = rf_attention_reference(q.double(), k.double(), v.double(), W.double(), kernel_fn,
                                 causal, scale, mask)
    out = ta._forward(q, k, v, W, kernel_fn, causal, scale, mask, seg=seg, block_n=16,
                      block_m=16, kv_block_f=bf, q_block_f=bf, chunk=chunk,
                      state_block_f=bf, walk_block_f=wbf or bf, q_persist=q_persist)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    name = (f"{kernel_fn} causal={causal} B{B} H{H} L{L} S{S} d{d} dv{dv} m{m} scale={scale} "
            f"mask={masked} {str(dtype)[6:]} seg={seg} shift={shift} block_f={bf} chunk={chunk}"
            + (f" walk_block_f={wbf}" if wbf else "")
            + (" huge" if huge else "") + (f" q_persist={q_persist}" if q_persist is not None else ""))
    check(name, rel(out, ref), TOL[dtype])


def main():
    f32, bf = torch.float32, torch.bfloat16
    # non-causal: several splits, tails in L, S, d, dv, m (padded features), Lq != S
    case(2, 2, 37, 53, 20, 12, 24, "softmax", False, None, False, f32, seg=16)
    case(1, 3, 19, 40, 16, 16, 16, "softmax", False, 0.7, False, f32, seg=32)
    case(2, 1, 21, 33, 8, 5, 40, "relu", False, None, False, f32, seg=16)
    case(3, 2, 17, 29, 12, 7, 20, "softmax", False, None, True, f32, seg=16)
    case(2, 2, 9, 30, 16, 16, 32, "relu", False, None, True, f32, seg=16)
    # keys far from the queries: large logits exercise the online max / merge rescaling
    case(1, 2, 13, 50, 16, 8, 16, "softmax", False, 2.0, False, f32, seg=16, shift=1.5)
    # the persistent query kernel (taken by half inputs) in fp32, and the blocked one in bf16
    case(2, 2, 37, 53, 20, 12, 24, "softmax", False, None, False, f32, seg=16, q_persist=True)
    case(3, 2, 17, 29, 12, 7, 20, "softmax", False, None, True, f32, seg=16, q_persist=True)
    case(2, 2, 9, 30, 16, 16, 32, "relu", False, None, True, f32, seg=16, q_persist=True)
    case(1, 2, 13, 50, 16, 8, 16, "softmax", False, 2.0, False, f32, seg=16, shift=1.5,
         q_persist=True)
    case(1, 2, 33, 45, 16, 16, 32, "softmax", False, None, True, torch.bfloat16, seg=16,
         q_persist=False)
    # causal: one and several segments, chunk tails (C = 64), masks, relu
    case(1, 2, 70, 70, 16, 8, 32, "softmax", True, None, False, f32, seg=64)
    case(2, 1, 150, 150, 12, 9, 20, "softmax", True, 0.5, False, f32, seg=64)
    case(1, 1, 130, 130, 16, 16, 16, "softmax", True, 2.0, False, f32, seg=128, shift=1.5)
    case(3, 1, 100, 100, 16, 8, 16, "softmax", True, None, True, f32, seg=64)
    case(1, 2, 90, 90, 8, 8, 24, "relu", True, None, False, f32, seg=64)
    case(2, 1, 70, 70, 16, 4, 16, "relu", True, None, True, f32, seg=64)
    case(1, 1, 30, 30, 16, 16, 16, "softmax", True, None, False, f32, seg=64)  # L < C
    # one feature block (block_f = 64) and m > 64 (padded feature block at the end)
    case(1, 1, 70, 70, 16, 8, 40, "softmax", True, 2.0, True, f32, seg=64, shift=1.0, bf=64)
    case(1, 1, 20, 40, 16, 8, 100, "softmax", False, None, True, f32, seg=16, bf=64)
    # the state carried in registers (block_f = m padded), and shorter chunks
    case(1, 2, 90, 90, 16, 8, 32, "softmax", True, 2.0, True, f32, seg=64, shift=1.0, bf=32)
    case(2, 1, 75, 75, 16, 8, 20, "softmax", True, None, False, f32, seg=32, bf=32, chunk=16)
    case(1, 1, 50, 50, 8, 8, 24, "relu", True, None, False, f32, seg=32, bf=32, chunk=32)
    # bf16 inputs (the kernels' tensor-core path, upcast in the interpreter)
    case(1, 2, 33, 45, 16, 16, 32, "softmax", False, None, True, bf, seg=16)
    case(2, 1, 100, 100, 16, 16, 32, "softmax", True, None, True, bf, seg=64)
    case(1, 2, 33, 45, 16, 16, 32, "softmax", False, None, False, bf, seg=16, huge=True)
    case(1, 1, 100, 100, 16, 16, 32, "softmax", True, None, False, bf, seg=64, huge=True)
    case(1, 1, 80, 80, 16, 16, 32, "relu", True, None, False, torch.float16, seg=64)
    case(1, 1, 20, 50, 16, 16, 32, "softmax", False, None, False, torch.float16, seg=16)
    # exponents that rise by several units block after block (features, keys): rescale factors
    # far below 1 on accumulators already filled
    case(1, 2, 40, 70, 16, 8, 64, "softmax", False, 2.0, True, f32, seg=64, ramp=True)
    case(1, 1, 130, 130, 16, 8, 64, "softmax", True, 2.0, True, f32, seg=64, ramp=True)
    # causal walks over wider feature blocks than the chunk outputs' (one reference per walk
    # block, written into each of its output blocks): several segments, tails, masks, relu
    case(1, 1, 130, 130, 16, 8, 64, "softmax", True, 2.0, True, f32, seg=64, ramp=True, wbf=64)
    case(2, 1, 150, 150, 12, 9, 40, "softmax", True, 0.5, True, f32, seg=64, bf=16, wbf=32)
    case(1, 2, 90, 90, 8, 8, 24, "relu", True, None, False, f32, seg=64, wbf=32)
    case(2, 1, 100, 100, 16, 16, 32, "softmax", True, None, True, bf, seg=64, wbf=32)
    # the op itself (device branch picks the kernels under the interpreter)
    g = gen()
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    W = torch.randn(16, 16, generator=g)
    for causal in (False, True):
        out = ta.rf_attention_triton(q, k, v, W, "softmax", causal)
        ref = rf_attention_reference(q.double(), k.double(), v.double(), W.double(), "softmax",
                                     causal)
        check(f"op causal={causal}", rel(out, ref), 1e-4)
    # the benchmark's launch-parameter sweep (tiny, untimed): every config it names launches
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ta.bench_triton_attention(cases=[("non-causal", 40, 1, False), ("causal", 70, 1, True)],
                                  m=16, H=1, d=16, dtype=torch.float32, backward=False,
                                  sweep=True, long_len=0, device="cpu")
    lines = [ln for ln in buf.getvalue().splitlines() if "sweep fwd" in ln]
    n_want = 2 + len(ta._FWD_SWEEP[False]) + len(ta._FWD_SWEEP[True])
    assert len(lines) == n_want and not any("failed" in ln for ln in lines), buf.getvalue()
    print(f"ok   bench sweep: {len(lines)} forward configs launch")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):   # --profile: the defaults alone
        ta.bench_triton_attention(cases=[("non-causal", 40, 1, False), ("causal", 70, 1, True)],
                                  m=16, H=1, d=16, dtype=torch.float32, backward=False,
                                  profile=True, long_len=0, device="cpu")
    lines = [ln for ln in buf.getvalue().splitlines() if "sweep fwd" in ln]
    assert len(lines) == 2 and all("defaults" in ln for ln in lines), buf.getvalue()
    print("ok   bench profile: the defaults' lines")
    print("all interpreter checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
