"""Diffusion methods: each turns a latent pair batch into the loss core's ``PairScores``.

Online methods (SePPO, DRAGON, RPO) also generate samples during training through the hooks of
:mod:`diffalign.diffusion.methods.online`.
"""

from diffalign.diffusion.methods.base import LatentPairBatch, denoising_error, pair_noise, per_sample_mse
from diffalign.diffusion.methods.dpo import DiffusionDPO, scores_from_errors
from diffalign.diffusion.methods.dragon import DistributionalRewardOptimization
from diffalign.diffusion.methods.inpo import DDIMInPO
from diffalign.diffusion.methods.ncp import NoiseConditionedPerception
from diffalign.diffusion.methods.online import TrainingContext
from diffalign.diffusion.methods.rpo import RewardPreferenceOptimization
from diffalign.diffusion.methods.seppo import SemiPolicyPreferenceOptimization

METHODS = {
    "dpo": DiffusionDPO,
    "inpo": DDIMInPO,
    "ncp": NoiseConditionedPerception,
    "seppo": SemiPolicyPreferenceOptimization,
    "dragon": DistributionalRewardOptimization,
    "rpo": RewardPreferenceOptimization,
}

__all__ = [
    "METHODS",
    "DDIMInPO",
    "DiffusionDPO",
    "DistributionalRewardOptimization",
    "LatentPairBatch",
    "NoiseConditionedPerception",
    "RewardPreferenceOptimization",
    "SemiPolicyPreferenceOptimization",
    "TrainingContext",
    "denoising_error",
    "pair_noise",
    "per_sample_mse",
    "scores_from_errors",
]
