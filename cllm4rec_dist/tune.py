"""`cllm4rec tune`: hyperparameter search on validation with Ray Tune, the same budget for every model compared.

What is searched is declared in a spec YAML (``--spec``), validated before Ray starts:

```yaml
model: cllm4rec            # cllm4rec, cf, fixord, prerec, scratch, ftall (CLLM4Rec variants) or ease, multivae
seed: 0                    # seeds the sampling of the trials
budget: {trials: 8, max_epochs: 10, grace_epochs: 2, reduction_factor: 2, concurrent: 2}
space:                     # dotted settings of the training config (baselines: of their settings)
  optim.finetune_lr: {loguniform: [1.0e-4, 1.0e-2]}
  model.lambda_c: {choice: [0.1, 1.0, 10.0]}
  batch.mask_ratio: {uniform: [0.1, 0.4]}
  schedule.pretrain_epochs: {randint: [1, 3]}       # integers 1..3, both ends included
```

The base training config is the usual ``--config FILE`` / ``--section.field VALUE`` (data, backbone, schedule,
...); every trial is that config with the trial's sampled values, trained by the single-process reference path
(`reference.py`, one torch thread, one Ray CPU per trial). After each finetuning epoch the trial reports
validation Recall@20 / Recall@40 / NDCG@100 to Tune (``Trainer.on_validation``); ASHA (time unit: those
epochs) stops the trials that trail at each rung. Trials never evaluate test (``score_test=False``).

The budget, equal across compared models: ``trials`` sampled configurations, each trained for at most
``max_epochs`` validated epochs (the CLLM4Rec variants' finetuning epochs: ``schedule.finetune_epochs`` is set
to it unless the space searches it, and then only up to it; Multi-VAE's training epochs). EASE has no epochs: a
trial is one closed-form fit at one sampled λ, so it gets the same number of trials and at most the same
epochs. Warm-up and pretraining epochs are not budget units (they precede the first validation); their cost is
in each trial's and the search's wall time, which `tune.json` records beside the epochs actually run.

Outputs in ``--out DIR``: ``best.yaml`` (CLLM4Rec variants: a complete training config that `cllm4rec train
--config` and `python launchers/pretrain_llama.py --config` take as is; baselines: ``baseline`` + ``settings``,
which `cllm4rec report --model-config NAME=best.yaml` takes), ``tune.json`` (spec, budget, every trial: its
values, validation curve, epochs run, whether ASHA stopped it, seconds), ``curves.png`` (validation Recall@20
per epoch of every trial), ``trials/<trial id>`` (each trial's run folder: its checkpoints, its best weights for
`cllm4rec evaluate`) and Ray's own experiment folders ``ray/search`` (and ``ray/search-2``, ... for the runs that
resumed it).

An interrupted search (killed, or Ctrl-C / SIGUSR1) is resumed by the same command, from files of our own:
``search.json`` (what it started with: another spec, dataset content or training trajectory is refused),
``trials.json`` (the trials planned when the search started, their ids and sampled values, each one's results so
far, whether it finished and its error), ``asha.json`` (the scheduler's rungs and stop decisions) and
``clock.json`` (`tune_scheduler.py`). The finished trials are kept; the others run again, each resuming from its
own checkpoint folder.

Trust (issue 32): nothing in the output folder is unpickled or otherwise executed, however it was changed between
the runs. Of the two ways to that, rebuilding the search from files of our own or verifying Ray's pickles before a
restore, this is the first: no key to keep, nothing of Ray's to trust. Ray Tune's own experiment state is made of
pickles (``tuner.pkl``, the searcher's state, the trials' states inside ``experiment_state-*.json``, ``params.pkl``,
``error.pkl``) and ``Tuner.restore`` would unpickle them, so a search is never restored: each run of it is a new
Tune experiment in a folder that the run creates (it may not exist before), rebuilt from the JSON files above
(``PlannedTrials`` gives Tune the planned trials, ids and values as they were; ``TrialRecorder`` records their
results), and no earlier experiment folder is read. Within a run, Tune's error pickles are not read back either
(``TrialRecorder`` keeps the error text); the one pickle Tune may read is the experiment state of a run interrupted
before its first trial started, which that same run has just written into its own new folder. The trials'
checkpoints are read by the training path's loaders, which refuse pickled code (`train/checkpoint.py`, issue 13).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

from cllm4rec_dist import COMMAND
from cllm4rec_dist.atomic import write_json_atomic, write_text_atomic
from cllm4rec_dist.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    read_yaml_settings,
    to_yaml,
)
from cllm4rec_dist.corpus.shards import ShardedDataset
from cllm4rec_dist.recommenders import all_recommenders, recommender
from cllm4rec_dist.settings import _set, _walk
from cllm4rec_dist.train.run_folder import RunLock, config_changes, flatten_settings

VARIANTS = {name: variant for rec in all_recommenders() if rec.protocol == "full_ranking"
            for name, variant in rec.named_variants().items()}
VARIANT_OWNER = {name: rec.name for rec in all_recommenders() if rec.protocol == "full_ranking"
                 for name in rec.named_variants()}
"""The searchable recommender variants (name -> its settings): those scored by full ranking, whose validation
Recall@20 is the objective."""
BASELINE_MODELS = ("ease", "multivae")
MODELS = (*VARIANTS, *BASELINE_MODELS)
OBJECTIVE = "valid_recall@20"
SEARCH_NAME = "search"       # Ray Tune's experiment: OUT/ray/search
SEARCH_FILE = "search.json"  # the spec and base config the search in OUT started with (a re-run resumes it)
ASHA_FILE = "asha.json"      # ASHA's rungs and stop decisions (tune_scheduler.py)
CLOCK_FILE = "clock.json"    # the search's wall time over its runs (tune_scheduler.py SearchClock)
TRIALS_FILE = "trials.json"  # the planned trials and their results (tune_scheduler.py TrialRecorder)
TRIALS_VERSION = 1
PAUSE_ENV = "CLLM4REC_TUNE_PAUSE_AT_EPOCH"  # test hook: _pause_hook
REPORTED = ("recall@20", "recall@40", "ndcg@100")
DOMAINS = ("choice", "uniform", "loguniform", "randint")
# Training-config sections a search may touch; seeds are what `cllm4rec report` varies, not hyperparameters.
SEARCHABLE_SECTIONS = ("model", "batch", "schedule", "optim")
NOT_SEARCHABLE = ("batch.seed", "model.precision", "model.max_logit_elements")
# Baseline settings that are not hyperparameters (evaluation, seeds, devices) or are the budget (epochs).
BASELINE_FIXED = ("ks", "ndcg_ks", "select_metric", "eval_batch_users", "score_test", "exclude_valid_on_test",
                  "seed", "device", "num_threads", "epochs", "eval_every")


@dataclass
class BudgetSettings:
    trials: int = 8
    """Configurations sampled from the space (give every model compared the same number)."""
    max_epochs: int = 10
    """Most validated epochs per trial, ASHA's max_t: CLLM4Rec variants' finetuning epochs
    (schedule.finetune_epochs is set to it, or searched up to it), Multi-VAE's training epochs; EASE has none."""
    grace_epochs: int = 2
    """ASHA: validated epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: at each rung only the best 1/reduction_factor of the trials continue."""
    concurrent: int = 2
    """Trials running at once (one CPU and one torch thread each)."""


