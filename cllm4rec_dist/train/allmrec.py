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
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from cllm4rec_dist.corpus.presets import load_tokenizer, resolve_backbone
from cllm4rec_dist.corpus.prompts import ALLMRecPrompts, normalise_title
from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.atomic import write_json_atomic
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.allmrec import (ALLMRec, CollabTextAlignment, LLMAlignment, SoftBatch, TextEncoder,
                                         item_text, load_sbert)
from cllm4rec_dist.model.cf import pad_histories
from cllm4rec_dist.train.config import ConfigError, TrainConfig
from cllm4rec_dist.train.checkpoint import CheckpointClock, capture_rng, load_trainable, restore_rng
from cllm4rec_dist.train.run_folder import settle_run_config
from cllm4rec_dist.train.engines import TorchEngine
from cllm4rec_dist.train.timing import PhaseTimer, write_timing
from cllm4rec_dist.train.monitor import Monitor, PendingSteps
from cllm4rec_dist.train.rank import Rank

STAGES = ("cf", "align", "llm", "eval", "done")
_STREAM = {"align": 11, "llm": 12, "negatives": 13, "subsample": 14}


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


def backbone_for(cfg: TrainConfig, manifest: dict) -> dict:
    """The LLM of stage 2: cfg.backbone (a preset-free spec: folder or 'smollm2'), else the dataset's.

    A-LLMRec tokenises its prompts online from the titles, so any backbone works on any dataset."""
    if cfg.backbone is None:
        recorded = manifest["backbone"]
        return {"path": recorded["path"], "gguf_file": recorded.get("gguf_file")}
    return resolve_backbone(cfg.backbone)


