"""Checks the fused sketched-linear Triton kernel's arithmetic in Triton's CPU interpreter.

Run by tests/test_triton_linear.py in ONE subprocess with ``TRITON_INTERPRET=1`` (the variable must
be set before triton is imported). Every case compares against the float64 plain-torch reference;
the script prints one line per case and exits non-zero on the first failure.
"""
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

import panther  # noqa: E402,F401
from interpret_common import check, rel  # noqa: E402  (tests/ is on sys.path: run as a script)
from inductor_ext import triton_linear as tlin  # noqa: E402
from panther.ops import sketched_linear_reference  # noqa: E402
from panther.ops.linear import concat_factors  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
_seed = [0]


def rand(*shape, dtype=torch.float64):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def layer(L, d_in, k, d_out, lead, dtype, bias=True):
    x = rand(*lead, d_in)
    fac = [rand(L, d_in, k), rand(L, k, d_out), rand(L, k, d_out), rand(L, d_in, k)]
    b = rand(d_out) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, *fac, b)]


def chain_cases():
    """The raw kernel with explicit tile shapes: tails in every dimension, column groups, E, alphas."""
    cases = [  # (M, D_IN, D_OUT, H, config, groups)
        (37, 70, 45, 5, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16), 1),
        (37, 70, 45, 5, dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=32), 3),
        (5, 17, 33, 1, dict(BLOCK_M=16, BLOCK_K=32, BLOCK_N=16), 2),
        (32, 32, 48, 16, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16), 1),  # exact multiples
        (20, 40, 24, 20, dict(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16), 4),  # H_PAD 32, more groups than tiles
    ]
    for M, D_IN, D_OUT, H, cfg, groups in cases:
        for dtype in (torch.float32, torch.bfloat16):
            X, FL, FH = rand(M, D_IN), rand(D_IN, H), rand(D_IN, H)
            GL, GH, bias, E = rand(H, D_OUT), rand(H, D_OUT), rand(D_OUT), rand(M, 2 * H)
            ap, ay = 0.5, 0.25
            P_ref = ap * X @ torch.cat([FL, FH], 1) + E
            low = [t.to(dtype) for t in (X, FL, FH, GL, GH, bias, E)]
            # round P like the kernel does before the second GEMM
            P_round = P_ref.to(dtype).double()
            Y_ref = ay * P_round @ torch.cat([GL, GH], 0) + bias
            # transposed (non-contiguous) views of the factors, as the backward passes them
            FLt, GHt = low[1].t().contiguous().t(), low[4].t().contiguous().t()
            # outputs poisoned with NaN: an element the kernel does not write fails the check
            out = (torch.full((M, D_OUT), float("nan"), dtype=dtype), torch.full((M, 2 * H), float("nan"), dtype=dtype))
            Y, P = tlin.lowrank_chain(low[0], FLt, low[2], low[3], GHt, bias=low[5], E=low[6], alpha_p=ap,
                                      alpha_y=ay, config=cfg, col_groups=groups, out=out)
            assert Y.dtype == dtype and P.dtype == dtype
            tag = f"chain M={M} D_IN={D_IN} D_OUT={D_OUT} H={H} {cfg} groups={groups} {dtype}"
            check(tag + " P", rel(P, P_ref), TOL[dtype])
            check(tag + " Y", rel(Y, Y_ref), TOL[dtype])
            # no bias, no E
            Y2, P2 = tlin.lowrank_chain(low[0], low[1], low[2], low[3], low[4], config=cfg, col_groups=groups)
            P2_ref = X @ torch.cat([FL, FH], 1)
            check(tag + " no bias/E", rel(Y2, P2_ref.to(dtype).double() @ torch.cat([GL, GH], 0)), TOL[dtype])
            # the same chain in two launches (large outputs), with its own tiles and column groups
            Y3, P3 = tlin.split_chain(low[0], FLt, low[2], low[3], GHt, bias=low[5], alpha_y=ay,
                                      config=(16, 16, 4, 1), col_groups=groups)
            P3_ref = X @ torch.cat([FL, FH], 1)
            Y3_ref = ay * P3_ref.to(dtype).double() @ torch.cat([GL, GH], 0) + bias
            check(tag + " split P", rel(P3, P3_ref), TOL[dtype])
            check(tag + " split Y", rel(Y3, Y3_ref), TOL[dtype])


