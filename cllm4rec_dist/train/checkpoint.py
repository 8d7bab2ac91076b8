"""Checkpoints: the one home for their layout, for writing them and for reading them safely (any model).

A checkpoint folder holds

* ``trainer.pt`` (rank 0): ``{SNAPSHOT: plain data, TRAINABLE: {name: tensor}, BEST: {name: tensor} | None}``;
  the snapshot is the coordinator state, the config and the RNG states (as tensors and lists);
* each engine's optimizer state: ``optim-<group>.pt`` (torch engine) or ``optim-<group>-rank<r>.pt`` (a DeepSpeed
  engine: every rank writes its own ZeRO partition);
* ``sharded/`` (models with row-sharded tables or heads, model/sharding.py): the row-sharded tensors -- tables,
  their best-validation copies, the Adam state of their rows -- written by ``torch.distributed.checkpoint`` (DCP)
  through its safetensors storage (``HuggingFaceStorageWriter``): every rank writes one safetensors file of ITS
  rows, and each file's JSON header records the rows' offsets. Reading builds DCP's metadata from those headers
  (never a pickle) and reads any row range from any file, so a checkpoint written by N ranks loads on M ranks
  (``read_sharded``), and the export reads one saved part at a time (``sharded_parts``). Such a checkpoint is
  ``reshardable`` unless an engine wrote per-rank state of its own (DeepSpeed's ZeRO partitions);
* ``reader-rank<r>.pt`` (every rank, CLLM4Rec's trainer): ``{READER: {kind: [stream state]}}``, where each of the
  rank's data streams was (epoch, emission index, buffer digest, shards read) and what fixes its order; a resume
  seeks the streams there and checks that the state is reproduced (``recommenders/cllm4rec/batches.py``
  ``restore_reader``);
* ``files-rank<r>.json``, written LAST by each rank: the step, the world size, and the size and sha256 of every
  file that rank wrote. A checkpoint is complete when every rank's record is there, every field of it has its type
  and range, every recorded path lies inside the folder (relative, no ``..``, no symlink leaving it) and every
  file matches its record.

A STANDALONE MODEL (``write_model`` / ``read_model``: e.g. A-LLMRec's stage-0 CF model, saved by
``cllm4rec baselines --model sasrec --model-out DIR``) is a folder of the same kind: ``<name>.safetensors``
(its tensors), ``<name>.json`` (what it is: ``{MODEL_CONFIG: the builder's config, ...}``) and the files
record, written last; it is read only when complete.

No backbone weights: the frozen backbone is recorded by path and tokenizer hash in the config/manifest and
reloaded from its own checkpoint.

Reading never runs code: every file is loaded with ``torch.load(weights_only=True)`` (tensors and plain
containers/numbers/strings only), and what was read is checked against what the caller needs
(``require_keys``, ``check_tensors``, ``check_optimizer_state``), with errors that name the file and the
missing, extra or misshapen entries. Safetensors files are read only after their header is checked
(``safetensors_header``: size, JSON, dtypes, shapes, offsets inside the file) and, in a sharded part, only when
every file is recorded and DCP's ``DCP_SHARDING_INFO`` offsets tile each tensor (``check_sharded_part``): a bad
header is a one-line CheckpointError naming the file and the field, never a traceback or an allocation the header
asks for. Nothing here knows a particular model: a model's recipe says which tensors it expects (``{name: shape}``).

Sinks: ``LocalSink`` writes ``<run>/checkpoints/step-<N>`` under a temporary name, renames it when every rank
is done, then writes the ``latest`` pointer (atomically) and only then prunes older checkpoints. Resume takes
the newest COMPLETE checkpoint: a dangling or stale pointer, or a truncated newest checkpoint, is skipped with a
warning naming it. ``RaySink`` hands per-worker folders to Ray Train, which persists them under the run's
storage path (data files first, records last; a failed upload removes its partial copy); a restarted worker
verifies the checkpoint Ray hands back, falls back to older ones the same way and removes the ``checkpoint_*``
folders an upload cut short left behind. A disk that fills up while a checkpoint is written is a ``DiskFullError``
(one line, exit status 2) on every rank: the unfinished folder is removed and the previous checkpoints stay intact,
so the same command resumes once there is room.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import posixpath
import random
import re
import shutil
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cllm4rec_dist.atomic import atomic_write, remove_quietly, write_text_atomic
from cllm4rec_dist.corpus.shards import canonical_json
from cllm4rec_dist.errors import DiskFullError, UserError, find_cause, format_bytes, is_disk_full, one_line
from cllm4rec_dist.train.rank import Rank

TRAINER_FILE = "trainer.pt"
LATEST = "latest"
STEP_PREFIX = "step-"
# Keys of trainer.pt
SNAPSHOT = "snapshot"
TRAINABLE = "trainable"
BEST = "best"
SNAPSHOT_KEYS = ("state", "config", "rng")
SHARDED_DIR = "sharded"
# Each rank's data streams (plain data): {READER: {kind: [state per stream]}}; absent for a trainer without
# streams (A-LLMRec's data is indexed by (seed, epoch, step) directly).
READER_FILE = "reader-rank{rank}.pt"
READER = "reader"
# A standalone model folder: <name> + these suffixes; the key of its JSON that rebuilds the model
WEIGHTS_SUFFIX = ".safetensors"
INFO_SUFFIX = ".json"
MODEL_CONFIG = "config"
_RECORD = "files-rank{rank}.json"
_RECORD_RE = re.compile(r"files-rank(\d+)\.json$")
# What a fix for a broken checkpoint says (resume, export and evaluate all read through here)
BROKEN_FIX = ("Resume from an earlier checkpoint (remove this one) or start over (--resume false, or another --out); "
              "to export or evaluate, pass another checkpoint.")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, unsafe or not fitting the model; names the file."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _flag_device():
    """Where a small all-reduced flag lives: the current GPU under NCCL (which reduces no CPU tensors), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def _all_ranks_agree(ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (so all ranks pick the same checkpoint)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _warn(message: str) -> None:
    print(f"[checkpoint] warning: {message}", flush=True)


def _local_fs():
    return fsspec.filesystem("file")


def sha256_file(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointClock:
    """When a block-end (epoch-end) checkpoint is due under ``checkpoint_interval_s``.

    Every rank asks at the same points and gets rank 0's answer (one tiny all-reduce per block), so that all
    ranks save together (a checkpoint is collective: each rank writes its optimizer partition)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last = time.monotonic()

    def saved(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        due = self.interval_s == 0 or time.monotonic() - self.last >= self.interval_s
        if not (dist.is_available() and dist.is_initialized()):
            return due
        flag = torch.tensor([int(due) if dist.get_rank() == 0 else 0], dtype=torch.int32, device=_flag_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# --------------------------------------------------------------------------- writing


class CheckpointWriter:
    """One rank's writes into a checkpoint folder (local, or any fsspec filesystem ``fs``): each file
    atomically, the rank's record last. A full disk is a ``DiskFullError`` naming the file (its temporary file
    removed); the sinks remove the whole unfinished folder."""

    def __init__(self, directory: str, rank: int, world_size: int, fs=None):
        self.directory, self.rank, self.world_size = directory, rank, world_size
        self.fs = fs or _local_fs()
        self.files: dict[str, dict] = {}
        self.sharded: dict[str, tuple[torch.Tensor, object]] = {}
        self.per_rank_state = False
        self.fs.makedirs(directory, exist_ok=True)

    def save(self, name: str, state: dict, per_rank: bool = False) -> None:
        """``state``: tensors and plain data only (dicts, lists, tuples, numbers, strings, None); streamed to a
        temporary name, then renamed (optimizer states can be large: no in-memory copy). ``per_rank``: the state
        is this rank's own partition of something (a ZeRO partition): the checkpoint then only loads on the same
        number of ranks."""
        path = posixpath.join(self.directory, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with self.fs.open(tmp, "wb") as f:
                torch.save(state, f)
            self.fs.mv(tmp, path)
        except BaseException as err:
            remove_quietly(self.fs, tmp)
            if is_disk_full(err) and not isinstance(err, DiskFullError):
                raise DiskFullError(f"{path}: no space left on device", path) from err
            raise
        self._record(name)
        self.per_rank_state |= per_rank

    def save_bytes(self, name: str, data: bytes) -> None:
        """An already serialised file (safetensors, JSON), written atomically and recorded."""
        atomic_write(self.fs, posixpath.join(self.directory, name), data)
        self.files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _record(self, name: str) -> None:
        path = posixpath.join(self.directory, name)
        self.files[name] = {"bytes": self.fs.size(path), "sha256": sha256_file(self.fs, path)}

    def add_sharded(self, key: str, local: torch.Tensor, layout) -> None:
        """A tensor of the sharded part: this rank's rows ``local`` of a row-sharded tensor (``layout``: a
        model.sharding.RowLayout), or, with ``layout=None``, a small tensor every rank holds the same."""
        self.sharded[key] = (local.detach(), layout)

    def finish(self, step: int) -> None:
        """Write the sharded part (a collective: every rank calls it; DCP writes to a local folder), then this
        rank's record."""
        if self.sharded:
            directory = os.path.join(self.directory, SHARDED_DIR)
            try:
                names = write_sharded(directory, self.sharded, self.rank)
            except BaseException as err:  # DCP's CheckpointException is a BaseException
                if is_disk_full(err):
                    raise DiskFullError(f"{directory}: no space left on device", directory) from None
                raise
            for name in names:
                self._record(posixpath.join(SHARDED_DIR, name))
        record = {"step": step, "rank": self.rank, "world_size": self.world_size, "files": self.files,
                  "reshardable": bool(self.sharded) and not self.per_rank_state}
        path = posixpath.join(self.directory, _RECORD.format(rank=self.rank))
        atomic_write(self.fs, path, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))


