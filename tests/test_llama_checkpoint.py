"""The real-size backbone benchmark's pieces at a tiny preset: the shard-by-shard random checkpoint writer
(benchmarks/llama_checkpoint.py) and the memory model (cllm4rec_dist/model/memory.py) against loaded models.
benchmarks/bench_llama7b_cpu.py runs them at LLaMA-7B size (minutes, ~8 GB: never in the default suite)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from llama_checkpoint import MARKER, is_complete, write_random_checkpoint  # noqa: E402

from cllm4rec_dist.model.backbone import load_backbone  # noqa: E402
from cllm4rec_dist.model.memory import DecoderShape, backbone_bytes, checkpoint_bytes  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("random") / "tiny")
    return out, write_random_checkpoint("tiny-llama", out, seed=3)


def test_the_shards_load_through_from_pretrained_with_the_written_values(tiny_checkpoint):
    out, marker = tiny_checkpoint
    assert not marker["reused"] and is_complete(out, "tiny-llama", 3)
    with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    model = load_backbone(out, "fp32", device="cpu")
    state = model.state_dict()
    assert set(weight_map) == set(state)  # nothing missing (randomly re-initialised) or left over
    for name, file in weight_map.items():
        with safe_open(os.path.join(out, file), framework="pt") as f:
            torch.testing.assert_close(state[name], f.get_tensor(name).float(), rtol=0, atol=0)
    assert marker["total_bytes"] == checkpoint_bytes(DecoderShape.of(model.config))


def test_a_complete_folder_is_reused_and_an_unknown_one_refused(tiny_checkpoint, tmp_path):
    out, marker = tiny_checkpoint
    again = write_random_checkpoint("tiny-llama", out, seed=3)
    assert again["reused"] and again["shards"] == marker["shards"]
    assert not is_complete(out, "tiny-llama", 4)  # another seed is another checkpoint
    stray = tmp_path / "half-written"
    stray.mkdir()
    (stray / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=MARKER):
        write_random_checkpoint("tiny-llama", str(stray))


@pytest.mark.parametrize("precision", ["int8", "nf4", "bf16"])
def test_the_memory_model_counts_the_loaded_backbone(tiny_checkpoint, precision):
    """The backbone term is the loaded model's bytes: its parameters, plus int8's per-row scales and nf4's per-block
    absmax, which are not parameters (bitsandbytes keeps them beside the weights)."""
    out, _ = tiny_checkpoint
    model = load_backbone(out, precision, device="cpu")
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Linear8bitLt":
            measured += module.weight.SCB.numel() * module.weight.SCB.element_size()
        elif type(module).__name__ == "Linear4bit":
            measured += weight.quant_state.absmax.numel() * weight.quant_state.absmax.element_size()
    assert backbone_bytes(DecoderShape.of(model.config), precision) == measured
