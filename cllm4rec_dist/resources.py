"""Files that ship with the project (DeepSpeed configs, demo configs, the demo dataset's home), found from the
installed package, never from the working directory.

A relative path the user gives is looked up in the working directory first, then in the project, so
``--dist.ds_config ds_configs/zero1.json`` and ``--config configs/demo.yaml`` work from any folder.
"""

from __future__ import annotations

import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATASETS = {os.path.join("shards", "demo"): "random", os.path.join("shards", "demo-loo"): "leave-one-out"}
"""The embedded demo datasets' names in configs and the split each is preprocessed with (A-LLMRec needs
leave-one-out); they live in the project's shards/ folder (see ``demo_data_dir``)."""


def packaged(relative: str) -> str:
    """Absolute path of a file or folder of the project (e.g. 'ds_configs/zero2.json')."""
    return os.path.join(PROJECT_ROOT, relative)


def resolve_path(path: str) -> str:
    """``path`` as given if absolute or a URL; else relative to the working directory when it exists there,
    else the project's file of that name when it exists, else the working-directory path (errors name it)."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    if os.path.exists(path):
        return os.path.abspath(path)
    shipped = packaged(path)
    return shipped if os.path.exists(shipped) else os.path.abspath(path)


def demo_data_dir(name: str) -> str:
    """Where the embedded demo dataset ``name`` (a key of DEMO_DATASETS) is built and read: <project>/<name>
    (shards/ is git-ignored)."""
    return packaged(name)
