"""The structure of the package, checked from its source: imports point down the data flow, no import cycles, and no
module outside a recommender's own folder (and the registry) names a recommender.

Every import statement of every module (function-level ones included) is read with ``ast``. The layers, bottom to
top: the base helpers; data -> corpus -> model -> train -> eval -> baselines -> export (the shared machinery, which
knows no model); recommenders/ (one folder per model and the registry that finds them by name); config.py (the
training config: the shared sections plus each registered model's); the commands and runtimes on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cllm4rec_dist.recommenders import REGISTRY, all_recommenders

PACKAGE = Path(__file__).resolve().parents[1] / "cllm4rec_dist"

BASE = ("__init__", "atomic", "errors", "quiet", "resources", "settings")
"""Leaf helpers that every layer may use; they import no layer themselves (``settings``: the generic YAML/flag
machinery of every config class)."""
LAYERS = ("data", "corpus", "model", "train", "eval", "baselines", "export", "recommenders", "config")
"""The data flow, in order. The baselines are recommenders scored by eval/; recommenders/ holds the models."""
ENTRY_POINTS = ("cli", "evaluate_run", "export_run", "launch", "distributed", "ray_local", "ray_warm", "reference",
                "tune", "tune_scheduler", "report")
"""Commands and runtimes on top of everything (the Ray / torchrun workers, the single-process trainer, `cllm4rec
tune`'s Ray Tune parts): they may import any layer; no layer imports them."""
TYPE_ONLY = "TYPE_CHECKING"
"""Imports under ``if TYPE_CHECKING:`` are annotations only (never run): a recipe names the training config's type
that way, and they are not dependencies."""
NAME_EXCEPTIONS = {
    ("__init__.py", "cllm4rec"): "COMMAND: the command-line program's name, which happens to be a model's name too",
}


def rank_of(part: str) -> int:
    if part in BASE:
        return -1
    if part in LAYERS:
        return LAYERS.index(part)
    if part in ENTRY_POINTS:
        return len(LAYERS)
    raise AssertionError(f"cllm4rec_dist/{part}: not placed in a layer; add it to tests/test_layers.py")


def _type_only_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == TYPE_ONLY:
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imported_modules(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every cllm4rec_dist import in the file (or in ``text`` placed there),
    relative ones resolved, in source order; type-only imports left out."""
    own = ("cllm4rec_dist", *path.relative_to(PACKAGE).with_suffix("").parts)
    package = own if path.name == "__init__.py" else own[:-1]
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text)
    type_only = _type_only_nodes(tree)
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))),
                       key=lambda n: (n.lineno, n.col_offset)):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            if module == "cllm4rec_dist" or module == "cllm4rec_dist.recommenders":
                # `from cllm4rec_dist import report`: a name may be a module
                for alias in node.names:
                    candidate = PACKAGE.joinpath(*module.split(".")[1:], alias.name)
                    is_module = candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists()
                    out.append((node.lineno, f"{module}.{alias.name}" if is_module else module))
            else:
                out.append((node.lineno, module))
    return [(line, name) for line, name in out if name.split(".")[0] == "cllm4rec_dist"]


def modules() -> list[tuple[Path, str]]:
    """(path, dotted module name) of every module of the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("cllm4rec_dist", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        out.append((path, name))
    return out


def backward_imports() -> list[str]:
    """The imports from a later layer."""
    found = []
    for path, _ in modules():
        source = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for line, name in imported_modules(path):
            target = name.split(".")[1] if "." in name else "__init__"
            if target == source or rank_of(target) <= rank_of(source):
                continue
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {name} (a later layer)")
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module in the import graph (function-level imports included)."""
    known = {name for _, name in modules()}
    graph: dict[str, set[str]] = {}
    for path, name in modules():
        targets = set()
        for _, imported in imported_modules(path):
            while imported not in known and "." in imported:  # `from pkg.mod import name` -> pkg.mod
                imported = imported.rsplit(".", 1)[0]
            if imported in known and imported != name:
                targets.add(imported)
        graph[name] = targets
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def model_names_outside_their_folder() -> list[str]:
    """Code (not docstrings) outside recommenders/<name>/ that names a registered recommender: a string equal to its
    name, an import of its folder, or its own config section (one only it reads; the shared `model` section is
    excepted). The registry (recommenders/__init__.py) maps the names to the folders."""
    recs = all_recommenders()
    names = set(REGISTRY)
    sections = {rec.section: rec.name for rec in recs if rec.section != "model"}
    found = []
    for path, _ in modules():
        rel = path.relative_to(PACKAGE)
        owner = rel.parts[1] if rel.parts[0] == "recommenders" and len(rel.parts) > 2 else None
        if rel.parts == ("recommenders", "__init__.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)
                      and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
        for node in ast.walk(tree):
            hit = None
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and id(node) not in docstrings and node.value != owner
                    and (str(rel), node.value) not in NAME_EXCEPTIONS):
                hit = f"the string {node.value!r}"
            elif isinstance(node, ast.Attribute) and node.attr in sections and sections[node.attr] != owner:
                hit = f"the config section .{node.attr} (of {sections[node.attr]})"
            if hit:
                found.append(f"{rel}:{node.lineno}: {hit}")
        for line, name in imported_modules(path):
            parts = name.split(".")
            if len(parts) > 2 and parts[1] == "recommenders" and parts[2] in names and parts[2] != owner:
                found.append(f"{rel}:{line}: imports {name}")
    return found


def test_imports_point_down_the_data_flow():
    found = backward_imports()
    assert not found, "\n".join(found)


def test_no_import_cycles():
    assert not import_cycles(), import_cycles()


def test_no_module_outside_its_folder_names_a_recommender():
    found = model_names_outside_their_folder()
    assert not found, "\n".join(found)


def test_every_registered_recommender_is_complete():
    """Each registry entry resolves: its folder, settings section on the training config, recipe with the entry
    points' interface, and the hooks it names."""
    from cllm4rec_dist.config import TrainConfig

    cfg = TrainConfig()
    for rec in all_recommenders():
        assert (PACKAGE / "recommenders" / rec.name / "__init__.py").exists()
        assert isinstance(rec.settings_of(cfg), rec.settings)
        recipe = rec.recipe_class()
        for method in ("setup", "train", "save_checkpoint"):
            assert callable(getattr(recipe, method)), (rec.name, method)
        assert callable(rec.load(rec.checks))
        assert callable(rec.load_module("export").export_tables)
        if rec.evaluate is not None:
            assert callable(rec.load(rec.evaluate))


def test_the_checks_can_fail():
    """The checkers themselves: backward imports written each way are found and resolved, a cycle is seen, and a
    model's name outside its folder is caught."""
    probe = ("from .ids import TokenSpace\n"
             "def late():\n"
             "    from ..model import presets\n"
             "    from ..eval.metrics import finalize\n"
             "    import cllm4rec_dist.export.embeddings\n"
             "    from cllm4rec_dist import report\n"
             "from typing import TYPE_CHECKING\n"
             "if TYPE_CHECKING:\n"
             "    from cllm4rec_dist.config import TrainConfig\n")
    names = [name for _, name in imported_modules(PACKAGE / "corpus" / "shards.py", probe)]
    assert names == ["cllm4rec_dist.corpus.ids", "cllm4rec_dist.model", "cllm4rec_dist.eval.metrics",
                     "cllm4rec_dist.export.embeddings", "cllm4rec_dist.report"]
    assert rank_of("report") > rank_of("corpus")
    tree = ast.parse("if cfg.recommender == 'allmrec':\n    x = cfg.allmrec.cf_dim\n")
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    attributes = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert "allmrec" in strings and "allmrec" in attributes and "allmrec" in REGISTRY
