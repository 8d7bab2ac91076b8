"""`cllm4rec report`'s command line: the flags, and the protocol module that runs the report.

The models come from the registry: the protocol module's baselines and the named variants of the config's
recommender (``Recommender.named_variants()``); which module reports them is the recommender's ``protocol``,
never its name.
"""

from __future__ import annotations

import shlex
import sys
from types import ModuleType

from cllm4rec_dist import COMMAND
from cllm4rec_dist.config import TrainConfig, add_config_arguments, config_from_args
from cllm4rec_dist.recommenders import all_recommenders, recommender
from cllm4rec_dist.report import candidates, full_ranking
from cllm4rec_dist.report.runs import parse_seeds
from cllm4rec_dist.settings import _walk, read_yaml_settings

PROTOCOL_MODULES: dict[str, ModuleType] = {module.PROTOCOL: module for module in (full_ranking, candidates)}
"""Recommender.protocol -> the module reporting it (recommenders.PROTOCOLS)."""
PROTOCOL_FLAGS = {"multivae_epochs": "--multivae-epochs", "model_configs": "--model-config"}
"""The flags only some protocols read (their modules' OPTIONS), by argparse dest."""


def protocol_module(rec) -> ModuleType:
    return PROTOCOL_MODULES[rec.protocol]


def default_recommender():
    return recommender(TrainConfig().recommender)


def parse_models(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    known = list(dict.fromkeys(m for rec in all_recommenders() for m in protocol_module(rec).known_models(rec)))
    unknown = [m for m in models if m not in known]
    if unknown or not models:
        raise ValueError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(models))


def models_help() -> str:
    """--models' help: the models of the default recommender, then those of each other one."""
    def choices(rec) -> str:
        module = protocol_module(rec)
        return (f"from {', '.join(module.known_models(rec))} (default: {','.join(module.default_models(rec))}"
                f"{module.models_note(rec)})")

    default = default_recommender()
    return "; ".join([f"comma-separated, {choices(default)}"]
                     + [f"with recommender: {rec.name} ({protocol_module(rec).DATASET}) {choices(rec)}"
                        for rec in all_recommenders() if rec.name != default.name])


def description() -> str:
    rec = default_recommender()
    variants = rec.named_variants()
    ablations = [f"{variants[name].title} = {name}" for name in protocol_module(rec).default_models(rec)
                 if name in variants and name != rec.name]
    keys = dict.fromkeys(f"--{key}" for v in variants.values() for key in v.settings)
    return (f"Run the baselines and {rec.title} + ablations ({', '.join(ablations)}) on one preprocessed dataset "
            "with one training config, and write REPORT_DIR/report.md, recall20.png and report.json (runs under "
            "REPORT_DIR/runs/<model>). --out is the report folder; every training setting is a --config key or "
            f"--section.field flag ({' / '.join(keys)} is set per model).")


def add_arguments(p) -> None:
    p.description = description()
    tuned = " / ".join(rec.title for rec in all_recommenders() if "model_configs" in protocol_module(rec).OPTIONS)
    p.add_argument("--models", type=parse_models, default=None, help=models_help())
    p.add_argument("--multivae-epochs", type=int, default=None, help="Multi-VAE training epochs (default: its own)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: every model runs once per seed (seed and "
                        "batch.seed), the table shows mean ± std and which differences exceed the seed noise "
                        "(default: --seed alone)")
    p.add_argument("--model-config", dest="model_configs", type=full_ranking.parse_model_config, action="append",
                   default=[], metavar="NAME=PATH",
                   help=f"a model's own config, the best.yaml `{COMMAND} tune` wrote for it (repeatable): {tuned} "
                        "variants train with it instead of the shared config, baselines take its settings")
    p.add_argument("--reuse", action="store_true",
                   help="keep models already finished in REPORT_DIR/runs (runs/<model>/entry.json) instead of "
                        "rerunning")
    add_config_arguments(p)


def command_line(args) -> str:
    """The command as typed when run from the console script, else rebuilt from the parsed flags (tests, main(argv))."""
    if sys.argv[1:2] == ["report"]:
        return shlex.join([COMMAND, *sys.argv[1:]])
    parts = [COMMAND, "report"]
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


def elsewhere(rec, models: list[str]) -> str | None:
    """Another recommender that can report all of ``models``, with the dataset it needs, or None."""
    for other in all_recommenders():
        module = protocol_module(other)
        if other.name != rec.name and all(m in module.known_models(other) for m in models):
            return f"recommender: {other.name} ({module.DATASET})"
    return None


def run(args) -> int:
    in_file = read_yaml_settings(args.config) if getattr(args, "config", None) else {}
    if not all(name in vars(args) or name in in_file for name in ("data", "out")):
        print(f"error: {COMMAND} report needs --data DIR and --out REPORT_DIR (flags or keys of --config)",
              file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    rec = recommender(cfg.recommender)
    module = protocol_module(rec)
    command = command_line(args)
    unread = [dest for dest in PROTOCOL_FLAGS if dest not in module.OPTIONS]
    if any(getattr(args, dest) not in (None, []) for dest in unread):
        print(f"error: {' and '.join(PROTOCOL_FLAGS[dest] for dest in unread)} do not apply to recommender: "
              f"{rec.name}", file=sys.stderr)
        return 2
    models = args.models or module.default_models(rec)
    unknown = [m for m in models if m not in module.known_models(rec)]
    if unknown:
        print(f"error: {module.refuse_models(rec, unknown, elsewhere(rec, unknown))}", file=sys.stderr)
        return 2
    report = module.report_from_args(cfg, models, command, args)
    print(module.markdown(report).split("\n## Command")[0])
    print(f"wrote {', '.join(report['files'].values())}")
    return 0
