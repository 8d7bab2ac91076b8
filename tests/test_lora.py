"""LoRA adapters (peft) on the frozen backbone, for both recommenders: settings, gradients against peft applied by
hand, every precision (fp32, bf16, int8, nf4), checkpoint-resume, the PEFT-format export, and a Ray + DeepSpeed run.

Tiny LLaMA- and GPT-2-shaped backbones are built from a config, saved and loaded with from_pretrained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import FILM_TITLES
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cllm4rec_dist.config import TrainConfig, load_config
from cllm4rec_dist.model import adapter as lora
from cllm4rec_dist.model import backbone as bb
from cllm4rec_dist.model.batch import LMBatch, RecBatch
from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss, l_step_loss, rec_step_loss
from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig
from cllm4rec_dist.reference import run_reference
from cllm4rec_dist.settings import ConfigError
from cllm4rec_dist.train.monitor import read_train_log

REPO = Path(__file__).resolve().parents[1]
V, U, J, D = 128, 5, 11, 64  # d = 64: bitsandbytes' 4-bit blocks are 64 wide


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(params=["llama", "gpt2"])
def backbone_dir(request, llama_dir, gpt2_dir):
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


def make_model(path, **overrides) -> CLLM4Rec:
    torch.manual_seed(1)
    settings = dict(backbone=path, num_users=U, num_items=J, device="cpu", adapter="lora", lora_rank=4,
                    lora_alpha=8.0, lora_dropout=0.0)
    settings.update(overrides)
    return CLLM4Rec(ModelConfig(**settings))


def pad_rows(rows):
    width = max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor([len(r) for r in rows])


def lm_batch(kind: str, seed: int = 0) -> LMBatch:
    """L-step documents (MAIN = items) or C-step documents (MAIN = text), as tests/test_model.py builds them."""
    gen = torch.Generator().manual_seed(seed)
    prompts, mains = [], []
    for b, main_len in enumerate([4, 1, 6]):
        if kind == "L":
            prompt = [V + b % U, 17, 23, 42]
            main = [V + U + j for j in torch.randperm(J, generator=gen)[:main_len].tolist()]
        else:
            prompt = [V + b % U, 5, 9, V + U + (3 * b) % J, 11]
            main = torch.randint(1, V, (main_len,), generator=gen).tolist()
        prompts.append(prompt)
        mains.append(main)
    input_ids, attention_mask, lengths = pad_rows([p + m for p, m in zip(prompts, mains)])
    return LMBatch(input_ids, attention_mask, torch.tensor([len(p) for p in prompts]), lengths)


def rec_batch(seed: int = 0) -> RecBatch:
    gen = torch.Generator().manual_seed(seed)
    rows, target_rows, target_items = [], [], []
    for b, (kept, held_out) in enumerate([(3, 2), (1, 1), (5, 3)]):
        items = torch.randperm(J, generator=gen)[: kept + held_out].tolist()
        user = (b + 2) % U
        rows.append([V + user, 17, 23] + [V + U + j for j in items[:kept]] + [V + user, 31, 32])
        target_rows += [b] * held_out
        target_items += items[kept:]
    input_ids, attention_mask, lengths = pad_rows(rows)
    return RecBatch(input_ids, attention_mask, lengths, torch.tensor([(b + 2) % U for b in range(3)]),
                    torch.tensor(target_rows), torch.tensor(target_items))


# ---- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, words", [
    ("adapter", "qlora", "model.adapter"), ("lora_rank", 0, "model.lora_rank"), ("lora_alpha", 0.0, "model.lora_alpha"),
    ("lora_dropout", 1.0, "model.lora_dropout"), ("lora_dropout", -0.1, "model.lora_dropout"),
    ("lora_targets", " , ", "model.lora_targets")])
def test_bad_adapter_settings_are_refused_naming_the_setting(field, value, words):
    cfg = TrainConfig()
    setattr(cfg.model, field, value)
    with pytest.raises(ConfigError, match=words):
        cfg.validate()


@pytest.mark.parametrize("ablation", ["ftall", "scratch"])
def test_an_adapter_with_an_ablation_that_trains_the_whole_backbone_is_refused(ablation):
    cfg = TrainConfig(ablation=ablation)
    cfg.model.adapter = "lora"
    with pytest.raises(ConfigError, match=f"model.adapter=lora with ablation={ablation}"):
        cfg.validate()


def test_default_is_the_papers_frozen_backbone_and_optim_holds_the_adapter_lr():
    cfg = TrainConfig().validate()
    assert cfg.model.adapter == "none" and cfg.optim.adapter_lr_scale == 1.0
    assert isinstance(cfg.model, lora.BackboneSettings)
    assert type(cfg.model.backbone_settings()) is lora.BackboneSettings
    cfg.optim.adapter_lr_scale = 0.0
    with pytest.raises(ConfigError, match="optim.adapter_lr_scale"):
        cfg.validate()


def test_unknown_targets_are_named_with_the_modules_the_backbone_has(llama_dir):
    settings = lora.BackboneSettings(adapter="lora", lora_targets="q_proj,qkv")
    with pytest.raises(ConfigError, match=r"no module named qkv; its modules are: .*o_proj.*q_proj"):
        lora.check_adapter_targets(settings, llama_dir)  # the driver's check: a meta-device skeleton
    with pytest.raises(ConfigError, match="no module named qkv"):
        make_model(llama_dir, lora_targets="q_proj,qkv")
    with pytest.raises(ConfigError, match="lm_head is the backbone's input embedding or LM head"):
        make_model(llama_dir, lora_targets="q_proj,lm_head")


def test_default_targets_are_peft_per_architecture(llama_dir, gpt2_dir):
    assert lora.lora_config(lora.BackboneSettings(adapter="lora"), bb.load_backbone(llama_dir, device="cpu")) \
        .target_modules == {"q_proj", "v_proj"}
    config = lora.lora_config(lora.BackboneSettings(adapter="lora"), bb.load_backbone(gpt2_dir, device="cpu"))
    assert config.target_modules == {"c_attn"} and config.fan_in_fan_out  # GPT-2's Conv1D


# ---- gradients reach only tables, heads and adapters --------------------------------------------

def test_hidden_states_and_gradients_equal_peft_applied_by_hand(backbone_dir):
    from peft import LoraConfig, get_peft_model

    model = make_model(backbone_dir, lora_targets=None)
    adapters = dict(model.backbone.named_parameters())
    with torch.no_grad():
        for name, p in adapters.items():
            if ".lora_B." in name:
                p.normal_(0, 0.05)  # B starts at 0 (a no-op adapter): give it a value so the test can tell
    plain = bb.freeze(bb.load_backbone(backbone_dir, device="cpu"))
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[plain.config.model_type]  # peft's defaults
    reference = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets,
                                                 fan_in_fan_out=targets == ["c_attn"]))
    ref_params = dict(reference.base_model.model.named_parameters())
    with torch.no_grad():
        for name, p in adapters.items():
            if ".lora_" in name:
                ref_params[name].copy_(p)
    batch = lm_batch("C")
    embeds = model.embed(batch.input_ids, "content").detach().requires_grad_(True)
    ref_embeds = embeds.detach().clone().requires_grad_(True)
    ours = model.backbone.base_model(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False)
    ref = reference.base_model.model.base_model(inputs_embeds=ref_embeds, position_ids=batch.position_ids,
                                                use_cache=False)
    weights = torch.randn_like(ours.last_hidden_state)
    (ours.last_hidden_state * weights).sum().backward()
    (ref.last_hidden_state * weights).sum().backward()
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state)
    torch.testing.assert_close(embeds.grad, ref_embeds.grad)
    for name, p in adapters.items():
        if ".lora_" in name:
            torch.testing.assert_close(p.grad, ref_params[name].grad)
        else:
            assert not p.requires_grad and p.grad is None, name
            assert ref_params[name].grad is None, name
    # and the adapter changes the output: a zero-B adapter would not
    plain = bb.freeze(bb.load_backbone(backbone_dir, device="cpu"))
    base = plain.base_model(inputs_embeds=embeds.detach(), position_ids=batch.position_ids, use_cache=False)
    assert not torch.allclose(base.last_hidden_state, ours.last_hidden_state)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "nf4"])
def test_every_precision_trains_the_adapter_and_nothing_else_of_the_backbone(llama_dir, precision):
    model = make_model(llama_dir, precision=precision, lora_dropout=0.1)
    groups = model.parameter_groups()
    adapter = model.adapter_parameters()
    assert len(adapter) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert [id(p) for p in groups["backbone"]] == [id(p) for p in adapter]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter)
    frozen = {n: (p.dtype, p.detach().clone()) for n, p in model.backbone.named_parameters() if ".lora_" not in n}
    if precision in ("int8", "nf4"):
        assert bb.is_quantised(model.backbone)
    assert {dtype for dtype, _ in frozen.values()} >= {torch.bfloat16 if precision == "bf16" else torch.float32}
    before = [p.detach().clone() for p in adapter]
    params = [p for ps in groups.values() for p in ps]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(4):
        for kind, fn in (("L", l_step_loss), ("C", c_step_loss)):
            out = fn(model, lm_batch(kind, seed=step % 2))
            optimizer.zero_grad()
            out["loss"].backward()
            for name, p in model.backbone.named_parameters():
                if ".lora_" not in name:
                    assert p.grad is None and not p.requires_grad, name
            assert all(p.grad is not None for p in adapter[1::2])  # every B gets a gradient
            optimizer.step()
            losses.append(float(out["loss"]))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p) for b, p in zip(before, adapter))
    for name, p in model.backbone.named_parameters():
        if ".lora_" not in name:
            assert p.dtype == frozen[name][0] and torch.equal(p.detach(), frozen[name][1]), name
    # the adapters' dropout runs in training only; the frozen backbone itself stays in eval mode
    from peft.tuners.lora import LoraLayer
    layers = [m for m in model.backbone.modules() if isinstance(m, LoraLayer)]
    assert all(m.lora_dropout["default"].training for m in layers) and not model.backbone.training
    model.eval()
    assert not any(m.lora_dropout["default"].training for m in layers)


def test_rec_step_reaches_the_adapter_of_a_tied_gpt2(gpt2_dir):
    model = make_model(gpt2_dir)
    rec_step_loss(model, rec_batch())["loss"].backward()
    assert all(p.grad is not None for p in model.adapter_parameters()[1::2])
    assert model.collab_item_table.weight.grad is not None
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if ".lora_" not in n)


# ---- the real runs: resume, export, Ray + DeepSpeed --------------------------------------------

# LLM-CF (no content corpus): the run tests stay short; the adapter is stepped in every L- and rec-step (the C-step
# reaches it too: test_every_precision_trains_the_adapter_and_nothing_else_of_the_backbone).
CONFIG = """
ablation: cf
schedule:
  warmup_epochs: 0
  pretrain_epochs: 2
  finetune_epochs: 1
