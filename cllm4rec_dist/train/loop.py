"""The training loop both recommenders share: the steps of one schedule block, logging and checkpoint cadence.

A recommender's trainer brings what differs (recorded in ``StepRunner``): the step itself (``train_step(kind)``),
what each step logs, and the schedule; this loop owns when the log is flushed (every ``log_every`` global steps and
at block ends), when a checkpoint is saved (every ``checkpoint_every`` steps, else at block ends as
``checkpoint_interval_s`` says) and the ``max_steps`` stop. Every rank runs the same loop in lockstep, so the
collective flushes and checkpoints happen at the same steps on all of them.

A diverged run stops: each flush hands every logged loss (averaged over the ranks: the same numbers on every rank)
to ``check_loss``, which raises ``NonFiniteLossError`` at the first NaN or infinite one, on every rank at the same
step, before anything of the step is logged, checkpointed or validated. No device sync is added: the losses are
read where the log reads them anyway (every ``log_every`` steps, at block ends and before each checkpoint).
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

from cllm4rec_dist.errors import UserError


class NonFiniteLossError(UserError):
    """A step's loss is NaN or infinite: the run diverged (a learning rate too large, broken data); it stops with
    one line naming the step, its kind, the loss and what to do, and writes no metrics."""


def check_loss(loss: float, step: int, kind: str, lr: float | None = None, lr_setting: str = "",
               unit: str = "step", what: str = "averaged over the ranks") -> None:
    """Raise ``NonFiniteLossError`` when ``loss`` is NaN or infinite: the loss of ``unit`` ``step`` of ``kind``
    (``what`` it is: by default a step's loss averaged over the ranks); ``lr`` / ``lr_setting``: its learning rate
    and the setting that sets it, named in the message."""
    if math.isfinite(loss):
        return
    at = f" at lr {lr:g}" if lr is not None else ""
    setting = f" ({lr_setting})" if lr_setting else ""
    raise NonFiniteLossError(
        f"{unit} {step} ({kind} {unit}{at}): the loss is {loss} ({what}): training diverged and stopped there "
        f"without writing metrics; lower the learning rate{setting} or check the data (NaN or infinite values), "
        "then start over with another --out (or resume with --allow_config_change true).")


class StepRunner(Protocol):
    """What the loop needs of a trainer."""

    cfg: Any
    """The training config: ``log_every``, ``checkpoint_every``, ``max_steps``, ``checkpoint_interval_s``."""
    state: Any
    """The position: ``step`` (in the block) and ``global_step``, advanced here."""

    def train_step(self, kind: str) -> dict: ...

    def record_step(self, kind: str, seconds: float, out: dict) -> None:
        """Keep the step's logged values until the next flush (nothing here waits for the device)."""
        ...

    def flush_log(self) -> None: ...

    def save_checkpoint(self) -> None: ...


def run_block_steps(runner: StepRunner, kinds: tuple[str, ...]) -> bool:
    """Run the block's remaining steps (from ``state.step``; ``kinds[k]`` is step k's kind); False when
    ``max_steps`` stopped it first (the caller checkpoints and returns)."""
    cfg, state = runner.cfg, runner.state
    while state.step < len(kinds):
        if cfg.max_steps and state.global_step >= cfg.max_steps:
            return False
        kind = kinds[state.step]
        start = time.perf_counter()
        out = runner.train_step(kind)
        state.step += 1
        state.global_step += 1
        runner.record_step(kind, time.perf_counter() - start, out)
        if state.global_step % cfg.log_every == 0:
            runner.flush_log()
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            runner.save_checkpoint()
    runner.flush_log()
    return True


def block_end_checkpoint_due(cfg, last: bool, clock) -> bool:
    """Whether a checkpoint is saved at a block's end: without ``checkpoint_every``, at the schedule's last block or
    when ``checkpoint_interval_s`` has passed since the last one (``clock``: train/checkpoint.py CheckpointClock)."""
    return not cfg.checkpoint_every and (last or clock.due())
