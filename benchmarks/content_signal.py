"""Where does the item texts' signal reach, and where is it lost? Prints one JSON object per item-vector source.

Every source gives one vector per item. Items are scored by item kNN over those vectors, exactly as the
content-knn baseline scores them (baselines/content_knn.py: score(u, j) = the summed cosine similarity of j to
u's TRAIN items among j's k nearest items, k chosen on validation, test scored once). On a cold-item split the
``cold_only`` slice then says whether the vectors tell which item that nobody trained on suits whom, with
``cold_only_random`` as the floor. The sources, in the order the text travels through CLLM4Rec:

* ``sbert``: the sentence encoder's reading of each item's text (the content-knn baseline itself);
* ``backbone_words``: the mean of the backbone's input word embeddings over the text's tokens (what
  ``model.token_init text`` starts an item row at);
* ``backbone_hidden``: the mean of the frozen backbone's last hidden states over the text's tokens (what the
  LLM makes of the text when it reads it);
* with ``--export`` (a ``cllm4rec export`` folder of a trained run on the same dataset): ``content_rows``,
  ``collab_rows`` and, for a separate item head, ``head_rows``: the item tables training learned. A cold item's
  content row is learned from its text by the C-steps only; at evaluation its collaborative row is set to it
  (``set_unseen_items_from_content``), so ``content_rows`` is what CLLM4Rec's cold side can know.

With ``--cold-map`` (an export WITH user vectors, of a run on a cold-item split) one more line per source,
``<source>->scoring``: the run's own user vectors and scoring rows (the item head, or the collaborative rows of a
tied model), except that each cold item's scoring row comes from its vector through a ridge map fitted on the warm
items (centred, so a cold item starts at the mean warm row; strength chosen on validation ``cold_only`` Recall@20
from a grid), with an ``as_evaluated`` line for the run's own cold rows (the content row through a map with
almost no ridge, ``set_unseen_items_from_content``): what CLLM4Rec's cold side would give with another map or
another reading of the text.

With ``--blend-ease`` one more line, ``ease+sbert``: EASE (λ chosen on validation) plus β times the ``sbert``
kNN scores, each z-scored per user, β chosen on validation from a grid: what the texts add on top of the best
collaborative baseline when the two are combined in the simplest way.

    python benchmarks/content_signal.py --data DATASET_DIR [--export EXPORT_DIR] [--precision bf16] [--blend-ease]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from cllm4rec_dist.baselines.command import dataset_item_texts
from cllm4rec_dist.baselines.common import evaluate, make_result, selection_value
from cllm4rec_dist.baselines.content_knn import (
    ContentKnnSettings,
    encode_texts,
    neighbourhoods,
    run_on_vectors,
    similarity_matrix,
)
from cllm4rec_dist.baselines.ease import EaseSettings
from cllm4rec_dist.baselines.ease import select as select_ease
from cllm4rec_dist.corpus.presets import load_tokenizer
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.backbone import freeze, load_backbone, mean_text_hidden
from cllm4rec_dist.recommenders.cllm4rec.model import cold_item_map, warm_map_sums

SLICE_KEYS = ("recall@20", "recall@40", "ndcg@100", "cold/recall@20", "cold_only/recall@20",
              "cold_only_random/recall@20", "num_cold_users")


@torch.no_grad()
def backbone_text_vectors(location: dict, texts: list[str], precision: str,
                          max_tokens: int = 64) -> dict[str, np.ndarray]:
    """Per item: the mean input word embedding and the mean last hidden state (``backbone.mean_text_hidden``, the
    reading ``model.cold_item_source text_hidden`` maps from) over its text's first ``max_tokens`` tokens."""
    tokenizer = load_tokenizer(location)
    model = freeze(load_backbone(location["path"], precision, gguf_file=location.get("gguf_file"), device="cpu"))
    ids = [tokenizer(t or " ", add_special_tokens=False)["input_ids"][:max_tokens] or [0] for t in texts]
    words = model.get_input_embeddings().weight.float()
    return {"backbone_words": torch.stack([words[i].mean(0) for i in ids]).numpy(),
            "backbone_hidden": mean_text_hidden(model, ids, max_tokens).numpy()}


BLEND_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x the mean squared centred row norm


def cold_map_results(split, users: np.ndarray, scoring: np.ndarray, sources: dict[str, np.ndarray]) -> list:
    """(name, result) per source: cold scoring rows from the model's centred ridge map (``cold_item_map``) source ->
    scoring rows fitted on the warm items, its strength chosen on validation cold_only Recall@20; plus the run's
    own rows as evaluated."""
    import time

    from cllm4rec_dist.eval.metrics import evaluate_split

    users, scoring = users.astype(np.float64), scoring.astype(np.float64)
    cold = split.cold_mask()
    warm = ~cold

    def metrics(rows: np.ndarray, part: str) -> dict:
        return evaluate_split(lambda u: users[u] @ rows.T, split, part)

    started = time.perf_counter()
    out = [("as_evaluated", {"valid": metrics(scoring, "valid"), "test": metrics(scoring, "test"), "selected": {},
                             "seconds": round(time.perf_counter() - started, 3)})]
    for name, vectors in sources.items():
        started = time.perf_counter()
        x = torch.from_numpy(vectors.astype(np.float64))
        sums = warm_map_sums(x[torch.from_numpy(warm)], torch.from_numpy(scoring[warm]))  # the model's own map
        best = None
        for strength in RIDGE_STRENGTHS:
            mapping, x_offset, y_offset = cold_item_map(sums, (x.shape[1], scoring.shape[1]), strength)
            rows = scoring.copy()
            rows[cold] = ((x[torch.from_numpy(cold)] - x_offset) @ mapping + y_offset).numpy()
            valid = metrics(rows, "valid")
            if best is None or valid["cold_only/recall@20"] > best[0]:
                best = (valid["cold_only/recall@20"], strength, rows, valid)
        _, strength, rows, valid = best
        out.append((f"{name}->scoring", {"valid": valid, "test": metrics(rows, "test"),
                                         "selected": {"ridge": strength},
                                         "seconds": round(time.perf_counter() - started, 3)}))
    return out


