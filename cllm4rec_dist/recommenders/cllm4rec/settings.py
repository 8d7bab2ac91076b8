"""CLLM4Rec's settings: the `model` section of the training config, validated in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cllm4rec_dist.model.backbone_settings import BackboneSettings
from cllm4rec_dist.model.options import DEFAULT_MAX_LOGIT_ELEMENTS, TABLE_SHARDINGS
from cllm4rec_dist.settings import ConfigError, require

ABLATIONS = ("none", "cf", "fixord", "prerec", "ftall", "scratch")
"""The paper's variants (top-level ``ablation``): the full model, LLM-CF, LLM-FixOrd, LLM-PreRec, LLM-FtAll,
LLM-Scratch."""
MR_REDUCTIONS = ("paper", "authors", "token_mean")
"""How the step losses reduce the likelihood and the mutual-regularisation prior over a batch (losses.py)."""
TOKEN_INITS = ("normal", "vocab", "text")
"""How the user/item token tables start (``token_init``)."""
CONTENT_INITS = ("draw", "collab", "text")
"""Where the content user/item rows start (``content_init``)."""
COLD_ITEM_SOURCES = ("content_rows", "text_hidden")
"""What the rows that score cold items are set from (``cold_item_source``)."""


@dataclass
class CLLM4RecSettings(BackboneSettings):
    """The `model` section: the backbone's precision and adapter (model/adapter.py ``BackboneSettings``, shared with
    every recommender) and CLLM4Rec's token tables, item head and mutual regularisation. It validates itself
    (``check``) and, with a dataset's sizes, gives the model's config (``model_config``); the model (model.py) takes
    a ``ModelConfig``, this class plus what the run knows."""

    lambda_c: float = 1.0
    """Mutual-regularisation weight (the paper's prior precision lambda_c). Its strength depends on
    mr_reduction: with 'paper' ~1 is the paper's recommended start; with 'authors' it is their lambda (their runs
    use 1); with 'token_mean' it weighs a per-id-token mean against the per-token CE mean."""
    mr_reduction: str = "paper"
    """How losses reduce the likelihood and the MR prior over a batch (formulas: losses.py).
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
    N(0, initializer_range^2), so 'normal' rows look unlike any word to the frozen layers) or 'text' (users as 'vocab',
    each item at the mean embedding of its text in the dataset's items.json, tokenised by the backbone; needs a
    dataset with items.json)."""
    content_init: str = "draw"
    """Where the content user/item rows start: 'draw' (their own draw, like the collaborative rows), 'collab'
    (equal to the token's collaborative row, the mode of the MR prior, so the MR term starts at 0; with 'vocab'
    two independent word-scale draws start it at the likelihood's scale) or 'text' (each content item row at the
    mean embedding of its item's text in items.json plus N(0, init_std^2): an item's only content document is
    its text, visited once a content epoch, so a drawn content row barely leaves its draw)."""
    cold_item_ridge: float | None = None
    """A separate item head's rows for cold items (never trained on), mapped from their content rows by a ridge
    regression fitted on the warm items: None = through the origin with a tiny ridge (runs before this setting);
    a number r = centred (a cold item starts at the mean warm head row) with ridge r x the mean squared centred
    row norm (docs/experiments/2026-12-01-item-texts-and-cold-map.md compares the two)."""
    cold_item_source: str = "content_rows"
    """What cold items are scored from: 'content_rows' (a tied head's collaborative row is the content row, the MR
    prior's mode; a separate head's row the cold_item_ridge map of it) or 'text_hidden' (the frozen backbone reads
    the item's text in items.json; the mean of its last hidden states is mapped to the scoring row by the centred
    ridge fitted on the warm items; needs cold_item_ridge and a dataset with items.json)."""
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS
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

    def check(self) -> CLLM4RecSettings:
        """Every rule of this section (ConfigError naming the setting); the model's constructor calls it too."""
        self.check_backbone()
        require(self.mr_reduction in MR_REDUCTIONS, "model.mr_reduction", self.mr_reduction, ", ".join(MR_REDUCTIONS))
        for name in ("table_sharding", "item_head_sharding"):
            require(getattr(self, name) in TABLE_SHARDINGS, f"model.{name}", getattr(self, name),
                    ", ".join(TABLE_SHARDINGS))
        require(self.lambda_c >= 0, "model.lambda_c", self.lambda_c, ">= 0")
        require(self.init_std is None or self.init_std > 0, "model.init_std", self.init_std,
                "> 0 (or none for the backbone's initializer_range)")
        require(self.token_init in TOKEN_INITS, "model.token_init", self.token_init, f"one of {', '.join(TOKEN_INITS)}")
        require(self.content_init in CONTENT_INITS, "model.content_init", self.content_init,
                f"one of {', '.join(CONTENT_INITS)}")
        self.check_cold_map()
        require(self.max_logit_elements >= 1, "model.max_logit_elements", self.max_logit_elements, ">= 1")
        return self

    def validate(self, cfg) -> CLLM4RecSettings:
        """This section's rules and those it shares with the rest of the training config ``cfg``."""
        self.check()
        require(cfg.ablation in ABLATIONS, "ablation", cfg.ablation, f"one of {', '.join(ABLATIONS)}")
        if cfg.ablation in ("ftall", "scratch") and self.precision in ("int8", "nf4"):
            raise ConfigError(f"ablation={cfg.ablation} trains the backbone; a quantised ({self.precision}) "
                              "backbone cannot be trained: use model.precision=fp32 or bf16")
        if cfg.ablation in ("ftall", "scratch"):
            self.check_trainable_backbone(f"ablation={cfg.ablation}")
        if "row" in (self.table_sharding, self.item_head_sharding):
            require(cfg.init_from is None, "init_from", cfg.init_from,
                    "unset with row-sharded tables (resume the run instead: its checkpoints load on any number of "
                    "ranks)")
        return self

    def row_sharded(self) -> bool:
        """Whether any table or the item head is split across ranks (model.table_sharding / item_head_sharding)."""
        return "row" in (self.table_sharding, self.item_head_sharding)

    def model_config(self, *, backbone: str, gguf_file: str | None, num_users: int, num_items: int, ablation: str,
                     device: str, item_text_ids: list[list[int]] | None = None, loads_weights: bool = False):
        """The model's config for a dataset of these sizes: these settings plus what the run knows.
        ``loads_weights``: every trainable tensor is replaced from a checkpoint right after, so the tables start
        the cheap way."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(CLLM4RecSettings)}
        if ablation == "cf":
            values["lambda_c"] = 0.0  # LLM-CF: no content LLM, no prior toward it
        if loads_weights:
            values["token_init"], values["content_init"] = "normal", "draw"
        return ModelConfig(**values, backbone=backbone, gguf_file=gguf_file, num_users=num_users,
                           num_items=num_items, item_text_ids=item_text_ids, ft_all=ablation == "ftall",
                           from_scratch=ablation == "scratch", device=device)

    def check_cold_map(self) -> None:
        """The cold-item map's settings (``cold_item_ridge``, ``cold_item_source``) are valid together; ConfigError
        naming the setting otherwise. Also checks a run's settings overridden after training (`cllm4rec evaluate`)."""
        require(self.cold_item_ridge is None or self.cold_item_ridge > 0, "model.cold_item_ridge",
                 self.cold_item_ridge, "> 0, or unset (null) for the map through the origin")
        require(self.cold_item_source in COLD_ITEM_SOURCES, "model.cold_item_source", self.cold_item_source,
                 f"one of {', '.join(COLD_ITEM_SOURCES)}")
        require(self.cold_item_source != "text_hidden" or self.cold_item_ridge is not None,
                 "model.cold_item_ridge", self.cold_item_ridge,
                 "a number > 0 (e.g. 10) with model.cold_item_source text_hidden (the centred map)")

    def reads_item_texts(self, loads_weights: bool = False) -> bool:
        """Whether building the model tokenises the dataset's item texts (items.json): to start tables at them
        (not when every trained tensor is loaded from a checkpoint right after) or to score cold items from them."""
        starts_at_text = "text" in (self.token_init, self.content_init) and not loads_weights
        return starts_at_text or self.cold_item_source == "text_hidden"


