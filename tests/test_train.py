"""The single-process reference trainer: schedule, losses fall, beats most-popular, exact resume, config."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
import torch

from cllm4rec_dist.baselines import run_baseline
from cllm4rec_dist.config import TrainConfig, add_config_arguments, config_from_args
from cllm4rec_dist.corpus.shards import ShardedDataset, load_eval_split
from cllm4rec_dist.recommenders.cllm4rec.schedule import Block, build_schedule, interleave
from cllm4rec_dist.recommenders.cllm4rec.settings import CLLM4RecSettings
from cllm4rec_dist.reference import run_reference
from cllm4rec_dist.settings import ConfigError
from cllm4rec_dist.train.checkpoint import READER, READER_FILE
from cllm4rec_dist.train.lr_schedule import LR_SCHEDULES, lr_factor
from cllm4rec_dist.train.monitor import read_train_log
from cllm4rec_dist.train.settings import ScheduleSettings


def tiny_config(data: str, out: str, **overrides) -> TrainConfig:
    cfg = TrainConfig(data=data, out=out, log_every=10_000)
    cfg.schedule = ScheduleSettings(warmup_epochs=1, pretrain_epochs=3, alternate="steps", finetune_epochs=4,
                                    finetune_content_fraction=0.1)
    cfg.optim.finetune_lr = 1e-3
    cfg.batch.batch_size = 16
    cfg.batch.max_length = 128
    cfg.batch.shuffle_buffer = 48  # streamed: smaller than every partition (collab/rec 120 docs, content 1287)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg.validate()


@pytest.fixture(scope="module")
def reference_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run_reference(tiny_config(demo_data, str(out)))
    return out, result


def test_reference_trainer_lowers_all_three_losses(reference_run):
    out, _ = reference_run
    by_kind = defaultdict(list)
    for row in read_train_log(out):
        by_kind[row["kind"]].append(row["lm"])
    assert set(by_kind) == {"C", "L", "rec"}
    for kind, losses in by_kind.items():
        n = max(3, len(losses) // 5)
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
        assert last < first, f"{kind}: {first:.4f} -> {last:.4f}"


def test_reference_trainer_beats_most_popular_and_writes_metrics(reference_run, demo_data):
    out, result = reference_run
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("valid", "test"):
        assert {"recall@20", "recall@40", "ndcg@100"} <= set(metrics[part])
    popular = run_baseline(load_eval_split(demo_data), "popular")
    assert metrics["test"]["recall@20"] > popular["test"]["recall@20"]
    assert metrics["best"]["phase"] == "finetune"
    assert len(metrics["history"]) == 4  # validation after each finetuning epoch
    assert (out / "config.yaml").exists() and list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_console_shows_one_line_per_block_and_the_run_records_its_time_split(reference_run, demo_data):
    out, _ = reference_run
    blocks = schedule_of(tiny_config(demo_data, str(out)), demo_data)
    console = (out / "console.log").read_text().splitlines()
    block_lines = [line for line in console if " epoch " in line and "ETA" in line]
    assert [line.split(" epoch ")[0] for line in block_lines] == [f"[train] {b.phase}" for b in blocks]
    assert sum("valid recall@20" in line for line in block_lines) == sum(b.evaluate for b in blocks)
    assert sum("ETA for the whole schedule" in line for line in console) == 1
    assert any("ETA for the whole schedule" in line and "steps run;" in line for line in console)
    assert len(console) <= len(blocks) + 5  # fits a screen; the detail is in progress.log
    # every evaluation line names how many users its metrics average over (the validations', then the test's)
    metrics = json.loads((out / "metrics.json").read_text())
    progress = (out / "progress.log").read_text().splitlines()
    eval_lines = [line for line in progress if line.startswith("[eval] ")]
    counts = [record["num_users"] for record in metrics["history"]] + [metrics["test"]["num_users"]]
    assert len(eval_lines) == len(counts) and all(n > 0 for n in counts)
    assert [line.rsplit(" (", 1)[1] for line in eval_lines] == [f"{n} users)" for n in counts]
    rank0 = json.loads((out / "timing.json").read_text())["rank0"]
    assert rank0["counts"]["validation"] == sum(b.evaluate for b in blocks) and rank0["counts"]["test"] == 1
    assert rank0["counts"]["train_steps"] == sum(b.steps for b in blocks)
    assert rank0["counts"]["checkpoints"] == 1  # checkpoint_interval_s 600 on a short run: the end of training only
    # logged scalars are all-reduced once per log_every steps and at block ends, not once per step
    steps, log_every = sum(b.steps for b in blocks), tiny_config(demo_data, str(out)).log_every
    assert len(blocks) <= rank0["counts"]["log_reduce"] <= len(blocks) + steps // log_every < steps
    assert {"data", "backbone_load", "engines"} <= set(rank0["seconds"])


def schedule_of(cfg: TrainConfig, data: str) -> list[Block]:
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.corpus.shards import ShardedDataset
    from cllm4rec_dist.recommenders.cllm4rec.batches import BatchSettings, CorpusBatches

    ds = ShardedDataset(data)
    space = TokenSpace(ds.vocab_size, ds.num_users, ds.num_items)
    settings = BatchSettings(batch_size=cfg.batch.batch_size)
    spe = {k: CorpusBatches.for_rank(ds, c, space, settings).steps_per_epoch
           for k, c in (("C", "content"), ("L", "collab"), ("rec", "rec"))}
    return build_schedule(cfg, spe)


def test_resume_mid_block_gives_the_same_losses_and_metrics(reference_run, demo_data, tmp_path):
    out, result = reference_run
    uninterrupted = read_train_log(out)
    blocks = schedule_of(tiny_config(demo_data, str(tmp_path)), demo_data)
    stop_at = blocks[0].steps + blocks[1].steps // 2  # in the middle of the first pretraining block
    assert blocks[1].phase == "pretrain" and "L" in blocks[1].kinds[: blocks[1].steps // 2]
    partial = run_reference(tiny_config(demo_data, str(tmp_path), max_steps=stop_at, checkpoint_interval_s=0))
    assert partial["stopped"] and partial["global_step"] == stop_at
    # the checkpoint holds the streams' state mid-epoch (the buffer partly replaced), which the resume seeks to
    checkpoint = max((tmp_path / "checkpoints").glob("step-*"), key=lambda path: int(path.name.split("-")[1]))
    streams = torch.load(checkpoint / READER_FILE.format(rank=0), weights_only=True)[READER]
    assert {"L", "C", "rec"} == set(streams) and 0 < streams["C"][0]["index"] and streams["C"][0]["admitted"] > 48
    # checkpoint_interval_s 0: one at the end of the warm-up block, one at the stop
    assert json.loads((tmp_path / "timing.json").read_text())["rank0"]["counts"]["checkpoints"] == 2
    resumed = run_reference(tiny_config(demo_data, str(tmp_path)))
    log = read_train_log(tmp_path)
    assert [r["global_step"] for r in log] == [r["global_step"] for r in uninterrupted]
    assert [r["loss"] for r in log] == [r["loss"] for r in uninterrupted]  # bit-identical
    assert resumed["test"] == result["test"]
    # The resumed process's schedule ETA says what it was estimated from: this process's steps, not the run's
    eta = [line for line in (tmp_path / "console.log").read_text().splitlines() if "ETA for the whole" in line][-1]
    measured = int(eta.split("(from the ")[1].split(" steps run")[0])
    assert f"steps run since the resume at step {stop_at};" in eta, eta
    assert measured == blocks[0].steps + blocks[1].steps - stop_at  # shown at the end of the block it resumed in


def test_schedule_shapes():
    cfg = TrainConfig()
    cfg.schedule = ScheduleSettings(warmup_epochs=2, pretrain_epochs=2, alternate="epoch", finetune_epochs=3)
    blocks = build_schedule(cfg, {"C": 5, "L": 2, "rec": 3})
    assert [b.phase for b in blocks] == ["warmup"] * 2 + ["pretrain"] * 4 + ["finetune"] * 6
    assert blocks[2].kinds == ("L", "L") and blocks[3].kinds == ("C",) * 5
    assert sum(b.evaluate for b in blocks) == 3
    assert interleave("L", 3, "C", 5, 2) == ("L", "L", "C", "C", "L", "C", "C", "C")
    cfg.ablation = "cf"
    assert all("C" not in b.kinds for b in build_schedule(cfg, {"C": 5, "L": 2, "rec": 3}))
    cfg.ablation = "prerec"
    pre = build_schedule(cfg, {"C": 5, "L": 2, "rec": 3})
    assert all(b.phase != "finetune" for b in pre) and pre[-1].evaluate
    assert isinstance(pre[0], Block)


def test_config_yaml_and_flags(tmp_path):
    import argparse

    path = tmp_path / "c.yaml"
    path.write_text("schedule:\n  warmup_epochs: 3\nbatch:\n  batch_size: 8\nablation: fixord\n")
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(path), "--batch.batch_size", "4",
                                         "--model.init_std", "none", "--batch.reorder", "true"]))
    assert cfg.schedule.warmup_epochs == 3 and cfg.batch.batch_size == 4 and cfg.model.init_std is None
    assert cfg.ablation == "fixord" and cfg.reorder is False  # the ablation switch wins
    assert "Seed of the data order" in p.format_help()  # per-field docs reach --help
    path.write_text("schedule:\n  warmup_epoch: 3\n")
    with pytest.raises(ValueError, match="unknown setting 'schedule.warmup_epoch'"):
        config_from_args(p.parse_args(["--config", str(path)]))
    with pytest.raises(ValueError, match="model.token_init.*one of normal, vocab, text"):
        config_from_args(p.parse_args(["--model.token_init", "word"]))
    assert config_from_args(p.parse_args(["--model.token_init", "vocab"])).model.token_init == "vocab"
    with pytest.raises(ValueError, match="model.content_init.*one of draw, collab, text"):
        config_from_args(p.parse_args(["--model.content_init", "copy"]))
    assert config_from_args(p.parse_args(["--model.content_init", "collab"])).model.content_init == "collab"
    with pytest.raises(ValueError, match="model.cold_item_ridge=0.0: must be > 0"):
        config_from_args(p.parse_args(["--model.cold_item_ridge", "0"]))
    assert config_from_args(p.parse_args(["--model.cold_item_ridge", "10"])).model.cold_item_ridge == 10.0
    with pytest.raises(ValueError, match="model.cold_item_source.*one of content_rows, text_hidden"):
        config_from_args(p.parse_args(["--model.cold_item_source", "text"]))
    with pytest.raises(ValueError, match="model.cold_item_ridge=None: must be a number > 0 .* text_hidden"):
        config_from_args(p.parse_args(["--model.cold_item_source", "text_hidden"]))
    text_cold = config_from_args(p.parse_args(["--model.cold_item_source", "text_hidden",
                                               "--model.cold_item_ridge", "1"])).model
    assert text_cold.reads_item_texts() and text_cold.reads_item_texts(loads_weights=True)
    starts_at_text = config_from_args(p.parse_args(["--model.content_init", "text"])).model
    assert starts_at_text.reads_item_texts() and not starts_at_text.reads_item_texts(loads_weights=True)
    with pytest.raises(ValueError, match="optim.item_head_lr_scale"):
        config_from_args(p.parse_args(["--optim.item_head_lr_scale", "0"]))
    with pytest.raises(ValueError, match="quantised"):
        TrainConfig(ablation="ftall", model=CLLM4RecSettings(precision="int8")).validate()


def test_a_step_of_one_kind_never_moves_another_kinds_optimizer_state(demo_data, tmp_path):
    import torch

    from cllm4rec_dist.recommenders.cllm4rec.recipe import CLLM4RecRecipe
    from cllm4rec_dist.train.checkpoint import LocalSink
    from cllm4rec_dist.train.engines import TorchEngine
    from cllm4rec_dist.train.rank import Rank

    cfg = tiny_config(demo_data, str(tmp_path))
    recipe = CLLM4RecRecipe(cfg, Rank(), lambda name, params, lr: TorchEngine(name, params, lr),
                            LocalSink(cfg.out)).setup()
    trainer = recipe.trainer

    def adam_state(group):
        opt = trainer.engines[group].optimizer
        return {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in opt.param_groups[0]["params"]
                if p in opt.state}

    trainer.train_step("C")
    trainer.train_step("L")
    collab, content = adam_state("collab"), adam_state("content")
    assert collab and content
    trainer.train_step("C")  # moves content state only
    assert all(torch.equal(v, adam_state("collab")[p][k]) for p, s in collab.items() for k, v in s.items())
    assert not all(torch.equal(v, adam_state("content")[p][k]) for p, s in content.items() for k, v in s.items())
    content = adam_state("content")
    trainer.train_step("rec")  # moves collab state only
    assert all(torch.equal(v, adam_state("content")[p][k]) for p, s in content.items() for k, v in s.items())
    # Entering finetuning gives the rec step a fresh collab optimizer at the finetuning lr.
    finetune = next(b for b in trainer.blocks if b.phase == "finetune")
    trainer.state.block = trainer.blocks.index(finetune)
    trainer.enter_block(finetune)
    assert not trainer.engines["collab"].optimizer.state
    assert trainer.engines["collab"].lr == cfg.optim.finetune_lr == trainer.engines["content"].lr


def test_text_token_init_reads_the_item_texts_of_the_dataset_through_the_backbones_tokenizer(demo_data, tmp_path):
    """model.token_init=text through the recipe: item j starts at the mean input embedding of its items.json
    description as the dataset's backbone tokenises it; then it trains like any other init."""
    from cllm4rec_dist.corpus.presets import load_tokenizer
    from cllm4rec_dist.corpus.shards import ShardedDataset

    cfg = tiny_config(demo_data, str(tmp_path / "run"))
    cfg.model.token_init, cfg.model.init_std = "text", 1e-6
    trainer = _recipe(cfg.validate()).trainer
    model, data = trainer.model, ShardedDataset(demo_data)
    tokenizer = load_tokenizer(data.manifest["backbone"])
    words = model.backbone.get_input_embeddings().weight.detach().float()
    descriptions = data.read_json("items.json")["descriptions"]
    assert len(descriptions) == model.num_items and all(descriptions)
    for j in range(0, model.num_items, 7):
        ids = tokenizer.encode(" " + descriptions[j], add_special_tokens=False)
        torch.testing.assert_close(model.collab_item_table.weight[j].detach(), words[ids].mean(0), atol=1e-5, rtol=0)
    before = model.collab_item_table.weight.detach().clone()
    trainer.train_step("L")
    assert not torch.equal(model.collab_item_table.weight.detach(), before)


