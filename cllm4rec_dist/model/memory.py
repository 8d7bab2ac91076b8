"""The memory model of docs/ARCHITECTURE.md ("Memory per rank: the model") in code: bytes per rank of a frozen
backbone, its trainable tables and their optimizer, for a benchmark to print next to what it measured.

Every term is a count of tensor bytes derived from shapes, except ``runtime`` (the interpreter, torch,
transformers, bitsandbytes and DeepSpeed before any model exists), which the caller measures and passes in.

Backbone, as ``model/backbone.py`` ``load_backbone`` leaves it:
* int8 (bitsandbytes LLM.int8()): every linear map of the decoder layers 1 byte per weight + a fp32 scale per output
  row; everything else (embeddings, untied LM head, norms) in fp32 (``load_backbone`` loads non-quantised
  weights in fp32 on every device).
* nf4: 0.5 byte per linear weight + one fp32 absmax per 64-weight block; the rest fp32 as for int8.
* fp32 / bf16: 4 / 2 bytes per weight.

Loading (``from_pretrained``) adds two things that are gone once the model is built:
* ``load_transient``: the one tensor being converted: a weight read from bf16, cast to the load dtype (fp32) and,
  for a quantised linear, its quantised copy: at most the largest tensor x (4 + 2) bytes per weight (fp32 + bf16
  source while it is cast), a few hundred MB at 7B.
* ``mapped_checkpoint``: transformers memory-maps every safetensors shard for the whole load and touches each
  tensor once, so the process's resident set (and its peak, ``ru_maxrss``) also counts up to the whole checkpoint's
  bytes of CLEAN FILE-BACKED pages. The kernel can drop them under pressure (they are page cache, shared with
  every process reading the same files) and they leave the resident set when the files are closed at the end of
  the load. How many of them are resident at the peak depends on the machine's memory pressure, so the model
  predicts the PRIVATE peak and gives the resident-set peak only as a bound (private + the whole checkpoint).

Training (one rank; ``world`` ranks for ZeRO's partitions): tables + head 4P; torch Adam 8P (both groups once they
have stepped), ZeRO-2 12P/W (Adam's moments and its fp32 master copy, partitioned); dense autograd gradients of the
group stepped 4G, and ZeRO-2's reduced gradient partition 4G/W; activations kept for the backward through the
frozen decoder (``decoder_activation_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NF4_BLOCK = 64
"""bitsandbytes' default 4-bit block size (one fp32 absmax per block, no double quantisation)."""


