"""Loading the pretrained decoder that CLLM4Rec extends, and small facts about it.

The backbone always comes from a LOCAL directory (a Hugging Face checkpoint saved with
``save_pretrained``, or a folder holding a GGUF file); nothing is fetched from a hub.
Precisions: fp32, bf16, and bitsandbytes int8 / nf4 (frozen backbones only: quantised
weights cannot be trained). bitsandbytes runs int8 and 4-bit forward and backward on CPU too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

# bitsandbytes logs one line per int8 matmul ("inputs will be cast ... to float16") and one at
# import when the optional CPU kernels package is missing; neither is actionable here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GgufConfig,
    PreTrainedModel,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402

from cllm4rec_dist.model.options import PRECISIONS, QUANTISED  # noqa: E402, F401 (re-exported)
from cllm4rec_dist.resources import fill_cache, gguf_cache  # noqa: E402

GQA_SDPA = "cllm4rec_gqa_sdpa"
"""Name of the attention implementation ``use_gqa_sdpa`` registers with transformers."""


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_backbone(path_or_dir: str | os.PathLike, precision: str = "fp32", gguf_file: str | None = None,
                  from_scratch: bool = False, trainable: bool = False,
                  device: str | torch.device | None = None) -> PreTrainedModel:
    """A causal LM from a local directory, in the given precision.

    path_or_dir: a directory written by ``save_pretrained`` (config.json + weights), or one holding
        ``gguf_file``. Never a hub id: loading is ``local_files_only``.
    precision: "fp32" | "bf16" | "int8" | "nf4" (int8/nf4 through bitsandbytes, frozen only).
    gguf_file: name of a GGUF file inside path_or_dir, unpacked on load into plain dense weights of
        ``precision``: the bf16 GEMMs and the attention path below need dense layers, and transformers
        would otherwise keep them in GGUF blocks where a matmul kernel package is installed.
    from_scratch: keep only the architecture (config) and initialise the weights randomly:
        the paper's LLM-Scratch ablation, where the backbone is trained.
    trainable: the caller will train the backbone (LLM-FtAll); only checked against precision.
    device: where the weights go; default the current CUDA device if there is one, else CPU.

    The returned model is NOT frozen: call ``freeze`` for the usual frozen backbone.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in QUANTISED and from_scratch:
        raise ValueError(f"precision={precision!r} cannot be combined with from_scratch=True: a randomly "
                         "initialised backbone must be trained (LLM-Scratch) and bitsandbytes int8/nf4 weights "
                         "cannot be. Use precision='fp32' or 'bf16' with from_scratch=True.")
    if precision in QUANTISED and trainable:
        raise ValueError(f"precision={precision!r} cannot be combined with a trainable backbone (ft_all, LLM-FtAll): "
                         "bitsandbytes int8/nf4 weights are frozen. Use precision='fp32' or 'bf16' to train the "
                         "backbone, or keep it frozen to use int8/nf4.")
    if precision in QUANTISED and gguf_file is not None:
        raise ValueError(f"precision={precision!r} cannot be combined with gguf_file: transformers dequantises GGUF "
                         "weights and refuses to re-quantise them with bitsandbytes. Use precision='fp32' or 'bf16', "
                         "or convert it once with save_gguf_as_checkpoint(dir, gguf_file, out_dir) and load out_dir "
                         f"in {precision}.")
    directory = Path(path_or_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"backbone directory {str(directory)!r} does not exist: pass a local directory "
                                "written by save_pretrained (or holding the GGUF file); nothing is downloaded")
    if gguf_file is not None and not (directory / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {str(directory)!r}")

    if gguf_file is not None and not from_scratch:
        unpacked = gguf_unpacked(directory, gguf_file)
        if unpacked is not None:  # the same weights, bit for bit, without unpacking the file again
            directory, gguf_file = Path(unpacked), None

    device = torch.device(device) if device is not None else _default_device()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    source = dict(gguf_file=gguf_file) if gguf_file is not None else {}

    if from_scratch:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, **source)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)

    quantization = GgufConfig(dequantize=True) if gguf_file is not None else None
    if precision == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    elif precision == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu"
                                          else torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype,
                                                quantization_config=quantization,
                                                device_map={"": device}, **source)


