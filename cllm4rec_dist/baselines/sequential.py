"""A-LLMRec's stage 0: train a sequential CF model (SASRec, GRU4Rec) with early stopping on validation.

Recipe (torchtune-style): ``CFStage(data, settings).setup()`` builds the model and optimizer,
``train()`` runs epochs of next-item BCE (one sampled negative per position) and evaluates on the
stored validation candidates every ``eval_every`` epochs, keeping the best model by
``select_metric`` and stopping after ``patience`` evaluations without improvement; the best model
is then scored once on the test candidates and ``save_checkpoint(out)`` writes it.

Checkpoint (``save_cf_model`` / ``load_cf_model``): a standalone-model folder of train/checkpoint.py
(``write_model`` / ``read_model``: each file atomic, the files record last, read only when complete):

    OUT/cf_model.safetensors   the model's tensors (loading runs no code)
    OUT/cf_model.json          {"config": {"model", "num_items", "settings"}, "stage": CFStageSettings,
                                "best_epoch", "valid", "test", "history", "dataset": {...}}
    OUT/files-rank0.json       sizes and sha256 of both

Reading never trusts the JSON: before any tensor of the model is allocated, ``check_cf_info`` checks every field
of ``cf_model.json`` (types, ranges, sane bounds on the sizes) and that the model it describes, built on the
``meta`` device (no memory), has exactly the tensor shapes recorded in the safetensors header (read without its
data; the header's offsets must cover the file's bytes exactly, so the sizes are backed by the file). A bad field
is one line naming the file and the field.

Training is a single process: the CF models are small (ML-100K: ~60k parameters at dim 50) and an
epoch over 1k users takes about a second on one core.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cllm4rec_dist.atomic import url_to_fs
from cllm4rec_dist.corpus.sequences import SequentialData
from cllm4rec_dist.eval.candidates import CandidateEvalSettings, evaluate_part, metric_names
from cllm4rec_dist.model.cf import CF_MODELS, SequentialCF, build_cf_model, pad_histories
from cllm4rec_dist.model.cf.gru4rec import GRU4RecSettings
from cllm4rec_dist.model.cf.loss import draw_training_negatives, next_item_bce
from cllm4rec_dist.model.cf.sasrec import SASRecSettings
from cllm4rec_dist.train.checkpoint import (
    INFO_SUFFIX,
    METADATA,
    MODEL_CONFIG,
    WEIGHTS_SUFFIX,
    CheckpointError,
    check_tensors,
    incomplete_reason,
    read_model,
    safetensors_header,
    write_model,
)
from cllm4rec_dist.train.monitor import duration

CF_CHECKPOINT = "cf_model"  # the file stem of the stage-0 model in its folder
PARTS = ("valid", "test")
# Sane bounds on what a cf_model.json may describe (far above any CF model of the papers: d = 50, n <= 200, 2 blocks).
MAX_NUM_ITEMS = (1 << 31) - 1
SETTING_BOUNDS = {"dim": 1 << 14, "max_len": 1 << 16}
"""Largest value of these integer settings; every other integer setting (blocks, heads, layers) at most
``MAX_SMALL_SETTING``."""
MAX_SMALL_SETTING = 256


@dataclass
class CFStageSettings:
    """Stage 0 (the CF model): which model, its hyperparameters, and the training schedule."""

    model: str = "sasrec"
    """The CF model: a name registered in ``model/cf`` (``sasrec``, ``gru4rec``)."""
    sasrec: SASRecSettings = field(default_factory=SASRecSettings)
    """SASRec's hyperparameters (used when model = sasrec)."""
    gru4rec: GRU4RecSettings = field(default_factory=GRU4RecSettings)
    """GRU4Rec's hyperparameters (used when model = gru4rec)."""
    lr: float = 1e-3
    """Adam learning rate (SASRec paper: 0.001)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas (SASRec paper: 0.9, 0.98)."""
    weight_decay: float = 0.0
    """Adam L2 penalty on every parameter (SASRec paper: none; dropout regularises)."""
    batch_size: int = 128
    """Users per step (SASRec paper: 128)."""
    max_epochs: int = 200
    """Upper bound on training epochs; early stopping usually ends training first."""
    eval_every: int = 1
    """Evaluate on the validation candidates every this many epochs."""
    patience: int = 20
    """Stop after this many validation evaluations without a better ``select_metric``. Generous on purpose: on
    MovieLens both models first learn popularity and sit on that plateau for 10-25 epochs before the sequence
    signal takes over (with 5, GRU4Rec stopped there, at most-popular's level)."""
    select_metric: str = "ndcg@10"
    """Validation metric that picks the best epoch (hit@K or ndcg@K of ``candidates``; higher is better)."""
    candidates: CandidateEvalSettings = field(default_factory=CandidateEvalSettings)
    """Cut-offs and warm/cold slice thresholds of the candidate metrics."""
    seed: int = 0
    """Seed of the initialisation, the epoch order, the negatives and dropout."""
    num_threads: int = 1
    """torch CPU threads (1 is robust on a shared machine; 0 = torch's default)."""
    eval_batch_users: int = 1024
    """Users scored at once during evaluation."""

    def model_settings(self):
        return getattr(self, self.model)

    def validate(self) -> CFStageSettings:
        if self.model not in CF_MODELS or not hasattr(self, self.model):
            raise ValueError(f"cf.model must be one of {', '.join(sorted(CF_MODELS))}, got {self.model!r}")
        self.model_settings().validate()
        self.candidates.validate()
        if self.select_metric not in metric_names(self.candidates):
            raise ValueError(f"cf.select_metric {self.select_metric!r} is not computed; "
                             f"choose from {', '.join(metric_names(self.candidates))}")
        for name in ("batch_size", "max_epochs", "eval_every", "patience", "eval_batch_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"cf.{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("cf.lr must be > 0")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> CFStageSettings:
        """Inverse of ``asdict`` (nested sections become their dataclasses again)."""
        values = dict(values)
        for name, section in (("sasrec", SASRecSettings), ("gru4rec", GRU4RecSettings),
                              ("candidates", CandidateEvalSettings)):
            if isinstance(values.get(name), dict):
                values[name] = section(**{k: tuple(v) if isinstance(v, list) else v for k, v in values[name].items()})
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def evaluate_candidates(model: SequentialCF, data: SequentialData, part: str, settings: CFStageSettings) -> dict:
    """Candidate metrics of ``model`` on ``part`` (valid: history -> valid item; test: + valid item -> test item).

    The model reads its own ``max_len``; ``settings`` gives the metric settings and the scoring batch size.
    """
    max_len = model.settings.max_len

    def score(users, prefixes, candidates):
        rows = []
        for start in range(0, len(users), settings.eval_batch_users):
            stop = start + settings.eval_batch_users
            rows.append(model.score(pad_histories(prefixes[start:stop], max_len),
                                    torch.as_tensor(candidates[start:stop])))
        return torch.cat(rows).numpy() if rows else np.zeros(candidates.shape)

    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = evaluate_part(score, data, part, settings.candidates)
    model.train(was_training)
    return metrics


def training_examples(histories: list[list[int]], max_len: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(users, inputs, targets): for each user with >= 2 history items, the last ``max_len`` steps
    of "items so far -> next item", left-padded ``[N, max_len]``."""
    users = np.asarray([u for u, h in enumerate(histories) if len(h) >= 2], dtype=np.int64)
    inputs = pad_histories([histories[u][:-1] for u in users], max_len)
    targets = pad_histories([histories[u][1:] for u in users], max_len)
    return users, inputs, targets


def print_progress(line: str) -> None:
    print(line, flush=True)


class CFStage:
    """The stage-0 recipe: ``setup()``, ``train()``, ``save_checkpoint(out)``."""

    def __init__(self, data: SequentialData, settings: CFStageSettings | None = None,
                 log: Callable[[str, float, int], None] | None = None,
                 progress: Callable[[str], None] | None = print_progress):
        self.data = data
        self.settings = (settings or CFStageSettings()).validate()
        self.log = log or (lambda tag, value, step: None)
        """Called as log(tag, value, epoch) for each loss / metric, e.g. a TensorBoard writer's add_scalar."""
        self.progress = progress
        """Called with one console line per epoch (loss, validation, time, ETA); None = silent."""

    def setup(self) -> CFStage:
        s = self.settings
        if s.num_threads > 0:
            torch.set_num_threads(s.num_threads)
        torch.manual_seed(s.seed)
        self.model = CF_MODELS[s.model](self.data.num_items, s.model_settings())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        self.users, self.inputs, self.targets = training_examples(self.data.histories, s.model_settings().max_len)
        if len(self.users) == 0:
            raise ValueError("stage 0: no user has 2 or more training items; nothing to train on")
        full = [u for u in self.users if len(set(self.data.histories[u])) >= self.data.num_items]
        if full:
            raise ValueError(f"stage 0: user {full[0]} interacted with every item; no negative can be drawn")
        self.generator = torch.Generator().manual_seed(s.seed)
        self.history: list[dict] = []
        self.best_epoch, self.best_value, self.best_state, self.valid = 0, -np.inf, None, None
        return self

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training users in a seeded order; returns the mean loss."""
        s = self.settings
        self.model.train()
        order = torch.randperm(len(self.users), generator=torch.Generator().manual_seed(s.seed * 100_003 + epoch))
        total, steps = 0.0, 0
        for start in range(0, len(order), s.batch_size):
            rows = order[start:start + s.batch_size]
            inputs, targets = self.inputs[rows], self.targets[rows]
            negatives = draw_training_negatives([self.data.histories[self.users[r]] for r in rows.tolist()],
                                                targets, self.data.num_items, self.generator)
            loss = next_item_bce(self.model, inputs, targets, negatives)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, steps = total + loss.item(), steps + 1
        return total / steps

    def train(self) -> dict:
        """Train with early stopping; returns ``{"best_epoch", "valid", "test", "history", "seconds"}``."""
        s = self.settings
        started = time.perf_counter()
        bad_evaluations = 0
        for epoch in range(1, s.max_epochs + 1):
            loss = self.train_epoch(epoch)
            self.log("cf/loss", loss, epoch)
            record = {"epoch": epoch, "loss": loss}
            if epoch % s.eval_every == 0 or epoch == s.max_epochs:
                valid = evaluate_candidates(self.model, self.data, "valid", s)
                record["valid"] = {k: v for k, v in valid.items() if k != "slices"}
                for name in metric_names(s.candidates):
                    self.log(f"cf/valid/{name}", valid[name], epoch)
                value = valid[s.select_metric]
                if value is not None and value > self.best_value:
                    self.best_epoch, self.best_value, self.valid = epoch, value, valid
                    self.best_state = copy.deepcopy(self.model.state_dict())
                    bad_evaluations = 0
                else:
                    bad_evaluations += 1
            self.history.append(record)
            self._epoch_line(epoch, record, bad_evaluations, time.perf_counter() - started)
            if bad_evaluations >= s.patience:
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.test = evaluate_candidates(self.model, self.data, "test", s)
        self.seconds = round(time.perf_counter() - started, 2)
        return {"best_epoch": self.best_epoch, "valid": self.valid, "test": self.test,
                "history": self.history, "seconds": self.seconds}

    def _epoch_line(self, epoch: int, record: dict, bad_evaluations: int, elapsed: float) -> None:
        """The epoch's console line. The ETA is that of the remaining epochs up to max_epochs at the mean epoch
        time so far: an upper bound, early stopping (patience) usually ends training sooner."""
        if self.progress is None:
            return
        s = self.settings
        line = f"[{s.model}] epoch {epoch}/{s.max_epochs} loss {record['loss']:.4f}"
        if "valid" in record:
            value = record["valid"].get(s.select_metric)
            line += (f" | valid {s.select_metric} {value:.4f}" if value is not None else "") + (
                f" (best {self.best_value:.4f} at epoch {self.best_epoch}, {bad_evaluations}/{s.patience} "
                "without a better one)")
        per_epoch = elapsed / epoch
        line += (f" | {duration(per_epoch)}/epoch, {duration(elapsed)} elapsed, "
                 f"ETA <= {duration(per_epoch * (s.max_epochs - epoch))} (early stopping usually ends sooner)")
        self.progress(line)

    def save_checkpoint(self, out: str) -> None:
        """The best model and what it was trained on (see the module docstring)."""
        manifest = self.data.manifest
        info = {"stage": asdict(self.settings), "best_epoch": self.best_epoch, "valid": self.valid,
                "test": self.test, "history": self.history, "seconds": self.seconds,
                "dataset": {"name": manifest.get("name"), "content_hash": manifest.get("content_hash")}}
        save_cf_model(self.model, out, info)


def save_cf_model(model: SequentialCF, out: str, info: dict | None = None) -> None:
    """The model's tensors and ``{MODEL_CONFIG: model.config(), **info}`` into ``out`` (see the module docstring)."""
    write_model(out, CF_CHECKPOINT, model.state_dict(), {MODEL_CONFIG: model.config(), **(info or {})})


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def safetensors_shapes(fs, path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors file's JSON header, without reading (or allocating) its tensors.

    The header is checked by train/checkpoint.py ``safetensors_header`` (size, JSON, dtypes, shapes, each tensor's
    data offsets inside the file and matching its shape); here its tensors must also tile the data exactly, so
    every shape is backed by bytes that exist and nothing else hides in the file."""
    header = safetensors_header(path, fs=fs, fix="Save the model again.")
    ranges = sorted(tuple(entry["data_offsets"]) for name, entry in header.items() if name != METADATA)
    position = 0
    for start, end in ranges:
        if start != position:
            raise CheckpointError(f"{path}: its tensors' byte ranges overlap or leave gaps; not a safetensors file "
                                  "written by this project. Save the model again.")
        position = end
    data_bytes = fs.size(path) - 8 - int.from_bytes(fs.cat_file(path, start=0, end=8), "little")
    if position != data_bytes:
        raise CheckpointError(f"{path}: its tensors take {position} bytes, the file holds {data_bytes} after the "
                              "header; not a safetensors file written by this project. Save the model again.")
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != METADATA}


def _check_settings(bad, model: str, settings) -> None:
    """Every field of ``config.settings``: known to the model's Settings, of its type, within sane bounds."""
    if not isinstance(settings, dict):
        raise bad("config.settings", f"is {settings!r}, not an object")
    fields = {f.name: f for f in dataclasses.fields(CF_MODELS[model].Settings)}
    for key, value in settings.items():
        where = f"config.settings.{key}"
        if key not in fields:
            raise bad(where, f"is not a setting of {model} (its settings: {', '.join(fields)})")
        default = fields[key].default
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            bound = SETTING_BOUNDS.get(key, MAX_SMALL_SETTING)
            ok, kind = _whole(value) and 1 <= value <= bound, f"a whole number in [1, {bound}]"
        elif isinstance(default, float):
            ok, kind = _number(value), "a finite number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:
            ok, kind = True, ""
        if not ok:
            raise bad(where, f"is {value!r}, not {kind}")
    try:
        CF_MODELS[model].Settings(**settings).validate()
    except ValueError as err:
        raise bad("config.settings", str(err)) from None


def check_cf_info(info_path: str, info: dict, shapes: dict[str, tuple[int, ...]], weights_path: str) -> dict:
    """The ``MODEL_CONFIG`` of a ``cf_model.json`` (``info``) after checking every field, and that the model it
    describes has exactly the tensor ``shapes`` of ``weights_path`` (from its header); nothing is allocated."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{info_path}: {key} {what}; the file was edited or is damaged. Save the model again "
                               "(`cllm4rec baselines --model sasrec --data DATA --model-out DIR`).")

    config = info.get(MODEL_CONFIG)
    if not isinstance(config, dict):
        raise bad(MODEL_CONFIG, f"is {config!r}, not an object with model, num_items and settings")
    extra = sorted(set(config) - {"model", "num_items", "settings"})
    if extra:
        raise bad(f"{MODEL_CONFIG}.{extra[0]}", "is not a field of a CF model's config (model, num_items, settings)")
    model = config.get("model")
    if not isinstance(model, str) or model not in CF_MODELS:
        raise bad(f"{MODEL_CONFIG}.model", f"is {model!r}, not one of {', '.join(sorted(CF_MODELS))}")
    num_items = config.get("num_items")
    if not (_whole(num_items) and 1 <= num_items <= MAX_NUM_ITEMS):
        raise bad(f"{MODEL_CONFIG}.num_items", f"is {num_items!r}, not a whole number in [1, {MAX_NUM_ITEMS}]")
    _check_settings(bad, model, config.get("settings", {}))
    checks = {"best_epoch": (lambda v: v is None or (_whole(v) and v >= 0), "a whole number >= 0 or null"),
              "seconds": (lambda v: v is None or (_number(v) and v >= 0), "a number >= 0 or null"),
              "valid": (lambda v: v is None or isinstance(v, dict), "an object of metrics or null"),
              "test": (lambda v: v is None or isinstance(v, dict), "an object of metrics or null"),
              "history": (lambda v: isinstance(v, list), "a list"),
              "stage": (lambda v: isinstance(v, dict), "an object (the stage-0 settings)"),
              "dataset": (lambda v: isinstance(v, dict) and all(isinstance(v.get(k), (str, type(None)))
                                                                for k in ("name", "content_hash")),
                          "an object with the name and content_hash (strings) of the dataset")}
    for key, (ok, kind) in checks.items():
        if key in info and not ok(info[key]):
            raise bad(key, f"is {info[key]!r}, not {kind}")
    with torch.device("meta"):  # the shapes the config implies, at no memory cost
        expected = {k: tuple(v.shape) for k, v in build_cf_model(config).state_dict().items()}
    check_tensors(f"{weights_path} (shapes) with the config of {info_path}",
                  {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, expected)
    return config


def _check_before_loading(path: str) -> None:
    """``check_cf_info`` on a complete folder, before its tensors are read; anything else is left to
    ``read_model``, which names what is missing or incomplete."""
    fs, root = url_to_fs(path)
    weights = posixpath.join(root, CF_CHECKPOINT + WEIGHTS_SUFFIX)
    info_path = posixpath.join(root, CF_CHECKPOINT + INFO_SUFFIX)
    if not (fs.exists(weights) and fs.exists(info_path)) or incomplete_reason(root, fs=fs) is not None:
        return
    try:
        info = json.loads(fs.cat_file(info_path))
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(info, dict) and MODEL_CONFIG in info:
        check_cf_info(info_path, info, safetensors_shapes(fs, weights), weights)


def load_cf_model(path: str) -> tuple[SequentialCF, dict]:
    """(model in eval mode, the JSON info) from a complete folder written by ``save_cf_model``; no code runs, and
    every field of the JSON is checked against the weights' header before the model is built (``check_cf_info``)."""
    _check_before_loading(path)
    try:
        tensors, info = read_model(path, CF_CHECKPOINT)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (A stage-0 model is saved by `cllm4rec baselines --model sasrec --data DATA "
                              "--model-out DIR`.)") from None
    try:
        model = build_cf_model(info[MODEL_CONFIG])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its {MODEL_CONFIG!r} does not describe a CF model ({err!r}).") from None
    check_tensors(f"{path} [{CF_CHECKPOINT}]", tensors, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict(tensors, strict=True)
    return model.eval(), info


def history_tensor(histories: list[list[int]], model: SequentialCF) -> torch.Tensor:
    """Histories as the model's input (its own ``max_len``), e.g. to compute user representations."""
    return pad_histories(histories, model.settings.max_len)


__all__ = ["CFStage", "CFStageSettings", "check_cf_info", "evaluate_candidates", "history_tensor", "load_cf_model",
           "safetensors_shapes", "save_cf_model", "training_examples"]
