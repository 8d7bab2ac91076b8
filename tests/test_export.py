"""Embedding export (ids, tables, projection, files, CLI, errors) and the two-tower CLLM4Rec-Emb comparison."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cllm4rec_dist.cli import main as cli_main
from cllm4rec_dist.config import TrainConfig
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.export.embeddings import fit_pca, project, read_export
from cllm4rec_dist.export.two_tower import compare
from cllm4rec_dist.export_run import ExportError, export_checkpoint
from cllm4rec_dist.reference import run_reference
from cllm4rec_dist.train.checkpoint import CheckpointError, load_state, resolve_checkpoint

METRIC_KEYS = {"recall@20", "recall@40", "ndcg@100", "num_users", "num_skipped"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A small demo dataset with >= 100 items.

    The trainer's validation ranks the top 100 items (recommenders/cllm4rec/evaluate.py TOP_K) and fails on a
    smaller catalogue, such as the 80 items of the shared ``demo_data`` fixture.
    """
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.demo import DemoConfig, write
    from cllm4rec_dist.data.protocol import ProtocolConfig
    from cllm4rec_dist.data.readers import ReaderOptions

    root = tmp_path_factory.mktemp("export_data")
    write(str(root / "raw"), DemoConfig(num_users=60, num_items=104, min_items_per_user=8, max_items_per_user=12))
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[str(root / "raw")]), out=str(root / "ds"),
                                protocol=ProtocolConfig(binarize=False, kcore=0)))
    assert ShardedDataset(str(root / "ds")).num_items >= 100
    return str(root / "ds")


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory) -> str:
    """A tiny reference run: 1 pretraining + 1 finetuning epoch, so it has best-validation weights."""
    cfg = TrainConfig(data=dataset, out=str(tmp_path_factory.mktemp("export_run") / "run"))
    cfg.schedule.warmup_epochs, cfg.schedule.pretrain_epochs, cfg.schedule.finetune_epochs = 0, 1, 1
    cfg.schedule.alternate, cfg.schedule.finetune_content_fraction = "steps", 0.05
    cfg.batch.batch_size, cfg.batch.max_length = 16, 128
    cfg.log_every = 1000
    run_reference(cfg.validate())
    return cfg.out


@pytest.fixture(scope="module")
def blob(run_dir) -> dict:
    fs, folder = resolve_checkpoint(run_dir)
    return load_state(os.path.join(folder, "trainer.pt"))