def ease_blend(split, vectors: np.ndarray, k: int, settings: ContentKnnSettings) -> dict:
    """EASE at its validation-chosen λ plus β · (kNN scores over ``vectors`` with ``k`` neighbours), both z-scored
    per user over the catalogue; β chosen on validation from ``BLEND_WEIGHTS``, test scored once."""
    import time

    started = time.perf_counter()
    ease = select_ease(split, EaseSettings(score_test=False))
    x, weights = ease.train, ease.weights
    index, value = neighbourhoods(vectors, k)
    sim = similarity_matrix(index, value, k)

    def zscore(a: np.ndarray) -> np.ndarray:
        return (a - a.mean(1, keepdims=True)) / (a.std(1, keepdims=True) + 1e-12)

    def scorer(beta: float):
        return lambda users: zscore(np.asarray(x[users] @ weights)) + beta * zscore((x[users] @ sim).toarray())

    history: dict[str, list] = {"beta": [], "valid_recall@20": []}
    best = None
    for beta in BLEND_WEIGHTS:
        valid = evaluate(scorer(beta), split, "valid", settings)
        history["beta"].append(beta)
        history["valid_recall@20"].append(valid["recall@20"])
        if best is None or selection_value(valid, settings) > best[0]:
            best = (selection_value(valid, settings), beta, valid)
    _, beta, valid = best
    test = evaluate(scorer(beta), split, "test", settings)
    return make_result("ease+sbert", valid, test, {"lambda": ease.lam, "neighbours": k, "beta": beta}, settings,
                       started, history)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a preprocessed dataset (`cllm4rec preprocess`)")
    p.add_argument("--export", default=None, help="`cllm4rec export` folder of a run trained on --data")
    p.add_argument("--precision", default="bf16", help="backbone precision for the backbone sources")
    p.add_argument("--sources", default=None, help="comma-separated subset of the sources (default: all)")
    p.add_argument("--neighbours", default="10,20,50,100,200", help="k grid searched on validation")
    p.add_argument("--blend-ease", action="store_true", help="add EASE + beta * sbert kNN (beta on validation)")
    p.add_argument("--cold-map", action="store_true",
                   help="with --export (user vectors included): cold scoring rows mapped from each source")
    args = p.parse_args()
    dataset = ShardedDataset(args.data)
    split, texts = dataset.eval_split(), dataset_item_texts(dataset)
    settings = ContentKnnSettings(neighbours=tuple(int(k) for k in args.neighbours.split(",")), num_threads=0)
    wanted = set(args.sources.split(",")) if args.sources else None

    def take(name: str) -> bool:
        return wanted is None or name in wanted

    sources: dict[str, np.ndarray] = {}
    if take("sbert"):
        sources["sbert"] = encode_texts(texts, settings)
    if take("backbone_words") or take("backbone_hidden"):
        location = dataset.manifest["backbone"]
        sources.update({k: v for k, v in backbone_text_vectors(location, texts, args.precision).items() if take(k)})
    if args.export:
        meta = json.load(open(os.path.join(args.export, "export.json")))
        if os.path.abspath(meta["source"]["data"]) != os.path.abspath(args.data):
            print(f"error: {args.export} was trained on {meta['source']['data']}, not {args.data}", file=sys.stderr)
            return 2
        for table in ("content", "collab", "head"):
            path = os.path.join(args.export, f"items_{table}.npy")
            if os.path.exists(path) and take(f"{table}_rows"):
                sources[f"{table}_rows"] = np.load(path)
    results = [(name, vectors.shape[1], run_on_vectors(split, vectors, settings, model=name))
               for name, vectors in sources.items()]
    if args.blend_ease:  # at the k the sbert kNN chose on validation
        vectors = sources["sbert"] if "sbert" in sources else encode_texts(texts, settings)
        knn = {name: result for name, _, result in results}.get("sbert") or run_on_vectors(split, vectors, settings)
        results.append(("ease+sbert", vectors.shape[1],
                        ease_blend(split, vectors, knn["selected"]["neighbours"], settings)))
    if args.cold_map:
        if not args.export or not os.path.exists(os.path.join(args.export, "users_rec.npy")):
            print("error: --cold-map needs --export of a run exported with its user vectors (users_rec.npy)",
                  file=sys.stderr)
            return 2
        if not split.cold_mask().any():
            print(f"error: {args.data} has no cold items (preprocess with --cold-item-fraction)", file=sys.stderr)
            return 2
        table = "head" if os.path.exists(os.path.join(args.export, "items_head.npy")) else "collab"
        own = {k: v for k, v in sources.items() if k not in ("collab_rows", "head_rows")}  # a cold item has these
        mapped = cold_map_results(split, np.load(os.path.join(args.export, "users_rec.npy")),  # only as mapped
                                  np.load(os.path.join(args.export, f"items_{table}.npy")), own)
        results += [(name, sources[name.split("->")[0]].shape[1] if "->" in name else 0, result)
                    for name, result in mapped]
    for name, dim, result in results:
        print(json.dumps({"source": name, "data": args.data, "dim": int(dim), "selected": result["selected"],
                          "valid": {k: result["valid"].get(k) for k in SLICE_KEYS if k in result["valid"]},
                          "test": {k: result["test"].get(k) for k in SLICE_KEYS if k in result["test"]},
                          "seconds": result["seconds"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
