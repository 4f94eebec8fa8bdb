"""Expert parallelism: tokens/s of one MoE layer versus world size, and the share of communication.

    torchrun --nproc-per-node N benchmarks/bench_distributed.py --preset deepseek-v3 --batch 1,64,4096 \
        [--backend cpu|cuda] [--hidden H --intermediate I --experts E] [--repeats R] [--json FILE]

Method
  * Weights: the preset's random EXL3 layer (``MoEWeights.random``, the same seed on every rank, so
    every rank holds the same layer), split by :class:`metal_moe.distributed.ExpertParallelMoE`'s
    default partition; ``--hidden/--intermediate/--experts`` shrink it (the CPU smoke run).
  * Tokens: ``--batch`` is the tokens of each rank (each rank brings its own batch, as a rank of a
    data-parallel attention block would), routed by the preset's router (``router_logits=``, the
    correction bias for sigmoid scoring) with a different routing for every call of a cycle of
    ``--cycle`` calls, so that the experts used change from call to call.
  * Timing: ``--warmup`` calls, then ``--repeats`` calls; before each, a barrier (and on CUDA a
    device synchronisation), then the whole forward timed with ``time.perf_counter`` up to its
    end (CUDA: synchronised).  A call's layer time is the slowest rank's (an all-reduce of the
    times); the median over the repeats is reported.  Communication: the forward's own
    all_to_all sections (counts, dispatch, return; :class:`SectionTimer`: CUDA events on CUDA,
    perf_counter on the CPU), which include waiting for the slowest rank to reach the exchange.
  * Reported per batch: median layer time, tokens/s of the whole group (world x batch / time), the
    median communication time and its share of the forward (per rank: min and max over ranks).
    With one rank the plain single-device ``fused_moe`` on the same routings is timed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import metal_moe as mm
from metal_moe.distributed import ExpertParallelMoE, SectionTimer


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="deepseek-v3", choices=sorted(mm.PRESETS))
    ap.add_argument("--batch", default="1,64,4096", help="tokens per rank, comma-separated")
    ap.add_argument("--backend", choices=["cpu", "cuda"], default=None,
                    help="default: cuda when torch sees a GPU, else cpu")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cycle", type=int, default=4, help="different routings per rank, used in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here (rank 0)")
    return ap.parse_args()


def main():
    args = parse()
    backend = args.backend or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if backend == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if backend == "cuda" else torch.device("cpu")
    w = mm.MoEWeights.random(args.preset, hidden=args.hidden, intermediate=args.intermediate, experts=args.experts,
                             seed=args.seed)
    pr = w.preset
    moe = ExpertParallelMoE(w, backend=backend)
    single = w.to("cuda", local_rank) if backend == "cuda" and world == 1 else (w if world == 1 else None)
    del w
    if rank == 0:
        print(f"# {args.preset} ({pr.hidden}x{pr.intermediate}, {pr.experts} experts, top-{pr.top_k}, bits {pr.bits}, "
              f"shared {pr.shared}) over {world} {backend} rank(s), {dist.get_backend()}; experts per rank: "
              f"{[b - a for a, b in moe.expert_ranges]}", flush=True)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        rows.append(run_batch(args, moe, single, pr, batch, rank, world, device))
        if rank == 0:
            print_row(rows[-1], world)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "shape": [pr.hidden, pr.intermediate, pr.experts, pr.top_k],
                       "backend": backend, "world_size": world, "process_group": str(dist.get_backend()),
                       "device": torch.cuda.get_device_name(device) if backend == "cuda" else "cpu",
                       "expert_ranges": moe.expert_ranges, "repeats": args.repeats, "results": rows}, f, indent=1)
    dist.destroy_process_group()


def run_batch(args, moe, single, pr, batch, rank, world, device):
    gen = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + 17 * rank + batch)
    calls = []
    for _ in range(args.cycle):
        x = torch.randn((batch, pr.hidden), generator=gen).to(device=device, dtype=torch.bfloat16)
        logits = torch.randn((batch, pr.experts), generator=gen).to(device)
        bias = (0.2 * torch.rand(pr.experts, generator=gen) - 0.1).to(device) if pr.scoring == "sigmoid" else None
        calls.append((x, logits, bias))
    routing = dict(top_k=pr.top_k, scoring=pr.scoring, renormalize=pr.renormalize,
                   routed_scaling_factor=pr.routed_scaling_factor)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, comm = [], []
    for i in range(args.warmup + args.repeats):
        x, logits, bias = calls[i % len(calls)]
        timer = SectionTimer(cuda=device.type == "cuda")
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        moe(x, router_logits=logits, bias=bias, timer=timer, **routing)
        sync()
        elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed)
            comm.append(timer.communication)
    mine = torch.tensor([statistics.median(times), statistics.median(comm),
                         statistics.median(c / t for c, t in zip(comm, times))], dtype=torch.float64, device=device)
    layer = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(layer, op=dist.ReduceOp.MAX)            # a call lasts as long as its slowest rank
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu().numpy()
    t = float(np.median(layer.cpu().numpy()))
    row = {"batch_per_rank": batch, "tokens": batch * world, "layer_s": t, "tokens_per_s": batch * world / t,
           "rank_forward_s": every[:, 0].tolist(), "rank_comm_s": every[:, 1].tolist(),
           "rank_comm_share": every[:, 2].tolist()}
    if single is not None:                                   # world of one: the plain call on the same routings
        t_single = []
        for i in range(args.warmup + args.repeats):
            x, logits, bias = calls[i % len(calls)]
            sync()
            t0 = time.perf_counter()
            mm.fused_moe(x if device.type == "cuda" else x.view(torch.int16).numpy().view(np.uint16), weights=single,
                         router_logits=logits if device.type == "cuda" else logits.numpy(),
                         bias=bias if device.type == "cuda" or bias is None else bias.numpy(), **routing)
            sync()
            if i >= args.warmup:
                t_single.append(time.perf_counter() - t0)
        row["single_device_s"] = statistics.median(t_single)
    return row


def print_row(r, world):
    share = r["rank_comm_share"]
    extra = f"  single-device fused_moe {r['single_device_s'] * 1e3:9.3f} ms" if "single_device_s" in r else ""
    print(f"world {world}  batch/rank {r['batch_per_rank']:>5}  layer {r['layer_s'] * 1e3:9.3f} ms  "
          f"{r['tokens_per_s']:>11.1f} tokens/s  communication {min(r['rank_comm_s']) * 1e3:8.3f}.."
          f"{max(r['rank_comm_s']) * 1e3:8.3f} ms = {100 * min(share):4.1f}..{100 * max(share):4.1f}% of the forward"
          f"{extra}", flush=True)


if __name__ == "__main__":
    main()
