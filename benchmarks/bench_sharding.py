"""Replicated vs row-sharded tables: resident table bytes, peak RSS and step time per rank. Prints JSON lines.

One JSON object per (sharding, ranks), for ``replicated`` and ``row`` on 1 and 2 ranks (real processes of a gloo
group, one thread each). Each rank builds CLLM4Rec over a random LLaMA of ``--hidden`` (bench_model.py's model and
batches) with ``--users`` x ``--items`` tables and runs L-steps and rec-steps through the engines the workers use:
DeepSpeed ZeRO-2 (ds_configs/zero2.json) over the replicated tables, ``ShardedEngine`` over row shards
(recommenders/cllm4rec/recipe.py ``build_engines``).

* ``table_bytes_per_rank``: what the tables cost a rank: the trainable tables and heads it holds (all four token
  tables and the item head, whole or its rows) + every tensor of its optimizer state (Adam moments; for ZeRO also
  its fp32 master partition), measured on the tensors after the timed steps (max over ranks).
* ``peak_rss_bytes_per_rank``: the process's peak resident set (getrusage; includes torch/DeepSpeed themselves).
* ``step_seconds``: median seconds of an L-step (the item softmax over the whole catalogue plus the collaborative
  update), the slowest rank; ``rec_step_seconds`` likewise.

    python benchmarks/bench_sharding.py                       # 2M users x 128 (needs ~8 GB per replicated rank)
    python benchmarks/bench_sharding.py --users 500000        # a size to try on a 24 GB box, see
    # docs/experiments/2026-11-30-streamed-reader-and-row-sharding.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_model  # noqa: E402  (the model and batches of the throughput benchmark)
from bench_scaling import free_port  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=2_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed rounds after one warm-up round; medians")
    p.add_argument("--cases", default="replicated:1,replicated:2,row:1,row:2", help="sharding:ranks, comma-separated")
    p.add_argument("--ds-config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                       "ds_configs", "zero2.json"))
    args = p.parse_args(argv)
    model_args = bench_model.parse_args([])
    for name in ("hidden", "layers", "vocab", "users", "items", "batch", "seq_len"):
        setattr(model_args, name, getattr(args, name))
    args.model = model_args
    return args


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _optimizer_tensors(engine) -> list:
    inner = getattr(engine, "inner", None)
    optimizer = getattr(engine, "_inner", engine.optimizer)
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    tensors += list(getattr(engine.optimizer, "single_partition_of_fp32_groups", []))  # ZeRO's fp32 master part
    return tensors + (_optimizer_tensors(inner) if inner is not None else [])


def worker(rank: int, world: int, port: int, sharding: str, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):
        import torch.distributed as dist

        from cllm4rec_dist.config import TrainConfig
        from cllm4rec_dist.model import losses
        from cllm4rec_dist.recommenders.cllm4rec.recipe import build_engines
        from cllm4rec_dist.train.engines import DeepSpeedEngine, init_distributed, load_ds_config

        init_distributed()  # gloo on CPU, without DeepSpeed's inference-only shm op (train/engines.py)
        args.model.table_sharding = args.model.item_head_sharding = sharding
        device = torch.device("cpu")
        model = bench_model.build_model(args.model, device)
        torch.manual_seed(rank)  # each rank its own batch of the same shape
        l_batch, _, rec_batch, _ = bench_model.make_batches(model, args.model, device)
        ds_config = load_ds_config(args.ds_config, args.model.batch, world, 0.0)

        def engine_factory(name, params, lr):
            return DeepSpeedEngine(name, params, lr, ds_config)

        engines = build_engines(model, model.parameter_groups(), engine_factory, 1e-3, TrainConfig())
        engine = engines["collab"]
        times = {"l": [], "rec": []}
        for i in range(1 + args.steps):
            for kind, loss_fn, batch in (("l", losses.l_step_loss, l_batch), ("rec", losses.rec_step_loss, rec_batch)):
                dist.barrier()
                start = time.perf_counter()
                engine.backward(loss_fn(model, batch)["loss"])
                engine.step()
                if i:
                    times[kind].append(time.perf_counter() - start)
        tables = [p for p in model.parameters() if p.requires_grad]
        table_bytes = _tensor_bytes(tables) + _tensor_bytes(t for e in engines.values() for t in _optimizer_tensors(e))
        results[rank] = {"table_bytes": table_bytes,
                         "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                         "l": sorted(times["l"])[len(times["l"]) // 2],
                         "rec": sorted(times["rec"])[len(times["rec"]) // 2]}
        dist.barrier()
        dist.destroy_process_group()


def run(sharding: str, world: int, args) -> dict:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(world, free_port(), sharding, args, results), nprocs=world, join=True)
    per_rank = [results[r] for r in range(world)]
    return {"sharding": sharding, "ranks": world, "users": args.users, "items": args.items, "hidden": args.hidden,
            "table_bytes_per_rank": max(r["table_bytes"] for r in per_rank),
            "peak_rss_bytes_per_rank": max(r["peak_rss"] for r in per_rank),
            "step_seconds": round(max(r["l"] for r in per_rank), 4),
            "rec_step_seconds": round(max(r["rec"] for r in per_rank), 4)}


def main(argv=None) -> None:
    import tempfile

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as backbone:  # one random backbone for every rank and case
        bench_model.save_random_backbone(args.model, backbone)
        args.model.backbone = backbone
        for case in args.cases.split(","):
            sharding, world = case.split(":")
            print(json.dumps(run(sharding, int(world), args)), flush=True)


if __name__ == "__main__":
    main()
