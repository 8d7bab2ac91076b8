"""Row-sharded tables and item head (model/sharding.py) on 2 real gloo ranks against the replicated reference.

The 2-rank runs are the recipe every worker runs (CLLM4RecRecipe.setup -> Trainer.train_step, checkpoints through
LocalSink); the reference is the single-process trainer standing in for 2 ranks (simulate_ranks=2) with
REPLICATED tables, started from the same weights.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ranks import run_ranks  # noqa: E402

from cllm4rec_dist.config import ScheduleSettings, TrainConfig, config_from_dict  # noqa: E402
from cllm4rec_dist.corpus.shards import ShardedDataset  # noqa: E402
from cllm4rec_dist.export.embeddings import read_export  # noqa: E402
from cllm4rec_dist.export_run import export_checkpoint  # noqa: E402
from cllm4rec_dist.model import sharding  # noqa: E402
from cllm4rec_dist.model.item_softmax import chunked_topk, sparse_softmax_nll  # noqa: E402
from cllm4rec_dist.recommenders.cllm4rec.export import PARAMS  # noqa: E402
from cllm4rec_dist.recommenders.cllm4rec.recipe import CLLM4RecRecipe  # noqa: E402
from cllm4rec_dist.recommenders.cllm4rec.trainer import LOSSES, load_trainable  # noqa: E402
from cllm4rec_dist.train.checkpoint import SHARDED_DIR, LocalSink  # noqa: E402
from cllm4rec_dist.train.engines import TorchEngine  # noqa: E402
from cllm4rec_dist.train.rank import Rank  # noqa: E402

KINDS = ("L", "C", "rec")
STEPS = ("L", "C", "rec", "L", "rec", "C")       # before the checkpoint
AFTER = ("L", "rec", "C", "L")                    # after it: what every resume must reproduce
COLD = [1, 5, 40, 77]                             # items whose rows set_unseen_items_from_content fills
RTOL = 1e-4


# ---- the collective ops alone ---------------------------------------------------------------------------


def _op_data():
    g = torch.Generator().manual_seed(0)
    head, table = torch.randn(11, 6, generator=g), torch.randn(7, 6, generator=g)
    hidden = [torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)]
    rows = [torch.tensor([0, 0, 1, 3, 4]), torch.tensor([2, 2])]
    cols = [torch.tensor([1, 10, 5, 5, 0]), torch.tensor([3, 7])]
    ids = [torch.tensor([0, 6, 6, 3]), torch.tensor([], dtype=torch.long)]  # rank 1 looks nothing up
    exclude = [[torch.tensor([0, 9]), torch.tensor([]), torch.tensor([5]), torch.tensor([2, 3]), torch.tensor([])],
               [torch.tensor([10]), torch.tensor([]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])]]
    return head, table, hidden, rows, cols, ids, exclude


def _ops_on_rank(rank, world):
    return [_ops(rank, world, max_logit_elements) for max_logit_elements in (2**24, 7)]  # dense, and chunked


def _ops(rank, world, max_logit_elements):
    head, table, hidden, rows, cols, ids, exclude = _op_data()
    head_layout, table_layout = sharding.RowLayout(11, rank, world), sharding.RowLayout(7, rank, world)
    w = head[head_layout.start:head_layout.stop].clone().requires_grad_()
    t = sharding.RowShardedTable(7, 6, table_layout)
    t.weight.data.copy_(table[table_layout.start:table_layout.stop])
    h = hidden[rank].clone().requires_grad_()
    loss = sharding.vocab_parallel_nll(h, w, head_layout, rows[rank], cols[rank], max_logit_elements=max_logit_elements)
    looked_up = t(ids[rank])
    (loss + 0.75 * looked_up.sum()).backward()
    scores, items = sharding.row_sharded_topk(hidden[rank], w.detach(), head_layout, 4, exclude[rank],
                                              max_logit_elements=max_logit_elements)
    return {"loss": loss.item(), "grad_hidden": h.grad, "grad_head": w.grad, "grad_table": t.weight.grad,
            "rows": looked_up.detach(), "scores": scores, "items": items, "local_rows": w.shape[0]}


@pytest.fixture(scope="module")
def ops_run():
    return run_ranks(_ops_on_rank, 2)


@pytest.mark.parametrize("variant", [0, 1], ids=["dense", "chunked"])  # chunked over classes and rows
def test_sharded_lookup_softmax_and_topk_equal_the_unsharded_ops(ops_run, variant):
    out = [rank_out[variant] for rank_out in ops_run]
    head, table, hidden, rows, cols, ids, exclude = _op_data()
    assert [o["local_rows"] for o in out] == [6, 5]  # each rank holds its half of the head, never the whole
    head, table = head.clone().requires_grad_(), table.clone().requires_grad_()
    for rank in range(2):
        h = hidden[rank].clone().requires_grad_()
        loss = sparse_softmax_nll(h, head, rows[rank], cols[rank])
        looked_up = table[ids[rank]]
        (loss + 0.75 * looked_up.sum()).backward()
        assert out[rank]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(out[rank]["grad_hidden"], h.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[rank]["rows"], looked_up.detach())
        scores, items = chunked_topk(hidden[rank], head.detach(), 4, exclude=exclude[rank])
        assert torch.equal(out[rank]["items"], items)
        torch.testing.assert_close(out[rank]["scores"], scores)
    # an owner's gradient is every rank's use of its rows
    torch.testing.assert_close(torch.cat([o["grad_head"] for o in out]), head.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([o["grad_table"] for o in out]), table.grad)
    assert (out[1]["items"][2] == torch.tensor([9, 10, -1, -1])).all()  # only 2 items left: padded like unsharded


# ---- the training step through the recipe -------------------------------------------------------------


def _config(data: str, out: str, sharding_mode: str) -> TrainConfig:
    cfg = TrainConfig(data=data, out=out, log_every=10_000, projector_sample=0, simulate_ranks=2)
    cfg.schedule = ScheduleSettings(warmup_epochs=1, pretrain_epochs=1, alternate="steps", finetune_epochs=1)
    cfg.batch.batch_size = 8
    cfg.batch.max_length = 128
    cfg.model.table_sharding = cfg.model.item_head_sharding = sharding_mode
    cfg.optim.user_lr_scale = 3.0  # the user tables step in an Adam group of their own, sharded or not
    cfg.optim.item_head_lr_scale = 2.0  # and the item head in another
    cfg.model.cold_item_ridge = 0.5  # the centred cold-item map: its sums all-reduced across ranks
    cfg.model.cold_item_source = "text_hidden"  # first from the backbone's reading of items.json, then content rows
    return cfg.validate()


def _recipe(cfg: TrainConfig, rank: Rank) -> CLLM4RecRecipe:
    def engine_factory(name, params, lr):
        return TorchEngine(name, params, lr, cfg.optim.weight_decay, cfg.optim.grad_clip)

    return CLLM4RecRecipe(cfg, rank, engine_factory, LocalSink(cfg.out)).setup()


def _gradients(recipe, world: int) -> dict:
    """{kind: {parameter: gradient}} of each kind's loss on the first batch of every stream (data parallel's
    average over ranks: a shard holds the sum over ranks, divided here as the engine divides it)."""
    trainer, model = recipe.trainer, recipe.model
    grads = {}
    for kind in KINDS:
        for stream in trainer.batches[kind]:
            out = LOSSES[kind](model, stream.batch(0, 0))
            (out["loss"] / len(trainer.batches[kind])).backward()
        grads[kind] = {n: p.grad.clone() / world for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    return grads


def _steps(trainer, kinds) -> list[float]:
    return [trainer.train_step(kind)["loss"].item() for kind in kinds]


def _cold_rows(model) -> dict:
    """The cold items' scoring rows set from the item texts' readings, then from the content rows: each rank sets
    its own rows, the ridge sums are all-reduced."""
    rows = {}
    for source in ("text_hidden", "content_rows"):
        model.config.cold_item_source = source
        model.set_unseen_items_from_content(COLD)
        rows.update({f"{source} {n}": model.get_parameter(n).detach().clone()
                     for n in ("collab_item_table.weight", "item_head.weight")})
    return rows


def _train_on_rank(rank, world, cfg_dict):
    cfg = config_from_dict(cfg_dict)
    recipe = _recipe(cfg, Rank(rank, world))
    trainer, model = recipe.trainer, recipe.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    valid = trainer.evaluate("valid")  # sharded scoring and top-K through the evaluator
    grads = _gradients(recipe, world)
    before = _steps(trainer, STEPS)
    trainer.save_checkpoint()
    after = _steps(trainer, AFTER)
    cold_rows = _cold_rows(model)  # each rank its own rows; the head's ridge fit all-reduced
    engines = {name: e for name, e in trainer.engines.items()}
    optimizer_shapes = {n: [tuple(t.shape) for t in e.optimizer.state[p].values() if t.dim() > 0]
                        for e in engines.values() for n, (p, _) in getattr(e, "shards", {}).items()}
    return {"initial": initial, "grads": grads, "before": before, "after": after, "valid": valid, "cold": cold_rows,
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad},
            "optimizer_shapes": optimizer_shapes,
            "resident": sum(e.resident_bytes() for e in engines.values() if hasattr(e, "resident_bytes")),
            "engines": {name: type(e).__name__ for name, e in engines.items()}}


def _resume_on_rank(rank, world, cfg_dict):
    recipe = _recipe(config_from_dict(cfg_dict), Rank(rank, world))
    return {"step": sum(recipe.trainer.state.counters.values()), "after": _steps(recipe.trainer, AFTER)}


@pytest.fixture(scope="module")
def row_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("row") / "run"
    cfg = _config(demo_data, str(out), "row")
    return cfg, run_ranks(_train_on_rank, 2, dataclasses.asdict(cfg))


@pytest.fixture(scope="module")
def replicated_reference(demo_data, row_run, tmp_path_factory):
    """The single-process replicated trainer for 2 ranks, from the row run's initial weights."""
    cfg = _config(demo_data, str(tmp_path_factory.mktemp("replicated") / "run"), "replicated")
    recipe = _recipe(cfg, Rank(0, 1, accumulate=2))
    _, out = row_run
    load_trainable(recipe.model, {n: torch.cat([o["initial"][n] for o in out]) for n in out[0]["initial"]})
    trainer = recipe.trainer
    result = {"valid": trainer.evaluate("valid"), "grads": _gradients(recipe, 1), "before": _steps(trainer, STEPS),
              "after": _steps(trainer, AFTER),
              "resident": sum(p.numel() * 4 * 3 for e in trainer.engines.values() for p in e.params)}
    result["cold"] = _cold_rows(recipe.model)
    return result