class ALLMRecTrainer:
    """Runs the stages on one rank. Has the coordinator interface of train/checkpoint.py's sinks:
    ``engines``, ``r``, ``state.global_step``, ``snapshot()``, ``trainable_state()``, ``best_weights``,
    ``restore()``."""

    def __init__(self, cfg: TrainConfig, data: SequentialData, model: ALLMRec, prompts: ALLMRecPrompts,
                 engines: dict, rank: Rank, sink, train_cf, timer: PhaseTimer | None = None):
        self.cfg, self.a, self.data, self.model, self.prompts = cfg, cfg.allmrec, data, model, prompts
        self.engines, self.r, self.sink = engines, rank, sink
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

    # ---- data ----------------------------------------------------------------------------------

    def user_vectors(self, histories: list[list[int]]) -> torch.Tensor:
        """x_u of the frozen CF model for each history."""
        with torch.no_grad():
            return self.model.cf.user_representation(pad_histories(histories, self.a.cf_max_len).to(self.device))

    def align_steps(self) -> int:
        return math.ceil(len(self.train_users) / self.a.stage1_batch_size)

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
        candidates = [target, *sample_unseen(g, self.data.num_items, set(self.data.histories[user]),
                                             self.a.num_candidates - 1)]
        candidates = [candidates[k] for k in g.permutation(len(candidates))]
        return self.prompts.prompt(history[-self.a.prompt_history:], candidates), self.prompts.answer(target)

    # ---- steps ---------------------------------------------------------------------------------

    def align_step(self, epoch: int, step: int) -> dict:
        """Stage 1: one step over a batch of (x_u, next item, one unseen item)."""
        order = rng(self.cfg.batch.seed, epoch, _STREAM["align"]).permutation(self.train_users)
        users = [int(u) for u in order[step * self.a.stage1_batch_size:(step + 1) * self.a.stage1_batch_size]]
        histories = [self.data.histories[u][:-1] for u in users]
        positives = torch.tensor([self.data.histories[u][-1] for u in users])
        negatives = torch.tensor([sample_unseen(rng(self.cfg.batch.seed, epoch, u, _STREAM["negatives"]),
                                                self.data.num_items, set(self.data.histories[u]), 1)[0]
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
            totals["tokens"] = totals["tokens"] + torch.as_tensor(out["tokens"]).to(totals["loss"]) / len(streams)
        totals["grad_norm"] = engine.step()
        return totals

    def train_step(self, stage: str) -> dict:
        """One optimizer step of stage "align" or "llm" at the current (epoch, step)."""
        step_fn = self.align_step if stage == "align" else self.llm_step
        return step_fn(self.state.epoch, self.state.step)

    # ---- the stages ----------------------------------------------------------------------------

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

        stages = (("align", self.a.stage1_epochs, self.align_steps()), ("llm", self.a.stage2_epochs, self.llm_steps()))
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
                while self.state.step < steps:
                    if cfg.max_steps and self.state.global_step >= cfg.max_steps:
                        self._timed(name, time.time() - start)
                        return self.stop("max_steps reached")
                    t0 = time.perf_counter()
                    out = self.train_step(name)
                    self.state.step += 1
                    self.state.global_step += 1
                    self.unlogged.add((name, self.state.epoch, self.state.global_step, time.perf_counter() - t0,
                                       total, self.engines[name].lr, tuple(out)), out.values())
                    if self.state.global_step % cfg.log_every == 0:
                        self.flush_log()
                    if cfg.checkpoint_every and self.state.global_step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                self.flush_log()
                self.state.epoch += 1
                self.state.step = 0
                self._timed(name, time.time() - start)
                if not cfg.checkpoint_every and (self.state.epoch == epochs or self.checkpoint_clock.due()):
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
        if self.log is not None and self.log.writer is not None:
            self.log.writer.add_scalar(tag, value, step)  # tags come as cf/...

    def flush_log(self) -> None:
        """The pending steps to the monitor, averaged over ranks in ONE all-reduce (train/monitor.py
        ``PendingSteps``, as CLLM4Rec's Trainer does); every rank calls this at the same steps."""
        if not self.unlogged:
            return
        with self.timer.phase("log_reduce"):
            for (stage, epoch, global_step, seconds, total, lr, keys), values in self.unlogged.reduce(self.r.mean):
                out = dict(zip(keys, values))
                # The Monitor's step record: (loss, lm, mr, tokens, grad_norm); A-LLMRec has no MR term.
                self.log.step(global_step, _Phase(stage, epoch), stage, seconds, total, lr,
                              [out["loss"], out["loss"], 0.0, out.get("tokens", 0.0), out["grad_norm"]])
                if self.log.writer is not None:
                    for key in keys:
                        if key not in ("loss", "tokens", "grad_norm"):
                            self.log.writer.add_scalar(f"{stage}/{key}", out[key], global_step)

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
            users = [int(u) for u in self.data.evaluated_users(part)]
            users = users[:self.a.eval_max_users] if self.a.eval_max_users else users
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
        """Per user: candidate scores of each model and the generated answer's candidate index (-1: none)."""
        out: dict[int, dict] = {}
        llm = self.model.llm
        for start in range(0, len(users), self.a.eval_batch_size):
            chunk = users[start:start + self.a.eval_batch_size]
            histories = [self.data.prefix(u, part) for u in chunk]
            candidates = [self.data.candidates[part][u] for u in chunk]
            vectors = self.user_vectors(histories)
            with torch.no_grad():
                cf_scores = self.model.cf.score(pad_histories(histories, self.a.cf_max_len).to(self.device),
                                                torch.tensor(candidates, device=self.device)).cpu()
            for row, u in enumerate(chunk):
                out[u] = {self.a.cf_model: cf_scores[row].tolist()}
            variants = [("allmrec", True)] + ([("titles_only", False)] if self.a.titles_only_baseline else [])
            for model, soft in variants:
                prompts = [self.prompts.prompt(h[-self.a.prompt_history:], c, soft=soft)
                           for h, c in zip(histories, candidates)]
                left = SoftBatch.collate(prompts, None, self.prompts.fill_id, left=True)
                scores = llm.candidate_scores(left, vectors, self.joint,
                                              [[self.prompts.answer(i) for i in c] for c in candidates])
                generated = [None] * len(chunk)
                if self.a.generate:
                    ids = llm.generate(left, vectors, self.joint, self.a.max_new_tokens, self.prompts.eos)
                    generated = [self._named_candidate(g, c) for g, c in zip(ids, candidates)]
                for row, u in enumerate(chunk):
                    out[u][model] = scores[row].tolist()
                    out[u][f"{model}_generated"] = generated[row]
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
                      train_counts=self.data.train_counts, settings=candidate_settings(self.cfg))
        models = [self.a.cf_model, "allmrec"] + (["titles_only"] if self.a.titles_only_baseline else [])
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


def build_model(cfg: TrainConfig, data: SequentialData, manifest: dict, device: str) -> tuple[ALLMRec, ALLMRecPrompts]:
    """The A-LLMRec modules a config describes (untrained), and its prompt builder (trainer and export alike)."""
    a = cfg.allmrec
    torch.manual_seed(cfg.seed)  # identical init on every rank
    cf = build_cf(cfg, data.num_items).to(device)
    sbert = load_sbert(a.sbert, device)
    text = TextEncoder(sbert, [item_text(t, d) for t, d in zip(data.titles, data.descriptions)], a.finetune_sbert)
    align = CollabTextAlignment(cf.dim, text.dim, a.text_dim).to(device)
    location = backbone_for(cfg, manifest)
    llm = LLMAlignment.load(location, cfg.model.precision, cf.dim, a.text_dim, device=device)
    prompts = ALLMRecPrompts(load_tokenizer(location), data.titles)
    return ALLMRec(cf, text, align, llm), prompts


def cf_stage_settings(cfg: TrainConfig, model: str | None = None):
    """Stage 0's settings (train/cf_stage.py) from the allmrec section; ``model`` replaces allmrec.cf_model
    (the report trains each CF model alone with the same settings)."""
    from cllm4rec_dist.train.cf_stage import CFStageSettings

    a = cfg.allmrec
    stage = CFStageSettings(model=model or a.cf_model, lr=a.cf_lr, batch_size=a.cf_batch_size, max_epochs=a.cf_epochs,
                            patience=a.cf_patience, seed=cfg.seed, num_threads=0,
                            candidates=candidate_settings(cfg))
    shape = stage.model_settings()
    shape.dim, shape.max_len = a.cf_dim, a.cf_max_len
    return stage.validate()


def candidate_settings(cfg: TrainConfig):
    from cllm4rec_dist.eval.candidates import CandidateEvalSettings

    a = cfg.allmrec
    return CandidateEvalSettings(cold_item_max_count=a.cold_item_max_count, warm_item_min_count=a.warm_item_min_count,
                                 cold_user_max_history=a.cold_user_max_history).validate()


def build_cf(cfg: TrainConfig, num_items: int):
    """The (untrained) stage-0 CF model of the config."""
    from cllm4rec_dist.model.cf import CF_MODELS

    return CF_MODELS[cfg.allmrec.cf_model](num_items, cf_stage_settings(cfg).model_settings())


def train_cf_stage(cfg: TrainConfig, data: SequentialData, cf, log) -> dict:
    """Stage 0 on this rank (train/cf_stage.py: early stopping on validation); the best model's weights are
    copied into ``cf``; returns its valid/test candidate metrics. With ``allmrec.cf_from`` the model saved
    there is loaded instead (and scored on the candidates again)."""
    from cllm4rec_dist.train.cf_stage import CFStage, evaluate_candidates, load_cf_model

    if cfg.allmrec.cf_from:
        path = cfg.allmrec.cf_from.replace("{seed}", str(cfg.seed))
        saved, info = load_cf_model(path)
        if saved.name != cfg.allmrec.cf_model:
            raise ConfigError(f"allmrec.cf_from {path} holds a {saved.name} model; allmrec.cf_model is "
                             f"{cfg.allmrec.cf_model}: set one to match the other")
        trained_on = info.get("dataset", {}).get("content_hash")
        if trained_on != data.manifest.get("content_hash"):
            raise ConfigError(f"allmrec.cf_from {path} was trained on another dataset (content hash "
                             f"{trained_on}, {cfg.data} has {data.manifest.get('content_hash')}): train stage 0 on "
                             "this dataset or leave cf_from unset")
        try:
            cf.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as e:
            raise ConfigError(f"allmrec.cf_from {path}: its shapes differ from allmrec.cf_dim / "
                             f"cf_max_len ({str(e).splitlines()[0]})") from None
        settings = cf_stage_settings(cfg)
        cf.eval()
        return {"valid": evaluate_candidates(cf, data, "valid", settings),
                "test": evaluate_candidates(cf, data, "test", settings), "best_epoch": info.get("best_epoch"),
                "loaded_from": path}
    stage = CFStage(data, cf_stage_settings(cfg), log=log).setup()
    result = stage.train()
    cf.load_state_dict(stage.model.state_dict())
    return {"valid": result["valid"], "test": result["test"], "best_epoch": result["best_epoch"]}


class ALLMRecRecipe:
    """setup -> train -> save_checkpoint, like CLLM4RecRecipe; the engine factory builds stage 2's engine."""

    def __init__(self, cfg: TrainConfig, rank: Rank, engine_factory, sink, timer=None):
        from cllm4rec_dist.train.recipe import default_run_dir

        self.cfg, self.rank, self.engine_factory, self.sink = cfg, rank, engine_factory, sink
        self.timer = timer or PhaseTimer()  # rank 0 writes it to <run>/timing.json; the stages report their own seconds
        if not cfg.out:
            cfg.out = default_run_dir()

    @staticmethod
    def check_data(cfg: TrainConfig) -> None:
        """Fail on the driver, before any worker starts, when the dataset has no leave-one-out data."""
        SequentialData.open(cfg.data)

    def setup(self) -> "ALLMRecRecipe":
        cfg, rank = self.cfg, self.rank
        os.makedirs(cfg.out, exist_ok=True)
        shards = ShardedDataset(cfg.data)
        data = SequentialData.open(shards)
        device = "cuda" if torch.cuda.is_available() and cfg.dist.use_gpu else "cpu"
        model, prompts = build_model(cfg, data, shards.manifest, device)
        self.model = model
        engines = {"align": TorchEngine("align", model.stage_parameters("align"), cfg.allmrec.stage1_lr,
                                             cfg.optim.weight_decay, cfg.optim.grad_clip),
                   "llm": self.engine_factory("llm", model.stage_parameters("llm"), cfg.allmrec.stage2_lr)}
        self.trainer = ALLMRecTrainer(cfg, data, model, prompts, engines, rank, self.sink, train_cf_stage, self.timer)
        self.trainer.restored_config = None
        resumed = cfg.resume and self.sink.has_checkpoint() and self.sink.load_latest(self.trainer)
        settle_run_config(self.trainer.restored_config if resumed else None, cfg, rank.is_main,
                          shards.manifest.get("content_hash"))
        state = self.trainer.state
        self.trainer.log = Monitor(cfg.out, rank.is_main, cfg.log_every, rank.world_size * rank.accumulate,
                                   resume_step=state.global_step if resumed else 0)
        if rank.is_main:
            if resumed:
                print(f"[train] resumed at step {state.global_step} (stage {state.stage}, epoch {state.epoch}, "
                      f"step {state.step})", flush=True)
            sizes = {k: sum(p.numel() for p in model.stage_parameters(k)) for k in ("align", "llm")}
            print(f"[train] A-LLMRec: {data.num_users} users, {data.num_items} items, CF {cfg.allmrec.cf_model}, "
                  f"backbone {model.llm.backbone.config._name_or_path or 'local'} ({cfg.model.precision}), "
                  f"trainable stage 1 {sizes['align']:,}, stage 2 {sizes['llm']:,}, world {rank.world_size}",
                  flush=True)
        return self

    def train(self) -> dict:
        self.timer.mark("train_started")
        result = self.trainer.train()
        self.timer.mark("train_finished")
        if self.rank.is_main:
            write_timing(self.cfg.out, "rank0", self.timer)
            if self.trainer.state.finished:
                write_json_atomic(os.path.join(self.cfg.out, "metrics.json"), result)
        self.trainer.log.close()
        return result

    def save_checkpoint(self) -> None:
        self.trainer.save_checkpoint()


def export_tables(cfg: TrainConfig, shards: ShardedDataset, state: dict[str, torch.Tensor],
                  device: str | None = None) -> tuple[dict, dict]:
    """A-LLMRec's exported tables (entity -> name -> [rows, dim] float32) and what each is.

    items: ``cf`` (E_i of the stage-0 model), ``joint`` (e_i: the text path for cold items),
    ``projected`` (F_I(e_i), the item soft token); users: ``cf`` (x_u over every known item, train
    and valid), ``projected`` (F_U(x_u), the user soft token). Rows follow id_maps.json.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = SequentialData.open(shards)
    model, _ = build_model(cfg, data, shards.manifest, device)
    load_trainable(model, state)
    model.eval()
    cold = torch.tensor([c == 0 for c in data.train_counts], dtype=torch.bool)
    with torch.no_grad():
        items = model.cf.item_embeddings()
        joint = model.align.joint_embeddings(items, model.text.all(), cold)
        histories = pad_histories([data.prefix(u, "test") for u in range(data.num_users)], cfg.allmrec.cf_max_len)
        users = torch.cat([model.cf.user_representation(histories[k:k + 1024].to(device))
                           for k in range(0, data.num_users, 1024)])
        tables = {"users": {"cf": users, "projected": model.llm.user_projection(users)},
                  "items": {"cf": items, "joint": joint, "projected": model.llm.item_projection(joint)}}
    origin = {"users": {"cf": f"stage 0 {cfg.allmrec.cf_model}: x_u over the train + valid items",
                        "projected": "stage 2 F_U(x_u): the user soft token"},
              "items": {"cf": f"stage 0 {cfg.allmrec.cf_model}: item embeddings E_i",
                        "joint": "stage 1 e_i = f_enc^I(E_i), f_enc^T(SBERT text) for items with no train interaction",
                        "projected": "stage 2 F_I(e_i): the item soft token"}}
    tables = {e: {n: m.detach().float().cpu().numpy() for n, m in by.items()} for e, by in tables.items()}
    return tables, origin