# --------------------------------------------------------------------------- row-sharded tensors (DCP)

_MESHES: dict[int, object] = {}


def _as_dtensor(local: torch.Tensor, layout):
    """This rank's rows as a DTensor sharded on rows (what DCP records with offsets); plain on one process."""
    if layout is None or not layout.distributed:
        return local
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if layout.world_size not in _MESHES:
        _MESHES[layout.world_size] = init_device_mesh(local.device.type, (layout.world_size,))
    shape = torch.Size([layout.num_rows, *local.shape[1:]])
    return DTensor.from_local(local, _MESHES[layout.world_size], [Shard(0)], run_check=False, shape=shape,
                              stride=tuple(torch.empty(shape, device="meta").stride()))


def write_sharded(directory: str, tensors: dict[str, tuple[torch.Tensor, object]], rank: int) -> list[str]:
    """Save ``{key: (local rows, layout)}`` with DCP's safetensors writer (each rank one file of its rows; a
    collective). Returns the names of the files this rank wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    state = {key: _as_dtensor(local, layout) for key, (local, layout) in tensors.items()}
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(directory, save_distributed=True))
    mine = f"shard-{rank + 1:05d}-"
    return sorted(name for name in os.listdir(directory) if name.startswith(mine) and name.endswith(".safetensors"))


def _sharded_metadata(directory: str):
    """DCP's metadata of a sharded part, built from its safetensors headers once every file there is recorded and
    its header checked (``check_sharded_part``)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: missing; this checkpoint has no sharded part but the model has "
                              "row-sharded tables (model.table_sharding / model.item_head_sharding). Resume with the "
                              "sharding it was written with.")
    check_sharded_part(directory)
    try:
        return HuggingFaceStorageReader(directory).read_metadata()
    except (SafetensorError, OSError) as err:  # a file changed after the checks
        raise CheckpointError(f"{directory}: cannot be read ({type(err).__name__}: {one_line(err)[:200]}). "
                              f"{BROKEN_FIX}") from None


def _read_failure(err: BaseException) -> BaseException | None:
    """The safetensors or OS error behind a failed read (DCP wraps each rank's in a CheckpointException)."""
    return find_cause(err, lambda e: isinstance(e, (SafetensorError, OSError)))


# --------------------------------------------------------------------------- safetensors headers

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
METADATA = "__metadata__"
DCP_SHARDING_INFO = "DCP_SHARDING_INFO"  # DCP's key in a safetensors __metadata__: {tensor: {SAVED_OFFSETS: [...]}}
SAVED_OFFSETS = "saved_offsets"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def safetensors_header(path: str, fs=None, data: bytes | None = None, fix: str = BROKEN_FIX) -> dict:
    """The JSON header of a safetensors file, checked before any loader sees the file: the header size within the
    file (and safetensors' 100 MB limit), valid JSON, ``__metadata__`` an object of strings, and for each tensor a
    known dtype, a shape of non-negative integers and data offsets inside the file holding exactly that shape.
    Reads the first 8 bytes and the header only (``data``: the file's bytes, already read). A problem is a
    CheckpointError naming the file and the field, ending with ``fix``. Returns ``{name: entry}`` with
    ``METADATA``: ``{str: str}`` ({} when the file has none)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is corrupt or was not written by this project. {fix}")

    fs = fs or _local_fs()
    try:
        with (io.BytesIO(data) if data is not None else fs.open(path, "rb")) as f:
            total = len(data) if data is not None else fs.size(path)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{total} bytes, too short for a safetensors header")
            size = struct.unpack("<Q", prefix)[0]
            if size > min(total - 8, _MAX_HEADER):
                raise bad(f"the header size field says {size} bytes, the file has {total - 8} after it"
                          f"{' (and safetensors allows 100 MB)' if size > _MAX_HEADER else ''}")
            raw = f.read(size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete. {fix}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"the header is not valid JSON ({one_line(err)[:120]})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.setdefault(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"the header's {METADATA} is {_short(metadata)}, not an object of strings")
    data_bytes = total - 8 - size
    for name, entry in header.items():
        if name == METADATA:
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is {_short(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise bad(f"tensor {name!r}: dtype {_short(dtype)} is not one of {', '.join(_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {_short(shape)} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"tensor {name!r}: data_offsets {_short(offsets)} are not [begin, end] within the file's "
                      f"{data_bytes} data bytes")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r}: shape {_short(shape)} of {dtype} takes {nbytes} bytes, its data_offsets "
                      f"{offsets} hold {offsets[1] - offsets[0]}")
    return header


def _saved_offsets(path: str, header: dict) -> dict[str, list[int]]:
    """{tensor: offsets of its saved piece} from the header's DCP_SHARDING_INFO (zeros without one, as DCP reads
    it), each checked: one non-negative integer per dimension."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {METADATA} {DCP_SHARDING_INFO} {what}; the file is corrupt or was not "
                               f"written by this project. {BROKEN_FIX}")

    tensors = {name: entry for name, entry in header.items() if name != METADATA}
    raw = header[METADATA].get(DCP_SHARDING_INFO)
    if raw is None:
        return {name: [0] * len(entry["shape"]) for name, entry in tensors.items()}
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad(f"is not valid JSON ({one_line(err)[:120]})") from None
    if not isinstance(info, dict):
        raise bad(f"is a JSON {type(info).__name__}, not an object")
    offsets = {}
    for name, entry in tensors.items():
        if name not in info:
            raise bad(f"has no entry for tensor {name!r}")
        value = info[name].get(SAVED_OFFSETS) if isinstance(info[name], dict) else None
        ndim = len(entry["shape"])
        if not (isinstance(value, list) and len(value) == ndim and all(_is_int(o) and o >= 0 for o in value)):
            raise bad(f"{name!r} {SAVED_OFFSETS} is {_short(value)}, expected {ndim} non-negative integers (where "
                      "the saved piece starts in each dimension)")
        offsets[name] = value
    return offsets


