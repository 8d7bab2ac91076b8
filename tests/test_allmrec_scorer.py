"""A-LLMRec's candidate scorer (model.py ``candidate_scores``) against a plain per-candidate forward, and the data
rules of training and evaluation (negatives outside every known item, a random evaluation sample)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cllm4rec_dist.corpus.presets import build_backbone, load_tokenizer
from cllm4rec_dist.recommenders.allmrec.model import SCORE_MODES, LLMAlignment, SoftBatch
from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts

# Titles of very different token lengths (one token to many): padding and length effects show.
TITLES = [f"Film {chr(65 + i % 26)}{i} ({1980 + i})" if i % 3 else ("X" * (1 + i % 7)) + " the Long Sequel Part " +
          str(i) for i in range(40)]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp("allmrec_scorer") / "tiny-llama")
    build_backbone("tiny-llama", path, texts=TITLES)
    return {"path": path, "gguf_file": None}


@pytest.fixture(scope="module")
def prompts(tiny_llm) -> ALLMRecPrompts:
    return ALLMRecPrompts(load_tokenizer(tiny_llm), TITLES)


def plain_scores(llm: LLMAlignment, prompt, user_vectors, item_vectors, titles, score: str) -> list[float]:
    """The reference: each (prompt + title) as its own unpadded sequence, a plain forward over the full logits,
    fp32 log-softmax of the title tokens."""
    out = []
    for title in titles:
        single = SoftBatch.collate([prompt], [title], 0)
        with torch.no_grad():
            logits = llm.backbone(inputs_embeds=llm.inputs_embeds(single, user_vectors, item_vectors)).logits[0]
        start = len(prompt.ids)
        logp = F.log_softmax(logits[start - 1:-1].float(), -1).gather(1, torch.tensor(title)[:, None])[:, 0]
        out.append({"sum": logp.sum(), "mean": logp.mean(), "first": logp[0]}[score].item())
    return out


def _rows(prompts: ALLMRecPrompts, n: int = 4):
    """Prompts of different lengths (1 to 4 history items) and 5 candidates each, titles without EOS."""
    rows = [prompts.scoring_prompt(list(range(k, k + 1 + k % 4)), [k + 5, k + 11, k + 12, k + 20, k + 3])
            for k in range(n)]
    titles = [[prompts.scored_title(i) for i in (k + 5, k + 11, k + 12, k + 20, k + 3)] for k in range(n)]
    return rows, titles


@pytest.mark.parametrize("score", SCORE_MODES)
def test_packed_scores_equal_a_plain_forward_per_candidate_in_fp32(tiny_llm, prompts, score):
    torch.manual_seed(0)
    llm = LLMAlignment.load(tiny_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    rows, titles = _rows(prompts)
    assert len({len(t) for row in titles for t in row}) >= 3  # lengths really differ
    scores = llm.candidate_scores(rows, users, items, titles, score)
    assert scores.shape == (4, 5) and scores.dtype == torch.float32
    for r in range(4):
        reference = plain_scores(llm, rows[r], users[r:r + 1], items, titles[r], score)
        assert scores[r].tolist() == pytest.approx(reference, abs=2e-5)


def test_scores_leave_out_eos_and_the_shared_opening_and_modes_relate(tiny_llm, prompts):
    torch.manual_seed(0)
    llm = LLMAlignment.load(tiny_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    rows, titles = _rows(prompts)
    assert prompts.answer_prefix and all(prompts.eos not in t for row in titles for t in row)
    assert prompts.answer_prefix + prompts.scored_title(7) + [prompts.eos] == prompts.answer(7)
    by = {s: llm.candidate_scores(rows, users, items, titles, s) for s in SCORE_MODES}
    lengths = torch.tensor([[len(t) for t in row] for row in titles], dtype=torch.float32)
    assert torch.allclose(by["mean"] * lengths, by["sum"], atol=1e-5)
    firsts = llm.candidate_scores(rows, users, items, [[t[:1] for t in row] for row in titles], "sum")
    assert torch.allclose(by["first"], firsts, atol=1e-6)
    with pytest.raises(ValueError, match="score must be one of"):
        llm.candidate_scores(rows, users, items, titles, "max")


def test_bf16_scores_run_the_head_in_fp32_and_stay_near_the_fp32_plain_forward(tiny_llm, prompts):
    torch.manual_seed(0)
    fp32 = LLMAlignment.load(tiny_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    torch.manual_seed(0)
    bf16 = LLMAlignment.load(tiny_llm, "bf16", user_dim=6, item_dim=8, device="cpu")
    bf16.load_state_dict({k: v for k, v in fp32.state_dict().items() if not k.startswith("backbone.")}, strict=False)
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    rows, titles = _rows(prompts)
    scores = bf16.candidate_scores(rows, users, items, titles, "mean")
    assert scores.dtype == torch.float32 and bf16._head32.dtype == torch.float32
    # The same bf16 decoder run plain (one candidate at a time): only kernel order differs, not the head's dtype.
    for r in range(4):
        plain_bf16 = []
        for title in titles[r]:
            single = SoftBatch.collate([rows[r]], [title], 0)
            with torch.no_grad():
                hidden = bf16.backbone.base_model(
                    inputs_embeds=bf16.inputs_embeds(single, users[r:r + 1], items)).last_hidden_state[0]
            n = len(rows[r].ids)
            logp = bf16.head_logprobs(hidden[n - 1:-1]).gather(1, torch.tensor(title)[:, None])
            plain_bf16.append(logp.mean().item())
        assert scores[r].tolist() == pytest.approx(plain_bf16, abs=0.03)
        reference = plain_scores(fp32, rows[r], users[r:r + 1], items, titles[r], "mean")
        assert scores[r].tolist() == pytest.approx(reference, abs=0.1)


# ---- data rules: training negatives, the evaluation sample -------------------------------------


def test_training_negatives_exclude_the_validation_and_test_items(demo_loo_data):
    from cllm4rec_dist.corpus.sequences import SequentialData
    from cllm4rec_dist.recommenders.allmrec.trainer import known_items, rng, sample_unseen

    data = SequentialData.open(demo_loo_data)
    held_out_only = [u for u in range(data.num_users) if data.valid[u] is not None and data.test[u] is not None
                     and {data.valid[u], data.test[u]} - set(data.histories[u])]
    assert held_out_only  # users whose held-out items are NOT among their train items: the case that matters
    for u in held_out_only[:20]:
        known = known_items(data, u)
        assert {data.valid[u], data.test[u]} <= known and set(data.histories[u]) <= known
        drawn = set(sample_unseen(rng(0, u), data.num_items, known, data.num_items - len(known)))
        assert not drawn & known and len(drawn) == data.num_items - len(known)  # every other item, none known


def test_eval_max_users_takes_a_seeded_random_sample_not_the_first_users(demo_loo_data):
    from cllm4rec_dist.corpus.sequences import SequentialData
    from cllm4rec_dist.recommenders.allmrec.trainer import evaluated_sample

    data = SequentialData.open(demo_loo_data)
    every = [int(u) for u in data.evaluated_users("valid")]
    assert evaluated_sample(data, "valid", 0, seed=1) == every
    sample = evaluated_sample(data, "valid", 10, seed=1)
    assert len(sample) == 10 == len(set(sample)) and set(sample) <= set(every) and sample == sorted(sample)
    assert sample != every[:10] and max(sample) > every[len(every) // 2]  # spread over the users, not a prefix
    assert evaluated_sample(data, "valid", 10, seed=1) == sample  # the same on every rank / rerun
    assert evaluated_sample(data, "valid", 10, seed=2) != sample


# ---- over-fitting a few users: stage 2 can move the answer ------------------------------------


def test_the_training_loss_and_the_scorer_give_the_positive_title_the_same_log_likelihood(tiny_llm, prompts):
    """Stage 2 trains on (prompt, answer prefix + title + EOS) and evaluation scores (prompt + answer prefix, title):
    the title tokens must get the SAME log-probabilities in both layouts (same ids, positions, soft-token slots),
    else stage 2 would optimise something the evaluation does not measure."""
    torch.manual_seed(0)
    llm = LLMAlignment.load(tiny_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    history = [list(range(k, k + 1 + k % 4)) for k in range(4)]
    candidates = [[k + 5, k + 11, k + 12, k + 20, k + 3] for k in range(4)]
    targets = [0, 3, 1, 4]
    batch = SoftBatch.collate([prompts.prompt(h, c) for h, c in zip(history, candidates)],
                              [prompts.answer(c[t]) for c, t in zip(candidates, targets)], prompts.fill_id)
    with torch.no_grad():
        logprobs, owner = llm._answer_logprobs(batch, users, items)
    scores = llm.candidate_scores([prompts.scoring_prompt(h, c) for h, c in zip(history, candidates)], users, items,
                                  [[prompts.scored_title(i) for i in c] for c in candidates], "sum")
    skip = len(prompts.answer_prefix)
    for row, (c, t) in enumerate(zip(candidates, targets)):
        answer = logprobs[owner == row]
        assert len(answer) == skip + len(prompts.scored_title(c[t])) + 1  # prefix, title, EOS
        assert scores[row, t].item() == pytest.approx(answer[skip:-1].sum().item(), abs=1e-4)


# SmolLM2-135M's scales (benchmarks: its weights, offline): head rows of norm 3.2; q/k rows of norm ~4.6 after an
# input RMSNorm of weight ~0.3, i.e. ~1.4 per unit of normalised hidden state. The random tiny LLaMA (init std 0.02,
# width 64) has 0.16 for both, with norm weights 1.0.
HEAD_SCALE, QK_SCALE = 20.0, 8.0


@pytest.fixture(scope="module")
def shaped_llm(tmp_path_factory) -> dict:
    """The tiny LLaMA with a pretrained model's scales: its head and its attention's q/k projections multiplied up
    to SmolLM2-135M's norms (above), saved and loaded through from_pretrained like any checkpoint. At the random
    init's scales no hidden state moves a logit by more than ~1.6 (log V = 6.24) and attention is near uniform, so
    soft tokens cannot steer it (measured: 0/8 before and after, the loss flat at 6.18 from 6.22); a trained
    model's sharper attention and larger logits are what stage 2 relies on."""
    from transformers import AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("allmrec_shaped") / "tiny-llama")
    build_backbone("tiny-llama", path, texts=TITLES)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    model.save_pretrained(path)
    return {"path": path, "gguf_file": None}


