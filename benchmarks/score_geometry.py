"""Where a model's item scores vary: the geometry of the vectors the recommender ranks with. Prints one JSON object.

The scores the evaluation ranks are ``users_rec @ items_head.T`` (`cllm4rec export`: each user's last-prompt-token
hidden state, and the item head; ``items_collab`` on tied backbones, whose head is the collaborative item table).
This reports, over all users of an export:

* how the hidden states spend their energy: the share of the mean vector (what every user shares), the mean
  pairwise cosine, and the share of the few largest dimensions with their RMS against the median dimension's
  (pretrained decoders carry a handful of "massive" dimensions, nearly constant across inputs);
* how the score matrix S (users x items) splits: the variance of the item means (a ranking every user shares,
  popularity-like), of the user means (which changes no ranking) and of the rest, the personal part;
* the item head's RMS, overall and on the largest hidden dimensions (what an Adam step of lr there moves).

    python benchmarks/score_geometry.py --export EXPORT_DIR [--top 5]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from cllm4rec_dist.export.embeddings import read_export


def geometry(users: np.ndarray, head: np.ndarray, top: int = 5) -> dict:
    """The statistics above for hidden states ``users`` (I, d) and item head ``head`` (J, d)."""
    users, head = users.astype(np.float64), head.astype(np.float64)
    energy = (users ** 2).mean(0)  # per dimension, over users
    order = np.argsort(-energy)
    mean = users.mean(0)
    unit = users / np.linalg.norm(users, axis=1, keepdims=True)
    cosine = unit @ unit.T
    n = len(users)
    scores = users @ head.T
    item_part, user_part = scores.mean(0), scores.mean(1)
    personal = scores - item_part[None, :] - user_part[:, None] + scores.mean()
    head_top = head[:, order[:top]]
    return {
        "users": n, "dim": users.shape[1],
        "hidden_norm_mean": float(np.linalg.norm(users, axis=1).mean()),
        "mean_vector_energy_share": float((mean ** 2).sum() / (users ** 2).sum(1).mean()),
        "mean_pairwise_cosine": float((cosine.sum() - n) / (n * (n - 1))),
        "top_dims": order[:top].tolist(),
        "top_dims_rms": np.sqrt(energy[order[:top]]).round(3).tolist(),
        "median_dim_rms": float(np.sqrt(np.median(energy))),
        f"top{top}_dims_energy_share": float(energy[order[:top]].sum() / energy.sum()),
        "score_var_items": float(item_part.var()),
        "score_var_users": float(user_part.var()),
        "score_var_personal": float(personal.var()),
        "personal_share_of_score_var": float(personal.var() / scores.var()),
        "head_rms": float(np.sqrt((head ** 2).mean())),
        f"head_rms_on_top{top}_dims": float(np.sqrt((head_top ** 2).mean())),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="folder written by `cllm4rec export` (with user vectors)")
    p.add_argument("--top", type=int, default=5, help="how many of the largest hidden dimensions to report")
    args = p.parse_args()
    manifest, _, tables = read_export(args.export)
    scoring = manifest.get("item_scoring")  # "head", or "collab" for a tied backbone
    projected = manifest.get("dim") != manifest.get("hidden_size")
    if scoring not in ("head", "collab") or "rec" not in tables["users"] or projected:
        raise SystemExit(f"{args.export}: needs users_rec.npy and the unprojected item table the evaluation scores "
                         f"with (export.json item_scoring={scoring!r}); export the CLLM4Rec run with `cllm4rec export` "
                         "without --dim and without --no-user-vectors.")
    out = {"export": args.export, "item_scoring": scoring,
           **geometry(tables["users"]["rec"], tables["items"][scoring], args.top)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
