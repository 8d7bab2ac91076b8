"""Trust (issue 13), through the real commands: no code runs from a checkpoint, no valid row is lost, runs never
mix, a broken `latest` or newest checkpoint falls back to the newest complete one, the launcher works from any
folder, and every ordinary mistake is one line naming the file or field with exit status 2."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checks import one_line_error  # noqa: E402
from ranks import free_port

from cllm4rec_dist.cli import main as cli
from cllm4rec_dist.data.readers import ReaderOptions, read_dataset
from cllm4rec_dist.data.records import InputReport
from cllm4rec_dist.errors import run_command
from cllm4rec_dist.train.checkpoint import LATEST, TRAINER_FILE, LocalSink, checkpoint_step, sha256_file
from cllm4rec_dist.train.run_folder import DATASET_FILE, LOCK_FILE, RunFolderError, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--ablation", "cf", "--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1",
        "--schedule.finetune_epochs", "1",
        "--schedule.finetune_content_fraction", "0", "--batch.max_length", "64", "--log_every", "1000"]


@pytest.fixture(scope="module")
def run_dir(demo_data, tmp_path_factory) -> Path:
    """A finished tiny run (LLM-CF: 8 L + 8 rec steps) with checkpoints at steps 8, 12 and 16."""
    out = tmp_path_factory.mktemp("trust") / "run"
    assert cli(["train", "--data", demo_data, "--out", str(out), *TINY, "--checkpoint_every", "4",
                "--keep_checkpoints", "3"]) == 0
    return out


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("tensorboard"))
    return to


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(checkpoint: Path, name: str, payload) -> None:
    """Replace one file of a checkpoint and fix its record, as an attacker who controls the folder would."""
    torch.save(payload, checkpoint / name)
    record_path = checkpoint / "files-rank0.json"
    record = json.loads(record_path.read_text())
    record["files"][name] = {"bytes": (checkpoint / name).stat().st_size,
                             "sha256": sha256_file(__import__("fsspec").filesystem("file"), str(checkpoint / name))}
    record_path.write_text(json.dumps(record))


def newest(run: Path) -> Path:
    return Path(LocalSink(str(run)).steps()[0])


def test_a_crafted_checkpoint_runs_nothing_on_any_load_path(run_dir, demo_data, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = {"snapshot": RunsCode(marker), "trainable": {}, "best": None}
    # sanity: plain pickle WOULD run it
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()
    marker.unlink()

    crafted = copy_run(run_dir, tmp_path / "crafted")
    plant(newest(crafted), TRAINER_FILE, evil)
    # resume
    assert cli(["train", "--data", demo_data, "--out", str(crafted), *TINY, "--checkpoint_every", "4",
                "--keep_checkpoints", "3"]) == 2
    one_line_error(capsys, str(newest(crafted) / TRAINER_FILE), "refused", "system")
    # init_from
    assert cli(["train", "--data", demo_data, "--out", str(tmp_path / "ft"), *TINY,
                "--init_from", str(newest(crafted))]) == 2
    one_line_error(capsys, TRAINER_FILE, "refused")
    # export
    assert cli(["export", "--checkpoint", str(newest(crafted)), "--out", str(tmp_path / "exp"),
                "--no-user-vectors"]) == 2
    one_line_error(capsys, TRAINER_FILE, "refused")
    # an engine's optimizer state
    engine = copy_run(run_dir, tmp_path / "engine")
    plant(newest(engine), "optim-collab.pt", {"state": RunsCode(marker), "param_groups": []})
    assert cli(["train", "--data", demo_data, "--out", str(engine), *TINY, "--checkpoint_every", "4",
                "--keep_checkpoints", "3"]) == 2
    one_line_error(capsys, "optim-collab.pt", "refused")
    assert not marker.exists()


def test_init_from_a_checkpoint_without_the_models_tensors_is_refused(run_dir, demo_data, tmp_path, capsys):
    partial = copy_run(run_dir, tmp_path / "partial")
    ckpt = newest(partial)
    blob = torch.load(ckpt / TRAINER_FILE, weights_only=True)
    blob["trainable"].pop("collab_item_table.weight")
    blob["trainable"]["stray.weight"] = torch.zeros(2)
    plant(ckpt, TRAINER_FILE, blob)
    assert cli(["train", "--data", demo_data, "--out", str(tmp_path / "ft"), *TINY, "--init_from", str(ckpt)]) == 2
    one_line_error(capsys, str(ckpt / TRAINER_FILE), "missing collab_item_table.weight", "extra stray.weight")
    assert not (tmp_path / "ft" / "metrics.json").exists()


def test_dangling_latest_and_a_truncated_newest_checkpoint_resume_from_the_newest_complete(run_dir, demo_data,
                                                                                           tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    steps = LocalSink(str(run)).steps()
    assert len(steps) == 3
    (Path(steps[0]) / TRAINER_FILE).write_bytes((Path(steps[0]) / TRAINER_FILE).read_bytes()[:1000])
    (run / "checkpoints" / LATEST).write_text("step-99999999")
    (run / "metrics.json").unlink()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, "--checkpoint_every", "4",
                "--keep_checkpoints", "3"]) == 0
    out = capsys.readouterr().out
    expected = checkpoint_step(steps[1])
    assert "step-99999999" in out and f"skipped {steps[0]}" in out
    assert f"resumed at step {expected}" in out
    assert json.loads((run / "metrics.json").read_text())["global_step"] == checkpoint_step(steps[0]) == \
        json.loads((run_dir / "metrics.json").read_text())["global_step"]
    # the fallback checkpoint survived until newer complete ones existed; the pointer names a real one now
    assert (run / "checkpoints" / (run / "checkpoints" / LATEST).read_text()).is_dir()
    assert not (run / LOCK_FILE).exists()  # released when the run ended


def test_resume_with_a_changed_trajectory_setting_is_refused(run_dir, demo_data, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    assert cli(["train", "--data", demo_data, "--out", str(run), *TINY, "--checkpoint_every", "4",
                "--keep_checkpoints", "3", "--seed", "7", "--optim.pretrain_lr", "0.01"]) == 2
    one_line_error(capsys, "seed: 0 -> 7", "optim.pretrain_lr: 0.001 -> 0.01", "--allow_config_change")
    assert (run / "config.yaml").read_text() == before


def test_resume_on_other_data_is_refused_and_on_the_same_data_moved_it_continues(run_dir, demo_data, tmp_path,
                                                                                   capsys):
    from cllm4rec_dist.config import config_from_dict, read_yaml_settings
    from cllm4rec_dist.distributed import _check_ray_resume

    run = copy_run(run_dir, tmp_path / "run")
    record = json.loads((run / DATASET_FILE).read_text())
    assert record["content_hash"] == json.loads((Path(demo_data) / "manifest.json").read_text())["content_hash"]
    # The run folder says it trained on other data: refused before anything is written, by both resume paths.
    (run / DATASET_FILE).write_text(json.dumps({**record, "content_hash": "0" * 64}))
    before = (run / "config.yaml").read_text()
    args = ["train", "--data", demo_data, "--out", str(run), *TINY, "--checkpoint_every", "4",
            "--keep_checkpoints", "3"]
    assert cli(args) == 2
    one_line_error(capsys, "trained on other data", f"{'0' * 64} (", f"-> {record['content_hash']} ({demo_data})",
                   "--allow_config_change")
    assert (run / "config.yaml").read_text() == before
    assert json.loads((run / DATASET_FILE).read_text())["content_hash"] == "0" * 64
    storage = tmp_path / "ray"
    (storage / "run" / "checkpoint_000001").mkdir(parents=True)
    # The Ray launcher's driver checks the same record before any worker starts (here: a persisted checkpoint).
    cfg = config_from_dict({**read_yaml_settings(str(run / "config.yaml")), "out": str(run)})
    with pytest.raises(RunFolderError, match="trained on other data"):
        _check_ray_resume(cfg, str(storage), "run", record["content_hash"])
    # The same content at another path resumes (and the record follows the data's new place).
    (run / DATASET_FILE).write_text(json.dumps(record))
    moved = shutil.copytree(demo_data, tmp_path / "moved")
    (run / "metrics.json").unlink()
    assert cli([*args[:2], str(moved), *args[3:]]) == 0
    assert "resumed at step" in capsys.readouterr().out
    assert json.loads((run / DATASET_FILE).read_text()) == {"data": str(moved), "content_hash": record["content_hash"]}


def test_the_launchers_export_reads_the_data_the_run_trained_on_after_it_moved(demo_data, tmp_path):
    """A run resumed on its dataset at a new path (content hash checked) ends with the launchers' export, which
    reads that dataset, not the old path in the checkpoint's config: it used to fail after the whole run."""
    from argparse import Namespace

    from cllm4rec_dist.config import config_from_dict, read_yaml_settings
    from cllm4rec_dist.launch import finish

    first = shutil.copytree(demo_data, tmp_path / "first")
    run = tmp_path / "run"
    assert cli(["train", "--data", str(first), "--out", str(run), *TINY]) == 0
    moved = first.rename(tmp_path / "moved")
    cfg = config_from_dict({**read_yaml_settings(str(run / "config.yaml")), "out": str(run), "data": str(moved)})
    assert finish(cfg, Namespace(no_export=False), json.loads((run / "metrics.json").read_text())) == 0
    manifest = json.loads((run / "export" / "export.json").read_text())
    assert manifest["source"]["data"] == str(moved)


