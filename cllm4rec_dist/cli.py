"""`cllm4rec`: one command line for every stage. Each subcommand lives in its stage's home.

A subcommand module provides ``add_arguments(parser)`` and ``run(args) -> int``. The commands in
``INTERRUPTIBLE`` end on Ctrl-C / SIGTERM with one line naming the run folder and the command that resumes it,
exit status 130 / 143 (launch.py ``interruptible``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cllm4rec_dist import COMMAND
from cllm4rec_dist.errors import run_command
from cllm4rec_dist.quiet import quiet_libraries

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("cllm4rec_dist.data.demo", "write the synthetic demo dataset (table format) to --out"),
    "init-backbone": ("cllm4rec_dist.corpus.presets",
                      "build a small random backbone (+ tokenizer) from a preset and save it"),
    "preprocess": ("cllm4rec_dist.corpus.preprocess",
                   "raw files -> protocol -> documents -> webdataset shards + manifest"),
    "train": ("cllm4rec_dist.reference", "single-process reference trainer (no Ray, no DeepSpeed)"),
    "baselines": ("cllm4rec_dist.baselines.command",
                  "most-popular / EASE / Multi-VAE on the same split and metrics; "
                  "popular / SASRec / GRU4Rec on leave-one-out candidates"),
    "evaluate": ("cllm4rec_dist.evaluate_run",
                 "score a trained CLLM4Rec run or checkpoint on valid/test as training does (best weights)"),
    "export": ("cllm4rec_dist.export_run", "export user/item embeddings with original ids (Parquet + NumPy)"),
    "two-tower": ("cllm4rec_dist.export.two_tower",
                  "two-tower retrieval without / with the exported embeddings (CLLM4Rec-Emb)"),
    "tune": ("cllm4rec_dist.tune",
             "search hyperparameters on validation with Ray Tune (ASHA), equal budget per model; writes best.yaml"),
    "report": ("cllm4rec_dist.report.command",
               "baselines + CLLM4Rec and ablations on one split: report.md, recall20.png, report.json"),
}


INTERRUPTIBLE = frozenset({"train"})  # runs that hold a run folder and resume from it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="CLLM4Rec: LLM-based recommender training. Typical flow: "
        "cllm4rec demo-data --out raw/ && cllm4rec preprocess --format table --input raw/ --out data/ "
        "&& cllm4rec train --data data/ --out run/",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    program = argv is None  # run as `cllm4rec ...` / `python -m cllm4rec_dist.cli ...`
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Import only the module that runs (and all of them for the top-level --help).
        if wanted in (None, name):
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    quiet_libraries()
    run = importlib.import_module(COMMANDS[args.command][0]).run
    if args.command in INTERRUPTIBLE:
        from cllm4rec_dist.launch import exit_now, interruptible

        status = interruptible(run_command, run, args, command=[COMMAND, *argv])
        if program:  # the `cllm4rec` program, not a call from Python: skip the interpreter's teardown on success
            exit_now(status)
        return status
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
