"""What third-party libraries may print on the user's console: only what the user can act on.

Called once at every entry point (``cllm4rec``, the launchers). Each setting below silences a message that
says nothing about the user's run; the full logs still go to the run folder (progress.log, console.log,
logs/ray/ with the workers' output).
"""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    # tqdm bars of transformers ("Loading weights", "Writing model shards"): the backbone is loaded and saved
    # several times per run (preprocess, each worker, export), each bar a console line with no information.
    # The variable also reaches child processes (Ray workers, DeepSpeed ranks).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # read at import: already imported, so switch it off directly too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not _has_gpu():
        # Otherwise DeepSpeed's accelerator probe warns "Setting accelerator to CPU. If you have GPU ..." in
        # every process that imports it; CPU is what this machine has. An explicit choice is kept.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_gpu() -> bool:
    """Whether torch would find a CUDA (or ROCm) device. Asked of torch only where it is imported already: a Ray
    driver starts its cluster before it imports torch (1-2 s), so the kernel drivers' device files answer."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    nvidia = "/proc/driver/nvidia/gpus"
    return (os.path.isdir(nvidia) and bool(os.listdir(nvidia))) or os.path.exists("/dev/kfd")
