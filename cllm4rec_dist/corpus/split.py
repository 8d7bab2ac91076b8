"""The evaluation view of a preprocessed dataset: per-user train/valid/test item lists.

Read back from the shards (corpus/shards.py), like the sequential view of corpus/sequences.py; eval/ and the
baselines score on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EvalSplit:
    """Per-user item index arrays (0..num_items-1); index u is user u.

    Built by ``cllm4rec_dist.corpus.shards.load_eval_split(data_dir)`` from the
    ``eval`` corpus of a preprocessed dataset, so every model (CLLM4Rec and the
    baselines) is scored on exactly the same split.
    """

    num_users: int
    num_items: int
    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Items the protocol held out of training entirely (``--cold-item-fraction``; the manifest's ``cold_items``):
    the evaluation reports their slices (``eval.metrics.COLD_SLICES``). Empty for every other protocol."""

    def cold_mask(self) -> np.ndarray:
        """Boolean mask over the catalogue: True for the ``cold_items``."""
        mask = np.zeros(self.num_items, dtype=bool)
        mask[np.asarray(self.cold_items, dtype=np.int64)] = True
        return mask

    def train_matrix(self):
        """Binary user x item train matrix (scipy CSR, float32)."""
        import scipy.sparse as sp

        rows = np.concatenate([np.full(len(x), u) for u, x in enumerate(self.train)]) if self.num_users else np.zeros(0)
        cols = np.concatenate(self.train) if self.num_users else np.zeros(0)
        data = np.ones(len(cols), dtype=np.float32)
        return sp.csr_matrix((data, (rows, cols)), shape=(self.num_users, self.num_items), dtype=np.float32)