def op_cases():
    """The registered op and the public function against the float64 reference."""
    cases = [  # (L, d_in, k, d_out, lead, bias)
        (1, 70, 5, 45, (37,), True),
        (2, 33, 3, 20, (2, 3, 4), False),  # 3-D input, L=2
        (1, 24, 1, 17, (), True),  # 1-D input, k=1
        (3, 40, 2, 24, (9,), True),
    ]
    for L, d_in, k, d_out, lead, bias in cases:
        for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if L == 1 else ()):
            args64 = layer(L, d_in, k, d_out, lead, torch.float64, bias)
            args = [a.to(dtype) if a is not None else None for a in args64]
            y = tlin.sketched_linear_triton(*args)
            assert y.dtype == dtype and y.shape == (*lead, d_out), (y.dtype, y.shape)
            ref = sketched_linear_reference(*[a.double() if a is not None else None for a in args])
            check(f"op L={L} d_in={d_in} k={k} d_out={d_out} lead={lead} bias={bias} {dtype}", rel(y, ref),
                  TOL[dtype])
            y_fwd, xA = torch.ops.panther.sketched_linear_triton_fwd(*args)
            check("   op's y", rel(y_fwd, ref), TOL[dtype])
            A, _ = concat_factors(*[a.double() for a in args[1:5]])
            check("   xA output", rel(xA, args[0].double() @ A), TOL[dtype])
    # non-contiguous input
    args = layer(2, 6, 3, 5, (), torch.float32)
    xt = rand(6, 7, dtype=torch.float32).t()
    check("op non-contiguous x", rel(tlin.sketched_linear_triton(xt, *args[1:]),
                                     sketched_linear_reference(xt.double(), *[a.double() for a in args[1:]])),
          TOL[torch.float32])


def grad_cases():
    """Autograd through the fused forward and backward kernels against float64 reference grads."""
    for L, d_in, k, d_out, lead, bias in [(1, 70, 5, 45, (37,), True), (2, 33, 3, 20, (2, 5), True),
                                          (1, 24, 1, 17, (), False)]:
        for dtype in (torch.float32, torch.bfloat16):
            args64 = layer(L, d_in, k, d_out, lead, torch.float64, bias)
            args = [a.to(dtype).requires_grad_(True) if a is not None else None for a in args64]
            y = tlin.sketched_linear_triton(*args)
            gy = rand(*y.shape, dtype=dtype)
            inputs = [a for a in args if a is not None]
            got = torch.autograd.grad(y, inputs, gy)
            ref_in = [a.detach().double().requires_grad_(True) for a in inputs]
            full = ref_in[:5] + ([ref_in[5]] if bias else [None])
            want = torch.autograd.grad(sketched_linear_reference(*full), ref_in, gy.double())
            names = ["dx", "dS1s", "dS2s", "dU1s", "dU2s", "dbias"]
            for name, a, b in zip(names, got, want):
                assert a.shape == b.shape, (name, a.shape, b.shape)
                check(f"grad {name} L={L} d_in={d_in} k={k} d_out={d_out} lead={lead} {dtype}", rel(a, b),
                      4 * TOL[dtype])
    # Eager calls take the autograd.Function around the kernels (no custom-op dispatch); it must give the
    # op's gradients, also when only some inputs need one. Under a dispatch mode the op is kept.
    from torch.utils.flop_counter import FlopCounterMode

    for needs in ((True,) * 6, (False, True, True, False, False, True), (True, False, False, False, False, False)):
        args = [a.requires_grad_(n) for a, n in zip(layer(1, 30, 4, 22, (11,), torch.float32), needs)]
        y = tlin.sketched_linear_triton(*args)
        assert type(y.grad_fn).__name__ == "_EagerChainBackward", type(y.grad_fn).__name__
        y_op = torch.ops.panther.sketched_linear_triton_fwd(*args)[0]
        check(f"eager Function forward = op (needs {needs})", rel(y, y_op.double()), 1e-6)
        gy = rand(*y.shape, dtype=torch.float32)
        inputs = [a for a in args if a.requires_grad]
        names = [n for n, a in zip("x S1s S2s U1s U2s bias".split(), args) if a.requires_grad]
        ref_args = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
        want = torch.autograd.grad(sketched_linear_reference(*ref_args), [a for a in ref_args if a.requires_grad],
                                   gy.double())
        for name, a, b, c in zip(names, torch.autograd.grad(y, inputs, gy),
                                 torch.autograd.grad(y_op, inputs, gy), want):
            check(f"   grad {name} eager Function = op", rel(a, b.double()), 1e-6)
            check(f"   grad {name} (needs {needs}) against float64", rel(a, c), 4 * TOL[torch.float32])
    args = [a.requires_grad_(True) for a in layer(1, 30, 4, 22, (3,), torch.float32)]
    with FlopCounterMode(display=False) as counter:
        y = tlin.sketched_linear_triton(*args)
    assert y.grad_fn is not None and "_EagerChain" not in type(y.grad_fn).__name__, type(y.grad_fn).__name__
    assert counter.get_total_flops() == 2 * 3 * 8 * (30 + 22), "the dispatch mode must see the op"
    args = layer(1, 12, 3, 7, (4,), torch.float32)   # vmap keeps the op (its per-sample fallback)
    y = torch.func.vmap(lambda row: tlin.sketched_linear_triton(row, *args[1:]))(args[0])
    check("vmap over rows = batched call", rel(y, tlin.sketched_linear_triton(*args).double()), 1e-6)

    # the backward op with an incoming grad for xA
    L, d_in, k, d_out = 2, 21, 3, 19
    _, S1s, S2s, U1s, U2s, _ = layer(L, d_in, k, d_out, (), torch.float32)
    g, gxa = rand(13, d_out, dtype=torch.float32), rand(13, 2 * L * k, dtype=torch.float32)
    dx, dxA = torch.ops.panther.sketched_linear_triton_bwd(g, gxa, S1s, S2s, U1s, U2s)
    A, Bm = concat_factors(*[t.double() for t in (S1s, S2s, U1s, U2s)])
    dxA_ref = g.double() @ Bm.T + gxa.double()
    check("bwd op dxA with grad_xA", rel(dxA, dxA_ref), TOL[torch.float32])
    check("bwd op dx with grad_xA", rel(dx, dxA_ref @ A.T), TOL[torch.float32])


