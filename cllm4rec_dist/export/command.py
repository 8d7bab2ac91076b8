"""`cllm4rec export`: a run's (or checkpoint's) user/item embeddings, with original ids, as Parquet + NumPy.

The work is in ``cllm4rec_dist.export.embeddings``; ``export_checkpoint`` is
re-exported here because the launchers call
``from cllm4rec_dist.export.command import export_checkpoint``.
"""

from __future__ import annotations

import argparse
import json

from cllm4rec_dist.export.embeddings import ExportError, export_checkpoint

__all__ = ["ExportError", "add_arguments", "export_checkpoint", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write users.parquet / items.parquet (original ids + collab, content, rec, head vectors), the same "
        "as NumPy arrays (user_ids.npy, users_collab.npy, ...) and export.json into --out. Uses the "
        "best-validation weights unless --last.")
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (--out of `cllm4rec train` / a launcher) or checkpoint folder with trainer.pt")
    parser.add_argument("--out", required=True, help="export folder (local path or fsspec URL)")
    parser.add_argument("--dim", type=int, default=None,
                        help="PCA-project every table to this many dimensions (the paper used 128); default: none")
    parser.add_argument("--no-user-vectors", dest="user_vectors", action="store_false",
                        help="skip the finetuned model's user representations (no backbone is loaded)")
    parser.add_argument("--last", dest="use_best", action="store_false",
                        help="export the last trained state instead of the best-validation weights")
    parser.add_argument("--data", default=None,
                        help="preprocessed dataset folder, if it moved since training (default: the one in the config)")
    parser.add_argument("--device", default=None, help="torch device for the user vectors (default: cuda if present)")


def run(args: argparse.Namespace) -> int:
    manifest = export_checkpoint(args.checkpoint, args.out, dim=args.dim, use_best=args.use_best,
                                 user_vectors=args.user_vectors, data_dir=args.data, device=args.device)
    summary = {k: manifest[k] for k in ("weights", "num_users", "num_items", "hidden_size", "dim", "item_scoring")}
    summary["checkpoint"] = manifest["source"]["checkpoint"]
    summary["tables"] = {entity: sorted(t) for entity, t in manifest["tables"].items()}
    summary["out"] = args.out
    print(json.dumps(summary, indent=1))
    return 0