def _check_tiling(key: str, pieces: list[tuple[str, str, list[int], list[int]]]) -> None:
    """The saved pieces (file, dtype, offsets, shape) of one tensor cover it exactly: same dtype and rank, no
    overlap, no gap (what DCP does not check: a gap would leave rows uninitialised)."""
    files = ", ".join(sorted({file for file, *_ in pieces}))
    if len({dtype for _, dtype, _, _ in pieces}) > 1 or len({len(shape) for *_, shape in pieces}) > 1:
        raise CheckpointError(f"{files}: tensor {key!r} is saved with different dtypes or numbers of dimensions "
                              f"in different files. {BROKEN_FIX}")
    ndim = len(pieces[0][3])
    size = [max(offsets[i] + shape[i] for _, _, offsets, shape in pieces) for i in range(ndim)]
    covered = sum(math.prod(shape) for *_, shape in pieces)
    overlap = any(math.prod(a[3]) and math.prod(b[3]) and all(
        a[2][i] < b[2][i] + b[3][i] and b[2][i] < a[2][i] + a[3][i] for i in range(ndim))
        for k, a in enumerate(pieces) for b in pieces[k + 1:])
    if overlap or covered != math.prod(size):
        where = "; ".join(f"{_short(offsets)} + {_short(shape)}" for _, _, offsets, shape in pieces[:8])
        raise CheckpointError(f"{files}: {METADATA} {DCP_SHARDING_INFO} {SAVED_OFFSETS} of {key!r} ({where}) do not "
                              f"tile its {_short(size)} shape: the saved pieces "
                              f"{'overlap' if overlap else f'cover {covered} of its {math.prod(size)} elements'}; "
                              f"the file is corrupt or was not written by this project. {BROKEN_FIX}")


def check_sharded_part(directory: str) -> None:
    """Every safetensors file of a checkpoint's sharded part (DCP reads them all) is named in one of the
    checkpoint's records, has a sound header (``safetensors_header``) and DCP_SHARDING_INFO, and the saved pieces
    of each tensor tile it. A problem is a CheckpointError naming the file and the field."""
    checkpoint = os.path.dirname(os.path.normpath(directory))
    fs = _local_fs()
    recorded = set()
    for name in os.listdir(checkpoint):
        found = _RECORD_RE.fullmatch(name)
        record = _read_record(fs, checkpoint, int(found.group(1)))[0] if found else None
        recorded |= set(record["files"]) if record else set()
    pieces: dict[str, list] = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(WEIGHTS_SUFFIX):
            continue
        path = os.path.join(directory, name)
        if posixpath.join(SHARDED_DIR, name) not in recorded:
            raise CheckpointError(f"{path}: not named in any {_RECORD.format(rank='<r>')} record of {checkpoint}, "
                                  f"yet the sharded part would be read with it. Remove it if it does not belong "
                                  f"there; otherwise: {BROKEN_FIX}")
        header = safetensors_header(path, fs)
        offsets = _saved_offsets(path, header)
        for key, entry in header.items():
            if key != METADATA:
                pieces.setdefault(key, []).append((path, entry["dtype"], offsets[key], entry["shape"]))
    for key, saved in pieces.items():
        _check_tiling(key, saved)


def read_sharded(directory: str, targets: dict[str, tuple[torch.Tensor, object]], required=()) -> dict:
    """Read the sharded part into ``{key: (local buffer, layout)}`` (rows of ANY layout: DCP reads the saved
    pieces overlapping each rank's rows); keys the checkpoint lacks are skipped unless ``required``.
    Returns ``{key: local buffer}`` of what was read. A collective when the layouts are distributed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    saved = _sharded_metadata(directory).state_dict_metadata
    require_keys(directory, saved, required)
    wrong = [f"{key} {tuple(saved[key].size)} "
             f"(model: {(layout.num_rows, *local.shape[1:]) if layout else tuple(local.shape)})"
             for key, (local, layout) in targets.items() if key in saved and tuple(saved[key].size) !=
             ((layout.num_rows, *local.shape[1:]) if layout else tuple(local.shape))]
    if wrong:
        raise CheckpointError(f"{directory}: does not fit this model: wrong shape {'; '.join(wrong)}. Was it trained "
                              "with another dataset, backbone or model settings?")
    present = {key: value for key, value in targets.items() if key in saved}
    state = {key: _as_dtensor(local, layout) for key, (local, layout) in present.items()}
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(directory))
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        failure = _read_failure(err)
        if failure is None:
            raise
        raise CheckpointError(f"{directory}: cannot be read ({type(failure).__name__}: {one_line(failure)[:200]}). "
                              f"{BROKEN_FIX}") from None
    return {key: local for key, (local, _) in present.items()}


def sharded_keys(directory: str) -> set[str]:
    """The keys of a checkpoint's sharded part (from the safetensors headers)."""
    return set(_sharded_metadata(directory).state_dict_metadata)


def sharded_parts(directory: str, key: str):
    """Yield (first row, rows) of a sharded tensor one SAVED part at a time (one rank's rows as written), reading
    only that part: a process never holds the whole table."""
    from safetensors import safe_open

    meta = _sharded_metadata(directory)
    require_keys(directory, meta.state_dict_metadata, (key,))
    parts = sorted(((index.offset[0], info.relative_path) for index, info in meta.storage_data.items()
                    if index.fqn == key))
    for first_row, path in parts:
        path = os.path.join(directory, os.path.basename(path))
        try:
            with safe_open(path, framework="pt") as f:
                rows = f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {one_line(err)[:200]}). "
                                  f"{BROKEN_FIX}") from None
        yield first_row, rows


# --------------------------------------------------------------------------- safe reading


def load_state(path: str, required: tuple[str, ...] = (), fs=None) -> dict:
    """A dict of tensors and plain data from ``path`` (local or any fsspec filesystem ``fs``); never runs code."""
    fs = fs or _local_fs()
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete. "
                              "Pass a complete checkpoint folder.") from None
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = f"it calls or builds {found.group(1)}" if found else "not plain data"
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain data ({reason}); "
                              "loading it could run code. Use a checkpoint written by this project.") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as err:
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {reason}); it is truncated or not a "
                              "checkpoint file. Use another (complete) checkpoint.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of named entries; "
                              "not a checkpoint of this project.")
    require_keys(path, state, required)
    return state


