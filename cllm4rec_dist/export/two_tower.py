"""The paper's CLLM4Rec-Emb experiment (spec §15): does a two-tower retriever gain from the exported embeddings?

A small two-tower model is trained twice on the TRAIN split with the same seed and
settings, once on learned id embeddings alone ("without") and once with the exported
CLLM4Rec user/item vectors appended as frozen input features ("with"):

* user tower: MLP([user id embedding, user features]) -> out_dim
* item tower: MLP([item id embedding, item features]) -> out_dim
* score(u, j) = <user tower(u), item tower(j)>
* loss: full softmax over the whole catalogue for each (user, train item) pair (the
  catalogues this runs on are small, so no sampling or sampling correction is needed).

Both are evaluated with the project's metrics (Recall@20/40, NDCG@100; train items
masked, valid items too at test) on valid after every epoch; the best-valid epoch's
weights are tested once. Which wins is an empirical result, reported, never assumed.

Features come from an export folder (``cllm4rec export``, ideally with ``--dim``, as
the paper's 128): by default the token embeddings ``collab`` and ``content`` (what the
paper fed), rows matched to the dataset by ORIGINAL id. Each table is centered and
scaled to unit mean column variance, so tiny-init embeddings are not drowned out by
the id embeddings.

Runs are deterministic for a seed on CPU, and leave the caller's RNG state alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import posixpath
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cllm4rec_dist.atomic import write_json_atomic
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.corpus.split import EvalSplit
from cllm4rec_dist.eval.metrics import evaluate_split
from cllm4rec_dist.export.embeddings import ExportError, read_export


@dataclass
class TwoTowerSettings:
    epochs: int = 30
    """Passes over the (user, train item) pairs."""
    id_dim: int = 32
    """Size of the learned user / item id embeddings."""
    hidden_dim: int = 128
    """Width of each tower's hidden layer."""
    out_dim: int = 64
    """Size of the tower outputs whose dot product is the score."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    """(user, train item) pairs per optimizer step."""
    user_features: tuple[str, ...] = ("collab", "content")
    """Exported user tables appended to the user tower's input (``rec`` if exported)."""
    item_features: tuple[str, ...] = ("collab", "content")
    """Exported item tables appended to the item tower's input (``head`` if exported)."""
    exclude_valid_on_test: bool = True
    seed: int = 0
    device: str = "cpu"


class Tower(nn.Module):
    """MLP over [learned id embedding, frozen features] for one side (users or items)."""

    def __init__(self, rows: int, id_dim: int, hidden_dim: int, out_dim: int, features: torch.Tensor | None):
        super().__init__()
        self.ids = nn.Embedding(rows, id_dim)
        nn.init.normal_(self.ids.weight, std=0.1)
        self.register_buffer("features", features if features is not None else torch.zeros(rows, 0))
        self.mlp = nn.Sequential(nn.Linear(id_dim + self.features.shape[1], hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.ids(index), self.features[index]], dim=1))


class TwoTower(nn.Module):
    def __init__(self, num_users: int, num_items: int, s: TwoTowerSettings,
                 user_features: torch.Tensor | None = None, item_features: torch.Tensor | None = None):
        super().__init__()
        self.users = Tower(num_users, s.id_dim, s.hidden_dim, s.out_dim, user_features)
        self.items = Tower(num_items, s.id_dim, s.hidden_dim, s.out_dim, item_features)
        self.register_buffer("all_items", torch.arange(num_items))

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """(B, J) scores of every item for these users."""
        return self.users(users) @ self.items(self.all_items).T


# --------------------------------------------------------------------------- features


def _normalise(matrix: np.ndarray) -> np.ndarray:
    """Center each column and scale the table to unit mean column variance (one scalar per table)."""
    x = matrix.astype(np.float64)
    x = x - x.mean(axis=0)
    scale = float(np.sqrt((x ** 2).mean())) if x.size else 0.0
    return (x / scale if scale > 0 else x).astype(np.float32)


