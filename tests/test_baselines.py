"""Baselines: EASE's closed form, Multi-VAE learns, selection on valid only, the result JSON, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cllm4rec_dist.baselines import ease, multivae, run_baseline
from cllm4rec_dist.baselines.common import BaselineSettings, SettingsError, evaluate
from cllm4rec_dist.corpus.split import EvalSplit

METRIC_KEYS = {"recall@20", "recall@40", "ndcg@100", "num_users", "num_skipped"}
FAST_VAE = dict(epochs=20, hidden_dim=64, latent_dim=16, batch_size=20, num_threads=1)


def structured_split(seed: int = 0, users_per_group: int = 60, items_per_group: int = 50) -> EvalSplit:
    """Two user groups, each liking its own item group (Zipf-skewed), plus one off-group item.

    Per user: 80% train / 10% valid / 10% test, at least one valid and one test item.
    """
    rng = np.random.default_rng(seed)
    num_users, num_items = 2 * users_per_group, 2 * items_per_group
    pop = 1.0 / np.arange(1, items_per_group + 1)
    pop /= pop.sum()
    train, valid, test = [], [], []
    for u in range(num_users):
        group = u // users_per_group
        own = rng.choice(items_per_group, size=rng.integers(10, 20), replace=False, p=pop) + group * items_per_group
        other = rng.integers(items_per_group) + (1 - group) * items_per_group
        items = rng.permutation(np.append(own, other))
        n_hold = max(1, int(round(0.1 * len(items))))
        valid.append(np.sort(items[:n_hold]))
        test.append(np.sort(items[n_hold : 2 * n_hold]))
        train.append(np.sort(items[2 * n_hold :]))
    return EvalSplit(num_users, num_items, train, valid, test)


@pytest.fixture(scope="module")
def split() -> EvalSplit:
    return structured_split()


def random_metrics(split: EvalSplit, part: str = "test") -> dict:
    rng = np.random.default_rng(123)
    return evaluate(lambda users: rng.random((len(users), split.num_items)), split, part, BaselineSettings())


def check_result(result: dict, model: str) -> None:
    assert result["model"] == model
    assert {"model", "valid", "test", "selected", "seconds"} <= set(result)
    for part in ("valid", "test"):
        assert set(result[part]) == METRIC_KEYS
        for key in ("recall@20", "recall@40", "ndcg@100"):
            assert 0.0 <= result[part][key] <= 1.0
    assert result["test"]["num_users"] == 120 and result["test"]["num_skipped"] == 0
    json.dumps(result)  # must be JSON-serialisable as returned


# ----------------------------------------------------------------------------- EASE


def test_ease_matches_direct_inverse():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 25)) < 0.2).astype(np.float64)
    for lam in (0.5, 7.0, 300.0):
        p = np.linalg.inv(x.T @ x + lam * np.eye(25))
        expect = -p / np.diag(p)[None, :]
        np.fill_diagonal(expect, 0.0)
        got = ease.ease_weights(ease.gram_matrix(x), lam)
        np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-12)
        assert np.all(np.diag(got) == 0)
    import scipy.sparse as sp

    np.testing.assert_allclose(ease.gram_matrix(sp.csr_matrix(x)), x.T @ x)
    with pytest.raises(ValueError):
        ease.ease_weights(x.T @ x, 0.0)


def test_ease_selects_lambda_on_valid_and_scores_test_once(split, monkeypatch):
    calls = []
    real_evaluate = ease.evaluate

    def counting_evaluate(score_fn, split_, part, settings):
        calls.append(part)
        return real_evaluate(score_fn, split_, part, settings)

    monkeypatch.setattr(ease, "evaluate", counting_evaluate)
    grid = (1.0, 10.0, 100.0, 1000.0)
    result = run_baseline(split, "ease", lambdas=grid)
    check_result(result, "ease")
    assert calls == ["valid"] * len(grid) + ["test"]
    history = result["history"]
    assert history["lambda"] == list(grid)
    chosen = grid[int(np.argmax(history["valid_recall@20"]))]
    assert result["selected"] == {"lambda": chosen}
    assert result["valid"]["recall@20"] == max(history["valid_recall@20"])
    # Test numbers are those of the chosen λ.
    x = split.train_matrix().astype(np.float64)
    b = ease.ease_weights(ease.gram_matrix(x), chosen)
    direct = real_evaluate(lambda users: np.asarray(x[users] @ b), split, "test", BaselineSettings())
    assert result["test"] == pytest.approx(direct)


def test_popular_and_ease_beat_random(split):
    rand = random_metrics(split)
    pop = run_baseline(split, "popular")
    check_result(pop, "popular")
    assert pop["selected"] == {}
    eas = run_baseline(split, "ease", lambdas=(10.0, 100.0))
    for key in ("recall@20", "ndcg@100"):
        assert pop["test"][key] > rand[key]
        assert eas["test"][key] > rand[key]
    assert eas["test"]["recall@20"] > pop["test"]["recall@20"]  # personalisation pays on 2 groups


def test_exclude_valid_on_test_is_a_setting(split):
    a = run_baseline(split, "popular")
    b = run_baseline(split, "popular", exclude_valid_on_test=False)
    assert a["valid"] == b["valid"]  # validation never excludes valid items
    assert a["settings"]["exclude_valid_on_test"] is True
    assert b["settings"]["exclude_valid_on_test"] is False


def test_unknown_setting_is_rejected(split):
    with pytest.raises(SettingsError, match="epochs"):
        run_baseline(split, "ease", epochs=3)
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline(split, "bpr")


# ----------------------------------------------------------------------------- Multi-VAE


def test_multivae_learns_and_selects_best_epoch(split):
    result = run_baseline(split, "multivae", seed=0, **FAST_VAE)
    check_result(result, "multivae")
    h = result["history"]
    assert len(h["loss"]) == FAST_VAE["epochs"]
    assert h["nll"][-1] < 0.9 * h["nll"][0]
    assert h["loss"][-1] < h["loss"][0]
    assert h["beta"][-1] <= 0.2 + 1e-12 and h["beta"][-1] > 0
    best = h["eval_epoch"][int(np.argmax(h["valid_recall@20"]))]
    assert result["selected"]["epoch"] == best
    assert result["valid"]["recall@20"] == max(h["valid_recall@20"])
    assert result["test"]["recall@20"] > random_metrics(split)["recall@20"]


def test_multivae_is_deterministic_and_leaves_global_state_alone(split):
    import torch

    torch.manual_seed(42)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    a = run_baseline(split, "multivae", seed=3, epochs=2, hidden_dim=32, latent_dim=8, batch_size=40, num_threads=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    b = run_baseline(split, "multivae", seed=3, epochs=2, hidden_dim=32, latent_dim=8, batch_size=40, num_threads=1)
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["test"] == b["test"]


def test_multivae_loss_pieces():
    import torch

    logits = torch.zeros(2, 4)
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    loss, nll, kl = multivae.multivae_loss(logits, x, mu, logvar, beta=0.2)
    # Uniform softmax over 4 items: -log(1/4) per interaction; users have 2 and 1.
    assert nll.item() == pytest.approx(1.5 * np.log(4))
    assert kl.item() == pytest.approx(0.0)
    assert loss.item() == pytest.approx(nll.item())


# ----------------------------------------------------------------------------- command


def test_command_writes_json(demo_data, tmp_path, capsys):
    from cllm4rec_dist.cli import main

    out_json = tmp_path / "baselines" / "ease.json"
    assert main(["baselines", "--data", demo_data, "--model", "ease", "--lambdas", "10,100",
                 "--out", str(out_json)]) == 0
    written = json.loads((tmp_path / "baselines" / "ease.json").read_text())
    check_result(written, "ease")
    assert written["selected"]["lambda"] in (10.0, 100.0)
    assert '"selected"' in capsys.readouterr().out
    # A flag that does not apply to the model is an error, not silently ignored.
    out = tmp_path / "x.json"
    assert main(["baselines", "--data", demo_data, "--model", "ease", "--epochs", "3", "--out", str(out)]) == 2
    assert not out.exists()


# ----------------------------------------------------------------------------- content kNN


def test_content_knn_neighbourhoods_and_scores_match_a_brute_force_reference():
    """Each item's k most cosine-similar OTHER items, most similar first, and score(u, j) = the sum of
    sim(i, j) over u's train items i among j's neighbours: against plain loops."""
    from cllm4rec_dist.baselines.content_knn import neighbourhoods, similarity_matrix

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(30, 1))  # norms differ
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index, value = neighbourhoods(vectors, 7)
    assert index.shape == value.shape == (30, 7)
    for j in range(30):
        sims = {i: float(unit[i] @ unit[j]) for i in range(30) if i != j}
        want = sorted(sims, key=lambda i: -sims[i])[:7]
        assert index[j].tolist() == want
        assert value[j] == pytest.approx([sims[i] for i in want], abs=1e-5)
    history = [rng.choice(30, size=5, replace=False) for _ in range(4)]
    x = np.zeros((4, 30))
    for u, items in enumerate(history):
        x[u, items] = 1
    scores = (x @ similarity_matrix(index, value, 4))
    for u, items in enumerate(history):
        for j in range(30):
            want = sum(float(unit[i] @ unit[j]) for i in items if i in index[j, :4].tolist())
            assert scores[u, j] == pytest.approx(want, abs=1e-5)
    assert neighbourhoods(vectors[:3], 10)[0].shape == (3, 2)  # capped at the catalogue size - 1


def two_topic_texts(num_items: int, items_per_group: int) -> list[str]:
    topics = ("A gentle romantic drama about love, family and friendship",
              "An explosive action thriller with car chases, guns and bombs")
    return [f"{topics[j // items_per_group]}, volume {j}" for j in range(num_items)]


def test_content_knn_ranks_cold_items_by_their_text():
    """The two user groups of ``structured_split`` each like one topic; half of the items never appear in
    training (cold). Content kNN scores them from their texts alone, so among the cold items it ranks each
    user's own topic first: far above a random order of the same candidates (``cold_only_random``)."""
    base = structured_split()
    cold_items = np.arange(0, base.num_items, 2)
    split = EvalSplit(base.num_users, base.num_items, [np.setdiff1d(t, cold_items) for t in base.train],
                      base.valid, base.test, cold_items)
    result = run_baseline(split, "content-knn", texts=two_topic_texts(base.num_items, 50), neighbours=(5, 20))
    assert result["model"] == "content-knn" and result["selected"]["neighbours"] in (5, 20)
    assert result["history"]["neighbours"] == [5, 20]
    best = result["history"]["valid_recall@20"][[5, 20].index(result["selected"]["neighbours"])]
    assert result["valid"]["recall@20"] == best == max(result["history"]["valid_recall@20"])
    test = result["test"]
    assert test["num_cold_users"] > 0
    assert test["cold_only/recall@20"] > test["cold_only_random/recall@20"] + 0.25
    assert test["recall@20"] > random_metrics(split)["recall@20"] + 0.1
    with pytest.raises(ValueError, match="texts"):
        run_baseline(split, "content-knn", neighbours=(5,))
    with pytest.raises(SettingsError, match="lambdas"):
        run_baseline(split, "content-knn", texts=two_topic_texts(base.num_items, 50), lambdas=(1.0,))


