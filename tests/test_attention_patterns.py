"""backend="panther" on attention in the forms other than SDPA and nn.MultiheadAttention: written out as
``softmax(q @ kᵀ) @ v`` (Hugging Face's eager attention, timm's unfused attention, research code), and
``flex_attention``: recognised, rewritten like SDPA, or left alone with the reason."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from fx_passes import run_passes
from panther.backend import panther_backend
from panther.policy import SketchSpec

from backend_common import FAST, compile_panther, decode_steps_and_whole, features, padded_qkv  # tests/ is on sys.path

SPEC = SketchSpec(num_random_features=16, seed=1)


class Written(nn.Module):
    """One attention call written out in one of the ways models write it."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.drop = nn.Dropout(0.1)
        self.register_buffer("bias", torch.ones(16, 16).tril().view(1, 1, 16, 16))  # minGPT's causal triangle
        self.register_buffer("mask", torch.empty(16, 16).fill_(float("-inf")).triu_(1))  # openai/whisper's

    def forward(self, q, k, v, pad):
        d, L = q.shape[-1], q.shape[2]
        if self.style == "timm":  # queries scaled first, nn.Dropout (inactive in eval)
            a = (q * d ** -0.5) @ k.transpose(-2, -1)
            return self.drop(a.softmax(dim=-1)) @ v
        if self.style == "method":  # torchvision's Swin: the products as methods, F.dropout with p=0
            a = (q * d ** -0.5).matmul(k.transpose(-2, -1))
            return F.dropout(F.softmax(a, dim=-1), p=0.0, training=self.training).matmul(v)
        if self.style == "causal_fill":  # nanoGPT's masked_fill of the upper triangle; GPT-2's scale and cast
            s = torch.matmul(q, k.transpose(2, 3)) / torch.full([], math.sqrt(d))
            s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            return torch.matmul(F.softmax(s, dim=-1).type(v.dtype), v)
        if self.style == "einsum":  # lucidrains' style, where(keep, s, -inf)
            s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * d ** -0.5
            s = torch.where(torch.ones(L, L, dtype=torch.bool).tril(), s, -torch.finfo(s.dtype).max)
            return torch.einsum("bhij,bhjd->bhid", s.softmax(dim=-1), v)
        if self.style == "buffer_fill":  # minGPT: the triangle is a module buffer, read at compile time
            s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            s = s.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
            return F.softmax(s, dim=-1) @ v
        if self.style == "padding_fill":  # key padding (True = pad), fp32 softmax cast back
            s = q @ k.mT / math.sqrt(d)
            s = s.masked_fill(mask=pad[:, None, None, :], value=-1e9)
            return torch.softmax(s.float(), -1).to(q.dtype) @ v
        if self.style == "additive":  # Hugging Face's eager mask: where(keep, 0, min), padding and causal
            keep = ~pad[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
            mask = torch.where(keep, torch.zeros(()), torch.finfo(q.dtype).min)
            return F.softmax(mask + q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
        if self.style == "legacy_additive":  # BERT before masking_utils, LayoutLM: (1 - attention_mask) * min
            attention_mask = (~pad).long()[:, None, None, :]
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
            s = s + (1.0 - attention_mask.to(q.dtype)) * torch.finfo(q.dtype).min
            return nn.functional.softmax(s, dim=-1) @ v
        if self.style == "ignore_additive":  # True = pad, times a large negative number
            return (q @ k.mT * d ** -0.5 + pad[:, None, None, :].float() * -1e9).softmax(-1) @ v
        if self.style == "meta_llama":  # Meta's reference Llama: a constant of 0 and -inf added to the scores
            mask = torch.hstack([torch.zeros((L, 0)), torch.triu(torch.full((L, L), float("-inf")), diagonal=1)])
            s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d) + mask.type_as(q)
            return F.softmax(s.float(), dim=-1).type_as(q) @ v
        if self.style == "buffer_additive":  # openai/whisper without SDPA: the same as a module buffer
            return (q @ k.transpose(-1, -2) * d ** -0.5 + self.mask[:L, :L]).softmax(-1) @ v
        if self.style == "openai_whisper":  # keys kept transposed, (B, H, d, L); both sides scaled by d^-1/4
            kt = k.transpose(1, 2).permute(0, 2, 3, 1) * d ** -0.25
            s = (q * d ** -0.25) @ kt + self.mask[:L, :L]
            return F.softmax(s.float(), dim=-1).to(q.dtype) @ v
        if self.style == "kept_transposed":  # the same through einsum, with key padding
            s = torch.einsum("bhid,bhdj->bhij", q, k.transpose(1, 2).permute(0, 2, 3, 1)) / math.sqrt(d)
            return torch.einsum("bhij,bhjd->bhid", s.masked_fill(pad[:, None, None, :], -1e9).softmax(-1), v)
        if self.style == "gpt1":  # GPT-1: keys kept transposed, the causal buffer both multiplied and added
            s = torch.matmul(q, k.transpose(-1, -2).contiguous()) / math.sqrt(d)
            b = self.bias[:, :, :L, :L]
            s = s * b + -1e4 * (1 - b)
            s = s + (1.0 - (~pad).long()[:, None, None, :].to(q.dtype)) * -10000.0
            return F.softmax(s, dim=-1) @ v
        if self.style == "folded":  # BLOOM's layout: (B·H, L, d) products, the scores viewed as (B, H, L, L) between
            B, H = q.shape[:2]
            q3, k3, v3 = (t.reshape(B * H, L, d) for t in (q, k, v))
            s = torch.matmul(q3, k3.transpose(1, 2)).view(B, H, L, L) / math.sqrt(d)
            return torch.matmul(F.softmax(s, dim=-1).view(B * H, L, L), v3).view(B, H, L, d)
        if self.style == "fairseq":  # (B·H, L, d) products; the causal mask added 3-D, the key padding filled on
            B, H = q.shape[:2]       # a (B, H, L, L) view, floored at finfo.min (XGLM), viewed back
            q3, k3, v3 = (t.reshape(B * H, L, d) for t in (q, k, v))
            s = torch.bmm(q3 * d ** -0.5, k3.transpose(1, 2))
            s += torch.triu(torch.full((L, L), float("-inf")), 1).unsqueeze(0)
            s = s.view(B, H, L, L).masked_fill(pad[:, None, None, :], float("-inf"))
            s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min)).view(B * H, L, L)
            return torch.bmm(F.softmax(s, dim=-1), v3).view(B, H, L, d)
        if self.style == "flash_layout":  # flash-attn's reference: (B, L, H, d) operands, einsums, causal
            qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
            s = torch.einsum("bthd,bshd->bhts", qb / math.sqrt(d), kb)
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            return torch.einsum("bhts,bshd->bthd", s.softmax(dim=-1), vb).transpose(1, 2)
        if self.style == "two_masks":  # GPT-J before masking_utils: the causal triangle, then the padding added
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
            s = torch.where(self.bias[:, :, :L, :L].bool(), s, torch.finfo(s.dtype).min)
            s = s + (1.0 - (~pad).long()[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
            return F.softmax(s, dim=-1) @ v
        if self.style == "inplace":  # Falcon's eager attention: the scale and the mask applied in place
            s = q @ k.transpose(-1, -2)
            s /= math.sqrt(d)
            s += torch.where(pad[:, None, None, :], float("-inf"), 0.0)
            return torch.softmax(s, -1) @ v
        if self.style == "sdpa_additive":  # the same float mask given to SDPA, which adds it
            extended = (1.0 - (~pad).long()[:, None, None, :].float()) * torch.finfo(q.dtype).min
            return F.scaled_dot_product_attention(q, k, v, attn_mask=extended)
        raise AssertionError(self.style)


@pytest.fixture(scope="module")
def qkv():
    q, k, v, keep = padded_qkv()
    return q, k, v, ~keep  # True = a padded key, as masked_fill takes it


# style: (scale rf_attention gets, causal, key padding)
STYLES = {"timm": (8 ** -0.5, False, False), "method": (8 ** -0.5, False, False), "causal_fill": (8 ** -0.5, True, False),
          "buffer_fill": (8 ** -0.5, True, False), "einsum": (8 ** -0.5, True, False),
          "padding_fill": (8 ** -0.5, False, True), "additive": (0.25, True, True),
          "legacy_additive": (8 ** -0.5, False, True), "ignore_additive": (8 ** -0.5, False, True),
          "inplace": (8 ** -0.5, False, True), "sdpa_additive": (8 ** -0.5, False, True),
          "meta_llama": (8 ** -0.5, True, False), "buffer_additive": (8 ** -0.5, True, False),
          "openai_whisper": (8 ** -0.5, True, False), "kept_transposed": (8 ** -0.5, False, True),
          "two_masks": (8 ** -0.5, True, True), "gpt1": (8 ** -0.5, True, True),
          "folded": (8 ** -0.5, False, False), "fairseq": (8 ** -0.5, True, True),
          "flash_layout": (8 ** -0.5, True, False)}


@pytest.mark.parametrize("style", STYLES)
def test_written_out_attention_is_rf_attention(style, qkv):
    q, k, v, pad = qkv
    model = Written(style).eval()
    compiled, reports = compile_panther(model, policy={"attention": SPEC})
    with torch.no_grad():
        y = compiled(q, k, v, pad)
        dense = model(q, k, v, pad)
    (row,) = reports[0].rows
    assert row.replaced, row.reason
    op_before = "scaled_dot_product_attention" if style.startswith("sdpa") else "softmax(q @ k^T) @ v"
    assert (row.kind, row.op_before, row.op_after) == ("attention", op_before, "panther.rf_attention")
    assert row.est_error is not None and 0 < row.est_error < 1  # measured on the example
    assert "m=16, softmax; output err" in str(reports[0])
    scale, causal, padded = STYLES[style]
    # queries scaled first (timm) are read unscaled, the factor going into the scale
    ref = torch.ops.panther.rf_attention(q, k, v, features(SPEC, row.name), "softmax", causal, scale,
                                         pad if padded else None)
    torch.testing.assert_close(y, ref)
    assert ((y - dense).norm() / dense.norm()) > 1e-3  # it is the approximation, not the exact attention


def test_the_scores_and_probabilities_leave_the_graph(qkv):
    q, k, v, pad = qkv
    graphs = []

    def backend(gm, example_inputs):
        run_passes(gm, example_inputs, policy={"attention": SPEC}, grad_enabled=False)
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(Written("additive").eval(), backend=backend)(q, k, v, pad)
    targets = [n.target for n in graphs[0].graph.nodes]
    assert torch.ops.panther.rf_attention in targets
    assert not {F.softmax, torch.where, torch.matmul, torch.zeros} & set(targets), targets


class Unreadable(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, q, k, v, extra):
        s = q @ k.transpose(-2, -1)
        if self.case == "weights_returned":
            p = s.softmax(-1)
            return p @ v, p
        if self.case == "dropout_all":  # a rate random features cannot apply (every key dropped)
            return F.dropout(s.softmax(-1), 1.0, training=True) @ v
        if self.case == "bias":  # a float bias (ALiBi, relative positions): not a mask
            return (s + extra).softmax(-1) @ v
        if self.case == "softcap":  # Gemma 2
            return (torch.tanh(s / 50.0) * 50.0).softmax(-1) @ v
        if self.case == "float_keep":  # (1 - keep) * min with a float input keep: it might not be 0 or 1
            return (s + (1.0 - extra) * -1e9).softmax(-1) @ v
        if self.case == "half_keep":  # ... and a constant keep that is not
            return (s + (1.0 - torch.full((9,), 0.5)) * -1e9).softmax(-1) @ v
        if self.case == "reshaped":  # Swin's shifted windows: a view to add a per-window mask, and back
            return (s.view(2, 1, 3, 9, 9) + extra.view(2, 1, 3, 9, 9)).view(2, 3, 9, 9).softmax(-1) @ v
        if self.case in ("alibi_folded", "folded_other_batches"):  # BLOOM: ALiBi added by baddbmm, then views
            q3, k3 = q.reshape(6, 9, 8), k.reshape(6, 9, 8)
            if self.case == "alibi_folded":
                alibi = extra[:, :, :1, :].reshape(6, 1, 9)
                s = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=0.35).view(2, 3, 9, 9)
                return torch.bmm(F.softmax(s, dim=-1).view(6, 9, 9), v.reshape(6, 9, 8))
            s = torch.bmm(q3, k3.transpose(1, 2)).view(2, 3, 9, 9)
            return s.softmax(-1).view(3, 2, 9, 9) @ v.reshape(3, 2, 9, 8)
        if self.case == "tensor_scale":
            return (s * extra).softmax(-1) @ v
        if self.case == "multiplied_unmasked":  # a 0/1 factor that no mask term masks (the keys, not the queries)
            b = torch.ones(9, 9).tril()
            return (s * b + -1e4 * (1 - b.T)).softmax(-1) @ v
        if self.case == "window":
            i = torch.arange(q.shape[2])
            outside = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 3)
            return s.masked_fill(outside, float("-inf")).softmax(-1) @ v
        if self.case == "causal_and_other":  # two masks, the second per query and from the inputs
            s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
            return (s + torch.where(extra > -3, 0.0, float("-inf"))).softmax(-1) @ v
        raise AssertionError(self.case)


