"""Stage 0: SASRec / GRU4Rec behind SequentialCF, their training with early stopping, candidate metrics."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from cllm4rec_dist.baselines.popular import run_candidates
from cllm4rec_dist.baselines.sequential import CFStage, CFStageSettings, evaluate_candidates, load_cf_model
from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.data.candidates import sample_negatives
from cllm4rec_dist.eval.candidates import MISS, CandidateEvalSettings, candidate_metrics
from cllm4rec_dist.model.cf import CF_MODELS, PAD, pad_histories
from cllm4rec_dist.model.cf.gru4rec import GRU4Rec, GRU4RecSettings
from cllm4rec_dist.model.cf.loss import draw_training_negatives, next_item_bce
from cllm4rec_dist.model.cf.sasrec import SASRec, SASRecSettings

NUM_ITEMS = 40


def synthetic_sequences(num_users=160, seed=0) -> SequentialData:
    """Users walk the catalogue in steps of +1 (80%) or at random: the next item follows from the last one,
    which a sequence model can learn and a popularity ranking cannot."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(num_users):
        items, seen = [int(rng.integers(NUM_ITEMS))], set()
        while len(items) < rng.integers(8, 16):
            seen.add(items[-1])
            nxt = (items[-1] + 1) % NUM_ITEMS if rng.random() < 0.8 else int(rng.integers(NUM_ITEMS))
            if nxt not in seen:
                items.append(nxt)
        sequences.append(items)
    candidates = {"valid": [], "test": []}
    for u, items in enumerate(sequences):
        for k, part in enumerate(("valid", "test")):
            positive = items[-2 + k]
            crng = np.random.default_rng([seed, u, k])
            row = np.concatenate([[positive], sample_negatives(crng, NUM_ITEMS, np.unique(items), 19)])
            candidates[part].append(row[crng.permutation(20)].tolist())
    histories = [items[:-2] for items in sequences]
    counts = np.bincount(np.concatenate(histories), minlength=NUM_ITEMS)
    return SequentialData(num_users, NUM_ITEMS, histories, [s[-2] for s in sequences], [s[-1] for s in sequences],
                          candidates, [f"item {i}" for i in range(NUM_ITEMS)], [""] * NUM_ITEMS, counts.tolist(), {})


@pytest.fixture(scope="module")
def sequences():
    return synthetic_sequences()


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_loss_falls_and_beats_most_popular(sequences, name, tmp_path):
    settings = CFStageSettings(model=name, max_epochs=30, patience=30, batch_size=32, lr=5e-3)
    settings.sasrec = SASRecSettings(dim=32, max_len=16)
    settings.gru4rec = GRU4RecSettings(dim=32, max_len=16)
    stage = CFStage(sequences, settings).setup()
    result = stage.train()
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.7 * losses[0]
    popular = run_candidates(sequences)["test"]
    assert result["test"]["hit@1"] > popular["hit@1"] + 0.25, (result["test"]["hit@1"], popular["hit@1"])
    assert result["test"]["ndcg@10"] > popular["ndcg@10"] + 0.15
    # the saved best model loads without pickle and scores exactly as trained
    stage.save_checkpoint(str(tmp_path))
    model, info = load_cf_model(str(tmp_path))
    assert type(model) is CF_MODELS[name] and info["best_epoch"] == result["best_epoch"]
    assert evaluate_candidates(model, sequences, "test", settings) == result["test"]
    assert (tmp_path / "cf_model.safetensors").read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_cf_checkpoint_is_read_only_when_complete_and_fitting(tmp_path):
    """Stage 0's model goes through train/checkpoint.py: files record last; truncated, unrecorded or
    misshapen folders are refused with the file named."""
    from cllm4rec_dist.baselines.sequential import save_cf_model
    from cllm4rec_dist.train.checkpoint import CheckpointError

    model = SASRec(NUM_ITEMS, SASRecSettings(dim=8, max_len=6, num_blocks=1))
    save_cf_model(model, str(tmp_path / "ok"), {"best_epoch": 3})
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["cf_model.json", "cf_model.safetensors",
                                                                  "files-rank0.json"]
    loaded, info = load_cf_model(str(tmp_path / "ok"))
    assert info["best_epoch"] == 3 and all(torch.equal(loaded.state_dict()[k], v)
                                           for k, v in model.state_dict().items())
    truncated = tmp_path / "truncated"
    save_cf_model(model, str(truncated))
    weights = truncated / "cf_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match="cf_model.safetensors has .* bytes"):
        load_cf_model(str(truncated))
    (truncated / "files-rank0.json").unlink()  # interrupted before the record: not a complete checkpoint
    with pytest.raises(CheckpointError, match="no readable files-rank0.json"):
        load_cf_model(str(truncated))
    with pytest.raises(CheckpointError, match="--model-out"):
        load_cf_model(str(tmp_path / "nothing"))
    other = tmp_path / "other"  # a config that does not fit the saved tensors
    save_cf_model(model, str(other))
    from cllm4rec_dist.train.checkpoint import write_model

    config = dict(model.config(), num_items=NUM_ITEMS + 1)
    write_model(str(other), "cf_model", model.state_dict(), {"config": config})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_cf_model(str(other))


