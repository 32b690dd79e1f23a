"""The sine-SRPE contraction with its bases computed on chip: ``panther::srpe_filter_sines``.

``out[b, n, h, r] = sum_{i, j} x[b, n, h, i] omega[n, h, i, j] weight[h, i, j, r]`` with the bases
``omega[n, h, i, :] = [cos(theta n + phase), sin(theta n + phase)]`` (``panther.ops.attention.
sine_bases``), the contraction of ``panther::srpe_filter`` without its ``omega`` input. That input
holds ``L·H·d·2S`` values: at 65,536 positions, 16 heads, d = 64 and 8 sines, 1.07e9 (2 GiB in
bf16, per queries and keys). The Triton kernel builds each (positions × features × sines) block of
``x · omega`` in registers from theta and the phases and feeds it to the tensor cores against the
matching rows of ``weight``; nothing of size ``L·d·S`` reaches HBM.

Registered as ``torch.library.triton_op``: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``)
take the kernel; other calls build the bases and call ``panther::srpe_filter``. The backward builds
the bases of a few thousand positions at a time (in ``x``'s dtype, as the forward of
``sinSRPE.filter`` did before this op), calls ``panther::srpe_filter_backward`` on them and carries
d omega to theta and the phases.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

import panther  # noqa: F401  (loads the native ops)
from panther.ops.attention import sine_bases

try:  # Triton is optional: without it every call takes the C++ op.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["srpe_filter_sines", "srpe_filter_sines_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID = 65535      # CUDA's limit on a launch grid's second dimension (B·H)
# launch: rows of W per product (features·sines; tl.dot needs 16), outputs per program, warps.
# Compiled offline for sm_90 (bf16, 8 sines, R = 256): 208 registers, 54 KB of shared memory; not
# yet timed on a GPU.
_ROWS_PER_PRODUCT = 32
_BLOCK_R = 128
_WARPS = 4
# the backward builds the bases of this many bytes of positions at a time: 4096 positions at 16
# heads, d = 64, 8 sines (fp32)
_BACKWARD_CHUNK_BYTES = 256 * 2 ** 20


if triton is not None:
    @triton.jit
    def _srpe_sines_kernel(X, THETA, PHASE, W, OUT, L, H, D, S, R,
                           sxb, sxl, sxh, sxd, sob, sol, soh, sor,
                           HAS_PHASE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_I: tl.constexpr, S_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
        """One block of positions of one (b, h), BLOCK_R outputs: per block of BLOCK_I features,
        the (positions × features·sines) products x·cos and x·sin on chip, each against its rows
        of W (H, D, 2S, R contiguous). Grid (position blocks, B·H, output blocks)."""
        pn = tl.program_id(0)
        bh = tl.program_id(1)
        pr = tl.program_id(2)
        b = bh // H
        h = bh % H
        rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < L
        offs_r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_s = tl.arange(0, S_PAD)
        s_ok = offs_s < S
        pos = rows.to(tl.float32)
        x_base = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + rows.to(tl.int64)[:, None] * sxl
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for i0 in range(0, D, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            i_ok = offs_i < D
            xt = tl.load(x_base + offs_i[None, :] * sxd, mask=row_ok[:, None] & i_ok[None, :],
                         other=0.0).to(tl.float32)                          # (N, I)
            hi = (h * D + offs_i)[:, None]
            is_ok = i_ok[:, None] & s_ok[None, :]
            th = tl.load(THETA + hi * S + offs_s[None, :], mask=is_ok, other=0.0)   # (I, S)
            ang = pos[:, None, None] * th[None, :, :]                          # as sine_bases
            if HAS_PHASE:
                ang += tl.load(PHASE + hi * S + offs_s[None, :], mask=is_ok, other=0.0)[None, :, :]
            xc = tl.reshape(xt[:, :, None] * tl.cos(ang), (BLOCK_N, BLOCK_I * S_PAD))
            xs = tl.reshape(xt[:, :, None] * tl.sin(ang), (BLOCK_N, BLOCK_I * S_PAD))
            # rows (i, j) of W: cosines j = s, sines j = S + s (padded sines and features: 0)
            w_row = tl.reshape(hi * (2 * S) + offs_s[None, :], (BLOCK_I * S_PAD,))
            w_ok = tl.reshape(is_ok, (BLOCK_I * S_PAD,))[:, None] & r_ok[None, :]
            wc = tl.load(W + w_row.to(tl.int64)[:, None] * R + offs_r[None, :], mask=w_ok, other=0.0)
            ws = tl.load(W + (w_row + S).to(tl.int64)[:, None] * R + offs_r[None, :], mask=w_ok,
                         other=0.0)
            if UPCAST:
                acc += tl.dot(xc, wc.to(tl.float32), input_precision="ieee")
                acc += tl.dot(xs, ws.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xc.to(wc.dtype), wc)
                acc += tl.dot(xs.to(ws.dtype), ws)
        tl.store(OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows.to(tl.int64)[:, None] * sol
                 + offs_r[None, :] * sor, acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & r_ok[None, :])


def _check(x, theta, phase, weight):
    if x.dim() != 4 or theta.dim() != 3 or weight.dim() != 4:
        raise ValueError("srpe_filter_sines: expected x (B, L, H, d), theta (H, d, S), "
                         f"weight (H, d, 2S, R); got {tuple(x.shape)}, {tuple(theta.shape)}, "
                         f"{tuple(weight.shape)}")
    B, L, H, d = x.shape
    S = theta.shape[2]
    if tuple(theta.shape) != (H, d, S) or tuple(weight.shape[:3]) != (H, d, 2 * S) or (
            phase is not None and tuple(phase.shape) != (H, d, S)):
        raise ValueError(f"srpe_filter_sines: inconsistent shapes x {tuple(x.shape)}, theta "
                         f"{tuple(theta.shape)}, phase {None if phase is None else tuple(phase.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype not in (*_DTYPES, torch.float64) or weight.dtype != x.dtype:
        raise TypeError("srpe_filter_sines: x and weight must share one floating dtype, got "
                        f"{x.dtype} and {weight.dtype}")
    if not theta.is_floating_point() or (phase is not None and phase.dtype != theta.dtype):
        raise TypeError("srpe_filter_sines: theta and phase must share one floating dtype")


def kernel_ok(x, theta, weight):
    """Whether the Triton kernel serves the call: CUDA (or the interpreter's CPU tensors), fp16 /
    bf16 / fp32, fp32 angles, a grid within CUDA's limits, nothing empty."""
    if triton is None or not (x.is_cuda or _INTERPRET) or x.dtype not in _DTYPES:
        return False
    B, L, H, d = x.shape
    return (theta.dtype == torch.float32 and 0 < B * H <= _MAX_GRID and L > 0 and d > 0
            and theta.shape[2] > 0 and weight.shape[3] > 0)


def _launcher(kernel):
    # Eager interpreter runs call the kernel directly (wrap_triton rejects CPU tensors there).
    return kernel if _INTERPRET else torch.library.wrap_triton(kernel)


def _launch(x, theta, phase, weight):
    B, L, H, d = x.shape
    S, R = theta.shape[2], weight.shape[3]
    out = torch.empty((B, L, H, R), device=x.device, dtype=x.dtype)
    upcast = _INTERPRET or x.dtype == torch.float32
    # the products' operand: fp32 for fp32 inputs, else fp16 (x·omega is within |x|, W small)
    w = weight.contiguous().to(torch.float32 if upcast else torch.float16)
    S_PAD = triton.next_power_of_2(S)
    BLOCK_I = max(1, _ROWS_PER_PRODUCT // S_PAD)   # rows of W per product: at least 16 (tl.dot)
    BLOCK_R = min(max(triton.next_power_of_2(R), 16), _BLOCK_R)
    BLOCK_N = 64
    grid = (triton.cdiv(L, BLOCK_N), B * H, triton.cdiv(R, BLOCK_R))
    _launcher(_srpe_sines_kernel)[grid](x, theta.contiguous(), phase.contiguous() if phase is not None else theta, w,
                   out, L, H, d, S, R, *x.stride(), *out.stride(),
                   HAS_PHASE=phase is not None, UPCAST=upcast, BLOCK_N=BLOCK_N, BLOCK_I=BLOCK_I,
                   S_PAD=S_PAD, BLOCK_R=BLOCK_R, num_warps=_WARPS)
    return out


def srpe_filter_sines_reference(x, theta, phase, weight):
    """Plain torch: the bases (``sine_bases``, in x's dtype) into ``panther::srpe_filter``."""
    omega = sine_bases(theta, phase, x.shape[1]).to(x.dtype)
    return torch.ops.panther.srpe_filter(x, omega, weight)


@torch.library.triton_op("panther::srpe_filter_sines", mutates_args=())
def srpe_filter_sines_op(x: Tensor, theta: Tensor, phase: Optional[Tensor], weight: Tensor) -> Tensor:
    """``panther::srpe_filter`` with ``omega = sine_bases(theta, phase, L)`` built on chip."""
    _check(x, theta, phase, weight)
    if kernel_ok(x, theta, weight):
        return _launch(x, theta, phase, weight)
    return srpe_filter_sines_reference(x, theta, phase, weight)


def _setup_context(ctx, inputs, output):
    x, theta, phase, weight = inputs
    ctx.save_for_backward(x, theta, phase, weight)
    ctx.has_phase = phase is not None


def _backward(ctx, grad):
    """The C++ backward on the bases of ``_BACKWARD_CHUNK_BYTES`` worth of positions at a time, so
    that no step holds the bases of the whole sequence; d omega goes on to theta and the phases."""
    x, theta, phase, weight = ctx.saved_tensors
    if not ctx.has_phase:
        phase = None
    need = [ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:3]), ctx.needs_input_grad[3]]
    B, L, H, d = x.shape
    S = theta.shape[2]
    step = max(1, _BACKWARD_CHUNK_BYTES // (H * d * 2 * S * theta.element_size()))
    dx = torch.empty_like(x) if need[0] else None
    acc = torch.promote_types(weight.dtype, torch.float32)   # the weights' chunk sums: fp32 at least
    dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need[2] else None
    dtheta = torch.zeros_like(theta) if ctx.needs_input_grad[1] else None
    dphase = torch.zeros_like(theta) if ctx.has_phase and ctx.needs_input_grad[2] else None
    for n0 in range(0, L, step):
        n1 = min(L, n0 + step)
        omega = sine_bases(theta, phase, n1 - n0, start=n0)
        dxc, dom, dwc = torch.ops.panther.srpe_filter_backward(
            grad[:, n0:n1].contiguous(), x[:, n0:n1], omega.to(x.dtype), weight, need)
        if dx is not None:
            dx[:, n0:n1] = dxc
        if dw is not None:
            dw += dwc
        if need[1]:
            # omega = [cos(a), sin(a)] with a = theta n + phase: d a = -sin(a) d cos + cos(a) d sin
            dom = dom.to(theta.dtype)
            dang = -omega[..., S:] * dom[..., :S] + omega[..., :S] * dom[..., S:]
            if dtheta is not None:
                n = torch.arange(n0, n1, device=x.device, dtype=theta.dtype).view(-1, 1, 1, 1)
                dtheta += (dang * n).sum(0)
            if dphase is not None:
                dphase += dang.sum(0)
    return dx, dtheta, dphase, (dw.to(weight.dtype) if dw is not None else None)


srpe_filter_sines_op.register_autograd(_backward, setup_context=_setup_context)


def srpe_filter_sines(x, theta, phase, weight):
    """``out[b, n, h, r] = sum_{i, j} x[b, n, h, i] omega[n, h, i, j] weight[h, i, j, r]`` with
    ``omega = sine_bases(theta, phase, L)`` (never materialised on CUDA).

    Args:
        x: queries or keys ``(B, L, H, d)``, fp16 / bf16 / fp32 / fp64.
        theta: angular frequencies ``(H, d, S)``: fp32 (fp64 for fp64 ``x``).
        phase: phases ``(H, d, S)`` in theta's dtype, or None.
        weight: mixing ``(H, d, 2S, R)`` in x's dtype.

    Returns:
        ``(B, L, H, R)`` in x's dtype.

    Raises:
        ValueError: inconsistent shapes.
        TypeError: mismatched dtypes.
    """
    return torch.ops.panther.srpe_filter_sines(x, theta, phase, weight)


def _peak_mib(fn, dev):
    """Peak memory (MiB) allocated during one call above what was allocated before it (CUDA)."""
    if dev.type != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)


