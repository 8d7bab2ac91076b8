"""Baselines (most-popular, EASE, Multi-VAE) fitted on the same split and scored by the same metrics as CLLM4Rec."""

from cllm4rec_dist.baselines.command import MODELS, run_baseline

__all__ = ["MODELS", "run_baseline"]