@pytest.fixture(scope="module")
def full_export(run_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export") / "full")
    export_checkpoint(run_dir, out)
    return out


def test_ids_and_vectors_round_trip(full_export, dataset, blob):
    id_maps = ShardedDataset(dataset).read_json("id_maps.json")
    manifest = json.load(open(os.path.join(full_export, "export.json")))
    assert manifest["weights"] == "best" and blob["best"] is not None
    state = blob["best"]
    users = pq.read_table(os.path.join(full_export, "users.parquet")).to_pydict()
    items = pq.read_table(os.path.join(full_export, "items.parquet")).to_pydict()
    assert users["user_id"] == [str(u) for u in id_maps["users"]]
    assert items["item_id"] == [str(i) for i in id_maps["items"]]
    assert users["user_index"] == list(range(len(id_maps["users"])))
    assert items["item_index"] == list(range(len(id_maps["items"])))
    np.testing.assert_array_equal(np.asarray(users["collab"], np.float32), state["collab_user_table.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(users["content"], np.float32), state["content_user_table.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(items["collab"], np.float32), state["collab_item_table.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(items["content"], np.float32), state["content_item_table.weight"].numpy())
    # tiny-llama is untied: the items are scored by their own head, which is exported
    assert manifest["item_scoring"] == "head"
    np.testing.assert_array_equal(np.asarray(items["head"], np.float32), state["item_head.weight"].numpy())
    rec = np.asarray(users["rec"], np.float32)
    assert rec.shape == (len(id_maps["users"]), manifest["hidden_size"]) and np.isfinite(rec).all()


def test_rec_vectors_reproduce_the_runs_metrics(full_export, dataset, run_dir):
    """The exported user vectors scored against the exported item head ARE the trained recommender."""
    from cllm4rec_dist.eval.metrics import evaluate_split

    _, _, tables = read_export(full_export)
    users, head = torch.from_numpy(tables["users"]["rec"]), torch.from_numpy(tables["items"]["head"])
    split = ShardedDataset(dataset).eval_split()
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    for part in ("valid", "test"):
        got = evaluate_split(lambda u: users[u] @ head.T, split, part)
        for key in ("recall@20", "recall@40", "ndcg@100"):
            assert got[key] == pytest.approx(metrics[part][key], abs=1e-6)


def test_numpy_files_match_parquet(full_export):
    manifest, ids, tables = read_export(full_export)
    for entity, id_col in (("users", "user_id"), ("items", "item_id")):
        frame = pq.read_table(os.path.join(full_export, f"{entity}.parquet")).to_pydict()
        assert ids[entity] == frame[id_col]
        assert set(tables[entity]) == set(manifest["tables"][entity]) == set(frame) - {id_col, f"{entity[:-1]}_index"}
        for name, matrix in tables[entity].items():
            assert matrix.dtype == np.float32
            np.testing.assert_array_equal(matrix, np.asarray(frame[name], np.float32))
    assert np.load(os.path.join(full_export, "user_ids.npy"), allow_pickle=False).dtype.kind == "U"


def test_export_json(full_export, run_dir, blob):
    manifest = json.load(open(os.path.join(full_export, "export.json")))
    assert manifest["format"] == "cllm4rec-export"
    assert manifest["source"]["checkpoint"].startswith(os.path.join(run_dir, "checkpoints", "step-"))
    assert manifest["source"]["global_step"] == blob["snapshot"]["state"]["global_step"]
    assert manifest["best"]["phase"] == "finetune"
    assert manifest["projection"] is None and manifest["dim"] == manifest["hidden_size"]
    assert set(manifest["tables"]["users"]) == {"collab", "content", "rec"}
    assert set(manifest["tables"]["items"]) == {"collab", "content", "head"}
    assert manifest["rec_style"] == "rec"
    for name, entry in manifest["files"].items():
        assert os.path.getsize(os.path.join(full_export, name)) == entry["bytes"]
    assert not [f for f in os.listdir(full_export) if ".tmp" in f]


def test_projection_and_last_weights(run_dir, blob, tmp_path):
    out = str(tmp_path / "proj")
    manifest = export_checkpoint(os.path.join(run_dir, "checkpoints",
                                              open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()),
                                 out, dim=8, use_best=False, user_vectors=False)
    assert manifest["weights"] == "last" and manifest["dim"] == 8 and manifest["projection"]["method"] == "pca"
    _, ids, tables = read_export(out)
    saved = np.load(os.path.join(out, "projection.npz"))
    state = blob["trainable"]
    hidden = manifest["hidden_size"]
    for (entity, name), param in {("users", "collab"): "collab_user_table.weight",
                                  ("items", "content"): "content_item_table.weight",
                                  ("items", "head"): "item_head.weight"}.items():
        matrix = tables[entity][name]
        assert matrix.shape == (len(ids[entity]), 8)
        mean, components = saved[f"{entity}_{name}_mean"], saved[f"{entity}_{name}_components"]
        assert mean.shape == (hidden,) and components.shape == (hidden, 8)
        np.testing.assert_allclose(project(state[param].numpy(), mean, components), matrix, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(components.T @ components, np.eye(8), atol=1e-8)
    assert "rec" not in tables["users"]
    # deterministic: the same fit twice gives identical bytes
    m1, c1, _ = fit_pca(state["collab_user_table.weight"], 8)
    m2, c2, _ = fit_pca(state["collab_user_table.weight"].clone(), 8)
    np.testing.assert_array_equal(c1, c2)
    with pytest.raises(ExportError, match="larger than the embedding size"):
        export_checkpoint(run_dir, str(tmp_path / "too_big"), dim=hidden + 1, user_vectors=False)


def test_cli_export(run_dir, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli_main(["export", "--checkpoint", run_dir, "--out", out, "--dim", "4", "--no-user-vectors", "--last"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == "last" and summary["dim"] == 4 and "rec" not in summary["tables"]["users"]
    assert os.path.exists(os.path.join(out, "export.json"))
    # re-exporting over it with another layout leaves no file of the first one behind
    assert cli_main(["export", "--checkpoint", run_dir, "--out", out, "--no-user-vectors"]) == 0
    assert not os.path.exists(os.path.join(out, "projection.npz"))


def test_bad_inputs_name_the_path(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nowhere"):
        export_checkpoint(missing, str(tmp_path / "o"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        export_checkpoint(str(empty), str(tmp_path / "o"))
    assert cli_main(["export", "--checkpoint", missing, "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_two_tower_compare(full_export, dataset, tmp_path):
    result = compare(dataset, full_export, epochs=3, seed=0)
    assert set(result) == {"without", "with"}
    for r in result.values():
        assert METRIC_KEYS <= set(r["valid"]) and METRIC_KEYS <= set(r["test"])
        assert len(r["history"]) == 3
    assert result["without"]["features"] is None
    assert result["with"]["features"]["users"]["tables"] == ["collab", "content"]
    again = compare(dataset, full_export, epochs=3, seed=0)
    assert again["with"]["test"] == result["with"]["test"] and again["without"]["test"] == result["without"]["test"]
    out = str(tmp_path / "tt.json")
    assert cli_main(["two-tower", "--export", full_export, "--epochs", "1", "--out", out,
                     "--user-features", "collab,rec", "--item-features", "head"]) == 0
    written = json.load(open(out))
    assert written["with"]["features"]["items"]["tables"] == ["head"]
    with pytest.raises(ExportError, match="not exported"):
        compare(dataset, full_export, epochs=1, user_features=("nope",))


def test_ray_run_layout_picks_the_newest_checkpoint(run_dir, tmp_path):
    """A Ray run keeps its checkpoints under RUN/ray/<name>/checkpoint_*/trainer.pt."""
    import shutil

    _, folder = resolve_checkpoint(run_dir)
    ray_run = tmp_path / "ray_run"
    for k, step in ((0, 2_000), (1, 1_000)):  # checkpoint_000000 holds the later step (its record says so)
        target = ray_run / "ray" / "ray_run" / f"checkpoint_{k:06d}"
        shutil.copytree(folder, target)
        record = json.loads((target / "files-rank0.json").read_text())
        (target / "files-rank0.json").write_text(json.dumps({**record, "step": step}))
    _, found = resolve_checkpoint(str(ray_run))
    assert found.endswith("checkpoint_000000")
    # a truncated newest checkpoint is skipped for the newest complete one
    newest = ray_run / "ray" / "ray_run" / "checkpoint_000000" / "trainer.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    assert resolve_checkpoint(str(ray_run))[1].endswith("checkpoint_000001")
    # a trainer.pt path works as well
    assert resolve_checkpoint(os.path.join(folder, "trainer.pt"))[1] == folder


def test_fsspec_output_and_moved_dataset(run_dir, dataset, tmp_path):
    manifest = export_checkpoint(run_dir, "memory://exports/run", user_vectors=False)
    got_manifest, ids, tables = read_export("memory://exports/run")
    assert got_manifest["files"] == manifest["files"] and len(ids["users"]) == tables["users"]["collab"].shape[0]
    with pytest.raises(ExportError, match="--data"):
        export_checkpoint(run_dir, str(tmp_path / "o"), user_vectors=False, data_dir=str(tmp_path / "moved"))
    # the dataset given explicitly is used
    assert export_checkpoint(run_dir, str(tmp_path / "o2"), user_vectors=False,
                             data_dir=dataset)["source"]["data"] == dataset


def test_pca_beyond_the_rank_of_a_table():
    """Fewer rows than dim: the components still form an orthonormal basis, the surplus ones with zero variance."""
    table = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    mean, components, variance = fit_pca(table, 6)
    assert components.shape == (8, 6)
    np.testing.assert_allclose(components.T @ components, np.eye(6), atol=1e-10)
    assert np.abs(variance[4:]).max() < 1e-20 and (variance[:4] > 1e-3).all()
    projected = project(table.numpy(), mean, components)
    np.testing.assert_allclose(projected[:, 4:], 0, atol=1e-5)
    # nothing is lost: the projection back reconstructs the table
    np.testing.assert_allclose(projected.astype(np.float64) @ components.T + mean, table.numpy(), atol=1e-5)
    with pytest.raises(ExportError, match="larger than the embedding size 8"):
        fit_pca(table, 9)
