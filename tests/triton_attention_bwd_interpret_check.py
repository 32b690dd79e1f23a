"""Checks the fused random-feature attention BACKWARD kernels' arithmetic in Triton's interpreter.

Run by tests/test_triton_attention.py in ONE subprocess with ``TRITON_INTERPRET=1`` (set before
triton is imported). Each case runs ``inductor_ext.triton_attention_bwd._backward`` with small
segments and feature blocks (several segments, chunk tails, padded feature blocks), with the
forward's saved statistics (the training path) or recomputing them, and compares
dq, dk, dv with the C++ ``panther::rf_attention_backward`` and with autograd through
``rf_attention_reference``, both in float64 on the same (rounded) inputs. Prints one line per
gradient and exits non-zero on the first failure.
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
from inductor_ext import triton_attention_bwd as tb  # noqa: E402
from panther.ops.attention import rf_attention_reference  # noqa: E402
from panther.sketch import orthogonal_random_features  # noqa: E402

gen = seeded_generators(100)


def make(B, H, L, S, d, dv, m, masked, dtype, shift=0.0, ramp=False, w_f32=False):
    g = gen()
    q = torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, d, generator=g, dtype=torch.float64) + shift
    if ramp:  # key norms grow along the sequence: the running max M rises segment after segment
        k = k * torch.linspace(0.05, 1.2, S, dtype=torch.float64)[:, None]
    v = torch.randn(B, H, S, dv, generator=g, dtype=torch.float64)
    go = torch.randn(B, H, L, dv, generator=g, dtype=torch.float64)
    W = orthogonal_random_features(m, d, generator=g, dtype=torch.float64)
    mask = padding_mask(B, S, g) if masked else None
    # w_f32: an fp32 projection with half inputs (the kernels' feature products take it in fp16,
    # the backward's gradient products in bf16)
    return [t.to(dtype) for t in (q, k, v, go)] + [W.to(torch.float32 if w_f32 else dtype), mask]


def references(q, k, v, go, W, kernel_fn, causal, scale, mask):
    q, k, v, go, W = (t.double() for t in (q, k, v, go, W))
    cpp = torch.ops.panther.rf_attention_backward(go, q, k, v, W, kernel_fn, causal, scale, mask,
                                                  False)[:3]
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = rf_attention_reference(qr, kr, vr, W, kernel_fn, causal, scale, mask)
    auto = torch.autograd.grad(out, (qr, kr, vr), go)
    return cpp, auto


def case(B, H, L, S, d, dv, m, kernel_fn, causal, scale, masked, dtype, seg, shift=0.0, bf=16,
         ramp=False, stats=True, chunk=64, w_f32=False, default_walk=False):
    """stats: the training path (the forward saves out, per-row den / shifts and its key states,
    the backward reuses them); else the backward recomputes them. default_walk: the forward walks
    the default segments (else ``seg``), whose causal states the backward restores."""
    q, k, v, go, W, mask = make(B, H, L, S, d, dv, m, masked, dtype, shift, ramp, w_f32)
    cpp, auto = references(q, k, v, go, W, kernel_fn, causal, scale, mask)
    out = st = states = None
    fwd_seg = None if default_walk else seg
    if stats:
        st = torch.full((B * H, 3, L), float("nan"))
        if kernel_fn == "relu" or not causal:
            st.zero_()  # rows the forward leaves unwritten (as rf_attention_triton_train does)
        out, states = ta._forward_and_states(q, k, v, W, kernel_fn, causal, scale, mask,
                                             seg=fwd_seg, block_n=16, block_m=16,
                                             state_block_f=bf, stats=st, chunk=chunk)
        if causal and default_walk:
            assert ta.ChunkStates.restore(states, S, chunk, bf) is not None, "states not restored"
    got = tb._backward(go, q, k, v, W, kernel_fn, causal, scale, mask, out, st, states, seg=seg,
                       block_f=bf, chunk=chunk)
    name = (f"{kernel_fn} causal={causal} B{B} H{H} L{L} S{S} d{d} dv{dv} m{m} scale={scale} "
            f"mask={masked} {str(dtype)[6:]} seg={seg} shift={shift} block_f={bf} ramp={ramp} "
            f"stats={stats} chunk={chunk} w_f32={w_f32}")
    for gname, x, ref_c, ref_a in zip(("dq", "dk", "dv"), got, cpp, auto):
        assert x.dtype == dtype and x.shape == ref_c.shape, (gname, x.dtype, x.shape)
        assert torch.isfinite(x).all(), f"{name}: non-finite {gname} (unwritten or overflow)"
        check(f"{name} {gname} vs C++", rel(x, ref_c), TOL[dtype])
        check(f"{name} {gname} vs autograd(reference)", rel(x, ref_a), TOL[dtype])
    if masked:
        # masked keys get exactly zero dk, dv (their features are 0)
        mk = mask[:, None, :, None].expand(B, H, S, 1)
        assert (got[1].masked_select(mk) == 0).all(), "masked keys' dk != 0"
        assert (got[2].masked_select(mk) == 0).all(), "masked keys' dv != 0"


def op_level():
    """Autograd of the Triton op (through rf_attention_triton: the training variant with saved
    statistics; and the plain op): the Triton backward without a projection gradient, the C++
    backward (with dW) when the projection requires grad."""
    g = gen()
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g, requires_grad=True) for _ in range(3))
    W = orthogonal_random_features(32, 16, generator=g)
    go = torch.randn(1, 2, 70, 16, generator=g)
    mask = torch.rand(1, 70, generator=g) < 0.2
    calls = []
    fused = tb._backward
    tb._backward = lambda *a, **kw: calls.append(1) or fused(*a, **kw)  # count fused backwards
    default_causal = tb.backward_params["causal"]
    tb.backward_params["causal"] = True
    for causal in (False, True):
        got = torch.autograd.grad(ta.rf_attention_triton(q, k, v, W, "softmax", causal, None, mask),
                                  (q, k, v), go)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = torch.autograd.grad(rf_attention_reference(qd, kd, vd, W.double(), "softmax", causal,
                                                         None, mask), (qd, kd, vd), go.double())
        for gname, a, b in zip(("dq", "dk", "dv"), got, ref):
            check(f"op autograd causal={causal} {gname}", rel(a, b), 1e-4)
        # the training op keeping no key states (the backward recomputes them)
        tb.backward_params["save_states"] = False
        got = torch.autograd.grad(ta.rf_attention_triton(q, k, v, W, "softmax", causal, None, mask),
                                  (q, k, v), go)
        tb.backward_params["save_states"] = True
        for gname, a, b in zip(("dq", "dk", "dv"), got, ref):
            check(f"op autograd without saved states causal={causal} {gname}", rel(a, b), 1e-4)
        # the plain op's autograd (saves only its inputs: the backward recomputes num / den)
        got = torch.autograd.grad(torch.ops.panther.rf_attention_triton(
            q, k, v, W, "softmax", causal, None, mask), (q, k, v), go)
        for gname, a, b in zip(("dq", "dk", "dv"), got, ref):
            check(f"plain op autograd causal={causal} {gname}", rel(a, b), 1e-4)
        # the backward op itself, and its fallback when the projection needs a gradient
        bwd = torch.ops.panther.rf_attention_triton_backward(
            go, q.detach(), k.detach(), v.detach(), W, "softmax", causal, None, mask)
        for gname, a, b in zip(("dq", "dk", "dv"), bwd, ref):
            check(f"op rf_attention_triton_backward causal={causal} {gname}", rel(a, b), 1e-4)
    assert len(calls) == 8, f"the fused backward ran {len(calls)} times, expected 8"
    Wg = W.clone().requires_grad_()
    got = torch.autograd.grad(ta.rf_attention_triton(q, k, v, Wg, "relu", True, None, mask),
                              (q, k, v, Wg), go)
    ref = torch.ops.panther.rf_attention_backward(go, q.detach(), k.detach(), v.detach(), W, "relu",
                                                  True, None, mask, True)
    for gname, a, b in zip(("dq", "dk", "dv", "dW"), got, ref):
        check(f"op autograd with projection grad (C++ path) {gname}", rel(a, b), 1e-5)
    assert len(calls) == 8, "a projection gradient must take the C++ backward"
    tb.backward_params["causal"] = False  # the switch: causal autograd takes the C++ backward
    got = torch.autograd.grad(ta.rf_attention_triton(q, k, v, W, "softmax", True, None, mask), (q, k, v), go)
    assert len(calls) == 8, "causal calls must take the C++ backward unless backward_params['causal']"
    tb.backward_params["causal"] = default_causal
    # causal training walks the keys once: the backward reuses the forward's chunk states
    walks = []
    walk = ta.causal_chunk_states
    ta.causal_chunk_states = lambda *a, **kw: walks.append(1) or walk(*a, **kw)
    torch.autograd.grad(ta.rf_attention_triton(q, k, v, W, "softmax", True, None, mask), (q, k, v),
                        go)
    ta.causal_chunk_states = walk
    assert len(walks) == 1, f"causal forward+backward walked the keys {len(walks)} times"
    print("ok   causal forward+backward walks the keys once")
    tb._backward = fused


def bench_sweep():
    """The benchmark's backward sweep (tiny, untimed): every launch configuration it names runs."""
    import contextlib
    import io
    g = gen()
    for causal in (True, False):
        q, k, v = (torch.randn(1, 1, 70, 16, generator=g) for _ in range(3))
        W = orthogonal_random_features(16, 16, generator=g)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ta._sweep(q, k, v, W, "smoke", causal, True, fwd=False)
        lines = [ln for ln in buf.getvalue().splitlines() if "sweep bwd" in ln]
        assert len(lines) > 10 and not any("failed" in ln for ln in lines), buf.getvalue()
        print(f"ok   bench sweep causal={causal}: {len(lines)} backward configs launch")


