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
class TrainConfig:
    data: str = "shards/demo"
    """Preprocessed dataset folder or URL (output of `cllm4rec preprocess`)."""
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
