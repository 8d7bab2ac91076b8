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
    assert full["ablation"] == "none" and full["seeds"] == [0] and report["seeds"] == [0]
    (run,) = full["runs"]
    assert [h["epoch"] for h in run["history"] if h["phase"] == "finetune"] == [0, 1]
    assert run["run_dir"] == os.path.join(full["run_dir"], "seed-0")
    assert os.path.exists(os.path.join(run["run_dir"], "metrics.json"))
    assert full["valid"] == {m: run["valid"][m] for m in ("recall@20", "recall@40", "ndcg@100")}
    prerec = report["models"]["prerec"]
    assert prerec["ablation"] == "prerec" and all(h["phase"] != "finetune" for h in prerec["runs"][0]["history"])
    assert os.path.exists(os.path.join(report["models"]["ease"]["runs"][0]["run_dir"], "result.json"))


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


def test_seeds_give_mean_and_std_and_flag_differences_beyond_the_noise(demo_data, tmp_path):
    """Two seeds of most-popular (deterministic) and Multi-VAE: mean ± sample std from the per-seed runs, and
    the pairwise rule |mean_a - mean_b| > 2 sqrt((s_a^2 + s_b^2)/2) applied to them."""
    import math

    out = str(tmp_path / "rep")
    assert main(["report", "--data", demo_data, "--out", out, "--models", "popular,multivae", "--seeds", "0,1",
                 "--multivae-epochs", "3"]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["seeds"] == [0, 1] and "--seeds 0,1" in report["command"]
    vae = report["models"]["multivae"]
    values = [run["test"]["recall@20"] for run in vae["runs"]]
    assert [run["seed"] for run in vae["runs"]] == [0, 1] and values[0] != values[1]  # the seed reached Multi-VAE
    mean, std = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
    assert vae["test"]["recall@20"] == pytest.approx(mean) and vae["test_std"]["recall@20"] == pytest.approx(std)
    assert report["models"]["popular"]["test_std"]["recall@20"] == 0.0
    (diff,) = [d for d in report["differences"] if d["part"] == "test" and d["metric"] == "recall@20"]
    assert diff["threshold"] == pytest.approx(2 * math.sqrt(std ** 2 / 2))
    assert diff["difference"] == pytest.approx(report["models"]["popular"]["test"]["recall@20"] - mean)
    assert diff["exceeds"] == (abs(diff["difference"]) > diff["threshold"])
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        text = f.read()
    assert f"{mean:.4f} ± {std:.4f}" in text and "## Differences against the seed noise" in text
    assert "| Most-popular | Multi-VAE |" in text


def test_seed_noise_rule():
    from cllm4rec_dist.report.stats import exceeds_seed_noise

    def entry(name, mean, std):
        return {"model": name, "test": {"recall@20": mean}, "test_std": {"recall@20": std}}

    d = exceeds_seed_noise(entry("a", 0.30, 0.01), entry("b", 0.27, 0.02), "test", "recall@20")
    assert d["threshold"] == pytest.approx(2 * (0.00025 ** 0.5))  # 0.0316
    assert d["difference"] == pytest.approx(0.03) and not d["exceeds"]
    assert exceeds_seed_noise(entry("a", 0.31, 0.01), entry("b", 0.27, 0.02), "test", "recall@20")["exceeds"]


def test_llm_cf_runs_are_reused_across_mr_settings_it_does_not_read():
    from cllm4rec_dist.config import TrainConfig
    from cllm4rec_dist.report.full_ranking import settings_key

    a, b = TrainConfig(), TrainConfig()
    b.model.mr_reduction, b.model.lambda_c, b.schedule.warmup_mr = "token_mean", 10.0, True
    assert settings_key(a, "cf") == settings_key(b, "cf")
    assert settings_key(a, "cllm4rec") != settings_key(b, "cllm4rec")
    b.optim.finetune_lr = 0.5
    assert settings_key(a, "cf") != settings_key(b, "cf")


def test_a_run_of_another_checkout_is_reused_when_its_deepspeed_config_says_the_same(tmp_path):
    """A run folder's config holds dist.ds_config as an absolute path: the same file of another checkout (or a copy)
    must not make `--reuse` run it again; a file with other contents must."""
    import shutil

    from cllm4rec_dist.config import TrainConfig
    from cllm4rec_dist.report.full_ranking import settings_key

    a, b = TrainConfig(), TrainConfig()
    b.dist.ds_config = str(tmp_path / "elsewhere.json")
    shutil.copy(a.dist.ds_config, b.dist.ds_config)
    assert a.dist.ds_config != b.dist.ds_config
    assert settings_key(a, "cllm4rec") == settings_key(b, "cllm4rec")
    config = json.loads(open(b.dist.ds_config, encoding="utf-8").read())
    config["zero_optimization"]["stage"] = 1
    (tmp_path / "elsewhere.json").write_text(json.dumps(config))
    assert settings_key(a, "cllm4rec") != settings_key(b, "cllm4rec")


def test_a_run_whose_deepspeed_config_file_is_gone_is_compared_by_its_kept_copy(demo_data, tmp_path):
    """A run folder keeps a copy of the DeepSpeed config its config.yaml names: once that checkout's file is
    deleted, `--reuse` still compares the run by what the file said instead of running it again."""
    import shutil

    from test_trust import TINY

    from cllm4rec_dist.cli import main as cli
    from cllm4rec_dist.config import TrainConfig
    from cllm4rec_dist.report.full_ranking import settings_key
    from cllm4rec_dist.report.runs import saved_config

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    ds_config = shutil.copy(TrainConfig().dist.ds_config, checkout / "zero2.json")
    run = tmp_path / "run"
    assert cli(["train", "--data", demo_data, "--out", str(run), "--dist.ds_config", str(ds_config), *TINY]) == 0
    assert json.loads((run / "ds_config.json").read_text()) == json.loads(open(ds_config, encoding="utf-8").read())
    like = saved_config(str(run), TrainConfig())
    like.dist.ds_config = TrainConfig().dist.ds_config  # this checkout's own zero2.json: the same contents
    shutil.rmtree(checkout)
    assert settings_key(saved_config(str(run), like), "cllm4rec") == settings_key(like, "cllm4rec")


def test_a_finished_run_whose_stored_key_is_stale_is_reused_by_its_config_yaml(tmp_path):
    """entry.json keeps the settings key of the version that ran it; the run folder's config.yaml is what decides."""
    from cllm4rec_dist.config import TrainConfig
    from cllm4rec_dist.report.full_ranking import load_finished
    from cllm4rec_dist.settings import to_yaml

    cfg = TrainConfig()
    cfg.out = str(tmp_path)
    (tmp_path / "entry.json").write_text(json.dumps({"settings_key": "written by an older version", "test": {}}))
    assert load_finished("cllm4rec", str(tmp_path), cfg) is None  # no config.yaml: nothing says it is the same
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_finished("cllm4rec", str(tmp_path), cfg)["reused"]
    cfg.resume = not cfg.resume  # how the report runs its runs, not a setting they were trained with
    assert load_finished("cllm4rec", str(tmp_path), cfg)["reused"]
    cfg.resume = not cfg.resume
    # a variant's folder holds the config with the variant's settings; the report's config is the common one
    from cllm4rec_dist.recommenders import recommender
    from cllm4rec_dist.report.runs import with_variant

    llm_cf = with_variant(cfg, "cf", recommender("cllm4rec").named_variants()["cf"].settings)
    (tmp_path / "config.yaml").write_text(to_yaml(llm_cf))
    assert load_finished("cf", str(tmp_path), cfg)["reused"]
    assert load_finished("cllm4rec", str(tmp_path), cfg) is None
    other = TrainConfig()
    other.out, other.optim.finetune_lr = str(tmp_path), 0.5
    assert load_finished("cllm4rec", str(tmp_path), other) is None


def test_cold_item_slices_get_their_own_table_with_content_knn(demo_raw, tmp_path):
    """On a dataset with items held out of training the report adds the cold slices of every model, from each
    run's own result: content kNN scores the cold items from their texts, the collaborative baselines cannot."""
    data = str(tmp_path / "cold")
    assert main(["preprocess", "--format", "table", "--input", demo_raw, "--out", data,
                 "--cold-item-fraction", "0.25"]) == 0
    out = str(tmp_path / "rep")
    assert main(["report", "--data", data, "--out", out, "--models", "popular,ease,content-knn"]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        text = f.read()
    assert "| model | cold R@20 | cold-only R@20 | random cold-only R@20 |" in text
    for name, entry in report["models"].items():
        with open(os.path.join(out, "runs", name, "seed-0", "result.json"), encoding="utf-8") as f:
            result = json.load(f)
        row = "| {} | {:.4f} | {:.4f} | {:.4f} |".format(
            entry["display"], *(result["test"][m] for m in ("cold/recall@20", "cold_only/recall@20",
                                                            "cold_only_random/recall@20")))
        assert row in text
    # most-popular never ranks an item nobody trained on into the top 20 of the whole catalogue
    assert report["models"]["popular"]["test"]["cold/recall@20"] == 0.0