@pytest.mark.parametrize("case, reason", [
    ("weights_returned", "attention weights are used elsewhere"),
    ("dropout_all", "dropout_p=1.0: random-feature attention applies attention dropout at a constant rate in [0, 1)"),
    ("bias", "a float term is added to the scores"),
    ("reshaped", "a float term is added to the scores"),  # the views only regroup the batch and heads
    ("alibi_folded", "a float term is added to the scores"),
    ("folded_other_batches", "reshaped across the softmax into other batch dimensions"),
    ("float_keep", "a float term is added to the scores"),
    ("half_keep", "values other than 0 / 1 or 0 / -inf"),
    ("tensor_scale", "scaled by a tensor"),
    ("multiplied_unmasked", "scaled by a tensor"),
    ("softcap", "pass through tanh"),
    ("window", "neither causal nor key padding"),
    ("causal_and_other", "varies per query with the inputs"),
])
def test_written_out_attention_left_alone_with_the_reason(case, reason, qkv):
    q, k, v, _ = qkv
    g = torch.Generator().manual_seed(2)
    extra = torch.tensor(0.3) if case == "tensor_scale" else torch.randn(2, 3, 9, 9, generator=g)
    model = Unreadable(case)
    compiled, reports = compile_panther(model, policy={"attention": SPEC})
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        y = compiled(q, k, v, extra)
        torch.manual_seed(5)
        ref = model(q, k, v, extra)
    (row,) = reports[0].rows
    assert not row.replaced and reason in row.reason, row.reason
    torch.testing.assert_close(y, ref)