GEMM_ATTENTION_MAX_SCORES = 2**24
"""Most attention scores (rows x heads x T x T) one layer may hold for the GEMM attention path (32 MiB in
bf16, kept for the backward); larger batches use SDPA's flash kernel, which holds O(T) per row."""


def _masked_gemm_attention(query, key, value, mask, scaling):
    """softmax(q k^T * scaling, masked) v with grouped heads, as two batched GEMMs.

    Query heads are grouped under the key/value head they share (head h uses kv head h // group), so
    q of shape (R, kv_heads, group * T, d) meets k and v without copying them. Scores stay in the input
    dtype: the CPU softmax accumulates in fp32 internally and its bf16 output is what the second GEMM
    would have been fed anyway, so an fp32 copy of the scores would add traffic and no accuracy.
    """
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scores = query.reshape(rows, kv_heads, group * length, dim) @ key.transpose(-1, -2)
    scores = scores.view(rows, kv_heads, group, length, key.shape[2]) * scaling
    mask = mask[:, :, None] if mask.dim() == 4 else mask
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).view(rows, kv_heads, group * length, key.shape[2])
    return (probs @ value).view(rows, heads, length, dim)


def _gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers' "sdpa" attention for a training step on packed rows, without its two costs there.

    1. Grouped-query keys/values are never copied: transformers' own "sdpa" repeats each key/value head
       num_heads/num_kv_heads times (``repeat_kv``) whenever there is a mask, which a packed batch always
       has (block-diagonal causal), and its backward sums the copies back (SmolLM2: 9 heads, 3 kv heads).
    2. With a mask and a gradient to compute, attention runs as two batched GEMMs
       (``_masked_gemm_attention``) when the scores fit ``GEMM_ATTENTION_MAX_SCORES``: the CPU flash
       kernel's masked backward is far slower on CPU for packed rows
       (docs/experiments/2026-11-30-smollm2-cpu-steps.md). Otherwise (no mask: plain causal; no gradient: scoring;
       dropout; large batches) SDPA with ``enable_gqa``.
    """
    if kwargs.get("output_attentions"):
        raise ValueError("the GQA SDPA attention does not return attention weights; load with "
                         "attn_implementation='eager' to get them")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    scores = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
    if (attention_mask is not None and needs_grad and dropout == 0.0 and scores <= GEMM_ATTENTION_MAX_SCORES
            and query.shape[1] % key.shape[1] == 0):
        out = _masked_gemm_attention(query, key, value, attention_mask, scaling)
    else:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, is_causal=is_causal,
                                             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, _gqa_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)  # same boolean masks as "sdpa"


def use_gqa_sdpa(model: PreTrainedModel) -> bool:
    """Switch a backbone that runs transformers' "sdpa" attention with grouped key/value heads to
    ``_gqa_sdpa_attention`` (same result, no key/value copies, GEMM attention for masked training
    steps). Returns whether it switched."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if config._attn_implementation != "sdpa" or not heads or kv_heads == heads:
        return False
    model.set_attn_implementation(GQA_SDPA)
    return True


def save_gguf_as_checkpoint(path_or_dir: str | os.PathLike, gguf_file: str, out_dir: str | os.PathLike) -> str:
    """Dequantise a GGUF checkpoint into a plain fp32 ``save_pretrained`` directory (which int8/nf4 can load).

    transformers refuses both to save a GGUF-loaded model and to bitsandbytes-quantise one, so the
    weights are copied into a fresh model of the same config, without the GGUF quantization entry.
    """
    gguf_model = AutoModelForCausalLM.from_pretrained(path_or_dir, local_files_only=True, dtype=torch.float32,
                                                      gguf_file=gguf_file, device_map={"": "cpu"},
                                                      quantization_config=GgufConfig(dequantize=True))
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(out_dir)
    return str(out_dir)


