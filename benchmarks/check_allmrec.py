"""Two checks A-LLMRec's stage 2 must pass before any long run, on SmolLM2-135M (real pretrained weights,
offline). Prints one JSON object.

    python benchmarks/check_allmrec.py                       # both checks, fp32, CPU: ~10 min on 2 cores
    python benchmarks/check_allmrec.py --check stated --users 40

(1) stated: "the answer stated in the prompt is picked". Each user's titles-only prompt (real MovieLens-100K
    history, the true next item + 19 random unseen candidates) gets a hint right before the question's end:
    '... The answer is "<title of candidate k>". The next item this user will watch is' (with --chat-template: the
    chat's question, then the assistant turn), k drawn at random
    among the 20 (not always the positive). The scorer (model.py ``candidate_scores``) must rank candidate k
    first; pick rate per score mode (sum, mean, first). No trained part takes part: this checks the scorer and
    the prompt, with the frozen pretrained LLM alone.
(2) overfit: stage 2 on ``--train-users`` users (the trainer's prompt: user soft token, titles each followed by
    an item soft token, 20 candidates; the answer title + EOS as target; only F_U and F_I train, the LLM is
    frozen) for ``--steps`` steps of ``--batch`` prompts; training Hit@1 on the same prompts (scored with the
    configured score mode) before and after. x_u and e_i are fixed random vectors (one per user / item)
    standing in for the stage-0/1 outputs: they identify the user and items as the real ones do, so a
    working stage 2 can memorise the few users. Chance is 1/20.

pass: stated pick rate (sum) >= 0.9 and training Hit@1 after >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cllm4rec_dist  # noqa: E402,F401  OMP settings as the CLI sets them
from cllm4rec_dist.corpus.presets import load_tokenizer, smollm2_location  # noqa: E402
from cllm4rec_dist.recommenders.allmrec.model import SCORE_MODES, LLMAlignment, SoftBatch  # noqa: E402
from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts, SoftPrompt, chat_template_source  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_allmrec import CF_DIM, DATA, JOINT_DIM, movielens_titles  # noqa: E402


def movielens_histories(folder: str) -> list[list[int]]:
    """Each user's items by time (0-based item index = u.item order)."""
    by_user = defaultdict(list)
    with open(os.path.join(folder, "u.data")) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[0] != "0":
                by_user[int(parts[0])].append((int(parts[3]), int(parts[1]) - 1))
    return [[i for _, i in sorted(v)] for _, v in sorted(by_user.items())]


def examples(histories, num_items: int, n: int, history: int, candidates: int, seed: int):
    """n users: (recent history, candidates with the next item among them, index of the next item)."""
    g = np.random.default_rng(seed)
    users = g.choice([u for u, h in enumerate(histories) if len(h) > history], n, replace=False)
    out = []
    for u in users:
        items, target = histories[u][-history - 1:-1], histories[u][-1]
        seen, negatives = set(histories[u]), []
        while len(negatives) < candidates - 1:
            j = int(g.integers(num_items))
            if j not in seen and j not in negatives:
                negatives.append(j)
        row = [target, *negatives]
        row = [row[k] for k in g.permutation(len(row))]
        out.append((int(u), items, row, row.index(target)))
    return out


def check_stated(llm, prompts: ALLMRecPrompts, rows, seed: int, batch: int) -> dict:
    tok = prompts.tokenizer
    g = np.random.default_rng(seed + 1)
    hint, closing = tok.encode(". The answer is", add_special_tokens=False), prompts.closing
    stated = [int(g.integers(len(c))) for _, _, c, _ in rows]
    built = []
    for (_, history, candidates, _), k in zip(rows, stated):
        base = prompts.prompt(history, candidates, soft=False)
        ids = base.ids[:len(base.ids) - len(closing)] + hint + prompts.title_ids[candidates[k]] + closing
        built.append(SoftPrompt(ids=ids + prompts.answer_prefix))
    titles = [[prompts.scored_title(i) for i in c] for _, _, c, _ in rows]
    picked = {score: [] for score in SCORE_MODES}
    for s in range(0, len(rows), batch):
        by_mode = llm.candidate_scores_by_mode(built[s:s + batch], None, None, titles[s:s + batch])
        for score, scores in by_mode.items():
            picked[score] += scores.argmax(1).tolist()
        print(f"[check] stated: {min(s + batch, len(rows))}/{len(rows)} users", file=sys.stderr, flush=True)
    result = {f"pick_rate_{score}": float(np.mean([p == k for p, k in zip(picked[score], stated)]))
              for score in SCORE_MODES}
    result["pick_rate_positive_sum"] = float(np.mean([p == t for p, (_, _, _, t) in zip(picked["sum"], rows)]))
    result["users"] = len(rows)
    return result


