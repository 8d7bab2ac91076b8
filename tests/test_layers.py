"""Imports point down the data flow: data -> corpus -> model -> train -> eval -> export, never back up.

Every import statement of every module (function-level ones included) is read with ``ast``; an import from a
later layer fails unless the (from, to) package pair is an exception listed below with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cllm4rec_dist"

BASE = ("atomic", "errors", "quiet", "resources")
"""Leaf helpers that every layer may use; they import no layer themselves."""
LAYERS = ("data", "corpus", "model", "train", "eval", "baselines", "export")
"""The data flow, in order. The baselines are recommenders scored by eval/ (and trained by train/cf_stage.py)."""
ENTRY_POINTS = ("cli", "evaluate_run", "launch", "tune", "tune_scheduler", "report", "report_candidates")
"""Commands on top of everything (and tune_scheduler, the part of `cllm4rec tune` that Ray Tune pickles): they
may import any layer; no layer imports them."""
EXCEPTIONS = {
    ("train", "eval"): "validation during training: the trainers select their best model with the one evaluation "
                       "code (eval/ never imports train/, checked below)",
}


def rank_of(part: str) -> int:
    if part in BASE:
        return -1
    if part in LAYERS:
        return LAYERS.index(part)
    if part in ENTRY_POINTS:
        return len(LAYERS)
    raise AssertionError(f"cllm4rec_dist/{part}: not placed in a layer; add it to tests/test_layers.py")


def imported_modules(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every cllm4rec_dist import in the file (or in ``text`` placed there),
    relative ones resolved, in source order."""
    own = ("cllm4rec_dist", *path.relative_to(PACKAGE).with_suffix("").parts)
    package = own if path.name == "__init__.py" else own[:-1]
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text)
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))),
                       key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            if module == "cllm4rec_dist":  # `from cllm4rec_dist import report`: the names are modules
                out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, module))
    return [(line, name) for line, name in out if name.split(".")[0] == "cllm4rec_dist"]


def backward_imports() -> tuple[list[str], set[tuple[str, str]]]:
    """The imports from a later layer (outside EXCEPTIONS), and the (from, to) pairs of the excepted ones used."""
    found, excepted = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if source == "__init__":
            continue
        for line, name in imported_modules(path):
            target = name.split(".")[1] if "." in name else source
            if target == source or rank_of(target) <= rank_of(source):
                continue
            if (source, target) in EXCEPTIONS:
                excepted.add((source, target))
            else:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source}/ imports {name} ({target}/ is a "
                             "later layer)")
    return found, excepted


def test_imports_point_down_the_data_flow():
    found, excepted = backward_imports()
    assert not found, "\n".join(found)
    # every listed exception is still needed (a stale one would hide nothing, but says something untrue)
    assert excepted == set(EXCEPTIONS)
    # an exception is one-way: the later layer never imports the earlier one back
    for source, target in EXCEPTIONS:
        for path in sorted((PACKAGE / target).rglob("*.py")):
            assert not any(name.startswith(f"cllm4rec_dist.{source}.") for _, name in imported_modules(path)), path


def test_the_check_sees_relative_function_level_and_package_imports():
    """The checker itself: backward imports written each way are found and resolved (the test above can fail)."""
    probe = ("from .ids import TokenSpace\n"
             "def late():\n"
             "    from ..model import presets\n"
             "    from ..eval.metrics import finalize\n"
             "    import cllm4rec_dist.export.embeddings\n"
             "    from cllm4rec_dist import report\n")
    names = [name for _, name in imported_modules(PACKAGE / "corpus" / "shards.py", probe)]
    assert names == ["cllm4rec_dist.corpus.ids", "cllm4rec_dist.model", "cllm4rec_dist.eval.metrics",
                     "cllm4rec_dist.export.embeddings", "cllm4rec_dist.report"]
