"""A random LLaMA checkpoint of a preset's shapes, written shard by shard (bf16 safetensors + index + tokenizer).

Why: a real-size backbone must go through the same ``from_pretrained`` path a downloaded LLaMA-7B takes (config.json,
``model.safetensors.index.json``, one safetensors file per shard), but building the model in memory and calling
``save_pretrained`` would hold all 6.7 B weights at once (13.5 GB in bf16, 27 GB in fp32). Here every shard is drawn
on its own (one decoder layer, ~0.4 GB in bf16 at 7B) and written before the next is drawn, so the writer's memory is
one shard. The folder is written under a temporary name next to ``out_dir`` and renamed when complete; a folder that
already holds a complete checkpoint of the same preset and seed (``random-checkpoint.json``, written last) is reused.

Weights: N(0, initializer_range) for every linear map and the embeddings (LLaMA's own ``_init_weights``), ones for
the RMSNorm scales. The tokenizer is the presets' byte-level BPE (cllm4rec_dist/corpus/presets.py ``build_tokenizer``,
512 entries, trained offline on the demo vocabulary); the model's vocabulary stays the preset's (32,000 rows for
LLaMA-7B), as a LLaMA checkpoint's embedding may be larger than the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

MARKER = "random-checkpoint.json"
"""Written last into a complete folder: preset, seed and shard list; a folder without it is never reused."""


def llama_config(preset: str, vocab: int = 32000, seq_len: int = 2048, tokenizer=None):
    """The LlamaConfig of a LLaMA-family preset (bf16 weights, untied head like LLaMA-7B)."""
    from transformers import LlamaConfig

    from cllm4rec_dist.corpus.presets import PRESETS

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = dict(PRESETS[preset])
    if spec.pop("family") != "llama":
        raise SystemExit(f"preset {preset} is not LLaMA-family")
    spec.setdefault("vocab_size", vocab)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False, **ids, **spec)
    config.dtype = "bfloat16"
    return config


def shard_plan(config) -> list[tuple[str, list[tuple[str, tuple[int, ...], str]]]]:
    """[(file name, [(tensor name, shape, init)])]: the embeddings, one shard per decoder layer, then norm + head."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    n = config.num_hidden_layers
    total = n + 2
    name = "model-{:05d}-of-{:05d}.safetensors"
    plan = [(name.format(1, total), [("model.embed_tokens.weight", (v, d), "normal")])]
    for layer in range(n):
        p = f"model.layers.{layer}."
        plan.append((name.format(layer + 2, total), [
            (p + "self_attn.q_proj.weight", (heads * head_dim, d), "normal"),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, d), "normal"),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, d), "normal"),
            (p + "self_attn.o_proj.weight", (d, heads * head_dim), "normal"),
            (p + "mlp.gate_proj.weight", (f, d), "normal"),
            (p + "mlp.up_proj.weight", (f, d), "normal"),
            (p + "mlp.down_proj.weight", (d, f), "normal"),
            (p + "input_layernorm.weight", (d,), "ones"),
            (p + "post_attention_layernorm.weight", (d,), "ones"),
        ]))
    plan.append((name.format(total, total),
                 [("model.norm.weight", (d,), "ones"), ("lm_head.weight", (v, d), "normal")]))
    return plan


def is_complete(out_dir: str, preset: str, seed: int) -> bool:
    """A folder this writer completed for the same preset and seed, every shard present with its recorded size."""
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    if marker.get("preset") != preset or marker.get("seed") != seed:
        return False
    return all(os.path.getsize(os.path.join(out_dir, file)) == size if os.path.exists(os.path.join(out_dir, file))
               else False for file, size in marker["shards"].items())


