"""The CLLM4Rec module: a frozen decoder whose vocabulary is extended with user and item tokens.

Token space: vocab ids 0..V-1, user i -> V + i, item j -> V + I + j. Vocab ids embed through the
backbone's own (frozen) input embeddings; user/item ids through one of two pairs of trainable
tables, the collaborative ones (Z^l, used by the collaborative LLM and the recommender) or the
content ones (Z^c, used by the content LLM). Items are scored by ``item_head_weight()``: the
collaborative item table itself for tied backbones (GPT-2), a separate J x d head otherwise (LLaMA).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from cllm4rec_dist.model import adapter as lora
from cllm4rec_dist.model import backbone as bb
from cllm4rec_dist.model.sharding import (
    RowLayout,
    RowShardedTable,
    all_reduce_sum_,
    current_layout,
    init_rows_,
    row_sharded_topk,
    vocab_parallel_nll,
)
from cllm4rec_dist.recommenders.cllm4rec.settings import ModelConfig

SIDES = ("collab", "content")
TEXT_HIDDEN_MAX_TOKENS = 128
"""Tokens of an item's text the backbone reads for ``cold_item_source="text_hidden"`` (a title and attributes fit;
a long description is cut, as the item's prompt text would be)."""


def text_rows(vocab: torch.Tensor, item_text_ids: list[list[int]] | None, num_items: int) -> torch.Tensor:
    """(num_items, d): row j the mean of ``vocab``'s rows over item j's text ids; the vocabulary's mean row where an
    item has no text."""
    if item_text_ids is None or len(item_text_ids) != num_items:
        raise ValueError(f"token_init='text' and content_init='text' need item_text_ids for each of the {num_items} "
                         f"items (got {'none' if item_text_ids is None else len(item_text_ids)})")
    bb.check_text_ids(item_text_ids, vocab.shape[0])
    rows = vocab.mean(0).repeat(num_items, 1)
    has_text = [j for j, ids in enumerate(item_text_ids) if ids]
    if has_text:
        bags = [torch.tensor(item_text_ids[j], dtype=torch.long) for j in has_text]
        offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
        rows[has_text] = nn.functional.embedding_bag(torch.cat(bags).to(vocab.device), vocab,
                                                     offsets.to(vocab.device), mode="mean")
    return rows


def warm_map_sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What ``cold_item_map`` is fitted from, over some warm items (inputs ``x``: content rows or text readings;
    scoring rows ``y``; float64): X^T X, X^T Y, the column sums of X and Y, the sum of squares of X and the item
    count, in one vector, so that ranks holding different items add theirs up with one all-reduce."""
    count = torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
    return torch.cat([(x.T @ x).reshape(-1), (x.T @ y).reshape(-1), x.sum(0), y.sum(0),
                      torch.stack([x.pow(2).sum(), count])])


def cold_item_map(sums: torch.Tensor, dims: tuple[int, int],
                  ridge: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, x_offset, y_offset) of the ridge regression from the map's inputs (``dims[0]`` wide: content rows or text
    readings, ``ModelConfig.cold_item_source``) to scoring rows (``dims[1]``) fitted on ``warm_map_sums`` of all
    warm items; a cold item's scoring row is (x - x_offset) W + y_offset (``ModelConfig.cold_item_ridge``).
    ``ridge`` None: through the origin, ridge 1e-3 x the mean squared row norm (offsets 0). A number r: centred,
    C_xx = X^T X - n m_x m_x^T (C_xy likewise), ridge r x tr(C_xx) / n, offsets the warm means."""
    dx, dy = dims
    xtx, xty = sums[: dx * dx].view(dx, dx), sums[dx * dx: dx * dx + dx * dy].view(dx, dy)
    rest = sums[dx * dx + dx * dy:]
    x_sum, y_sum, (squares, count) = rest[:dx], rest[dx: dx + dy], rest[dx + dy:]
    eye = torch.eye(dx, dtype=sums.dtype, device=sums.device)
    if ridge is None:
        return torch.linalg.solve(xtx + eye * 1e-3 * squares / count, xty), x_sum * 0, y_sum * 0
    x_mean, y_mean = x_sum / count, y_sum / count
    cxx, cxy = xtx - count * torch.outer(x_mean, x_mean), xty - count * torch.outer(x_mean, y_mean)
    return torch.linalg.solve(cxx + eye * ridge * torch.trace(cxx) / count, cxy), x_mean, y_mean


