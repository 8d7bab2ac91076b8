"""Most-popular: every user gets the items with the most TRAIN interactions.

The floor any personalised model must clear; it has no hyperparameters, so
validation is reported but selects nothing. On a leave-one-out dataset
(``run_candidates``) it ranks the stored candidates by the same train counts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cllm4rec_dist.baselines.common import BaselineSettings, evaluate, make_result
from cllm4rec_dist.corpus.split import EvalSplit
from cllm4rec_dist.eval.candidates import CandidateEvalSettings, evaluate_part


@dataclass
class PopularSettings(BaselineSettings):
    """Most-popular has only the shared evaluation settings."""


def item_counts(split: EvalSplit) -> np.ndarray:
    """Number of train interactions per item (float64, length num_items)."""
    flat = (np.concatenate([np.asarray(t, dtype=np.int64) for t in split.train]) if split.num_users
            else np.zeros(0, np.int64))
    return np.bincount(flat, minlength=split.num_items).astype(np.float64)


def run(split: EvalSplit, settings: PopularSettings) -> dict[str, Any]:
    """Evaluate most-popular on valid and test; the result dict of ``make_result``."""
    started = time.perf_counter()
    counts = item_counts(split)

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (len(users), split.num_items))

    valid = evaluate(score, split, "valid", settings)
    test = evaluate(score, split, "test", settings)
    return make_result("popular", valid, test, {}, settings, started)


def run_candidates(data, settings: CandidateEvalSettings | None = None) -> dict[str, Any]:
    """Most-popular on a leave-one-out dataset's stored candidates: each candidate scored by its train count."""
    started = time.perf_counter()
    counts = np.asarray(data.train_counts, dtype=np.float64)
    parts = {part: evaluate_part(lambda users, prefixes, candidates: counts[candidates], data, part, settings)
             for part in ("valid", "test")}
    return {"model": "popular", "valid": parts["valid"], "test": parts["test"], "selected": {},
            "settings": asdict(settings or CandidateEvalSettings()), "seconds": round(time.perf_counter() - started, 3)}
