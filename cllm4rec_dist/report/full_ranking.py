"""`cllm4rec report`, full-ranking protocol: baselines and a recommender's variants on one split, one schedule,
one table and one plot.

Why a command rather than a notebook: a quality claim is only as good as the
exact command, schedule, split and machine behind it. Running every model from
one invocation on the same preprocessed dataset, with the same metric code and
the same training config, and writing that provenance next to the numbers, is
what makes the rows comparable (and the paper comparison honest).

The models: the baselines (most-popular, EASE, Multi-VAE, content kNN) and the named variants of the config's
recommender (the registry's ``named_variants()``: CLLM4Rec and its ablations), each variant run with the shared
config plus its own settings. Seeds and the seed-noise rule: ``stats.py``.

Outputs in ``--out REPORT_DIR``:

* ``report.md``   Markdown table (valid / test Recall@20, Recall@40, NDCG@100, wall time; mean ± std over seeds),
  the pairwise differences against the seed noise, and provenance;
* ``recall20.png`` validation Recall@20 per finetuning epoch of each variant (mean over seeds), baselines
  (and variants without finetuning epochs, e.g. LLM-PreRec) as horizontal lines;
* ``report.json`` everything above, machine-readable;
* ``runs/<model>/seed-<s>/`` each model's own run folder per seed (variants: metrics.json, train_log.jsonl, ...;
  baselines: result.json).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time

from cllm4rec_dist import COMMAND
from cllm4rec_dist.config import TrainConfig
from cllm4rec_dist.recommenders import all_recommenders, recommender
from cllm4rec_dist.report.runs import fresh_dir, saved_config, seeded, setting, with_variant
from cllm4rec_dist.report.runs import settings_key as run_settings_key
from cllm4rec_dist.report.stats import (
    backbone_info,
    code_info,
    dataset_info,
    difference_lines,
    differences,
    fmt,
    fmt_stat,
    machine_info,
    mean_std,
    write_report,
    yaml_text,
)

PROTOCOL = "full_ranking"
DATASET = "a random-split dataset"
"""The kind of dataset this protocol needs (`cllm4rec preprocess`'s default split)."""
OPTIONS = ("multivae_epochs", "model_configs")
"""The protocol-specific flags of `cllm4rec report` (argparse dests) this protocol reads."""
BASELINES = ("popular", "ease", "multivae", "content-knn")
BASELINE_NAMES = {"popular": "Most-popular", "ease": "EASE", "multivae": "Multi-VAE", "content-knn": "Content kNN"}
BASELINES_NOT_BY_DEFAULT = ("content-knn",)
"""Baselines run only when --models names them (the recommender's variants say it themselves: Variant.default)."""
METRICS = ("recall@20", "recall@40", "ndcg@100")
# the cold-item slices (eval.metrics.COLD_SLICES), present on a dataset with cold items
COLD_METRICS = ("cold/recall@20", "cold_only/recall@20", "cold_only_random/recall@20")
DIFFERENCE_COLUMNS = (("valid", "recall@20"), ("test", "recall@20"), ("test", "recall@40"), ("test", "ndcg@100"))
CONTENT_ONLY_SETTINGS = (("model", "lambda_c"), ("model", "mr_reduction"), ("schedule", "warmup_mr"))
"""Settings only a run with the content LLM reads: a finished run of a variant without it (``uses_content``
false: LLM-CF, no content LLM and no MR) is reused whatever they were, so one LLM-CF run serves reports that
differ only in how MR is weighted."""


# ---- the models --------------------------------------------------------------------------------


def known_models(rec) -> list[str]:
    """What --models may name with this recommender: the baselines, then its variants."""
    return [*BASELINES, *rec.named_variants()]


def default_models(rec) -> list[str]:
    variants = rec.named_variants()
    return [m for m in known_models(rec)
            if m not in BASELINES_NOT_BY_DEFAULT and (m not in variants or variants[m].default)]


def models_note(rec) -> str:
    return ""


def display_names(rec) -> dict[str, str]:
    """Model name -> display name (baselines and this recommender's variants)."""
    return {**BASELINE_NAMES, **{name: v.title for name, v in rec.named_variants().items()}}


def all_display_names() -> dict[str, str]:
    """Every model of every full-ranking recommender (what --model-config may name)."""
    names = dict(BASELINE_NAMES)
    for rec in all_recommenders():
        if rec.protocol == PROTOCOL:
            names.update(display_names(rec))
    return names


def variant_setting_keys(rec) -> list[str]:
    """The config settings the variants set (``ablation``)."""
    return list(dict.fromkeys(key for v in rec.named_variants().values() for key in v.settings))


def refuse_models(rec, unknown: list[str], elsewhere: str | None) -> str:
    """The error for --models this recommender cannot report; ``elsewhere``: the recommender that can."""
    return (f"--models {','.join(unknown)} need {elsewhere or 'another recommender'}; with recommender: {rec.name} "
            f"choose from {', '.join(display_names(rec))}")


# ---- running the models ------------------------------------------------------------------------


def parse_model_config(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    known = all_display_names()
    if not sep or not path or name not in known:
        raise ValueError(f"--model-config {text!r}: expected NAME=PATH with NAME one of {', '.join(known)}")
    return name, path


def load_model_config(name: str, path: str, cfg: TrainConfig) -> TrainConfig | dict:
    """Model ``name``'s tuned config (the best.yaml `cllm4rec tune` wrote) for this report: a variant's training
    config (the report's output folder kept) or a baseline's settings; tuned on the report's data."""
    from cllm4rec_dist.config import config_from_dict
    from cllm4rec_dist.settings import ConfigError, read_yaml_settings

    values = read_yaml_settings(path)
    if name == "popular":
        raise ConfigError(f"--model-config popular={path}: most-popular has no settings to tune.")
    if name in BASELINES:
        if values.get("baseline") != name or not isinstance(values.get("settings"), dict):
            raise ConfigError(f"{path}: not a tuned {name} (expected 'baseline: {name}' and a 'settings' mapping, "
                              f"as `{COMMAND} tune` with 'model: {name}' writes).")
        own, data = dict(values["settings"]), values.get("data")
    else:
        rec = recommender(cfg.recommender)
        if name not in rec.named_variants():
            raise ConfigError(f"--model-config {name}={path}: {name} is not a model of recommender: {rec.name}; "
                              f"choose from {', '.join(display_names(rec))}")
        if "baseline" in values:
            raise ConfigError(f"{path}: holds {values['baseline']} settings, not a training config for {name}.")
        own = config_from_dict({k: v for k, v in values.items() if k != "out"}, path)
        for key, value in rec.named_variants()[name].settings.items():
            if setting(own, key) != value:
                raise ConfigError(f"{path}: tuned with {key}={setting(own, key)!r}, but {name} runs with "
                                  f"{key}={value!r}; pass the best.yaml tuned for {name}.")
        own.out, data = cfg.out, own.data
    if os.path.abspath(str(data)) != os.path.abspath(cfg.data):
        raise ConfigError(f"{path}: tuned on {data}, but this report runs on {cfg.data}; a comparison needs every "
                          "model tuned on the report's dataset.")
    return own


def run_baseline_model(name: str, data: str, cfg: TrainConfig, run_dir: str, multivae_epochs: int | None,
                       tuned: dict | None = None) -> dict:
    from cllm4rec_dist.baselines.command import TEXT_MODELS, dataset_item_texts, run_baseline
    from cllm4rec_dist.corpus.shards import ShardedDataset

    settings = {**(tuned or {}), "exclude_valid_on_test": cfg.eval.exclude_valid_on_test}
    if name == "multivae":
        settings["seed"] = cfg.seed
        if multivae_epochs is not None or "epochs" not in settings:
            settings["epochs"] = multivae_epochs
    dataset = ShardedDataset(data)
    texts = dataset_item_texts(dataset) if name in TEXT_MODELS else None
    result = run_baseline(dataset.eval_split(), name, texts=texts, **settings)
    with open(os.path.join(run_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return {"kind": "baseline", "valid": result["valid"], "test": result["test"], "selected": result["selected"],
            "settings": result["settings"]}


def run_variant(name: str, cfg: TrainConfig, run_dir: str) -> dict:
    """One seed of the recommender's variant ``name``: the config with the variant's settings, trained and tested
    (`cllm4rec train`'s recipe) in ``run_dir``; its entry records those settings (e.g. ``ablation``)."""
    from cllm4rec_dist.reference import run_reference

    variant = recommender(cfg.recommender).named_variants()[name]
    own = with_variant(cfg, name, variant.settings)
    own.out = run_dir
    own.resume = False
    result = run_reference(own.validate())
    if "test" not in result:
        raise RuntimeError(f"{name}: training stopped before testing ({result.get('stopped')}); "
                           "raise max_steps or set it to 0")
    return {"kind": "variant", **{key: setting(own, key) for key in variant.settings}, "valid": result["valid"],
            "test": result["test"], "best": result["best"], "history": result["history"],
            "global_step": result["global_step"], "train_seconds": result.get("seconds")}


def settings_key(cfg: TrainConfig, name: str | None = None, tuned: dict | None = None) -> str:
    """What a finished run of model ``name`` must have been run with to be reused: the whole config but the
    output folder and the settings ``name`` does not read (+ a baseline's tuned settings)."""
    variant = recommender(cfg.recommender).named_variants().get(name) if name is not None else None
    unused = ()
    if variant is not None and not with_variant(cfg, name, variant.settings).uses_content:
        unused = CONTENT_ONLY_SETTINGS
    return run_settings_key(cfg, unused, tuned)


def load_finished(name: str, run_dir: str, cfg: TrainConfig, tuned: dict | None = None) -> dict | None:
    """A previous report's finished run of ``name`` with the same settings (for --reuse), or None."""
    path = os.path.join(run_dir, "entry.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        entry = json.load(f)
    if entry.get("settings_key") != settings_key(cfg, name, tuned) and not _same_saved_settings(run_dir, cfg, name,
                                                                                                  tuned):
        print(f"[report] {name}: {run_dir} was run with other settings; running it again", flush=True)
        return None
    return {**entry, "run_dir": run_dir, "reused": True}


def _same_saved_settings(run_dir: str, cfg: TrainConfig, name: str, tuned: dict | None) -> bool:
    """Whether a trained run folder's config.yaml holds the settings ``run_variant`` would run ``name`` with now,
    by this version's rules: the key an older version stored in entry.json may spell the same settings otherwise
    (e.g. the DeepSpeed config by its path)."""
    variant = recommender(cfg.recommender).named_variants().get(name)
    if variant is None:
        return False
    expected = with_variant(cfg, name, variant.settings)
    saved = saved_config(run_dir, expected)
    return saved is not None and settings_key(saved, name, tuned) == settings_key(expected, name, tuned)


def run_one(name: str, cfg: TrainConfig, run_dir: str, multivae_epochs: int | None, reuse: bool,
            tuned: dict | None = None) -> dict:
    """One model with one seed's config, in ``run_dir`` (or its finished run there, with ``reuse``); ``tuned``:
    a baseline's settings from `cllm4rec tune` (variants get theirs in ``cfg``)."""
    if reuse and (entry := load_finished(name, run_dir, cfg, tuned)) is not None:
        print(f"[report] {name} seed {cfg.seed}: reusing {run_dir}", flush=True)
        return {k: v for k, v in entry.items() if k != "settings_key"}
    fresh_dir(run_dir)
    print(f"[report] {name} seed {cfg.seed}: running into {run_dir}", flush=True)
    start = time.time()
    if name in BASELINES:
        entry = run_baseline_model(name, cfg.data, cfg, run_dir, multivae_epochs, tuned)
    else:
        entry = run_variant(name, cfg, run_dir)
    entry.update(model=name, display=display_names(recommender(cfg.recommender))[name], seed=cfg.seed,
                 run_dir=run_dir, seconds=round(time.time() - start, 2), settings_key=settings_key(cfg, name, tuned))
    with open(os.path.join(run_dir, "entry.json"), "w", encoding="utf-8") as f:
        json.dump(entry, f, indent=1)
    print(f"[report] {name} seed {cfg.seed}: valid R@20 {fmt(entry['valid'].get('recall@20'))} "
          f"test R@20 {fmt(entry['test'].get('recall@20'))} in {entry['seconds']:.0f}s", flush=True)
    gc.collect()
    return {k: v for k, v in entry.items() if k != "settings_key"}


def summarize(name: str, runs: list[dict], display: str, variant_keys=()) -> dict:
    """A model's entry over its seeds: per-metric means (``valid``/``test``) and stds, and the per-seed runs;
    ``variant_keys``: the settings a variant's runs record (copied from the first)."""
    entry = {"model": name, "display": display, "kind": runs[0]["kind"], "seeds": [r["seed"] for r in runs],
             "runs": runs, "run_dir": os.path.dirname(runs[0]["run_dir"]),
             "seconds": round(sum(r["seconds"] for r in runs), 2),
             "seconds_per_seed": round(sum(r["seconds"] for r in runs) / len(runs), 2),
             "reused": all(r.get("reused") for r in runs)}
    for part in ("valid", "test"):
        shown = [*METRICS, *(m for m in COLD_METRICS if any(r[part].get(m) is not None for r in runs))]
        stats = {m: mean_std([r[part].get(m) for r in runs]) for m in shown}
        entry[part] = {m: stats[m][0] for m in shown}
        entry[f"{part}_std"] = {m: stats[m][1] for m in shown}
    entry.update({key: runs[0][key] for key in variant_keys if key in runs[0]})
    return entry


def run_models(models: list[str], cfg: TrainConfig, report_dir: str, multivae_epochs: int | None,
               reuse: bool = False, seeds: list[int] | None = None,
               tuned: dict[str, TrainConfig | dict] | None = None) -> dict[str, dict]:
    """Every model once per seed; each model's entry holds the per-seed runs and their mean ± std. ``tuned``:
    per model, its config from `cllm4rec tune` (a TrainConfig for a variant, settings for a baseline)."""
    seeds = seeds or [cfg.seed]
    tuned = tuned or {}
    rec = recommender(cfg.recommender)
    variants, names = rec.named_variants(), display_names(rec)
    entries: dict[str, dict] = {}
    for name in models:
        own = tuned.get(name)
        model_cfg = own if isinstance(own, TrainConfig) else cfg
        runs = [run_one(name, seeded(model_cfg, seed), os.path.join(report_dir, "runs", name, f"seed-{seed}"),
                        multivae_epochs, reuse, own if isinstance(own, dict) else None) for seed in seeds]
        keys = variants[name].settings if name in variants else ()
        entries[name] = summarize(name, runs, names[name], keys)
    return entries


# ---- rendering -----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    cfg = report["config"]
    rec = recommender(cfg["recommender"])
    n = len(report["seeds"])
    stat = f" (mean ± std over seeds {', '.join(map(str, report['seeds']))})" if n > 1 else ""
    lines = [f"# Quality report: {report['dataset'].get('name') or report['dataset']['path']}", "",
             f"Metrics{stat}; wall time per seed.", "",
             "| model | valid R@20 | valid R@40 | valid N@100 | test R@20 | test R@40 | test N@100 | wall time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in report["models"].values():
        cells = [fmt_stat(entry[part].get(m), entry[f"{part}_std"].get(m), n)
                 for part in ("valid", "test") for m in METRICS]
        wall = f"{entry['seconds_per_seed']:.1f}" + (" (reused)" if entry.get("reused") else "")
        lines.append(f"| {entry['display']} | " + " | ".join(cells) + f" | {wall} |")
    lines += cold_lines(report)
    ds, mach, bb = report["dataset"], report["machine"], report["backbone"]
    switch = "/".join(variant_setting_keys(rec)) or "variant"
    lines += ["", f"Total wall time: {report['seconds']:.1f} s. Validation picks the best finetuning epoch by "
              f"{cfg['eval']['select_on']} (baselines: their own grid / epoch); test is scored once on that model.",
              "", *difference_lines(report, DIFFERENCE_COLUMNS),
              "## Command", "", "```bash", report["command"], "```", "",
              *tuned_lines(report),
              f"## Schedule and optimisation (every {rec.title} variant without a tuned config; the {switch} switch "
              "is the only difference)", "",
              "```yaml", yaml_text({k: cfg[k] for k in ("seed", "schedule", "optim", "batch", rec.section, "eval")}),
              "```", "",
              f"Seeds: {', '.join(map(str, report['seeds']))} (each sets `seed` and `batch.seed`).",
              f"Multi-VAE epochs: {report['multivae_epochs'] or 'default'}.", "",
              "## Data, backbone, machine", "",
              f"* dataset: `{ds['path']}` ({ds['num_users']} users, {ds['num_items']} items; documents {ds['docs']})",
              f"* backbone: `{bb['used']}`" + (f" (`{bb['gguf_file']}`)" if bb.get("gguf_file") else "")
              + f", precision {bb['precision']}; dataset tokenised with `{bb['dataset_tokenised_with']}`",
              f"* machine: {mach['cpu_model'] or mach['processor']} ({mach['cpu_count']} logical CPUs), "
              f"{mach['platform']}, device {mach['device']}, torch {mach['torch']}",
              f"* code: commit {report['code']['commit'] or 'unknown'}"
              + (" with uncommitted changes" if report["code"]["dirty"] else ""),
              f"* started {report['started']}, finished {report['finished']}", "",
              "![validation Recall@20](recall20.png)", ""]
    return "\n".join(lines)


def cold_lines(report: dict) -> list[str]:
    """The cold-item slices on test (eval.metrics.COLD_SLICES), when the dataset holds items out of training."""
    n = len(report["seeds"])
    entries = [e for e in report["models"].values() if e["test"].get("cold/recall@20") is not None]
    if not entries:
        return []
    lines = ["", "Cold items (test; the items held out of training): `cold` ranks all items and scores the held-out "
             "cold ones, `cold-only` ranks the cold items alone, `random` is the expected Recall@20 of a random "
             "order of the same candidates.", "",
             "| model | cold R@20 | cold-only R@20 | random cold-only R@20 |", "| --- | ---: | ---: | ---: |"]
    for entry in entries:
        cells = [fmt_stat(entry["test"].get(m), entry["test_std"].get(m), n) for m in COLD_METRICS]
        lines.append(f"| {entry['display']} | " + " | ".join(cells) + " |")
    return lines


def tuned_lines(report: dict) -> list[str]:
    """The models run with their own (tuned) config: the file and what differs from the shared config."""
    tuned = report.get("model_configs") or {}
    if not tuned:
        return []
    shared = report["config"]
    rec = recommender(shared["recommender"])
    names = display_names(rec)
    lines = [f"## Tuned configurations (`{COMMAND} tune`, selected on validation)", ""]
    for name, item in tuned.items():
        own = item["config"]
        if name in BASELINES:
            shown = {k: v for k, v in own.items() if k in ("lambdas", "lr", "dropout", "beta_max", "batch_size",
                                                          "hidden_dim", "latent_dim", "epochs", "weight_decay")}
        else:
            shown = {f"{section}.{k}": v for section in (rec.section, "batch", "schedule", "optim")
                     for k, v in own[section].items() if v != shared[section].get(k)}
        lines.append(f"* {names[name]}: `{item['path']}`: {json.dumps(shown)}")
    return lines + [""]


def mean_curve(entry: dict) -> list[tuple[int, float]]:
    """(finetuning epoch, validation Recall@20 averaged over the seeds that have it)."""
    per_epoch: dict[int, list[float]] = {}
    for run in entry.get("runs", []):
        for h in run.get("history", []):
            if h.get("phase") == "finetune" and h.get("recall@20") is not None:
                per_epoch.setdefault(h["epoch"] + 1, []).append(h["recall@20"])
    return [(epoch, sum(v) / len(v)) for epoch, v in sorted(per_epoch.items())]


def plot(report: dict, path: str) -> None:
    """Validation Recall@20 per finetuning epoch for the recommender's variants; flat lines for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    flat: list[tuple[str, float, str]] = []
    max_epoch = 1
    for entry in report["models"].values():
        r20 = entry["valid"].get("recall@20")
        curve = mean_curve(entry)
        if entry["kind"] == "variant" and curve:
            xs, ys = zip(*curve)
            max_epoch = max(max_epoch, max(xs))
            ax.plot(xs, ys, marker="o", markersize=3, color=next(colors), label=entry["display"])
        elif r20 is not None:
            style = "--" if entry["kind"] == "variant" else ":"  # variants without finetuning dashed, baselines dotted
            flat.append((entry["display"], r20, style))
    for label, value, style in flat:
        ax.axhline(value, linestyle=style, color=next(colors), label=f"{label} ({value:.4f})")
    ax.set_xlim(0.5, max_epoch + 0.5)
    if max_epoch <= 20:
        ax.set_xticks(range(1, max_epoch + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    if values:  # axhline sits on the axes edge otherwise
        low, high = min(values), max(values)
        pad = 0.08 * (high - low) or 0.01
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("finetuning epoch")
    ax.set_ylabel("validation Recall@20" + (" (mean over seeds)" if len(report["seeds"]) > 1 else ""))
    ax.set_title(f"{report['dataset'].get('name') or 'dataset'}: validation Recall@20")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the report ------------------------------------------------------------------------------------


def build_report(cfg: TrainConfig, models: list[str], report_dir: str, command: str,
                 multivae_epochs: int | None = None, reuse: bool = False, seeds: list[int] | None = None,
                 model_configs: dict[str, str] | None = None) -> dict:
    """Run ``models`` with ``cfg`` once per seed (default: ``cfg.seed`` only) and write report.md, recall20.png
    and report.json into ``report_dir``."""
    seeds = seeds or [cfg.seed]
    model_configs = model_configs or {}
    tuned = {name: load_model_config(name, path, cfg) for name, path in model_configs.items()}
    os.makedirs(report_dir, exist_ok=True)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.time()
    report = {"command": command, "models_requested": models, "config": dataclasses.asdict(cfg),
              "dataset": dataset_info(cfg.data), "backbone": backbone_info(cfg), "machine": machine_info(cfg),
              "code": code_info(),
              "multivae_epochs": multivae_epochs, "seeds": seeds, "started": started,
              "model_configs": {name: {"path": os.path.abspath(path),
                                       "config": dataclasses.asdict(tuned[name]) if isinstance(tuned[name], TrainConfig)
                                       else tuned[name]} for name, path in model_configs.items()}}
    report["models"] = run_models(models, cfg, report_dir, multivae_epochs, reuse, seeds, tuned)
    report["differences"] = differences(report["models"], DIFFERENCE_COLUMNS)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    report["seconds"] = round(time.time() - t0, 2)
    return write_report(report, report_dir, markdown, {"recall20.png": plot})


def report_from_args(cfg: TrainConfig, models: list[str], command: str, args) -> dict:
    """`cllm4rec report`'s run of this protocol, with the flags it reads."""
    return build_report(cfg, models, cfg.out, command, args.multivae_epochs, args.reuse, args.seeds,
                        dict(args.model_configs))
