"""RandMultiHeadAttention: multi-head attention in linear time through random features."""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.attention import RFState, dropped_keys, rf_attention_step, rf_causal_state
from ..sketch import orthogonal_random_features
from ._checks import input_matches, make_generator
from ._triton_ops import LazyTritonOp
from .srpe import sinSRPE

__all__ = ["RandAttentionState", "RandMultiHeadAttention"]

triton_attention = LazyTritonOp("inductor_ext.triton_attention", "rf_attention_triton")
triton_step = LazyTritonOp("inductor_ext.triton_rf_step", "rf_attention_step_triton")   # one token, one kernel


_KERNELS = ("softmax", "relu")


def _verify(embed_dim, num_heads, num_random_features, dropout, bias, kernel_fn, iscausal, SRPE):
    for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads),
                      ("num_random_features", num_random_features)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be a positive int, got {type(val).__name__} {val!r}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if embed_dim <= 0:
        raise ValueError(f"embed_dim must be positive, got {embed_dim}")
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if num_random_features <= 0:
        raise ValueError(f"num_random_features must be a positive int, got {num_random_features}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be a bool, got {bias!r}")
    if kernel_fn not in _KERNELS:
        raise ValueError(f"kernel_fn must be 'softmax' or 'relu', got {kernel_fn!r}")
    if not isinstance(iscausal, bool):
        raise ValueError(f"iscausal must be a bool, got {iscausal!r}")
    if SRPE is not None:
        if not isinstance(SRPE, sinSRPE):
            raise TypeError(f"SRPE must be a panther.nn.sinSRPE or None, got {type(SRPE).__name__}")
        if SRPE.num_heads != num_heads or SRPE.perHead_in != embed_dim // num_heads:
            raise ValueError(
                f"SRPE was built for num_heads={SRPE.num_heads}, perHead_in={SRPE.perHead_in}; "
                f"this layer has num_heads={num_heads}, head dim {embed_dim // num_heads}")


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention with random-feature (Performer / FAVOR+) kernels: linear in the
    sequence length, batch-first.

    ``out = W0 · concat_h Attn_h(query Wqᵀ + bq, key Wkᵀ + bk, value Wvᵀ + bv) + b0`` where each
    head computes ``(φ(Q) φ(K)ᵀ ⊙ M) V / rowsum`` through ``torch.ops.panther.rf_attention``
    without forming the ``Lq × S`` matrix.

    Args:
        embed_dim: model dimension ``E``.
        num_heads: number of heads ``H`` (``E % H == 0``).
        num_random_features: number ``m`` of random features per head.
        dropout: attention dropout probability in ``[0, 1)``. In training mode every head drops
            whole key columns of its normalised attention matrix (mask shared by all queries of
            that head, independent across batch, heads and keys) and rescales by ``1/(1-p)``;
            implemented exactly by dropping the rows of that head's value tensor after the
            normalisation is fixed, so the output is an unbiased estimate of the undropped one.
            Identity in eval mode.
        bias: learnable biases ``bq, bk, bv, b0`` (zeros at init; ``None`` when False).
        kernel_fn: ``"softmax"`` (positive random features, unbiased for ``exp(q·k/√d)``) or
            ``"relu"`` (``relu(xΩᵀ)/√m``, the order-1 arc-cosine kernel).
        iscausal: causal (autoregressive) attention; needs equal query and key lengths.
        SRPE: optional :class:`panther.nn.sinSRPE` relative positional encoding; queries/keys
            become ``R = SRPE.num_realizations``-dimensional and the projection is ``(m, R)``.
        device: of the parameters and buffers (default: CPU).
        dtype: of the parameters and buffers (default: ``torch.get_default_dtype()``).
        seed: an int that builds a private generator for the initial weights and the random
            features, also used by :meth:`redraw_features`.
        generator: a ``torch.Generator`` to draw the initial weights and features from. With
            neither, torch's global RNG is used (so ``torch.manual_seed`` makes construction
            reproducible).

    Parameters ``Wq, Wk, Wv, W0`` ``(E, E)`` (Xavier-uniform, ``nn.Linear`` layout), biases
    ``bq, bk, bv, b0`` ``(E,)``; buffer ``projection_matrix`` ``(m, E/H)`` (or ``(m, R)``) of
    orthogonal random features (rows marginally ``N(0, I)``), redrawn by
    :meth:`redraw_features`.

    ``forward(query (B, Lq, E), key (B, S, E), value (B, S, E), attention_mask=None, *, state=None)``
    returns ``(output (B, Lq, E), None)``. ``attention_mask`` is a key-padding mask ``(B, S)`` of dtype
    bool, True = ignore that key (the ``nn.MultiheadAttention`` convention); it combines with
    ``iscausal``. A query that sees no unmasked key gets a zero attention output. ``state``, a
    :class:`RandAttentionState`, makes a causal layer go on from the positions it saw in earlier calls
    (generation: the prompt once, then one token per call, in time and memory independent of the length).

    Raises:
        TypeError: a size that is not an int, ``dropout`` not a number, ``SRPE`` not a
            :class:`~panther.nn.sinSRPE`.
        ValueError: a size ``<= 0``, ``embed_dim`` not divisible by ``num_heads``, ``dropout`` outside
            ``[0, 1)``, an unknown ``kernel_fn``, ``bias``/``iscausal`` not bools, an ``SRPE`` built for
            other head sizes.
    """

    def __init__(self, embed_dim, num_heads, num_random_features, dropout=0.0, bias=True,
                 kernel_fn="softmax", iscausal=False, SRPE=None, device=None, dtype=None, *,
                 seed=None, generator=None):
        _verify(embed_dim, num_heads, num_random_features, dropout, bias, kernel_fn, iscausal,
                SRPE)
        super().__init__()
        triton_attention.load()
        if iscausal:
            triton_step.load()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_random_features = num_random_features
        self.dropout = float(dropout)
        self.bias = bias
        self.kernel_fn = kernel_fn
        self.causal = iscausal
        self.srpe = SRPE
        factory = dict(device=device, dtype=dtype or torch.get_default_dtype())
        gen = make_generator(seed, generator)
        self._generator = gen if seed is not None else None
        E = embed_dim
        for name in ("Wq", "Wk", "Wv", "W0"):
            w = torch.empty(E, E, **factory)
            _xavier_uniform(w, gen)
            setattr(self, name, nn.Parameter(w))
        for name in ("bq", "bk", "bv", "b0"):
            if bias:
                setattr(self, name, nn.Parameter(torch.zeros(E, **factory)))
            else:
                self.register_parameter(name, None)
        self.register_buffer("projection_matrix",
                             orthogonal_random_features(num_random_features, self.feature_dim,
                                                        generator=gen, **factory))

    @property
    def iscausal(self):
        """Whether the attention is causal (the constructor's ``iscausal``)."""
        return self.causal

    @property
    def feature_dim(self):
        """The dimension the random features act on (the head dim, or the SRPE's realisations)."""
        return self.srpe.num_realizations if self.srpe is not None else self.head_dim

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_random_features={self.num_random_features}, dropout={self.dropout}, "
                f"bias={self.bias}, kernel_fn={self.kernel_fn!r}, iscausal={self.causal}")

    @torch.no_grad()
    def redraw_features(self, generator=None):
        """Draw a fresh ``projection_matrix`` in place (from ``generator``, else the layer's
        private generator if it was built with ``seed=``, else torch's global RNG)."""
        gen = generator if generator is not None else self._generator
        new = orthogonal_random_features(self.num_random_features, self.feature_dim,
                                         generator=gen, device=self.projection_matrix.device,
                                         dtype=self.projection_matrix.dtype)
        self.projection_matrix.copy_(new)

    def _check_forward(self, query, key, value, attention_mask):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not torch.is_tensor(t) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"{name} must be a batch-first (B, L, {self.embed_dim}) tensor, "
                                 f"got {shape}")
            input_matches("RandMultiHeadAttention", name, t, self.Wq)
        B, Lq, S = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[0] != B or value.shape[0] != B or value.shape[1] != S:
            raise ValueError(f"query, key, value must be (B, Lq, E), (B, S, E), (B, S, E); got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if self.causal and Lq != S:
            raise ValueError(f"iscausal=True needs equal query and key lengths, got {Lq} and {S}")
        if attention_mask is not None:
            if (not torch.is_tensor(attention_mask) or attention_mask.dtype != torch.bool
                    or tuple(attention_mask.shape) != (B, S)):
                desc = (f"{attention_mask.dtype} tensor of shape {tuple(attention_mask.shape)}"
                        if torch.is_tensor(attention_mask) else type(attention_mask).__name__)
                raise ValueError(
                    f"attention_mask must be a key-padding mask: a bool tensor of shape (B, S) = "
                    f"({B}, {S}) with True = ignore that key; got {desc}")

    def forward(self, query, key, value, attention_mask=None, *, state=None):
        """Attend from ``query`` to ``key``/``value`` (batch-first).

        Args:
            query: ``(B, Lq, E)``.
            key: ``(B, S, E)``.
            value: ``(B, S, E)``.
            attention_mask: optional key-padding mask, a bool tensor ``(B, S)`` with True = ignore that
                key; combines with ``iscausal``.
            state: a :class:`RandAttentionState` (causal layers only): this call's positions follow those
                the layer saw through it before, and the state then holds them too. None: a whole sequence.

        Returns:
            ``(output, None)``: ``output`` is ``(B, Lq, E)``; random-feature attention never forms the
            attention weights, so the second element is always ``None``.

        Raises:
            TypeError: (outside autocast) an input whose dtype is not the layer's; a ``state`` that is not a
                :class:`RandAttentionState`.
            ValueError: inputs that are not ``(B, L, E)`` tensors with matching batch and key/value
                lengths, ``Lq != S`` with ``iscausal``, a mask of the wrong dtype or shape, inputs on
                another device, a ``state`` on a layer that is not causal or of another batch size.
        """
        self._check_forward(query, key, value, attention_mask)
        if state is not None:
            if not isinstance(state, RandAttentionState):
                raise TypeError(f"state must be a panther.nn.RandAttentionState or None, got {type(state).__name__}")
            if not self.causal:
                raise ValueError("state: only a causal layer (iscausal=True) goes on from the positions it saw")
        seen = state[self] if state is not None else None
        B, Lq, S = query.shape[0], query.shape[1], key.shape[1]
        H, dh = self.num_heads, self.head_dim
        q = F.linear(query, self.Wq, self.bq).view(B, Lq, H, dh)
        k = F.linear(key, self.Wk, self.bk).view(B, S, H, dh)
        v = F.linear(value, self.Wv, self.bv).view(B, S, H, dh)
        if self.srpe is not None:  # (B, L, H, R), no (B, L, H, d, R) intermediate
            q, k = self.srpe.filter(q, k, seen.length if seen is not None else 0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.training and self.dropout > 0:
            v = dropped_keys(v, self.dropout)
        # CUDA: the fused Triton kernels (feature maps never reach HBM); they route what they do not cover
        # (float64, wide heads, m > 256) to the C++ op themselves.
        if seen is not None:
            step = triton_step.for_input(q, rf_attention_step)
            out, state[self] = step(q, k, v, self.projection_matrix, self.kernel_fn, None, attention_mask, seen)
        else:
            attend = triton_attention.for_input(q, torch.ops.panther.rf_attention)
            out = attend(q, k, v, self.projection_matrix, self.kernel_fn, self.causal, None, attention_mask)
            if state is not None:
                state[self] = rf_causal_state(k, v, self.projection_matrix, self.kernel_fn, None,
                                              attention_mask)
        out = out.transpose(1, 2).reshape(B, Lq, self.embed_dim)
        return F.linear(out, self.W0, self.b0), None

    @classmethod
    def from_mha(cls, mha, num_random_features, kernel_fn="softmax", iscausal=False, *,
                 seed=None, generator=None):
        """Build a :class:`RandMultiHeadAttention` holding copies of an
        ``nn.MultiheadAttention``'s weights (same dropout, device and dtype).

        The result is always batch-first, whatever ``mha.batch_first`` is. Separate
        ``kdim``/``vdim``, ``bias_k``/``bias_v`` and ``add_zero_attn`` have no counterpart and
        raise ``ValueError``.

        Args:
            mha: the ``nn.MultiheadAttention`` to copy (not modified).
            num_random_features: ``m``, as in the constructor.
            kernel_fn: ``"softmax"`` or ``"relu"``, as in the constructor.
            iscausal: causal attention, as in the constructor.
            seed: private generator seed, as in the constructor.
            generator: generator to draw the random features from, as in the constructor.

        Returns:
            A new layer of this class.

        Raises:
            TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
            ValueError: an unsupported configuration (see above), or biases on only one of the input
                and output projections.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("from_mha: kdim/vdim different from embed_dim are not supported")
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError("from_mha: bias_k/bias_v (add_bias_kv=True) are not supported")
        if mha.add_zero_attn:
            raise ValueError("from_mha: add_zero_attn=True is not supported")
        w = mha.in_proj_weight
        has_bias = mha.in_proj_bias is not None
        if has_bias != (mha.out_proj.bias is not None):
            raise ValueError("from_mha: input and output projections must both have biases or "
                             "both have none")
        layer = cls(mha.embed_dim, mha.num_heads, num_random_features, dropout=mha.dropout,
                    bias=has_bias, kernel_fn=kernel_fn, iscausal=iscausal, device=w.device,
                    dtype=w.dtype, seed=seed, generator=generator)
        E = mha.embed_dim
        with torch.no_grad():
            layer.Wq.copy_(w[:E])
            layer.Wk.copy_(w[E:2 * E])
            layer.Wv.copy_(w[2 * E:])
            layer.W0.copy_(mha.out_proj.weight)
            if has_bias:
                b = mha.in_proj_bias
                layer.bq.copy_(b[:E])
                layer.bk.copy_(b[E:2 * E])
                layer.bv.copy_(b[2 * E:])
                layer.b0.copy_(mha.out_proj.bias)
        return layer


class RandAttentionState:
    """The decoding state of causal :class:`RandMultiHeadAttention` layers, passed as ``state=`` to each of
    them: per layer, an :class:`panther.ops.RFState` of running sums, ``(B, H, m, d)`` per layer whatever the
    number of positions seen, where exact attention keeps every key and value (a KV cache).

    Generation: one ``RandAttentionState()`` per sequence batch, the prompt in one call, then one token per
    call; each call's output equals the layer's output on the whole sequence so far at those positions (up to
    rounding). ``index_select`` reorders the batch (beam search); a new batch needs a new state.
    :meth:`to_static` gives the same state in fixed buffers, for CUDA graphs.
    """

    def __init__(self):
        self._states = weakref.WeakKeyDictionary()   # layer -> RFState, dropped with the layer
        self._static = False

    def __getitem__(self, layer):
        """The layer's :class:`panther.ops.RFState`, or None before its first call."""
        return self._states.get(layer)

    def __setitem__(self, layer, rf_state):
        if not isinstance(rf_state, RFState):
            raise TypeError(f"a layer's state must be a panther.ops.RFState, got {type(rf_state).__name__}")
        if not self._static:
            self._states[layer] = rf_state
            return
        held = self._states.get(layer)
        if held is None:
            raise ValueError("a static RandAttentionState holds only the layers it held at to_static(): pass the "
                             "prompt through every causal layer before calling it")
        if rf_state.kv.shape != held.kv.shape:
            raise ValueError(f"a static RandAttentionState keeps its batch: sums of shape {tuple(held.kv.shape)}, "
                             f"got {tuple(rf_state.kv.shape)}")
        with torch.no_grad():   # decoding buffers: no step's autograd graph is chained onto them
            for buffer, value in zip(held, rf_state):   # the same memory, so a captured graph reads the new values
                buffer.copy_(torch.as_tensor(value))

    def __len__(self):
        """The number of layers holding a state."""
        return len(self._states)

    @property
    def static(self):
        """Whether the sums live in fixed buffers that every call updates in place (:meth:`to_static`)."""
        return self._static

    @property
    def length(self):
        """The positions the layers have seen (0 before the first call)."""
        return max((int(s.length) for s in self._states.values()), default=0)

    @property
    def nbytes(self):
        """Bytes held by all layers' sums."""
        return sum(t.numel() * t.element_size() for s in self._states.values() for t in s[:3])

    def index_select(self, index):
        """Keep the batch rows ``index`` (a 1-D int tensor), in that order, in every layer's state."""
        for layer, s in list(self._states.items()):
            self[layer] = s.index_select(index.to(s.kv.device))

    def to_static(self):
        """This state in fixed buffers, for CUDA graphs (``torch.compile(..., mode="reduce-overhead")``).

        Every later call writes the layer's new sums into the same tensors (marked static for
        ``torch.compile``) and counts the positions in a 0-dim int64 tensor on the sums' device instead of an
        int, so one step's graph serves every token: nothing it reads changes address or value on the host.
        Call it after the prompt (which takes the fused kernels), for the decoding steps; a static state takes no
        new layers, keeps its batch size (``index_select`` reorders in place, an index of another length is a
        ``ValueError``) and carries no gradient (its buffers are detached and written without autograd).

        Returns:
            A new static :class:`RandAttentionState`; this one is left as it was.

        Raises:
            ValueError: the state holds no layer yet.
        """
        if not self._states:
            raise ValueError("to_static: the state holds no layer yet; pass the prompt through the model with it first")
        static = RandAttentionState()
        for layer, s in self._states.items():
            buffers = RFState(s.kv.detach().clone(), s.k_sum.detach().clone(), s.shift.detach().clone(),
                              torch.tensor(int(s.length), device=s.kv.device))
            for t in buffers:
                torch._dynamo.mark_static_address(t)
            static._states[layer] = buffers
        static._static = True
        return static


def _xavier_uniform(w, generator):
    fan_in, fan_out = w.shape[1], w.shape[0]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        if generator is None or generator.device == w.device:
            w.uniform_(-bound, bound, generator=generator)
        else:  # private CPU generator, parameters elsewhere
            w.copy_(torch.empty(w.shape, dtype=w.dtype).uniform_(-bound, bound,
                                                                 generator=generator))