def _moves_in_one_l_step(cfg, *names):
    """(trainer, then |change| of each named parameter over one L-step from the recipe's start)."""
    trainer = _recipe(cfg).trainer
    params = dict(trainer.model.named_parameters())
    before = [params[name].detach().clone() for name in names]
    trainer.train_step("L")
    return (trainer, *((params[name].detach() - start).abs() for name, start in zip(names, before)))


def test_user_lr_scale_steps_the_user_tables_at_that_multiple_of_the_phase_lr(demo_data, tmp_path):
    """Adam's first step moves every entry with a gradient by lr (m / sqrt(v) = sign(g)): after one L-step
    the user rows that were in the batch moved by scale x pretrain_lr, the item rows by pretrain_lr. The
    finetuning block sets both learning rates again, and the optimizer state round-trips its groups."""
    cfg = tiny_config(demo_data, str(tmp_path / "run"))
    cfg.optim.user_lr_scale = 4.0
    trainer, user_moves, item_moves = _moves_in_one_l_step(cfg, "collab_user_table.weight",
                                                           "collab_item_table.weight")
    lr = cfg.optim.pretrain_lr
    moved_users, moved_items = user_moves[user_moves > 0], item_moves[item_moves > 0]
    assert moved_users.numel() and moved_items.numel()
    # |step| = lr * |g| / (|g| + eps): lr up to eps, below it only where |g| is near eps
    assert torch.allclose(moved_users.max(), torch.tensor(4.0 * lr), rtol=1e-3)
    assert torch.allclose(moved_items.max(), torch.tensor(lr), rtol=1e-3)
    assert (moved_users > 1.5 * lr).float().mean() > 0.9
    assert (moved_items <= lr * (1 + 1e-5)).all()

    collab = trainer.engines["collab"]
    assert [g.get("lr_scale", 1.0) for g in collab.optimizer.param_groups] == [1.0, 4.0]
    finetune = next(b for b in trainer.blocks if b.phase == "finetune")
    trainer.state.block = trainer.blocks.index(finetune)
    trainer.enter_block(finetune)
    assert collab.lr == cfg.optim.finetune_lr
    assert [g["lr"] for g in collab.optimizer.param_groups] == [cfg.optim.finetune_lr, 4.0 * cfg.optim.finetune_lr]
    trainer.train_step("rec")
    saved = collab.optimizer.state_dict()
    again = _recipe(cfg).trainer.engines["collab"]
    again.optimizer.load_state_dict(saved)
    assert again.lr == cfg.optim.finetune_lr
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in collab.optimizer.param_groups]
    # a resume at another user_lr_scale (allowed by allow_config_change) meets other groups: named, not mixed up
    from cllm4rec_dist.train.checkpoint import CheckpointError, check_optimizer_state
    with pytest.raises(CheckpointError, match="user_lr_scale"):
        check_optimizer_state("optim-collab.pt", saved, [list(collab.params)])