@dataclass(kw_only=True)
class ModelConfig(CLLM4RecSettings):
    """The model's config: the `model` settings (settings.py: one home for their defaults, docs and rules) plus
    what a run knows of its dataset, ablation and device (``CLLM4RecSettings.model_config`` builds it)."""

    backbone: str
    """Local directory of the backbone checkpoint (``save_pretrained`` output, or a folder with ``gguf_file``)."""
    num_users: int
    """I: number of user tokens (user i is token V + i)."""
    num_items: int
    """J: number of item tokens (item j is token V + I + j)."""
    gguf_file: str | None = None
    """GGUF file inside ``backbone`` to load instead of a safetensors checkpoint (e.g. SmolLM2)."""
    item_text_ids: list[list[int]] | None = None
    """token_init="text", content_init="text" or cold_item_source="text_hidden": per item, the backbone-vocabulary
    token ids of its text (an empty list: that item starts at the vocabulary's mean row and maps to the mean warm
    scoring row)."""
    ft_all: bool = False
    """LLM-FtAll ablation: train the backbone too (fp32/bf16 only)."""
    from_scratch: bool = False
    """LLM-Scratch ablation: randomly initialised backbone from the checkpoint's config; implies trainable."""
    device: str | None = None
    """Where to load the backbone and tables; None -> the current CUDA device if any, else CPU."""

    @property
    def backbone_trainable(self) -> bool:
        return self.ft_all or self.from_scratch