@dataclass
class TuneSpec:
    model: str = next(iter(VARIANTS))
    """What is tuned: a recommender variant (CLLM4Rec's cllm4rec, cf, fixord, prerec, scratch, ftall: the names of
    `cllm4rec report`) or a baseline (ease, multivae). Default: the first registered variant (CLLM4Rec)."""
    seed: int = 0
    """Seeds the sampling of the trials' values (the training seed is the base config's `seed`)."""
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    space: dict = field(default_factory=dict)
    """Setting -> {choice: [v, ...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}
    (integers, both ends included)."""

    def validate(self) -> TuneSpec:
        if self.model not in MODELS:
            raise ConfigError(f"model={self.model!r}: must be one of {', '.join(MODELS)}.")
        b = self.budget
        for name in ("trials", "max_epochs", "grace_epochs", "concurrent"):
            if getattr(b, name) < 1:
                raise ConfigError(f"budget.{name}={getattr(b, name)!r}: must be >= 1.")
        if b.reduction_factor < 2:
            raise ConfigError(f"budget.reduction_factor={b.reduction_factor!r}: must be >= 2.")
        if b.grace_epochs > b.max_epochs:
            raise ConfigError(f"budget.grace_epochs={b.grace_epochs}: must be <= budget.max_epochs ({b.max_epochs}).")
        if not self.space:
            raise ConfigError("space is empty: name at least one setting to search, e.g. "
                              "'optim.finetune_lr: {loguniform: [1.0e-4, 1.0e-2]}'.")
        return self


# ---- the search space ------------------------------------------------------------------------------


def _domain(key: str, spec) -> tuple[str, list]:
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"space.{key}: expected one of {', '.join('{' + d + ': [...]}' for d in DOMAINS)}, "
                          f"got {spec!r}.")
    (kind, args), = spec.items()
    if kind not in DOMAINS:
        raise ConfigError(f"space.{key}: unknown domain {kind!r}; use one of {', '.join(DOMAINS)}.")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"space.{key}.{kind}: expected a non-empty list, got {args!r}.")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"space.{key}.{kind}: expected [low, high] numbers, got {args!r}.")
        ordered = args[0] <= args[1] if kind == "randint" else args[0] < args[1]  # randint: both ends included
        if not ordered:
            raise ConfigError(f"space.{key}.{kind}: low {args[0]} must be below high {args[1]}.")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"space.{key}.loguniform: low {args[0]} must be > 0.")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"space.{key}.randint: expected whole numbers, got {args!r}.")
    return kind, args