def load_features(export_dir: str, data: ShardedDataset, user_tables: tuple[str, ...],
                  item_tables: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(user features (I, F_u), item features (J, F_i), description), rows in the DATASET's index order.

    Rows are matched by original id, so an export with its rows in another order still lines up;
    an id of the dataset missing from the export is an error.
    """
    manifest, ids, tables = read_export(export_dir)
    id_maps = data.read_json("id_maps.json")
    out, described = [], {}
    for entity, wanted in (("users", user_tables), ("items", item_tables)):
        available = sorted(tables[entity])
        missing = [t for t in wanted if t not in tables[entity]]
        if missing or not wanted:
            raise ExportError(f"{export_dir}: {entity} table(s) {missing or '(none asked)'} not exported; it has "
                              f"{available}. Choose from those (--{entity[:-1]}-features), or re-export "
                              "(`rec` needs user vectors, `head` a model with a separate item head).")
        row_of = {x: k for k, x in enumerate(ids[entity])}
        dataset_ids = [str(x) for x in id_maps[entity]]
        absent = [x for x in dataset_ids if x not in row_of]
        if absent:
            raise ExportError(f"{export_dir}: {len(absent)} {entity} of {data.url} are not in the export "
                              f"(e.g. {absent[:3]}); it was made from another dataset. Pass the matching --data.")
        order = np.asarray([row_of[x] for x in dataset_ids], dtype=np.int64)
        blocks = [_normalise(tables[entity][t])[order] for t in wanted]
        out.append(torch.from_numpy(np.concatenate(blocks, axis=1)))
        described[entity] = {"tables": list(wanted), "dims": [int(tables[entity][t].shape[1]) for t in wanted]}
    described["projection_dim"] = manifest["dim"] if manifest.get("projection") else None
    described["export"] = export_dir
    return out[0], out[1], described


# --------------------------------------------------------------------------- training


def train_two_tower(split: EvalSplit, s: TwoTowerSettings, user_features: torch.Tensor | None = None,
                    item_features: torch.Tensor | None = None) -> dict:
    """Train on split.train, select the epoch on valid Recall@20, test once; the result dict."""
    start = time.time()
    device = torch.device(s.device)
    pair_users = np.concatenate([np.full(len(x), u, dtype=np.int64) for u, x in enumerate(split.train)])
    pair_items = np.concatenate([np.asarray(x, dtype=np.int64) for x in split.train])
    if len(pair_users) == 0:
        raise ValueError("the split has no train interactions to learn from")
    pairs_u, pairs_i = torch.from_numpy(pair_users).to(device), torch.from_numpy(pair_items).to(device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        model = TwoTower(split.num_users, split.num_items, s,
                         None if user_features is None else user_features.to(device),
                         None if item_features is None else item_features.to(device)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        shuffle = torch.Generator().manual_seed(s.seed)

        @torch.no_grad()
        def score(users: np.ndarray) -> torch.Tensor:
            model.eval()
            out = model.scores(torch.as_tensor(users, device=device)).float().cpu()
            model.train()
            return out

        history, best, best_state = [], None, None
        for epoch in range(s.epochs):
            order = torch.randperm(len(pairs_u), generator=shuffle).to(device)
            total = 0.0
            for k in range(0, len(order), s.batch_size):
                batch = order[k:k + s.batch_size]
                loss = F.cross_entropy(model.scores(pairs_u[batch]), pairs_i[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            valid = evaluate_split(score, split, "valid", exclude_valid_on_test=s.exclude_valid_on_test)
            history.append({"epoch": epoch, "loss": total / len(order), **valid})
            if best is None or (valid["recall@20"] or 0.0) > (best["recall@20"] or 0.0):
                best, best_state = {"epoch": epoch, **valid}, copy.deepcopy(model.state_dict())
        if best_state is not None:
            model.load_state_dict(best_state)
        test = evaluate_split(score, split, "test", exclude_valid_on_test=s.exclude_valid_on_test)
    return {"valid": {k: v for k, v in (best or {}).items() if k != "epoch"}, "test": test,
            "best_epoch": None if best is None else best["epoch"], "history": history,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()},
            "seconds": round(time.time() - start, 2)}


def compare(data_dir: str | None, export_dir: str, epochs: int = 30, seed: int = 0, **settings) -> dict:
    """{"without": result, "with": result}: the same two-tower model without / with the exported features.

    ``data_dir`` None = the dataset the export was made from (its export.json). Other
    ``settings`` are TwoTowerSettings fields (e.g. ``user_features=("collab", "content", "rec")``).
    """
    if data_dir is None:
        manifest, _, _ = read_export(export_dir)
        data_dir = manifest["source"]["data"]
    s = TwoTowerSettings(epochs=epochs, seed=seed, **{k: v for k, v in settings.items() if v is not None})
    s.user_features, s.item_features = tuple(s.user_features), tuple(s.item_features)
    data = ShardedDataset(data_dir)
    split = data.eval_split()
    user_features, item_features, described = load_features(export_dir, data, s.user_features, s.item_features)
    without = train_two_tower(split, s)
    without["features"] = None
    with_ = train_two_tower(split, s, user_features, item_features)
    with_["features"] = described
    return {"without": without, "with": with_}


# --------------------------------------------------------------------------- command


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.replace(" ", "").split(",") if n)
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated table names, e.g. collab,content")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train a two-tower retriever without and with the exported CLLM4Rec embeddings as "
                          "frozen features (the paper's CLLM4Rec-Emb); print and write both results as JSON.")
    parser.add_argument("--export", required=True,
                        help="export folder (output of `cllm4rec export`, e.g. with --dim 128)")
    parser.add_argument("--data", default=None, help="preprocessed dataset (default: the one the export came from)")
    parser.add_argument("--out", default=None, help="result JSON (default: EXPORT/two_tower.json)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--user-features", type=_names, default=None,
                        help="exported user tables to use (default collab,content)")
    parser.add_argument("--item-features", type=_names, default=None,
                        help="exported item tables to use (default collab,content)")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")


def run(args: argparse.Namespace) -> int:
    result = compare(args.data, args.export, epochs=args.epochs, seed=args.seed, user_features=args.user_features,
                     item_features=args.item_features, device=args.device)
    out = args.out or posixpath.join(args.export.rstrip("/"), "two_tower.json")
    fs, path = fsspec.core.url_to_fs(out)
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_json_atomic(out, result)
    brief = {name: {"valid": r["valid"], "test": r["test"], "best_epoch": r["best_epoch"]}
             for name, r in result.items()}
    print(json.dumps(brief, indent=1, default=float))
    print(f"[two-tower] full results in {out}")
    return 0
