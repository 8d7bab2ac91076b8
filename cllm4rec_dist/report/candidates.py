"""`cllm4rec report`, stored-candidates protocol (a leave-one-out dataset): a recommender's runs and the
candidate baselines, one table.

When the config's recommender is scored on stored candidates (its ``protocol``: A-LLMRec), ``cllm4rec report``
runs (``--models``, default: most-popular and the recommender's variants):

* each variant of the recommender (A-LLMRec: ``allmrec``): one ``cllm4rec train`` run per seed
  (``REPORT/runs/<variant>/seed-S``). Each run holds several rows: the stage-0 CF model (``cf/sasrec``) and what
  its evaluation scores on the stored candidates (``llm/allmrec``, ``llm/titles_only``: the same prompt without
  soft tokens, and ``llm/sasrec``: the frozen CF model scored again, a consistency check that equals stage 0);
* ``sasrec`` / ``gru4rec``: the CF model trained alone with the recommender section's stage-0 settings, per seed;
* ``popular``: train counts, deterministic (one run, std 0).

Per row and part (valid, test): Hit@1 (scored: candidate ranking by each answer's length-normalised
log-likelihood for the LLM rows), Hit@1 of the generated answer, the share of generated answers naming no
candidate, NDCG@10, and the slices cold items / warm items / cold users (thresholds: the recommender's section,
``eval/candidates.py``), as mean ± sample std over the seeds, plus the wall time of each stage. Which
differences exceed the seed noise uses the shared rule (``stats.exceeds_seed_noise``).

``--reuse`` keeps a finished run folder of a variant whose ``config.yaml`` is the report's config with that
seed (so runs started by hand with ``cllm4rec train --seed S --batch.seed S --out REPORT/runs/<variant>/seed-S``
count), and finished baseline runs with the same settings (their ``entry.json``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time

from cllm4rec_dist.config import TrainConfig
from cllm4rec_dist.recommenders import recommender
from cllm4rec_dist.report.runs import fresh_dir, saved_config, seeded, settings_key, with_variant
from cllm4rec_dist.report.stats import (
    code_info,
    dataset_info,
    difference_lines,
    differences,
    fmt_stat,
    machine_info,
    mean_std,
    write_report,
    yaml_text,
)
from cllm4rec_dist.settings import ConfigError

PROTOCOL = "candidates"
DATASET = "a leave-one-out dataset"
"""The kind of dataset this protocol needs (`cllm4rec preprocess --split leave-one-out`)."""
OPTIONS = ()
"""The protocol-specific flags of `cllm4rec report` (argparse dests) this protocol reads: none."""
BASELINES = ("popular", "sasrec", "gru4rec")
NOT_BY_DEFAULT = ("sasrec", "gru4rec")
"""Models run only when --models names them."""
DETERMINISTIC = ("popular",)
"""Baselines run once (not per seed)."""
PARTS = ("valid", "test")
METRICS = ("hit@1", "hit@1_generated", "no_candidate_share", "ndcg@10")
SLICES = ("cold_items", "warm_items", "cold_users")
SLICE_METRICS = ("hit@1", "hit@1_generated", "ndcg@10")
NAMES = {"popular": "Most-popular", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "titles_only": "LLM, titles only"}
"""Display names of the baselines and of the rows a run reports besides its own (the variants': the registry)."""
OWN_ROWS = ("titles_only",)
"""Rows of a run's last stage shown under their own name, as the variants' rows are."""
STAGES = {"cf": "stage 0", "llm": "stage 2 evaluation"}
DIFFERENCE_COLUMNS = (("valid", "hit@1"), ("test", "hit@1"), ("test", "hit@1_generated"), ("test", "ndcg@10"),
                      ("test", "cold_items/hit@1"), ("test", "cold_users/hit@1"))


# ---- the models --------------------------------------------------------------------------------


def known_models(rec) -> list[str]:
    """What --models may name with this recommender: the baselines, then its variants."""
    return [*BASELINES, *rec.named_variants()]


def default_models(rec) -> list[str]:
    return [m for m in known_models(rec) if m not in NOT_BY_DEFAULT]


def models_note(rec) -> str:
    return f"; each {rec.title} run also reports its stage-0 CF model and the titles-only LLM"


def refuse_models(rec, unknown: list[str], elsewhere: str | None = None) -> str:
    """The error for --models this recommender cannot report."""
    return (f"--models: {', '.join(unknown)} cannot be reported with recommender: {rec.name}; choose "
            f"from {', '.join(known_models(rec))}")


def flat_metrics(metrics: dict) -> dict:
    """One part's candidate metrics as ``{name: value}``: overall names, ``users``, and ``slice/name``."""
    out = {k: metrics.get(k) for k in ("users", *METRICS)}
    for name in SLICES:
        values = metrics.get("slices", {}).get(name, {})
        out.update({f"{name}/{k}": values.get(k) for k in ("users", *SLICE_METRICS)})
    return out


def display(row: str, rec) -> str:
    """``popular`` -> Most-popular; ``cf/sasrec`` -> SASRec (A-LLMRec stage 0); ``llm/allmrec`` -> A-LLMRec."""
    variants = rec.named_variants()
    names = {**NAMES, rec.name: rec.title, **{name: v.title for name, v in variants.items()}}
    if "/" not in row:
        return names.get(row, row) + ("" if row in DETERMINISTIC else " (alone)")
    stage, model = row.split("/", 1)
    name = names.get(model, model)
    if stage == "cf":
        return f"{name} ({rec.title} {STAGES['cf']})"
    return name if model in (rec.name, *variants, *OWN_ROWS) else f"{name} ({STAGES.get(stage, stage)})"


# ---- running ---------------------------------------------------------------------------------------


def run_rows(metrics: dict) -> dict[str, dict]:
    """Row -> {"valid", "test"} flat metrics from a run's RUN/metrics.json (every stage, every model)."""
    rows = {}
    for stage, models in metrics["stages"].items():
        for model, parts in models.items():
            rows[f"{stage}/{model}"] = {part: flat_metrics(parts[part]) for part in PARTS}
    return rows


def finished_run(run_dir: str, cfg: TrainConfig, name: str | None = None) -> dict | None:
    """The finished run in ``run_dir`` when its config.yaml is ``cfg`` (output folder and resume aside); ``name``
    (default: the recommender's) names it in the console line."""
    metrics_path = os.path.join(run_dir, "metrics.json")
    saved = saved_config(run_dir, cfg)
    if saved is None or not os.path.exists(metrics_path):
        return None
    if settings_key(saved) != settings_key(cfg):
        print(f"[report] {name or cfg.recommender}: {run_dir} was run with other settings; running it again",
              flush=True)
        return None
    with open(metrics_path, encoding="utf-8") as f:
        return json.load(f)


def run_variant(name: str, cfg: TrainConfig, run_dir: str, reuse: bool) -> dict:
    """One seed of the recommender's variant ``name`` (``cllm4rec train`` in ``run_dir``, with the variant's
    settings): its rows and the wall time of each stage."""
    from cllm4rec_dist.reference import run_reference

    variant = recommender(cfg.recommender).named_variants()[name]
    run_cfg = with_variant(cfg, name, variant.settings)
    run_cfg.out = run_dir
    metrics = finished_run(run_dir, run_cfg, name) if reuse else None
    reused = metrics is not None
    if not reused:
        fresh_dir(run_dir)
        print(f"[report] {name} seed {cfg.seed}: running into {run_dir}", flush=True)
        run_cfg.resume = False
        metrics = run_reference(run_cfg.validate())
        if not metrics.get("stages") or "llm" not in metrics["stages"]:
            raise RuntimeError(f"{name}: {run_dir} stopped before its evaluation ({metrics.get('stopped')}); "
                               "raise max_steps or set it to 0")
    else:
        print(f"[report] {name} seed {cfg.seed}: reusing {run_dir}", flush=True)
    rows = run_rows(metrics)
    best_epoch = {f"cf/{m}": v.get("best_epoch") for m, v in metrics["stages"].get("cf", {}).items()}
    if variant.rows is not None:  # a variant's own rows only, under its names (its CF rows are the main variant's)
        rows = {variant.rows[row]: parts for row, parts in rows.items() if row in variant.rows}
        best_epoch = {variant.rows[row]: epoch for row, epoch in best_epoch.items() if row in variant.rows}
    return {"rows": rows, "stage_seconds": metrics.get("seconds", {}), "best_epoch": best_epoch, "reused": reused}


def run_baseline(name: str, cfg: TrainConfig, run_dir: str, reuse: bool) -> dict:
    """Most-popular or a CF model alone (the stage-0 settings of the recommender's section) on the stored
    candidates."""
    from cllm4rec_dist.corpus.sequences import SequentialData

    path = os.path.join(run_dir, "entry.json")
    key = settings_key(cfg)
    if reuse and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
        if entry.pop("settings_key", None) == key:
            print(f"[report] {name}: reusing {run_dir}", flush=True)
            return {**entry, "reused": True}
    fresh_dir(run_dir)
    print(f"[report] {name} seed {cfg.seed}: running into {run_dir}", flush=True)
    data = SequentialData.open(cfg.data)
    start = time.time()
    if name == "popular":
        from cllm4rec_dist.baselines.popular import run_candidates

        result, best_epoch = run_candidates(data), None
    else:
        from cllm4rec_dist.baselines.sequential import CFStage

        section = recommender(cfg.recommender).settings_of(cfg)
        stage = CFStage(data, section.cf_stage_settings(cfg.seed, model=name)).setup()
        result = stage.train()
        best_epoch = result["best_epoch"]
    entry = {"rows": {name: {part: flat_metrics(result[part]) for part in PARTS}},
             "stage_seconds": {"cf": round(time.time() - start, 2)}, "best_epoch": {name: best_epoch},
             "reused": False}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**entry, "settings_key": key}, f, indent=1)
    return entry


