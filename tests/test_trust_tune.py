"""Trust (issue 32), `cllm4rec tune` through the real command: a resumed search is rebuilt from the search's own
JSON records (`tune.py`), never from Ray Tune's pickled experiment state, which anyone who can write the output
folder can replace. Here: those records are checked before Ray starts. That a planted pickle in Ray's state never
runs is test_tune's interrupted-search test (it plants them before it resumes), which shares that module's
uninterrupted search."""

from __future__ import annotations

import json
import pickle

import pytest
from test_tune import SPEC, TRIAL_SCHEDULE, RunsCode, write

from cllm4rec_dist.cli import main


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
