"""`cllm4rec export`: a run's (or checkpoint's) user/item embeddings, with original ids, as Parquet + NumPy.

The checkpoint's config names the recommender; its export hook (recommenders/<name>/export.py) gives the tables,
export/embeddings.py writes them (the one file layout for every model).
"""

from __future__ import annotations

import argparse
import json

from cllm4rec_dist.config import saved_run_config
from cllm4rec_dist.corpus.presets import run_backbone
from cllm4rec_dist.corpus.shards import ShardedDataset, ShardError
from cllm4rec_dist.export.embeddings import ExportError, write_export
from cllm4rec_dist.model.adapter import peft_adapter_files
from cllm4rec_dist.recommenders import recommender
from cllm4rec_dist.train.checkpoint import read_saved_weights

__all__ = ["ExportError", "add_arguments", "export_checkpoint", "run"]

ADAPTER_FOLDER = "adapter"
"""Where an export puts the backbone's LoRA adapter in PEFT's format (model.adapter lora)."""


def export_checkpoint(source: str, out_dir: str, dim: int | None = None, use_best: bool = True,
                      user_vectors: bool = True, data_dir: str | None = None, device: str | None = None) -> dict:
    """Export a run's (or checkpoint's) embeddings to ``out_dir``; returns the export.json content.

    source:       run folder, checkpoint folder, or a trainer.pt (see ``resolve_checkpoint``).
    dim:          PCA-project every table to this many dimensions (paper: 128); None keeps them.
    use_best:     the best-validation weights when the checkpoint has them, else the last state.
    user_vectors: also export the model's user representations where the recommender has them (loads the backbone).
    data_dir:     the preprocessed dataset, when the one in the checkpoint's config has moved.
    device:       where to run the backbone for ``user_vectors`` (default: CUDA if present).
    """
    if dim is not None and dim < 1:
        raise ExportError(f"dim={dim}: must be a positive number of dimensions (or None for no projection).")
    saved = read_saved_weights(source, use_best)
    cfg = saved_run_config(saved.snapshot["config"], f"{saved.path} (snapshot config)")
    hooks = recommender(cfg.recommender).load_module("export")
    if saved.sharded:
        if dim is not None:
            raise ExportError(f"{saved.folder}: a row-sharded checkpoint is exported part by part, and a PCA (--dim) "
                              "needs whole tables; export without --dim.")
        return hooks.export_sharded(source, saved, out_dir, cfg, data_dir)
    data_url = data_dir or cfg.data
    try:
        data = ShardedDataset(data_url)
    except ShardError as e:
        raise ExportError(f"{saved.path} was trained on dataset {cfg.data!r}, which cannot be opened ({e}). "
                          "Pass the dataset folder with --data (data_dir=...).") from None
    id_maps = data.read_json("id_maps.json")
    ids = {"users": [str(x) for x in id_maps["users"]], "items": [str(x) for x in id_maps["items"]]}
    exported = hooks.export_tables(cfg, data, saved, device, user_vectors)
    state_record = saved.snapshot["state"]
    weights = saved.weights
    record = {
        "source": {"input": source, "checkpoint": saved.path, "global_step": state_record.get("global_step"),
                   "recommender": cfg.recommender, "ablation": cfg.ablation, "data": data_url,
                   "backbone": cfg.backbone or data.manifest["backbone"]["path"]},
        "weights": weights,
        "weights_note": ("best-validation weights" if weights == "best" else
                         "last trained state" + (" (asked for)" if not use_best else
                                                 " (the checkpoint has no best-validation copy yet)")),
        "best": state_record.get("best") or None,
    }
    adapter_files = {}
    if cfg.model.uses_adapter:
        # the backbone's LoRA adapter, also in PEFT's own format: PeftModel.from_pretrained(base, <out>/adapter)
        location = _backbone_location(cfg, data.manifest)
        files = peft_adapter_files(cfg.model.backbone_settings(), location["path"], location.get("gguf_file"),
                                   saved.tensors)
        adapter_files = {f"{ADAPTER_FOLDER}/{name}": data for name, data in files.items()}
        record["adapter"] = {"format": "peft", "folder": ADAPTER_FOLDER, "base_model": location["path"],
                             "load": f"peft.PeftModel.from_pretrained(<base backbone>, '<export>/{ADAPTER_FOLDER}')"}
    return write_export(out_dir, ids, exported, dim, record, f"{saved.path} on {data_url}", adapter_files)


def _backbone_location(cfg, manifest: dict) -> dict:
    """The backbone the run trained on (``run_backbone``)."""
    try:
        return run_backbone(cfg.backbone, manifest)
    except ValueError as err:
        raise ExportError(f"the run's backbone {cfg.backbone!r} cannot be found for its adapter's export ({err})") \
            from None


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
