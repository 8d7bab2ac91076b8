"""The training recipe (torchtune-style): setup -> train -> save, shared by every entry point.

The single-process reference (`cllm4rec train`), each Ray Train worker and each
`deepspeed` launcher process run this same class; they differ only in the Rank,
the engine factory (torch Adam or DeepSpeed ZeRO) and the checkpoint sink.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from cllm4rec_dist.atomic import write_json_atomic
from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.sequences import ITEMS_FILE
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.adapter import is_adapter_name
from cllm4rec_dist.recommenders.cllm4rec.batches import CorpusBatches, read_partition
from cllm4rec_dist.recommenders.cllm4rec.builder import build_model
from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec
from cllm4rec_dist.recommenders.cllm4rec.schedule import CORPUS_OF, build_schedule, total_steps
from cllm4rec_dist.recommenders.cllm4rec.trainer import SHARED_GROUP, Trainer
from cllm4rec_dist.train.checkpoint import load_trainable, read_trainable
from cllm4rec_dist.train.engines import DataParallelEngine, ShardedEngine, scaled_groups
from cllm4rec_dist.train.monitor import Monitor
from cllm4rec_dist.train.projector import EmbeddingProjector
from cllm4rec_dist.train.rank import Rank
from cllm4rec_dist.train.run_folder import default_run_dir, settle_run_config
from cllm4rec_dist.train.settings import BatchSettings
from cllm4rec_dist.train.timing import PhaseTimer, write_timing

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig


def build_engines(model: CLLM4Rec, groups: dict, engine_factory, lr: float, cfg: TrainConfig) -> dict:
    """One engine per parameter group: ``engine_factory``'s (torch Adam or DeepSpeed ZeRO) for replicated
    parameters; a ShardedEngine for a group holding row shards, with the factory's engine inside for the group's
    replicated rest (e.g. a replicated item head beside row-sharded tables); a DataParallelEngine for the group
    stepped beside every step kind's own engine (``SHARED_GROUP``: adapters, or the backbone of FtAll/Scratch)."""
    shards = model.row_shards()
    names = {id(p): n for n, p in model.named_parameters()}
    if model.item_head is None and cfg.optim.item_head_lr_scale != 1.0:
        raise ValueError(f"optim.item_head_lr_scale={cfg.optim.item_head_lr_scale} but this model scores items with "
                         "its collaborative item table (a tied backbone's head): set model.separate_item_head true "
                         "for a head of its own, or leave the scale at 1")
    scale_of = {id(p): cfg.optim.user_lr_scale for p in model.user_table_parameters()}
    if model.item_head is not None:
        scale_of[id(model.item_head.weight)] = cfg.optim.item_head_lr_scale
    scale_of |= {id(p): cfg.optim.adapter_lr_scale for p in model.adapter_parameters()}
    engines = {}
    for name, params in groups.items():
        if name == SHARED_GROUP:
            # stepped in every step kind, its backward run by that kind's engine (LoRA adapters, or the whole
            # backbone for FtAll/Scratch): a DeepSpeed engine would never reduce its gradients, data-parallel torch Adam
            engines[name] = DataParallelEngine(name, scaled_groups(params, scale_of), lr, cfg.optim.weight_decay,
                                               cfg.optim.grad_clip)
            continue
        own = {names[id(p)]: (p, shards[names[id(p)]]) for p in params if names[id(p)] in shards}
        rest = [p for p in params if names[id(p)] not in shards]
        if not own:
            engines[name] = engine_factory(name, scaled_groups(params, scale_of), lr)
            continue
        inner = engine_factory(name, scaled_groups(rest, scale_of), lr) if rest else None
        engines[name] = ShardedEngine(name, own, lr, cfg.optim.weight_decay, cfg.optim.grad_clip, inner, scale_of)
    return engines


