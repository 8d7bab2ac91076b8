"""Baselines: EASE's closed form, Multi-VAE learns, selection on valid only, the result JSON, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cllm4rec_dist.baselines import ease, multivae, run_baseline
from cllm4rec_dist.baselines.common import EvalSettings, SettingsError, evaluate
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
    return evaluate(lambda users: rng.random((len(users), split.num_items)), split, part, EvalSettings())


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
    direct = real_evaluate(lambda users: np.asarray(x[users] @ b), split, "test", EvalSettings())
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
    assert main(["baselines", "--data", demo_data, "--model", "ease", "--lambdas", "10,100", "--out", str(out_json)]) == 0
    written = json.loads((tmp_path / "baselines" / "ease.json").read_text())
    check_result(written, "ease")
    assert written["selected"]["lambda"] in (10.0, 100.0)
    assert '"selected"' in capsys.readouterr().out
    # A flag that does not apply to the model is an error, not silently ignored.
    out = tmp_path / "x.json"
    assert main(["baselines", "--data", demo_data, "--model", "ease", "--epochs", "3", "--out", str(out)]) == 2
    assert not out.exists()
