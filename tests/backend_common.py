"""Helpers shared by the tests of backend="panther" on attention and other layers."""
import torch

from panther.backend import panther_backend
from panther.policy import seed_for
from panther.sketch import orthogonal_random_features

#: AOTAutograd without Inductor: what these tests check does not depend on the generated code
FAST = {"compiler": "aot_eager"}


def compile_panther(model, **options):
    """``torch.compile(model, backend="panther")`` from a fresh Dynamo, and the list its reports go to."""
    torch._dynamo.reset()
    reports = []
    return torch.compile(model, backend=panther_backend, options={**FAST, "report": reports.append, **options}), reports


def features(spec, name, d=8):
    """The ``(m, d)`` random features an attention layer called ``name`` gets for a seeded ``spec``."""
    return orthogonal_random_features(spec.num_random_features, d,
                                      generator=torch.Generator().manual_seed(seed_for(spec, name)))


def padded_qkv(length: int = 9):
    """``q, k, v`` of shape (2, 3, length, 8) and the keys each sequence keeps, ``(2, length)``: the second sequence
    is padded in its last 3 positions."""
    g = torch.Generator().manual_seed(length - 9)
    q, k, v = (torch.randn(2, 3, length, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, length - 3:] = False
    return q, k, v, keep


def small_llama(impl: str, device: str, layers: int = 2):
    """A small random Llama (grouped-query attention) with ``attn_implementation=impl``, seeded, in eval mode."""
    import pytest

    tf = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, attn_implementation=impl)).eval().to(device)


def prompts_dynamic_and_static(impl: str, device: str, options: dict):
    """A small Llama compiled with ``dynamic=True`` and a seeded random-feature attention policy, run on left-padded
    batches of 8 and then 11 tokens: ``(dynamic, static)`` logits per length (the static ones from a compile per
    length), the number of compiles after each length, and the attention report rows of all compiles."""
    from panther.policy import SketchSpec

    model = small_llama(impl, device, layers=1)
    policy = {"attention": SketchSpec(num_random_features=64, seed=0)}
    torch._dynamo.reset()
    reports = []
    dynamic = torch.compile(model, backend=panther_backend, dynamic=True,
                            options={**options, "report": reports.append, "policy": policy})
    batches, compiles = [], []
    for length in (8, 11):
        ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length)).to(device)
        mask = torch.ones(2, length, dtype=torch.long, device=device)
        mask[1, :3] = 0
        with torch.no_grad():
            batches.append((ids, mask, dynamic(ids, attention_mask=mask).logits))
        compiles.append(len(reports))
    outputs = []
    for ids, mask, y in batches:
        static, static_reports = compile_panther(model, policy=policy, **options)
        with torch.no_grad():
            outputs.append((y, static(ids, attention_mask=mask).logits))
        reports += static_reports
    return outputs, compiles, [r for rep in reports for r in rep.rows if r.kind == "attention"]


def decode_steps_and_whole(impl: str, device: str, options: dict):
    """A small random Llama (``attn_implementation=impl``) with a seeded random-feature attention policy, on a
    left-padded batch of 12 tokens: the logits of positions 7 to 11 from a prompt of 8 and four decoding steps
    with a KV cache (the cache length symbolic from the second), those of the whole sequence in one call, and
    the steps' attention report rows."""
    from panther.policy import SketchSpec

    model = small_llama(impl, device)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, :3] = 0
    policy = {"attention": SketchSpec(num_random_features=64, seed=0)}
    whole, _ = compile_panther(model, policy=policy, **options)
    with torch.no_grad():
        expect = whole(ids, attention_mask=mask).logits[:, 7:]
    step, reports = compile_panther(model, policy=policy, **options)
    with torch.no_grad():
        out = step(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(8, 12):
            out = step(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                       use_cache=True)
            logits.append(out.logits[:, -1])
    assert len(reports) >= 3  # the prompt, the first step, then graphs with the cache length symbolic
    return torch.stack(logits, 1), expect, [r for rep in reports for r in rep.rows if r.kind == "attention"]
