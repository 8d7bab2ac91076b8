"""The recommenders: one folder per model, found by name through this registry.

Each folder ``recommenders/<name>/`` holds everything one model is: its settings (one class, a section of the
training config, validating itself), model, prompts, recipe (setup -> train -> save: what every entry point runs),
trainer, evaluation and export hooks. Its ``__init__.py`` describes it as a ``Recommender``; ``REGISTRY`` below maps
the name a config gives (``recommender: NAME``) to that folder. The CLI, both launchers, the Ray workers,
``evaluate``, ``export``, ``report`` and ``tune`` look a model up here and never compare its name; the shared
machinery (data, corpus, model/, train/, eval/, export/) knows no model.

Adding a model: a folder with ``__init__.py`` defining ``RECOMMENDER`` and a line in ``REGISTRY``
(docs/ARCHITECTURE.md walks through one).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

REGISTRY: dict[str, str] = {
    "cllm4rec": "cllm4rec_dist.recommenders.cllm4rec",
    "allmrec": "cllm4rec_dist.recommenders.allmrec",
}
"""Recommender name -> its package (imported on first use: each pulls in only its own model)."""

PROTOCOLS = ("full_ranking", "candidates")
"""How a recommender is scored: every held-out item against the whole catalogue (Recall/NDCG@K), or the positive
among the dataset's stored candidates (Hit/NDCG@K, leave-one-out). `cllm4rec report` has one module per protocol."""


@dataclass(frozen=True)
class Variant:
    """One named way to run a recommender: a display name and the top-level config settings that make it."""

    title: str
    settings: dict
    default: bool = True
    """Run by `cllm4rec report` when --models does not name models (False: only when named, e.g. the ablations
    that train the backbone itself)."""
    rows: dict[str, str] | None = None
    """The rows of a run that are this variant's own, renamed for a report (run row -> report row); the run's other
    rows (the same baselines as the main variant's runs) are left out. None: every row under its own name."""


@dataclass(frozen=True)
class Recommender:
    """What the shared commands need to know of one model; the parts that import heavy code are module names,
    imported when used (``load``)."""

    name: str
    """The config's ``recommender`` value."""
    title: str
    """Display name (reports, console lines)."""
    section: str
    """The training-config section holding its settings (e.g. ``model``, ``allmrec``)."""
    settings: type
    """That section's dataclass: ``validate(cfg)`` checks it against the whole config."""
    recipe: str
    """``module:Class`` of its recipe: ``Class(cfg, rank, engine_factory, sink, timer)`` with ``setup()``,
    ``train()``, ``save_checkpoint()``."""
    checks: str
    """``module:function`` checking a dataset against the settings: ``function(cfg, data)`` (``data``: cfg.data
    opened, a ``ShardedDataset``) raises a one-line error. The Ray launcher's driver runs it before any worker starts,
    so its module imports none of the model's code."""
    protocol: str
    """One of PROTOCOLS: how its test metrics are computed (and which report module reports it)."""
    row_sharding: bool = False
    """Whether its tables may be row-sharded across ranks (``model.table_sharding: row``)."""
    evaluate: str | None = None
    """``module:function`` that `cllm4rec evaluate` calls to re-score a checkpoint; None = scored during training
    only (its metrics.json)."""
    variants: dict[str, Variant] = field(default_factory=dict)
    """The named variants `cllm4rec report` and `cllm4rec tune` can run (the full model and its ablations), by
    the name a user passes to ``--models`` / a tune spec's ``model``; empty = the model itself under its name."""

    def named_variants(self) -> dict[str, Variant]:
        return self.variants or {self.name: Variant(self.title, {})}

    def load(self, target: str):
        """The object a ``module:name`` field names, imported now."""
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)

    def load_module(self, part: str) -> ModuleType:
        """A module of this recommender's folder (e.g. ``export``: its export hooks)."""
        return importlib.import_module(f"{REGISTRY[self.name]}.{part}")

    def recipe_class(self):
        return self.load(self.recipe)

    def check_data(self, cfg, data) -> None:
        """Its checks of ``data`` (cfg.data, opened) against ``cfg`` (``checks``)."""
        self.load(self.checks)(cfg, data)

    def settings_of(self, cfg):
        """Its settings section of a training config."""
        return getattr(cfg, self.section)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def recommender(name: str) -> Recommender:
    """The registered recommender called ``name``; a ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"recommender={name!r}; known: {', '.join(REGISTRY)}")
    found = importlib.import_module(REGISTRY[name]).RECOMMENDER
    if found.name != name:
        raise AssertionError(f"{REGISTRY[name]} registers {found.name!r} under {name!r}")
    return found


def all_recommenders() -> list[Recommender]:
    return [recommender(name) for name in REGISTRY]


def variant_owner(variant: str) -> Recommender | None:
    """The recommender that has a variant of this name (report / tune model names), or None."""
    return next((rec for rec in all_recommenders() if variant in rec.named_variants()), None)
