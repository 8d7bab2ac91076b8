"""Atomic writes: every file this project writes for a reader (shards, manifests, checkpoints, exports, run
summaries, tuning results, the demo tables) appears whole or not at all.

The bytes go to a uniquely named temporary file beside the target, which is then renamed over it: a killed
writer leaves a ``*.tmp-<hex>`` file that no reader opens, never a truncated target. Local paths and any fsspec
URL (``s3://``, ``gs://``, ``memory://``) alike. A write that fails (a full disk above all) removes its temporary
file and leaves the target as it was; a full disk (ENOSPC / EDQUOT) is a ``DiskFullError`` naming the file and its
size, one line at the command boundary.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import fsspec

from cllm4rec_dist.errors import DiskFullError, format_bytes, is_disk_full


def url_to_fs(url: str):
    """(fsspec filesystem, path inside it without a trailing slash) for a local path or an fsspec URL; a
    filesystem's root stays "/", so that joining a name under it never yields a relative path."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/") or "/"


def atomic_write(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on ``fs`` so that it appears whole or not at all (temp name, then rename)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException as err:
        remove_quietly(fs, tmp)
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(f"{path}: no space left on device while writing {format_bytes(len(data))}; the file "
                                "was left as it was. Free space on that disk (or write elsewhere) and run the command "
                                "again.", path) from err
        raise


def remove_quietly(fs, path: str) -> None:
    """Remove the file ``path`` on ``fs`` if it is there (cleaning up after a failed write: never raises)."""
    with contextlib.suppress(Exception):
        if fs.exists(path):
            fs.rm_file(path)


def write_text_atomic(path: str, text: str) -> None:
    """``text`` (UTF-8) at the local or fsspec ``path``, through ``atomic_write``."""
    fs, target = url_to_fs(path)
    atomic_write(fs, target, text.encode("utf-8"))


def write_json_atomic(path: str, obj, default=float) -> None:
    """``obj`` as indented JSON at the local or fsspec ``path``, through ``atomic_write``: run summaries
    (metrics.json, timing.json, tune.json) that a reader never sees half-written. ``default`` turns what JSON
    has no type for into something it has (numpy and tensor scalars into floats)."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=default))
