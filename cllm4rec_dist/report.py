"""`cllm4rec report`: baselines, CLLM4Rec and its ablations on one split, one schedule, one table and one plot.

Why a command rather than a notebook: a quality claim is only as good as the
exact command, schedule, split and machine behind it. Running every model from
one invocation on the same preprocessed dataset, with the same metric code and
the same training config, and writing that provenance next to the numbers, is
what makes the rows comparable (and the paper comparison honest).

Seeds. ``--seeds 0,1,2`` trains every model once per seed (``seed`` and ``batch.seed`` both set to it: table
init, data order, reordering, masking; the split is the preprocessed one, the same for all) and reports the
mean ± sample standard deviation over the seeds. A difference between two models' means counts as larger
than the seed noise when |mean_a - mean_b| > 2 * s_pooled, s_pooled = sqrt((s_a^2 + s_b^2) / 2) (the sample
stds over the same number of seeds): a deliberately simple rule that asks a difference to exceed the run-to-run
spread itself. It is a screen, not a significance test: with n seeds the threshold is
sqrt(n/2) * 2 standard errors of the difference (2.45 SE for 3 seeds, where a 5% t-test would need about 2.8),
and it does not shrink as seeds are added. Deterministic models (most-popular, EASE) have std 0.

Outputs in ``--out REPORT_DIR``:

* ``report.md``   Markdown table (valid / test Recall@20, Recall@40, NDCG@100, wall time; mean ± std over seeds),
  the pairwise differences against the seed noise, and provenance;
* ``recall20.png`` validation Recall@20 per finetuning epoch of each CLLM4Rec variant (mean over seeds), baselines
  (and LLM-PreRec, which has no finetuning epochs) as horizontal lines;
* ``report.json`` everything above, machine-readable;
* ``runs/<model>/seed-<s>/`` each model's own run folder per seed (CLLM4Rec: metrics.json, train_log.jsonl, ...;
  baselines: result.json).

With ``recommender: allmrec`` (a leave-one-out dataset) the same command reports A-LLMRec and the candidate
baselines instead (``report_candidates.py``), with this module's seed statistics and noise rule.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time

from cllm4rec_dist.train.config import TrainConfig, add_config_arguments, config_from_args

BASELINES = ("popular", "ease", "multivae", "content-knn")
# report model name -> (display name, TrainConfig.ablation)
VARIANTS: dict[str, tuple[str, str]] = {
    "cllm4rec": ("CLLM4Rec", "none"),
    "cf": ("LLM-CF", "cf"),
    "prerec": ("LLM-PreRec", "prerec"),
    "fixord": ("LLM-FixOrd", "fixord"),
    "ftall": ("LLM-FtAll", "ftall"),
    "scratch": ("LLM-Scratch", "scratch"),
}
DISPLAY = {"popular": "Most-popular", "ease": "EASE", "multivae": "Multi-VAE", "content-knn": "Content kNN",
           **{k: v[0] for k, v in VARIANTS.items()}}
DEFAULT_MODELS = ("popular", "ease", "multivae", "cllm4rec", "cf", "prerec", "fixord")
# recommender: allmrec (a leave-one-out dataset) reports these instead (report_candidates.py)
CANDIDATE_MODELS = ("popular", "sasrec", "gru4rec", "allmrec")
METRICS = ("recall@20", "recall@40", "ndcg@100")
# the cold-item slices (eval.metrics.COLD_SLICES), present on a dataset with cold items
COLD_METRICS = ("cold/recall@20", "cold_only/recall@20", "cold_only_random/recall@20")


# ---- running the models ------------------------------------------------------------------------


def parse_models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    known = list(dict.fromkeys([*DISPLAY, *CANDIDATE_MODELS]))
    unknown = [m for m in models if m not in known]
    if unknown or not models:
        raise ValueError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(models))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def parse_model_config(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path or name not in DISPLAY:
        raise ValueError(f"--model-config {text!r}: expected NAME=PATH with NAME one of {', '.join(DISPLAY)}")
    return name, path


def load_model_config(name: str, path: str, cfg: TrainConfig) -> TrainConfig | dict:
    """Model ``name``'s tuned config (the best.yaml `cllm4rec tune` wrote) for this report: a CLLM4Rec variant's
    training config (the report's output folder kept) or a baseline's settings; tuned on the report's data."""
    from cllm4rec_dist.train.config import ConfigError, config_from_dict, read_yaml_settings

    values = read_yaml_settings(path)
    if name == "popular":
        raise ConfigError(f"--model-config popular={path}: most-popular has no settings to tune.")
    if name in BASELINES:
        if values.get("baseline") != name or not isinstance(values.get("settings"), dict):
            raise ConfigError(f"{path}: not a tuned {name} (expected 'baseline: {name}' and a 'settings' mapping, "
                              f"as `cllm4rec tune` with 'model: {name}' writes).")
        own, data = dict(values["settings"]), values.get("data")
    else:
        if "baseline" in values:
            raise ConfigError(f"{path}: holds {values['baseline']} settings, not a training config for {name}.")
        own = config_from_dict({k: v for k, v in values.items() if k != "out"}, path)
        if own.ablation != VARIANTS[name][1]:
            raise ConfigError(f"{path}: tuned with ablation={own.ablation!r}, but {name} runs with "
                              f"ablation={VARIANTS[name][1]!r}; pass the best.yaml tuned for {name}.")
        own.out, data = cfg.out, own.data
    if os.path.abspath(str(data)) != os.path.abspath(cfg.data):
        raise ConfigError(f"{path}: tuned on {data}, but this report runs on {cfg.data}; a comparison needs every "
                          "model tuned on the report's dataset.")
    return own


def seeded(cfg: TrainConfig, seed: int) -> TrainConfig:
    """``cfg`` trained with ``seed``: the table init and the data order/reordering/masking both follow it."""
    out = copy.deepcopy(cfg)
    out.seed = out.batch.seed = seed
    return out


def fresh_dir(path: str) -> str:
    """The model's run folder, emptied: a stale checkpoint there would otherwise be resumed."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


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
    from cllm4rec_dist.train.reference import run_reference

    variant = copy.deepcopy(cfg)
    variant.ablation = VARIANTS[name][1]
    variant.out = run_dir
    variant.resume = False
    result = run_reference(variant.validate())
    if "test" not in result:
        raise RuntimeError(f"{name}: training stopped before testing ({result.get('stopped')}); "
                           "raise max_steps or set it to 0")
    return {"kind": "cllm4rec", "ablation": variant.ablation, "valid": result["valid"], "test": result["test"],
            "best": result["best"], "history": result["history"], "global_step": result["global_step"],
            "train_seconds": result.get("seconds")}


# Settings a model does not read: a finished run is reused whatever they were (LLM-CF has no content LLM and
# no MR, so one LLM-CF run serves reports that differ only in how MR is weighted).
UNUSED_SETTINGS = {"cf": (("model", "lambda_c"), ("model", "mr_reduction"), ("schedule", "warmup_mr"))}


def settings_key(cfg: TrainConfig, name: str | None = None, tuned: dict | None = None) -> str:
    """What a finished run of model ``name`` must have been run with to be reused: the whole config but the
    output folder and the settings ``name`` does not read (+ a baseline's tuned settings)."""
    values = dataclasses.asdict(cfg)
    values.pop("out")
    for section, key in UNUSED_SETTINGS.get(name, ()):
        values[section].pop(key)
    if tuned:
        values["tuned_baseline_settings"] = tuned
    return json.dumps(values, sort_keys=True)


def load_finished(name: str, run_dir: str, cfg: TrainConfig, tuned: dict | None = None) -> dict | None:
    """A previous report's finished run of ``name`` with the same settings (for --reuse), or None."""
    path = os.path.join(run_dir, "entry.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        entry = json.load(f)
    if entry.get("settings_key") != settings_key(cfg, name, tuned):
        print(f"[report] {name}: {run_dir} was run with other settings; running it again", flush=True)
        return None
    return {**entry, "run_dir": run_dir, "reused": True}


def run_one(name: str, cfg: TrainConfig, run_dir: str, multivae_epochs: int | None, reuse: bool,
            tuned: dict | None = None) -> dict:
    """One model with one seed's config, in ``run_dir`` (or its finished run there, with ``reuse``); ``tuned``:
    a baseline's settings from `cllm4rec tune` (CLLM4Rec variants get theirs in ``cfg``)."""
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
    entry.update(model=name, display=DISPLAY[name], seed=cfg.seed, run_dir=run_dir,
                 seconds=round(time.time() - start, 2), settings_key=settings_key(cfg, name, tuned))
    with open(os.path.join(run_dir, "entry.json"), "w", encoding="utf-8") as f:
        json.dump(entry, f, indent=1)
    print(f"[report] {name} seed {cfg.seed}: valid R@20 {fmt(entry['valid'].get('recall@20'))} "
          f"test R@20 {fmt(entry['test'].get('recall@20'))} in {entry['seconds']:.0f}s", flush=True)
    gc.collect()
    return {k: v for k, v in entry.items() if k != "settings_key"}


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(name: str, runs: list[dict]) -> dict:
    """A model's entry over its seeds: per-metric means (``valid``/``test``) and stds, and the per-seed runs."""
    entry = {"model": name, "display": DISPLAY[name], "kind": runs[0]["kind"], "seeds": [r["seed"] for r in runs],
             "runs": runs, "run_dir": os.path.dirname(runs[0]["run_dir"]),
             "seconds": round(sum(r["seconds"] for r in runs), 2),
             "seconds_per_seed": round(sum(r["seconds"] for r in runs) / len(runs), 2),
             "reused": all(r.get("reused") for r in runs)}
    for part in ("valid", "test"):
        shown = [*METRICS, *(m for m in COLD_METRICS if any(r[part].get(m) is not None for r in runs))]
        stats = {m: mean_std([r[part].get(m) for r in runs]) for m in shown}
        entry[part] = {m: stats[m][0] for m in shown}
        entry[f"{part}_std"] = {m: stats[m][1] for m in shown}
    if "ablation" in runs[0]:
        entry["ablation"] = runs[0]["ablation"]
    return entry


def run_models(models: list[str], cfg: TrainConfig, report_dir: str, multivae_epochs: int | None,
               reuse: bool = False, seeds: list[int] | None = None,
               tuned: dict[str, TrainConfig | dict] | None = None) -> dict[str, dict]:
    """Every model once per seed; each model's entry holds the per-seed runs and their mean ± std. ``tuned``:
    per model, its config from `cllm4rec tune` (a TrainConfig for a CLLM4Rec variant, settings for a baseline)."""
    seeds = seeds or [cfg.seed]
    tuned = tuned or {}
    entries: dict[str, dict] = {}
    for name in models:
        own = tuned.get(name)
        model_cfg = own if isinstance(own, TrainConfig) else cfg
        runs = [run_one(name, seeded(model_cfg, seed), os.path.join(report_dir, "runs", name, f"seed-{seed}"),
                        multivae_epochs, reuse, own if isinstance(own, dict) else None) for seed in seeds]
        entries[name] = summarize(name, runs)
    return entries


def exceeds_seed_noise(a: dict, b: dict, part: str, metric: str) -> dict | None:
    """Difference of two models' means on ``part``/``metric`` against the seed-noise threshold
    2 * sqrt((s_a^2 + s_b^2) / 2) (module docstring); None when a value is missing."""
    mean_a, mean_b = a[part].get(metric), b[part].get(metric)
    std_a, std_b = a[f"{part}_std"].get(metric), b[f"{part}_std"].get(metric)
    if None in (mean_a, mean_b, std_a, std_b):
        return None
    threshold = 2 * math.sqrt((std_a ** 2 + std_b ** 2) / 2)
    diff = mean_a - mean_b
    return {"a": a["model"], "b": b["model"], "part": part, "metric": metric, "difference": diff,
            "threshold": threshold, "exceeds": abs(diff) > threshold}


DIFFERENCE_COLUMNS = (("valid", "recall@20"), ("test", "recall@20"), ("test", "recall@40"), ("test", "ndcg@100"))


def differences(entries: dict[str, dict]) -> list[dict]:
    """Every pair of models, on validation Recall@20 and the three test metrics."""
    return [d for a, b in itertools.combinations(entries.values(), 2) for part, metric in DIFFERENCE_COLUMNS
            if (d := exceeds_seed_noise(a, b, part, metric)) is not None]


# ---- provenance ----------------------------------------------------------------------------------


def machine_info(cfg: TrainConfig) -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu"}
    if torch.cuda.is_available() and cfg.dist.use_gpu:
        info["device"] = f"cuda ({torch.cuda.get_device_name()})"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        info["cpu_model"] = None
    return info


def code_info() -> dict:
    """The commit the numbers come from, and whether the working tree had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def backbone_info(cfg: TrainConfig) -> dict:
    from cllm4rec_dist.corpus.shards import ShardedDataset

    recorded = ShardedDataset(cfg.data).manifest["backbone"]
    return {"used": cfg.backbone or recorded["path"], "gguf_file": None if cfg.backbone else recorded.get("gguf_file"),
            "dataset_tokenised_with": recorded.get("spec") or recorded["path"], "precision": cfg.model.precision}


def dataset_info(data: str) -> dict:
    from cllm4rec_dist.corpus.shards import ShardedDataset

    m = ShardedDataset(data).manifest
    return {"path": os.path.abspath(data) if "://" not in data else data, "name": m.get("name"),
            "num_users": m["num_users"], "num_items": m["num_items"], "content_hash": m.get("content_hash"),
            "docs": {k: v["num_docs"] for k, v in m["corpora"].items()}}


# ---- rendering -----------------------------------------------------------------------------------


def fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def fmt_stat(mean, std, seeds: int) -> str:
    return fmt(mean) if seeds < 2 or mean is None else f"{mean:.4f} ± {std:.4f}"


def difference_lines(report: dict, columns=DIFFERENCE_COLUMNS, display=DISPLAY.__getitem__) -> list[str]:
    """The Markdown table of ``report["differences"]``: a row per pair, a (part, metric) column each."""
    if len(report["seeds"]) < 2:
        return []
    head = [f"{part} {name}" for part, name in columns]
    lines = ["## Differences against the seed noise", "",
             f"Each cell: mean(a) − mean(b) over {len(report['seeds'])} seeds, and the noise threshold "
             "2·sqrt((s_a² + s_b²)/2) (s = sample std over the seeds; 0 for deterministic models); **bold** = "
             "larger than the threshold.", "",
             "| a | b | " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * len(head)]
    by_pair: dict[tuple[str, str], dict] = {}
    for d in report["differences"]:
        by_pair.setdefault((d["a"], d["b"]), {})[(d["part"], d["metric"])] = d
    for (a, b), cells in by_pair.items():
        shown = []
        for column in columns:
            d = cells.get(column)
            text = "—" if d is None else f"{d['difference']:+.4f} ({d['threshold']:.4f})"
            shown.append(f"**{text}**" if d is not None and d["exceeds"] else text)
        lines.append(f"| {display(a)} | {display(b)} | " + " | ".join(shown) + " |")
    return lines + [""]


def markdown(report: dict) -> str:
    cfg = report["config"]
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
    lines += ["", f"Total wall time: {report['seconds']:.1f} s. Validation picks the best finetuning epoch by "
              f"{cfg['eval']['select_on']} (baselines: their own grid / epoch); test is scored once on that model.",
              "", *difference_lines(report),
              "## Command", "", "```bash", report["command"], "```", "",
              *tuned_lines(report),
              "## Schedule and optimisation (every CLLM4Rec variant without a tuned config; the ablation switch "
              "is the only difference)", "",
              "```yaml", yaml_text({k: cfg[k] for k in ("seed", "schedule", "optim", "batch", "model", "eval")}),
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
    lines = ["## Tuned configurations (`cllm4rec tune`, selected on validation)", ""]
    shared = report["config"]
    for name, item in tuned.items():
        own = item["config"]
        if name in BASELINES:
            shown = {k: v for k, v in own.items() if k in ("lambdas", "lr", "dropout", "beta_max", "batch_size",
                                                          "hidden_dim", "latent_dim", "epochs", "weight_decay")}
        else:
            shown = {f"{section}.{k}": v for section in ("model", "batch", "schedule", "optim")
                     for k, v in own[section].items() if v != shared[section].get(k)}
        lines.append(f"* {DISPLAY[name]}: `{item['path']}`: {json.dumps(shown)}")
    return lines + [""]


def mean_curve(entry: dict) -> list[tuple[int, float]]:
    """(finetuning epoch, validation Recall@20 averaged over the seeds that have it)."""
    per_epoch: dict[int, list[float]] = {}
    for run in entry.get("runs", []):
        for h in run.get("history", []):
            if h.get("phase") == "finetune" and h.get("recall@20") is not None:
                per_epoch.setdefault(h["epoch"] + 1, []).append(h["recall@20"])
    return [(epoch, sum(v) / len(v)) for epoch, v in sorted(per_epoch.items())]


def yaml_text(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False).rstrip()


def plot(report: dict, path: str) -> None:
    """Validation Recall@20 per finetuning epoch for the CLLM4Rec variants; flat lines for the rest."""
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
        if entry["kind"] == "cllm4rec" and curve:
            xs, ys = zip(*curve)
            max_epoch = max(max_epoch, max(xs))
            ax.plot(xs, ys, marker="o", markersize=3, color=next(colors), label=entry["display"])
        elif r20 is not None:
            style = "--" if entry["kind"] == "cllm4rec" else ":"  # PreRec dashed, baselines dotted
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


# ---- the command -----------------------------------------------------------------------------------


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
    report["differences"] = differences(report["models"])
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    report["seconds"] = round(time.time() - t0, 2)
    report["files"] = {name: os.path.join(report_dir, name) for name in ("report.md", "recall20.png", "report.json")}
    plot(report, report["files"]["recall20.png"])
    with open(report["files"]["report.md"], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    with open(report["files"]["report.json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    return report


def add_arguments(p) -> None:
    p.description = ("Run the baselines and CLLM4Rec + ablations (LLM-CF = cf, LLM-PreRec = prerec, LLM-FixOrd = "
                     "fixord) on one preprocessed dataset with one training config, and write REPORT_DIR/report.md, "
                     "recall20.png and report.json (runs under REPORT_DIR/runs/<model>). --out is the report folder; "
                     "every training setting is a --config key or --section.field flag (--ablation is set per model).")
    p.add_argument("--models", type=parse_models, default=None,
                   help=f"comma-separated, from {', '.join(DISPLAY)} (default: {','.join(DEFAULT_MODELS)}); with "
                        f"recommender: allmrec (a leave-one-out dataset) from {', '.join(CANDIDATE_MODELS)} "
                        "(default: popular,allmrec; each A-LLMRec run also reports its stage-0 CF model and the "
                        "titles-only LLM)")
    p.add_argument("--multivae-epochs", type=int, default=None, help="Multi-VAE training epochs (default: its own)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: every model runs once per seed (seed and "
                        "batch.seed), the table shows mean ± std and which differences exceed the seed noise "
                        "(default: --seed alone)")
    p.add_argument("--model-config", dest="model_configs", type=parse_model_config, action="append", default=[],
                   metavar="NAME=PATH",
                   help="a model's own config, the best.yaml `cllm4rec tune` wrote for it (repeatable): CLLM4Rec "
                        "variants train with it instead of the shared config, baselines take its settings")
    p.add_argument("--reuse", action="store_true",
                   help="keep models already finished in REPORT_DIR/runs (runs/<model>/entry.json) instead of rerunning")
    add_config_arguments(p)


def command_line(args) -> str:
    """The command as typed when run from the console script, else rebuilt from the parsed flags (tests, main(argv))."""
    if sys.argv[1:2] == ["report"]:
        return shlex.join(["cllm4rec", *sys.argv[1:]])
    from cllm4rec_dist.train.config import _walk

    parts = ["cllm4rec", "report"]
    if getattr(args, "config", None):
        parts += ["--config", args.config]
    parts += [item for name, _, _ in _walk(TrainConfig) if name in vars(args)
              for item in (f"--{name}", str(vars(args)[name]))]
    if args.models:
        parts += ["--models", ",".join(args.models)]
    if args.multivae_epochs is not None:
        parts += ["--multivae-epochs", str(args.multivae_epochs)]
    if args.seeds:
        parts += ["--seeds", ",".join(map(str, args.seeds))]
    for name, path in args.model_configs:
        parts += ["--model-config", f"{name}={path}"]
    if args.reuse:
        parts.append("--reuse")
    return shlex.join(parts)


def run(args) -> int:
    from cllm4rec_dist.train.config import read_yaml_settings

    in_file = read_yaml_settings(args.config) if getattr(args, "config", None) else {}
    if not all(name in vars(args) or name in in_file for name in ("data", "out")):
        print("error: cllm4rec report needs --data DIR and --out REPORT_DIR (flags or keys of --config)",
              file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    report_dir = cfg.out
    command = command_line(args)
    if cfg.recommender == "allmrec":
        from cllm4rec_dist import report_candidates

        if args.multivae_epochs is not None or args.model_configs:
            print("error: --multivae-epochs and --model-config do not apply to recommender: allmrec", file=sys.stderr)
            return 2
        report = report_candidates.build_report(cfg, args.models or list(report_candidates.DEFAULT_MODELS),
                                                report_dir, command, args.reuse, args.seeds)
        print(report_candidates.markdown(report).split("\n## Command")[0])
        print(f"wrote {', '.join(report['files'].values())}")
        return 0
    models = args.models or list(DEFAULT_MODELS)
    unknown = [m for m in models if m not in DISPLAY]
    if unknown:
        print(f"error: --models {','.join(unknown)} need recommender: allmrec (a leave-one-out dataset); "
              f"with recommender: cllm4rec choose from {', '.join(DISPLAY)}", file=sys.stderr)
        return 2
    report = build_report(cfg, models, report_dir, command, args.multivae_epochs, args.reuse, args.seeds,
                          dict(args.model_configs))
    print(markdown(report).split("\n## Command")[0])
    print(f"wrote {', '.join(report['files'].values())}")
    return 0