def test_early_stopping_keeps_the_best_validation_epoch(sequences):
    settings = CFStageSettings(max_epochs=40, patience=2, lr=0.05, batch_size=16)
    settings.sasrec = SASRecSettings(dim=16, max_len=16)
    result = CFStage(sequences, settings).setup().train()
    evaluated = [h for h in result["history"] if "valid" in h]
    values = [h["valid"]["ndcg@10"] for h in evaluated]
    assert len(result["history"]) < 40 and values.index(max(values)) == len(values) - 3  # stopped 2 after the best
    assert (result["valid"]["ndcg@10"] == max(values)
            and result["best_epoch"] == evaluated[values.index(max(values))]["epoch"])
    # the settings survive the JSON round trip of cf_model.json
    assert CFStageSettings.from_dict(json.loads(json.dumps(asdict(settings)))) == settings
    with pytest.raises(ValueError, match="select_metric"):
        CFStageSettings(select_metric="recall@20").validate()


@pytest.mark.parametrize("model", [SASRec(NUM_ITEMS, SASRecSettings(dim=16, max_len=12, num_heads=2)),
                                   GRU4Rec(NUM_ITEMS, GRU4RecSettings(dim=16, max_len=12, num_layers=2))],
                         ids=["sasrec", "gru4rec"])
def test_outputs_are_causal_pad_invariant_and_scores_are_dot_products(model):
    model.eval()
    torch.manual_seed(0)
    histories = [torch.randint(NUM_ITEMS, (n,)).tolist() for n in (12, 9, 5, 1)]
    batch = pad_histories(histories, 12)
    out = model.sequence_output(batch)
    for t in range(4, 12):  # change every item after position t: outputs up to t must not move
        changed = batch.clone()
        later = changed[:, t + 1:]
        changed[:, t + 1:] = torch.where(later == PAD, later, (later + 7) % NUM_ITEMS)
        moved = model.sequence_output(changed)
        torch.testing.assert_close(moved[:, : t + 1], out[:, : t + 1])
        assert not torch.allclose(moved[0, t + 1:], out[0, t + 1:]) or t == 11
    assert (out[batch == PAD] == 0).all()
    # a narrower padding of the same histories gives the same user representation
    torch.testing.assert_close(model.user_representation(pad_histories(histories[1:], 9)),
                               model.user_representation(batch[1:]))
    candidates = torch.randint(NUM_ITEMS, (4, 20))
    expected = torch.stack([model.item_embeddings()[candidates[b]] @ model.user_representation(batch)[b]
                            for b in range(4)])
    torch.testing.assert_close(model.score(batch, candidates), expected)


def test_bce_and_negatives_against_a_reference():
    torch.manual_seed(1)
    model = SASRec(NUM_ITEMS, SASRecSettings(dim=8, max_len=6, dropout=0.0))
    histories = [[1, 2, 3, 4, 5], [7, 8]]
    inputs = pad_histories([h[:-1] for h in histories], 6)
    targets = pad_histories([h[1:] for h in histories], 6)
    negatives = draw_training_negatives(histories, targets, NUM_ITEMS, torch.Generator().manual_seed(0))
    assert ((negatives == PAD) == (targets == PAD)).all()
    for row, items in enumerate(histories):
        assert not set(negatives[row][negatives[row] != PAD].tolist()) & set(items)
    out, table = model.sequence_output(inputs), model.item_embeddings()
    terms = []
    for b in range(2):
        for t in range(6):
            if targets[b, t] != PAD:
                pos, neg = out[b, t] @ table[targets[b, t]], out[b, t] @ table[negatives[b, t]]
                terms.append(-math.log(torch.sigmoid(pos).item()) - math.log(1 - torch.sigmoid(neg).item()))
    assert abs(next_item_bce(model, inputs, targets, negatives).item() - sum(terms) / len(terms)) < 1e-5


