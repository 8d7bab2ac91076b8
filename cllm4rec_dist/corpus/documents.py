"""Corpus documents as token ids, each with its PROMPT kept apart from its MAIN part.

| corpus  | one per            | prompt                                             | main                    |
| collab  | user               | `<user_i> has interacted with`                     | train item tokens       |
| content | review/bio/item    | `<user_i> writes the following review for <item_j>:` ... | text tokens + EOS |
| rec     | user               | built online: prefix + kept items + suffix         | (targets: masked items) |
| eval    | user               | built at prediction: prefix + all train items + suffix | (train/valid/test)  |

Tokenised once here so training never re-tokenises. Item order inside MAIN is
shuffled online by the loader (stochastic reordering), so it is stored as-is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cllm4rec_dist.corpus.ids import TokenSpace, encode
from cllm4rec_dist.data.protocol import Split

CORPORA = ("collab", "content", "rec", "eval")


@dataclass
class Templates:
    """The English wording of every prompt ({user}/{item} become atomic tokens).

    A setting recorded in the manifest: training and inference must use the same one.
    """

    collab: str = "{user} has interacted with"
    review: str = "{user} writes the following review for {item}:"
    user_text: str = "The biography of {user} is:"
    item_text: str = "The content of {item} is:"
    rec_prefix: str = "{user} has interacted with"
    rec_suffix: str = ", {user} will interact with"

    def phrases(self) -> list[str]:
        """The natural-language parts, e.g. to train a demo tokenizer on."""
        return [getattr(self, k).replace("{user}", "").replace("{item}", "") for k in asdict(self)]


@dataclass
class DocumentBuilder:
    """Turns a Split into corpus documents (dicts of token ids), deterministically."""

    tokenizer: object
    space: TokenSpace
    templates: Templates
    max_text_tokens: int = 256
    """MAIN text longer than this is cut (counted in stats as truncated)."""

    def __post_init__(self):
        self.bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        self.eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.truncated = 0

    def _prompt(self, template: str, user: int | None = None, item: int | None = None) -> list[int]:
        text = template.format(user=f"<user_{user}>" if user is not None else "",
                               item=f"<item_{item}>" if item is not None else "")
        return self.bos + encode(text, self.tokenizer, self.space)

    def _text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(" " + text, add_special_tokens=False)
        if len(ids) > self.max_text_tokens:
            self.truncated += 1
            ids = ids[: self.max_text_tokens]
        return ids + self.eos

    def rec_prompt_parts(self, user: int) -> tuple[list[int], list[int]]:
        """(prefix, suffix) of the rec prompt; the kept items go between them."""
        prefix = self._prompt(self.templates.rec_prefix, user=user)
        suffix = encode(self.templates.rec_suffix.format(user=f"<user_{user}>"), self.tokenizer, self.space)
        return prefix, suffix

    def collab(self, split: Split):
        for u, items in enumerate(split.train):
            main = [self.space.item_token(int(i)) for i in items]
            yield {"kind": "collab", "user": u, "item": -1, "prompt": self._prompt(self.templates.collab, user=u),
                   "main": main}

    def content(self, split: Split):
        for u, i, text in split.reviews:
            yield {"kind": "review", "user": u, "item": i,
                   "prompt": self._prompt(self.templates.review, user=u, item=i), "main": self._text(text)}
        for u, text in sorted(split.user_texts.items()):
            yield {"kind": "user_text", "user": u, "item": -1,
                   "prompt": self._prompt(self.templates.user_text, user=u), "main": self._text(text)}
        for i, text in sorted(split.item_texts.items()):
            yield {"kind": "item_text", "user": -1, "item": i,
                   "prompt": self._prompt(self.templates.item_text, item=i), "main": self._text(text)}

    def rec(self, split: Split):
        for u, items in enumerate(split.train):
            prefix, suffix = self.rec_prompt_parts(u)
            yield {"kind": "rec", "user": u, "prompt_prefix": prefix, "prompt_suffix": suffix,
                   "items": [int(i) for i in items]}

    def eval(self, split: Split):
        for u in range(split.num_users):
            prefix, suffix = self.rec_prompt_parts(u)
            yield {"kind": "eval", "user": u, "prompt_prefix": prefix, "prompt_suffix": suffix,
                   "train": [int(i) for i in split.train[u]], "valid": [int(i) for i in split.valid[u]],
                   "test": [int(i) for i in split.test[u]]}

    def corpus(self, name: str, split: Split):
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; known: {CORPORA}")
        return getattr(self, name)(split)


def num_tokens(doc: dict) -> int:
    """Tokens a document feeds the model (prompt + main; rec/eval: prefix + items + suffix)."""
    if "main" in doc:
        return len(doc["prompt"]) + len(doc["main"])
    items = doc.get("items", doc.get("train", []))
    return len(doc["prompt_prefix"]) + len(items) + len(doc["prompt_suffix"])
