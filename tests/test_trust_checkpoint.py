"""Trust (issue 32), the checkpoint part of the trust test matrix, through the real commands (`cllm4rec train` /
`export` / `evaluate`), with crafted files built here:

* sidecars: a corrupt safetensors header or a bad ``DCP_SHARDING_INFO`` in a row-sharded checkpoint is a one-line
  error naming the file and the field, never a traceback or an allocation the header asks for;
* records: a ``files-rank<r>.json`` field of the wrong type or range, or a recorded path that leaves its checkpoint
  folder (``..``, absolute, a symlink), makes that checkpoint unusable: resume falls back to the newest complete
  one with a warning naming the file and the field, a command given that checkpoint refuses it in one line;
* disk: a disk that fills up while a checkpoint is written is one line and exit status 2, leaves no temporary
  folder and the previous checkpoint intact (the same command resumes to the same result), and a Ray checkpoint
  whose upload fails leaves no half-written ``checkpoint_*`` folder (one left by a killed run is removed on
  restart).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import fsspec
import pytest
import torch
from checks import one_line_error  # noqa: E402
from fsspec.implementations.local import LocalFileOpener

from cllm4rec_dist.cli import main as cli
from cllm4rec_dist.errors import DiskFullError
from cllm4rec_dist.train.checkpoint import SHARDED_DIR, TRAINER_FILE, LocalSink, RaySink, sha256_file

TINY = ["--ablation", "cf", "--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1",
        "--schedule.finetune_epochs", "1",
        "--schedule.finetune_content_fraction", "0", "--batch.max_length", "64", "--log_every", "1000"]
EVERY = ["--checkpoint_every", "4", "--keep_checkpoints", "3"]
ROW = ["--model.table_sharding", "row", "--model.item_head_sharding", "row"]
RESULT_KEYS = ("valid", "test", "best", "global_step")


def results(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: metrics[k] for k in RESULT_KEYS}


@pytest.fixture(scope="module")
def run_dir(demo_data, tmp_path_factory) -> Path:
    """A finished tiny run (LLM-CF: 8 L + 8 rec steps) with checkpoints at steps 8, 12 and 16."""
    out = tmp_path_factory.mktemp("trust_ckpt") / "run"
    assert cli(["train", "--data", demo_data, "--out", str(out), *TINY, *EVERY]) == 0
    return out


@pytest.fixture(scope="module")
def row_run(demo_data, tmp_path_factory) -> Path:
    """The same run with row-sharded tables and item head: each checkpoint has a sharded/ part (safetensors)."""
    out = tmp_path_factory.mktemp("trust_ckpt_row") / "run"
    assert cli(["train", "--data", demo_data, "--out", str(out), *TINY, *EVERY, *ROW]) == 0
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("tensorboard"), symlinks=True)
    return to


def steps(run: Path) -> list[Path]:
    return [Path(p) for p in LocalSink(str(run)).steps()]


def rerecord(checkpoint: Path, name: str) -> None:
    """Fix rank 0's record for a changed file, as someone who controls the folder would."""
    record_path = checkpoint / "files-rank0.json"
    record = json.loads(record_path.read_text())
    record["files"][name] = {"bytes": (checkpoint / name).stat().st_size,
                             "sha256": sha256_file(fsspec.filesystem("file"), str(checkpoint / name))}
    record_path.write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------- sidecars

SHARD = f"{SHARDED_DIR}/shard-00001-model-00001-of-00001.safetensors"


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _sharding_info(header: dict) -> dict:
    return json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])


def _set_sharding_info(header: dict, info) -> None:
    header["__metadata__"]["DCP_SHARDING_INFO"] = info if isinstance(info, str) else json.dumps(info)


def _huge_prefix(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])


def _not_json(path: Path) -> None:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + b"{\"oops" + b" " * (size - 6) + raw[8 + size:])


def _edit(change):
    def apply(path: Path) -> None:
        header, data = read_safetensors(path)
        change(header)
        write_safetensors(path, header, data)
    return apply


def _absurd_shape(header: dict) -> None:
    entry = header["trainable.collab_item_table.weight"]
    begin = entry["data_offsets"][0]
    entry["shape"], entry["data_offsets"] = [1 << 40, 64], [begin, begin + (1 << 40) * 64 * 4]


def _bad_dtype(header: dict) -> None:
    header["trainable.collab_item_table.weight"]["dtype"] = "Q8"


def _info_missing_key(header: dict) -> None:
    info = _sharding_info(header)
    del info["trainable.collab_item_table.weight"]
    _set_sharding_info(header, info)


