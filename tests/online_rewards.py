"""Rewards for the tests: LLM reward functions, importable as ``online_rewards:NAME`` (tests/ is on the path), and
stand-in scorers registered on import as ``test_mean_red``, ``test_fad`` and ``test_vendi`` (conftest imports
this module; a torchrun worker imports it itself)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from diffalign.rewards import Encoder, Scorer, register_scorer
from diffalign.rewards.distribution import FrechetScorer, VendiScorer
from diffalign.toy.llm import toy_reward


def short_answer(prompt: str, completion: str) -> float:
    """Higher for shorter completions: a second reward that disagrees with the toy reward now and then."""
    return 1.0 / (1.0 + len(completion))


def noisy_toy_reward(prompt: str, completion: str) -> float:
    """The toy reward plus noise from Python's global generator: a stochastic reward."""
    return toy_reward(prompt, completion) + 0.1 * random.random()


def letter_share(prompt: str, completion: str) -> float:
    """The share of letters in a completion: a reward that varies on a random model's output."""
    return sum(character.isalpha() for character in completion) / max(1, len(completion))


class MeanRedScorer(Scorer):
    """A stand-in instance-wise reward: the mean of the red channel."""

    modality = "image"

    def forward(self, images, prompts=None, reference=None):
        return self.output(images[:, 0].mean(dim=(1, 2)))


class MeanColourEncoder(Encoder):
    """A stand-in encoder: an image's mean colour (3-D), unit-normalised."""

    modality = "image"
    identity = "test:mean-colour"

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def embed(self, images):
        if not torch.is_tensor(images):
            arrays = [np.asarray(image, dtype=np.float32) / 255 for image in images]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return F.normalize(images.float().mean(dim=(2, 3)), dim=1)


register_scorer("test_mean_red")(lambda device="cpu", dtype=torch.float32: MeanRedScorer(device, dtype))
register_scorer("test_fad")(lambda reduction="set": FrechetScorer(MeanColourEncoder(), reduction))
register_scorer("test_vendi")(lambda reduction="set": VendiScorer(MeanColourEncoder(), reduction))
