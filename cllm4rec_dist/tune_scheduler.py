"""What of a search's own progress survives a killed `cllm4rec tune`, in JSON files of our own: the trials planned
and their results (``TrialRecorder``, ``PlannedTrials``), ASHA's rungs and stop decisions (``ResumableASHA``), and
the search's clock (``SearchClock``).

A resumed search never restores Ray Tune's experiment state (``Tuner.restore`` unpickles ``tuner.pkl``, the
searcher's state and the trials' states, which a crafted file in the output folder turns into code execution).
Each run of the search is a new Tune experiment instead, rebuilt from these files (`tune.py`):

* ``PlannedTrials`` feeds Tune the trials that OUT/trials.json planned when the search started, with their ids
  and values; the ones that finished in an earlier run are not run again.
* ``TrialRecorder`` keeps each trial's reported results, whether it finished (returned, or stopped by ASHA) and
  its error in that file, written at every result: a trial killed before it finished starts again in the next run
  and resumes from its own checkpoint folder.
* ``ResumableASHA``: a new scheduler would compare the remaining trials against fewer records than the
  uninterrupted search, and let a trial that it had already stopped run on. This one writes its rungs and its stop
  decisions to a JSON file after every decision, and reads them back when it is created. A result that a resumed
  trial reports again (it replays from its own last checkpoint) finds its rung already recorded and changes
  nothing. A trial stopped before the kill is stopped again at the same epoch.
* ``SearchClock`` (a Tune callback) keeps the search's wall time over all the runs it took, in a JSON file written
  at every result: a resumed search adds its own time to what the interrupted runs had spent up to their last
  result (the time after it, whose work the resume redoes, is not counted).
"""

from __future__ import annotations

import json
import math
import os
import re
import time

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from cllm4rec_dist.atomic import write_json_atomic

STATE_VERSION = 1


