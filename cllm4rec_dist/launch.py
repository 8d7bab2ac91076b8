"""What the launchers share: parse the config, make the demo dataset when it is the default, run, export.

`launchers/pretrain_llama.py` (Ray) and `launchers/finetune.py` (DeepSpeed launcher or Ray)
are thin wrappers around this module.
"""

from __future__ import annotations

import argparse
import json
import os

from cllm4rec_dist.resources import DEMO_DATA, demo_data_dir, packaged, resolve_path
from cllm4rec_dist.train.config import TrainConfig, add_config_arguments, config_from_args

DEFAULT_CONFIG = packaged(os.path.join("configs", "demo.yaml"))


def parse(description: str, argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    add_config_arguments(p)
    p.add_argument("--no-export", action="store_true", help="skip the embedding export at the end")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = p.parse_args(argv)
    args.config = resolve_path(args.config) if args.config else DEFAULT_CONFIG
    return config_from_args(args), args


def ensure_demo_data(cfg: TrainConfig) -> None:
    """The embedded default: when ``data`` is the demo's name (``shards/demo``) and no such dataset is in the
    working directory, use the project's own ``shards/demo``, building it (synthetic data + tiny backbone) once."""
    if os.path.normpath(cfg.data) != DEMO_DATA or os.path.exists(os.path.join(cfg.data, "manifest.json")):
        return
    cfg.data = demo_data_dir()
    if os.path.exists(os.path.join(cfg.data, "manifest.json")):
        return
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.demo import DemoConfig, write
    from cllm4rec_dist.data.readers import ReaderOptions

    raw = f"{cfg.data}-raw"
    print(f"[launch] no dataset at {cfg.data}: writing the synthetic demo to {raw} and preprocessing it", flush=True)
    write(raw, DemoConfig())
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[raw]), out=cfg.data))


def finish(cfg: TrainConfig, args: argparse.Namespace, result: dict) -> int:
    """After training: export the best tables with original ids into <run>/export, print the summary."""
    if not args.no_export:
        from cllm4rec_dist.export.command import export_checkpoint

        result["export"] = os.path.join(cfg.out, "export")
        export_checkpoint(cfg.out, result["export"])
    keep = {k: result.get(k) for k in ("valid", "test", "best", "global_step", "seconds", "export")}
    print(json.dumps(keep, indent=1, default=str), flush=True)
    return 0
