"""EASE (Steck, WWW 2019): a closed-form item-item linear model.

B = argmin ||X - X B||^2 + λ||B||^2 subject to diag(B) = 0 has the solution
P = (XᵀX + λI)⁻¹, B_ij = -P_ij / P_jj, B_jj = 0; scores = X B.

λ is chosen on validation (``select_metric``, Recall@20 by default) from a grid;
test is computed once, at the chosen λ. The Gram matrix is built once and each
λ costs one J x J symmetric inverse in float64 (Cholesky + LAPACK potri), which
is fine up to ~20k items; memory is about three J x J float64 matrices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cllm4rec_dist.baselines.common import BaselineSettings, evaluate, make_result, selection_value
from cllm4rec_dist.corpus.split import EvalSplit

DEFAULT_LAMBDAS: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


@dataclass
class EaseSettings(BaselineSettings):
    """EASE hyperparameters."""

    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    """L2 grid searched on validation; must be > 0 (keeps XᵀX + λI positive definite)."""


def gram_matrix(x) -> np.ndarray:
    """Dense float64 XᵀX of a (users x items) matrix (scipy sparse or numpy)."""
    import scipy.sparse as sp

    if sp.issparse(x):
        x = x.astype(np.float64)
        return np.asarray((x.T @ x).todense())
    x = np.asarray(x, dtype=np.float64)
    return x.T @ x


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """B for one λ from a precomputed Gram matrix (float64, J x J, zero diagonal)."""
    from scipy.linalg import lapack

    if lam <= 0:
        raise ValueError(f"EASE needs λ > 0, got {lam}")
    g = np.array(gram, dtype=np.float64, order="F", copy=True)
    g[np.diag_indices_from(g)] += lam
    # Symmetric positive definite inverse: potrf (Cholesky) + potri, about half
    # the work of a general LU inverse. potri fills the upper triangle only.
    c, info = lapack.dpotrf(g, lower=0, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"XᵀX + λI is not positive definite (dpotrf info={info}, λ={lam})")
    p, info = lapack.dpotri(c, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"inverse failed (dpotri info={info}, λ={lam})")
    _fill_lower_from_upper(p)
    p /= -np.diag(p).copy()[None, :]  # in place: B_ij = -P_ij / P_jj
    np.fill_diagonal(p, 0.0)
    return p


def _fill_lower_from_upper(p: np.ndarray, block: int = 1024) -> None:
    """Make ``p`` symmetric in place from its upper triangle, a block of rows at a time.

    Avoids the J x J temporaries of ``triu(p) + triu(p, 1).T``; only the strict
    lower triangle is written, so the upper triangle being read never changes.
    """
    n = p.shape[0]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        rows = np.arange(i0, i1)[:, None]
        lower = np.arange(i1)[None, :] < rows  # strict lower part of rows i0..i1-1
        target = p[i0:i1, :i1]
        target[lower] = p[:i1, i0:i1].T[lower]


@dataclass
class EaseSelection:
    """The λ chosen on validation, with what was computed on the way (for `run` and the diagnostics that build on
    EASE's weights: benchmarks/content_signal.py, benchmarks/rank_ceiling.py)."""

    train: Any
    """The training matrix the weights were fitted on (scipy CSR, float64)."""
    lam: float
    weights: np.ndarray
    """B at ``lam`` (J x J float64)."""
    valid: dict[str, Any]
    """Validation metrics at ``lam``."""
    history: dict[str, list]
    """Every λ of the grid with its validation ``select_metric``."""

    def scores(self, users) -> np.ndarray:
        return np.asarray(self.train[users] @ self.weights)


def select(split: EvalSplit, settings: EaseSettings) -> EaseSelection:
    """Grid-search λ on valid (ties keep the earlier, grid-order λ); test is not read."""
    if not settings.lambdas:
        raise ValueError("EASE needs at least one λ")
    x = split.train_matrix().astype(np.float64).tocsr()
    gram = gram_matrix(x)
    history: dict[str, list] = {"lambda": [], f"valid_{settings.select_metric}": []}
    best = None  # (value, EaseSelection)
    for lam in settings.lambdas:
        candidate = EaseSelection(x, float(lam), ease_weights(gram, float(lam)), {}, history)
        candidate.valid = evaluate(candidate.scores, split, "valid", settings)
        value = selection_value(candidate.valid, settings)
        history["lambda"].append(float(lam))
        history[f"valid_{settings.select_metric}"].append(candidate.valid[settings.select_metric])
        if best is None or value > best[0]:
            best = (value, candidate)
        del candidate
    return best[1]


def run(split: EvalSplit, settings: EaseSettings) -> dict[str, Any]:
    """Grid-search λ on valid, then evaluate the chosen λ once on test."""
    started = time.perf_counter()
    chosen = select(split, settings)
    test = evaluate(chosen.scores, split, "test", settings) if settings.score_test else None
    return make_result("ease", chosen.valid, test, {"lambda": chosen.lam}, settings, started, chosen.history)