def main():
    f32, bf, f16 = torch.float32, torch.bfloat16, torch.float16
    # causal: several segments (seg 64 = one chunk each), chunk tails, masks with a fully masked
    # row and a masked prefix, large logits (shifted keys, big scale), relu, L < C
    case(1, 2, 70, 70, 16, 8, 32, "softmax", True, None, False, f32, seg=64)
    case(2, 1, 100, 100, 16, 8, 32, "softmax", True, 0.5, True, f32, seg=64, ramp=True)
    case(1, 1, 131, 131, 16, 8, 32, "softmax", True, 0.5, False, f32, seg=64, ramp=True)
    case(1, 1, 131, 131, 16, 8, 32, "softmax", True, 0.5, False, f32, seg=64, ramp=True,
         stats=False)
    case(1, 1, 131, 131, 16, 8, 32, "softmax", True, 2.0, True, f32, seg=128, shift=1.5,
         stats=False)
    case(2, 1, 100, 100, 16, 8, 32, "relu", True, None, True, f32, seg=64)
    case(1, 1, 70, 70, 16, 8, 32, "relu", True, None, True, f32, seg=64, stats=False)
    case(1, 1, 30, 30, 16, 8, 32, "relu", True, None, False, f32, seg=64)
    # the forward's chunk states restored: three default segments (the earlier segments' part)
    case(1, 1, 600, 600, 16, 8, 32, "softmax", True, 0.5, True, f32, seg=64, ramp=True,
         default_walk=True)
    case(1, 1, 600, 600, 16, 8, 32, "relu", True, None, False, f32, seg=128, default_walk=True)
    # long segments: 16 chunks per program (the H200 walks 32), a second segment with a tail
    case(1, 1, 1100, 1100, 16, 8, 32, "softmax", True, None, False, f32, seg=1024, ramp=True)
    # the backward's own chunk length (32; the forward walks chunks of 64)
    case(1, 1, 100, 100, 16, 8, 32, "softmax", True, 0.5, True, f32, seg=64, ramp=True, chunk=32)
    case(1, 1, 50, 70, 16, 8, 32, "softmax", False, None, True, f32, seg=64, chunk=32)
    # one padded feature block (m = 40 < block_f = 64) / two blocks, the second padded (m = 100)
    case(1, 1, 70, 70, 16, 8, 40, "softmax", True, None, True, f32, seg=64, shift=1.0, bf=64)
    # non-causal: several query segments, Lq != S, masks, large logits, relu
    case(2, 1, 100, 53, 16, 8, 32, "softmax", False, None, True, f32, seg=64)
    case(1, 1, 70, 40, 16, 8, 32, "softmax", False, None, True, f32, seg=64, stats=False)
    case(1, 1, 40, 70, 16, 8, 32, "softmax", False, 2.0, False, f32, seg=64, shift=1.5)
    case(2, 1, 70, 45, 16, 8, 32, "relu", False, None, True, f32, seg=64)
    case(1, 1, 40, 30, 16, 8, 32, "relu", False, None, False, f32, seg=64, stats=False)
    case(1, 1, 20, 40, 16, 8, 100, "softmax", False, None, True, f32, seg=64, bf=64)
    # half inputs (the interpreter upcasts the products; the GPU uses bf16 tensor cores)
    case(1, 1, 100, 100, 16, 8, 32, "softmax", True, None, True, bf, seg=64)
    case(1, 1, 70, 70, 16, 8, 32, "softmax", True, None, True, bf, seg=64, stats=False)
    case(1, 1, 60, 33, 16, 8, 32, "relu", False, None, True, bf, seg=64)
    case(1, 1, 70, 70, 16, 8, 32, "softmax", True, None, False, f16, seg=64)
    # an fp32 projection with bf16 inputs (features by W in fp16, gradients by W in bf16),
    # d = 64 and 8 chunks per program
    case(1, 1, 600, 600, 64, 16, 64, "softmax", True, None, False, bf, seg=512, w_f32=True)
    op_level()
    bench_sweep()
    print("all backward interpreter checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
