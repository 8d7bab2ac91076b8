"""The training config: the shared sections and each registered recommender's own, from YAML and flags.

One config drives every entry point (single-process `cllm4rec train`, the Ray launcher, the DeepSpeed launcher);
the resolved config is saved with each run as `config.yaml`. Reading, type checks and --help come from settings.py;
the shared sections from train/settings.py; each recommender's section (its `settings` in the registry) validates
itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from cllm4rec_dist import settings as _settings
from cllm4rec_dist.eval.metrics import SELECTION_METRICS
from cllm4rec_dist.recommenders import REGISTRY, all_recommenders, names, recommender
from cllm4rec_dist.resources import resolve_path
from cllm4rec_dist.settings import ConfigError, read_yaml_settings, require, to_yaml
from cllm4rec_dist.train.lr_schedule import LR_SCHEDULES
from cllm4rec_dist.train.settings import BatchSettings, DistSettings, OptimSettings, ScheduleSettings

SEED_LIMIT = 2**32
"""Seeds (``seed``, ``batch.seed``) are below this, 32 bits: torch.manual_seed takes 64 bits at most, and seeds
derived from them (per epoch, per stream, e.g. stage 0's ``seed * 100_003 + epoch``) must fit it too."""

__all__ = ["ConfigError", "TrainConfig", "add_config_arguments", "config_from_args", "config_from_dict",
           "load_config", "read_yaml_settings", "to_yaml"]


@dataclass
class EvalSettings:
    batch_size: int = 64
    """Users scored per forward pass."""
    exclude_valid_on_test: bool = True
    """At test time also mask the user's validation items (they are known interactions by then)."""
    select_on: str = "recall@20"
    """Validation score that picks the best finetuning epoch: 'recall@20', or 'authors' (Recall@20 + Recall@40
    + NDCG@100, as the authors' code selects)."""


@dataclass
class RunSettings:
    """The training config's own fields and shared sections; ``TrainConfig`` adds each registered recommender's
    section."""

    data: str = "shards/demo"
    """Preprocessed dataset folder or URL (output of `cllm4rec preprocess`)."""
    recommender: str = next(iter(REGISTRY))
    """The model to train, a name in the recommender registry (recommenders/__init__.py): cllm4rec, or allmrec
    (A-LLMRec: needs a `--split leave-one-out` dataset; its settings are the allmrec section)."""
    out: str = ""
    """Run folder: config, metrics.json, TensorBoard events, checkpoints. Empty = runs/<timestamp>."""
    backbone: str | None = None
    """Backbone: a local checkpoint folder or ``smollm2`` (as `cllm4rec preprocess --backbone`); None = the one recorded
    in the dataset's manifest. CLLM4Rec needs the dataset's tokenizer (checked before any worker starts)."""
    ablation: str = "none"
    """One of none, cf (no content LLM), fixord (no reordering), prerec (no finetuning),
    ftall (backbone trained), scratch (random backbone, trained)."""
    seed: int = 0
    """Seed of the table and head initialisation (batch.seed seeds the data)."""
    batch: BatchSettings = field(default_factory=BatchSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    dist: DistSettings = field(default_factory=DistSettings)
    checkpoint_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = at block ends, as checkpoint_interval_s says)."""
    checkpoint_interval_s: float = 600.0
    """With checkpoint_every 0: at the end of a schedule block (an A-LLMRec epoch), save a checkpoint only when
    this many seconds have passed since the last one (0 = at every block end). The end of training always saves
    (with the best validation weights), and so does a stop at max_steps. A resume replays the steps since the
    last checkpoint exactly, so a longer interval risks recomputation, never a different result."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (older ones are deleted)."""
    log_every: int = 10
    """Steps between progress lines / TensorBoard points."""
    projector_sample: int = 1000
    """Items and users (each) written to TensorBoard's embedding projector at every validation and at the end:
    the same seeded sample (by `seed`) each time, the whole table when smaller; 0 = no projector."""
    max_steps: int = 0
    """Stop after this many steps in total (0 = run the whole schedule); for smoke runs and tests."""
    init_from: str | None = None
    """A checkpoint folder (with trainer.pt), or a run folder (its newest complete checkpoint), whose tables and
    heads initialise this run, e.g. pretraining for `launchers/finetune.py`; its optimizer state and position
    are not taken. Its tensors must match the model's exactly."""
    resume: bool = True
    """Continue from the run folder's latest checkpoint when there is one."""
    allow_config_change: bool = False
    """Resume even when settings that change the training trajectory (seed, learning rates, batch, schedule,
    ablation, model, world size) differ from the checkpoint's; without it such a resume is refused."""
    simulate_ranks: int = 1
    """Single-process trainer only: accumulate this many micro-batches per step, standing in for that
    many ranks, to reproduce a multi-worker run exactly."""

    def validate(self) -> TrainConfig:
        """Check every setting's range and choices (types were checked when it was set); nothing reaches a
        worker unchecked. Each recommender's section checks itself. Packaged relative paths (the DeepSpeed config)
        are resolved against the project."""
        require(self.recommender in names(), "recommender", self.recommender, ", ".join(names()))
        for rec in all_recommenders():
            rec.settings_of(self).validate(self)
        chosen = recommender(self.recommender)
        if not chosen.row_sharding and self.model.row_sharded():
            raise ConfigError(f"model.table_sharding/item_head_sharding 'row': {chosen.title} has no row-sharded "
                              "tables; leave them 'replicated'")
        require(self.schedule.alternate in ("epoch", "steps"), "schedule.alternate", self.schedule.alternate,
                "'epoch' or 'steps'")
        require(self.eval.select_on in SELECTION_METRICS, "eval.select_on", self.eval.select_on,
                ", ".join(SELECTION_METRICS))
        for name in ("warmup_epochs", "pretrain_epochs", "finetune_epochs"):
            require(getattr(self.schedule, name) >= 0, f"schedule.{name}", getattr(self.schedule, name), ">= 0")
        require(self.schedule.alternate_every >= 1, "schedule.alternate_every", self.schedule.alternate_every, ">= 1")
        require(0 <= self.schedule.finetune_content_fraction <= 1, "schedule.finetune_content_fraction",
                 self.schedule.finetune_content_fraction, "in [0, 1]")
        for name in ("batch_size", "max_length"):
            require(getattr(self.batch, name) >= 1, f"batch.{name}", getattr(self.batch, name), ">= 1")
        require(self.batch.shuffle_buffer >= 0, "batch.shuffle_buffer", self.batch.shuffle_buffer,
                 ">= 0 (documents per stream; 0 = the whole partition)")
        require(0 < self.batch.mask_ratio < 1, "batch.mask_ratio", self.batch.mask_ratio,
                 "in (0, 1): the share of a user's items held out as rec-step targets")
        require(self.eval.batch_size >= 1, "eval.batch_size", self.eval.batch_size, ">= 1")
        for name in ("pretrain_lr", "finetune_lr"):
            require(getattr(self.optim, name) > 0, f"optim.{name}", getattr(self.optim, name), "> 0")
        for name in ("weight_decay", "grad_clip"):
            require(getattr(self.optim, name) >= 0, f"optim.{name}", getattr(self.optim, name), ">= 0")
        require(self.optim.user_lr_scale > 0, "optim.user_lr_scale", self.optim.user_lr_scale,
                 "> 0 (1 = the user tables at the phase's lr)")
        require(self.optim.item_head_lr_scale > 0, "optim.item_head_lr_scale", self.optim.item_head_lr_scale,
                 "> 0 (1 = the item head at the phase's lr)")
        require(self.optim.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", self.optim.lr_schedule,
                ", ".join(LR_SCHEDULES))
        require(0 <= self.optim.lr_warmup_fraction < 1, "optim.lr_warmup_fraction", self.optim.lr_warmup_fraction,
                "in [0, 1): the share of each phase's steps spent ramping up")
        require(0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", self.optim.min_lr_ratio,
                "in [0, 1]: the last step's lr as a share of the phase's")
        require(self.optim.adapter_lr_scale > 0, "optim.adapter_lr_scale", self.optim.adapter_lr_scale,
                 "> 0 (1 = the adapters at the phase's lr)")
        for name in ("num_workers", "cpus_per_worker"):
            require(getattr(self.dist, name) >= 1, f"dist.{name}", getattr(self.dist, name), ">= 1")
        require(self.dist.max_failures >= -1, "dist.max_failures", self.dist.max_failures, ">= -1 (-1: no limit)")
        for name in ("checkpoint_every", "max_steps", "checkpoint_interval_s"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("keep_checkpoints", "log_every", "simulate_ranks"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.projector_sample >= 0, "projector_sample", self.projector_sample, ">= 0 (0 = no projector)")
        for name, value in (("seed", self.seed), ("batch.seed", self.batch.seed)):
            require(0 <= value < SEED_LIMIT, name, value, "in [0, 2**32): a seed the random number generators take")
        require(bool(self.data), "data", self.data, "a preprocessed dataset folder or URL")
        self.dist.ds_config = resolve_path(self.dist.ds_config)
        return self

    # Effective settings after the ablation switch (the stored config keeps what the user wrote).
    @property
    def uses_content(self) -> bool:
        return self.ablation != "cf"

    @property
    def lambda_c(self) -> float:
        return 0.0 if self.ablation == "cf" else self.model.lambda_c

    @property
    def reorder(self) -> bool:
        return self.batch.reorder and self.ablation != "fixord"

    @property
    def finetune(self) -> bool:
        return self.ablation != "prerec"

    @property
    def prediction_style(self) -> str:
        """Prompt used to score items: LLM-PreRec predicts the next item after the collab prompt."""
        return "collab" if self.ablation == "prerec" else "rec"


def _with_sections(base: type) -> type:
    """The training config class: ``base``'s fields plus one section per registered recommender (its settings
    class), so a new model's settings are a config section without touching this file."""
    sections = [(rec.section, rec.settings, field(default_factory=rec.settings)) for rec in all_recommenders()]
    cls = dataclasses.make_dataclass("TrainConfig", sections, bases=(base,))
    cls.__module__, cls.__qualname__ = __name__, "TrainConfig"  # pickled by reference (Ray, Tune)
    cls.__doc__ = "The whole training config: " + (base.__doc__ or "")
    return cls


TrainConfig = _with_sections(RunSettings)


def add_config_arguments(p: argparse.ArgumentParser, cls=TrainConfig) -> None:
    _settings.add_config_arguments(p, cls)


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """Defaults <- YAML (--config) <- command-line flags, then validated."""
    return _settings.config_from_args(args, cls)


def config_from_dict(values: dict, source: str = "config", cls=TrainConfig):
    """A validated config from a (possibly nested) dict, e.g. one saved in a checkpoint; ``source`` names it in
    errors."""
    return _settings.config_from_dict(values, source, cls)


def saved_run_config(values: dict, source: str) -> TrainConfig:
    """A saved run's config (a checkpoint's snapshot) for reading the run once, `cllm4rec evaluate` and the export:
    as trained, but with ``model.compile`` off. Compiling pays off over a training run's many steps, not one
    scoring pass, and the machine that reads a run may have no C++ compiler."""
    return config_from_dict({**values, "model": {**values.get("model", {}), "compile": False}}, source)


def load_config(path: str, cls=TrainConfig):
    return _settings.load_config(path, cls)