def grad_pass_cases():
    """The backward's pass over g (grad_pass) and the dx launch over its partials (chain_from_partials):
    tails, several row splits and column groups, the optional products, E."""
    cases = [  # (M, D_OUT, H, D_IN, sel columns of xA, config, row_splits)
        (37, 70, 5, 45, (0, 10), (16, 32, 4, 1), 3),
        (64, 96, 16, 40, (16, 32), (16, 32, 4, 1), 2),    # S2 rows only
        (5, 33, 1, 17, (0, 1), (16, 16, 4, 1), 1),         # U1 rows only, H = 1
        (20, 48, 4, 24, (0, 0), (16, 16, 4, 1), 2),        # no dB
    ]
    for M, D_OUT, H, D_IN, (c0, c1), cfg, splits in cases:
        for dtype in (torch.float32, torch.bfloat16):
            g, xA, BLt, BHt = rand(M, D_OUT), rand(M, 2 * H), rand(H, D_OUT), rand(H, D_OUT)
            GL, GH, E = rand(H, D_IN), rand(H, D_IN), rand(M, 2 * H)
            low = [t.to(dtype) for t in (g, xA, BLt, BHt, GL, GH, E)]
            # dB scaled and both sums rounded to g's dtype in the finish launch, as the op asks
            parts, dB, dbias = tlin.grad_pass(low[0], low[1][:, c0:c1], low[2].mT, low[3].mT, config=cfg,
                                              row_splits=splits, need_dbias=c1 > 0, scale=0.5,
                                              out_dtype=dtype)
            gd = low[0].double()
            tag = f"grad_pass M={M} D_OUT={D_OUT} H={H} cols {c0}:{c1} splits={splits} {dtype}"
            dxa = gd @ torch.cat([low[2], low[3]]).double().T
            # bf16 g: bf16 partials by default (half the traffic), else fp32
            assert parts.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
            check(tag + " dxA partials", rel(parts.sum(0, dtype=torch.float64), dxa), TOL[parts.dtype])
            assert dB.shape == (c1 - c0, D_OUT) and dbias.shape == ((D_OUT,) if c1 else (0,))
            assert dB.dtype == dbias.dtype == dtype
            if c1 > c0:
                check(tag + " dB", rel(dB, 0.5 * low[1][:, c0:c1].double().T @ gd), TOL[dtype])
            if c1:
                check(tag + " dbias", rel(dbias, gd.sum(0)), TOL[dtype])
            Y, P = tlin.chain_from_partials(parts, low[4], low[5], low[6], 0.25, dtype=dtype,
                                            config=(cfg[0], 16, 4, 1))
            P_ref = 0.25 * dxa + low[6].double()
            check(tag + " P", rel(P, P_ref), TOL[dtype])
            check(tag + " Y", rel(Y, P_ref.to(dtype).double() @ torch.cat([low[4], low[5]]).double()), TOL[dtype])


if __name__ == "__main__":
    chain_cases()
    grad_pass_cases()
    op_cases()
    grad_cases()
    # again with every output above the split threshold: the op's forward in two launches (plain
    # eager calls, and so grad_cases, keep the fused kernel)
    saved = tlin.SPLIT_MIN_OUTPUT, tlin.SPLIT_ELEMENT_SIZES
    tlin.SPLIT_MIN_OUTPUT, tlin.SPLIT_ELEMENT_SIZES = 0, (2, 4)
    op_cases()
    tlin.SPLIT_MIN_OUTPUT, tlin.SPLIT_ELEMENT_SIZES = saved
    print("ALL OK")
