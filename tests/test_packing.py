"""Row packing (model/batch.py ``plan_rows``): rows sized by the batch's total length, not by its longest document.

The layout checks run on document lengths alone; the numerics checks compare each step's losses and gradients,
and the scoring forward's user vectors, on such rows with a plain reference that runs every document alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cllm4rec_dist.corpus.ids import TokenSpace
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.model.batch import ATTENTION_TOKENS, LMBatch, RecBatch, _first_fit, pack_rows, plan_rows
from cllm4rec_dist.recommenders.cllm4rec.batches import CorpusBatches
from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss, l_step_loss, rec_step_loss
from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig
from cllm4rec_dist.train.settings import BatchSettings

V, U, J, D = 128, 6, 13, 32
LAMBDA_C = 0.7


# ---- the layout ----------------------------------------------------------------------------------

def layout_cost(rows: int, width: int) -> float:
    return rows * width * (1 + width / ATTENTION_TOKENS)


def check_layout(lengths: list[int]) -> tuple[int, int]:
    """Every document once, inside its row, never overlapping another; every row used. (rows, width)."""
    doc_rows, doc_starts, width = plan_rows(lengths)
    num_rows = max(doc_rows) + 1
    assert width >= max(lengths)
    covered = np.zeros((num_rows, width), dtype=int)
    for row, start, n in zip(doc_rows, doc_starts, lengths):
        assert 0 <= start and start + n <= width
        covered[row, start:start + n] += 1
    assert covered.max() == 1 and covered.sum() == sum(lengths)
    assert covered.any(axis=1).all(), "an empty row"
    return num_rows, width


@pytest.mark.parametrize("seed", range(6))
def test_plan_places_every_document_once_and_is_never_dearer_than_rows_as_wide_as_the_longest(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(1, 70))
        spread = [(3, 40), (12, 30), (50, 1024), (1, 400)][seed % 4]
        lengths = rng.integers(*spread, size=n).tolist()
        rows, width = check_layout(lengths)
        old_rows = max(_first_fit(sorted(range(n), key=lambda k: -lengths[k]), lengths, max(lengths))[0]) + 1
        assert layout_cost(rows, width) <= layout_cost(old_rows, max(lengths))
        assert plan_rows(lengths) == plan_rows(list(lengths)), "a pure function of the lengths"


@pytest.mark.parametrize("docs, spread", [(16, (12, 30)), (16, (22, 28)), (64, (14, 34)), (16, (40, 300))])
def test_short_documents_fill_at_least_nine_tenths_of_the_rows(docs, spread):
    """The L/C/rec/score batches of the SmolLM2 benchmark (16 documents a step, 64 prompts a scoring batch, 12-34
    tokens each) were 75% real under rows as wide as the longest document."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        lengths = rng.integers(*spread, size=docs).tolist()
        rows, width = check_layout(lengths)
        assert sum(lengths) / (rows * width) >= 0.9, (lengths, rows, width)


def test_one_long_document_among_short_ones_gets_a_row_of_its_own_width():
    lengths = [900] + [20] * 40
    rows, width = check_layout(lengths)
    assert width == 900 and rows == 2


# ---- numerics against every document alone -------------------------------------------------------

@pytest.fixture(scope="module", params=["gqa-llama", "gpt2"])
def model(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=V, n_positions=128, bos_token_id=0,
                                   eos_token_id=0)).save_pretrained(path)
    else:
        LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=V, max_position_embeddings=128,
                                     tie_word_embeddings=False)).save_pretrained(path)
    torch.manual_seed(1)
    return CLLM4Rec(ModelConfig(backbone=str(path), num_users=U, num_items=J, lambda_c=LAMBDA_C, device="cpu",
                                max_logit_elements=16))


def user_token(u):
    return V + u


def item_token(j):
    return V + U + j


MAIN_LENGTHS = [7, 1, 2, 3, 1, 5, 2, 4, 1, 6, 3, 2]


def lm_documents(kind):
    gen = torch.Generator().manual_seed(3)
    rows, prompt_lengths = [], []
    for b, main_len in enumerate(MAIN_LENGTHS):
        if kind == "L":
            prompt = [user_token(b % U), 17, 23, 42]
            main = [item_token(j) for j in torch.randperm(J, generator=gen)[:main_len].tolist()]
        else:
            prompt = [user_token(b % U), 5, 9, item_token((3 * b) % J), 11]
            main = torch.randint(1, V, (main_len,), generator=gen).tolist()
        rows.append(prompt + main)
        prompt_lengths.append(len(prompt))
    return rows, prompt_lengths


def rec_documents():
    gen = torch.Generator().manual_seed(4)
    rows, users, target_rows, target_items = [], [], [], []
    for b, (kept, held_out) in enumerate([(6, 2), (1, 1), (1, 3), (2, 1), (1, 2), (4, 1), (2, 2), (3, 1)]):
        items = torch.randperm(J, generator=gen)[:kept + held_out].tolist()
        user = (b + 2) % U
        rows.append([user_token(user), 17, 23] + [item_token(j) for j in items[:kept]] + [user_token(user), 31])
        users.append(user)
        target_rows += [b] * held_out
        target_items += items[kept:]
    return rows, users, target_rows, target_items


