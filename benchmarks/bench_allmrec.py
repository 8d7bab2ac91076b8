"""Speed of A-LLMRec's stage-1 step, stage-2 step and candidate scoring on SmolLM2-135M. Prints JSON lines.

    python benchmarks/bench_allmrec.py                          # fp32 and bf16, CPU
    python benchmarks/bench_allmrec.py --parts score --precision fp32 --repeats 3
    python benchmarks/bench_allmrec.py --parts stage2,score --compile off,on    # eager and torch.compile'd layers

Inputs: MovieLens-100K's real titles (../shared/data/movielens-100k/u.item), seeded random histories of
``--history`` items and ``--candidates`` candidates per user, random x_u / e_i vectors (the stage-0/1 outputs'
shapes: 50 and 128); the prompt and the scored titles are model/prompts.py's. Per (precision, part) one line:

* stage1: one stage-1 step (Sentence-BERT fine-tuned + the four linear maps, batch 32 users = 64 texts):
  tokens_per_s = real SBERT input tokens per second, real_token_fraction = real / padded tokens.
* stage2: one stage-2 step (forward + backward through the frozen LLM into F_U, F_I, Adam; batch 4 prompts):
  tokens_per_s = real prompt + answer tokens per second, real_token_fraction = real / (rows x width).
* score: ``candidate_scores`` of ``--users`` users in batches of ``--batch`` (each user: its prompt and its
  candidates' titles): users_per_s; tokens_per_s / real_token_fraction count the rows the scorer ran.

matmul_rate_fraction is computed as benchmarks/step_kinds.py does for CLLM4Rec: every GEMM of the timed work is
recorded (untimed pass), replayed alone on random inputs of the same shapes, and the sum of those standalone
times is divided by the measured time (1.0 = nothing but GEMMs at this machine's rate). Times are the median of
``--repeats`` runs after one warm-up.

Before/after: ``--legacy-model <old checkout>/cllm4rec_dist/recommenders/allmrec/model.py`` also times the
commit-27b35ea scorer (its ``LLMAlignment.candidate_scores(left_batch, users, items, answers)``: left-padded
prompts, prompt logits over every position, KV cache repeated per candidate, answers = title + EOS padded to the
longest, mean per token) on the same loaded backbone and the same users, alternating old and new runs so that
both see the same machine load (``git show 27b35ea:cllm4rec_dist/recommenders/allmrec/model.py > old_model.py``).
The two do not compute the same score (the old one averages over the tokens incl. EOS); the new one's numerics are
pinned by tests/test_allmrec_scorer.py (equal to a plain per-candidate forward).

``--compile off,on``: each precision with the LLM's decoder layers eager, then compiled (``model.compile``; the
warm-up run compiles). The legacy scorer is timed in the eager case only; the compiled case's
``speedup_vs_legacy`` divides by that eager legacy time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cllm4rec_dist  # noqa: E402,F401  before torch work: OMP settings as the CLI sets them
from cllm4rec_dist.corpus.presets import load_tokenizer, smollm2_location  # noqa: E402
from cllm4rec_dist.model.backbone_settings import BackboneSettings  # noqa: E402
from cllm4rec_dist.recommenders.allmrec.model import LLMAlignment, SoftBatch  # noqa: E402
from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_kinds import GemmRecorder, standalone_seconds  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "movielens-100k")
CF_DIM, JOINT_DIM = 50, 128


def movielens_titles(folder: str) -> list[str]:
    with open(os.path.join(folder, "u.item"), encoding="latin-1") as f:
        return [line.split("|")[1] for line in f if line.strip()]


def timed(run, repeats: int) -> tuple[float, list[float]]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_fraction(run, seconds: float) -> float:
    recorder = GemmRecorder()
    with torch.compiler.set_stance("force_eager"), recorder:  # a compiled run's GEMMs are the eager run's
        run()
    gemm_seconds, _ = standalone_seconds(recorder.calls)
    return round(gemm_seconds / seconds, 3)


def user_rows(g: np.random.Generator, num_items: int, n: int, history: int, candidates: int):
    rows = []
    for _ in range(n):
        items = g.choice(num_items, history + candidates, replace=False).tolist()
        rows.append((items[:history], items[history:]))
    return rows


def legacy_scorer(path: str):
    """The ``candidate_scores`` function of an older model.py (loaded from its file, under another name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("allmrec_model_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LLMAlignment.candidate_scores


def bench_score(llm, prompts: ALLMRecPrompts, rows, users, items, batch: int, repeats: int,
                legacy=None, legacy_seconds: float | None = None) -> dict:
    chunks = [list(range(k, min(k + batch, len(rows)))) for k in range(0, len(rows), batch)]
    shapes = {"new": [], "legacy": []}

    def run_new():
        shapes["new"].clear()
        for chunk in chunks:
            ps = [prompts.scoring_prompt(*rows[u]) for u in chunk]
            titles = [[prompts.scored_title(i) for i in rows[u][1]] for u in chunk]
            llm.candidate_scores(ps, users[chunk], items, titles, "sum")
            lengths = [len(p.ids) + sum(len(t) for t in row) for p, row in zip(ps, titles)]
            shapes["new"].append((sum(lengths), len(chunk) * max(lengths)))

    def run_legacy():  # commit 27b35ea: left-padded prompts, answers = title piece + EOS, padded to the longest
        shapes["legacy"].clear()
        for chunk in chunks:
            left = SoftBatch.collate([prompts.prompt(*rows[u]) for u in chunk], None, prompts.fill_id, left=True)
            answers = [[prompts.answer(i) for i in rows[u][1]] for u in chunk]
            legacy(llm, left, users[chunk], items, answers)
            width = max(len(a) for row in answers for a in row)
            real = int(left.attention_mask.sum()) + sum(len(a) for row in answers for a in row)
            shapes["legacy"].append((real, left.input_ids.numel() + len(chunk) * len(answers[0]) * width))

    runs = {"new": run_new, **({"legacy": run_legacy} if legacy else {})}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):  # alternating: both see the same load
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in runs:
        seconds = statistics.median(times[name])
        real, processed = sum(r for r, _ in shapes[name]), sum(p for _, p in shapes[name])
        prefix = "" if name == "new" else "legacy_"
        out.update({f"{prefix}users_per_s": round(len(rows) / seconds, 3), f"{prefix}seconds": round(seconds, 3),
                    f"{prefix}seconds_runs": [round(t, 3) for t in times[name]],
                    f"{prefix}tokens_per_s": round(real / seconds, 1),
                    f"{prefix}real_token_fraction": round(real / processed, 3)})
    out["matmul_rate_fraction"] = matmul_fraction(run_new, statistics.median(times["new"]))
    if legacy:
        legacy_seconds = statistics.median(times["legacy"])
    if legacy_seconds:
        out["speedup_vs_legacy"] = round(legacy_seconds / statistics.median(times["new"]), 2)
    out.update({"users": len(rows), "batch": batch})
    return out


def bench_stage2(llm, prompts: ALLMRecPrompts, rows, users, items, batch: int, repeats: int) -> dict:
    chosen = list(range(batch))
    pairs = [(prompts.prompt(*rows[u]), prompts.answer(rows[u][1][0])) for u in chosen]
    collated = SoftBatch.collate([p for p, _ in pairs], [a for _, a in pairs], prompts.fill_id)
    optimizer = torch.optim.Adam(llm.projection_parameters(), lr=1e-4)

    def run():
        loss = llm.answer_loss(collated, users[chosen], items)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds, times = timed(run, repeats)
    real = int(collated.attention_mask.sum())
    return {"tokens_per_s": round(real / seconds, 1), "step_seconds": round(seconds, 3),
            "seconds_runs": [round(t, 3) for t in times],
            "real_token_fraction": round(real / collated.input_ids.numel(), 3),
            "matmul_rate_fraction": matmul_fraction(run, seconds), "batch": batch}


def bench_stage1(titles: list[str], repeats: int, batch: int = 32) -> dict:
    from cllm4rec_dist.model.sbert import load_sbert
    from cllm4rec_dist.recommenders.allmrec.model import CollabTextAlignment, TextEncoder, item_text

    torch.manual_seed(0)
    text = TextEncoder(load_sbert(None, "cpu"), [item_text(t, "") for t in titles], trainable=True)
    align = CollabTextAlignment(CF_DIM, text.dim, JOINT_DIM)
    optimizer = torch.optim.Adam([*align.parameters(), *text.sbert.parameters()], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    items = torch.randperm(len(titles), generator=g)[:2 * batch]
    table, user = torch.randn(len(titles), CF_DIM, generator=g), torch.randn(batch, CF_DIM, generator=g)
    text.train()

    def run():
        texts = text(items)
        out = align.losses(user, table[items[:batch]], table[items[batch:]], texts[:batch], texts[batch:], 0.5, 0.5)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds, times = timed(run, repeats)
    features = text.sbert.preprocess([text.texts[i] for i in items.tolist()])
    real, processed = int(features["attention_mask"].sum()), features["attention_mask"].numel()
    return {"tokens_per_s": round(real / seconds, 1), "step_seconds": round(seconds, 3),
            "seconds_runs": [round(t, 3) for t in times], "real_token_fraction": round(real / processed, 3),
            "matmul_rate_fraction": matmul_fraction(run, seconds), "batch_users": batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--parts", default="stage1,stage2,score")
    p.add_argument("--users", type=int, default=16, help="users scored per timed run")
    p.add_argument("--batch", type=int, default=8, help="users per scoring forward (allmrec.eval_batch_size)")
    p.add_argument("--history", type=int, default=10, help="history items in the prompt (allmrec.prompt_history)")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--legacy-model", default=None, help="an older allmrec/model.py whose scorer is timed too")
    p.add_argument("--compile", default="off", help="off, on, or off,on: the LLM's decoder layers torch.compile'd")
    args = p.parse_args(argv)
    if not set(args.compile.split(",")) <= {"off", "on"}:
        p.error(f"--compile {args.compile!r}: off, on, or off,on")
    if args.threads:
        torch.set_num_threads(args.threads)
    titles = movielens_titles(DATA)
    parts = args.parts.split(",")
    common = {"backbone": "smollm2", "load_1min": os.getloadavg()[0], "threads": torch.get_num_threads(),
              "repeats": args.repeats}
    if "stage1" in parts:
        print(json.dumps({"part": "stage1", **common, **bench_stage1(titles, args.repeats)}), flush=True)
    location = smollm2_location()
    prompts = ALLMRecPrompts(load_tokenizer(location), titles)
    g = np.random.default_rng(0)
    rows = user_rows(g, len(titles), args.users, args.history, args.candidates)
    legacy_seconds = {}  # precision -> the eager legacy scorer's time
    for precision in args.precision.split(","):
        for compiled in [mode == "on" for mode in args.compile.split(",")]:
            torch.manual_seed(0)
            llm = LLMAlignment.load(location, BackboneSettings(precision=precision, compile=compiled), CF_DIM,
                                    JOINT_DIM, device="cpu")
            users, items = torch.randn(len(rows), CF_DIM), torch.randn(len(titles), JOINT_DIM)
            case = {"precision": precision, "compile": compiled}
            if "stage2" in parts:
                out = bench_stage2(llm, prompts, rows, users, items, 4, args.repeats)
                print(json.dumps({"part": "stage2", **case, **common, **out}), flush=True)
            if "score" in parts:
                legacy = legacy_scorer(args.legacy_model) if args.legacy_model and not compiled else None
                out = bench_score(llm, prompts, rows, users, items, args.batch, args.repeats, legacy,
                                  legacy_seconds.get(precision))
                if legacy:
                    legacy_seconds[precision] = out["legacy_seconds"]
                print(json.dumps({"part": "score", **case, **common, **out}), flush=True)
            del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