def test_item_head_lr_scale_steps_the_separate_head_at_that_multiple_of_the_phase_lr(demo_data, tmp_path):
    """As for the user tables: after one L-step the separate item head's entries moved by scale x pretrain_lr,
    the item table's by pretrain_lr, in a param group of its own. A model whose head is the collaborative item
    table (separate_item_head false) refuses a scale other than 1 before training."""
    cfg = tiny_config(demo_data, str(tmp_path / "run"))
    cfg.optim.item_head_lr_scale = 3.0
    trainer, head_moves, item_moves = _moves_in_one_l_step(cfg, "item_head.weight", "collab_item_table.weight")
    lr = cfg.optim.pretrain_lr
    assert torch.allclose(head_moves.max(), torch.tensor(3.0 * lr), rtol=1e-3)
    assert (head_moves[head_moves > 0] > 1.5 * lr).float().mean() > 0.9
    assert torch.allclose(item_moves.max(), torch.tensor(lr), rtol=1e-3)
    collab = trainer.engines["collab"]
    assert [g.get("lr_scale", 1.0) for g in collab.optimizer.param_groups] == [1.0, 3.0]
    assert [len(g["params"]) for g in collab.optimizer.param_groups][1] == 1  # the head alone

    tied = tiny_config(demo_data, str(tmp_path / "tied"))
    tied.optim.item_head_lr_scale, tied.model.separate_item_head = 3.0, False
    with pytest.raises(ValueError, match="item_head_lr_scale=3.0 but this model scores items with its collab"):
        _recipe(tied)