optim:
  finetune_lr: 0.001
  adapter_lr_scale: 2.0
model:
  adapter: lora
  lora_rank: 4
  lora_dropout: 0.0  # the Ray workers draw their own dropout masks: compared with one process, none
batch:
  batch_size: 8
  max_length: 96
  shuffle_buffer: 24
dist:
  num_workers: 2
log_every: 1000
"""


@pytest.fixture(scope="module")
def config_file(demo_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "lora.yaml"
    path.write_text(f"data: {demo_data}\n{CONFIG}")
    return path


def reference_config(config_file, out, **overrides) -> TrainConfig:
    cfg = load_config(str(config_file))
    cfg.out, cfg.simulate_ranks = str(out), 2  # one process standing in for the 2 Ray workers
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def reference_run(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_ref")
    result = run_reference(reference_config(config_file, out))
    return out, result


def test_the_adapter_trains_at_its_own_lr_and_its_optimizer_state_is_checkpointed(reference_run):
    out, result = reference_run
    assert result["test"]["num_users"] > 0
    checkpoint = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = torch.load(checkpoint / "optim-backbone.pt", weights_only=True)
    assert [g["lr_scale"] for g in state["param_groups"]] == [2.0]
    assert len(state["param_groups"][0]["params"]) == 8 and state["state"]  # the adapters, stepped
    assert "[train]" in (out / "console.log").read_text() and "LoRA r=4" in (out / "console.log").read_text()


def test_resume_mid_block_gives_the_same_losses_and_metrics(reference_run, config_file, tmp_path):
    out, result = reference_run
    uninterrupted = read_train_log(out)
    stop_at = len(uninterrupted) // 2
    partial = run_reference(reference_config(config_file, tmp_path, max_steps=stop_at, checkpoint_interval_s=0))
    assert partial["stopped"] and partial["global_step"] == stop_at
    resumed = run_reference(reference_config(config_file, tmp_path))
    log = read_train_log(tmp_path)
    assert [r["loss"] for r in log] == [r["loss"] for r in uninterrupted]  # bit-identical
    assert resumed["test"] == result["test"]


def test_a_run_pretrained_without_an_adapter_is_finetuned_with_one_from_its_checkpoint(config_file, tmp_path):
    """init_from a run without an adapter into a LoRA run: the tables come from the checkpoint and the adapter keeps
    its fresh init; the other way round (the adapter's weights would be dropped) is refused."""
    from cllm4rec_dist.model.adapter import is_adapter_name
    from cllm4rec_dist.train.checkpoint import CheckpointError

    plain = reference_config(config_file, tmp_path / "plain", max_steps=3, checkpoint_interval_s=0)
    plain.model.adapter = "none"
    run_reference(plain)
    source = max((tmp_path / "plain" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    saved = torch.load(source / "trainer.pt", weights_only=True)["trainable"]
    assert saved and not any(is_adapter_name(n) for n in saved)

    adapted = reference_config(config_file, tmp_path / "lora", max_steps=1, checkpoint_interval_s=0,
                               init_from=str(source))
    run_reference(adapted)
    step = max((tmp_path / "lora" / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    after = torch.load(step / "trainer.pt", weights_only=True)["trainable"]
    assert sorted(n for n in after if not is_adapter_name(n)) == sorted(saved)
    assert any(is_adapter_name(n) for n in after)
    # one Adam step moves a weight by about its learning rate; a fresh table would be init_std (0.02) away
    bound = 1.5 * max(adapted.optim.pretrain_lr, adapted.optim.finetune_lr) * max(
        1.0, adapted.optim.user_lr_scale, adapted.optim.item_head_lr_scale)
    for name, value in saved.items():
        assert (after[name] - value).abs().max() <= bound, name

    back = reference_config(config_file, tmp_path / "back", max_steps=1, init_from=str(step))
    back.model.adapter = "none"
    with pytest.raises(CheckpointError, match=r"extra .*lora_A.*model settings"):
        run_reference(back)


def test_export_writes_the_adapter_in_peft_format_that_peft_loads_with_the_trained_outputs(reference_run, tmp_path):
    from peft import PeftModel

    from cllm4rec_dist.corpus.shards import ShardedDataset
    from cllm4rec_dist.export_run import export_checkpoint
    from cllm4rec_dist.recommenders.cllm4rec.builder import build_model
    from cllm4rec_dist.train.checkpoint import load_trainable, read_saved_weights

    out, _ = reference_run
    manifest = export_checkpoint(str(out), str(tmp_path / "export"), user_vectors=False)
    assert manifest["adapter"]["format"] == "peft"
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj",
                                                                                                     "v_proj"]
    # the trained model (best weights, as exported) against peft's own loading onto the plain backbone
    saved = read_saved_weights(str(out))
    cfg = load_config(str(out / "config.yaml"))
    data = ShardedDataset(cfg.data)
    trained = build_model(cfg, data, "cpu", loads_weights=True)
    load_trainable(trained, saved.tensors)
    backbone_dir = data.manifest["backbone"]["path"]
    loaded = PeftModel.from_pretrained(bb.load_backbone(backbone_dir, device="cpu"), str(tmp_path / "export" /
                                                                                         "adapter"))
    loaded.eval()
    trained.eval()
    ids = torch.randint(0, trained.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trained.backbone(input_ids=ids).logits
        theirs = loaded(input_ids=ids).logits
        plain = bb.load_backbone(backbone_dir, device="cpu")(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours)
    assert not torch.allclose(plain, ours, atol=1e-5)  # the adapter was trained: it changes the outputs


@pytest.mark.slow
def test_ray_deepspeed_workers_train_the_adapter_like_the_reference(reference_run, config_file, tmp_path):
    from test_distributed import assert_same_losses, launch

    out = tmp_path / "ray"
    launch([sys.executable, "launchers/pretrain_llama.py", "--config", str(config_file)], out)
    assert_same_losses(out, read_train_log(reference_run[0]))
    assert json.loads((out / "metrics.json").read_text())["test"]["num_users"] > 0
    assert (out / "export" / "adapter" / "adapter_model.safetensors").is_file()
    # the adapters' Adam state (the same on every rank: averaged gradients, data-parallel) written once
    assert list((out / "ray").rglob("optim-backbone.pt")) and list((out / "ray").rglob("optim-collab-rank1.pt"))


# ---- A-LLMRec: stage 2 with an adapter, and the TALLRec-style variant ------------------------------

TITLES = FILM_TITLES


@pytest.mark.parametrize("precision, soft", [("fp32", True), ("int8", True), ("fp32", False)])
def test_allmrec_stage2_trains_the_projections_and_the_adapter_only(film_llm, precision, soft):
    from torch import nn

    from cllm4rec_dist.corpus.presets import load_tokenizer
    from cllm4rec_dist.recommenders.allmrec.model import ALLMRec, LLMAlignment, SoftBatch
    from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts

    torch.manual_seed(0)
    settings = lora.BackboneSettings(precision=precision, adapter="lora", lora_rank=4, lora_dropout=0.0)
    llm = LLMAlignment.load(film_llm, settings, user_dim=6, item_dim=8, device="cpu")
    prompts = ALLMRecPrompts(load_tokenizer(film_llm), TITLES)
    rows = [prompts.prompt([k, k + 1, k + 2], [k + 3, k + 4, k + 5, k + 6], soft=soft) for k in range(4)]
    batch = SoftBatch.collate(rows, [prompts.answer(k + 4) for k in range(4)], prompts.fill_id)
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)

    class Frozen(nn.Module):
        trainable = False

    model = ALLMRec(nn.Linear(2, 2), Frozen(), nn.Linear(2, 2), llm)
    adapter = llm.adapter_parameters()
    assert adapter and {id(p) for p in model.stage_parameters("llm")} == {
        id(p) for p in [*llm.projection_parameters(), *adapter]}
    assert {n for n, p in llm.backbone.named_parameters() if p.requires_grad} == {
        n for n, p in llm.backbone.named_parameters() if ".lora_" in n}
    trained = adapter if not soft else [*llm.projection_parameters(), *adapter]
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    llm.train()
    losses = []
    for _ in range(6):
        loss = llm.answer_loss(batch, users, items)["loss"]
        loss.backward()
        assert all(p.grad is None for n, p in llm.backbone.named_parameters() if ".lora_" not in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    ids = {id(p) for p in trained}
    for name, param in llm.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (id(param) in ids), name
    # the checkpoint holds the adapter beside the projections (the backbone's frozen weights never)
    saved = model.saved_state()
    assert {n for n in saved if n.startswith("llm.backbone.")} == {
        f"llm.{n}" for n, p in llm.named_parameters() if ".lora_" in n}
    from cllm4rec_dist.train.checkpoint import load_trainable
    load_trainable(model, saved)


def test_tallrec_variant_trains_the_adapter_on_titles_only_prompts():
    from cllm4rec_dist.recommenders import recommender
    from cllm4rec_dist.report.runs import with_variant

    variants = recommender("allmrec").named_variants()
    assert variants["allmrec"].default and not variants["tallrec"].default
    cfg = with_variant(TrainConfig(recommender="allmrec"), "tallrec", variants["tallrec"].settings).validate()
    assert cfg.model.adapter == "lora" and cfg.allmrec.stage2_soft_tokens is False
    plain = TrainConfig(recommender="allmrec")
    plain.allmrec.stage2_soft_tokens = False
    with pytest.raises(ConfigError, match="set model.adapter lora"):
        plain.validate()
