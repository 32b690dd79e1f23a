"""Checks the one-token decoding kernel's arithmetic in Triton's CPU interpreter.

Run by tests/test_triton_rf_step.py in ONE subprocess with ``TRITON_INTERPRET=1`` (the variable must be set
before triton is imported). Every case compares the kernel's step (output and the new state) with
``panther.ops.attention.rf_attention_step`` on the same inputs, and a run of kernel steps with causal
attention over the whole sequence; prints one line per case and exits non-zero on the first failure.
"""
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
# tests/ is on sys.path: run as a script
from interpret_common import check, rel, seeded_generators  # noqa: E402
from inductor_ext import triton_rf_step as ts  # noqa: E402
from panther.ops.attention import rf_attention_reference, rf_attention_step, rf_causal_state  # noqa: E402
from panther.sketch import orthogonal_random_features  # noqa: E402

gen = seeded_generators(0)
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}   # the output is rounded to its dtype


def inputs(B, H, L, d, dv, m, dtype, sigma=0.7):
    g = gen()
    q, k = (torch.randn(B, H, L, d, generator=g) * sigma for _ in range(2))
    v = torch.randn(B, H, L, dv, generator=g)
    P = orthogonal_random_features(m, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), P


def one_step(B, H, d, dv, m, dtype, kern, scale=None, long_prompt_keys=False):
    """A prompt of 8 (torch), then position 8 by the kernel and by the torch step. Row 0's prompt is all
    padding (its state empty), row 1's new token is padding, row 2 all (its state stays empty), the others
    have none; ``long_prompt_keys``: the prompt's keys far
    longer than the token's (exponents near -50), so that the shift must move up to the token's."""
    q, k, v, P = inputs(B, H, 9, d, dv, m, dtype)
    if long_prompt_keys:
        k[:, :, :8] *= 10
    mask = torch.zeros(B, 9, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, 8] = True
    mask[2] = True
    state = rf_causal_state(k[:, :, :8], v[:, :, :8], P, kern, scale, mask[:, :8])
    new = [t[:, :, 8:] for t in (q, k, v)]
    assert ts.kernel_ok(*new, P, state)
    out, got = ts.rf_attention_step_triton(*new, P, kern, scale, mask[:, 8:], state)
    ref, want = rf_attention_step(*new, P, kern, scale, mask[:, 8:], state)
    name = f"B={B} H={H} d={d} dv={dv} m={m} {dtype} {kern} scale={scale} long={long_prompt_keys}"
    assert out.dtype == dtype and got.length == 9 and got.kv.dtype == torch.float32
    check(name + " out", rel(out, ref), OUT_TOL[dtype])
    for part in ("kv", "k_sum"):
        check(f"{name} {part}", rel(getattr(got, part), getattr(want, part)), 1e-5)
    same_shift = torch.equal(torch.isinf(got.shift), torch.isinf(want.shift))
    check(f"{name} shift", 0.0 if same_shift and torch.allclose(got.shift.nan_to_num(neginf=0),
                                                               want.shift.nan_to_num(neginf=0), atol=1e-5) else 1.0,
          0.5)


for kern in ("softmax", "relu"):
    for shape in [(4, 3, 5, 3, 10), (4, 2, 64, 64, 256), (4, 2, 16, 40, 70), (4, 1, 128, 128, 256)]:
        one_step(*shape, torch.float32, kern)
    one_step(4, 2, 16, 40, 70, torch.bfloat16, kern)
    one_step(4, 2, 16, 40, 70, torch.float16, kern)
one_step(4, 2, 16, 16, 32, torch.float32, "softmax", scale=0.3)
one_step(4, 2, 16, 16, 32, torch.float32, "softmax", long_prompt_keys=True)

# a generation: the kernel's state feeds its next step, against causal attention over the whole sequence
q, k, v, P = inputs(2, 2, 20, 16, 24, 64, torch.float32)
state = rf_causal_state(k[:, :, :4], v[:, :, :4], P)
outs = [torch.ops.panther.rf_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], P, "softmax", True, None, None)]
for t in range(4, 20):
    out, state = ts.rf_attention_step_triton(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], P, "softmax",
                                             None, None, state)
    outs.append(out)
whole = rf_attention_reference(q, k, v, P, "softmax", True)
check("16 kernel steps after a prompt of 4", rel(torch.cat(outs, 2), whole), 1e-5)

# what the kernel does not serve goes to the torch step
q1, k1, v1 = (t[:, :, :1] for t in (q, k, v))
assert not ts.kernel_ok(q[:, :, :2], k[:, :, :2], v[:, :, :2], P, state)                      # two positions
assert not ts.kernel_ok(q1.double(), k1.double(), v1.double(), P.double(), state)             # float64
with torch.enable_grad():
    assert not ts.kernel_ok(q1.requires_grad_(), k1, v1, P, state)                            # a gradient
print("all rf step interpreter checks passed")
