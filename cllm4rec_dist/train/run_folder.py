"""A run folder belongs to one run at a time, and a resume continues the trajectory its checkpoint started.

* ``RunLock``: ``<run>/.lock`` holds the holder's host, pid and process start time, created atomically
  (written under a temporary name, then hard-linked into place: it exists whole or not at all). A second
  run on the folder is refused naming the holder. A lock whose process is gone (same host, no such pid or
  a pid reused by a newer process) is stale: it is taken over with a warning. A lock from another host
  cannot be checked from here: the message says to delete it if that run is over. The folder is created without
  the world-write bit whatever the umask (``RUN_DIR_MODE``), and the process remembers every folder it locked
  (``locked_run_dirs``: what an interrupted command names as the run to resume).
* ``check_resume_config``: the config a checkpoint was written with against the new one. A difference in a
  setting that changes the training trajectory (seed, learning rates, batch, schedule, ablation, model,
  world size...) is refused, naming the settings, unless ``allow_config_change`` is set. Settings that
  only say where things are or how often to log/save (``NEUTRAL``) may change freely.
* ``check_resume_dataset``: the dataset a run trained on against the one it resumes with, by the manifest's
  content hash (``<run>/dataset.json``, written beside ``config.yaml``): the data may move to another path
  between the runs (``data`` is NEUTRAL), it may not change; other data is refused like a trajectory change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time

from cllm4rec_dist.errors import UserError

LOCK_FILE = ".lock"
RUN_DIR_MODE = 0o775  # what os.makedirs asks for a new run folder (the umask may take more away): never world-writable
DATASET_FILE = "dataset.json"  # {"data": where it was read from, "content_hash": the manifest's}
# A copy of the DeepSpeed config file that config.yaml names (dist.ds_config, an absolute path into some checkout):
# what the run was set up with stays readable after that checkout is gone.
DS_CONFIG_FILE = "ds_config.json"
# Settings a resume may change: locations, logging and checkpoint cadence, how long to run, evaluation batching.
NEUTRAL = frozenset({
    "data", "out", "log_every", "max_steps", "resume", "keep_checkpoints", "checkpoint_every", "checkpoint_interval_s",
    "init_from",
    "allow_config_change", "eval.batch_size", "dist.use_gpu", "dist.cpus_per_worker", "dist.ds_config",
    "dist.storage_path", "dist.max_failures", "dist.ray_address",
    # A-LLMRec evaluation-only settings: what is measured after training, not how it trains
    "allmrec.eval_batch_size", "allmrec.generate", "allmrec.titles_only_baseline", "allmrec.max_new_tokens",
})


PATH_SETTINGS = ("data", "backbone", "init_from")
"""Settings that name a local folder or a URL: stored absolute in the run's config (``absolute_paths``), so the
run is evaluated, exported and resumed from any folder; compared as resolved paths on resume (a run folder written
before stored them as given, relative to where it was started). A config section adds its own as a ``PATH_FIELDS``
class attribute (e.g. A-LLMRec's ``cf_from``), so this module names no model's settings."""


def path_settings(cfg) -> list[str]:
    """The dotted names of every path setting of ``cfg``: ``PATH_SETTINGS`` and each section's ``PATH_FIELDS``."""
    names = list(PATH_SETTINGS)
    for field in dataclasses.fields(cfg):
        section = getattr(cfg, field.name)
        names += [f"{field.name}.{name}" for name in getattr(section, "PATH_FIELDS", ())]
    return names


def absolute_path(path: str | None) -> str | None:
    """A local path that exists, made absolute; a URL ("s3://..."), an absolute path, None or a name that is no
    local path (a backbone given by another name) as given."""
    if not path or "://" in path or os.path.isabs(path) or not os.path.exists(path):
        return path
    return os.path.abspath(path)


def absolute_paths(cfg) -> None:
    """Make ``cfg``'s path settings (``path_settings``) absolute (``absolute_path``), in place."""
    for dotted in path_settings(cfg):
        section, _, name = dotted.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        setattr(owner, name, absolute_path(getattr(owner, name)))


def _same_setting(name: str, before, after, paths=PATH_SETTINGS) -> bool:
    """Whether a setting is unchanged; a path setting compares resolved (relative to this working directory)."""
    if before == after:
        return True
    if name in paths and isinstance(before, str) and isinstance(after, str) and "://" not in before + after:
        return os.path.abspath(before) == os.path.abspath(after)
    return False


def default_run_dir() -> str:
    """runs/<timestamp>: where a run without `out` goes."""
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


_locked: list[str] = []  # run folders this process has locked, oldest first (absolute paths)


def locked_run_dirs() -> list[str]:
    """The run folders this process has held, oldest first, released ones included."""
    return list(_locked)


class RunFolderError(UserError):
    """The run folder is held by another run, or a resume would change the run's trajectory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("start")
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder for this process (see the module doc)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.held = False

    def _describe(self, holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        return f"pid {holder.get('pid')} on {holder.get('host')} (since {since}, {holder.get('command', '?')})"

    def acquire(self) -> RunLock:
        os.makedirs(self.run_dir, mode=RUN_DIR_MODE, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
              "since": time.time(), "command": " ".join(sys.argv)[:200]}
        tmp = f"{self.path}.{me['host']}.{me['pid']}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(me, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    _locked.append(os.path.abspath(self.run_dir))
                    return self
                except FileExistsError:
                    pass
                holder = self._read_holder()
                if holder is None:  # removed meanwhile: retry
                    continue
                if holder.get("host") == me["host"] and not _alive(holder):
                    print(f"[run] warning: {self.path} was left by {self._describe(holder)}, which is no longer "
                          "running; taking the run folder over", flush=True)
                    self._remove_if(holder)
                    continue
                where = "" if holder.get("host") == me["host"] else (
                    f" It is on another host, so it cannot be checked from here: if that run is over, delete "
                    f"{self.path}.")
                raise RunFolderError(f"{self.run_dir}: in use by another run, {self._describe(holder)}. Wait for it "
                                     f"to finish, or use another --out.{where}")
            raise RunFolderError(f"{self.path}: could not take the run folder lock (it keeps changing); another run "
                                 "is starting on the same --out.")
        finally:
            os.unlink(tmp)

    def _read_holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {"host": "?", "pid": -1}  # not written by RunLock (links are whole): treated as foreign
        return holder if isinstance(holder, dict) else {"host": "?", "pid": -1}

    def _remove_if(self, holder: dict) -> None:
        if self._read_holder() == holder:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held:
            holder = self._read_holder()
            if holder and holder.get("pid") == os.getpid():
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def flatten_settings(values: dict, prefix: str = "") -> dict:
    """{"section.field": value} of a nested settings dict (a config, a tune spec)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, new) -> list[str]:
    """'name: saved -> new' for every trajectory setting that differs (settings only one side knows are skipped)."""
    before = flatten_settings(saved)
    after = flatten_settings(dataclasses.asdict(new) if dataclasses.is_dataclass(new) else new)
    paths = path_settings(new) if dataclasses.is_dataclass(new) else PATH_SETTINGS
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(before.keys() & after.keys())
            if k not in NEUTRAL and not _same_setting(k, before[k], after[k], paths)]


