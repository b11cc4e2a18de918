"""Diffusion methods: each turns a latent pair batch into the loss core's ``PairScores``."""

from diffalign.diffusion.methods.base import LatentPairBatch, denoising_error, pair_noise, per_sample_mse
from diffalign.diffusion.methods.dpo import DiffusionDPO, scores_from_errors
from diffalign.diffusion.methods.inpo import DDIMInPO
from diffalign.diffusion.methods.ncp import NoiseConditionedPerception

METHODS = {"dpo": DiffusionDPO, "inpo": DDIMInPO, "ncp": NoiseConditionedPerception}

__all__ = [
    "METHODS",
    "DDIMInPO",
    "DiffusionDPO",
    "LatentPairBatch",
    "NoiseConditionedPerception",
    "denoising_error",
    "pair_noise",
    "per_sample_mse",
    "scores_from_errors",
]
