"""`cllm4rec demo-data`: a deterministic synthetic dataset the project makes itself.

Users and items share latent topics. A user's topic tastes drive BOTH which
items they interact with (and how they rate them) AND the words of their
reviews and bio; an item's topic drives its title and description. So a model that reads
the text and the interactions can learn something a most-popular ranking
cannot, and the metrics show it.

Written in the `table` folder layout (see data/readers/table.py):
``interactions.csv`` (user,item,rating,timestamp,review), ``users.csv``
(user,user_text) and ``items.csv`` (item,item_title,item_text), so the demo goes through
the same `preprocess` path as real data.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from dataclasses import dataclass

import numpy as np

from cllm4rec_dist.atomic import write_text_atomic

TOPICS: dict[str, list[str]] = {
    "space": ["galaxy", "rocket", "orbit", "planet", "astronaut", "nebula"],
    "cooking": ["recipe", "spice", "oven", "flavor", "kitchen", "sauce"],
    "mystery": ["detective", "clue", "suspect", "alibi", "secret", "motive"],
    "garden": ["flower", "seed", "soil", "bloom", "leaf", "harvest"],
    "music": ["guitar", "melody", "rhythm", "chorus", "drum", "concert"],
    "sports": ["goal", "team", "coach", "stadium", "match", "sprint"],
    "history": ["empire", "castle", "battle", "dynasty", "archive", "relic"],
    "travel": ["island", "journey", "passport", "harbor", "mountain", "map"],
}
NOUNS = ["book", "kit", "guide", "set", "album", "game", "poster", "toolkit"]
POSITIVE = ["loved", "enjoyed", "adored", "recommend", "liked"]
NEGATIVE = ["disliked", "regret", "returned", "hated", "skipped"]


@dataclass
class DemoConfig:
    """Size and shape of the synthetic dataset."""

    num_users: int = 300
    num_items: int = 200
    min_items_per_user: int = 12
    max_items_per_user: int = 30
    taste_sharpness: float = 4.0
    """How strongly a user's topic taste decides what they pick (0 = popularity only)."""
    seed: int = 0


def vocabulary_text() -> str:
    """Every word the generator can emit, for training a small demo tokenizer."""
    words = [w for ws in TOPICS.values() for w in ws] + list(TOPICS) + NOUNS + POSITIVE + NEGATIVE
    samples = [review_text(t, "book", 5, np.random.default_rng(i)) for i, t in enumerate(TOPICS)]
    samples += [review_text(t, "kit", 1, np.random.default_rng(i)) for i, t in enumerate(TOPICS)]
    return " ".join(words) + "\n" + "\n".join(samples)


def review_text(topic: str, noun: str, rating: int, rng: np.random.Generator) -> str:
    words = rng.choice(TOPICS[topic], size=2, replace=False)
    verb = rng.choice(POSITIVE if rating > 3 else NEGATIVE)
    return f"I {verb} this {topic} {noun}. The {words[0]} and the {words[1]} stand out."


def generate(cfg: DemoConfig) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Return (interactions, users, items) rows; a pure function of cfg."""
    rng = np.random.default_rng(cfg.seed)
    topic_names = list(TOPICS)
    num_topics = len(topic_names)
    item_topic = rng.integers(num_topics, size=cfg.num_items)
    item_noun = rng.choice(NOUNS, size=cfg.num_items)
    item_popularity = rng.normal(0.0, 0.3, size=cfg.num_items)
    # Each user likes two topics, one strongly.
    user_taste = np.full((cfg.num_users, num_topics), -1.0)
    for u in range(cfg.num_users):
        first, second = rng.choice(num_topics, size=2, replace=False)
        user_taste[u, first] = 1.0
        user_taste[u, second] = 0.5

    interactions = []
    t0 = 1_600_000_000
    for u in range(cfg.num_users):
        affinity = user_taste[u, item_topic]
        logits = cfg.taste_sharpness * affinity + item_popularity
        p = np.exp(logits - logits.max())
        p /= p.sum()
        n = int(rng.integers(cfg.min_items_per_user, cfg.max_items_per_user + 1))
        chosen = rng.choice(cfg.num_items, size=n, replace=False, p=p)
        for k, i in enumerate(chosen):
            # Liked topics get 4-5 stars, others mostly low: binarisation (> 3) keeps the taste signal.
            rating = int(np.clip(np.round(3.2 + 1.6 * affinity[i] + rng.normal(0, 0.6)), 1, 5))
            text = review_text(topic_names[item_topic[i]], str(item_noun[i]), rating, rng)
            interactions.append((f"u{u:04d}", f"i{i:04d}", rating, t0 + 3600 * (u * 100 + k), text))

    users = []
    for u in range(cfg.num_users):
        liked = [topic_names[t] for t in np.argsort(-user_taste[u])[:2]]
        word = rng.choice(TOPICS[liked[0]])
        users.append((f"u{u:04d}", f"A fan of {liked[0]} and {liked[1]}, always looking for a good {word}."))
    items, titles_seen = [], set()
    for i in range(cfg.num_items):
        topic = topic_names[item_topic[i]]
        words = rng.choice(TOPICS[topic], size=3, replace=False)
        title = item_title(topic, str(item_noun[i]), words[0], titles_seen)
        items.append((f"i{i:04d}", title,
                      f"A {topic} {item_noun[i]} about the {words[0]}, the {words[1]} and the {words[2]}."))
    return interactions, users, items


def item_title(topic: str, noun: str, word: str, seen: set[str]) -> str:
    """A unique title naming the item's topic, e.g. "The Rocket: a space book" ("..., part 2" on a repeat).

    The topic word is in the title so that a model reading only titles can match an item to a
    user's taste; uniqueness lets a generated title name exactly one item.
    """
    base = f"The {word.capitalize()}: a {topic} {noun}"
    title, part = base, 1
    while title in seen:
        part += 1
        title = f"{base}, part {part}"
    seen.add(title)
    return title


def _write_csv(path: str, header: list[str], rows: list[tuple]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def write(out_dir: str, cfg: DemoConfig) -> dict:
    interactions, users, items = generate(cfg)
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, "interactions.csv"), ["user", "item", "rating", "timestamp", "review"],
               interactions)
    _write_csv(os.path.join(out_dir, "users.csv"), ["user", "user_text"], users)
    _write_csv(os.path.join(out_dir, "items.csv"), ["item", "item_title", "item_text"], items)
    return {"interactions": len(interactions), "users": len(users), "items": len(items)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True,
                   help="folder to write interactions.csv, users.csv, items.csv (with item titles) into")
    p.add_argument("--num-users", type=int, default=DemoConfig.num_users)
    p.add_argument("--num-items", type=int, default=DemoConfig.num_items)
    p.add_argument("--seed", type=int, default=DemoConfig.seed)


def run(args) -> int:
    counts = write(args.out, DemoConfig(num_users=args.num_users, num_items=args.num_items, seed=args.seed))
    print(f"demo-data: wrote {counts['interactions']} interactions, {counts['users']} users, "
          f"{counts['items']} items to {args.out} (next: cllm4rec preprocess --format table --input {args.out} ...)")
    return 0
