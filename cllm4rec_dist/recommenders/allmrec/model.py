"""A-LLMRec (Kim et al., KDD'24): stage 1 (collaborative-text alignment) and stage 2 (alignment with the LLM).

Stage 0 is a frozen sequential CF model (model/cf: ``SequentialCF``) giving item embeddings E_i and
user representations x_u. Stage 1 (``CollabTextAlignment``) encodes each item's text with
Sentence-BERT (Q_i) and trains item/text encoders and decoders so that f_enc^I(E_i) and
f_enc^T(Q_i) match, both reconstruct their input, and the decoded item embedding still
recommends; the joint embedding e_i is f_enc^I(E_i), or f_enc^T(Q_i) for items the CF model
never saw in training (cold). Stage 2 (``LLMAlignment``) projects x_u and e_i into the frozen
LLM's token-embedding space (F_U, F_I), writes them into the soft-token slots of the prompt
(prompts.py) and trains F_U, F_I alone on the next-token loss of the answer title.

The backbone is loaded exactly as CLLM4Rec loads it (model/backbone.py: fp32/bf16/int8/nf4,
frozen); the trainable parts stay fp32 and their outputs are cast to the backbone's compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cllm4rec_dist.model import adapter as lora
from cllm4rec_dist.model import backbone as bb
from cllm4rec_dist.recommenders.allmrec.prompts import SoftPrompt
from cllm4rec_dist.recommenders.allmrec.settings import SCORE_MODES

IGNORE = -100


# ---- stage 1 -----------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Q_i = SBERT(text of item i). Fine-tuned (gradients flow into SBERT) or frozen (encoded once, cached)."""

    def __init__(self, sbert, texts: list[str], trainable: bool, batch_size: int = 64):
        super().__init__()
        self.sbert = sbert
        self.texts = list(texts)
        self.trainable = trainable
        self.dim = int(sbert.get_embedding_dimension())
        for p in sbert.parameters():
            p.requires_grad_(trainable)
        self.cache: torch.Tensor | None = None
        self.batch_size = batch_size

    def _forward(self, texts: list[str]) -> torch.Tensor:
        features = self.sbert.preprocess(texts)
        device = next(self.sbert.parameters()).device
        features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
        return self.sbert(features)["sentence_embedding"].float()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """``[N, dim]`` text embeddings of the given item indices."""
        if self.trainable and self.training:
            return self._forward([self.texts[i] for i in items.tolist()])
        return self.all()[items.to(self.all().device)]

    @torch.no_grad()
    def all(self) -> torch.Tensor:
        """``[J, dim]`` every item's embedding without gradient (cached until SBERT changes)."""
        if self.cache is None:
            was = self.sbert.training
            self.sbert.eval()
            self.cache = torch.cat([self._forward(self.texts[k:k + self.batch_size])
                                    for k in range(0, len(self.texts), self.batch_size)])
            self.sbert.train(was)
        return self.cache

    def invalidate(self) -> None:
        """SBERT's weights changed (a training step, a checkpoint load): re-encode on next use."""
        if self.trainable:
            self.cache = None


def item_text(title: str, description: str) -> str:
    """The paper's SBERT input for an item."""
    return f"Title: {title}, Description: {description}" if description else f"Title: {title}"