def training_hit1(llm, prompts, rows, users, items, score: str, batch: int) -> float:
    hits = []
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        ps = [prompts.scoring_prompt(h, c) for _, h, c, _ in chunk]
        titles = [[prompts.scored_title(i) for i in c] for _, _, c, _ in chunk]
        scores = llm.candidate_scores(ps, users[s:s + batch], items, titles, score)
        hits += [int(scores[r].argmax()) == t for r, (_, _, _, t) in enumerate(chunk)]
    return float(np.mean(hits))


def check_overfit(llm, prompts: ALLMRecPrompts, rows, args) -> dict:
    torch.manual_seed(args.seed)
    users = torch.randn(len(rows), CF_DIM)
    items = torch.randn(len(prompts.titles), JOINT_DIM)
    before = training_hit1(llm, prompts, rows, users, items, args.score, args.batch)
    optimizer = torch.optim.Adam(llm.projection_parameters(), lr=args.lr)
    losses, start = [], time.time()
    g = np.random.default_rng(args.seed + 2)
    llm.train()
    for step in range(args.steps):
        chosen = g.choice(len(rows), min(args.batch, len(rows)), replace=False)
        batch = SoftBatch.collate([prompts.prompt(rows[k][1], rows[k][2]) for k in chosen],
                                  [prompts.answer(rows[k][2][rows[k][3]]) for k in chosen], prompts.fill_id)
        loss = llm.answer_loss(batch, users[torch.as_tensor(chosen)], items)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.projection_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss.detach()), 4))
        print(f"[check] overfit step {step + 1}/{args.steps} loss {losses[-1]:.3f} "
              f"({time.time() - start:.0f}s, ETA {(time.time() - start) / (step + 1) * (args.steps - step - 1):.0f}s)",
              file=sys.stderr, flush=True)
    llm.eval()
    after = training_hit1(llm, prompts, rows, users, items, args.score, args.batch)
    return {"hit1_before": before, "hit1_after": after, "chance": 1 / args.candidates, "users": len(rows),
            "steps": args.steps, "lr": args.lr, "loss_first": losses[0], "loss_last": losses[-1],
            "losses": losses, "train_seconds": round(time.time() - start, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", default="stated,overfit")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--users", type=int, default=40, help="users of the stated-answer check")
    p.add_argument("--train-users", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--history", type=int, default=5)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--score", default="sum", choices=SCORE_MODES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", default=None,
                   help='allmrec.chat_template: unset = the plain prompt, "backbone" or a Jinja file')
    args = p.parse_args(argv)
    titles = movielens_titles(DATA)
    histories = movielens_histories(DATA)
    location = smollm2_location()
    tokenizer = load_tokenizer(location)
    prompts = ALLMRecPrompts(tokenizer, titles, chat_template=chat_template_source(args.chat_template, tokenizer))
    torch.manual_seed(args.seed)
    llm = LLMAlignment.load(location, args.precision, CF_DIM, JOINT_DIM, device="cpu")
    out = {"backbone": "smollm2", "precision": args.precision, "history": args.history, "score": args.score,
           "chat_template": args.chat_template,
           "load_1min": os.getloadavg()[0]}
    checks = args.check.split(",")
    if "stated" in checks:
        rows = examples(histories, len(titles), args.users, args.history, args.candidates, args.seed)
        out["stated"] = check_stated(llm, prompts, rows, args.seed, args.batch)
        print(json.dumps({"stated": out["stated"]}), file=sys.stderr, flush=True)  # a long overfit may follow
    if "overfit" in checks:
        rows = examples(histories, len(titles), args.train_users, args.history, args.candidates, args.seed + 10)
        out["overfit"] = check_overfit(llm, prompts, rows, args)
    ok = [out["stated"]["pick_rate_sum"] >= 0.9] if "stated" in out else []
    ok += [out["overfit"]["hit1_after"] >= 0.5] if "overfit" in out else []
    out["passed"] = all(ok)
    print(json.dumps(out), flush=True)
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
