"""The paper's data protocol: merge duplicates, binarise, iterative k-core, per-user split, id maps.

Two per-user splits (``ProtocolConfig.split``): ``random`` (CLLM4Rec's seeded 80/10/10) and
``leave-one-out`` (A-LLMRec and sequential recommenders: in time order, last = test, second
last = valid, the rest train; plus stored candidates, see ``data/candidates.py``).

A reader whose data already holds a split (the papers' released splits: ``RawDataset.given_split``) skips
binarising, k-core and the split: ``apply_given_split`` uses it as given.

Everything here is a pure function of (RawDataset, ProtocolConfig): the same
inputs and seeds give the same Split, byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from cllm4rec_dist.data.candidates import sample_candidates
from cllm4rec_dist.data.records import InputError, RawDataset

SPLITS = ("random", "leave-one-out")
GIVEN = "as given"
"""``stats.json`` ``split`` of a dataset whose reader supplied the split (``RawDataset.given_split``)."""
GIVEN_PARTS = ("train", "valid", "test")
"""The values of the ``part`` column of such a reader's interactions."""


@dataclass
class ProtocolConfig:
    """Settings of the paper's protocol (section 11 of the spec); defaults are the paper's."""

    binarize: bool = True
    """Keep only interactions with rating > ``min_rating`` (skipped for data without ratings)."""
    min_rating: float = 3.0
    """Binarisation threshold: rating must be strictly greater."""
    kcore: int = 5
    """Every user and item keeps at least this many interactions (iterated until stable); 0 or 1 disables."""
    valid_fraction: float = 0.1
    """Per-user share of items held out for validation (at least one)."""
    test_fraction: float = 0.1
    """Per-user share of items held out for test (at least one)."""
    seed: int = 0
    """Seed of the per-user random split."""
    split: str = "random"
    """Per-user split: ``random`` (seeded shares ``valid_fraction`` / ``test_fraction``) or ``leave-one-out``
    (time order: last item = test, second last = valid, the rest train; users with fewer than 3
    interactions stay train-only and are not evaluated)."""
    num_negatives: int = 19
    """leave-one-out: items the user never interacted with, sampled once per valid/test user next to the positive."""
    candidate_seed: int = 0
    """leave-one-out: seed of the candidate sampling (separate from ``seed``)."""
    max_train_per_user: int = 0
    """Sparse regime: keep at most this many TRAIN interactions per user (0 = all), a uniformly random subset
    seeded by (seed, user); validation and test are untouched, reviews of dropped pairs are dropped too."""
    cold_item_fraction: float = 0.0
    """Cold items: this share of the items (uniformly at random, seeded) is held out of training entirely:
    their interactions stay in validation/test only, their content (item texts) stays in the corpus."""

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"protocol.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.num_negatives < 1:
            raise ValueError("protocol.num_negatives must be >= 1")
        if not 0 < self.valid_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError("protocol.valid_fraction and protocol.test_fraction must be in (0, 1)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("protocol.valid_fraction + protocol.test_fraction must be < 1")
        if self.kcore < 0:
            raise ValueError("protocol.kcore must be >= 0")
        if self.max_train_per_user < 0:
            raise ValueError("protocol.max_train_per_user must be >= 0 (0 keeps every train interaction)")
        if not 0 <= self.cold_item_fraction < 1:
            raise ValueError("protocol.cold_item_fraction must be in [0, 1)")


@dataclass
class Split:
    """The protocol's output: contiguous ids 0..I-1 / 0..J-1 and per-user item lists.

    ``train[u]``, ``valid[u]`` and ``test[u]`` are int64 arrays of item indices in
    chronological order (file order where there are no timestamps). ``reviews`` holds
    only TRAIN pairs, so held-out pairs never reach the content corpus. ``item_titles``
    holds the items that have a title. ``candidates`` (leave-one-out only) maps
    ``"valid"`` / ``"test"`` to one entry per user: the int64 array of the positive plus
    ``num_negatives`` sampled items in a seeded order, or None for a user not evaluated.
    """

    user_ids: list[str]
    item_ids: list[str]
    train: list[np.ndarray]
    valid: list[np.ndarray]
    test: list[np.ndarray]
    reviews: list[tuple[int, int, str]] = field(default_factory=list)
    user_texts: dict[int, str] = field(default_factory=dict)
    item_texts: dict[int, str] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    item_titles: dict[int, str] = field(default_factory=dict)
    candidates: dict[str, list[np.ndarray | None]] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def _natural_order(ids: pd.Series) -> list[str]:
    """Sorted unique ids: numerically when all are integers, else as strings."""
    unique = pd.unique(ids)
    if all(s.lstrip("-").isdigit() for s in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def kcore_filter(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items with fewer than k interactions until none is left; returns (df, iterations)."""
    iterations = 0
    while k > 1 and len(df):
        user_counts = df["user"].map(df["user"].value_counts())
        item_counts = df["item"].map(df["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        iterations += 1
        if keep.all():
            break
        df = df[keep]
    return df, iterations


def holdout_sizes(n: int, cfg: ProtocolConfig) -> tuple[int, int]:
    """(n_valid, n_test) for a user with n items: rounded shares, at least one each, train keeps >= 1."""
    if n < 3:
        return 0, 0
    n_valid = max(1, int(np.floor(n * cfg.valid_fraction + 0.5)))
    n_test = max(1, int(np.floor(n * cfg.test_fraction + 0.5)))
    while n_valid + n_test > n - 1:  # only reachable with large fractions
        if n_valid >= n_test and n_valid > 1:
            n_valid -= 1
        elif n_test > 1:
            n_test -= 1
        else:
            break
    return n_valid, n_test


def heldout_masks(n: int, user: int, cfg: ProtocolConfig) -> tuple[np.ndarray, np.ndarray]:
    """(is_valid, is_test) boolean masks over a user's ``n`` time-ordered items under ``cfg.split``."""
    is_valid = np.zeros(n, bool)
    is_test = np.zeros(n, bool)
    if cfg.split == "leave-one-out":
        if n >= 3:
            is_valid[n - 2] = True
            is_test[n - 1] = True
        return is_valid, is_test
    n_valid, n_test = holdout_sizes(n, cfg)
    perm = np.random.default_rng([cfg.seed, int(user)]).permutation(n)
    is_valid[perm[:n_valid]] = True
    is_test[perm[n_valid:n_valid + n_test]] = True
    return is_valid, is_test


def merge_duplicates(df: pd.DataFrame, stats: dict) -> pd.DataFrame:
    """Duplicate (user, item): the latest by timestamp wins, ties and missing timestamps by file order."""
    df["_order"] = np.arange(len(df))
    df = df.sort_values(["timestamp", "_order"], kind="stable", na_position="first")
    before = len(df)
    df = df.drop_duplicates(["user", "item"], keep="last").sort_values("_order", kind="stable")
    stats["duplicates_merged"] = int(before - len(df))
    return df


def apply_protocol(raw: RawDataset, cfg: ProtocolConfig) -> Split:
    """Run duplicates merge, binarisation, k-core, id mapping and the per-user split."""
    cfg.validate()
    if raw.given_split is not None:
        return apply_given_split(raw, cfg)
    df = raw.interactions.copy()
    stats: dict = {"raw_interactions": int(len(df))}
    df = merge_duplicates(df, stats)
    every_pair = df[["user", "item"]]  # before binarising: a low rating is still an interaction (candidates)

    binarized = cfg.binarize and raw.has_ratings
    if binarized:
        before = len(df)
        df = df[df["rating"] > cfg.min_rating]
        stats["binarize_dropped"] = int(before - len(df))
    stats["binarized"] = bool(binarized)

    before = len(df)
    df, iterations = kcore_filter(df, cfg.kcore)
    stats["kcore_dropped"] = int(before - len(df))
    stats["kcore_iterations"] = iterations
    if len(df) == 0:
        raise InputError(
            f"{raw.name}: no interactions left after the protocol "
            f"({stats['raw_interactions']} read, "
            f"{stats.get('binarize_dropped', 0)} dropped by rating > {cfg.min_rating}, "
            f"{stats['kcore_dropped']} by the {cfg.kcore}-core filter). "
            "Lower --kcore, pass --no-binarize, or check the input."
        )
    return _assemble(raw, cfg, df, every_pair, stats, lambda user, n, _: heldout_masks(n, user, cfg))


def apply_given_split(raw: RawDataset, cfg: ProtocolConfig) -> Split:
    """The split of a reader whose data already holds one (``raw.given_split``; the ``part`` column): used AS GIVEN.

    No binarising, no k-core, no re-split; duplicates are merged as always (the latest wins, so a pair both in
    train and held out stays held out), and the regimes of ``restrict_train`` still apply to the train lists.
    ``cfg.split`` must be the data's kind (``preprocess`` sets it): ``leave-one-out`` data holds at most one
    valid and one test item per user and gets stored candidates; ``random`` data any number (full ranking).
    """
    if cfg.split != raw.given_split:
        raise InputError(f"{raw.name}: the data holds a {raw.given_split} split, used as given; --split {cfg.split} "
                         f"would need a re-split. Leave --split out (or pass --split {raw.given_split}).")
    df = raw.interactions.copy()
    parts = df.get("part")
    if parts is None or not parts.isin(GIVEN_PARTS).all():
        raise ValueError(f"{raw.name}: a given split needs a 'part' column of {', '.join(GIVEN_PARTS)}")
    stats: dict = {"raw_interactions": int(len(df)), "split": GIVEN}
    df = merge_duplicates(df, stats)
    every_pair = df[["user", "item"]]
    stats.update(binarized=False, kcore_dropped=0, kcore_iterations=0)
    if len(df) == 0:
        raise InputError(f"{raw.name}: the given split holds no interactions; check the input.")
    if cfg.split == "leave-one-out":
        per_user = df[df["part"] != "train"].groupby(["user", "part"]).size()
        if len(per_user) and per_user.max() > 1:
            user, part = per_user.idxmax()
            raise InputError(f"{raw.name}: user {user!r} holds {per_user.max()} {part} items; a leave-one-out split "
                             "holds one per user. Fix the input or read it with a format for full held-out sets.")

    def given(user: int, n: int, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return part == "valid", part == "test"

    return _assemble(raw, cfg, df, every_pair, stats, given)


def _assemble(raw: RawDataset, cfg: ProtocolConfig, df: pd.DataFrame, every_pair: pd.DataFrame, stats: dict,
              holdout) -> Split:
    """Ids, per-user lists, the train regimes, reviews, texts, statistics (+ candidates): the protocol's tail.

    ``holdout(user, n, part)`` gives the (is_valid, is_test) masks over a user's ``n`` time-ordered rows (``part``:
    their ``part`` column when the reader gave the split, else None)."""
    user_ids = _natural_order(df["user"])
    catalogue = df["item"] if raw.item_catalogue is None else pd.concat([df["item"], pd.Series(raw.item_catalogue,
                                                                                              dtype=str)])
    item_ids = _natural_order(catalogue)
    uidx = pd.Series(np.arange(len(user_ids)), index=user_ids)
    iidx = pd.Series(np.arange(len(item_ids)), index=item_ids)
    df = df.assign(u=uidx.loc[df["user"]].to_numpy(), i=iidx.loc[df["item"]].to_numpy())
    # Chronological within a user; file order breaks ties and stands in for missing timestamps.
    df = df.sort_values(["u", "timestamp", "_order"], kind="stable", na_position="first")

    train, valid, test = [], [], []
    train_pairs: set[tuple[int, int]] = set()
    users_train_only = 0
    all_items = df["i"].to_numpy(dtype=np.int64)
    all_parts = df["part"].to_numpy() if "part" in df else None
    bounds = np.searchsorted(df["u"].to_numpy(), np.arange(len(user_ids) + 1))
    for u in range(len(user_ids)):
        rows = slice(int(bounds[u]), int(bounds[u + 1]))
        items = all_items[rows]
        is_valid, is_test = holdout(u, len(items), None if all_parts is None else all_parts[rows])
        if not (is_valid.any() or is_test.any()):
            users_train_only += 1
        is_train = ~(is_valid | is_test)
        train.append(items[is_train])
        valid.append(items[is_valid])
        test.append(items[is_test])

    cold_items = choose_cold_items(len(item_ids), cfg)
    train, restricted = restrict_train(train, cold_items, len(item_ids), cfg)
    stats.update(restricted)
    for u, items in enumerate(train):
        train_pairs.update((u, int(i)) for i in items)

    reviews = []
    heldout_reviews = 0
    for u, i, text in zip(df["u"].to_numpy(), df["i"].to_numpy(), df["review"].to_numpy()):
        if not text:
            continue
        if (int(u), int(i)) in train_pairs:
            reviews.append((int(u), int(i), text))
        else:
            heldout_reviews += 1

    user_texts = {int(uidx[k]): v for k, v in raw.user_texts.items() if k in uidx.index and v}
    item_texts = {int(iidx[k]): v for k, v in raw.item_texts.items() if k in iidx.index and v}
    item_titles = {int(iidx[k]): v for k, v in raw.item_titles.items() if k in iidx.index and v}

    n_train = int(sum(len(x) for x in train))
    n_valid = int(sum(len(x) for x in valid))
    n_test = int(sum(len(x) for x in test))
    stats.update(
        num_users=len(user_ids),
        num_items=len(item_ids),
        num_interactions=n_train + n_valid + n_test,
        num_train=n_train,
        num_valid=n_valid,
        num_test=n_test,
        density=(n_train + n_valid + n_test) / (len(user_ids) * len(item_ids)),
        users_train_only=users_train_only,
        train_reviews=len(reviews),
        heldout_reviews_dropped=heldout_reviews,
        user_texts=len(user_texts),
        item_texts=len(item_texts),
        item_titles=len(item_titles),
        cold_items=[int(i) for i in cold_items],
        protocol=asdict(cfg),
    )
    split = Split(user_ids, item_ids, train, valid, test, reviews, user_texts, item_texts, stats, item_titles)
    if cfg.split == "leave-one-out":
        known = every_pair[every_pair["user"].isin(uidx.index) & every_pair["item"].isin(iidx.index)]
        interacted = _items_per_user(uidx.loc[known["user"]].to_numpy(), iidx.loc[known["item"]].to_numpy(),
                                     len(user_ids))
        split.candidates = sample_candidates(split, interacted, cfg.num_negatives, cfg.candidate_seed, raw.name)
        stats["users_evaluated"] = len(user_ids) - users_train_only
    return split


def _items_per_user(users: np.ndarray, items: np.ndarray, num_users: int) -> list[np.ndarray]:
    """Sorted unique item indices of each user from parallel (user, item) arrays."""
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    bounds = np.searchsorted(users, np.arange(num_users + 1))
    return [np.unique(items[bounds[u]:bounds[u + 1]]) for u in range(num_users)]


def choose_cold_items(num_items: int, cfg: ProtocolConfig) -> np.ndarray:
    """Sorted item indices held out of training (``cold_item_fraction`` of the catalogue, seeded)."""
    count = int(np.floor(num_items * cfg.cold_item_fraction + 0.5))
    rng = np.random.default_rng([cfg.seed, 0xC01D])
    return np.sort(rng.permutation(num_items)[:count]).astype(np.int64)


def restrict_train(train: list[np.ndarray], cold_items: np.ndarray, num_items: int,
                   cfg: ProtocolConfig) -> tuple[list[np.ndarray], dict]:
    """The regimes where text can matter, applied to the TRAIN lists only (valid/test untouched):
    drop every cold item, then keep at most ``max_train_per_user`` items per user (a random subset seeded by
    (seed, user), kept in their chronological order). Returns (train, statistics)."""
    cold = np.zeros(num_items, bool)
    cold[cold_items] = True
    out, cold_dropped, cap_dropped = [], 0, 0
    for u, items in enumerate(train):
        warm = items[~cold[items]] if len(items) else items
        cold_dropped += len(items) - len(warm)
        if cfg.max_train_per_user and len(warm) > cfg.max_train_per_user:
            keep = np.random.default_rng([cfg.seed, u, 0x5BA7]).permutation(len(warm))[:cfg.max_train_per_user]
            cap_dropped += len(warm) - len(keep)
            warm = warm[np.sort(keep)]
        out.append(warm)
    return out, {"cold_train_dropped": cold_dropped, "max_train_per_user_dropped": cap_dropped,
                 "users_without_train": sum(len(t) == 0 for t in out)}
