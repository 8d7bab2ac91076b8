"""The coordinator: runs the schedule's blocks step by step on one rank, the same code on 1 or N ranks.

What differs between the single-process reference and a distributed worker is
only what is passed in: the engines (torch Adam vs DeepSpeed ZeRO), the rank and
world size, and the checkpoint sink. A single process can also stand in for W
ranks exactly (``accumulate=W``: W micro-batches per step, gradients averaged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.eval.metrics import selection_score
from cllm4rec_dist.recommenders.cllm4rec.batches import CorpusBatches
from cllm4rec_dist.recommenders.cllm4rec.evaluate import evaluate_model
from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss, l_step_loss, rec_step_loss
from cllm4rec_dist.recommenders.cllm4rec.schedule import Block, phase_positions
from cllm4rec_dist.train.checkpoint import CheckpointClock, CheckpointError, capture_rng, load_trainable, restore_rng
from cllm4rec_dist.train.loop import block_end_checkpoint_due, check_loss, run_block_steps
from cllm4rec_dist.train.lr_schedule import lr_factor
from cllm4rec_dist.train.monitor import PendingSteps
from cllm4rec_dist.train.rank import Rank
from cllm4rec_dist.train.timing import PhaseTimer

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig

LOSSES = {"L": l_step_loss, "C": c_step_loss, "rec": rec_step_loss}
ENGINE_OF = {"L": "collab", "C": "content", "rec": "collab"}
SHARED_GROUP = "backbone"  # stepped in EVERY step kind beside ENGINE_OF's engine, which runs the backward: LoRA
# adapters, or the whole backbone for LLM-FtAll / LLM-Scratch
SCALARS = ("loss", "lm", "mr", "tokens")
LOGGED = (*SCALARS, "grad_norm")  # per-step values, all-reduced every log_every steps


@dataclass
class TrainerState:
    """Everything about the coordinator's position that a checkpoint must restore."""

    block: int = 0
    step: int = 0                      # step within the block
    global_step: int = 0
    counters: dict = field(default_factory=lambda: {"L": 0, "C": 0, "rec": 0})  # steps run per kind = data position
    best: dict = field(default_factory=dict)      # best validation record
    evals: list = field(default_factory=list)     # every validation result
    finished: bool = False