def require_keys(source: str, mapping: dict, required) -> None:
    missing = [k for k in required if k not in mapping]
    if missing:
        raise CheckpointError(f"{source}: missing {', '.join(map(repr, missing))} (it has "
                              f"{', '.join(map(repr, list(mapping)[:12])) or 'nothing'}); "
                              "not a checkpoint of this kind.")


def check_tensors(source: str, tensors, expected: dict[str, tuple]) -> None:
    """``tensors`` must hold exactly the names of ``expected`` ({name: shape}), each a tensor of that shape."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{source}: expected a dict of named tensors, got {type(tensors).__name__}.")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{n} {tuple(tensors[n].shape) if isinstance(tensors[n], torch.Tensor) else type(tensors[n]).__name__}"
             f" (model: {tuple(expected[n])})" for n in sorted(set(expected) & set(tensors))
             if not isinstance(tensors[n], torch.Tensor) or tuple(tensors[n].shape) != tuple(expected[n])]
    if missing or extra or wrong:
        parts = [f"missing {', '.join(missing)}" if missing else "", f"extra {', '.join(extra)}" if extra else "",
                 f"wrong shape {'; '.join(wrong)}" if wrong else ""]
        raise CheckpointError(f"{source}: does not fit this model: {'; '.join(p for p in parts if p)}. Was it trained "
                              "with another dataset, backbone, ablation or model settings?")


def check_optimizer_state(source: str, state: dict, param_groups: list[list[torch.Tensor]]) -> None:
    """A torch optimizer state_dict that fits ``param_groups`` (same group sizes, per-parameter tensor shapes)."""
    require_keys(source, state, ("state", "param_groups"))
    groups = state["param_groups"]
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g) for g in param_groups]:
        raise CheckpointError(f"{source}: optimizer state for parameter groups of sizes {sizes}, this model has "
                              f"{[len(g) for g in param_groups]}; it belongs to another model or world size, or to "
                              "another optim.user_lr_scale or item_head_lr_scale (at 1 the user tables or the item "
                              "head share their group's Adam param group, at any other value they have their own): "
                              "resume with the run's own values.")
    params = {}
    for saved, live in zip(groups, param_groups):
        params.update(zip(saved["params"], live))
    for index, per_param in state["state"].items():
        if index not in params or not isinstance(per_param, dict):
            raise CheckpointError(f"{source}: optimizer state for unknown parameter {index!r}.")
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise CheckpointError(f"{source}: optimizer state {key} of parameter {index} has shape "
                                      f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}.")


def load_trainable(model, state: dict[str, torch.Tensor], source: str = "saved weights") -> None:
    """Copy saved trainable tensors into ``model`` (its parameters with requires_grad); a missing, extra or
    misshapen tensor is an error naming ``source``."""
    check_tensors(source, state, trainable_shapes(model))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# --------------------------------------------------------------------------- a standalone model


def write_model(out: str, name: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """``out/<name>.safetensors`` + ``out/<name>.json`` (``info``, which must hold ``MODEL_CONFIG``), each
    atomically, then the files record: a checkpoint folder ``read_model`` accepts only when complete."""
    require_keys(f"{name}{INFO_SUFFIX}", info, (MODEL_CONFIG,))
    fs, root = _fs(out)
    writer = CheckpointWriter(root, 0, 1, fs)
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    writer.save_bytes(name + WEIGHTS_SUFFIX, save_safetensors(tensors))
    writer.save_bytes(name + INFO_SUFFIX, canonical_json(info))
    writer.finish(step=0)


def read_model(source: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a complete folder written by ``write_model``; safetensors and JSON only, so reading
    runs no code. The caller builds the model from ``info[MODEL_CONFIG]`` and checks the tensors against it
    (``check_tensors``)."""
    fs, root = _fs(source)
    weights, info_path = posixpath.join(root, name + WEIGHTS_SUFFIX), posixpath.join(root, name + INFO_SUFFIX)
    if not fs.exists(weights) and not fs.exists(info_path):
        raise CheckpointError(f"{source}: no {name}{WEIGHTS_SUFFIX} + {name}{INFO_SUFFIX}; pass the folder the "
                              "model was saved to.")
    reason = incomplete_reason(root, fs=fs)
    if reason is not None:
        raise CheckpointError(f"{source}: not a complete {name} checkpoint ({reason}); save the model again.")
    try:
        info = json.loads(fs.cat_file(info_path))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{info_path}: not JSON ({err}); save the model again.") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_path}: holds a {type(info).__name__}, not a JSON object; save the model again.")
    require_keys(info_path, info, (MODEL_CONFIG,))
    data = fs.cat_file(weights)
    safetensors_header(weights, data=data, fix="Save the model again.")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{weights}: cannot be read as safetensors ({err}); save the model again.") from None
    return tensors, info


# --------------------------------------------------------------------------- RNG states as plain data


def capture_rng() -> dict:
    """torch, numpy and Python RNG states as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# --------------------------------------------------------------------------- completeness


_MAX_WORLD = 1 << 16
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _unsafe_path(name: str) -> str | None:
    """Why a recorded file name could name something outside its checkpoint folder, or None: it must be a plain
    relative path (``/``-separated parts, none empty, ``.`` or ``..``; no backslash, drive or NUL)."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name or re.match(r"[A-Za-z]:", name):
        return "is outside the checkpoint folder (an absolute or malformed path)"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "is outside the checkpoint folder or not a plain relative path (a '..', '.' or empty part)"
    return None


def _record_problem(record, rank: int) -> str | None:
    """What is wrong with a parsed files record of ``rank``, naming the field; None when every field has its type
    and range."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = [key for key in ("step", "world_size", "files") if key not in record]
    if missing:
        return f"field {missing[0]!r} is missing"
    step, world, files = record["step"], record["world_size"], record["files"]
    if not _is_int(step) or step < 0:
        return f"field 'step' is {_short(step)}, expected an integer >= 0"
    if not _is_int(world) or not 1 <= world <= _MAX_WORLD:
        return f"field 'world_size' is {_short(world)}, expected an integer from 1 to {_MAX_WORLD}"
    if "rank" in record and (not _is_int(record["rank"]) or record["rank"] != rank):
        return f"field 'rank' is {_short(record['rank'])}, expected {rank} (the rank in the file's name)"
    if rank >= world:
        return f"the record of rank {rank}, but field 'world_size' is {world}"
    if not isinstance(record.get("reshardable", False), bool):
        return f"field 'reshardable' is {_short(record['reshardable'])}, expected true or false"
    if not isinstance(files, dict):
        return f"field 'files' is {_short(files)}, expected an object {{path: {{\"bytes\": ..., \"sha256\": ...}}}}"
    for name, meta in files.items():
        unsafe = _unsafe_path(name)
        if unsafe:
            return f"field 'files': {name!r} {unsafe}"
        if not isinstance(meta, dict):
            return f"field files[{name!r}] is {_short(meta)}, expected {{\"bytes\": ..., \"sha256\": ...}}"
        if not _is_int(meta.get("bytes")) or meta["bytes"] < 0:
            return f"field files[{name!r}].bytes is {_short(meta.get('bytes'))}, expected an integer >= 0"
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            return f"field files[{name!r}].sha256 is {_short(meta.get('sha256'))}, expected 64 hex digits"
    return None


def _read_record(fs, directory: str, rank: int) -> tuple[dict | None, str | None]:
    """(rank's files record, None), every field checked for type and range, or (None, why not: naming the file
    and the field)."""
    name = _RECORD.format(rank=rank)
    path = posixpath.join(directory, name)
    try:
        record = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None, f"no readable {name} (interrupted while saving, or not a checkpoint folder)"
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, f"no readable {name} (not valid JSON: truncated or changed)"
    problem = _record_problem(record, rank)
    if problem:
        return None, f"{path}: {problem}; the record is corrupt or was not written by this project"
    return record, None


def checkpoint_step(directory: str, fs=None) -> int | None:
    """The global step a checkpoint was written at (from rank 0's record), None if it has no usable record."""
    record, _ = _read_record(fs or _local_fs(), directory, 0)
    return record["step"] if record else None


def _is_local(fs) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))