class CollabTextAlignment(nn.Module):
    """Stage 1: item encoder/decoder over E_i, text encoder/decoder over Q_i (1-layer MLPs, width d')."""

    def __init__(self, cf_dim: int, text_dim: int, joint_dim: int = 128):
        super().__init__()
        self.item_encoder = nn.Linear(cf_dim, joint_dim)
        self.item_decoder = nn.Linear(joint_dim, cf_dim)
        self.text_encoder = nn.Linear(text_dim, joint_dim)
        self.text_decoder = nn.Linear(joint_dim, text_dim)

    def losses(self, user: torch.Tensor, item_pos: torch.Tensor, item_neg: torch.Tensor, text_pos: torch.Tensor,
               text_neg: torch.Tensor, alpha: float, beta: float) -> dict[str, torch.Tensor]:
        """The paper's stage-1 objective for a batch of (user x_u, next item, sampled negative).

        matching = MSE(f_enc^I(E), f_enc^T(Q)); reconstruction of E (weight alpha) and of Q (weight
        beta); recommendation = BCE of x_u . f_dec^I(f_enc^I(E)) for the next item (1) and the negative (0).
        """
        items = torch.cat([item_pos, item_neg])
        texts = torch.cat([text_pos, text_neg])
        z_item, z_text = self.item_encoder(items), self.text_encoder(texts)
        matching = F.mse_loss(z_item, z_text)
        decoded_items = self.item_decoder(z_item)
        recon_item = F.mse_loss(decoded_items, items)
        recon_text = F.mse_loss(self.text_decoder(z_text), texts)
        n = item_pos.shape[0]
        logits = (user.repeat(2, 1) * decoded_items).sum(-1)
        labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(logits)
        rec = F.binary_cross_entropy_with_logits(logits, labels)
        loss = matching + alpha * recon_item + beta * recon_text + rec
        return {"loss": loss, "matching": matching, "recon_item": recon_item, "recon_text": recon_text, "rec": rec}

    @torch.no_grad()
    def joint_embeddings(self, item_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                         cold: torch.Tensor) -> torch.Tensor:
        """``[J, d']`` e_i: f_enc^I(E_i) for items seen in training, f_enc^T(Q_i) for cold ones (``cold`` mask)."""
        from_items = self.item_encoder(item_embeddings)
        from_texts = self.text_encoder(text_embeddings.to(from_items))
        return torch.where(cold.to(from_items.device)[:, None], from_texts, from_items)


# ---- stage 2 -----------------------------------------------------------------------------------


