"""Progress lines, `train_log.jsonl` and TensorBoard scalars, written by rank 0 from reduced values.

The console gets ONE line per block (phase and epoch: loss, tokens/s, validation, ETA) and, after the
first logged steps, the ETA of the whole schedule; the detailed line every `log_every` steps goes to
`<run>/progress.log`, every step's values to `train_log.jsonl` and TensorBoard.

TensorBoard tags: `<kind>/loss`, `<kind>/lm`, `<kind>/mr`, `<kind>/grad_norm`, `<kind>/lr`,
`<kind>/tokens_per_s` for kind in C, L, rec; `valid/recall@20` ...; `test/...`;
`memory/rss_mb` (and `memory/cuda_max_mb` on GPUs). Open with
`tensorboard --logdir <run>/tensorboard`.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported where a value is made: a Ray driver imports this module for CONSOLE_FILE before it needs torch.
CONSOLE_FILE = "console.log"  # the lines meant for the user's console, relayed by the Ray driver
TRAIN_LOG = "train_log.jsonl"
"""One JSON record per optimizer step (global_step, phase, epoch, kind, loss, lm, mr, tokens, ...) in the run folder."""


def read_train_log(run_dir: str | os.PathLike) -> list[dict]:
    """The step records of a run folder's ``train_log.jsonl``, in order."""
    with open(os.path.join(run_dir, TRAIN_LOG), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class PendingSteps:
    """Per-step scalars kept as device tensors until the next flush, then averaged over ranks in ONE all-reduce
    (so a step never waits for the device or the network to log). Every rank must flush at the same steps (every
    ``log_every`` steps, at block/stage ends and before checkpoints); steps may carry different numbers of values.
    Shared by every recipe's coordinator, whose ``flush_log`` checks each reduced loss (train/loop.py ``check_loss``:
    a NaN or infinite one stops the run, on every rank at the same step, the reduced values being the same)."""

    def __init__(self, device="cpu"):
        self.device = device  # where the values wait and are reduced: the model's device (NCCL reduces on the GPU)
        self.steps: list[tuple[tuple, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, facts: tuple, values) -> None:
        """``facts``: what the monitor needs about the step (plain data); ``values``: its scalars (tensors or
        floats)."""
        import torch

        self.steps.append((facts, torch.stack([
            torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).to(self.device) for v in values])))

    def reduce(self, mean) -> list[tuple[tuple, list[float]]]:
        """(facts, rank-averaged values) of every pending step, oldest first; ``mean``: one all-reduce over a 1-D
        tensor (``Rank.mean``). Empties the buffer; nothing pending: no all-reduce."""
        if not self.steps:
            return []
        import torch

        sizes = [v.numel() for _, v in self.steps]
        flat = mean(torch.cat([v for _, v in self.steps])).tolist()
        out, start = [], 0
        for (facts, _), size in zip(self.steps, sizes):
            out.append((facts, flat[start:start + size]))
            start += size
        self.steps = []
        return out


class Monitor:
    def __init__(self, run_dir: str, is_main: bool, log_every: int = 10, world_size: int = 1,
                 resume_step: int = 0):
        self.is_main = is_main
        self.log_every = max(1, log_every)
        self.world_size = world_size
        self.writer = None
        self.log_path = os.path.join(run_dir, TRAIN_LOG)
        self.started = time.time()
        self.progress_path = os.path.join(run_dir, "progress.log")
        self.console_path = os.path.join(run_dir, CONSOLE_FILE)
        self.tokens_since = 0.0
        self.seconds_since = 0.0
        self.kind_seconds: dict[str, tuple[float, int]] = {}  # step kind -> (seconds, steps) so far
        self.block_totals = [0.0, 0.0, 0.0, 0]  # loss sum, tokens, seconds, steps of the current block
        self.remaining: list[str] = []
        self._last_work_line = 0.0  # work_done's last console line
        self.eta_shown = False
        self.resume_step = resume_step  # where this process started counting steps (0: a new run)
        self.last_valid: dict | None = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step or None)
            self._truncate_log(resume_step)

    def _truncate_log(self, resume_step: int) -> None:
        """On resume, drop log lines past the checkpoint: the resumed run writes them again."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("global_step", 0) <= resume_step]
        with open(self.log_path, "w", encoding="utf-8") as f:
            f.writelines(lines)

    def schedule(self, blocks: list) -> None:
        """The blocks this run will walk (their step kinds give the ETA); prints the plan (rank 0)."""
        self.remaining = [k for b in blocks for k in b.kinds]
        if not self.is_main:
            return
        phases = {}
        for b in blocks:
            phases.setdefault(b.phase, set()).add(b.epoch)
        counts = {k: self.remaining.count(k) for k in dict.fromkeys(self.remaining)}
        self.console("[train] schedule: " + ", ".join(f"{len(e)} {p} epochs" for p, e in phases.items())
                     + f" = {len(blocks)} blocks, {len(self.remaining)} steps ("
                     + ", ".join(f"{n} {k}" for k, n in counts.items()) + f"), "
                     f"{sum(b.evaluate for b in blocks)} validations")

    def console(self, line: str) -> None:
        """A line for the user: printed, appended to <run>/console.log (which the Ray driver relays to its
        console) and kept in <run>/progress.log with the detailed ones."""
        print(line, flush=True)
        with open(self.console_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self.progress(line)

    def progress(self, line: str) -> None:
        with open(self.progress_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def work_done(self, label: str, done: int, total: int, started: float, unit: str = "users",
                  every_s: float = 30.0) -> None:
        """A console line with the ETA of a long piece of work that is not training steps (e.g. an evaluation):
        ``done`` of ``total`` ``unit`` since ``started`` (time.time()); at most one line per ``every_s`` seconds,
        and one at the end (rank 0)."""
        now = time.time()
        if not self.is_main or (done < total and now - self._last_work_line < every_s):
            return
        self._last_work_line = now
        elapsed = now - started
        eta = elapsed / done * (total - done) if done else float("nan")
        self.console(f"{label}: {done}/{total} {unit}, {duration(elapsed)} elapsed, ETA {duration(eta)}")

    def eta_seconds(self, done_steps: int) -> float:
        """Seconds the steps after ``done_steps`` will take at each kind's mean step time so far."""
        known = {k: s / n for k, (s, n) in self.kind_seconds.items() if n}
        if not known:
            return float("nan")
        fallback = sum(s for s, _ in self.kind_seconds.values()) / sum(n for _, n in self.kind_seconds.values())
        return sum(known.get(k, fallback) for k in self.remaining[done_steps:])

    def step(self, global_step: int, block, kind: str, seconds: float, total_steps: int, lr: float,
             values: list[float]) -> None:
        if not self.is_main:
            return
        loss, lm, mr, tokens, grad_norm = values
        tokens *= self.world_size  # tokens were averaged over ranks; report the global count
        self.tokens_since += tokens
        self.seconds_since += seconds
        spent, count = self.kind_seconds.get(kind, (0.0, 0))
        self.kind_seconds[kind] = (spent + seconds, count + 1)
        self.block_totals = [a + b for a, b in zip(self.block_totals, (loss, tokens, seconds, 1))]
        gs = global_step
        record = {"global_step": gs, "phase": block.phase, "epoch": block.epoch, "kind": kind, "loss": loss,
                  "lm": lm, "mr": mr, "tokens": tokens, "grad_norm": grad_norm, "lr": lr, "seconds": seconds}
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        w = self.writer
        for key in ("loss", "lm", "mr", "grad_norm", "lr"):
            w.add_scalar(f"{kind}/{key}", record[key], gs)
        w.add_scalar(f"{kind}/tokens_per_s", tokens / max(seconds, 1e-9), gs)
        if gs % self.log_every == 0 or gs == total_steps:
            import torch

            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            w.add_scalar("memory/rss_mb", rss_mb, gs)
            if torch.cuda.is_available():
                w.add_scalar("memory/cuda_max_mb", torch.cuda.max_memory_allocated() / 2**20, gs)
            self.progress(f"[train] {block.phase} ep {block.epoch} step {gs}/{total_steps} {kind:>3s} "
                          f"loss {loss:.4f} (lm {lm:.4f} mr {mr:.4f}) "
                          f"{_rate(self.tokens_since, self.seconds_since)}elapsed {time.time() - self.started:.0f}s")
            self.tokens_since = self.seconds_since = 0.0
            self.show_schedule_eta(gs)

    def show_schedule_eta(self, global_step: int) -> None:
        """Once, after the first logged steps: how long all the schedule's steps will take, from the step times this
        process measured (a resumed run names how many: its first logged step may be a few after the resume)."""
        if not self.eta_shown:
            self.eta_shown = True
            measured = sum(n for _, n in self.kind_seconds.values())
            since = f" since the resume at step {self.resume_step}" if self.resume_step else ""
            self.console(f"[train] ETA for the whole schedule: {duration(self.eta_seconds(global_step))} of steps "
                         f"(from the {measured} steps run{since}; validations not included)")

    def block_done(self, block, global_step: int, total_steps: int) -> None:
        """The console line of a finished block: its phase and epoch, mean loss, tokens/s, validation, ETA."""
        if not self.is_main:
            return
        self.show_schedule_eta(global_step)
        loss, tokens, seconds, steps = self.block_totals
        self.block_totals = [0.0, 0.0, 0.0, 0]
        kinds = "+".join(dict.fromkeys(block.kinds))
        line = (f"[train] {block.phase} epoch {block.epoch} ({kinds}): step {global_step}/{total_steps} "
                f"loss {loss / max(steps, 1):.4f} {_rate(tokens, seconds)}".rstrip())
        if self.last_valid is not None:
            line += f" | valid recall@20 {self.last_valid.get('recall@20') or 0.0:.4f}"
            self.last_valid = None
        elapsed = time.time() - self.started
        self.console(f"{line} | {duration(elapsed)} elapsed, ETA {duration(self.eta_seconds(global_step))}")

    def evaluation(self, part: str, metrics: dict, global_step: int) -> None:
        """Validation goes onto its block's console line (the full line into progress.log), test onto its own."""
        if not self.is_main:
            return
        for key, value in metrics.items():
            if value is not None and not key.startswith("num_"):
                self.writer.add_scalar(f"{part}/{key}", value, global_step)
        self.writer.flush()
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None and not k.startswith("num_"))
        line = f"[eval] {part} @ step {global_step}: {shown}"
        if metrics.get("num_users") is not None:  # the users the metrics average over (omitted when unknown)
            line += f" ({metrics['num_users']} users)"
        if part == "valid":
            self.last_valid = metrics
            self.progress(line)
        else:
            self.console(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _rate(tokens: float, seconds: float) -> str:
    """"N tok/s " of a console line; nothing for steps that run no tokens (A-LLMRec's stage 1: no LLM)."""
    return f"{tokens / max(seconds, 1e-9):,.0f} tok/s " if tokens > 0 else ""


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 42 -> '42s'."""
    if seconds != seconds:  # nan: nothing timed yet
        return "?"
    seconds = int(round(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
