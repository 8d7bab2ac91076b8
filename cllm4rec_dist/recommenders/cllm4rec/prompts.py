"""CLLM4Rec's prompts: the one place that turns a user's items into the token ids the model reads.

Prompts of user/item TOKEN IDS (``prediction_prompts``, ``rec_prompt``, ``arrange_items``). Their wording is the
``Templates`` of corpus/documents.py, tokenised once at preprocessing into each document's ``prompt_prefix`` /
``prompt_suffix``; what is built here, online, is the item list between them: reordered by a seeded per-document
stream (stochastic item reordering) or kept in stored order (LLM-FixOrd), cut to the token budget. The training
batches (batches.py) and the evaluation prompts (evaluate.py) both go through these functions, so a model is
scored on prompts laid out exactly as it trained on.
"""

from __future__ import annotations

import numpy as np

from cllm4rec_dist.corpus.ids import TokenSpace

DOC_STREAMS = {"order": 1, "mask": 2}  # 3 and 4: a partition's epoch order (corpus/stream.py)


def doc_rng(seed: int, epoch: int, doc: int, stream: str) -> np.random.Generator:
    """The seeded random stream ``stream`` ('order': item reordering, 'mask': masked prompting) of one
    document in one epoch: it depends on (seed, epoch, document), never on which rank holds the document."""
    return np.random.default_rng([seed, epoch, doc, DOC_STREAMS[stream]])


def arrange_items(items: list[int], budget: int, order: np.random.Generator | None = None) -> list[int]:
    """A user's items as a prompt lists them in at most ``budget`` tokens.

    With an ``order`` stream (stochastic item reordering): that stream's permutation, first ``budget`` items.
    Without (LLM-FixOrd): the stored order, cut to the LATEST ``budget`` items."""
    items = list(items)
    if order is not None:
        return [items[k] for k in order.permutation(len(items))][: max(budget, 0)]
    return items[-budget:] if budget > 0 else []


def rec_prompt(doc: dict, items: list[int], space: TokenSpace, suffix: bool = True) -> list[int]:
    """A rec/eval document's prompt around ``items``: prefix + item tokens (+ suffix: the finetuned RecLLM's
    question; without it the prompt continues like an L-step document, the paper's LLM-PreRec)."""
    return (doc["prompt_prefix"] + [space.item_token(i) for i in items]
            + (doc["prompt_suffix"] if suffix else []))


def prediction_prompts(docs: list[dict], space: TokenSpace, style: str = "rec", max_length: int = 1024,
                       seed: int = 0, reorder: bool = True) -> list[list[int]]:
    """Token ids of the scoring prompt of each eval document: ALL train items of the user (no masking).

    style 'rec' = prefix + items + suffix (the finetuned RecLLM); 'collab' = prefix + items, predicting the
    next item as the L-step does (the paper's LLM-PreRec). Items in the order the model trained on: with
    ``reorder`` (stochastic reordering in training) a fixed shuffle (the user's epoch-0 'order' stream), so it
    matches neither file order nor ids; without it (LLM-FixOrd) the stored order, cut to the latest items as
    the training batches are. Row k is the prompt of ``docs[k]`` (model/batch.py ``pack_rows`` lays them out).
    """
    rows = []
    for doc in docs:
        suffix = style == "rec"
        budget = max_length - len(doc["prompt_prefix"]) - (len(doc["prompt_suffix"]) if suffix else 0)
        order = doc_rng(seed, 0, int(doc["user"]), "order") if reorder else None
        rows.append(rec_prompt(doc, arrange_items(doc["train"], budget, order), space, suffix))
    return rows