def reference_rank(scores, candidates, positive):
    order = sorted(range(len(candidates)), key=lambda k: (-scores[k], k))  # ties: earlier candidate first
    return [candidates[k] for k in order].index(positive)


def test_candidate_metrics_against_a_naive_reference():
    rng = np.random.default_rng(3)
    users, counts = 300, rng.integers(0, 80, size=50)
    candidates = np.stack([rng.permutation(50)[:20] for _ in range(users)])
    positives = candidates[np.arange(users), rng.integers(20, size=users)]
    scores = rng.integers(0, 4, size=(users, 20)).astype(float)  # many ties
    lengths = rng.integers(1, 30, size=users)
    settings = CandidateEvalSettings(hit_ks=(1, 3), ndcg_ks=(10,), cold_item_max_count=15, warm_item_min_count=40,
                                     cold_user_max_history=5)
    got = candidate_metrics(scores, candidates, positives, lengths, counts, settings)
    ranks = np.array([reference_rank(scores[u], candidates[u].tolist(), positives[u]) for u in range(users)])

    def expect(mask):
        r = ranks[mask]
        return {"users": int(mask.sum()), "hit@1": np.mean(r < 1), "hit@3": np.mean(r < 3),
                "ndcg@10": np.mean([1 / math.log2(x + 2) if x < 10 else 0 for x in r])}

    def check(actual, mask):
        for key, value in expect(mask).items():
            assert actual[key] == pytest.approx(value), key

    check(got, np.ones(users, bool))
    check(got["slices"]["cold_items"], counts[positives] <= 15)
    check(got["slices"]["warm_items"], counts[positives] >= 40)
    check(got["slices"]["cold_users"], lengths <= 5)
    # generated answers: ranks given directly, a miss counts at no K
    direct = candidate_metrics([0, MISS, 2], None, np.array([1, 2, 3]), [3, 3, 3], np.ones(5), settings, are_ranks=True)
    assert direct["hit@1"] == pytest.approx(1 / 3) and direct["hit@3"] == pytest.approx(2 / 3)
    assert direct["slices"]["cold_items"]["users"] == 3 and direct["slices"]["warm_items"]["hit@1"] is None


def test_baselines_command_scores_the_stored_candidates(demo_loo_data, demo_data, tmp_path, capsys):
    from cllm4rec_dist.cli import main

    out = tmp_path / "popular.json"
    assert main(["baselines", "--data", demo_loo_data, "--model", "popular", "--out", str(out)]) == 0
    popular = json.loads(out.read_text())
    data = SequentialData.open(demo_loo_data)
    counts = np.asarray(data.train_counts)
    for part in ("valid", "test"):
        users = data.evaluated_users(part)
        assert popular[part]["users"] == len(users)
        best = [np.argmax(counts[data.candidates[part][u]]) for u in users]  # ties: the earlier candidate wins
        hits = [data.candidates[part][u][b] == getattr(data, part)[u] for u, b in zip(users, best)]
        assert popular[part]["hit@1"] == pytest.approx(np.mean(hits))
        assert set(popular[part]["slices"]) == {"cold_items", "warm_items", "cold_users"}
    out = tmp_path / "gru4rec.json"
    assert main(["baselines", "--data", demo_loo_data, "--model", "gru4rec", "--epochs", "2", "--out", str(out),
                 "--model-out", str(tmp_path / "gru")]) == 0
    result = json.loads(out.read_text())
    assert len(result["history"]) == 2 and {"hit@1", "ndcg@10", "slices"} <= set(result["test"])
    model, info = load_cf_model(str(tmp_path / "gru"))
    assert info["test"] == result["test"] and model.num_items == data.num_items
    assert main(["baselines", "--data", demo_data, "--model", "sasrec"]) == 2
    assert "--split leave-one-out" in capsys.readouterr().err
    assert main(["baselines", "--data", demo_loo_data, "--model", "popular", "--lambdas", "1"]) == 2