class CLLM4RecRecipe:
    def __init__(self, cfg: TrainConfig, rank: Rank, engine_factory, sink, timer: PhaseTimer | None = None):
        self.cfg, self.rank, self.engine_factory, self.sink = cfg, rank, engine_factory, sink
        self.timer = timer or PhaseTimer()  # rank 0 writes it to <run>/timing.json
        if not cfg.out:
            cfg.out = default_run_dir()

    def setup(self) -> CLLM4RecRecipe:
        cfg, rank = self.cfg, self.rank
        os.makedirs(cfg.out, exist_ok=True)
        timer = self.timer
        with timer.phase("data"):
            data = ShardedDataset(cfg.data)
        torch.manual_seed(cfg.seed)  # identical table init on every rank
        with timer.phase("backbone_load"):
            model = build_model(cfg, data, "cuda" if torch.cuda.is_available() and cfg.dist.use_gpu else "cpu")
        if model.vocab_size != data.vocab_size:
            raise ValueError(f"{cfg.data} was tokenised for a vocabulary of {data.vocab_size} but the backbone has "
                             f"{model.vocab_size}; re-run `cllm4rec preprocess` with this backbone.")
        self.model = model
        space = TokenSpace(data.vocab_size, data.num_users, data.num_items)

        settings = BatchSettings(batch_size=cfg.batch.batch_size, max_length=cfg.batch.max_length,
                                 reorder=cfg.reorder, mask_ratio=cfg.batch.mask_ratio, seed=cfg.batch.seed)
        if cfg.uses_content and data.corpus_entry("content")["num_docs"] == 0:
            raise ValueError(f"{cfg.data} has no content documents (no reviews, bios or item texts), so there is no "
                             "content LLM to train: run with --ablation cf (the collaborative-only LLM-CF).")
        kinds = ("L", "C", "rec") if cfg.uses_content else ("L", "rec")
        # This process's data streams: its own rank's partition, or W of them when standing in for W ranks.
        world = rank.world_size * rank.accumulate
        streams = range(rank.rank * rank.accumulate, (rank.rank + 1) * rank.accumulate)
        with timer.phase("data"):
            batches = {k: [CorpusBatches.for_rank(data, CORPUS_OF[k], space, settings, s, world) for s in streams]
                       for k in kinds}
        blocks = build_schedule(cfg, {k: b[0].steps_per_epoch for k, b in batches.items()})

        resuming = cfg.resume and self.sink.has_checkpoint()
        if cfg.init_from and not resuming:
            # Before the engines exist: ZeRO keeps its own fp32 master copy of what it is given.
            # A run pretrained without an adapter can be finetuned with one: the adapter keeps its fresh init (LoRA's
            # B = 0, so the adapted backbone starts as the frozen one).
            load_trainable(model, read_trainable(cfg.init_from, model, keeps_own=is_adapter_name),
                           f"{cfg.init_from} (init_from)")
        groups = model.parameter_groups()
        if not cfg.uses_content:
            groups.pop("content", None)
        with timer.phase("engines"):
            engines = build_engines(model, groups, self.engine_factory, cfg.optim.pretrain_lr, cfg)
        with timer.phase("data"):
            eval_docs = read_partition(data, "eval", rank.rank, rank.world_size)[0]  # the users this rank scores
        self.trainer = Trainer(cfg, model, engines, batches, blocks, eval_docs, space, rank, self.sink, logger=None,
                               cold_items=data.manifest.get("cold_items", []), timer=timer)
        with timer.phase("resume"):
            resumed = resuming and self.sink.load_latest(self.trainer)
        settle_run_config(self.trainer.restored_config if resumed else None, cfg, rank.is_main,
                          data.manifest.get("content_hash"))
        state = self.trainer.state
        # The monitor starts after the resume so that it drops log lines past the checkpoint.
        self.trainer.log = Monitor(cfg.out, rank.is_main, cfg.log_every, rank.world_size * rank.accumulate,
                                   resume_step=state.global_step if resumed else 0)
        if rank.is_main and cfg.projector_sample > 0 and model.shards_across_ranks:
            self.trainer.log.console("[train] projector_sample ignored: the tables are row-sharded across ranks "
                                     "and the projector reads whole tables on rank 0")
        elif rank.is_main and cfg.projector_sample > 0:
            ids = data.read_json("id_maps.json")
            titles = data.read_json(ITEMS_FILE)["titles"] if ITEMS_FILE in data.manifest["files"] else None
            self.trainer.projector = EmbeddingProjector(self.trainer.log.writer, ids["items"], ids["users"], titles,
                                                        cfg.projector_sample, cfg.seed)
        if resumed and rank.is_main:
            self.trainer.log.console(f"[train] resumed at step {state.global_step} (block {state.block}, "
                                     f"step {state.step})")
        if rank.is_main:
            trainable = sum(p.numel() for ps in groups.values() for p in ps)
            adapter = f", LoRA r={cfg.model.lora_rank}" if cfg.model.uses_adapter else ""
            self.trainer.log.console(
                f"[train] {data.num_users} users, {data.num_items} items, backbone {model.config.backbone} "
                f"({cfg.model.precision}{adapter}), {trainable:,} trainable parameters, {len(blocks)} blocks, "
                f"{total_steps(blocks)} steps, world {rank.world_size}")
        return self

    def train(self) -> dict:
        start = time.time()
        self.timer.mark("train_started")
        result = self.trainer.train()
        result["seconds"] = round(time.time() - start, 2)
        if self.rank.is_main and "test" in result:
            write_json_atomic(os.path.join(self.cfg.out, "metrics.json"), result)
        self.trainer.log.close()
        self.timer.mark("train_finished")
        if self.rank.is_main:
            write_timing(self.cfg.out, "rank0", self.timer)
        return result

    def save_checkpoint(self) -> None:
        self.trainer.save_checkpoint()
