"""TensorBoard's embedding projector: the learned item and user tables next to the scalars.

At each validation and once at the end (the best-validation weights, tags prefixed ``best/``),
rank 0 writes every table the model names in ``embedding_tables()`` (CLLM4Rec: ``collab_item``,
``content_item``, ``item_head``, ``collab_user``, ``content_user``) through
``SummaryWriter.add_embedding``. Under ``RUN/tensorboard`` that is ``projector_config.pbtxt`` and,
per table and step, ``<step>/<tag>/tensors.tsv`` with ``metadata.tsv`` (items: contiguous index,
original id, title when the dataset has titles; users: index, original id).
`tensorboard --logdir RUN/tensorboard` shows them in its PROJECTOR tab.

Size is bounded for large catalogues: ``projector_sample`` rows of each entity (the same seeded
sample at every step, so points can be followed across steps; the whole table when smaller).
After a resume the config lists what the resumed run wrote (earlier step folders stay on disk).
"""

from __future__ import annotations

import numpy as np
import torch

ITEM_HEADER = ("item", "item_id", "title")
USER_HEADER = ("user", "user_id")


def sample_rows(num_rows: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted row indices: all rows when ``sample_size >= num_rows``, else a seeded uniform sample."""
    if sample_size >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=sample_size, replace=False))


def _cell(value: str) -> str:
    """A metadata cell: tabs and newlines would break the TSV; an empty cell would shift TensorBoard's columns."""
    return " ".join(str(value).split()) or "-"


class EmbeddingProjector:
    def __init__(self, writer, item_ids: list[str], user_ids: list[str], item_titles: list[str] | None,
                 sample_size: int, seed: int):
        self.writer = writer
        self.items = sample_rows(len(item_ids), sample_size, seed)
        self.users = sample_rows(len(user_ids), sample_size, seed + 1)
        header = ITEM_HEADER if item_titles else ITEM_HEADER[:2]
        self.metadata = {
            "item": (list(header), [[str(j), _cell(item_ids[j]), *([_cell(item_titles[j])] if item_titles else [])]
                                    for j in self.items]),
            "user": (list(USER_HEADER), [[str(i), _cell(user_ids[i])] for i in self.users]),
        }

    def write(self, model, global_step: int, prefix: str = "") -> None:
        """One projector entry per named table of ``model`` at ``global_step``."""
        for name, (entity, weight) in model.embedding_tables().items():
            rows = self.items if entity == "item" else self.users
            header, metadata = self.metadata[entity]
            vectors = weight.detach()[torch.as_tensor(rows, device=weight.device)].float().cpu()
            self.writer.add_embedding(vectors, metadata=metadata, metadata_header=header, global_step=global_step,
                                      tag=f"{prefix}{name}")
        self.writer.flush()
