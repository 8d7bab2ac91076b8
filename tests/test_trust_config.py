"""Trust (issue 32), the config/run part of the trust test matrix, through the real command (`cllm4rec train`,
`cllm4rec evaluate`): every setting is a finite number in its range or one line naming it; a config file that is
too deep, too large or not UTF-8 is one line naming the file; a diverged run (a NaN or infinite loss) stops with
one line and exit status 2 instead of writing metrics; a run started with a relative dataset path is evaluated from
any folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from checks import one_line_error  # noqa: E402

from cllm4rec_dist.cli import main as cli
from cllm4rec_dist.train.checkpoint import TRAINER_FILE, LocalSink, sha256_file

TINY = ["--ablation", "cf", "--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1",
        "--schedule.finetune_epochs", "1",
        "--schedule.finetune_content_fraction", "0", "--batch.max_length", "64", "--log_every", "1000"]
ALLMREC = """
recommender: allmrec
allmrec:
  cf_epochs: 1
  cf_patience: 1
  cf_dim: 16
  cf_max_len: 20
  stage1_epochs: 1
  stage1_lr: 0.001
  stage2_epochs: 1
  stage2_lr: 0.001
  prompt_history: 3
  num_candidates: 5
  max_new_tokens: 8
  eval_batch_size: 20
  eval_max_users: 40
  generate: false
  titles_only_baseline: false