@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a LLaMA-style decoder that its memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def of(cls, config) -> DecoderShape:
        """From a transformers LlamaConfig-like object (hidden_size, intermediate_size, ...)."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of the linear maps of ONE decoder layer: q, k, v, o, gate, up, down."""
        d, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]

    @property
    def linear_weights(self) -> int:
        return self.layers * sum(o * i for o, i in self.linear_shapes())

    @property
    def linear_rows(self) -> int:
        return self.layers * sum(o for o, _ in self.linear_shapes())

    @property
    def other_weights(self) -> int:
        """Embeddings, the LM head (untied) and the RMSNorm scales: what bitsandbytes leaves unquantised."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def largest_tensor(self) -> int:
        return max([o * i for o, i in self.linear_shapes()] + [self.vocab * self.hidden])


def backbone_bytes(shape: DecoderShape, precision: str) -> int:
    """Resident bytes of the backbone ``load_backbone`` returns in ``precision``."""
    if precision == "int8":
        return shape.linear_weights + 4 * shape.linear_rows + 4 * shape.other_weights
    if precision == "nf4":
        return shape.linear_weights // 2 + 4 * (shape.linear_weights // NF4_BLOCK) + 4 * shape.other_weights
    per_weight = {"fp32": 4, "bf16": 2}[precision]
    return per_weight * (shape.linear_weights + shape.other_weights)


def checkpoint_bytes(shape: DecoderShape, bytes_per_weight: int = 2) -> int:
    """Bytes of the safetensors checkpoint (bf16 by default, as LLaMA-7B is distributed)."""
    return bytes_per_weight * (shape.linear_weights + shape.other_weights)


def decoder_activation_bytes(shape: DecoderShape, tokens: int, longest_row: int, rows: int,
                             bytes_per_value: int = 4) -> int:
    """Tensors a forward through the frozen decoder keeps for the backward to the inputs, all layers.

    Per token and layer, in the compute dtype (fp32 on CPU): the two RMSNorm inputs and outputs (4d), q and k
    before and after the rotary embedding and v (5d), the attention output and o_proj's input (2d), the residual
    sum (d): 12d; the MLP's gate, up, SiLU(gate) and their product (4f). Attention scores and probabilities:
    2 x heads x T^2 per row and layer. No weight gradients (frozen)."""
    d, f = shape.hidden, shape.intermediate
    per_token = 12 * d + 4 * f
    scores = 2 * shape.heads * rows * longest_row * longest_row
    return bytes_per_value * shape.layers * (tokens * per_token + scores)


@dataclass(frozen=True)
class TableShape:
    """Trainable token tables: two user and two item tables of width d, and an item head when the backbone's
    head is untied. ``groups``: the parameter groups stepped separately (collaborative, content)."""

    users: int
    items: int
    dim: int
    item_head: bool = True

    @property
    def params(self) -> int:
        """P = (2I + 2J [+ J]) d."""
        return (2 * self.users + (3 if self.item_head else 2) * self.items) * self.dim

    @property
    def largest_group(self) -> int:
        """G = (I + J [+ J]) d: the collaborative tables and the head, the largest group stepped at once."""
        return (self.users + (2 if self.item_head else 1) * self.items) * self.dim


@dataclass
class MemoryEstimate:
    """Terms in bytes; ``private_peak`` is the number to compare with a measurement (anonymous resident memory)."""

    terms: dict[str, int] = field(default_factory=dict)
    load_private: int = 0
    train_private: int = 0

    @property
    def private_peak(self) -> int:
        return max(self.load_private, self.train_private)

    @property
    def rss_peak_bound(self) -> int:
        """Upper bound of the peak resident set: the load's private bytes plus the whole mapped checkpoint (what it
        reaches when no page of the checkpoint is dropped during the load), or the training peak. The measured peak
        lies between ``private_peak`` and this: the kernel drops clean mapped pages when memory is short."""
        return max(self.train_private, self.load_private + self.terms.get("mapped_checkpoint", 0))

    def as_dict(self) -> dict:
        return {**self.terms, "load_private": self.load_private, "train_private": self.train_private,
                "private_peak": self.private_peak, "rss_peak_bound": self.rss_peak_bound}


def rank_memory(shape: DecoderShape, precision: str, tables: TableShape, *, runtime: int, tokens: int,
                longest_row: int, rows: int, world: int = 1, zero: bool = False, item_logit_rows: int | None = None,
                extra_trainable: int = 0) -> MemoryEstimate:
    """The memory model for one rank of a frozen ``shape`` backbone in ``precision`` training ``tables``.

    tokens / longest_row / rows: the largest step's batch (all rows' tokens, its longest row, its rows).
    zero: DeepSpeed ZeRO-2 engines (else torch Adam). item_logit_rows: positions scored against the catalogue
    (default ``tokens``). extra_trainable: other trainable parameters (e.g. projections into the backbone), Adam and a
    dense gradient included."""
    p, g = tables.params + extra_trainable, tables.largest_group
    terms = {
        "runtime": runtime,
        "backbone": backbone_bytes(shape, precision),
        "load_transient": 6 * shape.largest_tensor,
        "mapped_checkpoint": checkpoint_bytes(shape),
        "tables": 4 * p,
        "optimizer": 12 * p // world if zero else 8 * p,  # ZeRO: Adam + fp32 master, partitioned
        "gradients": 4 * g + (4 * g // world if zero else 0) + 4 * extra_trainable,
        "activations": decoder_activation_bytes(shape, tokens, longest_row, rows),
        "item_softmax": 4 * (item_logit_rows if item_logit_rows is not None else tokens) * max(tables.items,
                                                                                               shape.vocab),
    }
    load_private = terms["runtime"] + terms["backbone"] + terms["load_transient"]
    train_private = sum(terms[k] for k in ("runtime", "backbone", "tables", "optimizer", "gradients", "activations",
                                           "item_softmax"))
    return MemoryEstimate(terms, load_private, train_private)
