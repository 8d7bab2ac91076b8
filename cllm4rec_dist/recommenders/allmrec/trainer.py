"""The A-LLMRec recipe: stage 0 (CF model) -> stage 1 (collaborative-text alignment) -> stage 2 (LLM
alignment) -> candidate evaluation, shared by `cllm4rec train`, the Ray workers and torchrun processes.

Where each stage runs:
* stage 0 and stage 1 run on EVERY rank, identically (same data, same seeds, no communication):
  they are small (a 50-d SASRec, four linear maps and a 22M-parameter Sentence-BERT on a few
  thousand items) next to stage 2, and running them replicated means no rank waits on rank 0
  and no weights have to be broadcast; rank 0 alone writes their optimizer state.
* stage 2 is data-parallel: rank r of W takes every W-th training user of the epoch's
  permutation; its engine (torch Adam in one process, DeepSpeed ZeRO over F_U/F_I on workers)
  averages the gradients. A single process with ``simulate_ranks=W`` reproduces W ranks.
* evaluation: each rank scores its share of the users; rank 0 gathers the candidate scores
  and computes the metrics once (eval/candidates.py).

Position = (stage, epoch, step); every step's data is a pure function of (seed, epoch, step),
so resuming from a checkpoint continues exactly. Checkpoints go through train/checkpoint.py's
sinks (``ALLMRecTrainer`` has the coordinator interface they use).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.model.cf import pad_histories
from cllm4rec_dist.recommenders.allmrec.model import (
    ALLMRec,
    SoftBatch,
)
from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts, normalise_title
from cllm4rec_dist.train.checkpoint import CheckpointClock, capture_rng, load_trainable, restore_rng
from cllm4rec_dist.train.loop import block_end_checkpoint_due, check_loss, run_block_steps
from cllm4rec_dist.train.lr_schedule import lr_factor
from cllm4rec_dist.train.monitor import Monitor, PendingSteps
from cllm4rec_dist.train.rank import Rank
from cllm4rec_dist.train.timing import PhaseTimer

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig

STAGES = ("cf", "align", "llm", "eval", "done")
_STREAM = {"align": 11, "llm": 12, "negatives": 13, "subsample": 14, "eval_sample": 15}
PARTS = ("valid", "test")
LR_SETTING = {"align": "allmrec.stage1_lr", "llm": "allmrec.stage2_lr"}  # named when a stage's loss diverges


@dataclass
class ALLMRecState:
    """The coordinator's position (what a checkpoint restores)."""

    stage: str = "cf"
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    metrics: dict = field(default_factory=dict)   # stage -> model -> {"valid": ..., "test": ...}
    seconds: dict = field(default_factory=dict)   # wall time per stage
    finished: bool = False

    @property
    def block(self) -> int:
        """Index of the current stage in STAGES: the position the checkpoint sinks report (like Trainer's block)."""
        return STAGES.index(self.stage)


@dataclass
class _Phase:
    """What the Monitor needs to know about a stage epoch (it logs `<kind>/loss` per step; ``kinds``, one per
    step, give the schedule's ETA)."""

    phase: str
    epoch: int
    kinds: tuple = ()
    evaluate: bool = False


def rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def sample_unseen(generator: np.random.Generator, num_items: int, seen: set[int], k: int) -> list[int]:
    """``k`` distinct items outside ``seen`` (rejection sampling; catalogues are much larger than histories)."""
    if num_items - len(seen) < k:
        raise ValueError(f"cannot sample {k} unseen items: the user has seen {len(seen)} of {num_items}")
    out: list[int] = []
    while len(out) < k:
        item = int(generator.integers(num_items))
        if item not in seen and item not in out:
            out.append(item)
    return out


def known_items(data: SequentialData, user: int) -> set[int]:
    """Every item the user interacted with: train items AND the held-out validation and test items. Training
    negatives come from outside it: a held-out item drawn as a negative would teach the model to rank the
    evaluation's positive low."""
    held_out = (data.valid[user], data.test[user])
    return set(data.histories[user]) | {i for i in held_out if i is not None}


