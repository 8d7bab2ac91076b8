"""What the launchers share: parse the config, run, export (the demo dataset: corpus/preprocess.py ``demo_dataset``).

`launchers/pretrain_llama.py` (Ray) and `launchers/finetune.py` (DeepSpeed launcher or Ray)
are thin wrappers around this module.
"""

from __future__ import annotations

import argparse
import json
import os

from cllm4rec_dist.config import TrainConfig, add_config_arguments, config_from_args
from cllm4rec_dist.quiet import quiet_libraries
from cllm4rec_dist.resources import packaged, resolve_path
from cllm4rec_dist.train.timing import PhaseTimer, read_timing, write_timing

DEFAULT_CONFIG = packaged(os.path.join("configs", "demo.yaml"))


def parse(description: str, argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    add_config_arguments(p)
    p.add_argument("--no-export", action="store_true", help="skip the embedding export at the end")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = p.parse_args(argv)
    args.config = resolve_path(args.config) if args.config else DEFAULT_CONFIG
    quiet_libraries()
    return config_from_args(args), args


def finish(cfg: TrainConfig, args: argparse.Namespace, result: dict, timer: PhaseTimer | None = None) -> int:
    """After training: export the best tables with original ids into <run>/export, print the summary and
    where the wall time went (``<run>/timing.json``)."""
    timer = timer or PhaseTimer()
    if not args.no_export:
        from cllm4rec_dist.export_run import export_checkpoint

        result["export"] = os.path.join(cfg.out, "export")
        with timer.phase("export"):
            export_checkpoint(cfg.out, result["export"])
    timer.mark("finished")
    write_timing(cfg.out, "driver", timer)
    keep = {k: result[k] for k in ("valid", "test", "best", "stages", "global_step", "seconds", "export")
            if k in result}
    for key, value in keep.items():
        print(f"[result] {key}: {json.dumps(value, default=str)}", flush=True)
    print(f"[result] wall time: {wall_time_line(read_timing(cfg.out))} (split in {cfg.out}/timing.json)", flush=True)
    return 0


def wall_time_split(timing: dict) -> dict[str, float]:
    """Seconds per phase of a whole job from timing.json's "driver" and "rank0" sections, in order;
    "other" is what no phase covers (process start, imports, Ray's reporting)."""
    driver, rank0 = timing.get("driver", {}), timing.get("rank0", {})
    seconds, marks = driver.get("seconds", {}), driver.get("marks", {})
    worker, worker_marks = rank0.get("seconds", {}), rank0.get("marks", {})
    split = {}
    if marks.get("process_started") and "started" in marks:
        split["python_start_imports"] = marks["started"] - marks["process_started"]
    split |= {"demo_data": seconds.get("demo_data", 0.0), "ray_start": seconds.get("ray_start", 0.0)}
    if "fit_started" in marks and "worker_started" in worker_marks:
        split["worker_start"] = worker_marks["worker_started"] - marks["fit_started"]
    for key in ("worker_imports", "init_distributed", "data", "backbone_load", "engines", "resume",
                "train_steps", "validation", "checkpoints", "test"):
        split[key] = worker.get(key, 0.0)
    if "fit_finished" in marks and "train_finished" in worker_marks:
        split["workers_stop"] = marks["fit_finished"] - worker_marks["train_finished"]
    split["ray_stop"] = seconds.get("ray_stop", 0.0)
    split["export"] = seconds.get("export", 0.0)
    first = marks.get("process_started") or marks.get("started")
    if first and "finished" in marks:
        split["total"] = marks["finished"] - first
        split["other"] = split["total"] - sum(v for k, v in split.items() if k != "total")
    return {k: round(v, 1) for k, v in split.items()}


def wall_time_line(timing: dict) -> str:
    split = wall_time_split(timing)
    counts = {**timing.get("rank0", {}).get("counts", {})}
    parts = [f"{k.replace('_', ' ')} {v:.0f}s" + (f" ({counts[k]}x)" if counts.get(k, 1) > 1 else "")
             for k, v in split.items() if k != "total" and abs(v) >= 0.5]
    return f"{split.get('total', 0):.0f}s = " + ", ".join(parts)
