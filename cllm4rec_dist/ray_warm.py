"""Imports started early, off the job's path: a training worker's, the moment Ray starts its process (``start``),
and the driver's export code, while the workers start (``start_export_imports``).

Ray Train starts each training worker in a new Python process, then spends seconds on it before the training function
runs: the actor is created, the controller waits for the whole group, the train context and torch's process group are
set up, each a round of remote calls in which the worker's Python thread mostly waits. Only then does the training
function import torch, DeepSpeed, transformers and the model's code, seconds more, all on the path to the first step.

`start` is Ray's ``worker_process_setup_hook`` on a local cluster that `launch_ray` started (the hook's variable is in
the environment that the raylet, and so every Ray process, inherits; distributed.py ``RayStart``). It runs in every
process of that cluster and does nothing unless the process is a training worker (``WARM_ENV``, set only in the
training workers' runtime environment, names the recommender). There it imports those modules on a daemon thread and
returns at once. The training function's own imports then find them loaded, or wait on Python's import lock for
the module in progress. A failure here is ignored: the training function imports the same modules and reports it.

This module is imported by every process of the cluster (Ray's controller actors too): it imports nothing at the top.
"""

from __future__ import annotations

import os
import threading
import time

WARM_ENV = "CLLM4REC_WARM_IMPORTS"
"""Set to the recommender's name in the training workers' runtime environment only."""
HOOK = f"{__name__}.start"
"""What Ray's worker_process_setup_hook names: this module's `start`."""
HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
"""The variable Ray's worker processes read the hook from (ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR,
which its runtime_env handling sets; a test checks the name)."""
started_at: float | None = None
"""When this process's imports began (time.time()); None where they did not (the training function's timing.json)."""


def start() -> None:
    global started_at
    name = os.environ.get(WARM_ENV)
    if name:
        started_at = time.time()
        threading.Thread(target=_import, args=(name,), name="cllm4rec-warm-imports", daemon=True).start()


def _import(name: str) -> None:
    try:
        # What the training function imports first (deepspeed imports torch), so that the two threads wait on, never
        # into, each other's imports.
        import deepspeed  # noqa: F401

        from cllm4rec_dist.recommenders import recommender

        recommender(name).recipe_class()  # the model's code: transformers and the backbone loader
        # What the first deepspeed.initialize imports, inside the job's "engines" phase otherwise: its ZeRO optimizer
        # check loads this module, which calls torch.compile at import time (torch._dynamo and inductor).
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except Exception:  # noqa: BLE001 - the training function imports them again and reports what fails
        pass


def start_export_imports(name: str) -> float:
    """The Ray driver's: the code of recommender ``name``'s export (its model's, transformers) imported on a daemon
    thread while Ray starts the training workers, when the cores have room, rather than after training, on the job's
    path to its end (about 3 s on 2 cores). The driver's checks leave that code out so as not to hold back the workers'
    start (recommenders/<name>/checks.py). Returns when it began (time.time())."""
    threading.Thread(target=_import_export, args=(name,), name="cllm4rec-export-imports", daemon=True).start()
    return time.time()


def _import_export(name: str) -> None:
    try:
        import cllm4rec_dist.export_run  # noqa: F401
        from cllm4rec_dist.recommenders import recommender

        recommender(name).load_module("export")
    except Exception:  # noqa: BLE001 - the export imports them again and reports what fails
        pass
