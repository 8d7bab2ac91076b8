"""What the launchers share: parse the config, make the demo dataset when it is the default, run, export.

`launchers/pretrain_llama.py` (Ray) and `launchers/finetune.py` (DeepSpeed launcher or Ray)
are thin wrappers around this module.
"""

from __future__ import annotations

import argparse
import json
import os

from cllm4rec_dist.train.config import TrainConfig, add_config_arguments, config_from_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yaml")
# The embedded demo datasets and the split each is preprocessed with (A-LLMRec needs leave-one-out).
DEMO_DATA = {os.path.join("shards", "demo"): "random", os.path.join("shards", "demo-loo"): "leave-one-out"}


def parse(description: str, argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=description)
    add_config_arguments(p)
    p.add_argument("--no-export", action="store_true", help="skip the embedding export at the end")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = p.parse_args(argv)
    if not args.config:
        args.config = DEFAULT_CONFIG
    return config_from_args(args), args


def ensure_demo_data(cfg: TrainConfig) -> None:
    """The embedded default: build the synthetic dataset + tiny backbone if `data` is a demo and missing."""
    split = DEMO_DATA.get(os.path.normpath(cfg.data))
    if split is None or os.path.exists(os.path.join(cfg.data, "manifest.json")):
        return
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.demo import DemoConfig, write
    from cllm4rec_dist.data.protocol import ProtocolConfig
    from cllm4rec_dist.data.readers import ReaderOptions

    raw = os.path.join("shards", "demo-raw")
    print(f"[launch] no dataset at {cfg.data}: writing the synthetic demo to {raw} and preprocessing it "
          f"({split} split)", flush=True)
    write(raw, DemoConfig())
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[raw]), out=cfg.data,
                                protocol=ProtocolConfig(split=split)))


def finish(cfg: TrainConfig, args: argparse.Namespace, result: dict) -> int:
    """After training: export the best tables with original ids into <run>/export, print the summary."""
    if not args.no_export:
        from cllm4rec_dist.export.command import export_checkpoint

        result["export"] = os.path.join(cfg.out, "export")
        export_checkpoint(cfg.out, result["export"])
    keep = {k: result[k] for k in ("valid", "test", "best", "stages", "global_step", "seconds", "export") if k in result}
    print(json.dumps(keep, indent=1, default=str), flush=True)
    return 0