def summarize(row: str, runs: list[dict], seeds: list[int | None], rec) -> dict:
    """A row over its seeds: per-metric means and sample stds, wall time per stage, the per-seed values."""
    entry = {"model": row, "display": display(row, rec), "seeds": seeds, "runs": runs,
             "reused": all(r["reused"] for r in runs)}
    for part in PARTS:
        names = list(runs[0][part])
        stats = {m: mean_std([r[part].get(m) for r in runs]) for m in names}
        entry[part] = {m: stats[m][0] for m in names}
        entry[f"{part}_std"] = {m: stats[m][1] for m in names}
    stages = sorted({s for r in runs for s in r["stage_seconds"]}, key=lambda s: ("cf", "align", "llm", "eval").index(s)
                    if s in ("cf", "align", "llm", "eval") else 9)
    entry["stage_seconds"] = {s: mean_std([r["stage_seconds"].get(s) for r in runs]) for s in stages}
    entry["best_epochs"] = [r.get("best_epoch") for r in runs]
    return entry


def run_models(models: list[str], cfg: TrainConfig, report_dir: str, reuse: bool, seeds: list[int]) -> dict:
    """Every model (the deterministic ones once, the rest once per seed); returns row -> summary."""
    rec = recommender(cfg.recommender)
    variants = rec.named_variants()
    per_row: dict[str, list[dict]] = {}
    row_seeds: dict[str, list] = {}
    for name in models:
        for seed in ([None] if name in DETERMINISTIC else seeds):
            seed_cfg = seeded(cfg, seeds[0] if seed is None else seed)
            run_dir = os.path.join(report_dir, "runs", name, "deterministic" if seed is None else f"seed-{seed}")
            out = (run_variant(name, seed_cfg, run_dir, reuse) if name in variants
                   else run_baseline(name, seed_cfg, run_dir, reuse))
            for row, parts in out["rows"].items():
                per_row.setdefault(row, []).append({**parts, "seed": seed, "run_dir": run_dir,
                                                    "stage_seconds": out["stage_seconds"], "reused": out["reused"],
                                                    "best_epoch": out["best_epoch"].get(row)})
                row_seeds.setdefault(row, []).append(seed)
            gc.collect()
    return {row: summarize(row, runs, row_seeds[row], rec) for row, runs in per_row.items()}