def test_a_held_run_folder_is_refused_and_a_stale_lock_is_taken_over(demo_data, tmp_path, capsys):
    out = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from cllm4rec_dist.train.run_folder import RunLock
        RunLock({str(out)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli(["train", "--data", demo_data, "--out", str(out), *TINY]) == 2
        one_line_error(capsys, str(out), f"pid {holder.pid}", "another --out")
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE).exists()  # the killed holder left its lock behind
    with RunLock(str(out)):
        assert "no longer running; taking the run folder over" in capsys.readouterr().out
    assert not (out / LOCK_FILE).exists()


def broken_rows(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A CSV with an unterminated quote on line 6 and an invalid UTF-8 user id on line 12."""
    lines = [b"user,item,rating,review"]
    valid = []
    for k in range(30):
        user, item = f"u{k % 10}", f"i{k}"
        if k == 4:
            lines.append(f'{user},{item},5,"loved it, but the quote never closes'.encode())
        elif k == 10:
            lines.append(b"u\xff3," + item.encode() + b",5,fine")
        else:
            lines.append(f"{user},{item},5,review {k}".encode())
            valid.append((user, item))
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, valid


def test_a_broken_quote_and_invalid_utf8_keep_every_valid_row(tmp_path, capsys):
    path, valid = broken_rows(tmp_path)
    report = InputReport()
    ds = read_dataset("table", ReaderOptions(inputs=[str(path)]), report)
    assert list(zip(ds.interactions["user"], ds.interactions["item"])) == valid
    assert report.skipped == {"bad_csv": 1, "invalid_encoding": 1}
    assert {e.split(": ")[0] + ": " + e.split(": ")[1].split(" ")[0] for e in report.examples} == {
        f"{path}:6: bad_csv", f"{path}:12: invalid_encoding"}
    # the same through the command: counted in stats.json; --strict names the first bad line
    out = tmp_path / "ds"
    assert cli(["preprocess", "--format", "table", "--input", str(path), "--out", str(out), "--kcore", "0",
                "--min-shards", "1"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"]["skipped"] == {"bad_csv": 1, "invalid_encoding": 1}
    capsys.readouterr()
    assert cli(["preprocess", "--format", "table", "--input", str(path), "--out", str(tmp_path / "s"),
                "--strict"]) == 2
    one_line_error(capsys, f"{path}:6: bad_csv")


def test_the_launcher_runs_from_another_folder(demo_data, tmp_path, monkeypatch, capsys):
    """Its packaged defaults (configs/demo.yaml, ds_configs/zero2.json) are found from any working directory:
    the run gets past them to the dataset check (a missing dataset here, so that no training starts; a cluster
    address that nothing listens on, so that no local Ray starts either: the checks come before Ray is joined)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    launcher = runpy.run_path(str(ROOT / "launchers" / "pretrain_llama.py"))
    missing = str(tmp_path / "no-dataset")
    cluster = ["--dist.ray_address", f"127.0.0.1:{free_port()}"]
    assert run_command(launcher["main"], ["--data", missing, "--out", str(tmp_path / "r"), *cluster]) == 2
    one_line_error(capsys, f"{missing}: no manifest.json")
    assert run_command(launcher["main"], ["--data", missing, "--dist.ds_config", "ds_configs/zero1.json",
                                          *cluster]) == 2
    one_line_error(capsys, "no manifest.json")
    from cllm4rec_dist.launch import parse

    cfg, _ = parse("x", ["--out", "r"])
    assert cfg.dist.ds_config == str(ROOT / "ds_configs" / "zero2.json") and cfg.batch.batch_size == 16


def test_ordinary_mistakes_exit_2_with_one_line_naming_the_file_or_field(demo_data, demo_raw, tmp_path, capsys):
    def train(*args) -> int:
        return cli(["train", "--data", demo_data, "--out", str(tmp_path / "r"), *args])

    listing = tmp_path / "list.yaml"
    listing.write_text("- batch_size: 16\n")
    assert train("--config", str(listing)) == 2
    one_line_error(capsys, str(listing), "mapping")
    fractional = tmp_path / "frac.yaml"
    fractional.write_text("batch:\n  batch_size: 1.5\n")
    assert train("--config", str(fractional)) == 2
    one_line_error(capsys, str(fractional), "batch.batch_size=1.5")
    for flag, value in (("--schedule.pretrain_epochs", "-1"), ("--batch.max_length", "0"),
                        ("--batch.mask_ratio", "1.5"), ("--batch.batch_size", "1.5")):
        assert train(flag, value) == 2
        one_line_error(capsys, flag[2:])
    # DeepSpeed configs: a syntax error and a bf16 section name the file (and the key)
    from cllm4rec_dist.train.engines import load_ds_config

    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2},}\n')
    launcher = runpy.run_path(str(ROOT / "launchers" / "pretrain_llama.py"))
    # (a cluster address that nothing listens on: the checks come before Ray is joined, and no local Ray starts)
    assert run_command(launcher["main"], ["--data", demo_data, "--dist.ds_config", str(broken),
                                          "--dist.ray_address", f"127.0.0.1:{free_port()}"]) == 2
    one_line_error(capsys, f"{broken}:1:", "not valid JSON")
    bf16 = tmp_path / "bf16.json"
    bf16.write_text('{"bf16": {"enabled": true}}')
    with pytest.raises(ValueError, match="Remove the 'bf16' section"):
        load_ds_config(str(bf16), 8, 2, 0.0)
    # inputs: missing path, a folder given as a file, truncated gzip and Parquet
    missing = tmp_path / "missing.json"
    assert cli(["preprocess", "--format", "amazon", "--input", str(missing), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, str(missing))
    assert cli(["preprocess", "--format", "amazon", "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, str(tmp_path), "folder")
    reviews = tmp_path / "reviews.json.gz"
    reviews.write_bytes(gzip.compress(b"".join(
        json.dumps({"reviewerID": f"u{k}", "asin": f"i{k}", "overall": 5}).encode() + b"\n"
        for k in range(2000)))[:300])
    assert cli(["preprocess", "--format", "amazon", "--input", str(reviews), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, str(reviews), "truncated")
    import pandas as pd

    table = tmp_path / "t.parquet"
    pd.DataFrame({"user": ["a"] * 50, "item": ["b"] * 50}).to_parquet(table)
    table.write_bytes(table.read_bytes()[:-40])
    assert cli(["preprocess", "--format", "table", "--input", str(table), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, str(table), "Parquet")
    # a bug is not a user error: it keeps its traceback
    with pytest.raises(ZeroDivisionError):
        run_command(lambda: 1 / 0)


def test_manifest_counts_and_sizes_are_checked_against_the_shards(demo_data, tmp_path, capsys):
    from cllm4rec_dist.corpus.shards import MANIFEST, ShardedDataset, ShardError

    def edited(name: str, change) -> str:
        folder = tmp_path / name
        shutil.copytree(demo_data, folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        return str(folder)

    def shift_docs(m):  # one document moved between shards' counts: the corpus total still adds up
        shards = m["corpora"]["collab"]["shards"]
        shards[0]["num_docs"] += 1
        shards[1]["num_docs"] -= 1

    ds = ShardedDataset(edited("docs", shift_docs))
    with pytest.raises(ShardError, match=r"collab-000000\.tar: holds \d+ documents but the manifest records"):
        ds.verify()
    with pytest.raises(ShardError, match="num_items=.* but id_maps.json lists"):
        ShardedDataset(edited("items", lambda m: m.update(num_items=m["num_items"] - 5)))
    half = tmp_path / "half"
    shutil.copytree(demo_data, half)
    (half / MANIFEST).write_text((half / MANIFEST).read_text()[:200])
    assert cli(["train", "--data", str(half), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, str(half / MANIFEST), "not valid JSON")
    # through the trainer: the shard with the wrong count is named before any step runs
    assert cli(["train", "--data", edited("docs2", shift_docs), "--out", str(tmp_path / "r2"), *TINY]) == 2
    one_line_error(capsys, "collab-000000.tar", "num_docs")
    assert not (tmp_path / "r2" / "train_log.jsonl").exists()


def test_a_backbone_that_cannot_be_used_is_one_line_before_any_worker(demo_data, demo_loo_data, tmp_path, capsys,
                                                                     monkeypatch):
    """`--backbone` on a training run takes what preprocessing's does (a checkpoint folder or `smollm2`), for both
    recommenders and the export alike (`corpus/presets.py` `run_backbone`); one that cannot be found, a preset name,
    or one whose tokenizer is not the dataset's is one line from the Ray launcher's checks (no worker started)."""
    launcher = runpy.run_path(str(ROOT / "launchers" / "pretrain_llama.py"))

    def launch(*args, local: bool = False) -> int:
        # The checks come before Ray is joined, so a cluster address that nothing listens on gets the same line
        # without a local Ray started and stopped around each check (seconds each); `local` takes that path.
        cluster = [] if local else ["--dist.ray_address", f"127.0.0.1:{free_port()}"]
        return run_command(launcher["main"], ["--data", demo_data, "--out", str(tmp_path / "run"), *cluster, *args])

    # On the local path the line is on the console before the background Ray start is stopped (which waits for
    # that start to finish), and only once.
    from cllm4rec_dist.distributed import RayStart

    stop, printed_before_stop = RayStart.stop, []

    def recording_stop(self):
        printed_before_stop.append(capsys.readouterr().err)
        stop(self)

    monkeypatch.setattr(RayStart, "stop", recording_stop)
    assert launch("--backbone", str(tmp_path / "no-such-checkpoint"), local=True) == 2
    monkeypatch.undo()
    [line] = printed_before_stop
    assert line.startswith("error: ") and str(tmp_path / "no-such-checkpoint") in line and "config.json" in line
    assert line.count("\n") == 1 and capsys.readouterr().err == ""
    # an adapter target the backbone does not have, for either recommender (its checks.py, on the driver)
    for data, recommender in ((demo_data, "cllm4rec"), (demo_loo_data, "allmrec")):
        assert launch("--data", data, "--recommender", recommender, "--model.adapter", "lora",
                      "--model.lora_targets", "q_proj,qkv") == 2
        one_line_error(capsys, "model.lora_targets", "no module named qkv")
    # a chat template the backbone's tokenizer does not have (A-LLMRec's checks.py renders it on the driver)
    assert launch("--data", demo_loo_data, "--recommender", "allmrec", "--allmrec.chat_template", "backbone") == 2
    one_line_error(capsys, "allmrec.chat_template=backbone", "has no chat template")
    assert launch("--backbone", "tiny-llama") == 2
    one_line_error(capsys, "'tiny-llama'", "cllm4rec preprocess --backbone tiny-llama")
    assert not (tmp_path / "run" / "ray").exists()  # no Ray Train run began
    try:  # located, not imported (see tests/test_model.py)
        from cllm4rec_dist.corpus.presets import smollm2_location

        smollm2_location()
    except ModuleNotFoundError as missing:
        pytest.skip(str(missing))
    # 'smollm2' is found (it used to be taken for a folder name: an OSError from the Hub client, in the workers)
    assert launch("--backbone", "smollm2") == 2
    one_line_error(capsys, "backbone smollm2: its tokenizer differs", "cllm4rec preprocess --backbone smollm2")