def _classic_diffusers(q, k, v):
    """diffusers' AttnProcessor: scores by baddbmm, whose input beta=0 leaves unread."""
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(-1, -2), beta=0, alpha=0.3)
    return torch.bmm(scores.softmax(dim=-1), v)


@pytest.mark.parametrize("layout", ["bmm", "baddbmm", "sdpa_3d", "sdpa_5d"])
def test_attention_of_other_ranks_is_folded_to_four_dimensions(layout, qkv):
    """fairseq's (B·H, L, d) products, diffusers' classic processor, single-head (B, L, d) SDPA and Twins'
    (B, groups, H, L, d) SDPA: the same rf_attention on (B, H, L, d), unfolded after."""
    q, k, v, _ = qkv
    if layout in ("bmm", "baddbmm"):
        fn = (lambda q, k, v: torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)) if layout == "bmm" \
            else _classic_diffusers
        args = [t.flatten(0, 1) for t in (q, k, v)]
        folded = [t.unsqueeze(1) for t in args]
        scale = 1.0 if layout == "bmm" else 0.3
    else:
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        args = [t.flatten(0, 1) for t in (q, k, v)] if layout == "sdpa_3d" else [t.view(2, 3, 1, 9, 8) for t in (q, k, v)]
        folded = [t.unsqueeze(1) for t in args] if layout == "sdpa_3d" else [t.flatten(0, 1) for t in args]
        scale = 8 ** -0.5
    compiled, reports = compile_panther(fn, policy={"attention": SPEC})
    with torch.no_grad():
        y = compiled(*args)
    (row,) = reports[0].rows
    assert row.replaced and row.est_error is not None, row.reason
    causal = layout.startswith("sdpa")
    assert row.flops_before == 2 * 2 * 3 * 9 * 9 * 8 * 2 / (2 if causal else 1)
    ref = torch.ops.panther.rf_attention(*folded, features(SPEC, row.name), "softmax", causal, scale, None)
    torch.testing.assert_close(y, ref.view_as(args[0]))


