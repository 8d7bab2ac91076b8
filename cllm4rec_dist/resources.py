"""Files that ship with the project (DeepSpeed configs, demo configs, the demo dataset's home), found from the
installed package, never from the working directory; and the cache of what the project derives from a user's files.

A relative path the user gives is looked up in the working directory first, then in the project, so
``--dist.ds_config ds_configs/zero1.json`` and ``--config configs/demo.yaml`` work from any folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATASETS = {os.path.join("shards", "demo"): "random", os.path.join("shards", "demo-loo"): "leave-one-out"}
"""The embedded demo datasets' names in configs and the split each is preprocessed with (A-LLMRec needs
leave-one-out); they live in the project's shards/ folder (see ``demo_data_dir``)."""


def packaged(relative: str) -> str:
    """Absolute path of a file or folder of the project (e.g. 'ds_configs/zero2.json')."""
    return os.path.join(PROJECT_ROOT, relative)


def resolve_path(path: str) -> str:
    """``path`` as given if absolute or a URL; else relative to the working directory when it exists there,
    else the project's file of that name when it exists, else the working-directory path (errors name it)."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    if os.path.exists(path):
        return os.path.abspath(path)
    shipped = packaged(path)
    return shipped if os.path.exists(shipped) else os.path.abspath(path)


def demo_data_dir(name: str) -> str:
    """Where the embedded demo dataset ``name`` (a key of DEMO_DATASETS) is built and read: <project>/<name>
    (shards/ is git-ignored)."""
    return packaged(name)


CACHE_ENV = "CLLM4REC_CACHE"
"""Where the project keeps what it derives from a file it reads, to skip the work next time (default:
$XDG_CACHE_HOME/cllm4rec_dist, else ~/.cache/cllm4rec_dist: the package's name). Today: a GGUF backbone unpacked
into a plain tokenizer and plain weights (``gguf_cache``)."""


def cache_root() -> str:
    root = os.environ.get(CACHE_ENV)
    if root:
        return root
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "cllm4rec_dist")


GGUF_PARTS = ("tokenizer", "model")
"""What a GGUF file's cache folder holds, one subfolder each: the plain tokenizer and the plain fp32 checkpoint."""


def gguf_cache(path: str, gguf_file: str, part: str) -> str:
    """Where ``part`` (one of GGUF_PARTS) of one GGUF file is cached: a folder named by the file's real path, size
    and modification time and by the transformers version that unpacks it, so a changed file or library gets a new
    one."""
    if part not in GGUF_PARTS:
        raise ValueError(f"part must be one of {GGUF_PARTS}, got {part!r}")
    import transformers

    gguf = os.path.realpath(os.path.join(path, gguf_file))
    stat = os.stat(gguf)
    key = f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    name = os.path.splitext(os.path.basename(gguf))[0]
    return os.path.join(cache_root(), "gguf", f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}", part)


ABANDONED_STAGING_S = 3600
"""A cache's temporary folder this much older than now was left by a killed writer (a write takes seconds)."""


def _staging_prefix(folder: str) -> str:
    """The name prefix of ``folder``'s temporary twins (``fill_cache`` writes into one, then renames it)."""
    return os.path.basename(folder) + ".tmp-"


def remove_abandoned_staging(folder: str, older_than_s: float = ABANDONED_STAGING_S) -> None:
    """Remove the temporary twins of ``folder`` (``<name>.tmp-*`` beside it) last modified more than
    ``older_than_s`` ago: what a writer killed before its rename left (a GGUF backbone's is half a gigabyte). A
    younger one may be another process's write in progress and is kept."""
    parent, prefix = os.path.dirname(folder), _staging_prefix(folder)
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(parent, name)
        try:
            if now - os.stat(path).st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # removed meanwhile by another process


def fill_cache(folder: str, write: Callable[[str], None]) -> None:
    """Cache ``folder`` whole or not at all: ``write`` fills a temporary folder beside it, which is then renamed to
    it. The cache is an optimisation: a folder another process renamed first is kept; a read-only home or a full
    disk is one warning line, leaves nothing behind, and the caller reads the source itself. Temporary folders
    that killed writers left are removed first (``remove_abandoned_staging``)."""
    staging = None
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        remove_abandoned_staging(folder)
        staging = tempfile.mkdtemp(prefix=_staging_prefix(folder), dir=os.path.dirname(folder))
        write(staging)
        os.rename(staging, folder)
        staging = None
    except Exception as err:  # noqa: BLE001 (any failure to write a cache only costs the work it would save)
        if not os.path.isdir(folder):
            print(f"[cache] warning: could not write {folder} ({type(err).__name__}: {err}); "
                  f"set {CACHE_ENV} to a writable folder to skip this work next time", flush=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
