"""End to end: the README's main command with 1 and with 2 Ray workers. Prints JSON.

Why: the per-step benchmarks (bench_model.py) do not see what a user waits for:
Ray start-up, per-worker backbone loading, DeepSpeed engine set-up, gloo
all-reduces, validation, checkpointing through Ray's storage and the export.
This runs the real launcher (``launchers/pretrain_llama.py``, the README's main
command) as a subprocess into a fresh run folder for each worker count and reports

* wall time of the whole command (and its exit code);
* tokens/s per step kind (sum of ``tokens`` / sum of ``seconds`` in ``train_log.jsonl``; ``tokens`` are the
  loss targets of the step across all ranks, ``seconds`` rank 0's step time), also split by phase;
* checkpoint size vs table size: bytes of ``trainer.pt`` + the optimizer files (DeepSpeed ``engine-*`` folders or
  ``optim-*.pt``) in the newest checkpoint, against 4 bytes x the elements of the trainable tables/heads
  (``trainer.pt`` holds the tables AND their best-validation copy; Adam keeps two fp32 moments per element, plus
  DeepSpeed's fp32 master copy of the partition).

    python benchmarks/bench_e2e.py                               # demo config, 1 and 2 workers (several minutes)
    python benchmarks/bench_e2e.py --workers 2 --extra=--no-export
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join("configs", "demo.yaml"), help="training config (repo-relative)")
    p.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts, run one after the other")
    p.add_argument("--out-root", default=None, help="where the run folders go (default: a fresh temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the run folders (default: removed unless --out-root)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds before a run is killed")
    p.add_argument("--extra", action="append", default=[], help="extra launcher argument (repeat; use --extra=--flag)")
    return p.parse_args(argv)


def ensure_data(config: str) -> None:
    """Build the demo dataset before timing, so that no run pays for it."""
    from cllm4rec_dist.config import load_config
    from cllm4rec_dist.corpus.preprocess import demo_dataset

    demo_dataset(load_config(config).data)


def throughput(log_path: str) -> dict:
    per_kind, per_phase = defaultdict(lambda: [0.0, 0.0, 0]), defaultdict(lambda: [0.0, 0.0, 0])
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for key, acc in ((rec["kind"], per_kind), (f"{rec['phase']}/{rec['kind']}", per_phase)):
                acc[key][0] += rec["tokens"]
                acc[key][1] += rec["seconds"]
                acc[key][2] += 1

    def table(acc):
        return {k: {"steps": n, "tokens": int(t), "seconds": round(s, 2), "tokens_per_s": round(t / s, 1)}
                for k, (t, s, n) in acc.items()}

    return {"per_kind": table(per_kind), "per_phase": table(per_phase)}


def newest_checkpoint(run_dir: str) -> str | None:
    found = [root for root, _, files in os.walk(run_dir) if "trainer.pt" in files and ".tmp" not in root]
    return max(found, key=lambda d: os.path.getmtime(os.path.join(d, "trainer.pt"))) if found else None


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def checkpoint_sizes(run_dir: str) -> dict:
    from cllm4rec_dist.train.checkpoint import load_state

    ckpt = newest_checkpoint(run_dir)
    if ckpt is None:
        return {"error": f"no checkpoint with trainer.pt under {run_dir}"}
    blob = load_state(os.path.join(ckpt, "trainer.pt"))
    elements = sum(t.numel() for t in blob["trainable"].values())
    table_bytes = 4 * elements
    trainer_bytes = os.path.getsize(os.path.join(ckpt, "trainer.pt"))
    optim = {name: tree_bytes(os.path.join(ckpt, name)) for name in sorted(os.listdir(ckpt))
             if name.startswith("optim-")}
    total = trainer_bytes + sum(optim.values())
    return {"checkpoint": os.path.relpath(ckpt, run_dir), "trainable_elements": elements,
            "table_bytes_fp32": table_bytes,
            "tables": {name: list(t.shape) for name, t in blob["trainable"].items()},
            "trainer_pt_bytes": trainer_bytes, "optimizer_bytes": optim, "checkpoint_bytes": total,
            "checkpoint_over_tables": round(total / table_bytes, 2),
            "other_files": sorted(n for n in os.listdir(ckpt) if n != "trainer.pt" and n not in optim)}


def run_once(workers: int, args, out: str) -> dict:
    command = [sys.executable, os.path.join("launchers", "pretrain_llama.py"), "--config", args.config,
               "--out", out, "--dist.num_workers", str(workers), *args.extra]
    log_path = f"{out}.log"
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - start
    result = {"workers": workers, "command": " ".join(command), "returncode": rc, "wall_seconds": round(wall, 1),
              "log": log_path}
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            result["log_tail"] = f.read()[-2000:]
        return result
    result["throughput"] = throughput(os.path.join(out, "train_log.jsonl"))
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    result["metrics"] = {part: {k: metrics[part][k] for k in ("recall@20", "recall@40", "ndcg@100")}
                         for part in ("valid", "test")}
    result["train_seconds_reported"] = metrics.get("seconds")
    result["checkpoint"] = checkpoint_sizes(out)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    os.chdir(REPO)
    with contextlib.redirect_stdout(sys.stderr):  # preprocessing logs to stdout; keep stdout for the JSON
        ensure_data(args.config)
    root = args.out_root or tempfile.mkdtemp(prefix="bench_e2e-")
    os.makedirs(root, exist_ok=True)
    import torch

    report = {"config": args.config, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "runs": []}
    for workers in [int(w) for w in args.workers.split(",") if w]:
        out = os.path.join(root, f"workers-{workers}")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: nothing to resume from
        print(f"[bench_e2e] {workers} worker(s) -> {out}", file=sys.stderr, flush=True)
        report["runs"].append(run_once(workers, args, out))
    if not args.keep and args.out_root is None:
        shutil.rmtree(root, ignore_errors=True)
        report["run_folders"] = "removed (use --keep or --out-root to keep them)"
    else:
        report["run_folders"] = root
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