def test_collab_content_init_reaches_the_model_through_the_config(demo_data, tmp_path):
    """model.content_init=collab in the config: the recipe's model starts each content row at its collaborative row."""
    cfg = tiny_config(demo_data, str(tmp_path / "run"))
    cfg.model.content_init = "collab"
    model = _recipe(cfg).trainer.model
    assert torch.equal(model.content_user_table.weight, model.collab_user_table.weight)
    assert torch.equal(model.content_item_table.weight, model.collab_item_table.weight)


def test_text_content_init_reads_the_item_texts_of_the_dataset(demo_data, tmp_path):
    """model.content_init=text: the recipe tokenises items.json with the backbone's tokenizer and the content item
    rows start at those texts' mean word rows (init_std tiny, so the jitter vanishes); collaborative rows do not."""
    from cllm4rec_dist.corpus.presets import load_tokenizer
    from cllm4rec_dist.corpus.sequences import ITEMS_FILE

    cfg = tiny_config(demo_data, str(tmp_path / "run"))
    cfg.model.content_init, cfg.model.init_std = "text", 1e-7
    model = _recipe(cfg).trainer.model
    data = ShardedDataset(demo_data)
    tokenizer = load_tokenizer(data.manifest["backbone"])
    words = model.backbone.get_input_embeddings().weight.detach().float()
    texts = data.read_json(ITEMS_FILE)["descriptions"]
    expected = torch.stack([words[tokenizer.encode(" " + t, add_special_tokens=False)].mean(0) if t
                            else words.mean(0) for t in texts])
    torch.testing.assert_close(model.content_item_table.weight.detach(), expected, atol=1e-5, rtol=0)
    assert model.collab_item_table.weight.abs().max() < 1e-5