class ResumableASHA(AsyncHyperBandScheduler):
    def __init__(self, state_path: str, **asha):
        super().__init__(**asha)
        self.state_path = state_path
        self.stopped_at: dict[str, float] = {}  # trial id -> the time_attr value at which ASHA stopped it
        self._load()

    # ---- decisions ----------------------------------------------------------------------------

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        at = result.get(self._time_attr)
        if trial.trial_id in self.stopped_at and at is not None and at >= self.stopped_at[trial.trial_id]:
            return TrialScheduler.STOP  # decided before the search was interrupted; the rungs already hold it
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and at is not None and at < self._max_t:
            self.stopped_at[trial.trial_id] = at
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    # ---- the state file -----------------------------------------------------------------------

    def _save(self) -> None:
        write_json_atomic(self.state_path, {
            "version": STATE_VERSION, "time_attr": self._time_attr, "max_t": self._max_t,
            "brackets": [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets],
            "stopped_at": self.stopped_at})

    def _load(self) -> None:
        if not os.path.exists(self.state_path):
            return
        with open(self.state_path, encoding="utf-8") as f:
            state = json.load(f)
        layout = [[milestone for milestone, _ in b._rungs] for b in self._brackets]
        saved = [[milestone for milestone, _ in bracket] for bracket in state.get("brackets", [])]
        if state.get("version") != STATE_VERSION or saved != layout or state.get("max_t") != self._max_t:
            raise ValueError(f"{self.state_path}: ASHA state of another budget (rungs {saved}, max_t "
                             f"{state.get('max_t')}; this search: {layout}, {self._max_t}). Resume with the "
                             "budget the search started with, or start a new search in another --out.")
        for bracket, rungs in zip(self._brackets, state["brackets"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self.stopped_at = dict(state.get("stopped_at", {}))


class SearchClock(Callback):
    """``seconds``: the search's wall time so far, earlier (interrupted) runs included; ``runs``: how many runs."""

    def __init__(self, state_path: str):
        self.state_path = state_path
        self.setup()

    def setup(self, **info) -> None:
        # Called when each run of the search starts (a new object in every run): the clock starts now, on top of
        # what the runs before this one spent.
        self.earlier_seconds, self.earlier_runs, self.started = 0.0, 0, time.time()
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
            self.earlier_seconds, self.earlier_runs = float(state["seconds"]), int(state["runs"])

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + time.time() - self.started

    @property
    def runs(self) -> int:
        return self.earlier_runs + 1

    def _save(self) -> None:
        write_json_atomic(self.state_path, {"seconds": round(self.seconds, 1), "runs": self.runs})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._save()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._save()

    def on_experiment_end(self, trials, **info) -> None:
        self._save()


class PlannedTrials(BasicVariantGenerator):
    """Tune's variant generator fed the trials that the search planned (OUT/trials.json): in every run of the
    search the same trial ids (``PREFIX_00000``, ...) with the same values, in the same order; those that finished
    in an earlier run are skipped (their record is final)."""

    def __init__(self, record: dict, max_concurrent: int):
        planned = record["trials"]
        super().__init__(points_to_evaluate=[dict(t["params"]) for t in planned], max_concurrent=max_concurrent)
        self._uuid_prefix = f"{record['prefix']}_"  # Tune's trial ids are this prefix and the trial's index
        self._planned = {t["trial_id"]: t["params"] for t in planned}
        self._skip = {t["trial_id"] for t in planned if t["finished"]}

    def next_trial(self):
        while True:
            trial = super().next_trial()
            if trial is None or trial.trial_id not in self._skip:
                break
            self.on_trial_complete(trial.trial_id)  # finished before: never handed to Tune
        if trial is not None:
            params = self._planned.get(trial.trial_id)
            if params is None or {k: trial.config.get(k) for k in params} != params:
                raise RuntimeError(f"Tune generated trial {trial.trial_id} {trial.config}, not a planned trial "
                                   f"({sorted(self._planned)}): this Ray version names or resolves trials "
                                   "differently than cllm4rec tune expects.")
        return trial


class TrialRecorder(Callback):
    """Each trial's reported results (one per ``time_attr`` value: a resumed trial reports again the epochs since
    its last checkpoint), seconds, whether it finished and its error, in the trial record (OUT/trials.json),
    written at every change. A trial finishes when it returns, when ASHA stops it (its last result is ``done``) or
    when it fails; one that a signal or a kill interrupts does not. ``seconds`` adds the trial's time in this run
    to what it had spent in the earlier runs, up to their last result."""

    def __init__(self, state_path: str, record: dict, time_attr: str, metrics: tuple[str, ...]):
        self.state_path, self.record, self.time_attr, self.metrics = state_path, record, time_attr, metrics
        self._trials = {t["trial_id"]: t for t in record["trials"]}
        self._earlier = {trial_id: float(t["seconds"] or 0.0) for trial_id, t in self._trials.items()}

    def _open(self, trial) -> dict | None:
        t = self._trials.get(trial.trial_id)
        return None if t is None or t["finished"] else t

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        t = self._open(trial)
        at = result.get(self.time_attr)
        if t is None or _plain(at) is None:
            return
        row = {self.time_attr: int(at), **{m: _plain(result.get(m)) for m in self.metrics}}
        t["results"] = sorted([r for r in t["results"] if r[self.time_attr] != row[self.time_attr]] + [row],
                              key=lambda r: r[self.time_attr])
        seconds = _plain(result.get("time_total_s"))
        if seconds is not None:
            t["seconds"] = round(self._earlier[trial.trial_id] + float(seconds), 3)
        t["finished"] = bool(result.get("done"))  # ASHA's stop (or the trial's end) marks its last result done
        self._save()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        t = self._open(trial)
        if t is not None:
            t["finished"] = True
            self._save()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        # Tune keeps the error twice: error.txt and a pickle of the exception, which its ResultGrid would unpickle
        # at the end of the run. The text is all the record needs; Tune is told there is no pickle to read.
        text = ""
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        trial.run_metadata.pickled_error_filename = None
        trial.run_metadata.invalidate_cache()
        t = self._open(trial)
        if t is not None:
            # one line, its end kept (the exception itself follows Ray's traceback), without colour codes
            text = re.sub(r"^Failure # \d+ \(occurred at [^)\n]*\)$|\x1b\[[0-9;]*m", "", text, flags=re.MULTILINE)
            text = " ".join(text.split()) or "the trial failed"
            t["finished"], t["error"] = True, text if len(text) <= 500 else "..." + text[-497:]
            self._save()

    def _save(self) -> None:
        write_json_atomic(self.state_path, self.record)


def _plain(value):
    """A JSON scalar from numpy / pandas values (NaN -> None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