def _info_offsets(value):
    def change(header: dict) -> None:
        info = _sharding_info(header)
        info["trainable.collab_item_table.weight"]["saved_offsets"] = value
        _set_sharding_info(header, info)
    return change


SIDECARS = {
    "header-size": (_huge_prefix, "header"),
    "header-not-json": (_not_json, "header"),
    "absurd-shape": (_edit(_absurd_shape), "trainable.collab_item_table.weight"),
    "unknown-dtype": (_edit(_bad_dtype), "dtype"),
    "sharding-info-not-json": (_edit(lambda h: _set_sharding_info(h, "{oops")), "DCP_SHARDING_INFO"),
    "sharding-info-missing-key": (_edit(_info_missing_key), "DCP_SHARDING_INFO"),
    "sharding-offsets-wrong-type": (_edit(_info_offsets(["0", 0])), "saved_offsets"),
    "sharding-offsets-absurd": (_edit(_info_offsets([1 << 50, 0])), "saved_offsets"),
}


@pytest.mark.parametrize("variant", list(SIDECARS))
def test_a_corrupt_safetensors_sidecar_is_one_line_naming_the_file_on_resume_and_export(
        row_run, demo_data, tmp_path, capsys, variant):
    corrupt, field = SIDECARS[variant]
    run = copy_run(row_run, tmp_path / "run")
    newest = steps(run)[0]
    corrupt(newest / SHARD)
    rerecord(newest, SHARD)  # the record agrees: the checkpoint looks complete
    (run / "metrics.json").unlink()
    capsys.readouterr()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY, *ROW]) == 2
    one_line_error(capsys, str(newest / SHARD), field, "earlier checkpoint")
    assert cli(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "exp")]) == 2
    one_line_error(capsys, str(newest / SHARD), field)


def test_an_unrecorded_safetensors_file_in_the_sharded_part_is_refused(row_run, demo_data, tmp_path, capsys):
    """DCP would read every safetensors file of the folder: one the records do not name is refused."""
    run = copy_run(row_run, tmp_path / "run")
    newest = steps(run)[0]
    shutil.copy(newest / SHARD, newest / SHARDED_DIR / "shard-00002-model-00001-of-00001.safetensors")
    assert cli(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "exp")]) == 2
    one_line_error(capsys, "shard-00002-model-00001-of-00001.safetensors", "files-rank")


# ----------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("run_name", ["run_dir", "row_run"])
def test_every_recorded_size_and_digest_is_the_file_on_disk(run_name, request):
    """The writer hashes a file as it streams it out (no second read): the record must still be the file read
    back, for the torch.save files and the sharded part's safetensors alike."""
    fs = fsspec.filesystem("file")
    for checkpoint in steps(request.getfixturevalue(run_name)):
        record = json.loads((checkpoint / "files-rank0.json").read_text())
        assert TRAINER_FILE in record["files"]
        for name, meta in record["files"].items():
            path = checkpoint / name
            assert meta == {"bytes": path.stat().st_size, "sha256": sha256_file(fs, str(path))}, path


def _set(path: tuple, value):
    def change(record: dict) -> None:
        target = record
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


RECORDS = {
    "world_size-string": (_set(("world_size",), "1"), "world_size"),
    "world_size-absurd": (_set(("world_size",), 10**12), "world_size"),
    "step-string": (_set(("step",), "16"), "step"),
    "step-negative": (_set(("step",), -3), "step"),
    "rank-other": (_set(("rank",), 1), "rank"),
    "reshardable-string": (_set(("reshardable",), "no"), "reshardable"),
    "files-list": (_set(("files",), [TRAINER_FILE]), "files"),
    "bytes-string": (_set(("files", TRAINER_FILE, "bytes"), "142225"), "bytes"),
    "sha256-number": (_set(("files", TRAINER_FILE, "sha256"), 12345), "sha256"),
    "entry-string": (_set(("files", TRAINER_FILE), "ok"), TRAINER_FILE),
}


@pytest.mark.parametrize("variant", list(RECORDS))
def test_a_record_field_of_the_wrong_type_falls_back_on_resume_and_is_refused_by_export_and_evaluate(
        run_dir, demo_data, tmp_path, capsys, variant):
    change, field = RECORDS[variant]
    run = copy_run(run_dir, tmp_path / "run")
    newest, previous = steps(run)[:2]
    record = json.loads((newest / "files-rank0.json").read_text())
    change(record)
    (newest / "files-rank0.json").write_text(json.dumps(record))
    assert cli(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "exp"), "--no-user-vectors"]) == 2
    one_line_error(capsys, str(newest / "files-rank0.json"), field)
    assert cli(["evaluate", "--checkpoint", str(newest)]) == 2
    one_line_error(capsys, str(newest / "files-rank0.json"), field)
    (run / "metrics.json").unlink()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY]) == 0
    out = capsys.readouterr().out
    assert f"skipped {newest}" in out and "files-rank0.json" in out and field in out
    assert f"resuming from {previous}" in out
    assert results(run) == results(run_dir)


