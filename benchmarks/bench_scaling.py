"""Weak scaling of the training step: tokens/s PER WORKER with 2 workers against 1, each worker 1 thread. Prints JSON.

Each worker is a real process of a gloo process group running the trainer's own pieces: the CLLM4Rec
step losses (recommenders/cllm4rec/losses.py) and a DeepSpeed ZeRO engine per parameter group (train/engines.py,
``ds_configs/zero2.json``), on its own batch of the same shape (weak scaling: the per-worker work is
fixed). Every worker uses ONE thread, so that 2 workers on a 2-core machine do not count the two
cores twice: the ideal is the same tokens/s per worker at 2 workers as at 1.

What limits it is measured too: the bytes of the gradient of the step's parameter group (what ZeRO-2
reduces across workers every step: the tables' gradients are dense, J x d whatever the batch touched)
and the seconds one ``reduce_scatter`` + ``all_gather`` of that many fp32 elements takes on the same
process group, against the step time.

    python benchmarks/bench_scaling.py                     # the bench_model.py default shapes
    python benchmarks/bench_scaling.py --items 100000      # a larger catalogue: more bytes to reduce
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_model  # noqa: E402  (the model and batches of the throughput benchmark)

STEPS = {"l_step": ("l_step_loss", "collab"), "c_step": ("c_step_loss", "content"),
         "rec_step": ("rec_step_loss", "collab")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--steps", type=int, default=8, help="timed steps per kind (after 2 warm-up steps); medians")
    p.add_argument("--ds-config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                       "ds_configs", "zero2.json"))
    for name in ("hidden", "layers", "vocab", "users", "items", "batch", "seq-len"):
        p.add_argument(f"--{name}", type=int, default=None, help="as in bench_model.py (default: its default)")
    args = p.parse_args(argv)
    model_args = bench_model.parse_args([])
    for name in ("hidden", "layers", "vocab", "users", "items", "batch", "seq_len"):
        if getattr(args, name) is not None:
            setattr(model_args, name, getattr(args, name))
    args.model = model_args
    return args


def median(values):
    return sorted(values)[len(values) // 2]


def worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):
        import torch.distributed as dist

        from cllm4rec_dist.model import losses
        from cllm4rec_dist.train.engines import DeepSpeedEngine, init_distributed, load_ds_config

        init_distributed()
        device = torch.device("cpu")
        model = bench_model.build_model(args.model, device)
        torch.manual_seed(rank)  # each worker its own batch of the same shape
        l_batch, c_batch, rec_batch, _ = bench_model.make_batches(model, args.model, device)
        batches = {"l_step": l_batch, "c_step": c_batch, "rec_step": rec_batch}
        ds_config = load_ds_config(args.ds_config, args.model.batch, world, 1.0)
        engines = {name: DeepSpeedEngine(name, params, 1e-3, ds_config)
                   for name, params in model.parameter_groups().items()}
        out = {}
        for step_name, (loss_name, group) in STEPS.items():
            loss_fn, engine = getattr(losses, loss_name), engines[group]
            times = []
            for i in range(2 + args.steps):
                dist.barrier()
                start = time.perf_counter()
                engine.backward(loss_fn(model, batches[step_name])["loss"])
                engine.step()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            grad_elements = sum(p.numel() for p in engine.params)
            comm = []
            if world > 1:  # what ZeRO-2 does with the group's gradient every step, alone
                flat = torch.randn(grad_elements - grad_elements % world)
                part = torch.empty(flat.numel() // world)
                for i in range(2 + args.steps):
                    dist.barrier()
                    start = time.perf_counter()
                    dist.reduce_scatter_tensor(part, flat)
                    dist.all_gather_into_tensor(flat, part)
                    if i >= 2:
                        comm.append(time.perf_counter() - start)
            out[step_name] = {"step_seconds": median(times), "grad_bytes": 4 * grad_elements,
                              "comm_seconds": median(comm) if comm else 0.0}
        results[rank] = out
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args) -> dict:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(world, free_port(), args, results), nprocs=world, join=True)
    tokens = args.model.batch * args.model.seq_len
    report = {}
    for step_name in STEPS:
        seconds = max(results[r][step_name]["step_seconds"] for r in range(world))  # the slowest worker sets the pace
        r0 = results[0][step_name]
        report[step_name] = {"tokens_per_s_per_worker": round(tokens / seconds, 1), "step_seconds": round(seconds, 4),
                             "grad_bytes_reduced_per_step": r0["grad_bytes"],
                             "reduce_scatter_all_gather_seconds": round(r0["comm_seconds"], 4),
                             "comm_fraction_of_step": round(r0["comm_seconds"] / seconds, 3)}
    return report


def main(argv=None):
    import tempfile

    args = parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        if args.model.backbone is None:  # one random backbone on disk that every worker loads
            bench_model.build_model(args.model, torch.device("cpu")).backbone.save_pretrained(tmp)
            args.model.backbone = tmp
        runs = {str(w): run(w, args) for w in counts}
    report = {"cpu_count": os.cpu_count(), "threads_per_worker": args.threads,
              "ds_config": os.path.basename(args.ds_config),
              "shapes": {k: getattr(args.model, k) for k in ("hidden", "layers", "vocab", "users", "items", "batch",
                                                               "seq_len")},
              "workers": runs}
    if len(counts) > 1:
        base, top = str(counts[0]), str(counts[-1])
        report["weak_scaling_efficiency"] = {
            step: round(runs[top][step]["tokens_per_s_per_worker"] / runs[base][step]["tokens_per_s_per_worker"], 3)
            for step in STEPS}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