def _rank_mean(out, key):
    return [sum(values) / len(values) for values in zip(*(o[key] for o in out))]


def test_row_and_replicated_give_the_same_losses_gradients_and_metrics(row_run, replicated_reference):
    _, out = row_run
    ref = replicated_reference
    assert out[0]["engines"] == {"collab": "ShardedEngine", "content": "ShardedEngine"}
    assert _rank_mean(out, "before") + _rank_mean(out, "after") == pytest.approx(ref["before"] + ref["after"], rel=RTOL)
    for kind in KINDS:
        assert set(out[0]["grads"][kind]) == set(ref["grads"][kind]), kind  # the same parameters get gradients
        for name, grad in ref["grads"][kind].items():
            sharded = torch.cat([o["grads"][kind][name] for o in out])
            torch.testing.assert_close(sharded, grad, rtol=1e-4, atol=1e-7, msg=f"{kind} {name}")
    for rank in range(2):
        assert out[rank]["valid"] == pytest.approx(ref["valid"], rel=1e-6)
    for name, rows in ref["cold"].items():  # cold items' rows: text map, content rows and the head's content map
        torch.testing.assert_close(torch.cat([o["cold"][name] for o in out]), rows, rtol=1e-4, atol=1e-6, msg=name)
    text, content = ref["cold"]["text_hidden item_head.weight"], ref["cold"]["content_rows item_head.weight"]
    assert not torch.allclose(text[COLD], content[COLD])  # two different maps were compared


