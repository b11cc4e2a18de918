"""Diffusion methods: each turns a latent pair batch into the loss core's ``PairScores``."""

from diffalign.diffusion.methods.base import LatentPairBatch, denoising_error, pair_noise, per_sample_mse
from diffalign.diffusion.methods.dpo import DiffusionDPO, scores_from_errors

METHODS = {"dpo": DiffusionDPO}

__all__ = [
    "METHODS",
    "DiffusionDPO",
    "LatentPairBatch",
    "denoising_error",
    "pair_noise",
    "per_sample_mse",
    "scores_from_errors",
]