def _escape_relative(checkpoint: Path, outside: Path) -> str:
    return os.path.relpath(outside, checkpoint)


ESCAPES = {
    "dotdot": lambda ckpt, outside: _escape_relative(ckpt, outside),
    "absolute": lambda ckpt, outside: str(outside),
    "dotdot-inside": lambda ckpt, outside: f"extra/../{TRAINER_FILE}",  # stays inside, still refused
}


@pytest.mark.parametrize("variant", [*ESCAPES, "symlink"])
def test_a_recorded_path_outside_the_checkpoint_folder_is_refused(run_dir, demo_data, tmp_path, capsys, variant):
    run = copy_run(run_dir, tmp_path / "run")
    newest, previous = steps(run)[:2]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of any checkpoint\n")
    record = json.loads((newest / "files-rank0.json").read_text())
    if variant == "symlink":  # the file the record names is a link to a copy outside: same bytes, same hash
        shutil.copy(newest / TRAINER_FILE, outside)
        (newest / TRAINER_FILE).unlink()
        (newest / TRAINER_FILE).symlink_to(outside)
        named = TRAINER_FILE
    else:
        (newest / "extra").mkdir()
        named = ESCAPES[variant](newest, outside)
        target = newest / TRAINER_FILE if variant == "dotdot-inside" else outside
        record["files"][named] = {"bytes": target.stat().st_size,
                                  "sha256": sha256_file(fsspec.filesystem("file"), str(target))}
    (newest / "files-rank0.json").write_text(json.dumps(record))
    assert cli(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "exp"), "--no-user-vectors"]) == 2
    one_line_error(capsys, str(newest / "files-rank0.json"), named, "outside")
    (run / "metrics.json").unlink()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY]) == 0
    out = capsys.readouterr().out
    assert f"skipped {newest}" in out and "outside" in out and f"resuming from {previous}" in out
    assert results(run) == results(run_dir)


# ----------------------------------------------------------------------------------------------- disk


def fill_disk_after(monkeypatch, limit: int, where: str) -> list[str]:
    """Every local fsspec file written under a path containing ``where`` fails with ENOSPC after ``limit`` bytes
    (the whole folder's writes counted together), as a full disk would. Returns the paths that failed."""
    real_write = LocalFileOpener.write
    written, failed = [0], []

    def write(self, data, *args, **kwargs):
        if where in str(self.path):
            written[0] += len(data)
            if written[0] > limit:
                failed.append(str(self.path))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(LocalFileOpener, "write", write)
    return failed


@pytest.mark.parametrize("limit", [0, 200_000], ids=["first-file", "mid-checkpoint"])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_same_command_resumes(run_dir, demo_data, tmp_path,
                                                                                  capsys, monkeypatch, limit):
    run = tmp_path / "run"
    failed = fill_disk_after(monkeypatch, limit, "step-00000012")
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY]) == 2
    assert failed
    message = one_line_error(capsys, "no space left", str(run / "checkpoints" / "step-00000012"),
                             str(run / "checkpoints" / "step-00000008"), "intact")
    assert " B" in message or "kB" in message or "MB" in message  # how much was being written
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["latest", "step-00000004", "step-00000008"], left  # no temporary folder, the previous ones kept
    assert not list((run / "checkpoints").rglob("*.tmp*"))
    monkeypatch.undo()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY]) == 0
    assert "resumed at step 8" in capsys.readouterr().out
    assert results(run) == results(run_dir)


def test_a_full_disk_while_writing_the_latest_pointer_keeps_the_written_checkpoint(run_dir, demo_data, tmp_path,
                                                                                   capsys, monkeypatch):
    run = tmp_path / "run"
    fill_disk_after(monkeypatch, 0, "checkpoints/latest.tmp")
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY]) == 2
    one_line_error(capsys, "no space left", str(run / "checkpoints"))
    assert not list((run / "checkpoints").glob("latest.tmp*"))
    monkeypatch.undo()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, *EVERY]) == 0
    assert results(run) == results(run_dir)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))

    def row_shards(self) -> dict:
        return {}