def test_each_rank_holds_half_of_every_table_head_and_adam_state(row_run, replicated_reference):
    _, out = row_run
    full = {n: torch.Size([sum(o["shapes"][n][0] for o in out), out[0]["shapes"][n][1]]) for n in out[0]["shapes"]}
    assert {"collab_user_table.weight", "content_item_table.weight", "item_head.weight"} <= set(full)
    for rank in range(2):
        for name, shape in out[rank]["shapes"].items():
            rows = full[name][0]
            assert shape[0] == (rows + 1) // 2 if rank == 0 else rows - (rows + 1) // 2, name
            assert out[rank]["optimizer_shapes"][name] == [shape, shape], name  # exp_avg, exp_avg_sq: own rows only
    total = replicated_reference["resident"]  # weights + Adam's two moments of the whole tables
    for rank in range(2):
        assert abs(out[rank]["resident"] - total / 2) <= 0.01 * total


def test_a_checkpoint_of_two_ranks_resumes_on_two_and_on_one_with_the_same_losses_and_exports_by_part(row_run,
                                                                                                   tmp_path):
    cfg, out = row_run
    sink = LocalSink(cfg.out)
    latest = sink.latest()
    assert latest and sorted(os.listdir(os.path.join(latest, SHARDED_DIR))) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    expected = _rank_mean(out, "after")
    two = run_ranks(_resume_on_rank, 2, dataclasses.asdict(cfg))
    assert two[0]["step"] == len(STEPS)
    assert _rank_mean(two, "after") == pytest.approx(expected, rel=RTOL)
    one = _recipe(cfg, Rank(0, 1, accumulate=2))  # the same tables whole on one process, from the 2 parts
    assert sum(one.trainer.state.counters.values()) == len(STEPS)
    assert one.model.item_head.weight.shape[0] == one.model.num_items
    saved = {n: p.detach().clone() for n, p in one.model.named_parameters() if p.requires_grad}
    assert _steps(one.trainer, AFTER) == pytest.approx(expected, rel=RTOL)

    # The export writes one Parquet part per saved row range, with the original ids.
    export = tmp_path / "export"
    manifest = export_checkpoint(cfg.out, str(export))
    assert [p["file"] for p in manifest["layout"]["parts"]["items"]] == ["items-part-00000.parquet",
                                                                          "items-part-00001.parquet"]
    assert not list(export.glob("*.npy"))
    _, ids, tables = read_export(str(export))
    id_maps = ShardedDataset(cfg.data).read_json("id_maps.json")
    assert ids == {"users": [str(x) for x in id_maps["users"]], "items": [str(x) for x in id_maps["items"]]}
    for (entity, table), param in PARAMS.items():
        np.testing.assert_array_equal(tables[entity][table], saved[param].numpy())


