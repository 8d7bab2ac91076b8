"""The shared sections of the training config: data batches, schedule lengths, optimiser, distribution.

Each recommender's own section lives in its folder (recommenders/<name>/settings.py); the training config
(config.py) puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchSettings:
    batch_size: int = 16
    """Documents per rank per step."""
    max_length: int = 1024
    """Prompt + main tokens; longer item lists keep a random subset (reordering on) or the latest items."""
    reorder: bool = True
    """Stochastic item reordering (off = the paper's LLM-FixOrd ablation)."""
    mask_ratio: float = 0.2
    """Rec step: share of a user's train items held out as targets (at least one kept, one held out)."""
    seed: int = 0
    """Seed of the data order, item reordering and masked prompting (the table init has its own)."""
    pack: bool = True
    """Pack several documents into one row (block-diagonal causal attention, positions restarting per
    document) instead of one right-padded row each: same losses, far fewer padding tokens computed."""
    shuffle_buffer: int = 0
    """Documents a rank holds per corpus stream (its memory bound). 0: the whole partition, read once and
    shuffled in full each epoch. N > 0: the rank's shards are streamed in a per-epoch seeded shard order through
    a seeded N-document shuffle buffer: memory ~ N documents + one shard, but documents mix only within about N
    of their neighbours (pick N of several shards' worth; docs/DATA.md). N >= the partition = the full shuffle."""


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
    whatever the gradient's size, so this sets the users' pace apart from the items' (a measured value:
    docs/experiments/2026-12-01-smollm2-slow-rec-step.md)."""
    item_head_lr_scale: float = 1.0
    """Learning-rate multiplier of the separate item head (model.separate_item_head), in every phase (1 = the
    phase's lr). Adam moves an entry by about lr per step, so at 1e-4 a head drawn at 0.02 moves little in a short
    schedule. A tied head is the
    collaborative item table: a model with one refuses any value other than 1 at setup."""
    adapter_lr_scale: float = 1.0
    """Learning-rate multiplier of the backbone's LoRA adapters (model.adapter lora), in every phase or stage: they
    step at the lr of the parameters they train with (CLLM4Rec: the phase's pretrain/finetune lr; A-LLMRec: stage
    2's lr) times this. LoRA is often run at a larger lr than the tables' 1e-4."""
    grad_clip: float = 0.0
    """Max gradient norm per step (0 = off)."""
    lr_schedule: str = "constant"
    """How the learning rate moves within each phase (CLLM4Rec: warm-up, pretraining, finetuning; A-LLMRec:
    stages 1 and 2), after optim.lr_warmup_fraction: 'constant' (the papers') or 'cosine' (a half cosine from the
    phase's lr down to optim.min_lr_ratio of it at the phase's last step). Every multiplier (user, item head,
    adapter) applies on top."""
    lr_warmup_fraction: float = 0.0
    """Share of each phase's steps over which the lr ramps linearly up to the phase's lr (0 = none)."""
    min_lr_ratio: float = 0.0
    """lr_schedule cosine: the lr at a phase's last step, as a share of the phase's lr."""


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