def test_a_mask_on_attention_of_another_rank_is_left_alone_and_the_rest_is_still_measured(qkv):
    """A (B, groups, H, L, L) mask is not read (nor sampled: the sampler refuses it, and the 4-D call beside it
    keeps its measured error)."""
    q, k, v, keep = qkv
    q5, k5, v5 = (t.view(2, 3, 1, 9, 8) for t in (q, k, v))
    mask5 = keep[:, None, None, None, :].expand(2, 3, 1, 9, 9)

    def fn(q, k, v, q5, k5, v5, mask5):
        return F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q5, k5, v5, attn_mask=mask5)

    compiled, reports = compile_panther(fn, policy={"attention": SPEC})
    with torch.no_grad():
        y4, y5 = compiled(q, k, v, q5, k5, v5, mask5)
    four, five = reports[0].rows
    assert four.replaced and four.est_error is not None
    assert not five.replaced and "not 4-D" in five.reason
    torch.testing.assert_close(y5, F.scaled_dot_product_attention(q5, k5, v5, attn_mask=mask5))


def test_products_that_are_not_attention_are_not_rows(qkv):
    q, k, v, _ = qkv
    def not_attention(q, k, v):
        return ((q @ k.mT).sigmoid() @ v + (q @ k.mT).softmax(-2) @ v  # not a softmax over keys
                + torch.einsum("bhij,bhid->bhjd", torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1), v))  # sums queries

    compiled, reports = compile_panther(not_attention, policy={"attention": SPEC})
    with torch.no_grad():
        compiled(q, k, v)
    assert reports[0].rows == []


@contextlib.contextmanager
def _unsupported_implementation_skips():
    """Skip where this transformers version has no such attention implementation for the model (LayoutLM got
    SDPA only after 5.17)."""
    try:
        yield
    except ValueError as e:
        if "does not support an attention implementation" not in str(e):
            raise
        pytest.skip(str(e).split(".")[0])


def compiled_twins(arch, impls, length, layers=2, padded=slice(0, 4)):
    """A small random Hugging Face ``arch`` model (the same weights) for each ``attn_implementation`` in
    ``impls``, compiled with one seeded attention policy and called on a batch whose second sequence is
    padded at ``padded``: ``{impl: (output, attention rows as (name, replaced, FLOPs before / after, error))}``."""
    tf = pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, padded] = 0
    runs = {}
    for impl in impls:
        with torch.random.fork_rng(), _unsupported_implementation_skips():
            torch.manual_seed(0)
            if arch == "t5":  # position biases stay exact; cross attention adds a zero one and the mask
                model = tf.T5Model(tf.T5Config(d_model=32, d_kv=8, num_layers=layers, num_heads=4, d_ff=64,
                                               vocab_size=64, attn_implementation=impl))
            elif arch in ("bert", "layoutlm"):  # LayoutLM still masks with (1 - attention_mask) * min
                config, cls = (tf.BertConfig, tf.BertModel) if arch == "bert" else (tf.LayoutLMConfig, tf.LayoutLMModel)
                model = cls(config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=64, attn_implementation=impl))
            else:
                model = tf.LlamaForCausalLM(tf.LlamaConfig(
                    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl))
        compiled, reports = compile_panther(model.eval(), policy={"attention": SketchSpec(num_random_features=64,
                                                                                          seed=0)})
        with torch.no_grad():
            out = compiled(ids, attention_mask=mask, **({"decoder_input_ids": ids} if arch == "t5" else {}))
        rows = [(r.name, r.replaced, r.flops_before, r.flops_after,
                 None if r.est_error is None else pytest.approx(r.est_error, rel=1e-4))
                for rep in reports for r in rep.rows if r.kind == "attention"]
        runs[impl] = (out.logits if arch == "llama" else out.last_hidden_state, rows)
    return runs


