"""One rank of the distributed checks in tests/test_distributed.py (run as a subprocess, gloo on CPU).

Usage: python tests/_dist_worker.py RANK WORLD_SIZE STORE_PORT OUT_DIR

The parent test owns a TCPStore on 127.0.0.1 (bound to a port the OS picked, so no two runs collide);
each rank joins it as a client. All checks share that one process group and write their outcome to
OUT_DIR/rank<r>.json as {check: {"ok": bool, "detail": ..., "error": str | None}}, so a failure in one
check never hides the others.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import panther
from panther.policy import SketchSpec

STEPS = 5
LR = 0.01
GLOBAL_BATCH = 8
TOL = 1e-5


class Net(nn.Module):
    """conv -> tokens -> self-attention -> MLP head; small enough for a loaded 2-core box."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1 = nn.Linear(16, 512)
        # a dense 1 MiB layer: DDP buckets are at least 1 MiB under torch.compile (DDPOptimizer insists the
        # first bucket, fixed at 1 MiB, is not larger than the others), so this is what makes DDP split the graph
        self.mid = nn.Linear(512, 512)
        self.fc2 = nn.Linear(512, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))                 # (B, 16, 6, 6)
        t = h.flatten(2).transpose(1, 2)             # (B, 36, 16)
        a, _ = self.attn(t, t, t, need_weights=False)
        t = t + a
        t = torch.relu(self.fc1(t))
        t = torch.relu(self.mid(t))
        t = torch.relu(self.fc2(t))
        return self.head(t.mean(1))


POLICY = {
    "linear": SketchSpec(num_terms=1, low_rank=4, seed=11),
    "conv2d": SketchSpec(num_terms=1, low_rank=4, seed=12),
    "attention": SketchSpec(num_random_features=8, seed=13),
    "mid": "skip",   # dense layers left alone, so the backend's training rule shows up under DDP
    "head": "skip",
}


def build(init_seed=0):
    """The same converted model on every rank: dense init from the global RNG, sketch draws from the spec seeds."""
    torch.manual_seed(init_seed)
    model, report = panther.convert(Net(), POLICY)
    assert [r.name for r in report.replaced] == ["conv", "attn", "fc1", "fc2"], report
    return model


def data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, GLOBAL_BATCH, 3, 6, 6, generator=g)
    y = torch.randn(STEPS, GLOBAL_BATCH, 4, generator=g)
    return x, y


def local(t, rank, world):
    n = t.shape[1] // world
    return t[:, rank * n:(rank + 1) * n]


def train(model, x, y, *, steps=STEPS):
    """SGD with momentum on mean-squared error; returns the grads of step 0 (by name) and final params."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    first_grads = None
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x[s]), y[s])  # mean over the (local) batch
        loss.backward()
        if first_grads is None:
            first_grads = {n: _full(p.grad).clone() for n, p in _named_params(model)}
        opt.step()
    return first_grads, {n: _full(p).detach().clone() for n, p in _named_params(model)}


def _named_params(model):
    """Parameter names without the wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    for n, p in model.named_parameters():
        yield n.replace("_orig_mod.", "").replace("module.", ""), p


def _full(t):
    """A plain tensor from a DTensor (FSDP2 shards) or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_diff(a: dict, b: dict):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference():
    """Single-process training on the global batch (mean loss over it): what DDP must reproduce."""
    x, y = data()
    model = build()
    init = {n: p.detach().clone() for n, p in _named_params(model)}
    grads, params = train(model, x, y)
    assert all(torch.isfinite(p).all() for p in params.values()), "reference training diverged"
    assert max_diff(init, params) > 1e-3, "reference training did not move the parameters"
    return grads, params


def check_ddp(rank, world, ref, compiled):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build()
    calls = []
    # 1 MiB buckets split the gradients in two (the dense `mid` layer fills one), so under torch.compile
    # Dynamo's DDPOptimizer cuts the graph at the bucket boundary and calls the backend once per piece.
    ddp = DDP(model, bucket_cap_mb=1)
    if compiled:
        torch._dynamo.reset()
        ddp = torch.compile(ddp, backend="panther",
                            options={"compiler": "aot_eager", "report": calls.append})
    x, y = data()
    grads, params = train(ddp, local(x, rank, world), local(y, rank, world))
    detail = {"grad_err": max_diff(grads, ref[0]), "param_err": max_diff(params, ref[1])}
    if compiled:
        rows = [r for rep in calls for r in rep.rows]
        detail["backend_calls"] = len(calls)
        detail["rows"] = [[r.name, r.kind, r.replaced, r.reason] for r in rows]
    ok = detail["grad_err"] < TOL and detail["param_err"] < TOL
    if not compiled:
        # the comparison can fail: this rank's gradient without DDP's averaging is far from the reference
        solo = build()
        nn.functional.mse_loss(solo(local(x, rank, world)[0]), local(y, rank, world)[0]).backward()
        detail["local_only_grad_err"] = max_diff({n: p.grad for n, p in _named_params(solo)}, ref[0])
        ok = ok and detail["local_only_grad_err"] > 1e-3
    return ok, detail


def check_ddp_syncs_unseeded(rank, world):
    """Converted without spec seeds and with a different global RNG per rank, DDP still starts all replicas
    from rank 0's parameters *and* sketch buffers (it broadcasts module state at construction)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(100 + rank)
    policy = {"linear": SketchSpec(num_terms=1, low_rank=4), "conv2d": SketchSpec(num_terms=1, low_rank=4),
              "attention": SketchSpec(num_random_features=8)}
    model, _ = panther.convert(Net(), policy)
    flat = lambda: torch.cat([t.detach().reshape(-1) for t in [*model.parameters(), *model.buffers()]])
    gathered = [torch.empty_like(flat()) for _ in range(world)]
    dist.all_gather(gathered, flat())
    differ_before = (gathered[0] - gathered[1]).abs().max().item()
    DDP(model)
    dist.all_gather(gathered, flat())
    differ_after = (gathered[0] - gathered[1]).abs().max().item()
    return differ_before > 0.1 and differ_after == 0, {"differ_before": differ_before, "differ_after": differ_after}


