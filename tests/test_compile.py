"""`model.compile`: the backbone's decoder layers torch.compile'd (model/backbone.py ``compile_decoder_layers``).

Through `cllm4rec train`, the single-process entry point (the Ray and deepspeed workers build the same model from the
same settings): a compiled run follows the eager run step for step, L, C and rec steps and the evaluation alike, and
the settings a compiled backbone cannot take are refused with one line naming `model.compile` before anything runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from checks import one_line_error

from cllm4rec_dist.cli import main as cli
from cllm4rec_dist.corpus.presets import build_backbone
from cllm4rec_dist.model import backbone as bb
from cllm4rec_dist.model.backbone_settings import cxx_compiler
from cllm4rec_dist.train.monitor import read_train_log

SHORT = ["--schedule.warmup_epochs", "0", "--schedule.pretrain_epochs", "1", "--schedule.finetune_epochs", "1",
         "--schedule.finetune_content_fraction", "0.1", "--batch.batch_size", "16", "--batch.max_length", "96",
         "--log_every", "1000", "--dist.num_workers", "1"]


@pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile needs a C++ compiler (g++ or $CXX)")
def test_a_compiled_backbone_trains_and_scores_like_the_eager_one(demo_data, tmp_path, monkeypatch):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli(["train", "--data", demo_data, "--out", str(eager), *SHORT]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert cli(["train", "--data", demo_data, "--out", str(compiled), *SHORT, "--model.compile", "true"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled

    reference, log = read_train_log(eager), read_train_log(compiled)
    assert {row["kind"] for row in log} == {"L", "C", "rec"}
    assert [(row["global_step"], row["kind"]) for row in log] == [(r["global_step"], r["kind"]) for r in reference]
    for mine, ref in zip(log, reference):  # fused kernels round differently: equal to fp32 rounding, not bitwise
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5), (mine, ref)
    for part in ("valid", "test"):
        ours, theirs = (json.loads((run / "metrics.json").read_text())[part] for run in (compiled, eager))
        assert ours["recall@20"] == pytest.approx(theirs["recall@20"], abs=1e-6)

    # Reading the run once (evaluate, export) runs eager: no compiler needed on the machine that reads it.
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    rescored = tmp_path / "rescored.json"
    assert cli(["evaluate", "--checkpoint", str(compiled), "--part", "test", "--out", str(rescored)]) == 0
    test = json.loads((compiled / "metrics.json").read_text())["test"]
    assert json.loads(rescored.read_text())["test"]["recall@20"] == pytest.approx(test["recall@20"], abs=1e-6)
    assert cli(["export", "--checkpoint", str(compiled), "--out", str(tmp_path / "export")]) == 0


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_decoder_layers_are_found_and_compiled_in_place(preset, tmp_path):
    model = bb.freeze(bb.load_backbone(build_backbone(preset, str(tmp_path / preset)), device="cpu"))
    names = [name for name, _ in model.named_parameters()]
    layers = bb.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers >= 2
    assert bb.compile_decoder_layers(model) == len(layers)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    assert all(layer._compiled_call_impl is not None for layer in layers)


@pytest.mark.parametrize("flags, needle", [
    (["--model.precision", "int8"], "int8"),
    (["--model.precision", "nf4"], "nf4"),
])
def test_a_quantised_backbone_is_refused_in_one_line(demo_data, tmp_path, capsys, flags, needle):
    assert cli(["train", "--data", demo_data, "--out", str(tmp_path / "r"), *SHORT, *flags,
                "--model.compile", "true"]) == 2
    one_line_error(capsys, "model.compile", needle, "fp32, bf16")
    assert not (tmp_path / "r" / "train_log.jsonl").exists()


def test_no_cxx_compiler_is_refused_in_one_line_naming_the_fix(demo_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cli(["train", "--data", demo_data, "--out", str(tmp_path / "r"), *SHORT, "--model.compile", "true"]) == 2
    one_line_error(capsys, "model.compile", "no-such-compiler", "install")
    assert not (tmp_path / "r" / "train_log.jsonl").exists()


def test_allmrec_compiles_its_llm_after_the_adapter(tmp_path):
    """A-LLMRec's LLM reads the same setting (``model.backbone_settings()``); the layers are compiled with their
    LoRA adapters in them, so the adapters train through the compiled code."""
    from cllm4rec_dist.model.backbone_settings import BackboneSettings
    from cllm4rec_dist.recommenders.allmrec.model import LLMAlignment

    location = {"path": build_backbone("tiny-llama", str(tmp_path / "tiny")), "gguf_file": None}
    llm = LLMAlignment.load(location, BackboneSettings(adapter="lora", compile=True), user_dim=8, item_dim=8,
                            device="cpu")
    layers = bb.decoder_layers(llm.backbone)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert any("lora_A" in name for name, _ in layers[0].named_parameters())
