"""Trust (issue 32), `cllm4rec tune` through the real command: resuming an interrupted search unpickles nothing
from its output folder. Ray Tune's experiment state (``tuner.pkl``, the searcher's and the trials' pickles, the
``experiment_state`` JSON with its embedded cloudpickles) is written there, where anyone who can write the folder
can replace it; a resumed search is rebuilt from the search's own JSON records instead (`tune.py`), so a crafted
pickle in any of those files never runs, and the search still resumes to the trials of the uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from test_tune import SPEC, TRIAL_SCHEDULE, _kill_session, _wait_for, ray_session, tuned, write  # noqa: F401

from cllm4rec_dist.cli import main


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


def test_a_resumed_search_unpickles_nothing_from_its_folder(demo_data, ray_session, tuned, tmp_path):  # noqa: F811
    """The search of test_tune's `tuned` is killed whole (CLI, Ray, trials) after its first trial finished, while
    the second hangs between the checkpoint of its epoch 1 and its report. Every pickle Ray left in OUT/ray is then
    replaced by one that runs code. The same command resumes the search: nothing runs, and every trial's values,
    curve, epochs and stop equal those of the search that was never interrupted."""
    from cllm4rec_dist.tune import PAUSE_ENV

    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsCode(marker))
    pickle.loads(payload)  # sanity: unpickling it WOULD run it
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "out"
    args = ["tune", "--spec", write(tmp_path / "spec.yaml", SPEC), "--data", demo_data, "--out", str(out),
            *TRIAL_SCHEDULE]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({PAUSE_ENV: "00001:1", "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    with open(tmp_path / "console.txt", "w", encoding="utf-8") as console:
        search = subprocess.Popen([sys.executable, "-m", "cllm4rec_dist.cli", *args], env=env,
                                  start_new_session=True, stdout=console, stderr=subprocess.STDOUT)
    paused = out / "trials" / ".paused-00001-at-epoch1"
    _wait_for(paused.exists, "the second trial's epoch 1", search)
    state = out / "ray" / "search"
    _wait_for(lambda: any(f.stat().st_mtime > paused.stat().st_mtime + 1 for f in state.glob("experiment_state*")),
              "Tune's state of the paused trial", search)
    _kill_session(search)
    assert not (out / "tune.json").exists()

    planted = plant_pickles(out / "ray", payload)
    assert "search/tuner.pkl" in planted, planted  # what Tuner.restore unpickles first
    assert any(p.startswith("search/experiment_state") for p in planted), planted
    assert any(p.endswith("params.pkl") for p in planted), planted

    try:
        rc = main(args)
    except Exception as err:  # noqa: BLE001 - the marker is what this test is about; the error comes after it
        rc = err
    assert not marker.exists(), f"resuming the search ran a planted pickle (then: {rc!r})"
    assert rc == 0, rc

    resumed = json.loads((out / "tune.json").read_text(encoding="utf-8"))
    uninterrupted = json.loads(Path(tuned, "tune.json").read_text(encoding="utf-8"))
    assert resumed["budget"]["resumed"] is True and resumed["budget"]["runs"] == 2
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
    with open(out / "trials" / after[1e-7]["trial_id"] / "console.log", encoding="utf-8") as f:
        assert "[train] resumed at step" in f.read()  # the unfinished trial resumed from its own checkpoint


@pytest.mark.parametrize("tamper", ["value", "pickle"])
def test_a_tampered_trial_record_is_refused_in_one_line(demo_data, tmp_path, capsys, monkeypatch, tamper):
    """OUT/trials.json, what a resumed search is rebuilt from, is checked before Ray starts: a value outside the
    space, or a file that is not JSON (a pickle planted there), is one line naming the file, exit status 2."""
    from cllm4rec_dist import tune

    out = tmp_path / "out"
    args = ["tune", "--spec", write(tmp_path / "spec.yaml", SPEC), "--data", demo_data, "--out", str(out),
            *TRIAL_SCHEDULE]
    with monkeypatch.context() as m:  # a search interrupted before Tune ran anything: its records, no Ray folder
        m.setattr(tune, "run_search", lambda *a, **k: None)
        assert main(args) == 1
    record_path = out / "trials.json"
    marker = tmp_path / "pwned"
    if tamper == "value":
        record = json.loads(record_path.read_text(encoding="utf-8"))
        record["trials"][1]["params"]["optim.finetune_lr"] = 0.5
        record_path.write_text(json.dumps(record), encoding="utf-8")
        needle = "trials[1].params.optim.finetune_lr: 0.5 is not a value of choice"
    else:
        record_path.write_bytes(pickle.dumps(RunsCode(marker)))
        needle = "not the trial record of this search"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {record_path}: ") and needle in err[0], err
    assert not marker.exists() and not (out / "ray").exists()  # refused before Ray started
