"""The A-LLMRec recipe: builds the model, the engines and the trainer (trainer.py) for every entry point."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from cllm4rec_dist.atomic import write_json_atomic
from cllm4rec_dist.corpus.presets import load_tokenizer, run_backbone
from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.sbert import load_sbert
from cllm4rec_dist.recommenders.allmrec.model import (
    ALLMRec,
    CollabTextAlignment,
    LLMAlignment,
    TextEncoder,
    item_text,
)
from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts, chat_template_source
from cllm4rec_dist.recommenders.allmrec.trainer import ALLMRecTrainer
from cllm4rec_dist.settings import ConfigError
from cllm4rec_dist.train.engines import TorchEngine, scaled_groups
from cllm4rec_dist.train.monitor import Monitor
from cllm4rec_dist.train.rank import Rank
from cllm4rec_dist.train.run_folder import default_run_dir, settle_run_config
from cllm4rec_dist.train.timing import PhaseTimer, write_timing

if TYPE_CHECKING:
    from cllm4rec_dist.config import TrainConfig

def build_model(cfg: TrainConfig, data: SequentialData, manifest: dict, device: str) -> tuple[ALLMRec, ALLMRecPrompts]:
    """The A-LLMRec modules a config describes (untrained), and its prompt builder (trainer and export alike)."""
    a = cfg.allmrec
    torch.manual_seed(cfg.seed)  # identical init on every rank
    cf = build_cf(cfg, data.num_items).to(device)
    sbert = load_sbert(a.sbert, device)
    text = TextEncoder(sbert, [item_text(t, d) for t, d in zip(data.titles, data.descriptions)], a.finetune_sbert)
    align = CollabTextAlignment(cf.dim, text.dim, a.text_dim).to(device)
    # The LLM of stage 2. A-LLMRec tokenises its prompts online from the titles: any backbone works on any dataset.
    location = run_backbone(cfg.backbone, manifest)
    llm = LLMAlignment.load(location, cfg.model.backbone_settings(), cf.dim, a.text_dim, device=device)
    tokenizer = load_tokenizer(location)
    prompts = ALLMRecPrompts(tokenizer, data.titles, chat_template=chat_template_source(a.chat_template, tokenizer))
    return ALLMRec(cf, text, align, llm), prompts


def stage2_parameters(cfg: TrainConfig, model: ALLMRec) -> list:
    """What stage 2 trains: F_U, F_I and the LLM's adapter (if any); the adapter alone on titles-only prompts
    (allmrec.stage2_soft_tokens false: no soft token, so the projections would get no gradient)."""
    return model.stage_parameters("llm") if cfg.allmrec.stage2_soft_tokens else model.llm.adapter_parameters()


def build_cf(cfg: TrainConfig, num_items: int):
    """The (untrained) stage-0 CF model of the config."""
    from cllm4rec_dist.model.cf import CF_MODELS

    return CF_MODELS[cfg.allmrec.cf_model](num_items, cfg.allmrec.cf_stage_settings(cfg.seed).model_settings())


def train_cf_stage(cfg: TrainConfig, data: SequentialData, cf, log) -> dict:
    """Stage 0 on this rank (baselines/sequential.py: early stopping on validation); the best model's weights are
    copied into ``cf``; returns its valid/test candidate metrics. With ``allmrec.cf_from`` the model saved
    there is loaded instead (and scored on the candidates again)."""
    from cllm4rec_dist.baselines.sequential import CFStage, evaluate_candidates, load_cf_model

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
        settings = cfg.allmrec.cf_stage_settings(cfg.seed)
        cf.eval()
        return {"valid": evaluate_candidates(cf, data, "valid", settings),
                "test": evaluate_candidates(cf, data, "test", settings), "best_epoch": info.get("best_epoch"),
                "loaded_from": path}
    import torch.distributed as dist

    quiet = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0  # every rank runs stage 0
    stage = CFStage(data, cfg.allmrec.cf_stage_settings(cfg.seed), log=log,
                    progress=None if quiet else (lambda line: print(f"[train] stage 0 {line}", flush=True))).setup()
    result = stage.train()
    cf.load_state_dict(stage.model.state_dict())
    return {"valid": result["valid"], "test": result["test"], "best_epoch": result["best_epoch"]}


class ALLMRecRecipe:
    """setup -> train -> save_checkpoint, like CLLM4RecRecipe; the engine factory builds stage 2's engine."""

    def __init__(self, cfg: TrainConfig, rank: Rank, engine_factory, sink, timer=None):
        self.cfg, self.rank, self.engine_factory, self.sink = cfg, rank, engine_factory, sink
        self.timer = timer or PhaseTimer()  # rank 0 writes it to <run>/timing.json; the stages report their own seconds
        if not cfg.out:
            cfg.out = default_run_dir()

    def setup(self) -> ALLMRecRecipe:
        cfg, rank = self.cfg, self.rank
        os.makedirs(cfg.out, exist_ok=True)
        shards = ShardedDataset(cfg.data)
        data = SequentialData.open(shards)
        device = "cuda" if torch.cuda.is_available() and cfg.dist.use_gpu else "cpu"
        model, prompts = build_model(cfg, data, shards.manifest, device)
        self.model = model
        engines = {"align": TorchEngine("align", model.stage_parameters("align"), cfg.allmrec.stage1_lr,
                                             cfg.optim.weight_decay, cfg.optim.grad_clip),
                   "llm": self.engine_factory("llm", scaled_groups(stage2_parameters(cfg, model), {
                       id(p): cfg.optim.adapter_lr_scale for p in model.llm.adapter_parameters()}),
                       cfg.allmrec.stage2_lr)}
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


