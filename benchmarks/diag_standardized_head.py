"""DIAGNOSTIC (not a product feature): train the real recipe with the item head reading the last hidden state
divided, per dimension, by that dimension's RMS over the first 8 rec batches at init (fixed for the run), in the
L-step, the rec-step and scoring alike. Tests whether SmolLM2's massive hidden dimensions (RMS 27 and 22 against a
median 0.64) hold the item head back (docs/experiments/2026-12-01-smollm2-slow-rec-step.md).

    python benchmarks/diag_standardized_head.py CONFIG OUT SEED [FINETUNE_LR]
"""

import json
import sys

import torch

from cllm4rec_dist.config import load_config
from cllm4rec_dist.recommenders.cllm4rec.recipe import CLLM4RecRecipe
from cllm4rec_dist.train.checkpoint import LocalSink
from cllm4rec_dist.train.engines import TorchEngine
from cllm4rec_dist.train.rank import Rank

config, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(config)
cfg.out, cfg.seed, cfg.batch.seed = out, seed, seed
if len(sys.argv) > 4:
    cfg.optim.finetune_lr = float(sys.argv[4])
cfg.validate()

def engine_factory(name, params, lr):
    return TorchEngine(name, params, lr, cfg.optim.weight_decay, cfg.optim.grad_clip)


recipe = CLLM4RecRecipe(cfg, Rank(), engine_factory, LocalSink(cfg.out)).setup()
model = recipe.model
stream = recipe.trainer.batches["rec"][0]
with torch.no_grad():
    hidden = torch.cat([model.last_token_hidden(stream.batch(0, i), side="collab") for i in range(8)])
sigma = hidden.pow(2).mean(0).sqrt().clamp(min=1e-3)
print(json.dumps({"sigma_top": sigma.sort(descending=True).values[:5].tolist(), "sigma_median": sigma.median().item()}),
      flush=True)
item_nll, item_topk = model.item_nll, model.item_topk
model.item_nll = lambda hidden, rows, cols: item_nll(hidden / sigma, rows, cols)
model.item_topk = lambda hidden, k, exclude=None: item_topk(hidden / sigma, k, exclude)
torch.save(sigma, out + "/sigma.pt")
result = recipe.train()
print(json.dumps(result, indent=1, default=str))
