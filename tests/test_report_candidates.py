"""`cllm4rec report` with recommender: allmrec on the demo leave-one-out dataset: real A-LLMRec runs (tiny
backbone, short stages, two seeds), GRU4Rec alone and most-popular, one table; then --reuse of runs started
by hand with `cllm4rec train`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cllm4rec_dist.cli import main as cli

pytestmark = pytest.mark.slow

CONFIG = """
recommender: allmrec
allmrec:
  cf_from: {cf_from}
  finetune_sbert: false
  stage1_epochs: 1
  stage1_lr: 0.001
  stage2_epochs: 1
  stage2_lr: 0.001
  train_max_users: 48
  prompt_history: 3
  num_candidates: 5
  max_new_tokens: 6
  eval_batch_size: 20
  eval_max_users: 30
  cf_epochs: 2
  cf_patience: 1
log_every: 1000
"""
EVAL_USERS = 30


@pytest.fixture(scope="module")
def stage0(demo_loo_data, tmp_path_factory) -> Path:
    """A SASRec trained alone and saved (`cllm4rec baselines --model-out`): every A-LLMRec run starts from it."""
    out = tmp_path_factory.mktemp("report_loo_sasrec")
    assert cli(["baselines", "--model", "sasrec", "--data", demo_loo_data, "--epochs", "2", "--out",
                str(out / "result.json"), "--model-out", str(out / "model")]) == 0
    return out


@pytest.fixture(scope="module")
def config(demo_loo_data, stage0, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report_loo_cfg") / "allmrec.yaml"
    path.write_text(f"data: {demo_loo_data}\n" + CONFIG.format(cf_from=stage0 / "model"))
    return path


@pytest.fixture(scope="module")
def report(config, tmp_path_factory) -> dict:
    """Seed 1 started by hand with `cllm4rec train`, then the report: runs seed 0, reuses seed 1."""
    out = tmp_path_factory.mktemp("report_loo") / "rep"
    by_hand = out / "runs" / "allmrec" / "seed-1"
    assert cli(["train", "--config", str(config), "--seed", "1", "--batch.seed", "1", "--out", str(by_hand)]) == 0
    assert cli(["report", "--config", str(config), "--out", str(out), "--models", "popular,gru4rec,allmrec",
                "--seeds", "0,1", "--reuse"]) == 0
    report = json.loads((out / "report.json").read_text())
    report["by_hand"] = json.loads((by_hand / "metrics.json").read_text())
    return report


def test_every_model_and_stage_has_valid_and_test_rows_with_seed_statistics(report, demo_loo_data):
    from cllm4rec_dist.corpus.sequences import SequentialData

    rows = report["models"]
    assert list(rows) == ["popular", "gru4rec", "cf/sasrec", "llm/sasrec", "llm/allmrec", "llm/titles_only"]
    evaluated = len(SequentialData.open(demo_loo_data).evaluated_users("test"))
    for name, entry in rows.items():
        for part in ("valid", "test"):
            values, stds = entry[part], entry[f"{part}_std"]
            assert values["users"] == (EVAL_USERS if name.startswith("llm/") else evaluated)
            for metric in ("hit@1", "ndcg@10", "cold_items/hit@1", "warm_items/hit@1", "cold_users/hit@1"):
                users = values[metric.split("/")[0] + "/users"] if "/" in metric else values["users"]
                assert (values[metric] is None) if not users else 0.0 <= values[metric] <= 1.0, (name, metric)
            # mean and sample std of the per-seed values
            seeds = [run[part]["hit@1"] for run in entry["runs"]]
            assert values["hit@1"] == pytest.approx(sum(seeds) / len(seeds))
            assert stds["hit@1"] == pytest.approx(abs(seeds[0] - seeds[-1]) / math.sqrt(2))
    assert rows["popular"]["seeds"] == [None] and rows["llm/allmrec"]["seeds"] == [0, 1]
    for name in ("llm/allmrec", "llm/titles_only"):  # generated answers: hit@1 and the no-candidate share
        for part in ("valid", "test"):
            assert 0.0 <= rows[name][part]["hit@1_generated"] <= 1.0
            assert 0.0 <= rows[name][part]["no_candidate_share"] <= 1.0
    assert rows["cf/sasrec"]["valid"]["hit@1_generated"] is None  # a CF model generates nothing
    assert set(rows["llm/allmrec"]["stage_seconds"]) == {"cf", "align", "llm", "eval"}
    assert rows["llm/allmrec"]["stage_seconds"]["llm"][0] > 0


def test_stage0_is_loaded_from_cf_from_and_scored_again(report, stage0):
    saved = json.loads((stage0 / "result.json").read_text())
    for part in ("valid", "test"):
        row = report["models"]["cf/sasrec"]
        assert row[f"{part}_std"]["ndcg@10"] == 0.0  # both seeds load the same stage-0 model
        assert row[part]["hit@1"] == pytest.approx(saved[part]["hit@1"])
        assert row[part]["ndcg@10"] == pytest.approx(saved[part]["ndcg@10"])


def test_the_run_started_by_hand_is_reused(report):
    seed1 = report["models"]["llm/allmrec"]["runs"][1]
    assert seed1["reused"] and seed1["seed"] == 1
    assert seed1["test"]["hit@1"] == report["by_hand"]["stages"]["llm"]["allmrec"]["test"]["hit@1"]
    assert not report["models"]["llm/allmrec"]["runs"][0]["reused"]


def test_train_max_users_subsamples_the_users_of_stages_1_and_2(report):
    # 48 of the demo's training users: stage 1 ceil(48 / 32) = 2 steps, stage 2 ceil(48 / 4) = 12 steps
    assert report["by_hand"]["global_step"] == 2 + 12


def test_a_run_with_other_settings_is_not_reused(report, config):
    from cllm4rec_dist.config import load_config
    from cllm4rec_dist.report.candidates import finished_run

    run_dir = report["models"]["llm/allmrec"]["runs"][1]["run_dir"]
    cfg = load_config(str(config))
    cfg.seed = cfg.batch.seed = 1
    assert finished_run(run_dir, cfg) is not None
    cfg.allmrec.stage2_lr = 0.01
    assert finished_run(run_dir, cfg) is None


def test_differences_use_the_seed_noise_rule_and_the_markdown_shows_them(report):
    from cllm4rec_dist.report.stats import exceeds_seed_noise

    pairs = {(d["a"], d["b"], d["part"], d["metric"]): d for d in report["differences"]}
    a, b = report["models"]["llm/allmrec"], report["models"]["llm/titles_only"]
    got = pairs[("llm/allmrec", "llm/titles_only", "test", "hit@1")]
    assert got == exceeds_seed_noise(a, b, "test", "hit@1")
    spread = 2 * math.sqrt((a["test_std"]["hit@1"] ** 2 + b["test_std"]["hit@1"] ** 2) / 2)
    assert got["threshold"] == pytest.approx(spread)
    assert got["exceeds"] == (abs(a["test"]["hit@1"] - b["test"]["hit@1"]) > spread)
    text = Path(report["files"]["report.md"]).read_text()
    for label in ("Most-popular", "GRU4Rec (alone)", "SASRec (A-LLMRec stage 0)", "A-LLMRec", "LLM, titles only",
                  "Differences against the seed noise", "cllm4rec report --config", "train_max_users: 48"):
        assert label in text, label
    table = [line for line in text.splitlines() if line.startswith("| ") and " | valid | " in line]
    assert len(table) == 6 and all(len(line.strip().strip("|").split("|")) == 12 for line in table)


def test_models_of_the_other_recommender_are_refused(config, demo_data, tmp_path, capsys):
    assert cli(["report", "--config", str(config), "--out", str(tmp_path / "a"), "--models", "ease"]) == 2
    assert "cannot be reported with recommender: allmrec" in capsys.readouterr().err
    assert cli(["report", "--data", demo_data, "--out", str(tmp_path / "b"), "--models", "allmrec"]) == 2
    assert "need recommender: allmrec" in capsys.readouterr().err


def test_cf_from_of_another_model_is_a_config_error(config, stage0, tmp_path, capsys):
    assert cli(["train", "--config", str(config), "--allmrec.cf_model", "gru4rec", "--out", str(tmp_path / "r")]) == 2
    assert "holds a sasrec model" in capsys.readouterr().err


def test_the_tallrec_variant_reports_its_own_titles_only_model_as_its_row(config, tmp_path):
    """TALLRec (titles-only prompt, LoRA-tuned LLM): its run scores only the model it trained (no soft-token prompt
    whose projections never trained), and the report names that row after the variant, apart from A-LLMRec's."""
    out = tmp_path / "rep"
    assert cli(["report", "--config", str(config), "--out", str(out), "--models", "tallrec", "--seeds", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["llm/tallrec"]
    run = json.loads((out / "runs" / "tallrec" / "seed-0" / "metrics.json").read_text())
    assert sorted(run["stages"]["llm"]) == ["sasrec", "titles_only"]
    for part in ("valid", "test"):
        assert report["models"]["llm/tallrec"][part]["hit@1"] == run["stages"]["llm"]["titles_only"][part]["hit@1"]
        assert report["models"]["llm/tallrec"][part]["users"] == EVAL_USERS
    assert "TALLRec (titles only, LoRA)" in (out / "report.md").read_text()