@pytest.mark.parametrize("arch", ["bert", "llama", "layoutlm", "t5"])
def test_hf_eager_attention_is_rewritten_as_its_sdpa_twin(arch):
    """``attn_implementation="eager"`` and ``"sdpa"`` compile to the same random-feature model: same rows,
    same measured errors, same output (a padded batch; Llama's GQA repeats its key/value heads; T5's
    self-attention has position biases, its two cross attentions are rewritten)."""
    runs = compiled_twins(arch, ("eager", "sdpa"), length=12)
    (y_eager, rows_eager), (y_sdpa, rows_sdpa) = runs["eager"], runs["sdpa"]
    assert len(rows_eager) == (6 if arch == "t5" else 2) and sum(r[1] for r in rows_eager) == 2, rows_eager
    assert rows_eager == rows_sdpa
    torch.testing.assert_close(y_eager, y_sdpa, rtol=1e-4, atol=1e-5)


def test_hf_openai_gpt_eager_attention_is_rewritten_and_keeps_its_masks():
    """GPT-1 keeps its keys transposed, multiplies and masks its scores by the causal buffer, then adds the
    padding mask: both attention layers are rewritten, and neither padded keys nor later tokens reach a token."""
    tf = pytest.importorskip("transformers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tf.OpenAIGPTModel(tf.OpenAIGPTConfig(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=64,
                                                     attn_implementation="eager")).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    compiled, reports = compile_panther(model, policy={"attention": SketchSpec(num_random_features=64, seed=0)})
    changed = ids.clone()
    changed[1, 8:] = (ids[1, 8:] + 1) % 64  # other padding tokens
    changed[0, 10:] = (ids[0, 10:] + 1) % 64  # other later tokens
    with torch.no_grad():
        y = compiled(ids, attention_mask=mask).last_hidden_state
        y_changed = compiled(changed, attention_mask=mask).last_hidden_state
    rows = [r for rep in reports for r in rep.rows if r.kind == "attention"]
    assert len(rows) == 2 and all(r.replaced for r in rows), [r.reason for r in rows]
    torch.testing.assert_close(y_changed[1, :8], y[1, :8])
    torch.testing.assert_close(y_changed[0, :10], y[0, :10])
    assert not torch.allclose(y_changed[0, 10:], y[0, 10:])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_decoding_steps_are_the_prefix_of_causal_rf_attention(impl):
    """Generating with a KV cache: each step's one query sees the keys its mask keeps, whatever the mask reads
    and though the cache length is symbolic from the second step on. So the steps' random-feature attention is
    the causal random-feature attention of the whole sequence at its last positions (a left-padded batch)."""
    steps, whole, rows = decode_steps_and_whole(impl, "cpu", FAST)
    assert all(r.replaced for r in rows), [r.reason for r in rows]
    torch.testing.assert_close(steps, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", ["buffer_fill", "einsum", "additive", "legacy_additive", "meta_llama",
                                   "buffer_additive", "two_masks", "gpt1", "timm", "flash_layout"])
def test_written_out_attention_is_read_for_every_length_under_dynamic_shapes(style):
    """Under ``dynamic=True`` one graph serves every length: masks built from the sequence length (a triangle of
    ``ones`` or ``full(-inf)``, a slice of a module's triangle buffer) and key padding are read for every length,
    and both lengths run random-feature attention. A scale of the symbolic head size (timm's ``q * d ** -0.5``
    on the queries, flash-attn's ``q / sqrt(d)``) goes into rf_attention's scale as a constant one does."""
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(Written(style).eval(), backend=panther_backend, dynamic=True,
                             options={**FAST, "report": reports.append, "policy": {"attention": SPEC}})
    scale, causal, padded = STYLES[style]
    compiles = []
    for length in (9, 13):
        q, k, v, keep = padded_qkv(length)
        with torch.no_grad():
            y = compiled(q, k, v, ~keep)
        compiles.append(len(reports))
        (row,) = reports[-1].rows
        assert row.replaced, row.reason
        ref = torch.ops.panther.rf_attention(q, k, v, features(SPEC, row.name), "softmax", causal, scale,
                                             ~keep if padded else None)
        torch.testing.assert_close(y, ref)
    assert compiles[0] == compiles[1], compiles  # the second length ran the graph of the first


def test_fairseq_layout_under_dynamic_shapes_says_so():
    """fairseq's ``(B·H, L, d)`` products are read as ``(B, H, L, d)`` only when ``B·H`` is a number; under
    ``dynamic=True`` its causal mask, added to the 3-D scores, stays exact for that reason."""
    torch._dynamo.reset()
    reports, model = [], Written("fairseq").eval()
    compiled = torch.compile(model, backend=panther_backend, dynamic=True,
                             options={**FAST, "report": reports.append, "policy": {"attention": SPEC}})
    q, k, v, pad = padded_qkv()
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, ~pad), model(q, k, v, ~pad))
    (row,) = reports[0].rows
    assert not row.replaced and "attn_mask under dynamic shapes" in row.reason, row.reason