def test_stage2_overfits_eight_users_far_above_chance(shaped_llm, prompts):
    """Only F_U, F_I train (the LLM is frozen), on the trainer's prompts (user soft token, titles with item soft
    tokens, 20 candidates) and loss (answer title + EOS); training Hit@1 on those prompts, scored like the
    evaluation (sum of title log-probabilities), must leave chance (1/20) far behind: stage 2 can learn at all.
    On SmolLM2 the same check is `benchmarks/check_allmrec.py --check overfit` (docs/RESULTS.md)."""
    torch.manual_seed(0)
    llm = LLMAlignment.load(shaped_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        order = torch.randperm(len(TITLES), generator=g).tolist()
        rows.append((order[:3], order[3:23], int(torch.randint(20, (1,), generator=g))))
    users, items = torch.randn(8, 6, generator=g), torch.randn(len(TITLES), 8, generator=g)

    def hit1() -> float:
        scoring = [prompts.scoring_prompt(h, c) for h, c, _ in rows]
        titles = [[prompts.scored_title(i) for i in c] for _, c, _ in rows]
        scores = llm.candidate_scores(scoring, users, items, titles, "sum")
        return sum(int(scores[r].argmax()) == t for r, (_, _, t) in enumerate(rows)) / len(rows)

    batch = SoftBatch.collate([prompts.prompt(h, c) for h, c, _ in rows], [prompts.answer(c[t]) for _, c, t in rows],
                              prompts.fill_id)
    before = hit1()
    optimizer = torch.optim.Adam(llm.projection_parameters(), lr=1e-2)
    for _ in range(60):
        llm.answer_loss(batch, users, items)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert before <= 0.25 and hit1() >= 0.75  # measured: 0/8 before, 8/8 after


def test_stage0_prints_one_progress_line_per_epoch_with_an_eta(demo_loo_data):
    from cllm4rec_dist.baselines.sequential import CFStage, CFStageSettings
    from cllm4rec_dist.corpus.sequences import SequentialData

    lines: list[str] = []
    settings = CFStageSettings(model="sasrec", max_epochs=3, patience=5, eval_every=2)
    CFStage(SequentialData.open(demo_loo_data), settings, progress=lines.append).setup().train()
    assert [line.split(" loss ")[0] for line in lines] == [f"[sasrec] epoch {e}/3" for e in (1, 2, 3)]
    assert all("/epoch" in line and "ETA <= " in line for line in lines)
    assert f"valid {settings.select_metric}" in lines[1] and "valid" not in lines[0]
