"""Diffusion methods: each turns a latent pair batch into the loss core's ``PairScores``.

Every module of this package is imported here, so a method registers itself (``@register_method``) by being a
module in this folder: adding one needs no edit elsewhere.
"""

import importlib
import pkgutil

from diffalign.diffusion.methods.base import (
    METHODS,
    DiffusionMethod,
    LatentPairBatch,
    PreferenceMethod,
    TrainingContext,
    TrainingData,
    denoising_error,
    pair_noise,
    per_sample_mse,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "DiffusionMethod",
    "LatentPairBatch",
    "PreferenceMethod",
    "TrainingContext",
    "TrainingData",
    "denoising_error",
    "pair_noise",
    "per_sample_mse",
    "register_method",
]