def evaluated_sample(data: SequentialData, part: str, max_users: int, seed: int) -> list[int]:
    """The users evaluated on ``part`` (ascending): all of them, or with ``max_users`` > 0 a seeded random sample
    of that many (the first N by index would be a biased slice: indices follow the raw file's user order)."""
    users = [int(u) for u in data.evaluated_users(part)]
    if 0 < max_users < len(users):
        keep = rng(seed, _STREAM["eval_sample"], PARTS.index(part)).choice(len(users), max_users, replace=False)
        users = [users[k] for k in sorted(keep)]
    return users


class ALLMRecTrainer:
    """Runs the stages on one rank; implements train/checkpoint.py's ``Coordinator`` (what the sinks need)."""

    def __init__(self, cfg: TrainConfig, data: SequentialData, model: ALLMRec, prompts: ALLMRecPrompts,
                 engines: dict, rank: Rank, sink, train_cf, timer: PhaseTimer | None = None):
        self.cfg, self.a, self.data, self.model, self.prompts = cfg, cfg.allmrec, data, model, prompts
        self.stage_engines, self.r, self.sink = engines, rank, sink
        self.train_cf = train_cf  # stage 0: (cfg, data, cf_model, log) -> metrics
        self.state = ALLMRecState()
        self.best_weights = None  # A-LLMRec keeps the last weights of each stage (the paper's schedule)
        self.log: Monitor | None = None
        self.timer = timer or PhaseTimer()  # rank 0 writes it to <run>/timing.json
        self.device = model.llm.device
        self.unlogged = PendingSteps(self.device)  # step scalars until the next flush (every log_every steps)
        self.train_users = [u for u, h in enumerate(data.histories) if len(h) >= 2]
        if not self.train_users:
            raise ValueError(f"{cfg.data}: no user has 2 or more training items; A-LLMRec trains on "
                             "(history, next item) pairs")
        if 0 < cfg.allmrec.train_max_users < len(self.train_users):
            # The same subsample on every rank and on resume: a function of the seed alone.
            keep = rng(cfg.seed, _STREAM["subsample"]).choice(len(self.train_users), cfg.allmrec.train_max_users,
                                                              replace=False)
            self.train_users = [self.train_users[k] for k in sorted(keep)]
        self.cold = torch.tensor([c == 0 for c in data.train_counts], dtype=torch.bool)
        self.joint: torch.Tensor | None = None  # [J, d'] e_i, fixed after stage 1
        self.checkpoint_clock = CheckpointClock(cfg.checkpoint_interval_s)
        self.stage_total = 0  # global steps of stages 1 and 2 (the log's ETA)

    @property
    def engines(self) -> dict:
        """The engines of the current stage and the stages after it: what the checkpoint sinks save and load. A
        finished stage's optimizer is never stepped again, so its state stays out of every later checkpoint (stage
        1's Adam state of a fine-tuned Sentence-BERT is twice the encoder's size). A function of the position, so a
        resume that falls back to an older checkpoint gets that position's engines back."""
        return {name: e for name, e in self.stage_engines.items() if STAGES.index(name) >= self.state.block}

    # ---- data ----------------------------------------------------------------------------------

    def user_vectors(self, histories: list[list[int]]) -> torch.Tensor:
        """x_u of the frozen CF model for each history."""
        with torch.no_grad():
            return self.model.cf.user_representation(pad_histories(histories, self.a.cf_max_len).to(self.device))

    def evaluated_users(self, part: str) -> list[int]:
        return evaluated_sample(self.data, part, self.a.eval_max_users, self.cfg.seed)

    def align_steps(self) -> int:
        return math.ceil(len(self.train_users) / self.a.stage1_batch_size)

    def stage_steps(self, stage: str) -> int:
        return self.align_steps() if stage == "align" else self.llm_steps()

    def stage_epochs(self, stage: str) -> int:
        return self.a.stage1_epochs if stage == "align" else self.a.stage2_epochs

    def stage_lr(self, stage: str) -> float:
        return self.a.stage1_lr if stage == "align" else self.a.stage2_lr

    def llm_streams(self) -> range:
        return range(self.r.rank * self.r.accumulate, (self.r.rank + 1) * self.r.accumulate)

    def llm_steps(self) -> int:
        world = self.r.world_size * self.r.accumulate
        return math.ceil(math.ceil(len(self.train_users) / world) / self.a.stage2_batch_size)

    def llm_examples(self, epoch: int, step: int, stream: int) -> list[int]:
        """Users of one stage-2 micro-batch: stream s of W takes every W-th user of the epoch's permutation."""
        world = self.r.world_size * self.r.accumulate
        order = rng(self.cfg.batch.seed, epoch, _STREAM["llm"]).permutation(self.train_users)
        part = order[stream::world]
        b = self.a.stage2_batch_size
        return [int(part[(step * b + k) % len(part)]) for k in range(b)]

    def training_prompt(self, user: int, epoch: int):
        """(prompt, answer) for a training user: history = train items but the last, answer = the last."""
        history, target = self.data.histories[user][:-1], self.data.histories[user][-1]
        g = rng(self.cfg.batch.seed, epoch, user, _STREAM["negatives"])
        candidates = [target, *sample_unseen(g, self.data.num_items, known_items(self.data, user),
                                             self.a.num_candidates - 1)]
        candidates = [candidates[k] for k in g.permutation(len(candidates))]
        prompt = self.prompts.prompt(history[-self.a.prompt_history:], candidates, soft=self.a.stage2_soft_tokens)
        return prompt, self.prompts.answer(target)

    # ---- steps ---------------------------------------------------------------------------------

    def align_step(self, epoch: int, step: int) -> dict:
        """Stage 1: one step over a batch of (x_u, next item, one unseen item)."""
        order = rng(self.cfg.batch.seed, epoch, _STREAM["align"]).permutation(self.train_users)
        users = [int(u) for u in order[step * self.a.stage1_batch_size:(step + 1) * self.a.stage1_batch_size]]
        histories = [self.data.histories[u][:-1] for u in users]
        positives = torch.tensor([self.data.histories[u][-1] for u in users])
        negatives = torch.tensor([sample_unseen(rng(self.cfg.batch.seed, epoch, u, _STREAM["negatives"]),
                                                self.data.num_items, known_items(self.data, u), 1)[0]
                                  for u in users])
        with torch.no_grad():
            table = self.model.cf.item_embeddings().detach()
        texts = self.model.text(torch.cat([positives, negatives]).to(self.device))
        n = len(users)
        out = self.model.align.losses(self.user_vectors(histories), table[positives], table[negatives],
                                      texts[:n], texts[n:], self.a.alpha, self.a.beta)
        engine = self.engines["align"]
        engine.backward(out["loss"])
        out["grad_norm"] = engine.step()
        self.model.text.invalidate()
        return {k: torch.as_tensor(v).detach() for k, v in out.items()}  # logged later: no wait for the device

    def llm_step(self, epoch: int, step: int) -> dict:
        """Stage 2: one data-parallel step of the answer-title loss; only F_U, F_I get gradients."""
        engine = self.engines["llm"]
        streams = self.llm_streams()
        totals = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("loss", "tokens")}
        for stream in streams:
            users = self.llm_examples(epoch, step, stream)
            pairs = [self.training_prompt(u, epoch) for u in users]
            batch = SoftBatch.collate([p for p, _ in pairs], [a for _, a in pairs], self.prompts.fill_id)
            vectors = self.user_vectors([self.data.histories[u][:-1] for u in users])
            out = self.model.llm.answer_loss(batch, vectors, self.joint)
            engine.backward(out["loss"] / len(streams))
            totals["loss"] = totals["loss"] + out["loss"].detach().to(totals["loss"]) / len(streams)
            # summed, not averaged: the tokens/s of the whole step
            totals["tokens"] = totals["tokens"] + torch.as_tensor(out["tokens"]).to(totals["loss"])
        totals["grad_norm"] = engine.step()
        return totals

    def train_step(self, stage: str) -> dict:
        """One optimizer step of stage "align" or "llm" at the current (epoch, step), at the stage's lr times
        optim.lr_schedule's factor at the step's place in the stage."""
        o, epochs, steps = self.cfg.optim, self.stage_epochs(stage), self.stage_steps(stage)
        factor = lr_factor(o.lr_schedule, self.state.epoch * steps + self.state.step, epochs * steps,
                           o.lr_warmup_fraction, o.min_lr_ratio)
        self.engines[stage].set_lr(self.stage_lr(stage) * factor)
        step_fn = self.align_step if stage == "align" else self.llm_step
        return step_fn(self.state.epoch, self.state.step)

    # ---- the stages ----------------------------------------------------------------------------

    def record_step(self, kind: str, seconds: float, out: dict) -> None:
        self.unlogged.add((kind, self.state.epoch, self.state.global_step, seconds, self.stage_total,
                           self.engines[kind].lr, tuple(out)), out.values())

    def _advance(self, stage: str) -> None:
        self.state.stage, self.state.epoch, self.state.step = stage, 0, 0

    def _timed(self, stage: str, seconds: float) -> None:
        self.state.seconds[stage] = round(self.state.seconds.get(stage, 0.0) + seconds, 2)

    def train(self) -> dict:
        cfg = self.cfg
        if self.state.stage == "cf":
            start = time.time()
            self.state.metrics["cf"] = {self.a.cf_model: self.train_cf(cfg, self.data, self.model.cf, self._cf_log)}
            self._timed("cf", time.time() - start)
            self._advance("align")
            self.save_checkpoint()
        for p in self.model.cf.parameters():
            p.requires_grad_(False)  # frozen from here on
        self.model.cf.eval()

        stages = [(name, self.stage_epochs(name), self.stage_steps(name)) for name in ("align", "llm")]
        self.log.schedule([_Phase(name, epoch, (name,) * steps)
                           for name, epochs, steps in stages for epoch in range(epochs)])
        total = sum(epochs * steps for _, epochs, steps in stages)  # global steps of stages 1 and 2
        for name, epochs, steps in stages:
            if self.state.stage != name:
                continue
            if name == "llm":
                self.joint = self.joint_embeddings()
            self.model.train()
            while self.state.epoch < epochs:
                start = time.time()
                self.stage_total = total
                finished = run_block_steps(self, (name,) * steps)
                self._timed(name, time.time() - start)
                if not finished:
                    return self.stop("max_steps reached")
                self.state.epoch += 1
                self.state.step = 0
                if block_end_checkpoint_due(cfg, self.state.epoch == epochs, self.checkpoint_clock):
                    self.save_checkpoint()
            self.model.eval()
            self._advance("llm" if name == "align" else "eval")
        if self.state.stage == "eval":
            start = time.time()
            self.joint = self.joint_embeddings()
            self.state.metrics["llm"] = self.evaluate_all()
            self._timed("eval", time.time() - start)
            self._advance("done")
            self.state.finished = True
            self.save_checkpoint()
        return self.result()

    def _cf_log(self, tag: str, value: float, step: int) -> None:
        """Stage 0's log (baselines/sequential.py ``CFStage``: ``cf/loss`` per epoch, ``cf/valid/...``); a NaN or
        infinite epoch loss stops the run (stage 0 runs identically on every rank: all of them stop there)."""
        if tag == "cf/loss":
            check_loss(value, step, f"stage-0 {self.a.cf_model}", self.a.cf_lr, "allmrec.cf_lr", unit="epoch",
                       what="the mean of the epoch's steps")
        if self.log is not None and self.log.writer is not None:
            self.log.writer.add_scalar(tag, value, step)  # tags come as cf/...

    def flush_log(self) -> None:
        """The pending steps to the monitor, averaged over ranks in ONE all-reduce (train/monitor.py
        ``PendingSteps``, as CLLM4Rec's Trainer does); every rank calls this at the same steps. A NaN or infinite
        loss stops the run here (train/loop.py ``check_loss``), on every rank at the same step."""
        if not self.unlogged:
            return
        with self.timer.phase("log_reduce"):
            for (stage, epoch, global_step, seconds, total, lr, keys), values in self.unlogged.reduce(self.r.mean):
                out = dict(zip(keys, values))
                if not math.isfinite(out["loss"]):
                    check_loss(out["loss"], global_step, stage, lr, self._diverged_setting(stage))
                # The Monitor's step record: (loss, lm, mr, tokens, grad_norm); A-LLMRec has no MR term.
                self.log.step(global_step, _Phase(stage, epoch), stage, seconds, total, lr,
                              [out["loss"], out["loss"], 0.0, out.get("tokens", 0.0), out["grad_norm"]])
                if self.log.writer is not None:
                    for key in keys:
                        if key not in ("loss", "tokens", "grad_norm"):
                            self.log.writer.add_scalar(f"{stage}/{key}", out[key], global_step)

    def _diverged_setting(self, stage: str) -> str:
        """The learning rate to blame for stage ``stage``'s non-finite loss: the stage's own, or stage 0's when the
        frozen CF model it reads gives non-finite vectors (its epoch losses can look fine while its last step
        diverged). Only called once a loss is NaN or infinite, so it costs the training nothing."""
        users = [self.data.histories[u][:-1] for u in self.train_users]
        with torch.no_grad():
            finite = bool(torch.isfinite(self.model.cf.item_embeddings()).all()) and all(
                bool(torch.isfinite(self.user_vectors(users[k:k + 256])).all()) for k in range(0, len(users), 256))
        if finite:
            return LR_SETTING[stage]
        return (f"allmrec.cf_lr: the stage-0 {self.a.cf_model} model this stage reads gives NaN or infinite "
                "vectors; retrain stage 0")

    def joint_embeddings(self) -> torch.Tensor:
        """e_i for every item (frozen after stage 1): item path for trained items, text path for cold ones."""
        with torch.no_grad():
            return self.model.align.joint_embeddings(self.model.cf.item_embeddings(), self.model.text.all(),
                                                     self.cold)

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate_all(self) -> dict:
        """Every model of the run on the stored candidates, valid and test: model -> part -> metrics."""
        results: dict = {}
        for part in ("valid", "test"):
            users = self.evaluated_users(part)
            mine = users[self.r.rank::self.r.world_size]
            rows = self._score_users(part, mine)
            gathered = [rows]
            if self.r.distributed:
                gathered = [None] * self.r.world_size
                dist.all_gather_object(gathered, rows)
            if self.r.is_main:
                merged = {k: v for chunk in gathered for k, v in chunk.items()}
                for model, metrics in self._metrics(part, merged).items():
                    results.setdefault(model, {})[part] = metrics
                    self.log.evaluation(f"{part}/{model}", logged_metrics(metrics), self.state.global_step)
        return results

    def _score_users(self, part: str, users: list[int]) -> dict[int, dict]:
        """Per user: candidate scores of each model and the generated answer's candidate index (-1: none).

        Users go through in order of prompt length, so that a batch's rows are of similar length (less padding);
        the results are keyed by user, so the order changes nothing else."""
        out: dict[int, dict] = {}
        llm = self.model.llm
        variants = [(row, row == "allmrec") for row in self.a.evaluated_llm_rows()]
        titles = {u: sum(len(self.prompts.title_ids[i]) for i in self.data.prefix(u, part)[-self.a.prompt_history:])
                  for u in users}
        users = sorted(users, key=lambda u: (titles[u], u))
        share = " (this rank's share)" if self.r.world_size > 1 else ""
        started, label = time.time(), f"[score] {part}, {' + '.join(m for m, _ in variants)}{share}"
        for start in range(0, len(users), self.a.eval_batch_size):
            self.log.work_done(label, start, len(users), started)
            chunk = users[start:start + self.a.eval_batch_size]
            histories = [self.data.prefix(u, part) for u in chunk]
            candidates = [self.data.candidates[part][u] for u in chunk]
            vectors = self.user_vectors(histories)
            with torch.no_grad():
                cf_scores = self.model.cf.score(pad_histories(histories, self.a.cf_max_len).to(self.device),
                                                torch.tensor(candidates, device=self.device)).cpu()
            for row, u in enumerate(chunk):
                out[u] = {self.a.cf_model: cf_scores[row].tolist()}
            scored = [[self.prompts.scored_title(i) for i in c] for c in candidates]
            recent = [h[-self.a.prompt_history:] for h in histories]
            for model, soft in variants:
                prompts = [self.prompts.scoring_prompt(h, c, soft=soft) for h, c in zip(recent, candidates)]
                scores = llm.candidate_scores(prompts, vectors, self.joint, scored, self.a.score)
                generated = [None] * len(chunk)
                if self.a.generate:
                    left = SoftBatch.collate([self.prompts.prompt(h, c, soft=soft) for h, c in zip(recent, candidates)],
                                             None, self.prompts.fill_id, left=True)
                    ids = llm.generate(left, vectors, self.joint, self.a.max_new_tokens, self.prompts.eos)
                    generated = [self._named_candidate(g, c) for g, c in zip(ids, candidates)]
                for row, u in enumerate(chunk):
                    out[u][model] = scores[row].tolist()
                    out[u][f"{model}_generated"] = generated[row]
        self.log.work_done(label, len(users), len(users), started)
        return out

    def _named_candidate(self, generated: list[int], candidates: list[int]) -> int:
        """Index of the candidate whose normalised title the answer is exactly (-1: it names none)."""
        answer = self.prompts.decode_answer(generated)
        for k, item in enumerate(candidates):
            if normalise_title(self.prompts.titles[item]) == answer:
                return k
        return -1

    def _metrics(self, part: str, merged: dict[int, dict]) -> dict:
        """eval/candidates.py metrics of every model from the gathered per-user scores and generated answers."""
        from cllm4rec_dist.eval.candidates import MISS, candidate_metrics

        users = sorted(merged)
        positives = [getattr(self.data, part)[u] for u in users]
        candidates = [self.data.candidates[part][u] for u in users]
        lengths = [len(self.data.prefix(u, part)) for u in users]
        common = dict(candidates=candidates, positives=positives, history_lengths=lengths,
                      train_counts=self.data.train_counts, settings=self.a.candidate_settings())
        models = [self.a.cf_model, *self.a.evaluated_llm_rows()]
        results = {}
        for model in models:
            metrics = candidate_metrics(np.asarray([merged[u][model] for u in users]), **common)
            named = [merged[u].get(f"{model}_generated") for u in users]
            if self.a.generate and model != self.a.cf_model:
                # Generated: hit if the answer is the positive's title; another candidate or none is a miss.
                ranks = [MISS if n is None or n < 0 else 0.0 if c[n] == p else 1.0
                         for n, c, p in zip(named, candidates, positives)]
                generated = candidate_metrics(np.asarray(ranks), are_ranks=True, **common)
                metrics["hit@1_generated"] = generated["hit@1"]
                metrics["no_candidate_share"] = float(np.mean([n == -1 for n in named]))
                for name, values in generated["slices"].items():
                    metrics["slices"][name]["hit@1_generated"] = values["hit@1"]
            results[model] = metrics
        return results

    # ---- end, checkpoints --------------------------------------------------------------------

    def result(self) -> dict:
        return {"recommender": "allmrec", "stages": self.state.metrics, "seconds": dict(self.state.seconds),
                "global_step": self.state.global_step}

    def stop(self, why: str) -> dict:
        self.save_checkpoint()
        return {"stopped": why, "global_step": self.state.global_step, "stage": self.state.stage}

    def snapshot(self) -> dict:
        return {"state": asdict(self.state), "config": asdict(self.cfg), "rng": capture_rng()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.model.saved_state()

    def save_checkpoint(self) -> None:
        self.flush_log()  # the log up to the checkpoint is written before it (a resume truncates past it)
        with self.timer.phase("checkpoints"):
            self.sink.save(self)
        self.checkpoint_clock.saved()

    def reader_state(self) -> None:
        """Nothing to save: every step's data is a pure function of (seed, epoch, step)."""
        return None

    def restore_readers(self, saved: dict, source: str) -> None:
        """Nothing to seek: the position is (stage, epoch, step) in the restored state."""

    def restore(self, snapshot: dict, trainable: dict[str, torch.Tensor], best: dict | None) -> None:
        self.state = ALLMRecState(**snapshot["state"])
        load_trainable(self.model, trainable)
        self.model.text.invalidate()
        self.restored_config = snapshot["config"]  # compared with the new config by the recipe
        restore_rng(snapshot["rng"])


def logged_metrics(metrics: dict) -> dict:
    """What the monitor logs of a part's candidate metrics (TensorBoard scalars, the progress line): the top-level
    numbers (slices are nested and skipped), the evaluated-user count under the monitor's count name ``num_users``
    (eval/candidates.py calls it ``users``), so it is shown as the line's count, not plotted as a metric."""
    out = {k: v for k, v in metrics.items() if (isinstance(v, (int, float)) or v is None) and k != "users"}
    out["num_users"] = metrics.get("users")
    return out