class CLLM4Rec(nn.Module):
    def __init__(self, config: ModelConfig, backbone: PreTrainedModel | None = None):
        """Build the model; ``backbone`` may be passed already loaded (it must match ``config.precision``)."""
        super().__init__()
        config.check()
        if config.cold_item_source == "text_hidden" and (config.item_text_ids is None
                                                        or len(config.item_text_ids) != config.num_items):
            raise ValueError(f"cold_item_source='text_hidden' needs item_text_ids for each of the "
                             f"{config.num_items} items")
        self.config = config
        self._text_hidden: torch.Tensor | None = None  # this rank's item_text_hidden rows (cold_item_source)
        if backbone is None:
            backbone = bb.load_backbone(config.backbone, config.precision, gguf_file=config.gguf_file,
                                        from_scratch=config.from_scratch, trainable=config.backbone_trainable,
                                        device=config.device)
        if config.backbone_trainable and bb.is_quantised(backbone):
            raise ValueError("ft_all/from_scratch need a trainable backbone but this one is quantised (int8/nf4): "
                             "load it with precision='fp32' or 'bf16'")
        self.backbone = backbone
        if config.gqa_attention:
            bb.use_gqa_sdpa(backbone)
        if self.backbone_trainable:
            if config.uses_adapter:
                raise ValueError("ft_all/from_scratch train the whole backbone; an adapter (model.adapter) adapts a "
                                 "frozen one: use one or the other")
            for param in backbone.parameters():
                param.requires_grad_(param.is_floating_point())
            backbone.train(self.training)
        else:
            bb.freeze(backbone)
            if not lora.has_adapter(backbone):
                lora.apply_adapter(backbone, config)  # model.adapter lora: the adapters are its only trainable part
            lora.set_adapter_training(backbone, self.training)
        if config.compile:  # after the adapter: what is compiled is the adapted layer
            bb.compile_decoder_layers(backbone)

        self.num_users, self.num_items = config.num_users, config.num_items
        self.vocab_size = bb.vocab_size(backbone)
        self.hidden_size = d = bb.hidden_size(backbone)
        self.init_std = config.init_std if config.init_std is not None else bb.initializer_range(backbone)
        device = backbone.get_input_embeddings().weight.device

        separate = config.separate_item_head
        if separate is None:
            separate = not bb.is_tied(backbone)
        if not separate and config.item_head_sharding != config.table_sharding:
            raise ValueError(f"item_head_sharding={config.item_head_sharding!r} but this backbone scores items "
                             f"with the collaborative item table (tied head), which follows table_sharding="
                             f"{config.table_sharding!r}: set both the same")
        # Row-sharded tables draw their values block by block from one seed taken from the global RNG, so that
        # they are the same on any number of ranks; replicated ones keep the global-RNG init of earlier versions.
        row_seed = (int(torch.randint(2**31 - 1, ())) if "row" in (config.table_sharding, config.item_head_sharding)
                    else 0)

        token_mean, token_std = 0.0, self.init_std
        if "text" in (config.token_init, config.content_init) or config.token_init == "vocab":
            vocab = backbone.get_input_embeddings().weight.detach().float()  # one fp32 copy (bf16 backbones)
        if config.token_init in ("vocab", "text"):
            token_mean, token_std = vocab.mean(0), vocab.std(0)
        item_mean, item_std = token_mean, token_std
        if config.token_init == "text":
            item_mean, item_std = text_rows(vocab, config.item_text_ids, self.num_items), self.init_std

        def table(rows: int, sharding: str, index: int, mean=0.0,
                  std: float | torch.Tensor = self.init_std) -> nn.Module:
            # fp32 master copy whatever the backbone's precision. ``mean``: a scalar, a per-column vector or a
            # (rows, d) matrix of per-row means.
            per_row = isinstance(mean, torch.Tensor) and mean.dim() == 2
            if sharding == "row":
                sharded = RowShardedTable(rows, d, current_layout(rows), device=device)
                start, count = sharded.layout.start, sharded.weight.shape[0]
                init_rows_(sharded.weight, start, std, row_seed * 8 + index, mean=0.0 if per_row else mean)
                if per_row:
                    with torch.no_grad():
                        sharded.weight += mean[start:start + count].to(device)
                return sharded
            emb = nn.Embedding(rows, d, device=device, dtype=torch.float32)
            if isinstance(std, torch.Tensor) or per_row:
                with torch.no_grad():
                    emb.weight.copy_(torch.randn(rows, d, device=device) * std + mean)
            else:
                nn.init.normal_(emb.weight, mean=0.0, std=std)
            return emb

        users, items = dict(mean=token_mean, std=token_std), dict(mean=item_mean, std=item_std)
        self.collab_user_table = table(self.num_users, config.table_sharding, 0, **users)
        self.collab_item_table = table(self.num_items, config.table_sharding, 1, **items)
        self.content_user_table = table(self.num_users, config.table_sharding, 2, **users)
        self.content_item_table = table(self.num_items, config.table_sharding, 3, **items)
        if config.content_init == "collab":
            # after the content draws, so the item head's init (and every later draw) is that of "draw"
            with torch.no_grad():
                self.content_user_table.weight.copy_(self.collab_user_table.weight)
                self.content_item_table.weight.copy_(self.collab_item_table.weight)
        elif config.content_init == "text":
            # the content item draw itself, standardised and rescaled, is the jitter: no further draw
            weight = self.content_item_table.weight
            start = self.content_item_table.layout.start if isinstance(self.content_item_table, RowShardedTable) else 0
            rows = slice(start, start + weight.shape[0])
            mean = item_mean[rows] if isinstance(item_mean, torch.Tensor) and item_mean.dim() == 2 else item_mean
            text = text_rows(vocab, config.item_text_ids, self.num_items)[rows].to(weight.device)
            with torch.no_grad():
                weight.copy_(text + (weight - mean) / item_std * self.init_std)

        self.item_head = None
        if separate:
            if config.item_head_sharding == "row":
                self.item_head = table(self.num_items, "row", 4)
            else:
                self.item_head = nn.Linear(d, self.num_items, bias=False, device=device, dtype=torch.float32)
                nn.init.normal_(self.item_head.weight, mean=0.0, std=self.init_std)

    # ---- facts -------------------------------------------------------------------------------

    @property
    def backbone_trainable(self) -> bool:
        return self.config.backbone_trainable

    @property
    def compute_dtype(self) -> torch.dtype:
        return bb.compute_dtype(self.backbone)

    @property
    def user_offset(self) -> int:
        return self.vocab_size

    @property
    def item_offset(self) -> int:
        return self.vocab_size + self.num_users

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.backbone_trainable:
            self.backbone.eval()  # a frozen backbone never runs dropout
            lora.set_adapter_training(self.backbone, mode)  # its adapters' own dropout does (model.lora_dropout)
        return self

    # ---- weights -----------------------------------------------------------------------------

    def item_head_weight(self) -> torch.Tensor:
        """(J, d) weight scoring the items, in the L-step and the rec-step alike."""
        return self.collab_item_table.weight if self.item_head is None else self.item_head.weight

    def item_head_layout(self) -> RowLayout:
        """The rows (items) of the item head this rank holds: all of them unless the head is row-sharded."""
        head = self.collab_item_table if self.item_head is None else self.item_head
        return head.layout if isinstance(head, RowShardedTable) else RowLayout(self.num_items)

    def row_shards(self) -> dict[str, RowLayout]:
        """{parameter name: its layout} of every row-sharded parameter (what a sharded checkpoint holds), also on
        one process (a world of 1), so that a run can move between numbers of ranks."""
        return {f"{name}.weight": module.layout for name, module in self.named_children()
                if isinstance(module, RowShardedTable)}

    @property
    def shards_across_ranks(self) -> bool:
        """True when some table or head is split over several ranks: forward passes, losses and top-K are
        then collective (every rank must run the same calls)."""
        return any(layout.distributed for layout in self.row_shards().values())

    def vocab_head_weight(self) -> torch.Tensor:
        """(V, d) weight of the backbone's own LM head (frozen unless ft_all), for the C-step."""
        output = self.backbone.get_output_embeddings()
        if output is None or not output.weight.is_floating_point():
            raise ValueError("the backbone's LM head is missing or quantised; keep lm_head out of int8/nf4 "
                             "quantisation (transformers does so by default)")
        return output.weight[: self.vocab_size]

    def tables(self, side: str) -> tuple[nn.Embedding, nn.Embedding]:
        """(user table, item table) of side "collab" or "content"."""
        if side == "collab":
            return self.collab_user_table, self.collab_item_table
        if side == "content":
            return self.content_user_table, self.content_item_table
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")

    def embedding_tables(self) -> dict[str, tuple[str, torch.Tensor]]:
        """The learned tables by name -> ("item" | "user", (rows, d) weight), for inspection (the
        TensorBoard projector). A tied backbone has no separate item head: its head is ``collab_item``.
        Row-sharded tables give this rank's rows only (``row_shards`` says which)."""
        tables = {"collab_item": ("item", self.collab_item_table.weight),
                  "content_item": ("item", self.content_item_table.weight)}
        if self.item_head is not None:
            tables["item_head"] = ("item", self.item_head.weight)
        tables |= {"collab_user": ("user", self.collab_user_table.weight),
                   "content_user": ("user", self.content_user_table.weight)}
        return tables

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by step kind: "collab" (L- and rec-steps), "content" (C-steps), "backbone" (stepped
        in every step: the whole backbone for ft_all/from_scratch, its LoRA adapters for model.adapter lora)."""
        groups = {
            "collab": [self.collab_user_table.weight, self.collab_item_table.weight],
            "content": [self.content_user_table.weight, self.content_item_table.weight],
            "backbone": list(self.backbone.parameters()),
        }
        if self.item_head is not None:
            groups["collab"].append(self.item_head.weight)
        groups = {name: [p for p in params if p.requires_grad] for name, params in groups.items()}
        return {name: params for name, params in groups.items() if params}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The backbone's LoRA adapter parameters (model.adapter lora; none otherwise)."""
        return lora.adapter_parameters(self.backbone)

    def user_table_parameters(self) -> list[nn.Parameter]:
        """The collaborative and content user tables: one row per user, each row in few steps an epoch."""
        return [self.collab_user_table.weight, self.content_user_table.weight]

    @torch.no_grad()
    def set_unseen_items_from_content(self, items) -> None:
        """Cold items (never in a collaborative document) get the rows that score them from their content.
        ``cold_item_source="content_rows"``: their collaborative rows take the MODE of the mutual-regularisation
        prior z_collab ~ N(z_content, I / lambda_c), i.e. their content rows, which the C-steps trained on their
        texts (no likelihood term pulls the collaborative row anywhere else); a separate item head (untied
        backbones) has no prior of its own, so its cold rows come from a ridge regression, fitted on the warm items,
        from content rows to head rows. ``"text_hidden"``: the scoring rows (separate head, else collaborative)
        come from the same ridge fitted from the backbone's reading of the warm items' texts
        (``item_text_hidden``). With row-sharded tables or head each rank sets its own rows (the regression's sums
        are all-reduced); every rank must call this."""
        device = self.collab_item_table.weight.device
        cold = torch.as_tensor(list(items), dtype=torch.long, device=device)
        if cold.numel() == 0:
            return
        from_text = self.config.cold_item_source == "text_hidden"
        if not from_text:
            tables = (self.collab_item_table.layout if isinstance(self.collab_item_table, RowShardedTable)
                      else RowLayout(self.num_items))
            local = cold[(cold >= tables.start) & (cold < tables.stop)] - tables.start  # same rows in both tables
            self.collab_item_table.weight[local] = self.content_item_table.weight[local]
            if self.item_head is None:
                return
        scoring = self.item_head_weight()  # this rank's rows of the separate head or the collaborative table
        layout = self.item_head_layout()
        warm = torch.ones(self.num_items, dtype=torch.bool, device=device)
        warm[cold] = False
        own = torch.arange(layout.start, layout.stop, device=device)
        own_warm, own_cold = own[warm[own]], own[~warm[own]]
        if from_text and (self._text_hidden is None or self.backbone_trainable):  # a frozen backbone reads once
            self._text_hidden = self.item_text_hidden(own)
        x_warm, warm_has_text = self._cold_map_inputs(own_warm)
        fit = own_warm[warm_has_text]
        sums = warm_map_sums(x_warm[warm_has_text], scoring[fit - layout.start].double())
        if layout.distributed:
            all_reduce_sum_(sums)
        if not sums[-1] > 0:
            raise ValueError("no warm item has a text (item_text_ids) to fit the cold map on; use "
                             "cold_item_source='content_rows'" if from_text else
                             "every item is cold: there is no warm item to fit the cold map on")
        d = self.hidden_size
        mapping, x_offset, y_offset = cold_item_map(sums, (x_warm.shape[1], d), self.config.cold_item_ridge)
        x_cold, cold_has_text = self._cold_map_inputs(own_cold)
        rows = (x_cold - x_offset) @ mapping + y_offset
        rows[~cold_has_text] = y_offset  # nothing to read: the mean warm scoring row
        scoring[own_cold - layout.start] = rows.to(scoring.dtype)

    def _cold_map_inputs(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float64, has_input bool) of ``items`` (this rank's rows of the scoring table): what the cold map
        regresses from. Content rows always exist (a lookup, collective when the tables are sharded); a text
        reading (``_text_hidden``: this rank's rows, kept while the backbone is frozen, as large as the rank's
        scoring rows) only where the item has text."""
        if self.config.cold_item_source == "content_rows":
            return self.content_item_table(items).double(), torch.ones_like(items, dtype=torch.bool)
        layout = self.item_head_layout()
        has_text = torch.tensor([bool(self.config.item_text_ids[j]) for j in items.tolist()], dtype=torch.bool,
                                device=items.device)
        return self._text_hidden[items - layout.start].double(), has_text

    def item_text_hidden(self, items: torch.Tensor) -> torch.Tensor:
        """(n, d) fp32: per item, the mean of the backbone's last hidden states over its text's tokens
        (``item_text_ids``, the first ``TEXT_HIDDEN_MAX_TOKENS``; ``backbone.mean_text_hidden``); zeros for an item
        without text. No user/item token is read, so this is local to each rank."""
        texts = self.config.item_text_ids
        if texts is None or len(texts) != self.num_items:
            raise ValueError(f"item_text_hidden needs item_text_ids for each of the {self.num_items} items")
        return bb.mean_text_hidden(self.backbone, [texts[j] for j in items.tolist()],
                                   TEXT_HIDDEN_MAX_TOKENS).to(items.device)

    # ---- forward -----------------------------------------------------------------------------

    def id_embeddings(self, token_ids: torch.Tensor, side: str) -> torch.Tensor:
        """fp32 table rows of user/item tokens (ids >= V), any shape -> (..., d)."""
        user_table, item_table = self.tables(side)
        is_user = token_ids < self.item_offset
        out = torch.empty(*token_ids.shape, self.hidden_size, dtype=torch.float32, device=token_ids.device)
        out[is_user] = user_table(token_ids[is_user] - self.user_offset)
        out[~is_user] = item_table(token_ids[~is_user] - self.item_offset)
        return out

    def embed(self, input_ids: torch.Tensor, side: str = "collab") -> torch.Tensor:
        """inputs_embeds (B, T, d) in the backbone's compute dtype: vocab ids through the backbone's input
        embeddings, user/item ids through ``side``'s tables."""
        is_id_token = input_ids >= self.vocab_size
        vocab_ids = input_ids.masked_fill(is_id_token, 0)
        embeds = self.backbone.get_input_embeddings()(vocab_ids).to(self.compute_dtype)
        embeds[is_id_token] = self.id_embeddings(input_ids[is_id_token], side).to(embeds.dtype)
        return embeds

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      side: str = "collab") -> torch.Tensor:
        """Last-layer hidden states (R, T, d) of the decoder stack (no LM head), in the compute dtype.

        ``position_ids`` restart at 0 for every document (see model/batch.py); no 2D attention mask
        is passed, so transformers derives a causal mask that is block-diagonal over the documents
        of a packed row (and plain causal when nothing is packed: right padding is never attended).
        use_cache=False: the config's default (True) would build a KV cache nobody reads, and with a
        cache present transformers skips the packed-sequence detection (documents would see each other).
        """
        embeds = self.embed(input_ids, side)
        return self.backbone.base_model(inputs_embeds=embeds, position_ids=position_ids,
                                        use_cache=False).last_hidden_state

    def document_hidden(self, batch, positions: torch.Tensor, docs: torch.Tensor, side: str = "collab") -> torch.Tensor:
        """(N, d) fp32 hidden states at ``positions`` (within their document) of documents ``docs`` of a
        batch laid out as in model/batch.py, cast to the fp32 of the tables and heads."""
        hidden = self.hidden_states(batch.input_ids, batch.position_ids, side)
        return hidden[batch.doc_rows[docs], batch.doc_starts[docs] + positions].float()

    def item_nll(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """sum_k -log softmax(hidden[rows_k] @ item_head.T)[cols_k] over the whole catalogue (cols: item ids 0..J-1),
        vocabulary-parallel when the head is row-sharded (it is never gathered)."""
        return vocab_parallel_nll(hidden, self.item_head_weight(), self.item_head_layout(), rows, cols,
                                  max_logit_elements=self.config.max_logit_elements)

    def item_topk(self, hidden: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None):
        """(scores, item ids) of the k best items per row over the whole catalogue, ``exclude[u]`` never returned;
        per rank over its classes and merged when the head is row-sharded."""
        return row_sharded_topk(hidden, self.item_head_weight().detach(), self.item_head_layout(), k, exclude,
                                self.config.max_logit_elements)

    def idle_forward(self) -> None:
        """Take part in the collectives of one forward pass without any data (a rank with no batch left while
        the others still run one; only needed when tables are sharded across ranks)."""
        self.embed(torch.zeros(0, 0, dtype=torch.long, device=self.collab_item_table.weight.device))

    def last_token_hidden(self, batch, side: str = "collab") -> torch.Tensor:
        """(B, d) fp32 hidden state of each document's last token (index lengths-1): the query that scores
        the items in the rec-step and at prediction time (``item_softmax.chunked_topk`` with
        ``item_head_weight()``)."""
        docs = torch.arange(batch.lengths.shape[0], device=batch.lengths.device)
        return self.document_hidden(batch, batch.lengths - 1, docs, side)
