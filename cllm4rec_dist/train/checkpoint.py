"""Checkpoints: the one home for their layout, for writing them and for reading them safely (any model).

A checkpoint folder holds

* ``trainer.pt`` (rank 0): ``{SNAPSHOT: plain data, TRAINABLE: {name: tensor}, BEST: {name: tensor} | None}``;
  the snapshot is the coordinator state, the config and the RNG states (as tensors and lists);
* each engine's optimizer state: ``optim-<group>.pt`` (torch engine) or ``optim-<group>-rank<r>.pt`` (a DeepSpeed
  engine: every rank writes its own ZeRO partition);
* ``files-rank<r>.json``, written LAST by each rank: the step, the world size, and the size and sha256 of every
  file that rank wrote. A checkpoint is complete when every rank's record is there and every file matches it.

No backbone weights: the frozen backbone is recorded by path and tokenizer hash in the config/manifest and
reloaded from its own checkpoint.

Reading never runs code: every file is loaded with ``torch.load(weights_only=True)`` (tensors and plain
containers/numbers/strings only), and what was read is checked against what the caller needs
(``require_keys``, ``check_tensors``, ``check_optimizer_state``), with errors that name the file and the
missing, extra or misshapen entries. Nothing here knows a particular model: a model's recipe says which
tensors it expects (``{name: shape}``).

Sinks: ``LocalSink`` writes ``<run>/checkpoints/step-<N>`` under a temporary name, renames it when every rank
is done, then writes the ``latest`` pointer (atomically) and only then prunes older checkpoints. Resume takes
the newest COMPLETE checkpoint: a dangling or stale pointer, or a truncated newest checkpoint, is skipped with a
warning naming it. ``RaySink`` hands per-worker folders to Ray Train, which persists them under the run's
storage path; a restarted worker verifies the checkpoint Ray hands back and falls back to older ones the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import posixpath
import random
import re
import shutil
import tempfile
import time
import zipfile

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from cllm4rec_dist.corpus.shards import atomic_write
from cllm4rec_dist.errors import UserError

TRAINER_FILE = "trainer.pt"
LATEST = "latest"
STEP_PREFIX = "step-"
# Keys of trainer.pt
SNAPSHOT = "snapshot"
TRAINABLE = "trainable"
BEST = "best"
SNAPSHOT_KEYS = ("state", "config", "rng")
_RECORD = "files-rank{rank}.json"
_RECORD_RE = re.compile(r"files-rank(\d+)\.json$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, unsafe or not fitting the model; names the file."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_ranks_agree(ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (so all ranks pick the same checkpoint)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
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
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(due) if dist.get_rank() == 0 else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# --------------------------------------------------------------------------- writing


class CheckpointWriter:
    """One rank's writes into a checkpoint folder: each file atomically, the rank's record last."""

    def __init__(self, directory: str, rank: int, world_size: int):
        self.directory, self.rank, self.world_size = directory, rank, world_size
        self.files: dict[str, dict] = {}
        os.makedirs(directory, exist_ok=True)

    def save(self, name: str, state: dict) -> None:
        """``state``: tensors and plain data only (dicts, lists, tuples, numbers, strings, None)."""
        path = os.path.join(self.directory, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
        self.files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(_local_fs(), path)}

    def finish(self, step: int) -> None:
        record = {"step": step, "rank": self.rank, "world_size": self.world_size, "files": self.files}
        path = os.path.join(self.directory, _RECORD.format(rank=self.rank))
        write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True))


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(_local_fs(), path, text.encode("utf-8"))


# --------------------------------------------------------------------------- safe reading


def load_state(path: str, required: tuple[str, ...] = (), fs=None) -> dict:
    """A dict of tensors and plain data from ``path`` (local or any fsspec filesystem ``fs``); never runs code."""
    fs = fs or _local_fs()
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete. Pass a complete checkpoint folder.") from None
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
                              f"{', '.join(map(repr, list(mapping)[:12])) or 'nothing'}); not a checkpoint of this kind.")


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
                              f"{[len(g) for g in param_groups]}; it belongs to another model or world size.")
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


def _read_record(fs, directory: str, rank: int) -> dict | None:
    path = posixpath.join(directory, _RECORD.format(rank=rank))
    try:
        record = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def checkpoint_step(directory: str, fs=None) -> int | None:
    """The global step a checkpoint was written at (from rank 0's record), None if it has no record."""
    record = _read_record(fs or _local_fs(), directory, 0)
    return record.get("step") if record else None


def incomplete_reason(directory: str, ranks=None, fs=None, world_size: int | None = None) -> str | None:
    """Why ``directory`` is not a complete checkpoint for ``ranks`` (default: every rank that wrote it), or None.

    ``world_size``: the world that will load it; a different saved world size is an error, not a skip.
    """
    fs = fs or _local_fs()
    head = _read_record(fs, directory, 0)
    if head is None:
        return f"no readable {_RECORD.format(rank=0)} (interrupted while saving, or not a checkpoint folder)"
    saved_world = int(head.get("world_size", 1))
    if world_size is not None and saved_world != world_size:
        raise CheckpointError(f"{directory}: written by {saved_world} ranks, this run has {world_size}; resume with "
                              f"the same number of workers (dist.num_workers / simulate_ranks).")
    for rank in sorted({0, *(range(saved_world) if ranks is None else ranks)}):
        record = head if rank == 0 else _read_record(fs, directory, rank)
        if record is None:
            return f"no readable {_RECORD.format(rank=rank)}"
        for name, meta in record["files"].items():
            path = posixpath.join(directory, name)
            try:
                size = fs.size(path)
            except FileNotFoundError:
                return f"{name} is missing"
            if size != meta.get("bytes") or sha256_file(fs, path) != meta.get("sha256"):
                return f"{name} has {size} bytes or a checksum that differ from its record (truncated or changed)"
    return None


# --------------------------------------------------------------------------- one checkpoint in, one out


def trainable_shapes(model) -> dict[str, tuple]:
    """{name: shape} of a model's trainable parameters: what a checkpoint's TRAINABLE/BEST must hold."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def read_trainable(source: str, model) -> dict[str, torch.Tensor]:
    """The TRAINABLE tensors of a checkpoint (a checkpoint folder, or a run folder: its newest complete
    checkpoint), checked against ``model`` (e.g. for init_from)."""
    fs, folder = resolve_checkpoint(source)
    path = posixpath.join(folder, TRAINER_FILE)
    blob = load_state(path, (SNAPSHOT, TRAINABLE, BEST), fs)
    check_tensors(f"{path} [{TRAINABLE}]", blob[TRAINABLE], trainable_shapes(model))
    return blob[TRAINABLE]


def write_checkpoint(trainer, directory: str) -> None:
    """Every rank calls this: engines save their (partitioned) optimizer state, rank 0 the rest; records last."""
    writer = CheckpointWriter(directory, trainer.r.rank, trainer.r.world_size)
    for engine in trainer.engines.values():
        engine.save(writer)
    if trainer.r.is_main:
        writer.save(TRAINER_FILE, {SNAPSHOT: trainer.snapshot(), TRAINABLE: trainer.trainable_state(),
                                   BEST: trainer.best_weights})
    writer.finish(trainer.state.global_step)


def read_checkpoint(trainer, directory: str) -> None:
    """Restore a trainer (and its engines) from a verified checkpoint folder."""
    path = os.path.join(directory, TRAINER_FILE)
    blob = load_state(path, (SNAPSHOT, TRAINABLE, BEST))
    require_keys(f"{path} [{SNAPSHOT}]", blob[SNAPSHOT], SNAPSHOT_KEYS)
    expected = trainable_shapes(trainer.model)
    check_tensors(f"{path} [{TRAINABLE}]", blob[TRAINABLE], expected)
    if blob[BEST] is not None:
        check_tensors(f"{path} [{BEST}]", blob[BEST], expected)
    trainer.restore(blob[SNAPSHOT], blob[TRAINABLE], blob[BEST])
    for engine in trainer.engines.values():  # after the weights: a ZeRO engine refreshes its fp32 master from them
        engine.load(directory, trainer.r.rank)


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
        return [os.path.join(self.root, d) for d in sorted(names, key=lambda d: int(d[len(STEP_PREFIX):]), reverse=True)]

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

    def save(self, trainer) -> str:
        name = f"{STEP_PREFIX}{trainer.state.global_step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f"{name}.tmp")
        if trainer.r.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save
        _barrier()
        write_checkpoint(trainer, tmp)
        _barrier()
        if trainer.r.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text_atomic(os.path.join(self.root, LATEST), name)  # the pointer last, then pruning
            self._prune(trainer.state.global_step)
        _barrier()
        return final

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

    def load_latest(self, trainer) -> bool:
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

    def save(self, trainer) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="cllm4rec-ckpt-") as tmp:
            write_checkpoint(trainer, tmp)
            metrics = {"global_step": trainer.state.global_step, "block": trainer.state.block}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

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

    def load_latest(self, trainer) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        return _load_first_complete(trainer, self._candidates(checkpoint), lambda d: d)


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
    DeepSpeed runs), ``RUN/ray/<name>/checkpoint_*`` or ``<dist.storage_path>/<name>/checkpoint_*`` (Ray runs).
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

    folders = [posixpath.dirname(p) for p in fs.glob(posixpath.join(root, "checkpoints", f"{STEP_PREFIX}*", TRAINER_FILE))
               if ".tmp" not in p]
    found = _newest_complete(fs, folders, posixpath.join(root, "checkpoints"))
    if found is not None:
        return fs, found
    ray_roots = [(fs, posixpath.join(root, "ray", "*"))]
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
                          f"{root}/ray/*/checkpoint_*/{TRAINER_FILE} (Ray run). Has the run saved a checkpoint yet?")