def check_fsdp2(rank, world, ref):
    from torch.distributed.fsdp import fully_shard

    model = build()
    for name in ("conv", "attn", "fc1", "mid", "fc2"):
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
    x, y = data()
    grads, params = train(model, local(x, rank, world), local(y, rank, world))
    detail = {"grad_err": max_diff(grads, ref[0]), "param_err": max_diff(params, ref[1]),
              "param_types": sorted(set(sharded.values()))}
    return detail["grad_err"] < TOL and detail["param_err"] < TOL and detail["param_types"] == ["DTensor"], detail


def check_dcp(rank, world, ckpt_dir, fsdp: bool):
    """Save a trained converted model with torch.distributed.checkpoint; load into a differently seeded one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    def wrap(m):
        if not fsdp:  # DDP keeps the replicas equal, which DCP's de-duplication of replicated tensors assumes
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(m)
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for name in ("conv", "attn", "fc1", "fc2"):
                fully_shard(m.get_submodule(name))
            fully_shard(m)
        return m

    x, y = data()
    src = wrap(build(0))
    train(src, local(x, rank, world), local(y, rank, world), steps=2)
    sd = get_model_state_dict(src)
    path = os.path.join(ckpt_dir, "fsdp2" if fsdp else "plain")
    dcp.save(sd, checkpoint_id=path)

    dst = wrap(build(99))  # other dense init; the sketch buffers (spec seeds) would match anyway, so perturb them
    with torch.no_grad():
        for b in dst.buffers():
            b.add_(1.0)
    before = max(((_full(a) - _full(b)).abs().max().item() for a, b in zip(sd.values(), get_model_state_dict(dst).values())))
    sd_dst = get_model_state_dict(dst)
    dcp.load(sd_dst, checkpoint_id=path)
    set_model_state_dict(dst, sd_dst)

    after_sd = get_model_state_dict(dst)
    assert sd.keys() == after_sd.keys()
    sd_err = max((_full(sd[k]) - _full(after_sd[k])).abs().max().item() for k in sd)
    with torch.no_grad():
        xin = x[0]
        out_err = (src(xin) - dst(xin)).abs().max().item()
    detail = {"differs_before_load": before, "state_dict_err": sd_err, "output_err": out_err,
              "keys": len(sd)}
    return before > 0.1 and sd_err == 0 and out_err == 0, detail


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
    # a bounded collective timeout: if the other rank dies, this one fails instead of hanging
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}

    def run(name, fn, *args):
        t0 = time.perf_counter()
        try:
            ok, detail = fn(*args)
            results[name] = {"ok": bool(ok), "detail": detail, "error": None,
                             "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as e:  # record and go on: the other checks still run
            results[name] = {"ok": False, "detail": None,
                             "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        dist.barrier()

    results["setup"] = {"panther_file": panther.__file__, "torch": torch.__version__}
    try:
        t0 = time.perf_counter()
        ref = reference()
        results["setup"]["reference_seconds"] = round(time.perf_counter() - t0, 2)
        run("ddp_eager", check_ddp, rank, world, ref, False)
        run("ddp_syncs_unseeded", check_ddp_syncs_unseeded, rank, world)
        run("ddp_compiled", check_ddp, rank, world, ref, True)
        run("fsdp2", check_fsdp2, rank, world, ref)
        run("dcp_plain", check_dcp, rank, world, out_dir, False)
        run("dcp_fsdp2", check_dcp, rank, world, out_dir, True)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