def test_content_knn_item_texts_fall_back_to_titles_and_refuse_a_table_without_text():
    from cllm4rec_dist.baselines.content_knn import item_texts
    from cllm4rec_dist.corpus.shards import ShardError

    assert item_texts({"titles": ["A", "B"], "descriptions": ["about a", ""]}) == ["about a", "B"]
    with pytest.raises(ShardError, match="ds/items.json: no item has a title or a description"):
        item_texts({"titles": ["", ""], "descriptions": ["", " "]}, "ds/items.json")
    with pytest.raises(ShardError, match="2 titles but 1 descriptions"):
        item_texts({"titles": ["A", "B"], "descriptions": ["x"]})


def test_content_knn_command_reads_the_item_texts_of_a_preprocessed_dataset(demo_data, tmp_path):
    from cllm4rec_dist.cli import main

    out_json = tmp_path / "content-knn.json"
    assert main(["baselines", "--data", demo_data, "--model", "content-knn", "--neighbours", "3,10",
                 "--out", str(out_json)]) == 0
    written = json.loads(out_json.read_text())
    assert written["model"] == "content-knn" and written["selected"]["neighbours"] in (3, 10)
    assert written["test"]["num_users"] > 0 and 0.0 <= written["test"]["recall@20"] <= 1.0
    assert main(["baselines", "--data", demo_data, "--model", "content-knn", "--lambdas", "1",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_content_signal_benchmark_prints_one_json_per_item_vector_source(demo_data):
    """benchmarks/content_signal.py on a preprocessed dataset: the sentence encoder's, the backbone's (words and
    hidden states) and the EASE blend's lines, each with its k chosen from the grid; its sbert line is the
    content-knn baseline itself."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "content_signal.py"), "--data", demo_data,
                          "--precision", "fp32", "--neighbours", "3,10", "--blend-ease"],
                         capture_output=True, text=True, check=True, cwd=root).stdout
    lines = {r["source"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    assert list(lines) == ["sbert", "backbone_words", "backbone_hidden", "ease+sbert"]
    for source in ("sbert", "backbone_words", "backbone_hidden"):
        assert lines[source]["selected"]["neighbours"] in (3, 10)
        assert 0.0 <= lines[source]["test"]["recall@20"] <= 1.0
    assert lines["ease+sbert"]["selected"]["beta"] >= 0.0
    from cllm4rec_dist.baselines.command import dataset_item_texts
    from cllm4rec_dist.corpus.shards import ShardedDataset

    dataset = ShardedDataset(demo_data)
    knn = run_baseline(dataset.eval_split(), "content-knn", texts=dataset_item_texts(dataset), neighbours=(3, 10))
    assert lines["sbert"]["test"]["recall@20"] == pytest.approx(knn["test"]["recall@20"])


def test_rank_ceiling_benchmark_scores_eases_weights_cut_to_each_width(demo_data):
    """benchmarks/rank_ceiling.py: at a width of at least the item count it is EASE itself (the baseline's own
    validation Recall@20 at its chosen λ); below, B is cut to exactly that rank, and a width of 1 scores lower."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("rank_ceiling", os.path.join(root, "benchmarks", "rank_ceiling.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--data", demo_data, "--ranks", "1,4,100000"])
    from cllm4rec_dist.corpus.shards import ShardedDataset

    split = ShardedDataset(demo_data).eval_split()
    baseline = run_baseline(split, "ease", score_test=False)
    assert out["lambda"] == baseline["selected"]["lambda"]
    assert out["full"] == pytest.approx(baseline["valid"]["recall@20"])
    assert out["by_rank"]["100000"] == pytest.approx(out["full"])
    assert out["by_rank"]["1"] < out["full"]
    b = ease.ease_weights(ease.gram_matrix(split.train_matrix()), out["lambda"])
    factors = np.linalg.svd(b, full_matrices=False)
    ranks = {rank: np.linalg.matrix_rank(bench.truncated(b, factors, rank)) for rank in (1, 4)}
    assert ranks == {1: 1, 4: 4}