class Trainer:
    def __init__(self, cfg: TrainConfig, model, engines: dict, batches: dict[str, list[CorpusBatches]],
                 blocks: list[Block], eval_docs: list[dict], space: TokenSpace, rank: Rank, sink, logger,
                 cold_items: list[int] = (), timer: PhaseTimer | None = None):
        self.cfg, self.model, self.engines, self.batches = cfg, model, engines, batches
        self.blocks, self.eval_docs, self.space, self.r = blocks, eval_docs, space, rank
        self.phase_positions = phase_positions(blocks)  # each block's place in its phase: the lr schedule's input
        self.cold_items = list(cold_items)  # items held out of training (protocol.cold_item_fraction)
        self.sink = sink        # checkpoint writer/reader (train/checkpoint.py)
        self.log = logger       # progress lines + TensorBoard (train/monitor.py)
        self.projector = None   # rank 0: TensorBoard embedding projector (train/projector.py)
        self.state = TrainerState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.restored_config: dict | None = None
        self.device = model.item_head_weight().device
        self.unlogged = PendingSteps(self.device)  # (step facts, LOGGED values on the device) until the next flush
        self.timer = timer or PhaseTimer()  # wall time of steps, validations, checkpoints, test (timing.json)
        self.checkpoint_clock = CheckpointClock(cfg.checkpoint_interval_s)
        # Called with each validation record (Ray Tune reports from here: tune.py). A resumed run first calls it
        # again with the validations it restored: the listener may have missed the last ones (a run killed
        # between its checkpoint and its report) and must ignore what it already heard.
        self.on_validation = None
        # tune.py: a validation that improves the best is checkpointed before on_validation hears of it, so a
        # trial that Tune ends right there (max epochs, an ASHA stop) leaves its best weights on disk
        self.checkpoint_new_best = False
        self.score_test = True     # False: finish() stops at validation (tuning never looks at test)
        self.block: Block | None = None  # the block being run, and the schedule's step count (for the log)
        self.total = 0

    # ---- one step ----------------------------------------------------------------------------

    def train_step(self, kind: str, regularize: bool | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step of kind 'L', 'C' or 'rec': batch -> loss -> backward -> update
        (``regularize=False``: without the mutual regularisation; None: as the current block says: the paper's
        warm-up trains the content LLM alone, with no prior toward the random collaborative tables).

        Returns the LOGGED scalars as device tensors: nothing here waits for the device."""
        if regularize is None:
            regularize = self.block is None or self.block.phase != "warmup" or self.cfg.schedule.warmup_mr
        self.set_step_lr()
        streams = self.batches[kind]  # this rank's partition (several when standing in for several ranks)
        epoch, step = divmod(self.state.counters[kind], streams[0].steps_per_epoch)
        engine = self.engines[ENGINE_OF[kind]]
        backbone = self.engines.get(SHARED_GROUP)  # LoRA adapters, LLM-FtAll, LLM-Scratch only
        totals = dict.fromkeys(SCALARS, 0.0)
        for stream in streams:
            batch = stream.batch(epoch, step).to(self.device)
            out = LOSSES[kind](self.model, batch, regularize=regularize)
            engine.backward(out["loss"] / len(streams))
            for key in SCALARS:
                totals[key] = totals[key] + torch.as_tensor(out[key]).detach() / len(streams)
        totals["grad_norm"] = engine.step()
        if backbone is not None:
            backbone.step()
        self.state.counters[kind] += 1
        return totals

    # ---- the schedule ------------------------------------------------------------------------

    def phase_lr(self, block: Block) -> float:
        return self.cfg.optim.finetune_lr if block.phase == "finetune" else self.cfg.optim.pretrain_lr

    def set_step_lr(self) -> None:
        """Every engine at the current step's rate: the phase's lr times optim.lr_schedule's factor at the step's
        place in its phase (constant without warm-up: the phase's lr, as enter_block set it)."""
        if self.state.block >= len(self.blocks):
            return  # a step outside the schedule (a test's, after the last block): the rates stay
        o = self.cfg.optim
        before, steps = self.phase_positions[self.state.block]
        lr = self.phase_lr(self.blocks[self.state.block]) * lr_factor(
            o.lr_schedule, before + self.state.step, steps, o.lr_warmup_fraction, o.min_lr_ratio)
        for engine in self.engines.values():
            engine.set_lr(lr)

    def enter_block(self, block: Block) -> None:
        """Set learning rates for the block's phase; entering finetuning starts a fresh rec optimizer."""
        lr = self.phase_lr(block)
        previous = self.blocks[self.state.block - 1].phase if self.state.block > 0 else None
        for name, engine in self.engines.items():
            if name == "collab" and block.phase == "finetune" and previous != "finetune":
                engine.reset_optimizer(lr)  # rec-step Adam state never mixes with L-step state
            else:
                engine.set_lr(lr)

    def train(self) -> dict:
        cfg = self.cfg
        total = sum(b.steps for b in self.blocks)
        self.log.schedule(self.blocks)
        if self.on_validation is not None:
            for record in list(self.state.evals):  # restored by a resume; none in a fresh run
                self.on_validation(record)
        while self.state.block < len(self.blocks):
            block = self.blocks[self.state.block]
            if self.state.step == 0:
                self.enter_block(block)
            self.block, self.total = block, total
            if not run_block_steps(self, block.kinds):
                return self.stop("max_steps reached")
            record, improved = self.validate(block) if block.evaluate else (None, False)
            self.log.block_done(block, self.state.global_step, total)
            self.state.block += 1
            self.state.step = 0
            last = self.state.block == len(self.blocks)
            if block_end_checkpoint_due(cfg, last, self.checkpoint_clock) or (improved and self.checkpoint_new_best):
                self.save_checkpoint()
            if record is not None and self.on_validation is not None:
                self.on_validation(record)  # after the checkpoint: Ray Tune may end a trial as soon as it hears
        return self.finish()

    def record_step(self, kind: str, seconds: float, out: dict) -> None:
        self.timer.add("train_steps", seconds)
        self.unlogged.add((self.state.global_step, self.block, kind, seconds, self.total,
                           self.engines[ENGINE_OF[kind]].lr), [out[k] for k in LOGGED])

    def flush_log(self) -> None:
        """Hand the steps not yet logged to the monitor, averaged over ranks in ONE all-reduce.

        Every rank calls this at the same steps (every log_every steps, block ends, checkpoints). A NaN or
        infinite loss stops the run here (train/loop.py ``check_loss``), on every rank at the same step (the values
        are the same all-reduced numbers), before the step is logged, validated or checkpointed."""
        if self.unlogged:
            with self.timer.phase("log_reduce"):
                for facts, row in self.unlogged.reduce(self.r.mean):
                    global_step, block, kind, _, _, lr = facts
                    setting = "optim.finetune_lr" if block.phase == "finetune" else "optim.pretrain_lr"
                    check_loss(row[LOGGED.index("loss")], global_step, kind, lr, setting)
                    self.log.step(*facts, row)

    # ---- evaluation and model selection --------------------------------------------------------

    def evaluate(self, part: str) -> dict:
        return evaluate_model(self.model, self.cfg, self.eval_docs, self.space, part, self.cold_items,
                              self.r.distributed)

    def validate(self, block: Block) -> tuple[dict, bool]:
        """Score validation and keep the best weights; (the record, whether it is the new best)."""
        with self.timer.phase("validation"):
            metrics = self.evaluate("valid")
        select_on = self.cfg.eval.select_on
        record = {"block": self.state.block, "phase": block.phase, "epoch": block.epoch,
                  "global_step": self.state.global_step, **metrics}
        self.state.evals.append(record)
        self.log.evaluation("valid", metrics, self.state.global_step)
        if self.projector is not None:
            self.projector.write(self.model, self.state.global_step)
        improved = not self.state.best or selection_score(metrics, select_on) > selection_score(self.state.best,
                                                                                                 select_on)
        if improved:
            self.state.best = record
            self.best_weights = self.trainable_state()
        return record, improved

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable(self.model, state)

    def finish(self) -> dict:
        """Test the best validation model once and write metrics.json."""
        if self.best_weights is not None:
            self.load_trainable_state(self.best_weights)
        valid = self.state.best if self.state.best else self.evaluate("valid")
        test = None
        if self.score_test:
            with self.timer.phase("test"):
                test = self.evaluate("test")
            self.log.evaluation("test", test, self.state.global_step)
        if self.projector is not None:
            self.projector.write(self.model, self.state.global_step, prefix="best/")
        self.state.finished = True
        result = {"valid": {k: v for k, v in valid.items() if k not in ("block", "phase", "epoch", "global_step")},
                  **({"test": test} if test is not None else {}),
                  "best": {k: valid.get(k) for k in ("block", "phase", "epoch", "global_step")},
                  "history": self.state.evals, "global_step": self.state.global_step,
                  "ablation": self.cfg.ablation}
        return result

    def stop(self, why: str) -> dict:
        self.save_checkpoint()
        return {"stopped": why, "global_step": self.state.global_step, "history": self.state.evals}

    # ---- checkpoints -------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The coordinator's part of a checkpoint (the engines save their own optimizer state)."""
        return {"state": asdict(self.state), "config": asdict(self.cfg), "rng": capture_rng()}

    def save_checkpoint(self) -> None:
        self.flush_log()  # the log up to the checkpoint is written before it (a resume truncates past it)
        with self.timer.phase("checkpoints"):
            self.sink.save(self)
        self.checkpoint_clock.saved()

    def reader_state(self) -> dict:
        """This rank's data streams' positions (every kind, every stream it runs), for its checkpoint file."""
        state = {}
        for kind, streams in self.batches.items():
            epoch, step = divmod(self.state.counters[kind], streams[0].steps_per_epoch)
            state[kind] = [stream.reader_state(epoch, step) for stream in streams]
        return state

    def restore_readers(self, saved: dict, source: str) -> None:
        """Seek every data stream to the restored counters' position and check it against the saved state."""
        notes = []
        for kind, streams in self.batches.items():
            epoch, step = divmod(self.state.counters[kind], streams[0].steps_per_epoch)
            entries = saved.get(kind) or []
            for k, stream in enumerate(streams):
                if k >= len(entries):
                    notes.append(f"{kind} stream {k}: not in the checkpoint")
                    stream.reader.seek(epoch, step * stream.s.batch_size)
                    continue
                try:
                    note = stream.restore_reader(entries[k], epoch, step)
                except ValueError as err:
                    raise CheckpointError(f"{source}: {err} Resume from an earlier checkpoint or start over.") from None
                if note:
                    notes.append(note)
        if notes and self.r.is_main:
            print(f"[checkpoint] warning: {source}: the saved data streams do not apply ({'; '.join(notes)}); "
                  "the data position is re-derived from the step counters.", flush=True)

    def restore(self, snapshot: dict, trainable: dict[str, torch.Tensor], best: dict | None) -> None:
        self.restored_config = snapshot["config"]  # what the checkpoint was trained with (compared on resume)
        try:
            self.state = TrainerState(**snapshot["state"])
        except TypeError as err:
            raise CheckpointError(f"the checkpoint's coordinator state does not fit this trainer ({err}); it was "
                                  "written by another model or version.") from None
        self.load_trainable_state(trainable)
        self.best_weights = best
        restore_rng(snapshot["rng"])