def _probe_values(kind: str, args: list) -> list:
    """The values a domain can produce at its extremes (each is checked against the config's own rules)."""
    return list(args) if kind == "choice" else [args[0], args[1]] if kind == "randint" else [float(a) for a in args]


def check_space(spec: TuneSpec, base: TrainConfig) -> None:
    """Every searched setting exists, may be searched, and each value the domain can take passes the config's
    validation; errors name the setting (space.<setting>) and the rule."""
    budget = spec.budget
    if spec.model in VARIANTS:
        known = {name for name, _, _ in _walk(TrainConfig)}
        for key, domain in spec.space.items():
            if key not in known:
                raise ConfigError(f"space.{key}: not a training setting; searchable: "
                                  f"{', '.join(sorted(n for n in known if searchable(n)))}.")
            if not searchable(key):
                raise ConfigError(f"space.{key}: not a hyperparameter that can be searched (sections "
                                  f"{', '.join(SEARCHABLE_SECTIONS)}, except {', '.join(NOT_SEARCHABLE)}).")
            kind, args = _domain(key, domain)
            for value in _probe_values(kind, args):
                trial = copy.deepcopy(base)
                try:
                    _set(trial, key, value, f"space.{key}")
                    trial.validate()
                except ConfigError as err:
                    raise ConfigError(f"space.{key}: the value {value!r} is refused: {err}") from None
                if key == "schedule.finetune_epochs" and value > budget.max_epochs:
                    raise ConfigError(f"space.schedule.finetune_epochs: {value} is above budget.max_epochs "
                                      f"({budget.max_epochs}), the most validated epochs a trial may run.")
        return
    cls = baseline_settings_class(spec.model)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, domain in spec.space.items():
        if key not in names or key in BASELINE_FIXED:
            raise ConfigError(f"space.{key}: not a {spec.model} hyperparameter; searchable: "
                              f"{', '.join(sorted(names - set(BASELINE_FIXED)))}.")
        kind, args = _domain(key, domain)
        for value in _probe_values(kind, args):
            if key == "lambdas":  # EASE: one λ per trial
                if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                    raise ConfigError(f"space.lambdas: the value {value!r} is refused: EASE needs one number > 0.")
                continue
            try:
                _set(cls(), key, value, f"space.{key}")
            except ConfigError as err:
                raise ConfigError(f"space.{key}: the value {value!r} is refused: {err}") from None


def searchable(name: str) -> bool:
    return name.split(".")[0] in SEARCHABLE_SECTIONS and name not in NOT_SEARCHABLE


def baseline_settings_class(model: str):
    from cllm4rec_dist.baselines.ease import EaseSettings
    from cllm4rec_dist.baselines.multivae import MultiVAESettings

    return {"ease": EaseSettings, "multivae": MultiVAESettings}[model]


def ray_space(space: dict) -> dict:
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(a[0], a[1] + 1)}
    out = {}
    for key, domain in space.items():
        (kind, args), = domain.items()
        out[key] = make[kind](args)
    return out


def load_spec(path: str, overrides: dict | None = None) -> TuneSpec:
    """The validated spec in ``path`` (command-line ``overrides`` of budget settings applied); errors name it."""
    spec = TuneSpec()
    for key, value in read_yaml_settings(path).items():
        _set(spec, str(key), value, path)  # errors name the file
    for key, value in (overrides or {}).items():
        _set(spec, key, value, "command line")
    try:
        return spec.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ---- one trial (runs in a Ray worker) ------------------------------------------------------------------


def trial_config(base: dict, params: dict, model: str, max_epochs: int, out: str) -> TrainConfig:
    """The base config with a trial's (or the best) values: the one construction for trials and best.yaml."""
    cfg = config_from_dict(base, "tune base config")
    cfg.recommender = VARIANT_OWNER[model]  # a variant trains its own recommender, whatever the base config names
    for key, value in VARIANTS[model].settings.items():
        _set(cfg, key, value, f"tune variant {model}")
    cfg.schedule.finetune_epochs = max_epochs
    for key, value in params.items():
        _set(cfg, key, value, "tune trial")
    cfg.out = out
    return cfg.validate()


def _metrics(epoch: int, values: dict) -> dict:
    return {"epoch": epoch, **{f"valid_{m}": values.get(m) for m in REPORTED}}