def train_command_one_epoch_each(data, out) -> dict:
    """`cllm4rec train` with one pretraining and one finetuning epoch; returns metrics.json."""
    from cllm4rec_dist.cli import main

    assert main(["train", "--data", data, "--out", str(out), "--schedule.warmup_epochs", "0",
                 "--schedule.pretrain_epochs", "1", "--schedule.finetune_epochs", "1",
                 "--schedule.finetune_content_fraction", "0", "--batch.max_length", "64"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_train_command_writes_metrics_json(demo_data, tmp_path, capsys):
    metrics = train_command_one_epoch_each(demo_data, tmp_path / "run")
    for part in ("valid", "test"):
        assert {"recall@20", "recall@40", "ndcg@100"} <= set(metrics[part])
    assert '"test"' in capsys.readouterr().out


def test_sparse_cold_item_regime_end_to_end(demo_raw, tmp_path):
    """preprocess --max-train-per-user/--cold-item-fraction -> train: cold items are never trained on and are
    reported as their own slice, scored through their content rows."""
    from cllm4rec_dist.cli import main
    from cllm4rec_dist.corpus.shards import ShardedDataset

    data = str(tmp_path / "data")
    assert main(["preprocess", "--format", "table", "--input", demo_raw, "--out", data,
                 "--max-train-per-user", "6", "--cold-item-fraction", "0.2"]) == 0
    ds = ShardedDataset(data)
    cold = set(ds.manifest["cold_items"])
    assert len(cold) == round(0.2 * ds.num_items)
    for doc in ds.read_corpus("eval"):
        assert len(doc["train"]) <= 6 and not cold & set(doc["train"])
    metrics = train_command_one_epoch_each(data, tmp_path / "run")
    for part in ("valid", "test"):
        assert metrics[part]["num_cold_users"] > 0 and metrics[part]["cold/recall@20"] is not None
        # ranked among the cold items alone, and the floor of a random order of them
        assert metrics[part]["cold_only/recall@20"] >= metrics[part]["cold/recall@20"]
        assert 0 < metrics[part]["cold_only_random/recall@20"] <= 1  # 1 when fewer than 20 cold items are left
    # `cllm4rec evaluate` sets the cold rows from content as training did: the same slices
    from cllm4rec_dist.evaluate_run import EvaluateError, evaluate_checkpoint

    result = evaluate_checkpoint(str(tmp_path / "run"))
    for part in ("valid", "test"):
        assert metric_values(result[part]) == pytest.approx(metric_values(metrics[part]), abs=1e-6)
    # another cold map for the separate head: only the cold items' scores change, so every warm-only user keeps
    # the metrics; the override is recorded
    centred = evaluate_checkpoint(str(tmp_path / "run"), parts=("test",), cold_item_ridge=10.0)
    assert centred["cold_item_ridge"] == 10.0 and result["cold_item_ridge"] is None
    assert centred["test"]["cold_only_random/recall@20"] == result["test"]["cold_only_random/recall@20"]
    assert centred["test"]["cold/recall@20"] != result["test"]["cold/recall@20"] or \
        centred["test"]["cold_only/recall@20"] != result["test"]["cold_only/recall@20"]
    # the cold items scored from the backbone's reading of their texts (items.json), through the command line
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--part", "test", "--cold-item-source",
                 "text_hidden", "--cold-item-ridge", "1", "--out", str(tmp_path / "text.json")]) == 0
    text = json.loads((tmp_path / "text.json").read_text())
    assert text["cold_item_source"] == "text_hidden" and result["cold_item_source"] == "content_rows"
    assert text["test"]["cold_only_random/recall@20"] == result["test"]["cold_only_random/recall@20"]
    assert text["test"]["cold_only/recall@20"] != centred["test"]["cold_only/recall@20"] or \
        text["test"]["ndcg@100"] != centred["test"]["ndcg@100"]
    with pytest.raises(EvaluateError, match="pass --cold-item-ridge"):
        evaluate_checkpoint(str(tmp_path / "run"), parts=("test",), cold_item_source="text_hidden")
    # the baselines read the same cold items from the dataset and report the same slices over the same users
    assert main(["baselines", "--data", data, "--model", "content-knn", "--neighbours", "5",
                 "--out", str(tmp_path / "knn.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    for part in ("valid", "test"):
        assert {k for k in knn[part] if "cold" in k} == {k for k in metrics[part] if "cold" in k}
        assert knn[part]["num_cold_users"] == metrics[part]["num_cold_users"]
        assert knn[part]["cold_only_random/recall@20"] == pytest.approx(metrics[part]["cold_only_random/recall@20"])


def metric_values(record: dict) -> dict:
    return {k: v for k, v in record.items() if "@" in k or k.startswith("num_")}


def test_evaluate_command_reproduces_the_runs_metrics_with_its_best_and_its_last_weights(reference_run, tmp_path,
                                                                                          capsys):
    """`cllm4rec evaluate` on a finished run: the best-validation weights give metrics.json's valid and test,
    the last state the last validation of the run; a wrong --part is refused before any model is built."""
    from cllm4rec_dist.cli import main
    from cllm4rec_dist.evaluate_run import EvaluateError, evaluate_checkpoint

    out, _ = reference_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", "--checkpoint", str(out), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["weights"] == "best" and result["best"]["global_step"] == metrics["best"]["global_step"]
    for part in ("valid", "test"):
        assert metric_values(result[part]) == pytest.approx(metric_values(metrics[part]), abs=1e-6)
    last = evaluate_checkpoint(str(out), parts=("valid",), use_best=False)
    assert last["weights"] == "last" and "test" not in last
    assert metric_values(last["valid"]) == pytest.approx(metric_values(metrics["history"][-1]), abs=1e-6)
    with pytest.raises(EvaluateError, match="--part train: choose from valid, test"):
        evaluate_checkpoint(str(out), parts=("train",))


def test_warmup_c_steps_have_no_mutual_regularisation_by_default(reference_run):
    """The paper's warm-up trains the content LLM alone: mr is exactly 0 there, and on afterwards."""
    out, _ = reference_run
    log = read_train_log(out)
    warmup = [r for r in log if r["phase"] == "warmup"]
    assert warmup and all(r["kind"] == "C" and r["mr"] == 0.0 for r in warmup)
    assert all(r["mr"] > 0 for r in log if r["phase"] == "pretrain")
    assert all(r["mr"] > 0 for r in log if r["phase"] == "finetune" and r["kind"] == "rec")


def test_train_help_lists_the_mutual_regularisation_and_selection_settings(capsys):
    from cllm4rec_dist.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.mr_reduction" in text and "averaged over documents" in text and "(default: paper)" in text
    assert "--schedule.warmup_mr" in text and "the content LLM alone" in text and "(default: False)" in text
    assert "--eval.select_on" in text and "Recall@20 + Recall@40 + NDCG@100, as the authors' code selects" in text
    for bad, match in ((["--model.mr_reduction", "sum"], "model.mr_reduction='sum'"),
                       (["--eval.select_on", "ndcg"], "eval.select_on='ndcg'")):
        import argparse

        p = argparse.ArgumentParser()
        add_config_arguments(p)
        with pytest.raises(ValueError, match=match):
            config_from_args(p.parse_args(bad))


def _recipe(cfg):
    from cllm4rec_dist.recommenders.cllm4rec.recipe import CLLM4RecRecipe
    from cllm4rec_dist.train.checkpoint import LocalSink
    from cllm4rec_dist.train.engines import TorchEngine
    from cllm4rec_dist.train.rank import Rank

    return CLLM4RecRecipe(cfg, Rank(), lambda name, params, lr: TorchEngine(name, params, lr),
                          LocalSink(cfg.out)).setup()


def test_fixord_is_scored_with_prompts_in_its_training_order(demo_data, tmp_path):
    from cllm4rec_dist.recommenders.cllm4rec.evaluate import evaluate_docs

    cfg = tiny_config(demo_data, str(tmp_path), ablation="fixord")
    trainer = _recipe(cfg).trainer
    for _ in range(3):
        trainer.train_step("L")
    args = (trainer.model, trainer.eval_docs, trainer.space, "valid", cfg.prediction_style, cfg.eval.batch_size,
            cfg.eval.exclude_valid_on_test, cfg.batch.max_length, cfg.batch.seed)
    assert trainer.evaluate("valid") == evaluate_docs(*args, reorder=False) != evaluate_docs(*args, reorder=True)


def test_select_on_authors_keeps_the_epoch_with_the_best_metric_sum(demo_data, tmp_path):
    from cllm4rec_dist.eval.metrics import selection_score

    assert selection_score({"recall@20": 0.1, "recall@40": 0.2, "ndcg@100": None}, "authors") == pytest.approx(0.3)
    cfg = tiny_config(demo_data, str(tmp_path), ablation="cf")
    cfg.schedule = ScheduleSettings(warmup_epochs=0, pretrain_epochs=1, finetune_epochs=4)
    cfg.eval.select_on = "authors"
    result = run_reference(cfg.validate())
    sums = [h["recall@20"] + h["recall@40"] + h["ndcg@100"] for h in result["history"]]
    assert result["best"]["epoch"] == result["history"][sums.index(max(sums))]["epoch"]
    assert result["valid"]["recall@20"] == result["history"][sums.index(max(sums))]["recall@20"]


def test_checkpoint_clock_is_due_after_its_interval_and_resets_on_save():
    from cllm4rec_dist.train.checkpoint import CheckpointClock

    assert CheckpointClock(0).due()  # 0: every block end
    clock = CheckpointClock(3600)
    assert not clock.due()
    clock.last -= 3601  # an hour later
    assert clock.due()
    clock.saved()
    assert not clock.due()


def _reference_lr(schedule: str, k: int, n: int, warmup_fraction: float, min_ratio: float) -> float:
    """The schedule written out plainly: a linear ramp over the warm-up steps, then flat or a half cosine."""
    warm = int(warmup_fraction * n)
    if k < warm:
        return (k + 1) / warm
    if schedule == "constant":
        return 1.0
    t = (k - warm) / (n - warm - 1)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2


def test_lr_factor_ramps_then_follows_a_half_cosine_to_the_floor():
    for schedule in LR_SCHEDULES:
        for n, warmup, floor in ((10, 0.0, 0.0), (10, 0.3, 0.1), (101, 0.05, 0.25)):
            got = [lr_factor(schedule, k, n, warmup, floor) for k in range(n)]
            assert got == pytest.approx([_reference_lr(schedule, k, n, warmup, floor) for k in range(n)])
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 9, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 0, 1) == 1.0 and lr_factor("constant", 0, 10, 0.5) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_factor("linear", 0, 10)
    for flag, value in (("lr_schedule", "linear"), ("lr_warmup_fraction", 1.0), ("min_lr_ratio", -0.1)):
        cfg = TrainConfig(data="d")
        setattr(cfg.optim, flag, value)
        with pytest.raises(ConfigError, match=f"optim.{flag}"):
            cfg.validate()


def test_a_cosine_schedule_steps_each_phase_at_its_place_and_a_resumed_run_at_the_same_rates(demo_data, tmp_path):
    """Each logged step's lr is the phase's lr times the schedule at the step's place in its phase (every engine,
    so every kind of step in a phase shares one ramp and one cosine); a run stopped mid-finetuning and resumed
    repeats the uninterrupted run's rates and losses exactly."""
    def config(out, **overrides):
        cfg = tiny_config(demo_data, str(out), checkpoint_interval_s=0, **overrides)
        cfg.schedule.pretrain_epochs, cfg.schedule.finetune_epochs = 1, 2
        cfg.optim.lr_schedule, cfg.optim.lr_warmup_fraction, cfg.optim.min_lr_ratio = "cosine", 0.1, 0.05
        return cfg.validate()

    run_reference(config(tmp_path / "whole"))
    log = read_train_log(tmp_path / "whole")
    phases = defaultdict(list)
    for row in log:
        phases[row["phase"]].append(row)
    assert set(phases) == {"warmup", "pretrain", "finetune"} and {"rec", "C"} <= {r["kind"] for r in phases["finetune"]}
    for phase, rows in phases.items():
        base = 1e-3 if phase == "finetune" else TrainConfig().optim.pretrain_lr  # tiny_config's finetune_lr: 1e-3
        expected = [base * _reference_lr("cosine", k, len(rows), 0.1, 0.05) for k in range(len(rows))]
        assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-6), phase
    assert phases["finetune"][-1]["lr"] == pytest.approx(0.05 * 1e-3)

    stop_at = len(phases["warmup"]) + len(phases["pretrain"]) + len(phases["finetune"]) // 3
    partial = run_reference(config(tmp_path / "resumed", max_steps=stop_at))
    assert partial["stopped"] and partial["global_step"] == stop_at
    run_reference(config(tmp_path / "resumed"))
    resumed = read_train_log(tmp_path / "resumed")
    assert [(r["global_step"], r["lr"], r["loss"]) for r in resumed] == [(r["global_step"], r["lr"], r["loss"])
                                                                         for r in log]
