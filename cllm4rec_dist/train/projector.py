"""TensorBoard's embedding projector: the learned item and user tables next to the scalars.

At each validation and once at the end (the best-validation weights, tags prefixed ``best/``),
rank 0 writes every table the model names in ``embedding_tables()`` (CLLM4Rec: ``collab_item``,
``content_item``, ``item_head``, ``collab_user``, ``content_user``) in the layout of
``SummaryWriter.add_embedding``. Under ``RUN/tensorboard`` that is ``projector_config.pbtxt`` and,
per table and step, ``<step>/<tag>/tensors.tsv`` with ``metadata.tsv`` (items: contiguous index,
original id, title when the dataset has titles; users: index, original id).
`tensorboard --logdir RUN/tensorboard` shows them in its PROJECTOR tab.

The files are written here rather than by ``add_embedding``, whose TSV writer formats one number at a time
and reopens the file for every row, on rank 0 while every other rank waits at the next collective. Every
file is written atomically (atomic.py).

Size is bounded for large catalogues: ``projector_sample`` rows of each entity (the same seeded
sample at every step, so points can be followed across steps; the whole table when smaller).
After a resume the config lists what the resumed run wrote (earlier step folders stay on disk).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cllm4rec_dist.atomic import atomic_write, url_to_fs

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


def _tsv(rows) -> bytes:
    return "".join("\t".join(row) + "\n" for row in rows).encode("utf-8")


def _tensors_tsv(vectors: torch.Tensor) -> bytes:
    """One row per vector, tab-separated, each float32 with the 9 significant digits that give it back exactly
    (add_embedding writes the double's 17), formatted a row at a time."""
    line = "\t".join(["%.9g"] * vectors.shape[1]) + "\n"
    return "".join(line % tuple(row) for row in vectors.tolist()).encode("utf-8")


def _tag_folder(tag: str) -> str:
    """A tag as one folder name, escaped as add_embedding escapes it."""
    return tag.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")


class EmbeddingProjector:
    def __init__(self, writer, item_ids: list[str], user_ids: list[str], item_titles: list[str] | None,
                 sample_size: int, seed: int):
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

        self.logdir = writer.get_logdir()
        self.fs, _ = url_to_fs(self.logdir)
        self.config = ProjectorConfig()  # what this process wrote (after a resume: the resumed run's entries)
        self.items = sample_rows(len(item_ids), sample_size, seed)
        self.users = sample_rows(len(user_ids), sample_size, seed + 1)
        header = ITEM_HEADER if item_titles else ITEM_HEADER[:2]
        item_rows = [[str(j), _cell(item_ids[j]), *([_cell(item_titles[j])] if item_titles else [])]
                     for j in self.items]
        self.metadata = {"item": _tsv([list(header), *item_rows]),
                         "user": _tsv([list(USER_HEADER), *([str(i), _cell(user_ids[i])] for i in self.users)])}

    def write(self, model, global_step: int, prefix: str = "") -> None:
        """One projector entry per named table of ``model`` at ``global_step``."""
        from google.protobuf import text_format

        for name, (entity, weight) in model.embedding_tables().items():
            rows = self.items if entity == "item" else self.users
            vectors = weight.detach()[torch.as_tensor(rows, device=weight.device)].float().cpu()
            tag = f"{prefix}{name}"
            subdir = f"{global_step:05d}/{_tag_folder(tag)}"
            folder = os.path.join(self.logdir, subdir)
            self.fs.makedirs(folder, exist_ok=True)
            atomic_write(self.fs, os.path.join(folder, "metadata.tsv"), self.metadata[entity])
            atomic_write(self.fs, os.path.join(folder, "tensors.tsv"), _tensors_tsv(vectors))
            entry = self.config.embeddings.add()
            entry.tensor_name = f"{tag}:{global_step:05d}"
            entry.tensor_path = f"{subdir}/tensors.tsv"
            entry.metadata_path = f"{subdir}/metadata.tsv"
        atomic_write(self.fs, os.path.join(self.logdir, "projector_config.pbtxt"),
                     text_format.MessageToString(self.config).encode("utf-8"))