def _leaves_folder(fs, directory: str, name: str) -> str | None:
    """Why the recorded ``name`` (a safe relative path) resolves outside ``directory`` or to something other than a
    plain file on a local filesystem (a symlink leaving it, a FIFO), else None."""
    if not _is_local(fs):
        return None  # object stores have no links
    root = os.path.realpath(directory)
    real = os.path.realpath(os.path.join(directory, name))
    if os.path.commonpath([root, real]) != root:
        return f"resolves to {real}, outside the checkpoint folder (a symlink)"
    if os.path.exists(real) and not os.path.isfile(real):
        return "is not a regular file"
    return None


def incomplete_reason(directory: str, ranks=None, fs=None, world_size: int | None = None) -> str | None:
    """Why ``directory`` is not a complete checkpoint for ``ranks`` (default: every rank that wrote it), or None.

    Every record's fields are checked for type and range and every recorded file must lie inside ``directory``
    (no absolute path, no ``..``, no symlink leaving it); a record that fails is a reason naming the file and the
    field. ``world_size``: the world that will load it; a different saved world size is an error, not a skip.
    """
    fs = fs or _local_fs()
    head, reason = _read_record(fs, directory, 0)
    if head is None:
        return reason
    saved_world = head["world_size"]
    if world_size is not None and saved_world != world_size and head.get("reshardable"):
        ranks = None  # every saved rank's rows are read
    elif world_size is not None and saved_world != world_size:
        raise CheckpointError(f"{directory}: written by {saved_world} ranks, this run has {world_size}; resume with "
                              f"the same number of workers (dist.num_workers / simulate_ranks); only checkpoints whose "
                              "trainable state is all row-sharded (model.table_sharding and model.item_head_sharding "
                              "row, or a tied head) move between numbers of ranks.")
    for rank in (range(saved_world) if ranks is None else sorted({0, *ranks})):
        record_path = posixpath.join(directory, _RECORD.format(rank=rank))
        if rank == 0:
            record = head
        else:
            record, reason = _read_record(fs, directory, rank)
            if record is None:
                return reason
            if (record["step"], record["world_size"]) != (head["step"], saved_world):
                return (f"{record_path}: step {record['step']} of {record['world_size']} ranks, but "
                        f"{_RECORD.format(rank=0)} says step {head['step']} of {saved_world}: records of different "
                        "checkpoints")
        for name, meta in record["files"].items():
            leaves = _leaves_folder(fs, directory, name)
            if leaves:
                return f"{record_path}: files entry {name!r} {leaves}; refused"
            path = posixpath.join(directory, name)
            try:
                size = fs.size(path)
            except FileNotFoundError:
                return f"{name} is missing"
            if size != meta["bytes"] or sha256_file(fs, path) != meta["sha256"]:
                return f"{name} has {size} bytes or a checksum that differ from its record (truncated or changed)"
    return None


# --------------------------------------------------------------------------- one checkpoint in, one out


def trainable_shapes(model) -> dict[str, tuple]:
    """{name: shape} of a model's trainable parameters: what a checkpoint's TRAINABLE/BEST must hold."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


class Engine(Protocol):
    """What checkpoints need of an optimizer engine (train/engines.py): its state written and read per rank, and
    the row-sharded part of it located for the DCP reader."""

    def save(self, writer: CheckpointWriter) -> None: ...

    def load(self, directory: str, rank: int = 0) -> None: ...

    def sharded_targets(self) -> dict[str, tuple[torch.Tensor, object]]: ...

    def restore_sharded(self, loaded: dict[str, torch.Tensor]) -> None: ...


class CheckpointedModel(Protocol):
    """What checkpoints need of a model: its parameters and which of them are row-sharded across ranks."""

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def row_shards(self) -> dict[str, object]:
        """{parameter name: RowLayout} of the row-sharded parameters ({} when every tensor is whole on each rank)."""
        ...


class Coordinator(Protocol):
    """What the checkpoint sinks need of a recommender's trainer (both models' trainers implement it); the sinks
    write and read it, the trainer decides what its snapshot holds."""

    r: Rank
    engines: dict[str, Engine]
    model: CheckpointedModel
    best_weights: dict[str, torch.Tensor] | None
    """The best-validation copy of the trainable tensors (None: none kept, e.g. a schedule without selection)."""

    @property
    def state(self) -> Any:
        """The position: a dataclass with at least ``global_step`` and ``block`` (reported with Ray checkpoints)."""
        ...

    def snapshot(self) -> dict:
        """The coordinator's part of a checkpoint: state, config and RNG as plain data (weights_only-safe)."""
        ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def restore(self, snapshot: dict, trainable: dict[str, torch.Tensor], best: dict | None) -> None: ...

    def reader_state(self) -> dict | None:
        """This rank's data-stream positions for its own checkpoint file; None when the data is a pure function
        of (seed, epoch, step) and nothing needs saving."""
        ...

    def restore_readers(self, saved: dict, source: str) -> None:
        """Seek the data streams to the restored position (``saved``: what ``reader_state`` wrote, or {})."""
        ...


def read_trainer_file(folder: str, fs=None, model=None) -> dict:
    """``folder``'s trainer.pt: ``{SNAPSHOT, TRAINABLE, BEST}``, the snapshot's keys checked and, with ``model``,
    TRAINABLE and BEST checked against its trainable parameters that are not row-sharded (those live in
    ``sharded/``). Resume, init_from and export all read here."""
    path = posixpath.join(folder, TRAINER_FILE)
    blob = load_state(path, (SNAPSHOT, TRAINABLE, BEST), fs)
    require_keys(f"{path} [{SNAPSHOT}]", blob[SNAPSHOT], SNAPSHOT_KEYS)
    if model is not None:
        shards = model.row_shards()
        expected = {n: shape for n, shape in trainable_shapes(model).items() if n not in shards}
        check_tensors(f"{path} [{TRAINABLE}]", blob[TRAINABLE], expected)
        if blob[BEST] is not None:
            check_tensors(f"{path} [{BEST}]", blob[BEST], expected)
    return blob


@dataclass
class SavedWeights:
    """The weights a reader of a finished or interrupted run takes (export, `cllm4rec evaluate`)."""

    fs: object
    folder: str                        # the complete checkpoint folder
    path: str                          # its trainer.pt (for messages)
    snapshot: dict                     # the coordinator's part: {"state", "config", "rng"}
    tensors: dict[str, torch.Tensor]   # the best-validation weights, else the last trained state
    weights: str                       # "best" or "last": which of the two ``tensors`` are
    sharded: bool                      # row-sharded tables live in <folder>/sharded, not in ``tensors``