# ---- rendering ---------------------------------------------------------------------------------------


def _cell(entry: dict, part: str, metric: str, with_users: bool = False) -> str:
    n = sum(s is not None for s in entry["seeds"])
    text = fmt_stat(entry[part].get(metric), entry[f"{part}_std"].get(metric), n)
    if with_users and "/" in metric:
        users = entry[part].get(metric.split("/")[0] + "/users")
        text += "" if users is None else f" ({users:.0f})"
    return text


def _seconds(entry: dict) -> str:
    parts = []
    for stage, (mean, std) in entry["stage_seconds"].items():
        if mean is not None:
            parts.append(f"{stage} {mean:.0f}" + (f" ± {std:.0f}" if std else ""))
    return ", ".join(parts) or "—"


def markdown(report: dict) -> str:
    seeds, config = report["seeds"], report["config"]
    rec = recommender(config["recommender"])
    lines = [f"# Candidate report (leave-one-out): {report['dataset'].get('name') or report['dataset']['path']}", "",
             f"Mean ± sample std over seeds {', '.join(map(str, seeds))} (Most-popular: deterministic, one run). "
             "Hit@1 = scored (candidates ranked by score / length-normalised log-likelihood); Hit@1 gen. = "
             "greedy generation naming the positive's title; no cand. = share of generated answers naming no "
             "candidate. Slices: Hit@1 (users). Wall time in seconds per stage and seed (a run's cf/align/llm/eval "
             "are shared by its rows).", ""]
    head = ["row", "part", "Hit@1", "Hit@1 gen.", "no cand.", "NDCG@10", "cold items Hit@1", "cold items Hit@1 gen.",
            "warm items Hit@1", "cold users Hit@1", "cold users Hit@1 gen.", "wall s"]
    lines += ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for entry in report["models"].values():
        for part in PARTS:
            cells = [_cell(entry, part, m) for m in METRICS] + [
                _cell(entry, part, m, with_users=True) for m in
                ("cold_items/hit@1", "cold_items/hit@1_generated", "warm_items/hit@1", "cold_users/hit@1",
                 "cold_users/hit@1_generated")]
            lines.append(f"| {entry['display']} | {part} | " + " | ".join(cells) + f" | {_seconds(entry)} |")
    settings = {rec.section: config[rec.section], "model": {"precision": config["model"]["precision"]},
                "backbone": config["backbone"]}
    lines += ["", *difference_lines(report, DIFFERENCE_COLUMNS), "## Command", "", "```bash", report["command"],
              "```", "", "## Settings", "", "```yaml", yaml_text(settings), "```", "",
              "## Data, machine", "",
              f"* dataset: `{report['dataset']['path']}` ({report['dataset']['num_users']} users, "
              f"{report['dataset']['num_items']} items)",
              f"* machine: {report['machine']['cpu_model'] or report['machine']['processor']} "
              f"({report['machine']['cpu_count']} logical CPUs), device {report['machine']['device']}, "
              f"torch {report['machine']['torch']}",
              f"* code: commit {report['code']['commit'] or 'unknown'}"
              + (" with uncommitted changes" if report["code"]["dirty"] else ""),
              f"* started {report['started']}, finished {report['finished']}", ""]
    return "\n".join(lines)


