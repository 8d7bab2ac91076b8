"""Prompt building for both models: the one place that turns a user's items into the token ids an LLM reads.

* CLLM4Rec (``prediction_prompts``, ``rec_prompt``, ``arrange_items``): prompts of user/item TOKEN IDS. Their
  wording is the ``Templates`` of corpus/documents.py, tokenised once at preprocessing into each document's
  ``prompt_prefix`` / ``prompt_suffix``; what is built here, online, is the item list between them: reordered
  by a seeded per-document stream (stochastic item reordering) or kept in stored order (LLM-FixOrd), cut to
  the token budget. The training batches (train/loader.py) and the evaluation prompts (eval/evaluate.py) both
  go through these functions, so a model is scored on prompts laid out exactly as it trained on.
* A-LLMRec (``ALLMRecPrompts``): prompts that name items by their TITLES and put a SOFT-TOKEN SLOT (a projected
  vector, not a vocabulary id) after each of them, built online from the dataset's titles: (history,
  candidates) become token ids plus the positions of the slots; model/allmrec.py writes the projected vectors
  into those positions.

The paper's A-LLMRec prompt: the user's soft token; each history item's title followed by its item soft
token; each candidate's title followed by its soft token; the answer is the true next item's title. Without
soft tokens (``soft=False``) the same words and titles remain: the titles-only LLM baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from cllm4rec_dist.corpus.ids import TokenSpace

# --------------------------------------------------------------------------- CLLM4Rec: id-token prompts

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


# --------------------------------------------------------------------------- A-LLMRec: title prompts with soft tokens

_SLOT = re.compile(r"(\{user\}|\{item\}|\{title\})")


@dataclass
class ALLMRecTemplates:
    """The English wording of the A-LLMRec prompt. ``{user}`` / ``{item}`` are soft-token slots,
    ``{title}`` the item's title; the answer is ``item`` of the true next item, then EOS."""

    intro: str = "A user{user} has watched"
    item: str = ' "{title}"{item}'
    separator: str = ","
    question: str = ". From the following items:"
    outro: str = ". The next item this user will watch is"


@dataclass
class SoftPrompt:
    """One prompt: ``ids`` (slots hold ``fill_id``), user-slot positions, (position, item) of item slots."""

    ids: list[int]
    user_slots: list[int] = field(default_factory=list)
    item_slots: list[tuple[int, int]] = field(default_factory=list)


def normalise_title(text: str) -> str:
    """The form generated answers and titles are compared in: first quoted span if any, lower case,
    single spaces, no surrounding quotes or punctuation."""
    text = text.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        text = text[1:end] if end > 0 else text[1:]
    return " ".join(text.lower().split()).strip(" .,;:'\"")


class ALLMRecPrompts:
    """Builds A-LLMRec prompts for one tokenizer and one dataset's titles (titles tokenised once)."""

    def __init__(self, tokenizer, titles: list[str], templates: ALLMRecTemplates | None = None,
                 max_title_tokens: int = 24):
        self.tokenizer = tokenizer
        self.templates = templates or ALLMRecTemplates()
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if tokenizer.eos_token_id is None:
            raise ValueError("the backbone's tokenizer has no EOS token; A-LLMRec answers end with EOS")
        self.eos = tokenizer.eos_token_id
        self.fill_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._pieces: dict[str, list] = {}
        # Each item's rendered title piece (e.g. ' "Toy Story"'), the answer the LLM is trained to produce.
        self.title_ids = [self._encode(self._title_text(t))[:max_title_tokens] for t in titles]
        self.titles = list(titles)

    def _title_text(self, title: str) -> str:
        before, _, after = self.templates.item.partition("{item}")[0].partition("{title}")
        return f"{before}{title}{after}"

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _template(self, name: str) -> list:
        """A template split into text token ids and slot names (cached)."""
        if name not in self._pieces:
            parts = []
            for part in _SLOT.split(getattr(self.templates, name)):
                if part in ("{user}", "{item}", "{title}"):
                    parts.append(part[1:-1])
                elif part:
                    parts.append(self._encode(part))
            self._pieces[name] = parts
        return self._pieces[name]

    def _emit(self, prompt: SoftPrompt, name: str, soft: bool, item: int | None = None) -> None:
        for part in self._template(name):
            if part == "title":
                continue  # the title is emitted with its quotes as one piece, below
            if isinstance(part, list):
                prompt.ids += part
            elif soft and part == "user":
                prompt.user_slots.append(len(prompt.ids))
                prompt.ids.append(self.fill_id)
            elif soft and part == "item":
                prompt.item_slots.append((len(prompt.ids), item))
                prompt.ids.append(self.fill_id)

    def _emit_item(self, prompt: SoftPrompt, item: int, soft: bool) -> None:
        prompt.ids += self.title_ids[item]
        if soft and "{item}" in self.templates.item:
            prompt.item_slots.append((len(prompt.ids), item))
            prompt.ids.append(self.fill_id)

    def prompt(self, history: list[int], candidates: list[int], soft: bool = True) -> SoftPrompt:
        """The question for one user: the history (oldest first) and the candidates, as token ids + slots."""
        out = SoftPrompt(ids=list(self.bos))
        self._emit(out, "intro", soft)
        sep = self._encode(self.templates.separator)
        for k, item in enumerate(history):
            if k:
                out.ids += sep
            self._emit_item(out, item, soft)
        out.ids += self._encode(self.templates.question)
        for k, item in enumerate(candidates):
            if k:
                out.ids += sep
            self._emit_item(out, item, soft)
        out.ids += self._encode(self.templates.outro)
        return out

    def answer(self, item: int) -> list[int]:
        """Token ids the LLM should produce after the prompt: the item's title piece, then EOS."""
        return self.title_ids[item] + [self.eos]

    def decode_answer(self, ids: list[int]) -> str:
        """Generated ids (up to EOS) as a normalised title."""
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return normalise_title(self.tokenizer.decode(ids, skip_special_tokens=True))
