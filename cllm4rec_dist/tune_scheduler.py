"""What of a search's own progress survives a killed `cllm4rec tune`: ASHA's rungs and stop decisions, and the
search's clock.

Ray Tune resumes a search from its experiment state: the trials (their values, status and results so far) and
the searcher (which values come next). The scheduler is not part of that state: `Tuner.restore` unpickles the
object the search started with, whose rungs are empty. A resumed ASHA would then compare the remaining trials
against fewer records than the uninterrupted search, and let a trial that it had already stopped run on, since
the experiment state is saved every few seconds, but the scheduler decides at every result.

This scheduler writes its rungs and its stop decisions to a JSON file after every decision, and reads them back
when it is created or unpickled. A result that a resumed trial reports again (it replays from its own last
checkpoint) finds its rung already recorded and changes nothing. A trial stopped before the kill is stopped again
at the same epoch.

``SearchClock`` (a Tune callback) keeps the search's wall time over all the runs it took, in a JSON file written
at every result: a resumed search adds its own time to what the interrupted runs had spent up to their last
result (the time after it, whose work the resume redoes, is not counted).
"""

from __future__ import annotations

import json
import os
import time

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

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

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the scheduler the search started with: its rungs come from the file.
        self.__dict__.update(state)
        self._load()


class SearchClock(Callback):
    """``seconds``: the search's wall time so far, earlier (interrupted) runs included; ``runs``: how many runs."""

    def __init__(self, state_path: str):
        self.state_path = state_path
        self.setup()

    def setup(self, **info) -> None:
        # Called when each run of the search starts (Tune restores this object with the search): the clock starts
        # now, on top of what the runs before this one spent.
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