log_every: 1000
"""


def written(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# ---- settings: finite numbers in range -------------------------------------------------------------------------

@pytest.mark.parametrize("setting, value", [
    ("optim.pretrain_lr", ".inf"), ("optim.finetune_lr", ".nan"), ("model.lambda_c", ".inf"),
    ("model.init_std", ".inf"), ("optim.weight_decay", ".inf"), ("optim.grad_clip", ".nan"),
    ("optim.user_lr_scale", ".inf"), ("checkpoint_interval_s", ".inf"), ("model.cold_item_ridge", ".inf"),
    ("allmrec.alpha", "-.inf"), ("allmrec.stage1_lr", ".nan"), ("schedule.finetune_content_fraction", ".nan"),
    ("optim.pretrain_lr", "1" + "0" * 400), ("optim.finetune_lr", "1e400"),
])
def test_non_finite_numbers_in_a_config_file_are_refused(setting, value, demo_data, tmp_path, capsys):
    *sections, leaf = setting.split(".")
    text = "".join(f"{'  ' * k}{s}:\n" for k, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {value}\n"
    config = written(tmp_path / "c.yaml", text)
    assert cli(["train", "--config", str(config), "--data", demo_data, "--out", str(tmp_path / "r"), *TINY]) == 2
    one_line_error(capsys, str(config), setting, "finite")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, value", [("--optim.pretrain_lr", "inf"), ("--optim.finetune_lr", "nan"),
                                         ("--model.lambda_c", "-inf"), ("--optim.grad_clip", "Infinity")])
def test_non_finite_numbers_on_the_command_line_are_refused(flag, value, demo_data, tmp_path, capsys):
    assert cli(["train", "--data", demo_data, "--out", str(tmp_path / "r"), *TINY, f"{flag}={value}"]) == 2
    one_line_error(capsys, "command line", flag[2:], "finite")


@pytest.mark.parametrize("setting, value, needle", [
    ("seed", "100000000000000000000000000", "seed"), ("seed", "4294967296", "seed"), ("seed", "-1", "seed"),
    ("seed", "1e26", "seed"), ("batch.seed", "4294967296", "batch.seed"),
    ("batch.batch_size", "1000000000000000000000", "batch.batch_size"),
    ("projector_sample", "-1", "projector_sample"), ("allmrec.cf_lr", "0", "allmrec.cf_lr"),
    ("allmrec.cf_epochs", "0", "allmrec.cf_epochs"), ("allmrec.stage2_lr", "-0.1", "allmrec.stage2_lr"),
    ("allmrec.cf_model", "bert4rec", "allmrec.cf_model"),
])
def test_numbers_out_of_range_are_refused(setting, value, needle, demo_data, tmp_path, capsys):
    *sections, leaf = setting.split(".")
    text = "".join(f"{'  ' * k}{s}:\n" for k, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {value}\n"
    config = written(tmp_path / "c.yaml", text)
    assert cli(["train", "--config", str(config), "--data", demo_data, "--out", str(tmp_path / "r"), *TINY]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "r").exists()
    # the same through a flag
    assert cli(["train", "--data", demo_data, "--out", str(tmp_path / "r"), *TINY, f"--{setting}={value}"]) == 2
    one_line_error(capsys, needle)


# ---- config files: too deep, too large, not UTF-8 --------------------------------------------------------------

def test_a_deeply_nested_config_file_is_one_line_naming_it(demo_data, tmp_path, capsys):
    for name, text in (("flow.yaml", "seed: " + "[" * 20000 + "]" * 20000 + "\n"),
                       ("block.yaml", "".join(f"{' ' * k}k{k}:\n" for k in range(1000)) + " " * 1000 + "x: 1\n"),
                       ("map.yaml", "batch: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n")):
        config = written(tmp_path / name, text)
        assert cli(["train", "--config", str(config), "--data", demo_data, "--out", str(tmp_path / "r")]) == 2
        one_line_error(capsys, str(config), "nested", "deeper")
    assert not (tmp_path / "r").exists()


def test_a_config_file_that_is_not_utf8_names_the_byte(demo_data, tmp_path, capsys):
    config = written(tmp_path / "latin1.yaml", "batch:\n  batch_size: 16\n# r\xe9sum\xe9\n".encode("latin-1"))
    assert cli(["train", "--config", str(config), "--data", demo_data, "--out", str(tmp_path / "r")]) == 2
    offset = config.read_bytes().index(b"\xe9")
    one_line_error(capsys, str(config), "UTF-8", f"byte {offset}", "line 3")


def test_a_huge_config_file_is_refused_before_it_is_parsed(demo_data, tmp_path, capsys):
    config = written(tmp_path / "huge.yaml", "batch:\n  batch_size: 16\n" + "# padding\n" * 200_000)
    assert cli(["train", "--config", str(config), "--data", demo_data, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, str(config), "1 MiB")


def test_a_valid_config_file_still_reads(tmp_path):
    from cllm4rec_dist.settings import read_yaml_settings

    config = written(tmp_path / "ok.yaml", "# caf\u00e9\nbatch:\n  batch_size: 8\noptim: {pretrain_lr: 1.0e-3}\n")
    assert read_yaml_settings(str(config)) == {"batch": {"batch_size": 8}, "optim": {"pretrain_lr": 1e-3}}
    assert read_yaml_settings(str(written(tmp_path / "empty.yaml", ""))) == {}


# ---- a diverged run stops --------------------------------------------------------------------------------------

def test_a_nan_loss_stops_cllm4rec_with_one_line_and_no_metrics(demo_data, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["train", "--data", demo_data, "--out", str(out), *TINY, "--optim.pretrain_lr", "1e30"]) == 2
    err = one_line_error(capsys, "loss", "step", "L step", "optim.pretrain_lr", "lower the learning rate",
                         "check the data")
    assert "nan" in err or "inf" in err
    assert not (out / "metrics.json").exists()
    assert not LocalSink(str(out)).has_checkpoint()  # nothing of the diverged weights is kept to resume from
    # the finetuning phase too (its own learning rate)
    out = tmp_path / "ft"
    assert cli(["train", "--data", demo_data, "--out", str(out), *TINY, "--optim.finetune_lr", "1e30",
                "--log_every", "1"]) == 2
    one_line_error(capsys, "rec step", "optim.finetune_lr")
    assert not (out / "metrics.json").exists()


def test_a_nan_loss_stops_allmrec_with_one_line_and_no_metrics(demo_loo_data, tmp_path, capsys):
    config = written(tmp_path / "allmrec.yaml", f"data: {demo_loo_data}\n{ALLMREC}")
    out = tmp_path / "r"
    assert cli(["train", "--config", str(config), "--out", str(out), "--allmrec.stage1_lr", "1e30"]) == 2
    err = one_line_error(capsys, "loss", "step", "align step", "allmrec.stage1_lr", "lower the learning rate")
    assert "nan" in err or "inf" in err
    assert not (out / "metrics.json").exists()
    # stage 2, and stage 0: its last step's divergence shows in the frozen model's vectors, read by stage 1
    for flag, needles in (("--allmrec.stage2_lr", ("llm step", "allmrec.stage2_lr")),
                          ("--allmrec.cf_lr", ("step 1 (align step", "allmrec.cf_lr", "stage-0 sasrec"))):
        out = tmp_path / flag
        assert cli(["train", "--config", str(config), "--out", str(out), flag, "1e30", "--log_every", "1"]) == 2
        one_line_error(capsys, "the loss is", *needles)
        assert not (out / "metrics.json").exists()


# ---- relative dataset paths ------------------------------------------------------------------------------------

def test_a_run_with_a_relative_data_path_is_evaluated_from_another_folder(demo_data, tmp_path, monkeypatch,
                                                                          capsys):
    import yaml

    data = Path(demo_data)
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    assert cli(["train", "--data", data.name, "--out", str(run), *TINY]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(data)  # absolute in the saved config
    assert json.loads((run / "dataset.json").read_text())["data"] == str(data)
    expected = json.loads((run / "metrics.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli(["evaluate", "--checkpoint", str(run), "--part", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == str(data)
    assert result["test"]["recall@20"] == pytest.approx(expected["test"]["recall@20"])


def test_a_run_saved_with_a_relative_data_path_resumes(demo_data, tmp_path, monkeypatch, capsys):
    """A run folder written before paths were stored absolute (relative `data` and `backbone` in its config and
    checkpoint) resumes from the folder it was started in, with the relative flags or the absolute ones."""
    data = Path(demo_data)
    monkeypatch.chdir(data.parent)
    run = tmp_path / "run"
    relative = ["--data", data.name, "--backbone", f"{data.name}/backbone"]
    assert cli(["train", *relative, "--out", str(run), *TINY, "--max_steps", "4"]) == 0
    # rewrite it as an older version wrote it: relative paths in config.yaml and in the checkpoint's config
    ckpt = Path(LocalSink(str(run)).steps()[0])
    blob = torch.load(ckpt / TRAINER_FILE, weights_only=True)
    assert blob["snapshot"]["config"]["data"] == str(data)
    assert blob["snapshot"]["config"]["backbone"] == str(data / "backbone")
    blob["snapshot"]["config"].update(data=data.name, backbone=f"{data.name}/backbone")
    torch.save(blob, ckpt / TRAINER_FILE)
    record_path = ckpt / "files-rank0.json"
    record = json.loads(record_path.read_text())
    record["files"][TRAINER_FILE] = {
        "bytes": (ckpt / TRAINER_FILE).stat().st_size,
        "sha256": sha256_file(__import__("fsspec").filesystem("file"), str(ckpt / TRAINER_FILE))}
    record_path.write_text(json.dumps(record))
    config = (run / "config.yaml").read_text().replace(str(data), data.name)
    (run / "config.yaml").write_text(config)
    copy = shutil.copytree(run, tmp_path / "copy")
    capsys.readouterr()
    assert cli(["train", *relative, "--out", str(run), *TINY]) == 0
    assert "resumed at step 4" in capsys.readouterr().out
    assert (run / "metrics.json").exists()
    assert cli(["train", "--data", str(data), "--backbone", str(data / "backbone"), "--out", str(copy), *TINY]) == 0
    assert "resumed at step 4" in capsys.readouterr().out


def test_a_sections_path_settings_are_stored_absolute_and_compare_resolved(tmp_path, monkeypatch):
    """A config section's own PATH_FIELDS (A-LLMRec's chat template, CF model, SBERT folder) are made absolute like
    `data`; a keyword, a missing path or a `{seed}` pattern stays as given; on resume and in a report's settings key
    a relative and an absolute spelling of the same file are the same setting."""
    from cllm4rec_dist.config import config_from_dict
    from cllm4rec_dist.report.runs import settings_key
    from cllm4rec_dist.train.run_folder import absolute_paths, config_changes, path_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "sbert").mkdir()
    section = {"chat_template": "chat.jinja", "sbert": "sbert", "cf_from": "cf-{seed}"}
    cfg = config_from_dict({"recommender": "allmrec", "out": "run", "allmrec": section})
    assert {"allmrec.chat_template", "allmrec.sbert", "allmrec.cf_from", "data"} <= set(path_settings(cfg))
    relative_key = settings_key(cfg)
    saved = dataclasses.asdict(cfg)
    absolute_paths(cfg)
    assert cfg.allmrec.chat_template == str(tmp_path / "chat.jinja") and cfg.allmrec.sbert == str(tmp_path / "sbert")
    assert cfg.allmrec.cf_from == "cf-{seed}"
    assert settings_key(cfg) == relative_key and config_changes(saved, cfg) == []
    backbone = config_from_dict({"recommender": "allmrec", "out": "run", "allmrec": {"chat_template": "backbone"}})
    absolute_paths(backbone)
    assert backbone.allmrec.chat_template == "backbone"
    other = tmp_path / "other.jinja"
    other.write_text("x")
    cfg.allmrec.chat_template = str(other)
    assert config_changes(saved, cfg) == [f"allmrec.chat_template: 'chat.jinja' -> {str(other)!r}"]