def read_saved_weights(source: str, use_best: bool = True) -> SavedWeights:
    """A run's or checkpoint's weights (``resolve_checkpoint``): the best-validation copy when ``use_best`` and
    the checkpoint has one, else the last trained state."""
    fs, folder = resolve_checkpoint(source)
    blob = read_trainer_file(folder, fs)
    weights = "best" if use_best and blob[BEST] is not None else "last"
    return SavedWeights(fs, folder, posixpath.join(folder, TRAINER_FILE), blob[SNAPSHOT],
                        blob[BEST] if weights == "best" else blob[TRAINABLE], weights,
                        fs.exists(posixpath.join(folder, SHARDED_DIR)))


def read_trainable(source: str, model, keeps_own: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The TRAINABLE tensors of a checkpoint (a checkpoint folder, or a run folder: its newest complete
    checkpoint), checked against ``model`` (e.g. for init_from). A trainable parameter of ``model`` that the checkpoint
    lacks and ``keeps_own(name)`` accepts keeps the model's own value (e.g. an adapter added for finetuning a run
    pretrained without one); every other difference is an error."""
    fs, folder = resolve_checkpoint(source)
    if model.row_shards() or fs.exists(posixpath.join(folder, SHARDED_DIR)):
        raise CheckpointError(f"{folder}: initialising from a checkpoint is for replicated tables; with row-sharded "
                              "tables resume the run itself (--resume, any number of ranks) instead.")
    state = dict(read_trainer_file(folder, fs)[TRAINABLE])
    expected = trainable_shapes(model)
    if keeps_own is not None:
        params = dict(model.named_parameters())
        state |= {n: params[n].detach().clone() for n in expected if n not in state and keeps_own(n)}
    check_tensors(f"{posixpath.join(folder, TRAINER_FILE)} [{TRAINABLE}]", state, expected)
    return state


def write_checkpoint(trainer: Coordinator, directory: str) -> None:
    """Every rank calls this: engines save their (partitioned) optimizer state, rank 0 the rest; records last."""
    writer = CheckpointWriter(directory, trainer.r.rank, trainer.r.world_size)
    for engine in trainer.engines.values():
        engine.save(writer)
    shards = trainer.model.row_shards()
    params = dict(trainer.model.named_parameters())
    best = trainer.best_weights
    for name, layout in shards.items():  # each rank its own rows
        writer.add_sharded(f"{TRAINABLE}.{name}", params[name], layout)
        if best is not None:
            writer.add_sharded(f"{BEST}.{name}", best[name], layout)
    readers = trainer.reader_state()
    if readers is not None:
        writer.save(READER_FILE.format(rank=trainer.r.rank), {READER: readers})
    if trainer.r.is_main:
        replicated = {n: t for n, t in trainer.trainable_state().items() if n not in shards}
        writer.save(TRAINER_FILE, {SNAPSHOT: trainer.snapshot(), TRAINABLE: replicated,
                                   BEST: None if best is None else {n: t for n, t in best.items() if n not in shards}})
    writer.finish(trainer.state.global_step)


def read_checkpoint(trainer: Coordinator, directory: str) -> None:
    """Restore a trainer (and its engines) from a verified checkpoint folder."""
    blob = read_trainer_file(directory, model=trainer.model)
    shards = trainer.model.row_shards()
    trainable, best = dict(blob[TRAINABLE]), None if blob[BEST] is None else dict(blob[BEST])
    if shards:  # this rank's rows, from whatever rows each saved rank held
        params = dict(trainer.model.named_parameters())
        targets = {f"{TRAINABLE}.{n}": (torch.empty_like(params[n].detach()), layout) for n, layout in shards.items()}
        if best is not None:
            targets |= {f"{BEST}.{n}": (torch.empty_like(params[n].detach()), layout) for n, layout in shards.items()}
        engine_targets = {}
        for engine in trainer.engines.values():
            engine_targets |= engine.sharded_targets()
        loaded = read_sharded(os.path.join(directory, SHARDED_DIR), targets | engine_targets, required=list(targets))
        trainable |= {n: loaded[f"{TRAINABLE}.{n}"] for n in shards}
        if best is not None:
            best |= {n: loaded[f"{BEST}.{n}"] for n in shards}
        for engine in trainer.engines.values():
            engine.restore_sharded(loaded)
    trainer.restore(blob[SNAPSHOT], trainable, best)
    for engine in trainer.engines.values():  # after the weights: a ZeRO engine refreshes its fp32 master from them
        engine.load(directory, trainer.r.rank)
    path = os.path.join(directory, READER_FILE.format(rank=trainer.r.rank))
    saved = load_state(path, (READER,))[READER] if os.path.exists(path) else {}
    trainer.restore_readers(saved, path)


def _load_first_complete(trainer, candidates, describe) -> bool:
    """Load the first candidate complete on every rank; warn about each one skipped. ``candidates`` yields
    context managers giving local folders (Ray downloads them)."""
    skipped = []
    for candidate in candidates:
        with candidate as directory:
            reason = incomplete_reason(directory, ranks=[trainer.r.rank], world_size=trainer.r.world_size)
            if _all_ranks_agree(reason is None):
                if skipped and trainer.r.is_main:
                    _warn(f"skipped {'; '.join(skipped)}; resuming from {describe(directory)}")
                read_checkpoint(trainer, directory)
                return True
        skipped.append(f"{describe(directory)} ({reason or 'incomplete on another rank'})")
    if skipped:
        raise CheckpointError(f"no complete checkpoint to resume from: {'; '.join(skipped)}. Remove the broken "
                              "checkpoint folders, or start over with --resume false (or another --out).")
    return False


def _write_or_disk_full(trainer: Coordinator, directory: str) -> BaseException | None:
    """``write_checkpoint``; a full disk is returned (every rank must learn of it before any raises, so that no rank
    waits in a collective for one that gave up), anything else raised."""
    try:
        write_checkpoint(trainer, directory)
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        if not is_disk_full(err):
            raise
        return err
    return None


def _folder_bytes(path: str) -> int:
    """Bytes of the files under a local folder (what a failed save had written)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _where(failure: BaseException | None) -> str:
    """Which file of the checkpoint the disk filled on (this rank's ``DiskFullError`` knows it)."""
    path = getattr(find_cause(failure, lambda e: isinstance(e, DiskFullError)), "path", None)
    return f" (writing {os.path.basename(path)})" if path else " (on another rank)" if failure is None else ""


class _Local:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        return None