def alone_hidden(model, row, side):
    """Last-layer hidden states (n, d) of one document run by itself: one row, no padding, default positions."""
    users, items = model.tables(side)
    vocab = model.backbone.get_input_embeddings().weight
    embeds = torch.stack([vocab[t] if t < V else users.weight[t - V] if t < V + U else items.weight[t - V - U]
                          for t in row])
    return model.backbone.base_model(inputs_embeds=embeds[None]).last_hidden_state[0]


def prior_term(model, token, side):
    other = "content" if side == "collab" else "collab"
    which, index = (0, token - V) if token < V + U else (1, token - V - U)
    return (model.tables(side)[which].weight[index] - model.tables(other)[which].weight[index].detach()).pow(2).sum()


def reference_losses(model, kind, rows, prompt_lengths=None, targets=None):
    """The paper's per-document objectives (mr_reduction 'paper', the default) averaged over documents."""
    side = "content" if kind == "C" else "collab"
    lm, mr = [], []
    for k, row in enumerate(rows):
        hidden = alone_hidden(model, row, side)
        if kind == "rec":
            log_probs = torch.log_softmax(model.item_head_weight() @ hidden[-1], dim=0)
            held = [j for j, r in zip(*targets) if r == k]
            lm.append(-sum(log_probs[j] for j in held))
            ids = {t for t in row if t >= V} | {item_token(j) for j in held}  # each prior term once per user
        else:
            head, offset = ((model.item_head_weight(), V + U) if kind == "L" else (model.vocab_head_weight(), 0))
            lm.append(-sum(torch.log_softmax(head @ hidden[t], dim=0)[row[t + 1] - offset]
                           for t in range(prompt_lengths[k] - 1, len(row) - 1)))
            ids = [t for t in row if t >= V]
        mr.append(LAMBDA_C / 2 * sum(prior_term(model, t, side) for t in ids))
    return torch.stack(lm).mean(), torch.stack(mr).mean()


LOSSES = {"L": l_step_loss, "C": c_step_loss, "rec": rec_step_loss}


@pytest.mark.parametrize("kind", ["L", "C", "rec"])
def test_losses_and_gradients_on_wide_packed_rows_match_every_document_alone(model, kind):
    if kind == "rec":
        rows, users, target_rows, target_items = rec_documents()
        batch = RecBatch.from_rows(rows, users, target_rows, target_items)
        prompt_lengths, targets = None, (target_items, target_rows)
    else:
        rows, prompt_lengths = lm_documents(kind)
        batch, targets = LMBatch.from_rows(rows, prompt_lengths), None
    width = batch.input_ids.shape[1]
    assert width > max(len(r) for r in rows), "rows wider than the longest document (the new layout)"
    assert (batch.doc_rows == 0).sum() >= 3, "several documents share a row"
    assert batch.real_token_fraction >= 0.9
    out = LOSSES[kind](model, batch)
    lm, mr = reference_losses(model, kind, rows, prompt_lengths, targets)
    torch.testing.assert_close(out["lm"], lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mr"], mr, rtol=1e-5, atol=1e-6)
    params = model.parameter_groups()["content" if kind == "C" else "collab"]
    for got, want in zip(torch.autograd.grad(out["loss"], params), torch.autograd.grad(lm + mr, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_scoring_vectors_on_packed_rows_match_every_prompt_alone(model):
    """The full-ranking evaluation's forward (evaluate.py: pack_rows, then the last token's hidden state)."""
    gen = torch.Generator().manual_seed(5)
    rows = [[user_token(u % U), 17] + [item_token(j) for j in torch.randperm(J, generator=gen)[:n].tolist()]
            + [user_token(u % U), 31] for u, n in enumerate([5, 1, 8, 2, 3, 1, 4, 6, 2, 2, 7, 1, 3, 5])]
    layout = pack_rows(rows)
    assert layout.input_ids.shape[0] < len(rows) / 3 and layout.real_token_fraction >= 0.9
    got = model.last_token_hidden(layout, side="collab")
    want = torch.stack([alone_hidden(model, row, "collab")[-1] for row in rows]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the data position -----------------------------------------------------------------------------

def test_a_steps_documents_do_not_depend_on_the_layout(demo_data):
    """The layout is a function of the batch's own documents, so (epoch, step) stays the whole data position and
    a checkpoint written under another layout resumes on the same documents (its reader state is the same)."""
    ds = ShardedDataset(demo_data)
    space = TokenSpace(ds.vocab_size, ds.num_users, ds.num_items)
    for name in ("collab", "rec"):
        packed, padded = (CorpusBatches.for_rank(ds, name, space, BatchSettings(batch_size=9, pack=pack))
                          for pack in (True, False))
        for epoch, step in ((0, 0), (1, 2)):
            assert np.array_equal(packed.doc_positions(epoch, step), padded.doc_positions(epoch, step))
            assert packed.reader_state(epoch, step) == padded.reader_state(epoch, step)
            a, b = packed.batch(epoch, step), padded.batch(epoch, step)
            assert all(a.document(k).equal(b.document(k)) for k in range(len(a.lengths)))
            assert a.real_token_fraction >= max(0.9, b.real_token_fraction)