# ---- single-process facts -------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,world", [(11, 2), (7, 3), (2, 4), (8192 * 2 + 5, 3)])
def test_row_layout_is_the_dtensor_split_and_the_init_does_not_depend_on_it(rows, world):
    expected = [len(c) for c in torch.arange(rows).chunk(world)]  # DTensor Shard(0) splits as torch.chunk
    layouts = [sharding.RowLayout(rows, r, world) for r in range(world)]
    assert [lay.local_rows for lay in layouts][: len(expected)] == expected
    assert sum(lay.local_rows for lay in layouts) == rows and layouts[0].start == 0
    whole = torch.empty(rows, 3)
    sharding.init_rows_(whole, 0, 0.02, seed=5)
    for lay in layouts:
        part = torch.empty(lay.local_rows, 3)
        sharding.init_rows_(part, lay.start, 0.02, seed=5)
        assert torch.equal(part, whole[lay.start:lay.stop])
    # per-column mean and std (token_init="vocab"): the same values on any split, shifted and scaled per column
    mean, std = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, 2.0, 0.02])
    shifted = torch.empty(rows, 3)
    sharding.init_rows_(shifted, 0, std, seed=5, mean=mean)
    torch.testing.assert_close(shifted, whole / 0.02 * std + mean)
    for lay in layouts:
        part = torch.empty(lay.local_rows, 3)
        sharding.init_rows_(part, lay.start, std, seed=5, mean=mean)
        assert torch.equal(part, shifted[lay.start:lay.stop])


def _text_init_on_rank(rank, world, backbone_dir, texts):
    """Both text initialisations on one pair of ranks (a spawn of two processes is most of this test's time)."""
    from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig

    out = {}
    for token_init, content_init in (("text", "draw"), ("normal", "text")):
        model = CLLM4Rec(ModelConfig(backbone=backbone_dir, num_users=9, num_items=len(texts), token_init=token_init,
                                     content_init=content_init, item_text_ids=texts, init_std=1e-6,
                                     table_sharding="row", device="cpu"))
        out[token_init, content_init] = {
            "start": model.collab_item_table.layout.start, "rows": model.collab_item_table.weight.detach().clone(),
            "content": model.content_item_table.weight.detach().clone(),
            "words": model.backbone.get_input_embeddings().weight.detach().float()}
    return out


def test_text_init_of_row_sharded_tables_gives_each_rank_its_items_text_rows(demo_data):
    """token_init="text" with row-sharded tables: rank r's rows are the text means of ITS items (start..)."""
    backbone_dir = ShardedDataset(demo_data).manifest["backbone"]["path"]
    texts = [[3 * j % 50, 7 + j % 11, 2 * j % 13] for j in range(13)]
    ranks = run_ranks(_text_init_on_rank, 2, backbone_dir, texts)
    out = [r["text", "draw"] for r in ranks]
    words = out[0]["words"]
    expected = torch.stack([words[ids].mean(0) for ids in texts])
    assert [o["start"] for o in out] == [0, len(out[0]["rows"])]
    torch.testing.assert_close(torch.cat([o["rows"] for o in out]), expected, atol=1e-5, rtol=0)
    # content_init="text": the content item rows only, the collaborative rows keep the "normal" draw
    out = [r["normal", "text"] for r in ranks]
    torch.testing.assert_close(torch.cat([o["content"] for o in out]), expected, atol=1e-5, rtol=0)
    assert torch.cat([o["rows"] for o in out]).abs().max() < 1e-4


def test_bad_sharding_settings_are_refused_before_any_worker_starts(demo_data):
    from cllm4rec_dist.config import ConfigError

    cfg = TrainConfig(data=demo_data)
    cfg.model.table_sharding = "rows"
    with pytest.raises(ConfigError, match=r"model.table_sharding='rows': must be replicated, row"):
        cfg.validate()
    cfg = TrainConfig(data=demo_data, init_from="runs/pretrain")
    cfg.model.item_head_sharding = "row"
    with pytest.raises(ConfigError, match="init_from.*resume the run instead"):
        cfg.validate()