def check_resume_config(saved: dict, new, source: str) -> list[str]:
    """Refuse (``RunFolderError``) a resume whose config changes the trajectory, unless new.allow_config_change."""
    changes = config_changes(saved, new)
    if changes and not getattr(new, "allow_config_change", False):
        raise RunFolderError(f"{source} was written with other settings: {'; '.join(changes)}. Resuming would "
                             "follow a schedule neither config describes. Use another --out to start a new run, "
                             "restore those settings, or pass --allow_config_change true to resume anyway.")
    return changes


def check_resume_dataset(out: str, data: str, content_hash: str | None, allow_change: bool) -> list[str]:
    """Refuse (``RunFolderError``) a resume on other data than ``<out>/dataset.json`` records, unless
    ``allow_change``; a run folder without the record (written before it existed) or a dataset without a content
    hash has nothing to compare."""
    path = os.path.join(out, DATASET_FILE)
    if content_hash is None or not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        before = saved["content_hash"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{path}: unreadable ({type(err).__name__}: {err}); it records which dataset the run "
                             "trained on. Restore it, or delete it to resume without the check.") from None
    if before is None or before == content_hash:  # recorded from a manifest without a content hash
        return []
    change = f"the dataset's content hash: {before} ({saved.get('data')}) -> {content_hash} ({data})"
    if not allow_change:
        raise RunFolderError(f"the run in {out} trained on other data: {change}. Resume with the dataset it "
                             "trained on (it may have moved), use another --out to start a new run, or pass "
                             "--allow_config_change true to resume anyway.")
    return [change]


def settle_run_config(restored_config: dict | None, cfg, is_main: bool, content_hash: str | None) -> None:
    """After a recipe's resume attempt and before anything is written: refuse a trajectory-changing config
    (``check_resume_config``) or other data (``check_resume_dataset``; a refused resume leaves the run folder as it
    was), warn about an allowed one, then record the config the run continues with as ``<out>/config.yaml`` and the
    dataset's content hash as ``<out>/dataset.json`` (rank 0). Local paths (``path_settings``: the dataset, the
    backbone, init_from, a section's own) are made absolute in ``cfg`` first, so the saved config and every
    checkpoint's copy of it name them from any folder (`cllm4rec evaluate --checkpoint RUN` run elsewhere); URLs
    stay as given."""
    from cllm4rec_dist.atomic import write_json_atomic, write_text_atomic
    from cllm4rec_dist.settings import to_yaml

    absolute_paths(cfg)
    if restored_config is not None:
        changes = check_resume_config(restored_config, cfg, f"the checkpoint in {cfg.out}")
        changes += check_resume_dataset(cfg.out, cfg.data, content_hash, cfg.allow_config_change)
        if changes and is_main:
            print(f"[train] warning: resuming with changed settings (--allow_config_change): "
                  f"{'; '.join(changes)}", flush=True)
    if is_main:
        write_text_atomic(os.path.join(cfg.out, "config.yaml"), to_yaml(cfg))
        write_json_atomic(os.path.join(cfg.out, DATASET_FILE), {"data": cfg.data, "content_hash": content_hash})
        if os.path.isfile(cfg.dist.ds_config):
            with open(cfg.dist.ds_config, encoding="utf-8") as f:
                write_text_atomic(os.path.join(cfg.out, DS_CONFIG_FILE), f.read())
