"""A-LLMRec end to end through the real entry points: `cllm4rec train` (stage 0 -> 1 -> 2 -> evaluation),
resume, TensorBoard, `cllm4rec export`, and the Ray launcher (DeepSpeed ZeRO over F_U/F_I).

Tiny backbone (hidden 64), the demo leave-one-out dataset, short stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ranks import free_port  # noqa: E402

from cllm4rec_dist.cli import main as cli
from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.train.monitor import read_train_log

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

CONFIG = """
recommender: allmrec
allmrec:
  cf_epochs: 2
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
optim:  # every run here steps stages 1 and 2 along their own cosine (checked once, on the module's run)
  lr_schedule: cosine
  lr_warmup_fraction: 0.2
  min_lr_ratio: 0.1
simulate_ranks: 2
log_every: 1000
"""


def train(config: Path, out: Path, *flags: str) -> dict:
    assert cli(["train", "--config", str(config), "--out", str(out), *flags]) == 0
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}


@pytest.fixture(scope="module")
def config(demo_loo_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("allmrec_cfg") / "allmrec.yaml"
    path.write_text(f"data: {demo_loo_data}\n{CONFIG}")
    return path


@pytest.fixture(scope="module")
def run(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("allmrec_run") / "run"
    train(config, out)
    return out


def test_every_stage_runs_and_writes_metrics_per_model_and_stage(run, demo_loo_data):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recommender"] == "allmrec"
    assert set(metrics["seconds"]) == {"cf", "align", "llm", "eval"}
    data = SequentialData.open(demo_loo_data)
    cf = metrics["stages"]["cf"]["sasrec"]
    assert cf["valid"]["hit@1"] is not None and cf["test"]["ndcg@10"] is not None
    llm = metrics["stages"]["llm"]
    assert set(llm) == {"sasrec", "allmrec", "titles_only"}
    for model in ("allmrec", "titles_only"):
        for part in ("valid", "test"):
            m = llm[model][part]
            assert m["users"] == min(40, len(data.evaluated_users(part)))
            for key in ("hit@1", "hit@1_generated", "ndcg@10", "no_candidate_share"):
                assert 0.0 <= m[key] <= 1.0, (model, part, key)
            assert set(m["slices"]) == {"cold_items", "warm_items", "cold_users"}
            assert "hit@1_generated" in m["slices"]["cold_users"]
    # The CF model scored inside stage 2's evaluation is the stage-0 model (stage 0 evaluates every user).
    assert cf["test"]["users"] == len(data.evaluated_users("test"))
    assert llm["sasrec"]["test"]["users"] == min(40, cf["test"]["users"])
    # each model's evaluation line ends with the number of users it was evaluated on (the count is not a metric)
    eval_lines = [line for line in (run / "progress.log").read_text().splitlines() if line.startswith("[eval] ")]
    assert len(eval_lines) == 2 * len(llm)
    for part in ("valid", "test"):
        for model, parts in llm.items():
            line = next(line for line in eval_lines if line.startswith(f"[eval] {part}/{model} @"))
            assert line.endswith(f" ({parts[part]['users']} users)") and " users " not in line, line

    log = read_train_log(run)
    # Logged scalars wait on the device and are all-reduced once per log_every (1000) steps or stage epoch,
    # as CLLM4Rec's: here once at the end of each of the two training epochs, not once per step.
    rank0 = json.loads((run / "timing.json").read_text())["rank0"]
    assert rank0["counts"]["log_reduce"] == 2 < len(log)
    assert rank0["counts"]["checkpoints"] == 4  # after stage 0, each training epoch, and the evaluation
    for stage in ("align", "llm"):
        losses = [r["loss"] for r in log if r["kind"] == stage]
        assert losses and np.mean(losses[-3:]) < np.mean(losses[:3]), stage  # losses fall

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"align/loss", "align/matching", "align/recon_item", "align/recon_text", "align/rec", "llm/loss"} <= tags
    assert any(t.startswith("cf/") for t in tags) and "test/allmrec/hit@1" in tags


def test_the_evaluation_prints_its_progress_with_an_eta(run):
    lines = [line for line in (run / "console.log").read_text().splitlines() if line.startswith("[score]")]
    for part in ("valid", "test"):
        mine = [line for line in lines if line.startswith(f"[score] {part}, allmrec + titles_only:")]
        assert mine and "ETA" in mine[-1], lines
        done, total = mine[-1].split(": ")[1].split(" ")[0].split("/")
        assert done == total and int(total) > 0  # the closing line of the part


def optimizer_states(run: Path) -> set[str]:
    """The engines whose optimizer state the newest checkpoint of ``run`` holds (its rank-0 record's files)."""
    from cllm4rec_dist.train.checkpoint import LocalSink

    record = json.loads((Path(LocalSink(str(run)).steps()[0]) / "files-rank0.json").read_text())
    return {name.removeprefix("optim-").split(".")[0].split("-rank")[0] for name in record["files"]
            if name.startswith("optim-")}


def test_resumed_losses_and_metrics_equal_the_uninterrupted_run(run, config, tmp_path):
    reference = read_train_log(run)
    stage1 = sum(r["kind"] == "align" for r in reference)
    out = tmp_path / "resumed"
    assert train(config, out, "--max_steps", "2") == {}                # stopped inside stage 1
    assert optimizer_states(out) == {"align", "llm"}
    assert train(config, out, "--max_steps", str(stage1 + 3)) == {}   # resumed, stopped inside stage 2
    assert optimizer_states(out) == {"llm"}  # stage 1's optimizer is never stepped again: not saved
    metrics = train(config, out, "--allmrec.generate", "false",       # resumed to the end (scored metrics only)
                    "--allmrec.titles_only_baseline", "false")
    resumed = read_train_log(out)
    assert [r["global_step"] for r in resumed] == [r["global_step"] for r in reference]
    for mine, ref in zip(resumed, reference):
        assert mine["kind"] == ref["kind"] and mine["loss"] == pytest.approx(ref["loss"], rel=1e-5), (mine, ref)
    expected = json.loads((run / "metrics.json").read_text())
    for key in ("hit@1", "ndcg@10"):
        assert metrics["stages"]["llm"]["allmrec"]["test"][key] == \
            pytest.approx(expected["stages"]["llm"]["allmrec"]["test"][key])


def test_a_cosine_schedule_steps_each_stage_at_its_place_in_the_stage(run):
    """Stages 1 and 2 each ramp up and fall along their own half cosine from their own lr (the schedule's
    reference formula: tests/test_train.py). The module's config sets the schedule, so the resumed, Ray and
    deepspeed runs compared with this one step along it too."""
    from test_train import _reference_lr

    log = read_train_log(run)
    for stage in ("align", "llm"):
        lrs = [r["lr"] for r in log if r["kind"] == stage]
        assert len(lrs) >= 4 and lrs == pytest.approx([1e-3 * _reference_lr("cosine", k, len(lrs), 0.2, 0.1)
                                                       for k in range(len(lrs))], rel=1e-6), stage


def test_a_chat_template_trains_and_scores_stage2_on_the_chat_prompt(run, config, tmp_path, capsys):
    """allmrec.chat_template through `cllm4rec train`: a tokenizer without a chat template is refused in one line
    naming the setting; with a Jinja file stages 0-1 repeat the plain run and stage 2 trains on the chat prompt."""
    assert cli(["train", "--config", str(config), "--out", str(tmp_path / "bad"),
                "--allmrec.chat_template", "backbone"]) == 2
    assert "allmrec.chat_template=backbone: the backbone's tokenizer has no chat template" in capsys.readouterr().err
    out = tmp_path / "chat"
    metrics = train(config, out, "--allmrec.chat_template", str(REPO / "configs/chat/chatml-user-turn.jinja"),
                    "--allmrec.generate", "false", "--allmrec.titles_only_baseline", "false",
                    "--allmrec.eval_max_users", "8")
    log, plain = read_train_log(out), read_train_log(run)
    assert [r["loss"] for r in log if r["kind"] == "align"] == [r["loss"] for r in plain if r["kind"] == "align"]
    chat_llm, plain_llm = ([r["loss"] for r in rows if r["kind"] == "llm"] for rows in (log, plain))
    assert len(chat_llm) == len(plain_llm) and chat_llm != pytest.approx(plain_llm, rel=1e-3)
    assert 0 <= metrics["stages"]["llm"]["allmrec"]["test"]["hit@1"] <= 1


def test_export_writes_joint_and_projected_vectors_with_original_ids(run, demo_loo_data, tmp_path):
    from cllm4rec_dist.export.embeddings import read_export

    assert cli(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    manifest, ids, tables = read_export(str(tmp_path / "export"))
    assert manifest["source"]["recommender"] == "allmrec"
    id_maps = json.loads((Path(demo_loo_data) / "id_maps.json").read_text())
    assert ids["items"] == [str(x) for x in id_maps["items"]] and ids["users"] == [str(x) for x in id_maps["users"]]
    assert set(tables["items"]) == {"cf", "joint", "projected"} and set(tables["users"]) == {"cf", "projected"}
    assert tables["items"]["joint"].shape == (len(ids["items"]), 128)
    assert tables["items"]["projected"].shape[1] == tables["users"]["projected"].shape[1] == 64  # LLM hidden
    assert np.isfinite(tables["items"]["projected"]).all()


def test_ray_launcher_runs_stage2_data_parallel_and_matches_the_single_process_run(run, config, tmp_path):
    out = tmp_path / "ray"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "launchers/pretrain_llama.py", "--config", str(config), "--out", str(out),
                           "--dist.num_workers", "2",
                           # the evaluation is the single-process run's (tested there): 10 users, scored only
                           "--allmrec.generate", "false", "--allmrec.titles_only_baseline", "false",
                           "--allmrec.eval_max_users", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    reference, log = read_train_log(run), read_train_log(out)
    assert [r["global_step"] for r in log] == [r["global_step"] for r in reference]
    for mine, ref in zip(log, reference):
        # 2 workers with ZeRO-averaged gradients == one process accumulating 2 micro-batches (gloo sums in
        # another order, hence the tolerance); stage 1 runs replicated on both workers.
        assert mine["kind"] == ref["kind"] and mine["loss"] == pytest.approx(ref["loss"], rel=1e-4), (mine, ref)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"]["llm"]["allmrec"]["test"]["users"] == 10
    assert (out / "export" / "export.json").exists()


def test_deepspeed_launcher_runs_allmrec_like_the_single_process_run(run, config, tmp_path):
    """`deepspeed launchers/finetune.py` with an allmrec config: two torch.distributed processes (CPU accelerator,
    gloo), DeepSpeed ZeRO over F_U/F_I; the same per-step losses as one process standing in for two ranks, the
    logged scalars all-reduced once per epoch (log_every 1000), and the launcher's export at the end."""
    out = tmp_path / "deepspeed"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner",
                           "--master_port", str(free_port()), "--num_gpus", "2",
                           "launchers/finetune.py",
                           "--config", str(config), "--out", str(out), "--allmrec.generate", "false",
                           "--allmrec.titles_only_baseline", "false", "--allmrec.eval_max_users", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    reference, log = read_train_log(run), read_train_log(out)
    assert [r["global_step"] for r in log] == [r["global_step"] for r in reference]
    for mine, ref in zip(log, reference):
        assert mine["kind"] == ref["kind"] and mine["loss"] == pytest.approx(ref["loss"], rel=1e-4), (mine, ref)
    assert "world 2" in proc.stdout + proc.stderr
    assert json.loads((out / "timing.json").read_text())["rank0"]["counts"]["log_reduce"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"]["llm"]["allmrec"]["test"]["users"] == 10
    manifest = json.loads((out / "export" / "export.json").read_text())
    assert manifest["source"]["recommender"] == "allmrec"


def test_train_command_builds_the_embedded_demo_dataset_it_is_pointed_at(tmp_path, monkeypatch):
    """`cllm4rec train --config configs/allmrec-demo.yaml` on a fresh checkout: `shards/demo-loo` is built first, by
    the function the Ray launcher uses, into the project's shards/ (here a stand-in project folder)."""
    from cllm4rec_dist import resources
    from cllm4rec_dist.corpus.preprocess import demo_dataset
    from cllm4rec_dist.data.demo import DemoConfig

    project, work, out = tmp_path / "project", tmp_path / "work", tmp_path / "run"
    work.mkdir()
    monkeypatch.setattr(resources, "PROJECT_ROOT", str(project))  # where demo_data_dir puts the embedded demos
    monkeypatch.chdir(work)  # no shards/demo-loo in the working directory
    result = train(REPO / "configs" / "allmrec-demo.yaml", out, "--max_steps", "1", "--allmrec.cf_epochs", "1")
    assert result == {}  # stopped after one step: no metrics.json

    built = project / "shards" / "demo-loo"
    data = SequentialData.open(str(built))
    assert data.num_users == DemoConfig().num_users and data.candidates["test"]  # leave-one-out, with candidates
    assert yaml_data(out / "config.yaml") == str(built)  # the run trained on it
    assert [r["global_step"] for r in read_train_log(out) if r["kind"] == "align"] == [1]
    manifest = (built / "manifest.json").stat().st_mtime_ns
    assert demo_dataset("shards/demo-loo") == str(built) and (built / "manifest.json").stat().st_mtime_ns == manifest
    assert demo_dataset("shards/elsewhere") == "shards/elsewhere"  # anything but the demo names is left alone


def yaml_data(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["data"]
