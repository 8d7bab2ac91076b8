"""Our training loops against the authors' (github.com/yaochenzhu/LLM4Rec): one epoch of each phase, same data,
same tiny GPT-2, one process on the CPU. Prints JSON.

Their code is NOT part of this project: pass the folder of a checkout you fetched yourself
(``git clone https://github.com/yaochenzhu/LLM4Rec``). It is copied into ``--work`` and run UNMODIFIED except for
``benchmarks/llm4rec_authors.patch`` (only what crashes here; each hunk says why):

* the storage root: an ``hdfs://llm4rec`` placeholder -> ``$LLM4REC_SERVER_ROOT`` (and ``training.py`` uses a
  ``server_root`` it never defines: NameError);
* the GPT-2 124M config hard-coded in both scripts -> the checkpoint's config (load_state_dict of another size
  fails with a size mismatch);
* ``model.py`` calls ``F.log_softmax`` without importing ``F`` (NameError in the finetuning head).

and, unless ``--full-schedule``, ``benchmarks/llm4rec_one_epoch.patch``, which is NOT a crash fix: their epoch
counts (10 / 100 / 150, constants in the scripts) are read from ``$LLM4REC_EPOCHS`` (set to 1 here), so that the
pretraining phase's first epoch does not wait for 10 warm-up epochs. The loops themselves are untouched.

Their code needs transformers 4.x (their requirements.txt pins 4.24.0; transformers 5 has no slow GPT-2
tokenizer ``encoder``): give ``--authors-python`` a Python that has it, e.g. a venv with
``pip install transformers==4.24.0`` whose other packages (torch, accelerate, scipy, fsspec) are this project's.

What runs, on the same documents (``--data``, default: a small synthetic demo, 800 users x 200 items before its
5-core filter (748 x 200 after), preprocessed with the tiny-gpt2 preset; converted to their layout by
``benchmarks/llm4rec_format.py``) and the same backbone weights:

| phase | theirs | ours (``cllm4rec train``, one process, torch Adam) |
| --- | --- | --- |
| warm-up | ``training.py``: content-only pretraining epoch 1 | ``warmup`` epoch (C-steps) |
| pretraining | ``training.py``: iterative epoch 1 (collaborative + content epoch) | ``pretrain`` epoch (L + C epochs) |
| finetuning | ``finetuning.py``: epoch 1 (rec, validation, content) | ``finetune`` epoch (rec + C, validation) |

``end_to_end``: the wall time of the whole commands, theirs from each script's start to the line that ends its measured
epoch (training.py, then finetuning.py), ours the whole `cllm4rec train` (which also tests and saves).
Their epochs are timed from their own progress lines (each stamped when it reaches us; their scripts are stopped
once the first epoch of the measured phase has printed), ours from ``train_log.jsonl`` (per-step seconds: batch,
forward, backward, update) and ``timing.json`` (validation). Both sides also include their per-step data work:
theirs tokenises text in the DataLoader's collate, ours reads pre-tokenised documents.

    python benchmarks/bench_authors.py --authors-code ~/src/LLM4Rec --authors-python /tmp/llm4rec-venv/bin/python
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

PATCH = os.path.join(HERE, "llm4rec_authors.patch")
SCHEDULE_PATCH = os.path.join(HERE, "llm4rec_one_epoch.patch")  # epochs from $LLM4REC_EPOCHS (not a crash fix)
DATASET = "demo"
# Their progress lines that close each measured span (in the order they print).
TRAINING_MARKS = [
    ("warmup_start", "-----Begin Content GPT Pretraining Loop-----"),
    ("warmup_epoch1", "Epoch 1 - Review Average Loss"),
    ("pretrain_start", "-----End Content GPT Pretraining Loop-----"),
    ("pretrain_collab_done", "Epoch 1 - Average Collaborative Loss"),
    ("pretrain_content_start", "Epoch 1 - Average Regularize Loss"),
    ("pretrain_content_loss", "Epoch 1 - Review Average Loss"),
    ("pretrain_epoch1", "Epoch 1 - Average Regularize Loss"),
]
FINETUNING_MARKS = [
    ("finetune_start", "-----Begin Rec GPT Pretraining Loop-----"),
    ("finetune_rec_done", "Epoch 1 - Rec Loss"),
    ("finetune_valid_start", "Epoch 1 - Average Regularize Loss"),
    ("finetune_valid_done", "Cur NDCG@100"),
    ("finetune_content_loss", "Epoch 1 - Review Average Loss"),
    ("finetune_epoch1", "Epoch 1 - Average Regularize Loss"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-code", required=True, help="folder of a checkout of github.com/yaochenzhu/LLM4Rec")
    p.add_argument("--authors-python", default=sys.executable,
                   help="Python with transformers 4.x for their code (default: this one)")
    p.add_argument("--data", default=None,
                   help="preprocessed dataset with a GPT-2 backbone; default: the demo, preprocessed with tiny-gpt2")
    p.add_argument("--demo-users", type=int, default=800, help="size of the synthetic demo (without --data)")
    p.add_argument("--demo-items", type=int, default=200,
                   help="(their validation needs >= 100 items after the 5-core filter: NDCG@100)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of both runs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each of their scripts")
    p.add_argument("--full-schedule", action="store_true",
                   help="run their scripts with their own epoch counts (10 warm-up epochs before the pretraining "
                        "phase's first) instead of applying llm4rec_one_epoch.patch with 1 epoch per phase")
    p.add_argument("--lambda-v", type=float, default=1.0, help="their --lambda_V (ours: model.lambda_c)")
    return p.parse_args(argv)


def check_authors_code(path: str, python: str) -> None:
    """Fail before any work when the checkout or its Python is not usable, saying what to do."""
    needed = ["src/training.py", "src/finetuning.py", "src/libs/model.py", "src/libs/data.py", "src/libs/tokenizer.py"]
    if not os.path.isdir(path):
        raise SystemExit(f"--authors-code {path}: no such folder. Clone github.com/yaochenzhu/LLM4Rec and pass its "
                         "folder (their code is not shipped with this project).")
    missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise SystemExit(f"--authors-code {path}: not a LLM4Rec checkout (missing {', '.join(missing)}).")
    probe = subprocess.run([python, "-c",
                            "import transformers, accelerate, scipy, fsspec; print(transformers.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"--authors-python {python}: cannot import their dependencies: {probe.stderr.strip()[-300:]}")
    major = int(probe.stdout.strip().split(".")[0])
    if major >= 5:
        raise SystemExit(f"--authors-python {python} has transformers {probe.stdout.strip()}; their tokenizer needs "
                         "4.x (their requirements.txt: 4.24.0). Make a venv with `pip install transformers==4.24.0` "
                         "and pass its python.")


def build_demo_gpt2(out: str, users: int, items: int) -> str:
    """The synthetic demo (the launcher's generator, ``users`` x ``items``, 5-8 items a user), preprocessed with
    the tiny-gpt2 preset (their code is GPT-2 only)."""
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.demo import DemoConfig, write
    from cllm4rec_dist.data.protocol import ProtocolConfig
    from cllm4rec_dist.data.readers import ReaderOptions

    write(f"{out}-raw", DemoConfig(num_users=users, num_items=items, min_items_per_user=5, max_items_per_user=8))
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[f"{out}-raw"]), out=out,
                                backbone="tiny-gpt2", protocol=ProtocolConfig(split="random")))
    return out


def prepare_authors_code(checkout: str, work: str, schedule_patch: bool) -> str:
    """Copy their src/ into ``work`` and apply the crash-only patch (and the schedule one); returns the folder
    to run in."""
    dest = os.path.join(work, "authors")
    shutil.copytree(os.path.join(checkout, "src"), os.path.join(dest, "src"))
    for patch in [PATCH, SCHEDULE_PATCH] if schedule_patch else [PATCH]:
        done = subprocess.run(["patch", "-p1", "--forward", "-i", patch], cwd=dest, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{patch} does not apply to {checkout} (another version of their code?):\n"
                             f"{done.stdout}{done.stderr}")
    src = os.path.join(dest, "src")
    os.makedirs(os.path.join(src, "tmp", "gpt2"), exist_ok=True)  # their local cache; fsspec does not mkdir
    return src


def run_marked(cmd: list[str], cwd: str, env: dict, marks: list[tuple[str, str]], timeout: float, log: str) -> dict:
    """Run ``cmd``, stamp each of ``marks`` (in order) when its line arrives, stop the process after the last.
    The stamps are seconds after the process was started (``wall_s``: when the last mark arrived)."""
    stamps, pending = {}, list(marks)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if pending and pending[0][1] in line:
                    stamps[pending.pop(0)[0]] = time.perf_counter() - start
                    if not pending:
                        break
                if time.perf_counter() - start > timeout:
                    break
        finally:
            proc.kill()
            proc.wait()
    with open(f"{log}.stamps.json", "w", encoding="utf-8") as f:  # what was reached, kept even on failure
        json.dump(stamps, f)
    if pending:
        raise SystemExit(f"{' '.join(cmd)}: stopped before {pending[0][1]!r} (see {log})")
    return stamps | {"wall_s": stamps[marks[-1][0]]}


def run_authors(src: str, root: str, python: str, env: dict, args, work: str) -> dict:
    env = dict(env, LLM4REC_SERVER_ROOT=root)
    if not args.full_schedule:
        env["LLM4REC_EPOCHS"] = "1"
    common = ["--dataset", DATASET, "--lambda_V", str(args.lambda_v)]
    t = run_marked([python, "-u", "training.py", *common], src, env, TRAINING_MARKS, args.timeout,
                   os.path.join(work, "authors-training.log"))
    f = run_marked([python, "-u", "finetuning.py", *common], src, env, FINETUNING_MARKS, args.timeout,
                   os.path.join(work, "authors-finetuning.log"))
    return {
        # End to end: each script from its start (interpreter, imports, data, model) to the line that ends the
        # measured epoch of its last phase (it is stopped there: no test, no saving).
        "end_to_end_s": t["wall_s"] + f["wall_s"],
        "warmup": {"epoch_s": t["warmup_epoch1"] - t["warmup_start"]},
        "pretrain": {"epoch_s": t["pretrain_epoch1"] - t["pretrain_start"],
                     "L_s": t["pretrain_collab_done"] - t["pretrain_start"],
                     "C_s": t["pretrain_epoch1"] - t["pretrain_content_start"]},
        "finetune": {"epoch_s": f["finetune_epoch1"] - f["finetune_start"],
                     "rec_s": f["finetune_rec_done"] - f["finetune_start"],
                     "validation_s": f["finetune_valid_done"] - f["finetune_valid_start"],
                     "C_s": f["finetune_epoch1"] - f["finetune_valid_done"]},
    }


def run_ours(data: str, env: dict, args, work: str) -> dict:
    out = os.path.join(work, "ours")
    cmd = [sys.executable, "-m", "cllm4rec_dist.cli", "train", "--data", data, "--out", out,
           "--schedule.warmup_epochs", "1", "--schedule.pretrain_epochs", "1", "--schedule.finetune_epochs", "1",
           "--schedule.alternate", "epoch", "--schedule.finetune_content_fraction", "1.0",
           "--optim.pretrain_lr", "1e-3", "--optim.finetune_lr", "1e-4",  # theirs
           "--batch.batch_size", "20", "--model.mr_reduction", "authors", "--model.lambda_c", str(args.lambda_v),
           "--eval.select_on", "authors", "--log_every", "1000000"]
    with open(os.path.join(work, "ours.log"), "w", encoding="utf-8") as log:
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"our run failed (see {os.path.join(work, 'ours.log')})")
    from cllm4rec_dist.train.monitor import read_train_log
    from cllm4rec_dist.train.timing import read_timing

    spent: dict = {}
    for row in read_train_log(out):
        key = (row["phase"], row["kind"])
        seconds, tokens = spent.get(key, (0.0, 0.0))
        spent[key] = (seconds + row["seconds"], tokens + row["tokens"])
    timing = read_timing(out)
    section = next(iter(v for v in timing.values() if "validation" in v.get("seconds", {})), {"seconds": {}})
    validations = section["seconds"].get("validation", 0.0) / max(section.get("counts", {}).get("validation", 1), 1)
    s = lambda phase, kind: spent.get((phase, kind), (0.0, 0.0))[0]  # noqa: E731
    return {
        # End to end: the whole command (more work than theirs: it also tests the best model and saves the run).
        "end_to_end_s": wall,
        "warmup": {"epoch_s": s("warmup", "C")},
        "pretrain": {"epoch_s": s("pretrain", "L") + s("pretrain", "C"), "L_s": s("pretrain", "L"),
                     "C_s": s("pretrain", "C")},
        "finetune": {"epoch_s": s("finetune", "rec") + s("finetune", "C") + validations,
                     "rec_s": s("finetune", "rec"), "validation_s": validations, "C_s": s("finetune", "C")},
        "tokens": {f"{phase}/{kind}": int(tokens) for (phase, kind), (_, tokens) in spent.items()},
    }


def corpus_tokens(data: str) -> dict:
    """Tokens of each corpus (prompt + main, as stored): what one epoch of it feeds either implementation."""
    from cllm4rec_dist.corpus.shards import ShardedDataset

    return {name: entry["num_tokens"] for name, entry in ShardedDataset(data).manifest["corpora"].items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    check_authors_code(args.authors_code, args.authors_python)
    work = args.work or tempfile.mkdtemp(prefix="bench-authors-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # preprocessing's progress lines: stdout is for the JSON
            result = compare(args, work, env)
        print(json.dumps(result, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def compare(args, work: str, env: dict) -> dict:
    from llm4rec_format import write_authors_layout

    data = args.data or build_demo_gpt2(os.path.join(work, "data"), args.demo_users, args.demo_items)
    root = os.path.join(work, "root")
    sizes = write_authors_layout(data, root, DATASET)
    src = prepare_authors_code(args.authors_code, work, not args.full_schedule)
    theirs = run_authors(src, root, args.authors_python, env, args, work)
    ours = run_ours(data, env, args, work)
    tokens = corpus_tokens(data)
    phase_tokens = {"warmup": tokens["content"], "pretrain": tokens["collab"] + tokens["content"],
                    "finetune": tokens["rec"] + tokens["content"]}
    result = {"dataset": sizes, "backbone": "tiny-gpt2 preset (GPT-2, n_embd 64, 2 layers, 4 heads, vocab 512)",
              "threads": args.threads,
              "patches": [os.path.relpath(p, ROOT) for p in [PATCH] + ([] if args.full_schedule else [SCHEDULE_PATCH])],
              "theirs": theirs, "ours": ours,
              "corpus_tokens": tokens}
    result["end_to_end"] = {"ours_s": round(ours["end_to_end_s"], 2), "theirs_s": round(theirs["end_to_end_s"], 2),
                            "speedup_ours_vs_theirs": round(theirs["end_to_end_s"] / ours["end_to_end_s"], 2)}
    for phase in ("warmup", "pretrain", "finetune"):
        mine, their = ours[phase]["epoch_s"], theirs[phase]["epoch_s"]
        result[phase] = {"ours_s": round(mine, 2), "theirs_s": round(their, 2),
                         "speedup_ours_vs_theirs": round(their / mine, 2),
                         "ours_tokens_per_s": round(phase_tokens[phase] / mine),
                         "theirs_tokens_per_s": round(phase_tokens[phase] / their)}
    return result


if __name__ == "__main__":
    sys.exit(main())
