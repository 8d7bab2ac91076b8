"""Running one model of a report, whichever the protocol: a seed's config, a recommender variant's config, an
emptied run folder and the settings key that decides whether a finished run can be reused (``--reuse``)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil

from cllm4rec_dist.settings import _set
from cllm4rec_dist.train.run_folder import DS_CONFIG_FILE, absolute_paths


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def seeded(cfg, seed: int):
    """``cfg`` trained with ``seed``: the table init and the data order/reordering/masking both follow it."""
    out = copy.deepcopy(cfg)
    out.seed = out.batch.seed = seed
    return out


def with_variant(cfg, name: str, settings: dict):
    """``cfg`` with a recommender variant's settings (``Variant.settings``: config values by dotted name) applied,
    each checked as a config file's value would be."""
    out = copy.deepcopy(cfg)
    for key, value in settings.items():
        _set(out, key, value, f"variant {name}")
    return out


def setting(cfg, key: str):
    """The value of a dotted config name (``ablation``, ``model.lambda_c``)."""
    return functools.reduce(getattr, key.split("."), cfg)


def fresh_dir(path: str) -> str:
    """The model's run folder, emptied: a stale checkpoint there would otherwise be resumed."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def settings_key(cfg, unused=(), tuned: dict | None = None) -> str:
    """What a finished run must have been run with to be reused: the whole config but the output folder and the
    ``unused`` (section, field) settings the model does not read (+ a baseline's tuned settings)."""
    cfg = copy.deepcopy(cfg)
    absolute_paths(cfg)  # a run folder's config.yaml holds them absolute (train/run_folder.py)
    values = dataclasses.asdict(cfg)
    values.pop("out")
    # The DeepSpeed config by what it says, not where it is: the same zero2.json of another checkout of the project
    # (a run folder holds the absolute path) is the same setting.
    values["dist"]["ds_config"] = _file_settings(values["dist"]["ds_config"])
    for section, key in unused:
        values[section].pop(key)
    if tuned:
        values["tuned_baseline_settings"] = tuned
    return json.dumps(values, sort_keys=True)


def saved_config(run_dir: str, like):
    """``run_dir``'s config.yaml (None when it has none), with the output folder and the resume flag of ``like``:
    how a report runs a run, not what the run trained with; its settings key then compares with ``like``'s."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    from cllm4rec_dist.config import load_config

    saved = load_config(path)
    saved.out, saved.resume = like.out, like.resume
    kept = os.path.join(run_dir, DS_CONFIG_FILE)
    if not os.path.exists(saved.dist.ds_config) and os.path.exists(kept):  # the checkout that ran it is gone
        saved.dist.ds_config = kept
    return saved


def _file_settings(path: str):
    """A JSON settings file's contents (the path itself where it cannot be read as JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return path