# ---- the report ------------------------------------------------------------------------------------


def build_report(cfg: TrainConfig, models: list[str], report_dir: str, command: str, reuse: bool = False,
                 seeds: list[int] | None = None) -> dict:
    """Run ``models`` on the leave-one-out dataset ``cfg.data`` and write report.md and report.json."""
    rec = recommender(cfg.recommender)
    unknown = [m for m in models if m not in known_models(rec)]
    if unknown:
        raise ConfigError(refuse_models(rec, unknown))
    from cllm4rec_dist.corpus.sequences import SequentialData

    SequentialData.open(cfg.data)  # a random-split dataset fails here, with the fix in the message
    seeds = seeds or [cfg.seed]
    os.makedirs(report_dir, exist_ok=True)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.time()
    report = {"command": command, "models_requested": models, "config": dataclasses.asdict(cfg),
              "dataset": dataset_info(cfg.data), "machine": machine_info(cfg), "code": code_info(),
              "seeds": seeds, "started": started}
    report["models"] = run_models(models, cfg, report_dir, reuse, seeds)
    report["differences"] = differences(report["models"], DIFFERENCE_COLUMNS)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    report["seconds"] = round(time.time() - t0, 2)
    return write_report(report, report_dir, markdown)



def report_from_args(cfg: TrainConfig, models: list[str], command: str, args) -> dict:
    """`cllm4rec report`'s run of this protocol, with the flags it reads."""
    return build_report(cfg, models, cfg.out, command, args.reuse, args.seeds)


__all__ = ["build_report", "flat_metrics", "markdown", "known_models", "default_models", "finished_run"]