def test_scales_that_are_graph_scalars_under_dynamic_shapes(qkv):
    """With ``dynamic=True`` a float attribute and ``√d`` of a symbolic size are scalars of the graph: the
    scale is computed there, and the attention rewritten as with constants."""
    q, k, v, _ = qkv

    class Scaled(nn.Module):
        scaling = 0.7

        def forward(self, q, k, v):
            s = (q @ k.transpose(-2, -1)) * self.scaling / math.sqrt(k.size(-1))
            return s.softmax(-1) @ v

    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(Scaled(), backend=panther_backend, dynamic=True,
                             options={**FAST, "report": reports.append, "policy": {"attention": SPEC}})
    with torch.no_grad():
        y = compiled(q, k, v)
    (row,) = reports[0].rows
    assert row.replaced and row.est_error is not None, row.reason
    ref = torch.ops.panther.rf_attention(q, k, v, features(SPEC, row.name), "softmax", False, 0.7 / math.sqrt(8), None)
    torch.testing.assert_close(y, ref)


def _written(product, scale, mask, cast, escape):
    """Attention written out from the given pieces (see the property test below)."""
    def fn(q, k, v, pad, t):
        L = q.shape[2]
        if scale == "q":
            q = q * 0.5
        s = {"transpose": lambda: q @ k.transpose(-2, -1), "mT": lambda: torch.matmul(q, k.mT),
             "einsum": lambda: torch.einsum("bhid,bhjd->bhij", q, k), "method": lambda: q.matmul(k.transpose(2, 3)),
             "kept_transposed": lambda: q @ k.transpose(1, 2).permute(0, 2, 3, 1),
             "folded": lambda: torch.bmm(q.flatten(0, 1), k.flatten(0, 1).mT).view(2, 3, L, L),
             "flash_layout": lambda: torch.einsum("bthd,bshd->bhts", q.transpose(1, 2), k.transpose(1, 2))}[product]()
        if scale in ("mul", "div", "tensor"):
            s = {"mul": lambda: s * 0.5, "div": lambda: s / 3.0, "tensor": lambda: s * t}[scale]()
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        i = torch.arange(L)
        if mask == "causal_fill":
            s = s.masked_fill(~causal, float("-inf"))
        elif mask == "padding_fill":
            s = s.masked_fill(pad[:, None, None, :], -1e9)
        elif mask == "hf_add":
            s = s + torch.where(~pad[:, None, None, :] & causal, torch.zeros(()), torch.finfo(s.dtype).min)
        elif mask == "const_add":
            s = s + torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
        elif mask == "legacy_add":
            s = s + (1.0 - (~pad).long()[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
        elif mask == "two_terms":
            s = s.masked_fill(~causal, float("-inf")) + torch.where(pad[:, None, None, :], -1e9, 0.0)
        elif mask == "where_keep":
            s = torch.where(causal, s, float("-inf"))
        elif mask == "multiplied":  # GPT-1: the 0/1 triangle multiplied, then masked by its complement
            b = causal.float()
            s = s * b + -1e4 * (1 - b)
        elif mask == "window":
            s = s.masked_fill((i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 3), float("-inf"))
        elif mask == "bias":
            s = s + (i[None, :] - i[:, None]).float() * 0.1
        p = s.float().softmax(-1).to(q.dtype) if cast else F.softmax(s, dim=-1)
        out = {"einsum": lambda: torch.einsum("bhij,bhjd->bhid", p, v), "method": lambda: p.matmul(v),
               "folded": lambda: torch.bmm(p.flatten(0, 1), v.flatten(0, 1)).view(2, 3, L, -1),
               "flash_layout": lambda: torch.einsum("bhts,bshd->bthd", p, v.transpose(1, 2)).transpose(1, 2)}.get(
            product, lambda: p @ v)()
        return (out, p) if escape else out
    return fn


@settings(max_examples=30, deadline=None)
@given(product=st.sampled_from(["transpose", "mT", "einsum", "method", "kept_transposed", "folded",
                                 "flash_layout"]),
       scale=st.sampled_from(["none", "q", "mul", "div", "tensor"]),
       mask=st.sampled_from(["none", "causal_fill", "padding_fill", "hf_add", "legacy_add", "const_add", "where_keep",
                             "multiplied", "two_terms", "window", "bias"]),
       cast=st.booleans(), escape=st.booleans())
def test_written_out_attention_is_rf_attention_or_left_exactly_alone(product, scale, mask, cast, escape):
    """Any combination of the pieces: rewritten, and then exactly the random-feature attention of what it
    means, or left alone, and then exactly the model's own output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    t = torch.tensor(0.5)
    fn = _written(product, scale, mask, cast, escape)
    compiled, reports = compile_panther(fn, policy={"attention": SPEC})
    with torch.no_grad():
        y = compiled(q, k, v, pad, t)
        ref = fn(q, k, v, pad, t)
    (row,) = reports[0].rows
    supported = scale != "tensor" and mask not in ("window", "bias") and not escape
    assert row.replaced == supported, row.reason
    if not supported:
        torch.testing.assert_close(y, ref, equal_nan=True)
        return
    # a factor of the queries goes into the scale, also one applied before a reshape or a transpose
    factor = {"none": 1.0, "q": 0.5, "mul": 0.5, "div": 1 / 3.0}[scale]
    causal = mask in ("causal_fill", "hf_add", "const_add", "where_keep", "multiplied", "two_terms")
    kpm = pad if mask in ("padding_fill", "hf_add", "legacy_add", "two_terms") else None
    expect = torch.ops.panther.rf_attention(q, k, v, features(SPEC, row.name), "softmax", causal, factor, kpm)
    torch.testing.assert_close(y, expect)


# ---------------------------------------------------------------------------------------------- flex_attention

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 4)


KEEP = torch.ones(2, 128, dtype=torch.bool)
KEEP[1, 100:] = False  # the second sequence is padded
DOCUMENT = torch.arange(128) // 32


def _padded_causal(b, h, q_idx, kv_idx):
    return KEEP[b, kv_idx] & (q_idx >= kv_idx)


def _documents(b, h, q_idx, kv_idx):
    return DOCUMENT[q_idx] == DOCUMENT[kv_idx]


@pytest.fixture(scope="module")
def flex_inputs():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 128, 8, generator=g) for _ in range(3))
    kg, vg = (torch.randn(2, 2, 128, 8, generator=g) for _ in range(2))
    masks = {name: flex.create_block_mask(fn, B, None, 128, 128, device="cpu")
             for name, fn, B in (("causal", _causal, None), ("window", _window, None), ("padded", _padded_causal, 2),
                                 ("documents", _documents, None))}
    return q, k, v, kg, vg, masks


@pytest.mark.parametrize("case", ["causal", "none", "gqa", "padded"])
def test_flex_attention_with_a_causal_or_no_mask_is_rf_attention(case, flex_inputs, monkeypatch):
    from fx_passes import sketch_flex_attention

    monkeypatch.setattr(sketch_flex_attention, "_BLOCK", 1000)  # the mask is checked over several row blocks
    monkeypatch.setattr(sketch_flex_attention, "_PATTERNS", {})
    q, k, v, kg, vg, masks = flex_inputs
    kk, vv = (kg, vg) if case == "gqa" else (k, v)
    call = {"causal": lambda q, k, v: flex.flex_attention(q, k, v, block_mask=masks["causal"]),
            "padded": lambda q, k, v: flex.flex_attention(q, k, v, block_mask=masks["padded"]),
            "none": lambda q, k, v: flex.flex_attention(q, k, v, scale=0.3),
            "gqa": lambda q, k, v: flex.flex_attention(q, k, v, block_mask=masks["causal"], enable_gqa=True)}[case]
    compiled, reports = compile_panther(call, policy={"attention": SPEC})
    with torch.no_grad():
        y = compiled(q, kk, vv)
    (row,) = reports[0].rows
    assert row.replaced and (row.op_before, row.op_after) == ("flex_attention", "panther.rf_attention"), row.reason
    assert row.est_error is not None
    if case == "gqa":
        kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)
    ref = torch.ops.panther.rf_attention(q, kk, vv, features(SPEC, row.name), "softmax", case != "none",
                                         0.3 if case == "none" else None, ~KEEP if case == "padded" else None)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("case", ["causal", "window"])
def test_flex_attention_masks_are_read_for_every_length_under_dynamic_shapes(case, monkeypatch):
    """Self-attention (q, k and v of one symbolic length) under ``dynamic=True``: the mask_mod is read for every
    length, not evaluated at one; causal is rewritten, a window stays exact."""
    from fx_passes import sketch_flex_attention

    symbolic = []
    for_every_length = sketch_flex_attention._pattern_for_every_length
    monkeypatch.setattr(sketch_flex_attention, "_pattern_for_every_length",
                        lambda *a: symbolic.append(a) or for_every_length(*a))
    torch._dynamo.reset()
    reports = []
    compiled = torch.compile(lambda qkv, bm: flex.flex_attention(*qkv.unbind(0), block_mask=bm),
                             backend=panther_backend, dynamic=True,
                             options={**FAST, "report": reports.append, "policy": {"attention": SPEC}})
    qkv = torch.randn(3, 2, 4, 256, 8, generator=torch.Generator().manual_seed(4))
    block_mask = flex.create_block_mask(_causal if case == "causal" else _window, None, None, 256, 256, device="cpu")
    with torch.no_grad():
        y = compiled(qkv, block_mask)
    (row,) = reports[0].rows
    assert symbolic  # the sizes were symbolic
    if case == "window":
        assert not row.replaced and "neither causal nor full" in row.reason, row.reason
        torch.testing.assert_close(y, flex.flex_attention(*qkv.unbind(0), block_mask=block_mask))
        return
    assert row.replaced, row.reason
    q, k, v = qkv.unbind(0)
    torch.testing.assert_close(y, torch.ops.panther.rf_attention(q, k, v, features(SPEC, row.name), "softmax", True,
                                                                 None, None))


def test_the_measuring_run_computes_flex_attention_through_sdpa(flex_inputs, monkeypatch):
    """Outside a compiled kernel flex_attention computes every score; the run that samples the attention
    inputs computes the calls it can rewrite through SDPA instead, with the same result."""
    from fx_passes import attention_sample

    q, k, v, kg, vg, masks = flex_inputs
    seen = {}
    sample_attention = attention_sample.sample_attention

    def spy(gm, inputs, samplers, stand_ins=None):
        seen.update(stand_ins or {})
        return sample_attention(gm, inputs, samplers, stand_ins)

    monkeypatch.setattr(attention_sample, "sample_attention", spy)
    call = lambda q, k, v: flex.flex_attention(q, k, v, block_mask=masks["causal"], enable_gqa=True)  # noqa: E731
    compiled, reports = compile_panther(call, policy={"attention": SPEC})
    with torch.no_grad():
        compiled(q, kg, vg)
    (row,) = reports[0].rows
    assert row.replaced and row.est_error is not None
    (node, run), = seen.items()
    assert node.target is torch.ops.higher_order.flex_attention
    exact = torch.compile(call, backend="aot_eager")(q, kg, vg)
    torch.testing.assert_close(run((q, kg, vg), {})[0], exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, reason", [
    ("window", "neither causal nor full"),
    ("documents", "reads tensors other than as key padding"),
    ("bias", "a score_mod changes the scores"),
    ("lse", "log-sum-exp output is used"),
])
def test_flex_attention_left_alone_with_the_reason(case, reason, flex_inputs):
    q, k, v, _, _, masks = flex_inputs
    call = {"window": lambda q, k, v: flex.flex_attention(q, k, v, block_mask=masks["window"]),
            "documents": lambda q, k, v: flex.flex_attention(q, k, v, block_mask=masks["documents"]),
            "bias": lambda q, k, v: flex.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + (j - i) * 0.1),
            "lse": lambda q, k, v: flex.flex_attention(q, k, v, return_lse=True)[1]}[case]
    compiled, reports = compile_panther(call, policy={"attention": SPEC})
    torch._dynamo.reset()
    with torch.no_grad():
        y = compiled(q, k, v)
        ref = torch.compile(call, backend="aot_eager")(q, k, v)
    (row,) = reports[0].rows
    assert not row.replaced and reason in row.reason, row.reason
    torch.testing.assert_close(y, ref)


def test_hf_flex_attention_is_rewritten_as_its_sdpa_twin():
    """Hugging Face's flex_attention mask is ``padding[b, kv] & (kv <= q)``: the padding becomes rf_attention's
    key padding, and the model compiles to the same random-feature model as with ``attn_implementation="sdpa"``
    (its layers named alike, though this path breaks the graph in ``LlamaForCausalLM.forward``; the error is
    measured through the SDPA stand-in)."""
    runs = compiled_twins("llama", ("flex_attention", "sdpa"), length=128, layers=1, padded=slice(0, 16))
    (y_flex, rows_flex), (y_sdpa, rows_sdpa) = runs["flex_attention"], runs["sdpa"]
    assert [r[:2] for r in rows_flex] == [("model.layers.0.self_attn", True)], rows_flex
    # the same but for the dense cost: flex skips the masked blocks, SDPA under a mask computes them all
    assert [r[:2] + r[3:] for r in rows_flex] == [r[:2] + r[3:] for r in rows_sdpa]
    assert rows_flex[0][2] == rows_sdpa[0][2] // 2
    torch.testing.assert_close(y_flex[1, 16:], y_sdpa[1, 16:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_flex[0], y_sdpa[0], rtol=1e-4, atol=1e-5)


def test_a_linear_style_spec_on_attention_reports_the_features_it_used(qkv):
    """A catch-all policy entry gives attention a spec with L and k; the row names the m it gets (4·d)."""
    q, k, v, pad = qkv
    compiled, reports = compile_panther(Written("timm").eval(), policy={"*": SketchSpec(num_terms=1, low_rank=8)})
    with torch.no_grad():
        compiled(q, k, v, pad)
    (row,) = reports[0].rows
    assert row.replaced and row.spec.num_random_features == 4 * q.shape[-1]
    assert f"m={4 * q.shape[-1]}, softmax; output err" in str(reports[0]) and "None" not in str(reports[0])


def test_an_attention_layer_called_twice_shares_its_features(qkv):
    """ALBERT applies one layer again and again: both calls get the layer's one draw of random features (one
    buffer in the graph), and the second rewrite must still know that buffer's shape."""
    q, k, v, _ = qkv

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Written("timm")

        def forward(self, q, k, v, pad):
            return self.attn(self.attn(q, k, v, pad), k, v, pad)

    compiled, reports = compile_panther(Shared().eval(), policy={"attention": SPEC})
    with torch.no_grad():
        y = compiled(q, k, v, None)
    assert [(r.name, r.replaced) for r in reports[0].rows] == [("attn", True), ("attn#1", True)]
    P = features(SPEC, "attn")
    once = torch.ops.panther.rf_attention(q, k, v, P, "softmax", False, 8 ** -0.5, None)
    torch.testing.assert_close(y, torch.ops.panther.rf_attention(once, k, v, P, "softmax", False, 8 ** -0.5, None))


@pytest.mark.parametrize("form", ["sdpa", "written"])
def test_one_key_value_head_broadcast_to_the_query_heads(form, qkv):
    """Multi-query attention (Falcon): one key/value head that SDPA and matmul broadcast to every query head is
    rf_attention on the repeated head."""
    q, k, v, _ = qkv
    k1, v1 = k[:, :1], v[:, :1]
    fn = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v)) if form == "sdpa" else \
        (lambda q, k, v: (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1) @ v)
    compiled, reports = compile_panther(fn, policy={"attention": SPEC})
    with torch.no_grad():
        y = compiled(q, k1, v1)
    (row,) = reports[0].rows
    assert row.replaced and row.est_error is not None, row.reason
    ref = torch.ops.panther.rf_attention(q, k1.expand_as(q), v1.expand_as(q), features(SPEC, row.name), "softmax",
                                         False, 8 ** -0.5, None)
    torch.testing.assert_close(y, ref)
