"""`cllm4rec tune` through the real command: Ray Tune trials on the real training path, ASHA stopping a trial,
a best.yaml that `cllm4rec train` and the Ray launcher's parser take as is, and spec errors before Ray starts."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllm4rec_dist.cli import main

TRIAL_SCHEDULE = ["--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "0",
                  "--schedule.finetune_content_fraction", "0", "--batch.batch_size", "32", "--batch.max_length", "64",
                  "--log_every", "1000", "--projector_sample", "0", "--keep_checkpoints", "1"]
# Sampled with seed 1 the trials are [lr 0.01, lr 1e-7]: one run sequentially after the other, the second learns
# nothing and trails the first at the first rung, so ASHA must stop it after epoch 1 (grace 1, factor 2).
SPEC = """model: cllm4rec
seed: 1
budget: {trials: 2, max_epochs: 3, grace_epochs: 1, reduction_factor: 2, concurrent: 1}
space:
  optim.finetune_lr: {choice: [0.01, 1.0e-7]}
  batch.mask_ratio: {uniform: [0.2, 0.3]}
"""


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for this module's searches (`cllm4rec tune` joins an initialised Ray instead of starting one)."""
    import ray

    from cllm4rec_dist.distributed import stop_local_ray
    from cllm4rec_dist.tune import start_local_ray

    start_local_ray(2)
    yield
    # stop_local_ray kills the autoscaler's monitor itself, ahead of ray.shutdown: no process of the node is left.
    node = ray._private.worker._global_node
    processes = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
    assert "monitor" in processes, sorted(processes)
    stop_local_ray()
    assert not ray.is_initialized()
    assert {kind: [p.poll() for p in procs if p.poll() is None] for kind, procs in processes.items()
            if any(p.poll() is None for p in procs)} == {}


def test_local_ray_workers_run_at_the_commands_priority(ray_session):
    """Ray would start its workers at nice 15: any plain process started beside a search would then take the
    cores from its trials. They run at the niceness of the command instead, with one torch thread each."""
    import ray

    @ray.remote(num_cpus=1)
    def worker_view():
        return os.nice(0), os.environ.get("OMP_NUM_THREADS")

    assert ray.get(worker_view.remote()) == (os.nice(0), "1")