def variant_trial(params: dict, base: dict, model: str, max_epochs: int, root: str) -> None:
    """One CLLM4Rec-variant trial: the real single-process training path, reporting each validation to Tune."""
    import torch
    from ray import tune

    from cllm4rec_dist.reference import run_reference

    torch.set_num_threads(1)
    cfg = trial_config(base, params, model, max_epochs, os.path.join(root, tune.get_context().get_trial_id()))
    # A trial that Tune restarts after an interrupted search resumes from its folder's last checkpoint (a
    # fresh trial's folder has none); the epochs since that checkpoint are replayed exactly and reported again.
    cfg.resume, cfg.projector_sample = True, 0
    reported = []

    def report(record: dict) -> None:
        reported.append(record)
        _pause_hook(root, tune.get_context().get_trial_id(), record["epoch"] + 1)
        # LLM-PreRec's one validation follows its last PRETRAINING epoch: it is the trial's validated unit 1
        tune.report(_metrics(1 if model == "prerec" else record["epoch"] + 1, record))

    # Tune may end the trial as soon as it hears of a validation: its best weights are saved first, so that
    # `cllm4rec evaluate --checkpoint TUNE/trials/<id>` can test the selected model afterwards.
    result = run_reference(cfg, on_validation=report, score_test=False, checkpoint_new_best=True)
    if not reported:  # LLM-PreRec: no finetuning epochs, one validation of the pretrained model
        tune.report(_metrics(1, result["valid"]))


def _pause_hook(root: str, trial_id: str, epoch: int) -> None:
    """Test hook (PAUSE_ENV = "INDEX:EPOCH", INDEX as in trial ids, e.g. "00001:1"): that trial stops before
    reporting that validated epoch, as on a node that hangs, until the test kills the search. It is after the
    epoch's checkpoint, so the epoch is one that Tune never heard of and a resumed trial must report again."""
    at = os.environ.get(PAUSE_ENV)
    if not at:
        return
    index, at_epoch = at.split(":")
    marker = os.path.join(root, f".paused-{index}-at-epoch{at_epoch}")
    if not trial_id.endswith(f"_{index}") or int(at_epoch) != epoch or os.path.exists(marker):
        return
    open(marker, "w").close()
    while True:
        time.sleep(1)


def baseline_trial(params: dict, model: str, data: str, seed: int, max_epochs: int,
                   exclude_valid_on_test: bool) -> None:
    """One baseline trial: EASE at one λ (one report), or Multi-VAE reporting each epoch's validation."""
    from ray import tune

    from cllm4rec_dist.baselines import ease, multivae
    from cllm4rec_dist.corpus.shards import load_eval_split

    split = load_eval_split(data)
    settings = baseline_settings(model, params, seed, max_epochs, exclude_valid_on_test)
    settings.score_test = False
    if model == "ease":
        tune.report(_metrics(1, ease.run(split, settings)["valid"]))
    else:
        settings.num_threads = 1
        multivae.run(split, settings, on_validation=lambda epoch, valid: tune.report(_metrics(epoch, valid)))


def baseline_settings(model: str, params: dict, seed: int, max_epochs: int, exclude_valid_on_test: bool):
    """The baseline's settings with a trial's (or the best) values."""
    values = {k: ((float(v),) if k == "lambdas" else v) for k, v in params.items()}
    values["exclude_valid_on_test"] = exclude_valid_on_test
    if model == "multivae":
        values.update(seed=seed, epochs=max_epochs)
    return baseline_settings_class(model)(**values)


# ---- the search --------------------------------------------------------------------------------------


def start_local_ray(num_cpus: int) -> None:
    """A local Ray for the trials, one thread per trial; inside `ray job submit` (RAY_ADDRESS set) the job's
    cluster is joined instead (and an already initialised Ray is used as it is: run_search)."""
    import ray

    from cllm4rec_dist import distributed

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.WARNING)
        return
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    distributed.start_local_ray(num_cpus, threads)


def run_search(spec: TuneSpec, base: TrainConfig, out: str, record: dict) -> None:
    """Ray Tune over the planned trials of ``record`` (OUT/trials.json) with ASHA on validation Recall@20; the
    results go to that file.

    A new Tune experiment in every run of the search (OUT/ray/search, then search-2, ...: never an existing
    folder, never restored): the trials that finished in an earlier run are skipped, the others run (again) and
    resume from their own checkpoints; ASHA's rungs (OUT/asha.json) are those of the interrupted search."""
    if all(t["finished"] for t in record["trials"]):
        return  # killed after its last trial finished, before tune.json: nothing left to run
    import ray
    from ray import tune

    from cllm4rec_dist.tune_scheduler import PlannedTrials, ResumableASHA, SearchClock, TrialRecorder

    b = spec.budget
    if spec.model in VARIANTS:
        trainable = tune.with_parameters(variant_trial, base=dataclasses.asdict(base), model=spec.model,
                                         max_epochs=b.max_epochs, root=os.path.join(out, "trials"))
    else:
        trainable = tune.with_parameters(baseline_trial, model=spec.model, data=base.data, seed=base.seed,
                                         max_epochs=b.max_epochs,
                                         exclude_valid_on_test=base.eval.exclude_valid_on_test)
    trainable = tune.with_resources(trainable, {"cpu": 1})
    started_here = not ray.is_initialized()
    if started_here:
        start_local_ray(b.concurrent)
    try:
        recorder = TrialRecorder(os.path.join(out, TRIALS_FILE), record, time_attr="epoch",
                                 metrics=tuple(f"valid_{m}" for m in REPORTED))
        tuner = tune.Tuner(
            trainable,
            param_space=ray_space(spec.space),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE, mode="max", num_samples=b.trials,
                scheduler=ResumableASHA(os.path.join(out, ASHA_FILE), time_attr="epoch", max_t=b.max_epochs,
                                        grace_period=b.grace_epochs, reduction_factor=b.reduction_factor),
                search_alg=PlannedTrials(record, max_concurrent=b.concurrent)),
            run_config=tune.RunConfig(name=new_experiment_folder(out), storage_path=os.path.join(out, "ray"),
                                      verbose=0, callbacks=[SearchClock(os.path.join(out, CLOCK_FILE)), recorder]))
        tuner.fit()  # its ResultGrid is not used: the results are in OUT/trials.json
    finally:
        if started_here:
            from cllm4rec_dist.distributed import stop_local_ray

            stop_local_ray()


