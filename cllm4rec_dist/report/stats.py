"""What both report protocols share: seed statistics, the seed-noise rule, provenance and Markdown helpers.

Seeds. ``--seeds 0,1,2`` trains every model once per seed (``seed`` and ``batch.seed`` both set to it: table
init, data order, reordering, masking; the split is the preprocessed one, the same for all) and reports the
mean ± sample standard deviation over the seeds. A difference between two models' means counts as larger
than the seed noise when |mean_a - mean_b| > 2 * s_pooled, s_pooled = sqrt((s_a^2 + s_b^2) / 2) (the sample
stds over the same number of seeds): a deliberately simple rule that asks a difference to exceed the run-to-run
spread itself. It is a screen, not a significance test: with n seeds the threshold is
sqrt(n/2) * 2 standard errors of the difference (2.45 SE for 3 seeds, where a 5% t-test would need about 2.8),
and it does not shrink as seeds are added. Deterministic models (most-popular, EASE) have std 0.

Knows no protocol and no model: imports neither protocol module (``full_ranking``, ``candidates``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform

# ---- statistics --------------------------------------------------------------------------------------


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


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


def differences(entries: dict[str, dict], columns) -> list[dict]:
    """Every pair of entries (models, or rows) on each (part, metric) of ``columns``, against the seed noise."""
    return [d for a, b in itertools.combinations(entries.values(), 2) for part, metric in columns
            if (d := exceeds_seed_noise(a, b, part, metric)) is not None]


# ---- provenance ----------------------------------------------------------------------------------


def machine_info(cfg) -> dict:
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

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def backbone_info(cfg) -> dict:
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


def yaml_text(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False).rstrip()


def difference_lines(report: dict, columns, display=None) -> list[str]:
    """The Markdown table of ``report["differences"]``: a row per pair, a (part, metric) column each; ``display``
    names an entry (default: its ``display`` in ``report["models"]``)."""
    if len(report["seeds"]) < 2:
        return []
    if display is None:
        def display(name: str) -> str:
            return report["models"][name]["display"]
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


def write_report(report: dict, report_dir: str, markdown, plots: dict | None = None) -> dict:
    """Record the report's files in ``report["files"]`` (report.md, each plot, report.json), draw each plot
    (``plots``: file name -> ``draw(report, path)``), then write report.md (``markdown(report)``) and report.json
    last; returns ``report``."""
    plots = plots or {}
    report["files"] = {name: os.path.join(report_dir, name) for name in ("report.md", *plots, "report.json")}
    for name, draw in plots.items():
        draw(report, report["files"][name])
    with open(report["files"]["report.md"], "w", encoding="utf-8") as f:
        f.write(markdown(report))
    with open(report["files"]["report.json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    return report

