"""Multi-GPU training throughput of a converted GPT-2-small-shaped model (DDP or FSDP2, NCCL).

    torchrun --standalone --nproc_per_node=1 -m panther.train_bench --mode ddp --out runs.jsonl
    torchrun --standalone --nproc_per_node=2 -m panther.train_bench --mode ddp --out runs.jsonl
    torchrun --standalone --nproc_per_node=2 -m panther.train_bench --mode fsdp --out runs.jsonl
    python -m panther.train_bench --compare runs.jsonl

Random init and synthetic tokens (no downloads). Runs with the same --global-batch train on the same data,
so their loss curves agree up to bf16 reduction-order noise; tokens/s is per whole job, and the throughput
ratio compares runs with the same batch per GPU (weak scaling, --global-batch 32 on 2 GPUs vs 16 on 1).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from .policy import SketchSpec


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2 small shapes: 12 layers, width 768, 12 heads, 1024 positions, 50257 tokens."""

    def __init__(self, vocab=50257, dim=768, layers=12, heads=12, seq=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def batch(step, global_batch, seq, vocab, rank, world, device):
    """The same global batch for any world size; each rank takes its contiguous slice."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, vocab, (global_batch, seq + 1), generator=g)
    per = global_batch // world
    part = tokens[rank * per:(rank + 1) * per].to(device)
    return part[:, :-1], part[:, 1:]


def train(args):
    import panther
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    device = torch.device("cuda", local)
    torch.manual_seed(0)  # same dense init on every rank and for every world size
    model = GPT(seq=args.seq)
    if not args.dense:
        spec = SketchSpec(num_terms=1, low_rank=args.low_rank, init="sketch", seed=0)
        model, _ = panther.convert(model, {"blocks.*": spec})
    model = model.to(device)
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        x, y = batch(step, args.global_batch, args.seq, 50257, rank, world, device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        losses.append(avg.item() / world)
    measured = sum(times[args.warmup:])
    result = {"mode": args.mode, "gpus": world, "dense": args.dense, "low_rank": args.low_rank,
              "params_per_rank": params, "global_batch": args.global_batch, "seq": args.seq,
              "tokens_per_s": args.global_batch * args.seq * args.steps / measured, "losses": losses,
              "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


def compare(path):
    """Table of recorded runs. Speed-up: against the 1-GPU run of the same model with the same batch per GPU
    (weak scaling); loss agreement: against the 1-GPU run with the same global batch (same data)."""
    from tabulate import tabulate

    runs = [json.loads(line) for line in open(path)]
    single = [r for r in runs if r["gpus"] == 1]

    def find(r, same):
        return next((s for s in single if s["dense"] == r["dense"] and same(s)), None)

    rows = []
    for r in runs:
        speed_ref = find(r, lambda s: s["global_batch"] == r["global_batch"] // r["gpus"])
        loss_ref = find(r, lambda s: s["global_batch"] == r["global_batch"])
        speed = f"{r['tokens_per_s'] / speed_ref['tokens_per_s']:.2f}x" if speed_ref else "-"
        diff = (f"{max(abs(a - b) for a, b in zip(r['losses'], loss_ref['losses'])):.2e}" if loss_ref else "-")
        rows.append(["dense" if r["dense"] else f"panther (k={r['low_rank']})", r["mode"], r["gpus"],
                     r["global_batch"], f"{r['tokens_per_s']:,.0f}", speed, f"{r['losses'][-1]:.4f}", diff])
    print(tabulate(rows, headers=["model", "mode", "GPUs", "global batch", "tokens/s",
                                  "vs 1 GPU (same batch/GPU)", "final loss", "max |loss - 1-GPU loss|"],
                   disable_numparse=True))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m panther.train_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--low-rank", type=int, default=64)
    p.add_argument("--dense", action="store_true", help="train the dense model (reference)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", default=None, help="append the run's JSON (with the loss curve) to this file")
    p.add_argument("--compare", default=None, metavar="RUNS.jsonl", help="print the table of recorded runs")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    return train(args)


if __name__ == "__main__":
    main()