class LocalSink:
    """Checkpoints in ``<run>/checkpoints`` on a filesystem every rank sees."""

    def __init__(self, run_dir: str, keep: int = 2):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep = keep

    def steps(self) -> list[str]:
        """Checkpoint folders (complete or not, never the temporary ones), newest step first."""
        if not os.path.isdir(self.root):
            return []
        names = [d for d in os.listdir(self.root) if re.fullmatch(rf"{STEP_PREFIX}\d+", d)]
        return [os.path.join(self.root, d)
                for d in sorted(names, key=lambda d: int(d[len(STEP_PREFIX):]), reverse=True)]

    def pointer(self) -> str | None:
        path = os.path.join(self.root, LATEST)
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def latest(self) -> str | None:
        """The newest complete checkpoint folder (what a resume loads), or None."""
        return next((p for p in self.steps() if incomplete_reason(p) is None), None)

    def save(self, trainer: Coordinator) -> str:
        name = f"{STEP_PREFIX}{trainer.state.global_step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f"{name}.tmp")
        if trainer.r.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        _barrier()
        failure = _write_or_disk_full(trainer, tmp)
        if not _all_ranks_agree(failure is None):  # a full disk on any rank: remove the unfinished folder
            written = _folder_bytes(tmp)
            _barrier()
            if trainer.r.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._disk_full(final, failure, written)
        pointer = os.path.join(self.root, LATEST)
        pointer_failure = None
        if trainer.r.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            try:
                write_text_atomic(pointer, name)  # the pointer last, then pruning
            except DiskFullError as err:
                pointer_failure = err
            else:
                self._prune(trainer.state.global_step)
        if not _all_ranks_agree(pointer_failure is None):
            raise DiskFullError(f"{pointer}: no space left on device to update the pointer to checkpoint {final}, "
                                "which was written whole (a resume takes the newest complete checkpoint whatever the "
                                "pointer says). Free space on that disk (or lower --keep_checkpoints) and run the same "
                                "command again to resume.", pointer)
        return final

    def _disk_full(self, final: str, failure: BaseException | None, written: int) -> DiskFullError:
        """The one-line error of a checkpoint the disk had no room for: where, how much, and what is kept."""
        previous = self.latest()
        size = _folder_bytes(previous) if previous else 0
        estimate = f" of about {format_bytes(size)} (the size of the previous checkpoint)" if size else ""
        kept = (f"The previous checkpoint {previous} is intact: free space on that disk (or lower --keep_checkpoints) "
                "and run the same command again to resume from it." if previous else
                "No earlier checkpoint of this run is complete: free space on that disk and run the same command "
                "again.")
        return DiskFullError(f"no space left on device writing checkpoint {final}{_where(failure)}: "
                             f"{format_bytes(written)} written{estimate} when the disk filled; the unfinished folder "
                             f"was removed. {kept}", final)

    def _prune(self, newest: int) -> None:
        """Keep the ``keep`` newest complete checkpoints up to ``newest``; drop anything older than the kept ones."""
        older = [p for p in self.steps() if int(os.path.basename(p)[len(STEP_PREFIX):]) <= newest]
        kept = [p for p in older if incomplete_reason(p) is None][: self.keep]
        if len(kept) < self.keep:
            return
        oldest_kept = int(os.path.basename(kept[-1])[len(STEP_PREFIX):])
        for path in older:
            if path not in kept and int(os.path.basename(path)[len(STEP_PREFIX):]) < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)

    def has_checkpoint(self) -> bool:
        return bool(self.steps()) or self.pointer() is not None

    def load_latest(self, trainer: Coordinator) -> bool:
        pointer = self.pointer()
        steps = self.steps()
        if pointer is not None and os.path.join(self.root, pointer) not in steps and trainer.r.is_main:
            _warn(f"{os.path.join(self.root, LATEST)} names {pointer!r}, which is not a checkpoint folder here; "
                  "using the newest complete checkpoint instead")
        return _load_first_complete(trainer, (_Local(p) for p in steps), lambda d: d)