def search_state_dir(out: str) -> str:
    return os.path.join(out, "ray", SEARCH_NAME)


def new_experiment_folder(out: str) -> str:
    """The name of a new folder in OUT/ray for this run's Tune experiment, created here: ``search`` for the first
    run, then ``search-2``, ... (an existing folder, and whatever it holds, is never used)."""
    root = os.path.join(out, "ray")
    os.makedirs(root, exist_ok=True)
    k = 1
    while True:
        name = SEARCH_NAME if k == 1 else f"{SEARCH_NAME}-{k}"
        try:
            os.mkdir(os.path.join(root, name))
            return name
        except FileExistsError:
            k += 1


# ---- the trial record (OUT/trials.json): what a resumed search is rebuilt from ------------------------------


def plan_trials(spec: TuneSpec) -> list[dict]:
    """The values of the ``spec.budget.trials`` trials, sampled with ``spec.seed`` by Tune's own variant generation
    (the values Tune's BasicVariantGenerator(random_state=seed) gives the trials, in their order)."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    rng = _BackwardsCompatibleNumpyRng(spec.seed)
    planned = []
    for _ in range(spec.budget.trials):
        _, resolved = next(generate_variants({"config": ray_space(spec.space)}, random_state=rng))
        planned.append({key: _number(resolved["config"][key]) for key in spec.space})
    return planned


def new_trial_record(spec: TuneSpec, out: str) -> dict:
    """Plan a new search's trials and write OUT/trials.json: ids ``PREFIX_00000``, ... (Tune's form; PREFIX is new,
    unlike any trial folder in OUT/trials), values, no results yet."""
    import uuid

    trials_dir = os.path.join(out, "trials")
    taken = {name.split("_")[0] for name in os.listdir(trials_dir)} if os.path.isdir(trials_dir) else set()
    prefix = next(p for p in iter(lambda: uuid.uuid4().hex[:5], None) if p not in taken)
    record = {"version": TRIALS_VERSION, "prefix": prefix, "trials": [
        {"trial_id": f"{prefix}_{i:05d}", "params": params, "results": [], "finished": False, "error": None,
         "seconds": None} for i, params in enumerate(plan_trials(spec))]}
    write_json_atomic(os.path.join(out, TRIALS_FILE), record)
    return record


def load_trial_record(spec: TuneSpec, out: str) -> dict:
    """OUT/trials.json, checked against the spec (its trials, their ids, values from the space, results); an error
    names the file and what is wrong with it."""
    path = os.path.join(out, TRIALS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        problem = _record_problem(spec, record)
    except (OSError, ValueError) as err:
        problem = " ".join(str(err).split())
    if problem:
        raise ConfigError(f"{path}: not the trial record of this search ({problem}). Restore the file the search "
                          "wrote, or start the search again in another --out.")
    return record


def _record_problem(spec: TuneSpec, record) -> str | None:
    import re

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(record, dict) or record.get("version") != TRIALS_VERSION:
        return f"expected an object with version {TRIALS_VERSION}"
    prefix, trials = record.get("prefix"), record.get("trials")
    if not (isinstance(prefix, str) and re.fullmatch(r"[0-9a-f]{5}", prefix)):
        return f"prefix {prefix!r}: expected 5 hexadecimal digits"
    if not (isinstance(trials, list) and len(trials) == spec.budget.trials):
        return f"trials: expected a list of budget.trials = {spec.budget.trials} trials"
    for i, t in enumerate(trials):
        where = f"trials[{i}]"
        if not isinstance(t, dict) or t.get("trial_id") != f"{prefix}_{i:05d}":
            return f"{where}.trial_id: expected {prefix}_{i:05d}"
        params = t.get("params")
        if not isinstance(params, dict) or set(params) != set(spec.space):
            return f"{where}.params: expected the settings {', '.join(spec.space)}"
        for key, value in params.items():
            (kind, args), = spec.space[key].items()
            if not (value in args if kind == "choice" else number(value) and args[0] <= value <= args[1]
                    and (kind != "randint" or isinstance(value, int))):
                return f"{where}.params.{key}: {value!r} is not a value of {kind} {args}"
        if not isinstance(t.get("finished"), bool) or not (t.get("error") is None or isinstance(t["error"], str)) \
                or not (t.get("seconds") is None or number(t["seconds"])):
            return f"{where}: expected finished (true/false), error (text or null), seconds (a number or null)"
        results = t.get("results")
        if not isinstance(results, list) or not all(
                isinstance(r, dict) and isinstance(r.get("epoch"), int) and not isinstance(r["epoch"], bool)
                and all(r.get(f"valid_{m}") is None or number(r[f"valid_{m}"]) for m in REPORTED) for r in results):
            return f"{where}.results: expected a list of {{epoch: integer, valid_<metric>: number or null}}"
    return None


def _search_record(spec: TuneSpec, base: TrainConfig) -> dict:
    # The dataset by content, not by path: the path may move between the runs, the data may not change.
    dataset = ShardedDataset(base.data).manifest.get("content_hash")
    return json.loads(json.dumps({"spec": dataclasses.asdict(spec), "base_config": dataclasses.asdict(base),
                                  "dataset": dataset}, default=str))


def begin_or_resume(spec: TuneSpec, base: TrainConfig, out: str) -> bool:
    """Whether ``out`` holds an interrupted search of this spec and base config (True: resume it from its trial
    record, OUT/trials.json); a new search records what it was started with in OUT/search.json. Errors before Ray
    starts: a finished search, or an interrupted one with other settings."""
    record_path = os.path.join(out, SEARCH_FILE)
    if os.path.exists(os.path.join(out, "tune.json")):
        raise ConfigError(f"{out}: holds a finished search (tune.json, best.yaml). Use another --out for a new "
                          "search.")
    record = _search_record(spec, base)
    if not os.path.exists(record_path):
        if os.path.exists(search_state_dir(out)) or os.path.exists(os.path.join(out, ASHA_FILE)):
            raise ConfigError(f"{out}: has a Ray Tune experiment but no {SEARCH_FILE} (not a folder this version "
                              "of cllm4rec tune started). Use another --out.")
        write_json_atomic(record_path, record)
        return False
    with open(record_path, encoding="utf-8") as f:
        started = json.load(f)
    # The spec is the search itself (its space, budget, sampling seed): every key counts, including one only
    # one side has (a parameter added to or dropped from the space). The base config follows the rule each
    # resumed trial's checkpoint is held to: locations and logging may change, settings only one version of
    # the config knows are skipped (a newer cllm4rec resuming an older search), the trajectory may not.
    spec_before, spec_after = flatten_settings(started["spec"]), flatten_settings(record["spec"])
    changed = [f"spec.{k}: {spec_before.get(k, '(unset)')!r} -> {spec_after.get(k, '(unset)')!r}"
               for k in sorted(spec_before.keys() | spec_after.keys()) if spec_before.get(k) != spec_after.get(k)]
    changed += config_changes(started["base_config"], record["base_config"])
    if started.get("dataset", record["dataset"]) != record["dataset"]:
        changed.append(f"the dataset at data: content hash {started['dataset']} -> {record['dataset']}")
    if changed:
        raise ConfigError(f"{out}: an interrupted search started with other settings than {record_path} "
                          f"records ({'; '.join(changed)}). Resume it with the spec and flags it started with, "
                          "or use another --out for a new search.")
    if os.path.exists(os.path.join(out, TRIALS_FILE)):
        return True
    # Killed before its trials were planned: the search starts again, with new trial ids, so rungs that ASHA
    # recorded for other ones must not count (nor the clock of a run whose work is redone).
    if os.path.exists(search_state_dir(out)):
        print(f"[tune] {out} has no {TRIALS_FILE} (a search started by an older cllm4rec, whose state is in Ray's "
              "pickles, which are never read): starting the search again", flush=True)
    for name in (ASHA_FILE, CLOCK_FILE):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return False


def search_clock(out: str) -> dict:
    """``wall_seconds`` and ``runs`` of a finished search (SearchClock's file; None where a search started by an
    older cllm4rec, without the clock, was resumed by this one and no result came since)."""
    path = os.path.join(out, CLOCK_FILE)
    if not os.path.exists(path):
        return {"wall_seconds": None, "runs": None}
    with open(path, encoding="utf-8") as f:
        clock = json.load(f)
    return {"wall_seconds": clock["seconds"], "runs": clock["runs"]}


def planned_epochs(spec: TuneSpec, params: dict) -> int:
    if spec.model in ("ease", "prerec"):  # one fit / one validation of the pretrained model
        return 1
    return int(params.get("schedule.finetune_epochs", spec.budget.max_epochs))


def summarize_trials(spec: TuneSpec, record: dict) -> list[dict]:
    """Per trial of the trial record: its values, validation curve, epochs run, whether it finished and whether
    ASHA stopped it early, seconds, error."""
    trials = []
    for t in record["trials"]:
        # A trial resumed after an interrupted search reports again the epochs since its last checkpoint (the
        # same values: the replay is exact); the record and the curve keep one point per epoch.
        by_epoch = {int(r["epoch"]): r for r in t["results"]}
        curve = [{"epoch": epoch, **{f"valid_{m}": _number(r.get(f"valid_{m}")) for m in REPORTED}}
                 for epoch, r in sorted(by_epoch.items())]
        params = dict(t["params"])
        planned = planned_epochs(spec, params)
        run = max((c["epoch"] for c in curve), default=0)
        best = max(curve, key=lambda c: c[OBJECTIVE] if c[OBJECTIVE] is not None else -math.inf, default=None)
        trials.append({
            "trial_id": t["trial_id"],
            "params": params, "curve": curve, "epochs_run": run, "epochs_planned": planned,
            # returned, stopped by ASHA or failed; not interrupted by a signal or a kill (TrialRecorder)
            "finished": t["finished"],
            "stopped_early": t["error"] is None and run < planned,
            "best_epoch": best["epoch"] if best else None, OBJECTIVE: best[OBJECTIVE] if best else None,
            "seconds": t["seconds"], "error": t["error"]})
    return trials


def _number(value):
    """JSON-friendly scalars from pandas/numpy (NaN -> None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def best_yaml(spec: TuneSpec, base: TrainConfig, best: dict) -> str:
    head = (f"# cllm4rec tune --spec ({spec.model}): best of {spec.budget.trials} trials x <= "
            f"{spec.budget.max_epochs} epochs by {OBJECTIVE} = {best[OBJECTIVE]:.4f} (epoch {best['best_epoch']})\n")
    import yaml

    if spec.model in VARIANTS:
        cfg = trial_config(dataclasses.asdict(base), best["params"], spec.model, spec.budget.max_epochs, "")
        return head + "# train it: cllm4rec train --config THIS --out RUN   (or launchers/pretrain_llama.py)\n" \
            + to_yaml(cfg)
    settings = baseline_settings(spec.model, best["params"], base.seed, spec.budget.max_epochs,
                                 base.eval.exclude_valid_on_test)
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()
              if k not in ("seed", "score_test")}
    return head + "# use it: cllm4rec report --model-config " + spec.model + "=THIS ...\n" + \
        yaml.safe_dump({"baseline": spec.model, "data": base.data, "settings": values}, sort_keys=False)


