"""Multi-VAE (Liang et al., WWW 2018), the baseline whose multinomial likelihood CLLM4Rec's rec-step reuses.

Model: L2-normalise the user's train row, dropout, encoder J -> 600 -> 2 x 200
(mu, logvar) with tanh, reparameterise, decoder 200 -> 600 -> J with tanh,
multinomial log-likelihood of the train row under softmax(logits), plus
beta * KL with beta annealed linearly from 0 to ``beta_max``.

Model selection: validation ``select_metric`` (Recall@20) every ``eval_every``
epochs; the test metrics come from the best epoch's weights, evaluated once.
Scoring uses the posterior mean (no sampling, no dropout) from TRAIN items only.

Runs are seeded and deterministic on CPU: one seed drives initialisation,
shuffling, dropout and the reparameterisation noise, and the caller's global
torch RNG state is left as it was.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cllm4rec_dist.baselines.common import BaselineSettings, evaluate, make_result, selection_value
from cllm4rec_dist.corpus.split import EvalSplit


@dataclass
class MultiVAESettings(BaselineSettings):
    """Multi-VAE hyperparameters (defaults follow the paper's released code)."""

    epochs: int = 100
    """Training epochs (passes over the users with at least one train item)."""

    hidden_dim: int = 600
    """Width of the single hidden layer of encoder and decoder."""

    latent_dim: int = 200
    """Dimension of z."""

    dropout: float = 0.5
    """Input dropout on the L2-normalised train row (training only)."""

    beta_max: float = 0.2
    """Cap of the KL weight (the paper's anneal_cap)."""

    total_anneal_steps: int | None = None
    """beta = min(beta_max, step / total_anneal_steps). None: reach beta_max after 80% of
    the planned optimizer steps. The paper's code fixes 200,000 steps, which on its
    ML-20M run reaches the cap at ~86% of training; on a small dataset the same
    constant would leave beta ~ 0 for the whole run, so the default scales with it."""

    lr: float = 1e-3
    """Adam learning rate."""

    weight_decay: float = 0.0
    """Adam weight decay (the PyTorch port of the paper uses none)."""

    batch_size: int = 500
    """Users per optimizer step."""

    eval_every: int = 1
    """Evaluate on validation every this many epochs (and always after the last)."""

    seed: int = 0
    """Seeds initialisation, shuffling, dropout and reparameterisation noise."""

    device: str = "cpu"
    """Torch device to train and score on."""

    num_threads: int = 1
    """Torch intra-op CPU threads for this run (restored afterwards); 0 keeps torch's
    setting (all cores). 1 is the default because it is robust on a shared CPU: on a busy
    2-core machine ML-100K took 17 s with 1 thread and 118 s with torch's 2, since the
    OpenMP threads of an oversubscribed pool wait on each other. Use 0
    on a large dedicated machine or a big catalogue."""


class MultiVAE(nn.Module):
    """Encoder / decoder of Multi-VAE with one hidden tanh layer each."""

    def __init__(self, num_items: int, hidden_dim: int = 600, latent_dim: int = 200, dropout: float = 0.5):
        super().__init__()
        self.latent_dim = latent_dim
        self.drop = nn.Dropout(dropout)
        self.enc_hidden = nn.Linear(num_items, hidden_dim)
        self.enc_out = nn.Linear(hidden_dim, 2 * latent_dim)
        self.dec_hidden = nn.Linear(latent_dim, hidden_dim)
        self.dec_out = nn.Linear(hidden_dim, num_items)
        for layer in (self.enc_hidden, self.enc_out, self.dec_hidden, self.dec_out):
            # As in the paper's code: Xavier weights, tiny random biases.
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=0.001)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x) for raw (binary) rows x."""
        h = self.drop(F.normalize(x, p=2, dim=1))
        h = self.enc_out(torch.tanh(self.enc_hidden(h)))
        return h[:, : self.latent_dim], h[:, self.latent_dim :]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec_out(torch.tanh(self.dec_hidden(z)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits over items, mu, logvar); samples z in training mode, uses mu in eval mode."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar


def multivae_loss(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, multinomial NLL, KL), each averaged over the users of the batch."""
    nll = -(F.log_softmax(logits, dim=1) * x).sum(dim=1).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1).mean()
    return nll + beta * kl, nll, kl


