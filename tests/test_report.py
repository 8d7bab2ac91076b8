"""`cllm4rec report` end to end on the small demo dataset: baselines + CLLM4Rec + LLM-PreRec, one tiny schedule.

The report is what quality claims are read from, so the test runs the real
command (not a mock) and checks every artefact: the Markdown rows, a decodable
PNG, the JSON keys and the per-model run folders.
"""

from __future__ import annotations

import json
import os

import pytest

from cllm4rec_dist.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_SCHEDULE = ["--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1",
                 "--schedule.finetune_epochs", "2", "--schedule.finetune_content_fraction", "0.05",
                 "--batch.batch_size", "16", "--batch.max_length", "128", "--log_every", "1000"]


@pytest.fixture(scope="module")
def report_dir(demo_data, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("report") / "rep")
    rc = main(["report", "--data", demo_data, "--out", out, "--models", "popular,ease,cllm4rec,prerec",
               *TINY_SCHEDULE])
    assert rc == 0
    return out


def test_markdown_has_a_row_per_model_and_the_provenance(report_dir):
    with open(os.path.join(report_dir, "report.md"), encoding="utf-8") as f:
        text = f.read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")
            and not line.startswith("| ---")]
    assert [r.split("|")[1].strip() for r in rows] == ["Most-popular", "EASE", "CLLM4Rec", "LLM-PreRec"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 8
        float(cells[1]), float(cells[4]), float(cells[7])  # numbers, not placeholders
    assert "cllm4rec report --data" in text and "--schedule.finetune_epochs 2" in text
    assert "finetune_epochs: 2" in text and "machine:" in text and "backbone:" in text


def test_plot_is_a_png(report_dir):
    import matplotlib.image

    path = os.path.join(report_dir, "recall20.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_json_has_everything(report_dir):
    with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    for key in ("command", "config", "dataset", "backbone", "machine", "code", "models", "seconds", "started",
                "finished"):
        assert key in report, key
    assert list(report["models"]) == ["popular", "ease", "cllm4rec", "prerec"]
    assert report["config"]["schedule"]["finetune_epochs"] == 2
    for name, entry in report["models"].items():
        for part in ("valid", "test"):
            assert set(entry[part]) >= {"recall@20", "recall@40", "ndcg@100"}, (name, part)
        assert entry["seconds"] >= 0 and os.path.isdir(entry["run_dir"])
    full = report["models"]["cllm4rec"]
    assert full["ablation"] == "none"
    assert [h["epoch"] for h in full["history"] if h["phase"] == "finetune"] == [0, 1]
    assert os.path.exists(os.path.join(full["run_dir"], "metrics.json"))
    prerec = report["models"]["prerec"]
    assert prerec["ablation"] == "prerec" and all(h["phase"] != "finetune" for h in prerec["history"])
    assert os.path.exists(os.path.join(report["models"]["ease"]["run_dir"], "result.json"))


def test_reuse_keeps_finished_runs_with_the_same_settings(report_dir, tmp_path):
    import shutil

    copy = str(tmp_path / "rep")
    shutil.copytree(report_dir, copy)
    with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as f:
        data = json.load(f)["config"]["data"]
    assert main(["report", "--data", data, "--out", copy, "--models", "popular,cllm4rec", "--reuse",
                 *TINY_SCHEDULE]) == 0
    with open(os.path.join(copy, "report.json"), encoding="utf-8") as f:
        models = json.load(f)["models"]
    assert models["cllm4rec"]["reused"] and models["popular"]["reused"]
    with open(os.path.join(copy, "report.md"), encoding="utf-8") as f:
        assert "(reused)" in f.read()


def test_unknown_model_is_refused(demo_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", "--data", demo_data, "--out", str(tmp_path), "--models", "popular,bert4rec"])
    assert "bert4rec" in capsys.readouterr().err