def plot_curves(trials: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        points = [(c["epoch"], c[OBJECTIVE]) for c in t["curve"] if c[OBJECTIVE] is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, linestyle="-" if len(xs) > 1 else "none",
                    label=f"{t['trial_id']}{' (stopped)' if t['stopped_early'] else ''}")
    ax.set_xlabel("validated epoch")
    ax.set_ylabel("validation Recall@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SearchInterrupted(Exception):
    """Tune stopped the search on a signal before every trial finished (no tune.json: the folder resumes)."""


def tune_model(spec: TuneSpec, base: TrainConfig, out: str, command: str = "") -> dict:
    """Search, then write best.yaml, tune.json and curves.png into ``out``; returns the tune.json content.

    A search interrupted before tune.json (killed, preempted, Ctrl-C) is resumed by the same command: see
    `begin_or_resume`. ``wall_seconds`` then counts every run of the search (``runs``), each up to its last
    trial result."""
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    if "://" not in base.data:
        base.data = os.path.abspath(base.data)
    base.out = ""
    check_space(spec, base)
    with RunLock(out):  # one search per folder; a killed search's lock is taken over by the run resuming it
        return _search_and_write(spec, base, out, command)


def _search_and_write(spec: TuneSpec, base: TrainConfig, out: str, command: str) -> dict:
    resume = begin_or_resume(spec, base, out)
    if resume:
        record = load_trial_record(spec, out)  # checked before Ray starts
        print(f"[tune] resuming the interrupted search in {out}", flush=True)
    else:
        record = new_trial_record(spec, out)
    run_search(spec, base, out, record)
    trials = summarize_trials(spec, load_trial_record(spec, out))
    finished = sum(t["finished"] for t in trials)
    if finished < spec.budget.trials:  # Ctrl-C / SIGUSR1: Tune stopped the trials and saved its state
        raise SearchInterrupted(f"the search in {out} was interrupted with {finished} of {spec.budget.trials} "
                                "trials finished; its state is saved: run the same command again to resume it.")
    scored = [t for t in trials if t[OBJECTIVE] is not None]
    if not scored:
        errors = "; ".join(t["error"] for t in trials if t["error"]) or "no trial reported a validation score"
        raise RuntimeError(f"cllm4rec tune: every trial failed: {errors}")
    best = max(scored, key=lambda t: t[OBJECTIVE])
    summary = {"command": command, "model": spec.model, "objective": OBJECTIVE, "spec": dataclasses.asdict(spec),
               "base_config": dataclasses.asdict(base),
               "budget": {**dataclasses.asdict(spec.budget),
                          "epoch_budget": spec.budget.trials * spec.budget.max_epochs,
                          "epochs_run": sum(t["epochs_run"] for t in trials),
                          "trials_stopped_early": sum(t["stopped_early"] for t in trials),
                          "trials_failed": sum(t["error"] is not None for t in trials),
                          "trial_seconds": round(sum(t["seconds"] or 0 for t in trials), 1),
                          **search_clock(out), "resumed": resume},
               "best": best, "trials": trials, "files": {}}
    for name, text in (("best.yaml", best_yaml(spec, base, best)),):
        path = os.path.join(out, name)
        write_text_atomic(path, text)
        summary["files"][name] = path
    summary["files"]["curves.png"] = os.path.join(out, "curves.png")
    plot_curves(trials, summary["files"]["curves.png"], f"cllm4rec tune: {spec.model}")
    summary["files"]["tune.json"] = os.path.join(out, "tune.json")
    write_json_atomic(summary["files"]["tune.json"], summary, default=str)
    return summary


# ---- the command -------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.description = ("Search hyperparameters on validation Recall@20 with Ray Tune (ASHA stops trailing trials "
                     "after each validated epoch; test is never evaluated) and write OUT/best.yaml (a training "
                     "config `cllm4rec train --config` takes), OUT/tune.json and OUT/curves.png. The spec YAML "
                     "declares the model, budget and space; the base training config is --config / flags.")
    from cllm4rec_dist.settings import field_docs

    keys = list(field_docs(TuneSpec).items())  # model, seed, then the budget fields, then space
    keys[2:2] = [(f"budget.{name}", doc) for name, doc in field_docs(BudgetSettings).items()]
    p.add_argument("--spec", required=True, help="tune spec YAML with the keys: " + "; ".join(
        f"{name}: {doc} (default: {_default(name)})" for name, doc in keys).replace("%", "%%"))
    p.add_argument("--trials", type=int, default=None, help="override budget.trials (same for every model compared)")
    p.add_argument("--max-epochs", type=int, default=None, help="override budget.max_epochs")
    p.add_argument("--concurrent", type=int, default=None, help="override budget.concurrent")
    add_config_arguments(p)


def _default(dotted: str):
    obj = TuneSpec()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def run(args) -> int:
    if "data" not in vars(args) or "out" not in vars(args):
        print("error: cllm4rec tune needs --data DIR and --out TUNE_DIR", file=sys.stderr)
        return 2
    overrides = {f"budget.{k}": v for k, v in (("trials", args.trials), ("max_epochs", args.max_epochs),
                                                ("concurrent", args.concurrent)) if v is not None}
    spec = load_spec(args.spec, overrides)
    base = config_from_args(args)
    if recommender(base.recommender).protocol != "full_ranking":
        raise ConfigError(f"recommender={base.recommender!r}: {COMMAND} tune searches the variants of recommenders "
                          f"scored by full ranking ({', '.join(VARIANTS)}) and the baselines; "
                          f"{recommender(base.recommender).title} is scored on stored candidates.")
    out = base.out
    try:
        check_space(spec, base)
    except ConfigError as err:
        raise ConfigError(f"{args.spec}: {err}") from None
    import shlex

    try:
        summary = tune_model(spec, base, out, shlex.join([COMMAND, *sys.argv[1:]]))
    except SearchInterrupted as stop:
        print(f"[tune] {stop}", file=sys.stderr, flush=True)
        return 1
    for t in summary["trials"]:
        value = "—" if t[OBJECTIVE] is None else f"{t[OBJECTIVE]:.4f}"
        state = "error" if t["error"] else "stopped by ASHA" if t["stopped_early"] else "finished"
        print(f"[tune] trial {t['trial_id']}: {OBJECTIVE} {value} at epoch {t['best_epoch']}, "
              f"{t['epochs_run']}/{t['epochs_planned']} epochs ({state}) {json.dumps(t['params'])}")
    b = summary["budget"]
    print(f"[tune] budget {b['trials']} trials x {b['max_epochs']} epochs = {b['epoch_budget']}; ran "
          f"{b['epochs_run']} epochs, {b['trials_stopped_early']} trials stopped early, {b['wall_seconds']} s")
    print(f"[tune] best {OBJECTIVE} {summary['best'][OBJECTIVE]:.4f}: wrote {', '.join(summary['files'].values())}")
    return 0
