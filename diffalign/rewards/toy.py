"""The scripted rewards of the shipped toy worlds behind the scorer interface.

The toy modules are imported when a scorer is called, so this package imports without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffalign.rewards.base import Audio, Scorer, check_prompts
from diffalign.rewards.inputs import check_images, resample
from diffalign.rewards.registry import register_scorer


def image_tensor(images: Tensor, scorer: str) -> Tensor:
    """The toy image world's measurements work on tensors; PIL images are refused with the fix."""
    if not isinstance(check_images(images), Tensor):
        raise ValueError(f"{scorer} scores image tensors [B,3,H,W] in [0, 1], not PIL images")
    return images


class ToyT2IScorer(Scorer):
    """:func:`diffalign.toy.t2i.toy_reward`: prompt fidelity times centredness of the drawn shape, in [0, 1]."""

    modality = "image"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None, reference: None = None) -> Tensor:
        from diffalign.toy.t2i import toy_reward

        images = image_tensor(images, "toy_t2i")
        return self.output(toy_reward(images, check_prompts(prompts, len(images), "toy_t2i")))


class ToyT2ICentrednessScorer(Scorer):
    """:func:`diffalign.toy.t2i.centredness`: how near the frame's centre the drawn shape is, in [0, 1]; the
    factor of the toy reward that alignment moves and a person can see (prompts are not needed)."""

    modality = "image"

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None, reference: None = None) -> Tensor:
        from diffalign.toy.t2i import centredness

        return self.output(centredness(image_tensor(images, "toy_t2i_centredness")))


class ToyT2MScorer(Scorer):
    """:func:`diffalign.toy.music.toy_reward`: how long the notes ring (presence times (1 + sustain)/2), in
    [0, 1]. The toy world is 16 kHz; audio at another rate is resampled first."""

    modality = "audio"
    name = "toy_t2m"

    def score(self, waveforms: Tensor, prompts: list[str]) -> Tensor:
        from diffalign.toy.music import SAMPLE_RATE, toy_reward

        return toy_reward(waveforms, SAMPLE_RATE, prompts)

    def forward(self, audio: Audio, prompts: Sequence[str] | None = None, reference: None = None) -> Tensor:
        from diffalign.toy.music import SAMPLE_RATE

        if not isinstance(audio, Audio):
            raise ValueError(f"{self.name} scores Audio (waveforms [B,T] with their sample rate), got {type(audio).__name__}")
        prompts = check_prompts(prompts, len(audio), self.name)
        waveforms = audio.waveforms.detach().float().cpu()
        if audio.sample_rate != SAMPLE_RATE:
            waveforms = torch.from_numpy(np.stack(resample(audio, SAMPLE_RATE)))
        return self.output(self.score(waveforms, prompts))


class ToyT2MFidelityScorer(ToyT2MScorer):
    """:func:`diffalign.toy.music.prompt_fidelity`: presence times how surely the register and tempo the prompt
    names are heard, in [0, 1]. Not rewarded by ``toy_t2m``: as a metric it shows whether a rise in that reward
    kept the music asked for (noise rings through its gate, and scores 1 there)."""

    name = "toy_t2m_fidelity"

    def score(self, waveforms: Tensor, prompts: list[str]) -> Tensor:
        from diffalign.toy.music import SAMPLE_RATE, prompt_fidelity

        return prompt_fidelity(waveforms, SAMPLE_RATE, prompts)


class ToyLLMScorer(Scorer):
    """:func:`diffalign.toy.llm.toy_reward` of each completion given its prompt, in [0, 1]."""

    modality = "text"

    def forward(
        self, completions: Sequence[str], prompts: Sequence[str] | None = None, reference: None = None
    ) -> Tensor:
        from diffalign.toy.llm import toy_reward

        prompts = check_prompts(prompts, len(completions), "toy_llm")
        scores = [toy_reward(prompt, completion) for prompt, completion in zip(prompts, completions)]
        return self.output(torch.tensor(scores, dtype=torch.float64))


@register_scorer("toy_t2i")
def toy_t2i(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ToyT2IScorer:
    return ToyT2IScorer(device, dtype)


@register_scorer("toy_t2i_centredness")
def toy_t2i_centredness(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ToyT2ICentrednessScorer:
    return ToyT2ICentrednessScorer(device, dtype)


@register_scorer("toy_t2m")
def toy_t2m(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ToyT2MScorer:
    return ToyT2MScorer(device, dtype)


@register_scorer("toy_t2m_fidelity")
def toy_t2m_fidelity(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ToyT2MFidelityScorer:
    return ToyT2MFidelityScorer(device, dtype)


@register_scorer("toy_llm")
def toy_llm(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ToyLLMScorer:
    return ToyLLMScorer(device, dtype)
