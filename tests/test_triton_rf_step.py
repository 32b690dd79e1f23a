"""The one-token decoding kernel (inductor_ext/triton_rf_step.py): its arithmetic in Triton's interpreter
(one subprocess, TRITON_INTERPRET=1) and the op off the kernel's devices (CPU: the torch step)."""
import pytest
import torch

import panther  # noqa: F401
from inductor_ext import triton_rf_step as ts
from interpret_common import run_interpreter_check  # tests/ is on sys.path
from panther.ops.attention import rf_attention_step, rf_causal_state
from panther.sketch import orthogonal_random_features


@pytest.mark.skipif(ts.triton is None, reason="needs triton")
def test_kernel_arithmetic_in_triton_interpreter():
    """Tails in d, dv (several column blocks) and m (several feature blocks); an empty state, a padded token,
    a shift that moves; fp32 / bf16 / fp16; 16 chained steps against the whole sequence."""
    run_interpreter_check("triton_rf_step_interpret_check.py", "all rf step interpreter checks passed")


def args(kern, masked, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, dtype=dtype) for _ in range(3))
    P = orthogonal_random_features(8, 4, generator=g, dtype=dtype)
    mask = torch.tensor([[True] * 5 + [False], [False] * 5 + [True]]) if masked else None
    state = rf_causal_state(k[:, :, :5], v[:, :, :5], P, kern, None, None if mask is None else mask[:, :5])
    new = [t[:, :, 5:] for t in (q, k, v)]
    return new, P, None if mask is None else mask[:, 5:], state


@pytest.mark.parametrize("kern", ["softmax", "relu"])
@pytest.mark.parametrize("masked", [False, True])
def test_op_off_the_kernel_devices_is_the_torch_step(kern, masked):
    (q, k, v), P, mask, state = args(kern, masked)
    assert not ts.kernel_ok(q, k, v, P, state)
    out, kv, k_sum, shift = torch.ops.panther.rf_attention_token(q, k, v, P, kern, None, mask, *state[:3])
    ref, want = rf_attention_step(q, k, v, P, kern, None, mask, state)
    torch.testing.assert_close((out, kv, k_sum, shift), (ref, *want[:3]))
    torch.library.opcheck(torch.ops.panther.rf_attention_token.default, (q, k, v, P, kern, None, mask, *state[:3]))
    got, new = ts.rf_attention_step_triton(q, k, v, P, kern, None, mask, state)
    torch.testing.assert_close((got, new), (ref, want))