def bench_srpe(cases=None, H=16, d=64, sines=8, R=64, dtype=torch.bfloat16, device="cuda"):
    """Rows timing ``sinSRPE.filter``'s contraction of the queries (phases on) both ways: the fused
    op (bases on chip) against the bases materialised by ``sine_bases`` and contracted by the C++
    ``panther::srpe_filter`` (``srpe_filter_sines_reference``, the CPU path): forward, forward +
    backward (x, theta, phase and the weights all take gradients), each call's peak memory, and the
    forward's relative error between the two. ``cases``: (L, B) pairs. Off CUDA (the interpreter smoke
    test of this code) nothing is timed."""
    from .triton_attention import _rel, _time_ms
    dev = torch.device(device)
    rows = []
    for L, B in cases or [(65536, 1), (4096, 16)]:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(B, L, H, d, device=dev, dtype=dtype, generator=g)
        theta = torch.rand(H, d, sines, device=dev, generator=g) * 0.05
        phase = torch.randn(H, d, sines, device=dev, generator=g)
        w = (torch.randn(H, d, 2 * sines, R, device=dev, generator=g) / (d * sines) ** 0.5).to(dtype)
        ways = {"fused": srpe_filter_sines, "materialised": srpe_filter_sines_reference}
        err = _rel(ways["fused"](x, theta, phase, w), ways["materialised"](x, theta, phase, w))
        line = {"case": f"L={L} B={B} H={H} d={d} sines={sines} R={R}",
                "fused vs materialised rel err": f"{err:.2e}"}
        args = [t.detach().requires_grad_() for t in (x, theta, phase, w)]
        go = torch.randn(B, L, H, R, device=dev, dtype=dtype, generator=g)
        for name, fn in ways.items():
            with torch.no_grad():
                line[f"{name} fwd ms"] = _time_ms(lambda: fn(x, theta, phase, w))
                line[f"{name} fwd peak MiB"] = _peak_mib(lambda: fn(x, theta, phase, w), dev)

            def train(fn=fn):
                return torch.autograd.grad(fn(*args), args, go)
            line[f"{name} fwd+bwd ms"] = _time_ms(train)
            line[f"{name} fwd+bwd peak MiB"] = _peak_mib(train, dev)
        print(line, flush=True)
        rows.append(line)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