class _State:
    def __init__(self, step: int):
        self.global_step, self.block = step, 0


class _Trainer:
    """The least a sink needs of a trainer (train/checkpoint.py ``Coordinator``)."""

    def __init__(self, step: int):
        from cllm4rec_dist.train.rank import Rank

        self.r, self.engines, self.model, self.best_weights = Rank(0, 1), {}, _Model(), None
        self.state = _State(step)
        self.restored = None

    def snapshot(self) -> dict:
        return {"state": {"global_step": self.state.global_step}, "config": {}, "rng": {}}

    def trainable_state(self) -> dict:
        return {"table": self.model.table.detach().clone()}

    def restore(self, snapshot, trainable, best) -> None:
        self.restored = snapshot["state"]["global_step"]

    def reader_state(self):
        return None

    def restore_readers(self, saved, source) -> None:
        pass


class _FakeRay:
    """Ray Train v2's report as this project uses it: a checkpoint directory persisted under the experiment folder
    (by the sink's ``checkpoint_upload_fn`` when it passes one, else copied whole, as Ray does)."""

    def __init__(self, experiment: Path):
        import pyarrow.fs

        self.fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec.filesystem("file")))
        self.experiment = experiment
        self.count = 0
        self.latest = None

    def report(self, metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_fn=None, **kwargs):
        import ray.train
        self.count += 1
        name = checkpoint_dir_name or f"checkpoint_2026-01-01_00-00-{self.count:02d}.000000"
        if checkpoint_upload_fn is not None:
            persisted = checkpoint_upload_fn(checkpoint, name)
        else:  # Ray's own copy: file by file, in no particular order, nothing removed when it fails
            local = fsspec.filesystem("file")
            for source in sorted(Path(checkpoint.path).rglob("*"), reverse=True):
                if source.is_file():
                    target = self.experiment / name / source.relative_to(checkpoint.path)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with local.open(str(target), "wb") as f:
                        f.write(source.read_bytes())
            persisted = ray.train.Checkpoint(str(self.experiment / name))
        self.latest = persisted

    def get_context(self):
        fake = self

        class Storage:
            storage_filesystem = fake.fs
            experiment_fs_path = str(fake.experiment)

        class Context:
            def get_storage(self):
                return Storage()

        return Context()


def test_a_full_ray_storage_path_leaves_no_half_written_checkpoint(tmp_path, capsys, monkeypatch):
    ray_train = pytest.importorskip("ray.train")
    experiment = tmp_path / "storage" / "run"
    experiment.mkdir(parents=True)
    ray = _FakeRay(experiment)
    monkeypatch.setattr(ray_train, "report", ray.report)
    monkeypatch.setattr(ray_train, "get_context", ray.get_context)
    monkeypatch.setattr(ray_train, "get_checkpoint", lambda: ray.latest)
    sink = RaySink()
    sink.save(_Trainer(4))
    first = sorted(p.name for p in experiment.iterdir())
    assert len(first) == 1 and (experiment / first[0] / "files-rank0.json").exists()

    # the storage fills up while the second checkpoint is uploaded: one error, nothing half-written left
    failed = fill_disk_after(monkeypatch, 100, str(experiment))
    with pytest.raises(DiskFullError, match="no space left") as raised:
        sink.save(_Trainer(8))
    assert failed and str(experiment) in str(raised.value) and "intact" in str(raised.value)
    assert sorted(p.name for p in experiment.iterdir()) == first
    monkeypatch.undo()
    monkeypatch.setattr(ray_train, "get_checkpoint", lambda: ray.latest)

    # a killed upload (an older run, or a worker that died mid-copy) left a checkpoint_* folder without records:
    # the restarted run resumes from the complete one and removes it, saying so
    leftover = experiment / "checkpoint_2026-01-01_00-00-09.000000"
    shutil.copytree(experiment / first[0], leftover)
    for record in leftover.glob("files-rank*.json"):
        record.unlink()
    (leftover / TRAINER_FILE).write_bytes((leftover / TRAINER_FILE).read_bytes()[:100])
    trainer = _Trainer(0)
    assert sink.load_latest(trainer)
    assert trainer.restored == 4
    out = capsys.readouterr().out
    assert f"removed {leftover}" in out or f"removed {leftover.name}" in out
    assert sorted(p.name for p in experiment.iterdir()) == first


def test_disk_full_is_a_user_error_and_other_os_errors_are_not():
    from cllm4rec_dist.errors import UserError, run_command

    assert issubclass(DiskFullError, UserError)

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/some/file")

    assert run_command(full) == 2
    with pytest.raises(OSError):
        run_command(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