class RaySink:
    """Checkpoints reported to Ray Train (persisted under RunConfig.storage_path, any pyarrow/fsspec URL)."""

    def __init__(self, keep: int = 2):
        self.keep = keep

    def save(self, trainer: Coordinator) -> None:
        """Write the checkpoint to a local temporary folder and hand Ray a complete one. Ray v2 uploads it with
        ``_upload`` (data files first, each rank's record last; a failed upload removes what it copied), so a
        storage path that fills up leaves no half-written ``checkpoint_*`` folder; a full disk is a
        ``DiskFullError``."""
        import ray.train

        step = trainer.state.global_step
        with tempfile.TemporaryDirectory(prefix="cllm4rec-ckpt-") as tmp:
            failure = _write_or_disk_full(trainer, tmp)
            if not _all_ranks_agree(failure is None):
                raise DiskFullError(f"no space left on device writing the checkpoint of step {step} to the local "
                                    f"temporary folder {tmp}{_where(failure)}: {format_bytes(_folder_bytes(tmp))} "
                                    "written; it was removed, and the checkpoints already under the Ray storage path "
                                    "are intact. Free space there (or point TMPDIR at a disk with room) and run the "
                                    "same command again to resume.", tmp)
            metrics = {"global_step": step, "block": trainer.state.block}
            upload = ({"checkpoint_upload_fn": self._upload}
                      if "checkpoint_upload_fn" in inspect.signature(ray.train.report).parameters else {})
            try:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), **upload)
            except BaseException as err:
                if isinstance(err, DiskFullError) or not is_disk_full(err):
                    raise
                raise DiskFullError(f"no space left on device persisting the checkpoint of step {step} "
                                    f"({format_bytes(_folder_bytes(tmp))}) to the Ray storage path; the checkpoints "
                                    "persisted before are intact. Free space there (RunConfig storage_path / "
                                    "dist.storage_path) and run the same command again to resume.") from None

    @staticmethod
    def _upload(checkpoint, dir_name: str):
        """Ray v2's ``checkpoint_upload_fn``: this worker's folder into ``<experiment>/<dir_name>`` on the storage
        filesystem, records last (``upload_records_last``)."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        check = getattr(storage, "_check_validation_file", None)
        if check is not None:  # what Ray's own upload checks first: this worker sees the storage path
            check()
        dest = posixpath.join(storage.experiment_fs_path, dir_name)
        upload_records_last(checkpoint.path, storage.storage_filesystem, dest)
        return ray.train.Checkpoint(dest, filesystem=storage.storage_filesystem)

    def has_checkpoint(self) -> bool:
        import ray.train

        return ray.train.get_checkpoint() is not None

    @staticmethod
    def _candidates(checkpoint):
        """The checkpoint Ray hands back, then its older siblings in the same storage folder, newest first."""
        import ray.train
        from pyarrow.fs import FileSelector, FileType

        yield checkpoint.as_directory()
        parent, own = posixpath.split(checkpoint.path.rstrip("/"))
        try:
            infos = checkpoint.filesystem.get_file_info(FileSelector(parent))
        except OSError:
            return
        names = sorted((i.base_name for i in infos if i.type == FileType.Directory
                        and i.base_name.startswith("checkpoint_") and i.base_name != own), reverse=True)
        for name in names:
            yield ray.train.Checkpoint(posixpath.join(parent, name), filesystem=checkpoint.filesystem).as_directory()

    def load_latest(self, trainer: Coordinator) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        loaded = _load_first_complete(trainer, self._candidates(checkpoint), lambda d: d)
        if loaded and trainer.r.is_main:
            remove_unfinished_uploads(checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/")))
        return loaded


# Files a checkpoint folder of this project holds (and their temporary names), and Ray's hidden markers at its top:
# what an unfinished upload may leave, and nothing else is ever removed
_OWN_FILE = re.compile(r"(trainer\.pt|optim-[\w.-]+\.pt|reader-rank\d+\.pt|files-rank\d+\.json|"
                       r"sharded/[\w.-]+\.safetensors|\.[\w.-]+)(\.tmp-\w+)?")


def upload_records_last(local: str, fs, dest: str) -> str:
    """Copy the local checkpoint folder ``local`` to ``dest`` on the pyarrow filesystem ``fs``: the data files
    first, the record (``files-rank<r>.json``) last, so that a copy cut short has no record and is never taken for
    a checkpoint. A failed copy removes the files it copied (and ``dest`` when nothing else is left there: the other
    ranks upload into the same folder) and a full disk is a ``DiskFullError``. Returns ``dest``."""
    names = sorted(os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
                   for root, _, files in os.walk(local) for name in files)
    names = [n for n in names if not _RECORD_RE.fullmatch(n)] + [n for n in names if _RECORD_RE.fullmatch(n)]
    total = sum(os.path.getsize(os.path.join(local, n)) for n in names)
    copied: list[str] = []
    done = 0
    try:
        fs.create_dir(dest, recursive=True)
        for name in names:
            target = posixpath.join(dest, name)
            if "/" in name:
                fs.create_dir(posixpath.dirname(target), recursive=True)
            copied.append(target)
            with open(os.path.join(local, name), "rb") as src, fs.open_output_stream(target) as out:
                shutil.copyfileobj(src, out, 1 << 22)
            done += os.path.getsize(os.path.join(local, name))
    except BaseException as err:
        for target in reversed(copied):
            with contextlib.suppress(Exception):
                fs.delete_file(target)
        _remove_empty_dirs(fs, dest)
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(f"{dest}: no space left on device uploading a checkpoint to the Ray storage path "
                                f"({format_bytes(done)} of {format_bytes(total)} copied; the partial copy was "
                                "removed). The checkpoints persisted before are intact: free space there and run the "
                                "same command again to resume.", dest) from err
        raise
    return dest


def _remove_empty_dirs(fs, folder: str) -> None:
    """Remove ``folder`` and its subfolders on the pyarrow filesystem ``fs`` where they hold no file."""
    from pyarrow.fs import FileSelector, FileType

    with contextlib.suppress(Exception):
        infos = fs.get_file_info(FileSelector(folder, recursive=True))
        if not any(i.type == FileType.File for i in infos):
            fs.delete_dir(folder)


def remove_unfinished_uploads(fs, parent: str) -> None:
    """Remove the ``checkpoint_*`` folders under ``parent`` (a Ray experiment folder, pyarrow filesystem ``fs``)
    that an upload cut short left: no rank-0 record (written last) and only files this project writes. A folder
    with a record is never removed (complete, or damaged: the resume's fallback warns about it); one holding other
    files is left with a warning."""
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = fs.get_file_info(FileSelector(parent))
    except OSError:
        return
    for info in infos:
        if info.type != FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        folder = info.path.rstrip("/")
        try:
            inside = fs.get_file_info(FileSelector(folder, recursive=True))
        except OSError:
            continue
        names = [i.path[len(folder) + 1:] for i in inside if i.type == FileType.File]
        if _RECORD.format(rank=0) in names:
            continue
        strange = [n for n in names if not _OWN_FILE.fullmatch(n)]
        if strange:
            _warn(f"left {folder}: no {_RECORD.format(rank=0)} (an unfinished checkpoint), but it holds "
                  f"{', '.join(strange[:3])}, which this project does not write; remove it if it is not needed")
            continue
        try:
            fs.delete_dir(folder)
        except OSError as err:
            _warn(f"could not remove {folder}, an unfinished checkpoint upload ({one_line(err)[:120]})")
            continue
        _warn(f"removed {folder}: an unfinished checkpoint upload (no {_RECORD.format(rank=0)}), left by an earlier "
              "attempt of this run")


# --------------------------------------------------------------------------- finding a run's checkpoint (export)


def _fs(url: str):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/") or "/"


def _newest_complete(fs, folders: list[str], where: str) -> str | None:
    """The complete folder with the highest recorded step; warns about newer incomplete ones."""
    ordered = sorted(folders, key=lambda p: (checkpoint_step(p, fs) or -1, p), reverse=True)
    skipped = []
    for folder in ordered:
        reason = incomplete_reason(folder, fs=fs)
        if reason is None:
            if skipped:
                _warn(f"skipped {'; '.join(skipped)} in {where}; using {folder}")
            return folder
        skipped.append(f"{folder} ({reason})")
    if skipped:
        raise CheckpointError(f"{where}: no complete checkpoint: {'; '.join(skipped)}.")
    return None


def resolve_checkpoint(source: str) -> tuple[object, str]:
    """(filesystem, complete checkpoint folder) for a checkpoint folder, its trainer.pt, or a run folder.

    A run folder's checkpoint is the newest complete one of: ``RUN/checkpoints/step-*`` (single-process and
    DeepSpeed runs), ``RUN/ray/checkpoint_*`` (``RUN/ray/<name>/checkpoint_*`` as Ray runs wrote them before) or
    ``<dist.storage_path>/<name>/checkpoint_*`` (Ray runs).
    """
    fs, root = _fs(source)
    if not fs.exists(root):
        raise CheckpointError(f"{source}: no such file or folder. Pass a run folder (the --out of `cllm4rec train` or "
                              f"a launcher) or a checkpoint folder holding {TRAINER_FILE}.")
    if fs.isfile(root):
        if posixpath.basename(root) != TRAINER_FILE:
            raise CheckpointError(f"{source}: a file, not a run or checkpoint folder (expected a folder, or its "
                                  f"{TRAINER_FILE}).")
        root = posixpath.dirname(root)
    if fs.exists(posixpath.join(root, TRAINER_FILE)):
        reason = incomplete_reason(root, fs=fs)
        if reason is not None:
            raise CheckpointError(f"{root}: not a complete checkpoint ({reason}). Pass another checkpoint, or the "
                                  "run folder to use its newest complete one.")
        return fs, root

    folders = [posixpath.dirname(p)
               for p in fs.glob(posixpath.join(root, "checkpoints", f"{STEP_PREFIX}*", TRAINER_FILE))
               if ".tmp" not in p]
    found = _newest_complete(fs, folders, posixpath.join(root, "checkpoints"))
    if found is not None:
        return fs, found
    ray_roots = [(fs, posixpath.join(root, "ray")), (fs, posixpath.join(root, "ray", "*"))]  # now; before
    config_path = posixpath.join(root, "config.yaml")
    if fs.exists(config_path):
        import yaml

        storage = ((yaml.safe_load(fs.cat_file(config_path)) or {}).get("dist") or {}).get("storage_path")
        if storage:
            rfs, rroot = _fs(storage)
            ray_roots.append((rfs, posixpath.join(rroot, posixpath.basename(root))))
    for rfs, pattern in ray_roots:
        folders = [posixpath.dirname(p) for p in rfs.glob(posixpath.join(pattern, "checkpoint_*", TRAINER_FILE))]
        found = _newest_complete(rfs, folders, pattern)
        if found is not None:
            return rfs, found
    raise CheckpointError(f"{source}: no checkpoint found. Looked for {root}/{TRAINER_FILE} (a checkpoint folder), "
                          f"{root}/checkpoints/{STEP_PREFIX}* (single-process / DeepSpeed run) and "
                          f"{root}/ray/checkpoint_*/{TRAINER_FILE} (Ray run). Has the run saved a checkpoint yet?")