def write_random_checkpoint(preset: str, out_dir: str, seed: int = 0, vocab: int = 32000, log=sys.stderr) -> dict:
    """Write (or reuse) the random bf16 checkpoint of ``preset`` in ``out_dir``; returns the marker's content."""
    import torch
    from safetensors.torch import save_file

    from cllm4rec_dist.corpus.documents import Templates
    from cllm4rec_dist.corpus.presets import build_tokenizer
    from cllm4rec_dist.data.demo import vocabulary_text

    out_dir = os.path.abspath(out_dir)
    if is_complete(out_dir, preset, seed):
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
        marker["reused"] = True
        return marker
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"{out_dir} exists and is not a complete random {preset} checkpoint (seed {seed}) written "
                         f"by this tool (no matching {MARKER}): remove it or pass another folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".llama-random-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    start = time.perf_counter()
    try:
        tokenizer = build_tokenizer([vocabulary_text(), *Templates().phrases()], vocab_size=512)
        config = llama_config(preset, vocab=vocab, tokenizer=tokenizer)
        std = config.initializer_range
        generator = torch.Generator().manual_seed(seed)
        plan = shard_plan(config)
        weight_map, sizes, total_bytes = {}, {}, 0
        for k, (file, tensors) in enumerate(plan):
            shard = {}
            for name, shape, init in tensors:
                t = torch.empty(shape, dtype=torch.bfloat16)
                if init == "ones":
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, std, generator=generator)
                shard[name] = t
                weight_map[name] = file
                total_bytes += t.numel() * t.element_size()
            save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
            sizes[file] = os.path.getsize(os.path.join(tmp, file))
            del shard
            elapsed = time.perf_counter() - start
            eta = elapsed / (k + 1) * (len(plan) - k - 1)
            print(f"checkpoint: shard {k + 1}/{len(plan)} written ({elapsed:.0f} s, ETA {eta:.0f} s)", file=log,
                  flush=True)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"preset": preset, "seed": seed, "dtype": "bfloat16", "total_bytes": total_bytes,
                  "params": total_bytes // 2, "shards": sizes, "write_seconds": round(time.perf_counter() - start, 1)}
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
        if os.path.exists(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    marker["reused"] = False
    return marker



BEAUTY_SOURCE = os.path.join(os.environ.get("CLLM4REC_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                                 "shared", "data")),
                             "amazon-cllm4rec-split", "beauty")
"""The CLLM4Rec authors' Amazon Beauty split (10,553 users x 6,086 items): ``../shared/data`` beside the checkout, or
``$CLLM4REC_SHARED_DATA`` (its SOURCE.md says what it is)."""
DEFAULT_CHECKPOINT = "runs/llama7b/random-checkpoint"
"""Where the random 7B checkpoint goes by default (13.5 GB; ``runs/`` is git-ignored)."""


def prepare_beauty(source: str, out_dir: str, backbone: str, log=sys.stderr) -> str:
    """The authors' Beauty interactions (train + valid + test matrices) and item tags as a ``table`` dataset,
    preprocessed with ``backbone``'s tokenizer into ``out_dir`` (reused when its manifest names the same backbone).

    Why real data: the tables then have the paper's Beauty size and the documents their real lengths. The
    project's own random per-user split is applied (the authors' split is not kept: this is a speed and memory
    benchmark, not a reproduction). kcore 5 keeps everything (every user and item has >= 5 interactions)."""
    import csv

    import scipy.sparse as sp

    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.readers import ReaderOptions

    manifest = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            recorded = json.load(f).get("backbone", {})
        if os.path.abspath(str(recorded.get("path"))) == os.path.abspath(backbone):
            return out_dir
        raise SystemExit(f"{out_dir} was preprocessed for backbone {recorded.get('path')}, not {backbone}: "
                         "remove it or pass another --data folder")
    raw = tempfile.mkdtemp(prefix=".beauty-raw-", dir=os.path.dirname(os.path.abspath(out_dir)) or ".")
    try:
        matrix = sum(sp.load_npz(os.path.join(source, f"{part}_matrix.npz")) for part in ("train", "val", "test"))
        matrix = matrix.tocoo()
        with open(os.path.join(raw, "interactions.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["user", "item"])
            writer.writerows(zip(matrix.row.tolist(), matrix.col.tolist()))
        with open(os.path.join(source, "item_tags.json"), encoding="utf-8") as f:
            tags = json.load(f)
        with open(os.path.join(raw, "items.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["item", "item_text"])
            writer.writerows((item, "Tags: " + ", ".join(words)) for item, words in tags.items())
        print(f"beauty: {matrix.nnz} interactions written, preprocessing for {backbone}", file=log, flush=True)
        preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[raw]), out=out_dir,
                                    backbone=backbone))
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return out_dir


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b-shape")
    p.add_argument("--out", default=DEFAULT_CHECKPOINT)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(write_random_checkpoint(a.preset, a.out, a.seed)))