def projection(in_dim: int, out_dim: int) -> nn.Sequential:
    """A 2-layer MLP into the LLM's token-embedding space (LayerNorm keeps its scale near the vocab's)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


# Output RMS of ``projection`` at PyTorch's default init: LayerNorm -> GELU gives E[GELU(z)^2] = 0.425 per unit, the
# last Linear(d, d) draws weights from U(-1/sqrt(d), 1/sqrt(d)) (variance 1/(3d)): sqrt(0.425 / 3) = 0.376.
_PROJECTION_INIT_RMS = 0.376


def match_output_scale(module: nn.Sequential, target_rms: float) -> None:
    """Scale a fresh ``projection``'s last layer so that its outputs start at the RMS of the vocabulary embeddings
    (SmolLM2: 0.136, 3x below the default init's 0.376): a soft token then looks like a token to the frozen LLM
    instead of a 3x outlier in its residual stream."""
    with torch.no_grad():
        module[-1].weight.mul_(target_rms / _PROJECTION_INIT_RMS)
        module[-1].bias.mul_(target_rms / _PROJECTION_INIT_RMS)


@dataclass
class SoftBatch:
    """Padded prompts (+ answers) with their soft-token slots, ready for ``LLMAlignment``.

    Right-padded for training and scoring, left-padded for generation (``left=True``).
    """

    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T]
    labels: torch.Tensor           # [B, T], IGNORE except answer tokens (the target AT that position)
    user_slots: torch.Tensor       # [S_u, 2] (row, position)
    user_rows: torch.Tensor        # [S_u] index into the user-vector batch
    item_slots: torch.Tensor       # [S_i, 2]
    item_ids: torch.Tensor         # [S_i] item index

    @classmethod
    def collate(cls, prompts: list[SoftPrompt], answers: list[list[int]] | None = None, fill_id: int = 0,
                left: bool = False) -> SoftBatch:
        answers = answers or [[] for _ in prompts]
        width = max(len(p.ids) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(prompts), width), fill_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        labels = torch.full((len(prompts), width), IGNORE, dtype=torch.long)
        user_slots, user_rows, item_slots, item_ids = [], [], [], []
        for row, (p, a) in enumerate(zip(prompts, answers)):
            n = len(p.ids) + len(a)
            start = width - n if left else 0
            ids[row, start:start + n] = torch.tensor(p.ids + a, dtype=torch.long)
            mask[row, start:start + n] = 1
            if a:
                labels[row, start + len(p.ids):start + n] = torch.tensor(a, dtype=torch.long)
            user_slots += [(row, start + t) for t in p.user_slots]
            user_rows += [row] * len(p.user_slots)
            item_slots += [(row, start + t) for t, _ in p.item_slots]
            item_ids += [i for _, i in p.item_slots]

        def pairs(xs):
            return torch.tensor(xs, dtype=torch.long).reshape(-1, 2)

        return cls(ids, mask, labels, pairs(user_slots), torch.tensor(user_rows, dtype=torch.long),
                   pairs(item_slots), torch.tensor(item_ids, dtype=torch.long))


class LLMAlignment(nn.Module):
    """Stage 2: F_U, F_I (trainable, fp32) around a frozen causal LM loaded as CLLM4Rec loads it."""

    def __init__(self, backbone, user_dim: int, item_dim: int):
        super().__init__()
        self.backbone = bb.freeze(backbone)
        self.hidden_size = bb.hidden_size(backbone)
        device = backbone.get_input_embeddings().weight.device
        self.user_projection = projection(user_dim, self.hidden_size).to(device)
        self.item_projection = projection(item_dim, self.hidden_size).to(device)
        vocab_rms = float(backbone.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        for module in (self.user_projection, self.item_projection):
            match_output_scale(module, vocab_rms)

    @classmethod
    def load(cls, location: dict, settings: lora.BackboneSettings | str, user_dim: int, item_dim: int,
             device: str | None = None):
        """The frozen backbone in ``settings.precision`` with the adapter ``settings.adapter`` asks for (LoRA: trained
        in stage 2 with F_U, F_I; ``adapter_parameters``), and fresh projections. A string: the precision alone."""
        if isinstance(settings, str):
            settings = lora.BackboneSettings(precision=settings)
        backbone = bb.load_backbone(location["path"], settings.precision, gguf_file=location.get("gguf_file"),
                                    device=device)
        module = cls(backbone, user_dim, item_dim)
        lora.apply_adapter(module.backbone, settings)
        lora.set_adapter_training(module.backbone, module.training)
        if settings.compile:  # after the adapter: what is compiled is the adapted layer
            bb.compile_decoder_layers(module.backbone)
        return module

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout
        lora.set_adapter_training(self.backbone, mode)  # a LoRA adapter's own dropout (model.lora_dropout) does
        return self

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The backbone's LoRA parameters (model.adapter lora; none otherwise)."""
        return lora.adapter_parameters(self.backbone)

    def projection_parameters(self) -> list[nn.Parameter]:
        return [*self.user_projection.parameters(), *self.item_projection.parameters()]

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    def inputs_embeds(self, batch: SoftBatch, user_vectors: torch.Tensor | None,
                      item_vectors: torch.Tensor | None) -> torch.Tensor:
        """Vocabulary embeddings of the prompt with F_U(x_u) / F_I(e_i) written into the slots.

        user_vectors: ``[B, d_u]`` x_u per row; item_vectors: ``[J, d']`` e_i of every item.
        """
        dtype = bb.compute_dtype(self.backbone)
        embeds = self.backbone.get_input_embeddings()(batch.input_ids.to(self.device)).to(dtype)
        if len(batch.user_slots):
            values = self.user_projection(user_vectors[batch.user_rows.to(user_vectors.device)].float())
            embeds = embeds.index_put(tuple(batch.user_slots.to(self.device).T), values.to(dtype))
        if len(batch.item_slots):
            values = self.item_projection(item_vectors[batch.item_ids.to(item_vectors.device)].float())
            embeds = embeds.index_put(tuple(batch.item_slots.to(self.device).T), values.to(dtype))
        return embeds

    def _hidden(self, batch: SoftBatch, user_vectors, item_vectors) -> torch.Tensor:
        embeds = self.inputs_embeds(batch, user_vectors, item_vectors)
        # use_cache=False: the config's default (True) builds a KV cache of every layer that nobody reads, and
        # each layer's first write to it is a different guard for a compiled layer (model.compile)
        return self.backbone.base_model(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(self.device),
                                        use_cache=False).last_hidden_state

    def _answer_logprobs(self, batch: SoftBatch, user_vectors, item_vectors) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each answer token [N], its row [N]): the LM head only at answer positions."""
        hidden = self._hidden(batch, user_vectors, item_vectors)
        labels = batch.labels.to(self.device)
        rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)  # position t predicts token t+1
        head = self.backbone.get_output_embeddings()
        logits = head(hidden[rows, cols].to(head.weight.dtype)).float()
        targets = labels[rows, cols + 1]
        return -F.cross_entropy(logits, targets, reduction="none"), rows

    def answer_loss(self, batch: SoftBatch, user_vectors, item_vectors) -> dict[str, torch.Tensor]:
        """Next-token loss on the answer title tokens only (mean over answer tokens); "tokens": the tokens the LLM
        ran on (prompts and answers, no padding), what the console's tokens/s counts."""
        logprobs, _ = self._answer_logprobs(batch, user_vectors, item_vectors)
        return {"loss": -logprobs.mean(), "tokens": batch.attention_mask.sum().float()}

    def _prompt_pass(self, batch: SoftBatch, user_vectors, item_vectors):
        """Forward over left-padded prompts with a KV cache: (outputs, attention mask, last position ids)."""
        embeds = self.inputs_embeds(batch, user_vectors, item_vectors)
        mask = batch.attention_mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        return out, mask, positions[:, -1]

    def head_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` fp32 log-softmax of the LM head at ``hidden`` ``[N, d]`` (any backbone dtype).

        The head's matmul, the log-softmax and every sum after it run in fp32, also for a bf16 backbone (its
        fp32 copy of the head weight is cached): a bf16 logit of magnitude ~20 carries an error of ~0.06."""
        head = self.backbone.get_output_embeddings()
        weight = head.weight
        if weight.dtype != torch.float32:
            key = (weight.data_ptr(), weight.dtype, weight.device)
            if getattr(self, "_head32_key", None) != key:
                self._head32, self._head32_key = weight.detach().float(), key
            weight = self._head32
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        return F.log_softmax(F.linear(hidden.float(), weight, bias), -1)

    def candidate_scores(self, prompts: list[SoftPrompt], user_vectors, item_vectors,
                         titles: list[list[list[int]]], score: str = "sum") -> torch.Tensor:
        """``[B, C]`` score of each row's C candidate titles (``score``: one of SCORE_MODES); see
        ``candidate_scores_by_mode``."""
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {', '.join(SCORE_MODES)}, got {score!r}")
        if score == "first":  # the first token alone: no need to run the rest of the titles
            titles = [[t[:1] for t in row] for row in titles]
        return self.candidate_scores_by_mode(prompts, user_vectors, item_vectors, titles, (score,))[score]

    @torch.no_grad()
    def candidate_scores_by_mode(self, prompts: list[SoftPrompt], user_vectors, item_vectors,
                                 titles: list[list[list[int]]], modes=SCORE_MODES) -> dict[str, torch.Tensor]:
        """``{mode: [B, C]}`` scores of each row's C candidate titles after its prompt, one forward for all the
        ``modes`` (prompts.py ``scoring_prompt`` / ``scored_title``: the title tokens, no EOS).

        Modes: "sum" = summed log-likelihood of the title tokens; "mean" = that over the number of tokens;
        "first" = log-probability of the first title token alone.

        One forward per batch, no padding between candidates: each row holds its prompt ONCE followed by its C
        titles back to back; a block mask lets every title see the prompt and its own earlier tokens only, and
        each title's positions continue the prompt's, so every title is scored exactly as in a separate
        (prompt + title) sequence. The LM head runs only where a title token is predicted (``head_logprobs``:
        fp32 from the final hidden state on; the decoder itself runs in the backbone's dtype).
        """
        c = len(titles[0])
        batch = SoftBatch.collate(prompts, [[tok for t in row for tok in t] for row in titles], self.fill_id(prompts))
        b, width = batch.input_ids.shape
        segment = torch.full((b, width), -2, dtype=torch.long)  # -2 padding, -1 prompt, k title k
        positions = torch.zeros((b, width), dtype=torch.long)
        pred_rows, pred_cols, targets, owners = [], [], [], []
        for row, (p, row_titles) in enumerate(zip(prompts, titles)):
            if len(row_titles) != c:
                raise ValueError(f"row {row} has {len(row_titles)} candidates, row 0 has {c}")
            n = len(p.ids)
            segment[row, :n] = -1
            positions[row, :n] = torch.arange(n)
            start = n
            for k, title in enumerate(row_titles):
                if not title:
                    raise ValueError(f"row {row}, candidate {k}: an empty title cannot be scored")
                length = len(title)
                segment[row, start:start + length] = k
                positions[row, start:start + length] = torch.arange(n, n + length)
                # title token j is predicted at the prompt's last position (j = 0), else at its own token j - 1
                pred_cols += [n - 1, *range(start, start + length - 1)]
                pred_rows += [row] * length
                targets += title
                owners += [row * c + k] * length
                start += length
        seg_q, seg_k = segment[:, :, None], segment[:, None, :]
        allowed = (torch.arange(width)[None, :, None] >= torch.arange(width)[None, None, :]) & (seg_k != -2) & (
            (seg_k == -1) | (seg_k == seg_q))
        allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding rows attend to themselves: no empty softmax
        dtype = bb.compute_dtype(self.backbone)
        mask = torch.zeros((b, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        embeds = self.inputs_embeds(batch, user_vectors, item_vectors)
        hidden = self.backbone.base_model(inputs_embeds=embeds, attention_mask=mask.to(self.device),
                                          position_ids=positions.to(self.device), use_cache=False).last_hidden_state
        rows = torch.tensor(pred_rows, device=self.device)
        cols = torch.tensor(pred_cols, device=self.device)
        token = self.head_logprobs(hidden[rows, cols]).gather(1, torch.tensor(targets, device=self.device)[:, None])
        owner = torch.tensor(owners, device=self.device)
        scores = {}
        for mode in modes:
            if mode == "first":  # each title's first token comes first among its owner's tokens
                first = torch.ones_like(owner, dtype=torch.bool)
                first[1:] = owner[1:] != owner[:-1]
                scores[mode] = token[first, 0]
                continue
            total = torch.zeros(b * c, dtype=torch.float32, device=self.device).index_add_(0, owner, token[:, 0])
            if mode == "mean":
                count = torch.zeros(b * c, dtype=torch.float32, device=self.device).index_add_(
                    0, owner, torch.ones_like(token[:, 0]))
                total = total / count
            scores[mode] = total
        return {mode: v.reshape(b, c).cpu() for mode, v in scores.items()}

    @staticmethod
    def fill_id(prompts: list[SoftPrompt]) -> int:
        """Any id for padding positions (masked out): the first prompt's first token."""
        return prompts[0].ids[0] if prompts and prompts[0].ids else 0

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def generate(self, batch: SoftBatch, user_vectors, item_vectors, max_new_tokens: int, eos: int) -> list[list[int]]:
        """Greedy decoding after left-padded prompts (KV cache); returns each row's new ids up to EOS.

        Eager also when the layers are compiled (model.compile): each layer writes its own entry of the KV cache, a
        guard of its own, so a compiled layer would compile once per layer and per step width."""
        out, mask, last = self._prompt_pass(batch, user_vectors, item_vectors)
        embedding = self.backbone.get_input_embeddings()
        dtype = bb.compute_dtype(self.backbone)
        n = mask.shape[0]
        generated = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            for row in (~done).nonzero().flatten().tolist():
                generated[row].append(int(token[row]))
            done |= token == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            last = last + 1
            out = self.backbone(inputs_embeds=embedding(token[:, None]).to(dtype), attention_mask=mask,
                                position_ids=last[:, None], past_key_values=out.past_key_values, use_cache=True)
        return generated


# ---- the whole model ---------------------------------------------------------------------------


class ALLMRec(nn.Module):
    """The pieces of A-LLMRec under one module, so that checkpoints name them: ``cf.*`` (stage 0, frozen
    after it), ``text.sbert.*`` (fine-tuned in stage 1 unless frozen), ``align.*`` (stage 1) and
    ``llm.user_projection.*`` / ``llm.item_projection.*`` (stage 2). The LLM backbone is never saved, only its LoRA
    adapter (``llm.backbone.*lora_*``, model.adapter lora: trained in stage 2)."""

    def __init__(self, cf: nn.Module, text: TextEncoder, align: CollabTextAlignment, llm: LLMAlignment):
        super().__init__()
        self.cf, self.text, self.align, self.llm = cf, text, align, llm

    def train(self, mode: bool = True):
        super().train(mode)
        self.cf.eval()  # frozen after stage 0 (trained by baselines/sequential.py into a copy): x_u without dropout
        return self

    def row_shards(self) -> dict:
        """No A-LLMRec tensor is row-sharded: every rank holds them whole (the checkpoint interface)."""
        return {}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint holds: all parameters except the frozen LLM (and a frozen SBERT)."""
        skip = ["llm.backbone."] + ([] if self.text.trainable else ["text.sbert."])
        return {n: p.detach().clone() for n, p in self.named_parameters()
                if not any(n.startswith(s) for s in skip) or (n.startswith("llm.backbone.") and p.requires_grad)}

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The parameters a stage trains ("align": encoders/decoders + SBERT unless frozen; "llm": F_U, F_I)."""
        if stage == "align":
            sbert = list(self.text.sbert.parameters()) if self.text.trainable else []
            return [*self.align.parameters(), *sbert]
        if stage == "llm":
            return [*self.llm.projection_parameters(), *self.llm.adapter_parameters()]
        raise ValueError(f"no trainable parameters for stage {stage!r}")
