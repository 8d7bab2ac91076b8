"""A-LLMRec's prompts: items named by their TITLES, each followed by a SOFT-TOKEN SLOT.

Built online from the dataset's titles: (history, candidates) become token ids plus the positions of the slots (a
projected vector, not a vocabulary id); model.py writes the projected vectors into those positions.

The paper's A-LLMRec prompt: the user's soft token; each history item's title followed by its item soft token;
each candidate's title followed by its soft token; the answer is the true next item's title. Without soft tokens
(``soft=False``) the same words and titles remain: the titles-only LLM baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cllm4rec_dist.settings import ConfigError

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
    chat_outro: str = ". Which item will this user watch next? Answer with its title."
    """The user turn's last words when the prompt is a chat: a question the assistant's reply answers."""


_USER_TURN = "\x00A-LLMRec prompt\x00"


def chat_template_source(setting: str | None, tokenizer) -> str | None:
    """The Jinja source ``allmrec.chat_template`` names, checked to render one user turn: None = no chat (the plain
    prompt), "backbone" = the tokenizer's own template, otherwise a file. ConfigError naming the setting."""
    if setting is None:
        return None
    if setting == "backbone":
        template = tokenizer.chat_template
        if isinstance(template, dict):  # tokenizers with several named templates keep the chat one as "default"
            template = template.get("default")
        if not template:
            raise ConfigError("allmrec.chat_template=backbone: the backbone's tokenizer has no chat template; name a "
                              "Jinja file (e.g. configs/chat/chatml-user-turn.jinja) or leave it unset (the plain "
                              "prompt)")
    else:
        try:
            with open(setting, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"allmrec.chat_template={setting!r}: cannot read it ({error})") from None
    try:
        chat_frame(tokenizer, template)
    except ValueError as error:
        raise ConfigError(f"allmrec.chat_template={setting!r}: {error}; fix the template") from None
    return template


def chat_frame(tokenizer, template: str) -> tuple[str, str]:
    """The text a chat ``template`` (Jinja, the tokenizer's or a file's) puts before and after a single user turn,
    the assistant's generation prompt included. ValueError when it does not render one user turn."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _USER_TURN}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2's TemplateError and what the template raises itself
        raise ValueError(f"the chat template does not render a user turn: {error}") from None
    if not isinstance(text, str) or text.count(_USER_TURN) != 1:
        raise ValueError("the chat template does not render the user's message exactly once")
    before, after = text.split(_USER_TURN)
    return before, after


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
                 max_title_tokens: int = 24, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.templates = templates or ALLMRecTemplates()
        if tokenizer.eos_token_id is None:
            raise ValueError("the backbone's tokenizer has no EOS token; A-LLMRec answers end with EOS")
        self.eos = tokenizer.eos_token_id
        self.fill_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._pieces: dict[str, list] = {}
        # Each item's rendered title piece (e.g. ' "Toy Story"'), as the history and the candidates name it.
        opening_text, _, closing_text = self.templates.item.partition("{item}")[0].partition("{title}")
        listed = [self._encode(f"{opening_text}{title}{closing_text}") for title in titles]
        self.title_ids = [ids[:max_title_tokens] for ids in listed]
        self.titles = list(titles)
        if chat_template is None:
            # BOS, the prompt, and the answer continuing its last sentence: spelled as the list spells it.
            self.opening = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            self.closing = self._encode(self.templates.outro)
            spelled = listed
        else:
            # The chat's user turn (the template brings its own start tokens), a question, then the assistant's
            # reply: the title as a reply starts, without the space that joins it to a sentence.
            before, after = chat_frame(tokenizer, chat_template)
            self.opening = self._encode(before)
            self.closing = self._encode(self.templates.chat_outro) + self._encode(after)
            opening_text = opening_text.lstrip()
            spelled = [self._encode(f"{opening_text}{title}{closing_text}") for title in titles]
        # Scoring: the answer's opening text (e.g. the quote ' "') is the same context for every candidate, so it
        # joins the prompt. A title whose first characters merge with it into one token (' "\'' for "'Til ...") is
        # spelled as the opening's ids and then its own, so that every candidate is scored on its title alone;
        # a tokenizer that joins the opening to most titles keeps its own spelling, opening included.
        prefix = self._encode(opening_text)
        if 2 * sum(ids[:len(prefix)] == prefix for ids in spelled) < len(spelled):
            prefix = []
        self.answer_prefix = prefix
        self.answer_ids = [(ids if ids[:len(prefix)] == prefix else prefix + self._encode(f"{title}{closing_text}"))
                           [:max(max_title_tokens, len(prefix) + 1)] for ids, title in zip(spelled, titles)]

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
        out = SoftPrompt(ids=list(self.opening))
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
        out.ids += self.closing
        return out

    def scoring_prompt(self, history: list[int], candidates: list[int], soft: bool = True) -> SoftPrompt:
        """``prompt`` followed by ``answer_prefix``: the context after which each ``scored_title`` is scored."""
        out = self.prompt(history, candidates, soft)
        out.ids += self.answer_prefix
        return out

    def scored_title(self, item: int) -> list[int]:
        """The ids a candidate is scored on: its title piece without the shared prefix, WITHOUT EOS (EOS says
        the answer ended, not which item it is; counting it would favour titles after which EOS is likely)."""
        return self.answer_ids[item][len(self.answer_prefix):]

    def answer(self, item: int) -> list[int]:
        """Token ids the LLM should produce after the prompt: the item's title piece, then EOS."""
        return self.answer_ids[item] + [self.eos]

    def decode_answer(self, ids: list[int]) -> str:
        """Generated ids (up to EOS) as a normalised title."""
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return normalise_title(self.tokenizer.decode(ids, skip_special_tokens=True))