@pytest.fixture(scope="module")
def tuned(demo_data, ray_session, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tune")
    out = str(root / "out")
    assert main(["tune", "--spec", write(root / "spec.yaml", SPEC), "--data", demo_data, "--out", out,
                 *TRIAL_SCHEDULE]) == 0
    return out


def test_asha_stops_the_trailing_trial_and_best_is_chosen_on_validation(tuned):
    from ray.tune import ExperimentAnalysis

    # Tune's own record of the experiment, not ours.
    frames = ExperimentAnalysis(os.path.join(tuned, "ray", "search")).trial_dataframes
    epochs = sorted(int(frame["epoch"].max()) for frame in frames.values())
    assert epochs == [1, 3], epochs  # the lr-1e-7 trial was stopped at the first rung, the other ran to max_t
    with open(os.path.join(tuned, "tune.json"), encoding="utf-8") as f:
        summary = json.load(f)
    by_lr = {t["params"]["optim.finetune_lr"]: t for t in summary["trials"]}
    assert by_lr[1e-7]["stopped_early"] and by_lr[1e-7]["epochs_run"] == 1
    assert not by_lr[0.01]["stopped_early"] and by_lr[0.01]["epochs_run"] == 3
    assert summary["best"]["params"]["optim.finetune_lr"] == 0.01
    assert summary["best"]["valid_recall@20"] == max(c["valid_recall@20"] for c in by_lr[0.01]["curve"])
    assert summary["budget"]["epoch_budget"] == 6 and summary["budget"]["epochs_run"] == 4
    # Trials never score test: no trial run folder has test metrics.
    for trial in os.listdir(os.path.join(tuned, "trials")):
        assert not os.path.exists(os.path.join(tuned, "trials", trial, "metrics.json"))
    assert open(os.path.join(tuned, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_trial_keeps_its_best_weights_for_testing_after_the_search(tuned, capsys):
    """Tune ends a trial as soon as it reports its last epoch (max epochs, or an ASHA stop): its best weights
    are checkpointed before that report, so `cllm4rec evaluate` on the trial folder re-scores the very model the
    search selected (its best validation Recall@20 and step) and then tests it once."""
    from cllm4rec_dist.evaluate_run import evaluate_checkpoint

    with open(os.path.join(tuned, "tune.json"), encoding="utf-8") as f:
        summary = json.load(f)
    for trial in summary["trials"]:
        folder = os.path.join(tuned, "trials", trial["trial_id"])
        result = evaluate_checkpoint(folder, parts=("valid",))
        assert result["weights"] == "best" and result["best"]["epoch"] + 1 == trial["best_epoch"]
        assert result["valid"]["recall@20"] == pytest.approx(trial["valid_recall@20"], abs=1e-6)
    best = os.path.join(tuned, "trials", summary["best"]["trial_id"])
    assert main(["evaluate", "--checkpoint", best, "--part", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["recall@20"] > 0


def test_best_yaml_trains_as_is_and_the_launcher_reads_it(tuned, tmp_path):
    from cllm4rec_dist.config import load_config
    from cllm4rec_dist.launch import parse

    best = os.path.join(tuned, "best.yaml")
    cfg = load_config(best)
    assert cfg.optim.finetune_lr == 0.01 and cfg.schedule.finetune_epochs == 3 and cfg.ablation == "none"
    assert 0.2 <= cfg.batch.mask_ratio <= 0.3
    launcher_cfg, _ = parse("launcher", ["--config", best])
    assert launcher_cfg == cfg
    run = str(tmp_path / "run")
    assert main(["train", "--config", best, "--out", run]) == 0
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["valid"]["recall@20"] > 0 and "test" in metrics


def test_prerec_trial_is_one_validation_of_the_pretrained_model(demo_data, ray_session, tmp_path):
    """LLM-PreRec validates once, after its last pretraining epoch: one validated unit of one planned, not
    "pretraining epochs of max_epochs, stopped by ASHA"."""
    spec = write(tmp_path / "prerec.yaml", "model: prerec\nbudget: {trials: 1, max_epochs: 3, grace_epochs: 1, "
                                           "concurrent: 1}\nspace:\n  optim.pretrain_lr: {choice: [0.003]}\n")
    out = str(tmp_path / "prerec")
    schedule = [*TRIAL_SCHEDULE, "--schedule.pretrain_epochs", "2"]
    assert main(["tune", "--spec", spec, "--data", demo_data, "--out", out, *schedule]) == 0
    with open(os.path.join(out, "tune.json"), encoding="utf-8") as f:
        trial, = json.load(f)["trials"]
    assert (trial["epochs_run"], trial["epochs_planned"], trial["stopped_early"]) == (1, 1, False)
    assert trial["valid_recall@20"] > 0 and trial["error"] is None


def test_baseline_is_tuned_with_the_same_trial_count(demo_data, ray_session, tmp_path):
    spec = write(tmp_path / "ease.yaml", "model: ease\nbudget: {trials: 2, max_epochs: 3, concurrent: 2}\n"
                                         "space:\n  lambdas: {loguniform: [1.0, 1000.0]}\n")
    out = str(tmp_path / "ease")
    assert main(["tune", "--spec", spec, "--data", demo_data, "--out", out]) == 0
    with open(os.path.join(out, "tune.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert len(summary["trials"]) == 2 and all(t["epochs_run"] == 1 for t in summary["trials"])
    import yaml

    with open(os.path.join(out, "best.yaml"), encoding="utf-8") as f:
        best = yaml.safe_load(f)
    assert best["baseline"] == "ease" and best["settings"]["lambdas"] == [summary["best"]["params"]["lambdas"]]
    # The report runs EASE at the tuned λ (and only there), and refuses a config tuned for another model.
    report = str(tmp_path / "report")
    assert main(["report", "--data", demo_data, "--out", report, "--models", "ease",
                 "--model-config", f"ease={out}/best.yaml"]) == 0
    with open(os.path.join(report, "report.json"), encoding="utf-8") as f:
        (run,) = json.load(f)["models"]["ease"]["runs"]
    assert run["selected"]["lambda"] == summary["best"]["params"]["lambdas"]
    assert run["valid"]["recall@20"] == pytest.approx(summary["best"]["valid_recall@20"])
    assert main(["report", "--data", demo_data, "--out", report, "--models", "multivae",
                 "--model-config", f"multivae={out}/best.yaml"]) == 2


def _kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL every process of the leader's session at once (the CLI, Ray's daemons, the trial workers, which
    Ray puts in process groups of their own), as when the node running a search is lost."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader.pid:
                proc.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            pass
    leader.wait(timeout=60)


class RunsCode:
    """Unpickling this calls os.system: what a hostile experiment state would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickles(folder: Path, payload: bytes) -> list[str]:
    """Replace every file under ``folder`` that Ray Tune unpickles when it restores an experiment: ``*.pkl``
    (tuner.pkl, the trials' params.pkl / error.pkl), the searcher's state (``basic-variant-state-*.json`` and
    ``searcher-state-*``, pickles despite their names) and ``experiment_state-*.json`` (JSON whose values Ray
    decodes with cloudpickle: here the whole document is one such value)."""
    planted = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.name
        if name.endswith(".pkl") or name.startswith(("basic-variant-state", "searcher-state")):
            path.write_bytes(payload)
        elif name.startswith("experiment_state") and name.endswith(".json"):
            path.write_text(json.dumps({"_type": "CLOUDPICKLE_FALLBACK", "value": payload.hex()}))
        else:
            continue
        planted.append(str(path.relative_to(folder)))
    return planted


def _wait_for(condition, what: str, leader: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if leader.poll() is not None:
            raise AssertionError(f"the search ended (rc {leader.returncode}) before {what}")
        if time.monotonic() > deadline:
            _kill_session(leader)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("stop", ["kill", "ctrl-c"])
def test_an_interrupted_search_resumes_to_the_uninterrupted_searchs_trials(demo_data, ray_session, tuned, tmp_path,
                                                                           capsys, stop):
    """The search of `tuned`, interrupted after its first trial finished, while the second hangs between the
    checkpoint of its epoch 1 and its report: killed whole (CLI, Ray, trials, as a lost node), or stopped by
    Ctrl-C (Tune stops the trials and the command says how to resume). The same command then resumes it from
    the search's own records (OUT/trials.json, asha.json, clock.json; Ray's pickled state is never read): the
    finished trial is kept; the second resumes from its checkpoint and reports epoch 1 again; ASHA, which kept
    the first trial's rungs, stops it there as before. Every trial's curve, epochs and stop equal those of the
    search that was never interrupted.

    Trust (issue 32): before resuming, every pickle Ray left in OUT/ray is replaced by one that runs code (anyone
    who can write the folder can do that): nothing runs, since the search is rebuilt from its JSON records."""
    from cllm4rec_dist.tune import PAUSE_ENV

    pwned = tmp_path / "pwned"
    payload = pickle.dumps(RunsCode(pwned))
    pickle.loads(payload)  # sanity: unpickling it WOULD run it
    assert pwned.exists()
    pwned.unlink()

    spec = write(tmp_path / "spec.yaml", SPEC)
    out = str(tmp_path / "out")
    args = ["tune", "--spec", spec, "--data", demo_data, "--out", out, *TRIAL_SCHEDULE]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({PAUSE_ENV: "00001:1", "TUNE_GLOBAL_CHECKPOINT_S": "1"})  # Tune saves its state every second
    console = open(tmp_path / "console.txt", "w+", encoding="utf-8")
    search = subprocess.Popen([sys.executable, "-m", "cllm4rec_dist.cli", *args], env=env, start_new_session=True,
                              stdout=console, stderr=subprocess.STDOUT)
    marker = os.path.join(out, "trials", ".paused-00001-at-epoch1")
    _wait_for(lambda: os.path.exists(marker), "the second trial's epoch 1", search)
    paused = os.path.getmtime(marker)

    def states():
        return [os.path.join(out, "ray", "search", f) for f in os.listdir(os.path.join(out, "ray", "search"))
                if f.startswith("experiment_state")]

    _wait_for(lambda: any(os.path.getmtime(f) > paused + 1 for f in states()), "Tune's state of the paused trial",
              search)
    if stop == "ctrl-c":
        search.send_signal(signal.SIGINT)
        search.wait(timeout=180)
        said = (tmp_path / "console.txt").read_text(encoding="utf-8")
        assert search.returncode == 1 and "1 of 2 trials finished" in said and "run the same command again" in said
    _kill_session(search)
    assert not os.path.exists(os.path.join(out, "tune.json"))
    planted = plant_pickles(Path(out, "ray"), payload)
    assert "search/tuner.pkl" in planted, planted  # what Tuner.restore unpickles first
    assert any(p.startswith("search/experiment_state") for p in planted), planted
    assert any(p.endswith("params.pkl") for p in planted), planted

    with open(os.path.join(out, "clock.json"), encoding="utf-8") as f:
        clock = json.load(f)  # the interrupted run's time up to its last result
    assert clock["runs"] == 1 and clock["seconds"] > 0
    resume_started = time.time()
    try:
        rc = main(args)
    except Exception as err:  # noqa: BLE001 - the marker is what this test is about; the error comes after it
        rc = err
    resume_seconds = time.time() - resume_started
    assert not pwned.exists(), f"resuming the search ran a planted pickle (then: {rc!r})"
    assert rc == 0, rc
    assert f"[tune] resuming the interrupted search in {out}" in capsys.readouterr().out
    with open(os.path.join(out, "tune.json"), encoding="utf-8") as f:
        resumed = json.load(f)
    with open(os.path.join(tuned, "tune.json"), encoding="utf-8") as f:
        uninterrupted = json.load(f)
    assert resumed["budget"]["resumed"] is True and uninterrupted["budget"]["runs"] == 1
    # The search's wall time is both runs': the interrupted one's, plus the resuming one's (less its Ray start).
    assert resumed["budget"]["runs"] == 2
    assert clock["seconds"] < resumed["budget"]["wall_seconds"] <= clock["seconds"] + resume_seconds + 0.1
    lr = "optim.finetune_lr"
    after = {t["params"][lr]: t for t in resumed["trials"]}
    assert len(after) == len(uninterrupted["trials"]) == 2
    for trial in uninterrupted["trials"]:
        again = after[trial["params"][lr]]
        assert again["params"] == trial["params"]  # the same sampled values, to the last bit
        assert (again["epochs_run"], again["stopped_early"], again["best_epoch"], again["error"]) == \
            (trial["epochs_run"], trial["stopped_early"], trial["best_epoch"], None)
        assert [c["epoch"] for c in again["curve"]] == [c["epoch"] for c in trial["curve"]]
        for c_again, c in zip(again["curve"], trial["curve"]):
            assert c_again == pytest.approx(c, abs=1e-9)
    second = os.path.join(out, "trials", after[1e-7]["trial_id"], "console.log")
    with open(second, encoding="utf-8") as f:
        assert "[train] resumed at step" in f.read()  # the trial itself resumed, not a restart from scratch
    assert main(args) == 2  # a finished search is not run again into its own folder
    assert "holds a finished search" in capsys.readouterr().err


def test_an_interrupted_search_resumes_only_with_its_own_settings(demo_data, tmp_path):
    from cllm4rec_dist.config import ConfigError, TrainConfig
    from cllm4rec_dist.tune import begin_or_resume, load_spec

    spec = load_spec(write(tmp_path / "spec.yaml", SPEC))
    out = str(tmp_path / "out")
    os.makedirs(out)
    assert begin_or_resume(spec, TrainConfig(data=demo_data), out) is False  # new: records search.json
    open(os.path.join(out, "asha.json"), "w").close()  # rungs of trials that Tune's state never recorded
    assert begin_or_resume(spec, TrainConfig(data=demo_data), out) is False  # no Tune state yet: starts again
    assert not os.path.exists(os.path.join(out, "asha.json"))
    with pytest.raises(ConfigError, match=r"records \(optim.finetune_lr: 0.0001 -> 0.5\)"):
        begin_or_resume(spec, TrainConfig(data=demo_data, optim=dataclasses.replace(TrainConfig().optim,
                                                                                      finetune_lr=0.5)), out)
    with pytest.raises(ConfigError, match=r"spec.budget.trials: 2 -> 3"):
        begin_or_resume(dataclasses.replace(spec, budget=dataclasses.replace(spec.budget, trials=3)),
                        TrainConfig(data=demo_data), out)

    # What a resumed trial's checkpoint may differ in, the search may too: the dataset moved to another folder
    # (same content), logging, and settings an older cllm4rec did not have.
    moved = str(tmp_path / "moved-data")
    shutil.copytree(demo_data, moved)
    record_path = tmp_path / "out" / "search.json"
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    del record["base_config"]["eval"]["batch_size"], record["base_config"]["optim"]["grad_clip"]
    write(record_path, json.dumps(record))
    assert begin_or_resume(spec, TrainConfig(data=moved, log_every=3), out) is False

    # ... but not other data behind the same path (the search record keeps the dataset's content hash).
    record["dataset"] = "0" * 64
    write(record_path, json.dumps(record))
    with pytest.raises(ConfigError, match=r"the dataset at data: content hash 0{64} -> [0-9a-f]{64}"):
        begin_or_resume(spec, TrainConfig(data=demo_data), out)


@pytest.mark.parametrize("space, message", [
    ("batch.mask_ratio: {uniform: [0.1, 1.5]}", "space.batch.mask_ratio: the value 1.5 is refused"),
    ("optim.finetune_rate: {loguniform: [1.0e-4, 1.0e-2]}", "space.optim.finetune_rate: not a training setting"),
    ("batch.seed: {choice: [0, 1]}", "space.batch.seed: not a hyperparameter"),
    ("schedule.finetune_epochs: {choice: [2, 9]}", "above budget.max_epochs (4)"),
    ("optim.finetune_lr: {loguniform: [0, 1]}", "low 0 must be > 0"),
])
def test_bad_spec_is_one_line_naming_the_file_and_field(demo_data, tmp_path, capsys, space, message):
    spec = write(tmp_path / "spec.yaml", f"model: cllm4rec\nbudget: {{max_epochs: 4}}\nspace:\n  {space}\n")
    assert main(["tune", "--spec", spec, "--data", demo_data, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec}: ") and message in err, err
    assert not os.path.exists(tmp_path / "o" / "ray")  # refused before Ray started
