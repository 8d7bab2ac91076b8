"""What every baseline shares: the evaluation settings, scoring a part of the split, the result dict.

Keeping this in one place is what makes the baselines comparable with each
other and with CLLM4Rec: same metric code, same exclusion convention, same
JSON shape.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from cllm4rec_dist.corpus.split import EvalSplit
from cllm4rec_dist.eval.metrics import DEFAULT_NDCG_KS, DEFAULT_RECALL_KS, evaluate_split

ScoreFn = Callable[[np.ndarray], Any]
S = TypeVar("S", bound="BaselineSettings")


class SettingsError(TypeError):
    """A setting was given that the chosen baseline does not have."""


@dataclass
class BaselineSettings:
    """Evaluation settings common to every baseline."""

    exclude_valid_on_test: bool = True
    """When scoring TEST, also exclude the user's VALID items from the ranking (they are
    known interactions by then). False reproduces the authors' predict.py, which masks
    train items only. Validation always excludes train items only."""

    ks: tuple[int, ...] = DEFAULT_RECALL_KS
    """Cut-offs for Recall@K."""

    ndcg_ks: tuple[int, ...] = DEFAULT_NDCG_KS
    """Cut-offs for NDCG@K."""

    select_metric: str = "recall@20"
    """Validation metric that picks hyperparameters / the best epoch (higher is better)."""

    eval_batch_users: int = 1024
    """Users scored at once; bounds the dense score block at eval_batch_users x num_items."""

    score_test: bool = True
    """Score TEST once with the selected setting; False stops at validation (tuning: `cllm4rec tune` selects on
    validation and never looks at test) and the result's "test" is None."""


def settings_from_kwargs(cls: type[S], model: str, kwargs: dict[str, Any]) -> S:
    """Build ``cls`` from keyword settings, naming any that do not apply to ``model``.

    None values are dropped (meaning "use the default"), which lets the command
    pass every optional flag through unchanged.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in kwargs.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise SettingsError(f"setting(s) {', '.join(unknown)} do not apply to {model}; "
                            f"valid: {', '.join(sorted(names))}")
    for key in ("ks", "ndcg_ks"):
        if key in given:
            given[key] = tuple(int(k) for k in given[key])
    return cls(**given)


def evaluate(score_fn: ScoreFn, split: EvalSplit, part: str, settings: BaselineSettings) -> dict[str, Any]:
    """Metrics of ``score_fn`` on ``part`` ("valid" / "test") under ``settings``."""
    return evaluate_split(
        score_fn,
        split,
        part,
        exclude_valid_on_test=settings.exclude_valid_on_test,
        ks=settings.ks,
        ndcg_ks=settings.ndcg_ks,
        batch_users=settings.eval_batch_users,
    )


def selection_value(metrics: dict[str, Any], settings: BaselineSettings) -> float:
    """The validation number that model selection maximises (-inf when undefined)."""
    if settings.select_metric not in metrics:
        raise KeyError(f"select_metric {settings.select_metric!r} is not computed; have {sorted(metrics)}")
    value = metrics[settings.select_metric]
    return float("-inf") if value is None else float(value)


def make_result(
    model: str,
    valid: dict[str, Any],
    test: dict[str, Any],
    selected: dict[str, Any],
    settings: BaselineSettings,
    started: float,
    history: dict[str, list] | None = None,
) -> dict[str, Any]:
    """The JSON every baseline returns and the command writes."""
    out: dict[str, Any] = {
        "model": model,
        "valid": valid,
        "test": test,
        "selected": selected,
        "settings": dataclasses.asdict(settings),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if history is not None:
        out["history"] = history
    return out
