"""TensorBoard's embedding projector: the files a training run writes, opened and checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_recbole import demo_as_recbole

from cllm4rec_dist.config import ScheduleSettings, TrainConfig
from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
from cllm4rec_dist.data.readers import ReaderOptions
from cllm4rec_dist.reference import run_reference
from cllm4rec_dist.train.projector import sample_rows

SAMPLE = 50  # fewer than the 80 items and 120 users: the sample bound is exercised


def read_projector(logdir: Path) -> list[dict]:
    """The embeddings listed in projector_config.pbtxt: tag, tensor and metadata paths."""
    text = (logdir / "projector_config.pbtxt").read_text()
    entries = []
    for block in re.findall(r"embeddings \{(.*?)\n\}", text, re.S):
        fields = dict(re.findall(r'(\w+): "([^"]*)"', block))
        fields["tensor_name"] = fields["tensor_name"].rsplit(":", 1)[0]  # torch appends ":<step>"
        entries.append(fields)
    return entries


def load_tsv(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter="\t", dtype=np.float32, ndmin=2)


@pytest.fixture(scope="module")
def titled_run(demo_raw, tmp_path_factory):
    """A short reference run on a RecBole copy of the demo (its .item file has titles)."""
    root = tmp_path_factory.mktemp("projector")
    recbole = root / "recbole" / "demo"
    demo_as_recbole(Path(demo_raw), recbole)
    data = root / "shards"
    preprocess(PreprocessConfig(format="recbole", options=ReaderOptions(inputs=[str(recbole)]), out=str(data)))
    cfg = TrainConfig(data=str(data), out=str(root / "run"), log_every=10_000, projector_sample=SAMPLE)
    cfg.schedule = ScheduleSettings(warmup_epochs=0, pretrain_epochs=0, finetune_epochs=2,
                                    finetune_content_fraction=0.0)  # rec steps only: 2 x 8 steps
    cfg.batch.batch_size = 16
    cfg.batch.max_length = 96
    run_reference(cfg.validate())
    return data, root / "run"


def test_projector_files_hold_sampled_tables_with_ids_and_titles(titled_run):
    data, run = titled_run
    logdir = run / "tensorboard"
    metrics = json.loads((run / "metrics.json").read_text())
    ids = json.loads((data / "id_maps.json").read_text())
    titles = json.loads((data / "items.json").read_text())["titles"]
    assert len(set(titles)) == len(titles) and not set(titles) & set(ids["items"])  # real titles, not id fallbacks

    entries = read_projector(logdir)
    steps = [h["global_step"] for h in metrics["history"]]
    tables = ("collab_item", "content_item", "item_head", "collab_user", "content_user")
    expected = [(f"{step:05d}", name) for step in steps for name in tables]
    expected += [(f"{metrics['global_step']:05d}", f"best/{name}") for name in tables]
    assert [(e["tensor_path"].split("/")[0], e["tensor_name"]) for e in entries] == expected

    items = sample_rows(len(ids["items"]), SAMPLE, 0)
    users = sample_rows(len(ids["users"]), SAMPLE, 1)
    assert len(items) == len(users) == SAMPLE and len(set(items)) == SAMPLE
    by_tag = {}
    for entry in entries:
        tensors = load_tsv(logdir / entry["tensor_path"])
        assert tensors.shape == (SAMPLE, 64)  # tiny-llama hidden size 64
        assert np.isfinite(tensors).all()
        rows = [line.split("\t") for line in (logdir / entry["metadata_path"]).read_text().splitlines()]
        if entry["tensor_name"].endswith("_user"):
            assert rows[0] == ["user", "user_id"]
            assert rows[1:] == [[str(i), ids["users"][i]] for i in users]
        else:
            assert rows[0] == ["item", "item_id", "title"]
            assert rows[1:] == [[str(j), ids["items"][j], titles[j]] for j in items]
        by_tag[(entry["tensor_path"].split("/")[0], entry["tensor_name"])] = tensors

    # Training moves the tables between validations; the final entries are the best-validation weights.
    first, last = f"{steps[0]:05d}", f"{steps[-1]:05d}"
    assert not np.allclose(by_tag[(first, "collab_item")], by_tag[(last, "collab_item")])
    best = f"{metrics['best']['global_step']:05d}"
    final = f"{metrics['global_step']:05d}"
    for name in tables:  # the float32 values exactly (the TSV's digits give each back)
        np.testing.assert_array_equal(by_tag[(final, f"best/{name}")], by_tag[(best, name)])


def test_tensorboard_projector_plugin_serves_the_tables(titled_run):
    """TensorBoard's own projector plugin (what its PROJECTOR tab calls) reads the run folder."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client

    _, run = titled_run
    logdir = str(run / "tensorboard")
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    apps = ProjectorPlugin(base_plugin.TBContext(logdir=logdir, multiplexer=multiplexer)).get_plugin_apps()

    def get(route, **args):
        response = Client(apps[route]).get("/", query_string=args)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_data()

    assert json.loads(get("/runs")) == ["."]
    names = [e["tensorName"] for e in json.loads(get("/info", run="."))["embeddings"]]
    final = next(n for n in names if n.startswith("best/collab_item"))
    tensor = np.frombuffer(get("/tensor", run=".", name=final), dtype=np.float32)
    assert tensor.shape == (SAMPLE * 64,)
    metadata = get("/metadata", run=".", name=final).decode().splitlines()
    assert metadata[0] == "item\titem_id\ttitle" and len(metadata) == SAMPLE + 1


def test_the_files_are_those_add_embedding_writes(tmp_path):
    """The projector's own writer against TensorBoard's ``SummaryWriter.add_embedding`` (the reference): the same
    folders, metadata and config byte for byte, tag escaping included, and the same float32 values."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from cllm4rec_dist.train.projector import ITEM_HEADER, USER_HEADER, EmbeddingProjector

    tables = {"collab_item": ("item", torch.randn(30, 8)), "collab_user": ("user", torch.randn(40, 8)),
              "odd/ta%g": ("item", torch.randn(30, 8))}

    class Model:
        def embedding_tables(self):
            return tables

    item_ids, user_ids = [f"i{j}" for j in range(30)], [f"u {i}" for i in range(40)]
    titles = [f"title\t{j}" for j in range(30)]
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    projector = EmbeddingProjector(SummaryWriter(str(ours)), item_ids, user_ids, titles, sample_size=20, seed=0)
    writer = SummaryWriter(str(ref))
    for step, prefix in ((3, ""), (7, ""), (7, "best/")):
        projector.write(Model(), step, prefix=prefix)
        for name, (entity, weight) in tables.items():
            rows = projector.items if entity == "item" else projector.users
            metadata = ([[str(j), item_ids[j], " ".join(titles[j].split())] for j in rows] if entity == "item"
                        else [[str(i), " ".join(user_ids[i].split())] for i in rows])
            writer.add_embedding(weight[torch.as_tensor(rows)], metadata=metadata, global_step=step,
                                 metadata_header=list(ITEM_HEADER if entity == "item" else USER_HEADER),
                                 tag=prefix + name)
    written = sorted(p.relative_to(ref) for p in ref.rglob("*.*") if not p.name.startswith("events."))
    assert sorted(p.relative_to(ours) for p in ours.rglob("*.*") if not p.name.startswith("events.")) == written
    assert len(written) == 1 + 3 * 3 * 2
    for path in written:
        if path.name == "tensors.tsv":
            np.testing.assert_array_equal(load_tsv(ours / path), load_tsv(ref / path))
        else:
            assert (ours / path).read_bytes() == (ref / path).read_bytes(), path
