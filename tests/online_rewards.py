"""Reward functions for the online-trainer tests, importable as ``online_rewards:NAME`` (tests/ is on the path)."""

from __future__ import annotations

import random

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
