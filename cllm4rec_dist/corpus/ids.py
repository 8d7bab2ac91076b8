"""Atomic user/item tokens by arithmetic, and the `<user_12>` / `<item_7>` marker format.

Token ids: vocab 0..V-1, user i -> V + i, item j -> V + I + j. The Hugging Face
tokenizer never sees user/item tokens: millions of added strings would make it
slow and could split `<user_4332>` into pieces. Only natural-language segments
between markers are tokenised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = re.compile(r"<(user|item)_(\d+)>")


@dataclass(frozen=True)
class TokenSpace:
    """The extended vocabulary: V backbone tokens, then I users, then J items."""

    vocab_size: int
    num_users: int
    num_items: int

    @property
    def size(self) -> int:
        return self.vocab_size + self.num_users + self.num_items

    def user_token(self, user: int) -> int:
        if not 0 <= user < self.num_users:
            raise ValueError(f"user index {user} outside 0..{self.num_users - 1}")
        return self.vocab_size + user

    def item_token(self, item: int) -> int:
        if not 0 <= item < self.num_items:
            raise ValueError(f"item index {item} outside 0..{self.num_items - 1}")
        return self.vocab_size + self.num_users + item

    def is_user(self, token: int) -> bool:
        return self.vocab_size <= token < self.vocab_size + self.num_users

    def is_item(self, token: int) -> bool:
        return self.vocab_size + self.num_users <= token < self.size

    def kind(self, token: int) -> str:
        """'vocab', 'user' or 'item'."""
        if 0 <= token < self.vocab_size:
            return "vocab"
        if self.is_user(token):
            return "user"
        if self.is_item(token):
            return "item"
        raise ValueError(f"token id {token} outside the extended vocabulary of size {self.size}")

    def item_of(self, token: int) -> int:
        return token - self.vocab_size - self.num_users

    def user_of(self, token: int) -> int:
        return token - self.vocab_size


def split_markers(text: str) -> list[str | tuple[str, int]]:
    """Split a string into natural-language segments and ('user'|'item', index) markers."""
    parts: list[str | tuple[str, int]] = []
    pos = 0
    for m in MARKER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        parts.append((m.group(1), int(m.group(2))))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def encode(text: str, tokenizer, space: TokenSpace) -> list[int]:
    """Token ids of a string with markers: markers become atomic ids, the rest goes to the tokenizer."""
    ids: list[int] = []
    for part in split_markers(text):
        if isinstance(part, tuple):
            kind, index = part
            ids.append(space.user_token(index) if kind == "user" else space.item_token(index))
        else:
            ids.extend(tokenizer.encode(part, add_special_tokens=False))
    return ids


def decode(ids, tokenizer, space: TokenSpace) -> str:
    """Inverse of ``encode`` for inspection: vocab runs are detokenised, user/item ids become markers."""
    out: list[str] = []
    run: list[int] = []
    for token in ids:
        token = int(token)
        if token < space.vocab_size:
            run.append(token)
            continue
        if run:
            out.append(tokenizer.decode(run))
            run = []
        kind = space.kind(token)
        index = space.user_of(token) if kind == "user" else space.item_of(token)
        out.append(f"<{kind}_{index}>")
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)