def _rows(x, users: np.ndarray, device: torch.device) -> torch.Tensor:
    """Dense rows of the CSR train matrix (one batch of users x all items)."""
    return torch.from_numpy(x[users].toarray()).to(device)


def run(split: EvalSplit, settings: MultiVAESettings, on_validation=None) -> dict[str, Any]:
    """Train with per-epoch validation, keep the best epoch, evaluate it once on test.

    ``on_validation(epoch, metrics)`` is called after each validation (Ray Tune reports from there: tune.py)."""
    started = time.perf_counter()
    if settings.epochs < 1 or settings.eval_every < 1:
        raise ValueError("epochs and eval_every must be >= 1")
    device = torch.device(settings.device)
    threads_before = torch.get_num_threads()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    try:
        return _train_and_evaluate(split, settings, device, started, on_validation)
    finally:
        torch.set_num_threads(threads_before)


def _train_and_evaluate(split: EvalSplit, settings: MultiVAESettings, device: torch.device, started: float,
                        on_validation=None) -> dict[str, Any]:
    x = split.train_matrix().astype(np.float32).tocsr()
    train_users = np.flatnonzero(np.diff(x.indptr) > 0)
    steps_per_epoch = max(1, math.ceil(len(train_users) / settings.batch_size))
    anneal_steps = settings.total_anneal_steps or max(1, int(0.8 * steps_per_epoch * settings.epochs))
    metric_key = f"valid_{settings.select_metric}"
    history: dict[str, list] = {"epoch": [], "loss": [], "nll": [], "kl": [], "beta": [], "eval_epoch": [],
                                metric_key: []}

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        rng = np.random.default_rng(settings.seed)
        model = MultiVAE(split.num_items, settings.hidden_dim, settings.latent_dim, settings.dropout).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)

        @torch.no_grad()
        def score(users: np.ndarray) -> torch.Tensor:
            model.eval()
            return model(_rows(x, users, device))[0]

        best = None  # (value, epoch, state_dict, valid metrics)
        step = 0
        for epoch in range(1, settings.epochs + 1):
            model.train()
            order = rng.permutation(train_users)
            totals = np.zeros(3)
            beta = 0.0
            for start in range(0, len(order), settings.batch_size):
                batch = _rows(x, order[start : start + settings.batch_size], device)
                beta = min(settings.beta_max, step / anneal_steps)
                logits, mu, logvar = model(batch)
                loss, nll, kl = multivae_loss(logits, batch, mu, logvar, beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                totals += np.array([loss.item(), nll.item(), kl.item()]) * len(batch)
            totals /= max(1, len(order))
            history["epoch"].append(epoch)
            for key, value in zip(("loss", "nll", "kl"), totals):
                history[key].append(float(value))
            history["beta"].append(float(beta))

            if epoch % settings.eval_every == 0 or epoch == settings.epochs:
                valid = evaluate(score, split, "valid", settings)
                value = selection_value(valid, settings)
                history["eval_epoch"].append(epoch)
                history[metric_key].append(valid[settings.select_metric])
                if best is None or value > best[0]:  # ties keep the earlier epoch
                    best = (value, epoch, copy.deepcopy(model.state_dict()), valid)
                if on_validation is not None:
                    on_validation(epoch, valid)

        _, best_epoch, state, valid = best
        model.load_state_dict(state)
        test = evaluate(score, split, "test", settings) if settings.score_test else None

    selected = {"epoch": best_epoch, metric_key: valid[settings.select_metric]}
    return make_result("multivae", valid, test, selected, settings, started, history)