def gguf_unpacked(path_or_dir: str | os.PathLike, gguf_file: str) -> str | None:
    """The plain fp32 checkpoint of a GGUF file in the file's cache folder (resources.py ``gguf_cache``), written
    by the first load: unpacking SmolLM2's file takes ~11 s of every worker's start otherwise, its plain weights
    load in well under a second. None where the cache cannot be written (the caller unpacks the file itself)."""
    folder = gguf_cache(str(path_or_dir), gguf_file, "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        fill_cache(folder, lambda out: save_gguf_as_checkpoint(path_or_dir, gguf_file, out))
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Make every weight non-trainable and switch to eval mode (dropout off: the model is frozen)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The backbone's stack of decoder layers: the ModuleList of ``config.num_hidden_layers`` modules of one class
    (LLaMA's ``model.layers``, GPT-2's ``transformer.h``), found by shape so that any decoder-only family works."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) == count
                and len({type(layer) for layer in module}) == 1):
            return module
    raise ValueError(f"found no stack of {count} decoder layers in this {type(model).__name__} to compile")


def compile_decoder_layers(model: PreTrainedModel) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``: parameter names, state dicts and
    adapters stay as they are), with dynamic shapes so that the rows and widths of packed batches do not each
    compile anew; the layers are instances of one class, so they share what is compiled. The embeddings, the
    attention-mask construction and the heads stay eager. Returns the number of layers."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def hidden_size(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().embedding_dim


def vocab_size(model: PreTrainedModel) -> int:
    """V: the number of rows of the input embeddings (the ids 0..V-1 of the extended token space)."""
    return model.get_input_embeddings().num_embeddings


def initializer_range(model: PreTrainedModel) -> float:
    return float(getattr(model.config, "initializer_range", None) or 0.02)


def is_tied(model: PreTrainedModel) -> bool:
    """True when the output (LM head) weight shares storage with the input embeddings (GPT-2, SmolLM2)."""
    output = model.get_output_embeddings()
    if output is None:
        return False
    return output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def is_quantised(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_quantized", False)) or getattr(model, "hf_quantizer", None) is not None


def compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype the decoder consumes: that of its (never quantised) input embeddings."""
    return model.get_input_embeddings().weight.dtype


def check_text_ids(texts: list[list[int]], num_words: int) -> None:
    """Texts given as token ids must be the backbone's own: every id in 0..num_words-1."""
    flat = [t for ids in texts for t in ids]
    if flat and not 0 <= min(flat) <= max(flat) < num_words:
        raise ValueError(f"item_text_ids hold ids outside the backbone's vocabulary 0..{num_words - 1}: they must come "
                         "from the backbone's own tokenizer")


TEXT_READING_BATCH_TOKENS = 8192
"""Padded tokens per forward pass when ``mean_text_hidden`` reads many texts."""


@torch.no_grad()
def mean_text_hidden(model: PreTrainedModel, texts: list[list[int]], max_tokens: int,
                     batch_tokens: int | None = None) -> torch.Tensor:
    """(len(texts), d) fp32: per text (vocabulary ids), the mean of the backbone's last hidden states over its first
    ``max_tokens`` tokens, each text read on its own; zeros for an empty text. Texts are sorted by length and
    right-padded into batches of at most ``batch_tokens`` (default ``TEXT_READING_BATCH_TOKENS``): under the causal
    mask a real token never attends to the padding after it, the mean skips the padding, and the sorting keeps
    little of the compute on it."""
    batch_tokens = batch_tokens or TEXT_READING_BATCH_TOKENS
    device = model.get_input_embeddings().weight.device
    out = torch.zeros(len(texts), hidden_size(model), dtype=torch.float32, device=device)
    order = sorted((len(ids[:max_tokens]), row) for row, ids in enumerate(texts) if ids)
    check_text_ids([texts[row][:max_tokens] for _, row in order], vocab_size(model))
    start = 0
    while start < len(order):
        stop = start + 1  # ascending lengths: a batch is as wide as its last text
        while stop < len(order) and (stop + 1 - start) * order[stop][0] <= batch_tokens:
            stop += 1
        batch = order[start:stop]
        width = batch[-1][0]
        input_ids = torch.tensor([texts[row][:n] + [0] * (width - n) for n, row in batch], device=device)
        lengths = torch.tensor([n for n, _ in batch], device=device)
        positions = torch.arange(width, device=device).expand(len(batch), -1)
        embeds = model.get_input_embeddings()(input_ids).to(compute_dtype(model))
        hidden = model.base_model(inputs_embeds=embeds, position_ids=positions,
                                  use_cache=False).last_hidden_state.float()
        real = (positions < lengths[:, None]).unsqueeze(-1)
        out[[row for _, row in batch]] = (hidden * real).sum(1) / lengths[:, None]
        start = stop
    return out
