"""CLAP text–audio encoders: transformers' ClapModel (the default) and laion-clap checkpoints.

Both take :class:`~diffalign.rewards.base.Audio` at any sample rate, resample it to the model's 48 kHz and crop
it to the model's window (10 s) from the start, so that a clip always gets the same score; the libraries
would otherwise take a random crop of longer clips. The mel front-ends are numpy, so no gradient reaches the
waveform.

``import laion_clap`` downloads three tokenizers at import time (LAION-AI/CLAP PR #180) and building its model
downloads roberta-base, so the laion backend imports it only inside :class:`LaionClapEncoder`, after checking
that the checkpoint and those hub files are present.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from diffalign.rewards.base import Audio
from diffalign.rewards.encoders import Encoder, unit
from diffalign.rewards.inputs import resample
from diffalign.rewards.weights import (
    MODEL_FILES,
    PREPROCESSOR_FILES,
    TOKENIZER_FILES,
    TRANSFORMERS_WEIGHTS,
    require_cached_hub_files,
    resolve_pretrained_dir,
    resolve_weights_file,
)

# laion-clap reads these by name: the tokenizers at import (training/data.py), roberta-base when building.
LAION_CLAP_HUB_FILES = {
    "roberta-base": ["config.json", "vocab.json", "merges.txt", ("model.safetensors", "pytorch_model.bin")],
    "bert-base-uncased": ["vocab.txt"],
    "facebook/bart-base": ["vocab.json", "merges.txt"],
}
LAION_CLAP_SAMPLE_RATE = 48_000
LAION_CLAP_WINDOW = 480_000  # 10 s at 48 kHz


class ClapEncoder(Encoder):
    """transformers ``ClapModel`` (hub: ``laion/clap-htsat-unfused``, ``laion/larger_clap_music``, ...)."""

    modality = "audio"

    def __init__(
        self, model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        directory = resolve_pretrained_dir(
            model,
            (*MODEL_FILES, *TOKENIZER_FILES, *PREPROCESSOR_FILES),
            f"CLAP model {model!r}",
            TRANSFORMERS_WEIGHTS,
        )
        self.model = ClapModel.from_pretrained(directory, dtype=dtype).to(device).eval().requires_grad_(False)
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        # Fused models take 4 mel views; "rand_trunc" gives the single view unfused models take.
        self.truncation = "fusion" if self.model.config.audio_config.enable_fusion else "rand_trunc"
        self.max_text_length = self.model.config.text_config.max_position_embeddings - 2  # RoBERTa's offset
        self.identity = f"clap:{model}"

    def embed(self, audio: Audio) -> Tensor:
        rate, window = self.feature_extractor.sampling_rate, self.feature_extractor.nb_max_samples
        clips = [clip[:window] for clip in resample(audio, rate)]
        features = self.feature_extractor(
            clips, sampling_rate=rate, truncation=self.truncation, padding="repeatpad", return_tensors="pt"
        )
        # No clip is longer than the window any more; the extractor marks a random one "longer" for fused
        # models (a training-time trick), which would make scores random.
        is_longer = torch.zeros(len(clips), 1, dtype=torch.bool, device=self.device)
        input_features = features["input_features"].to(self.device, self.dtype)
        return unit(self.model.get_audio_features(input_features=input_features, is_longer=is_longer))

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        return unit(self.model.get_text_features(**tokens))

    def logit_scale(self) -> float:
        return self.model.logit_scale_a.exp().item()


class LaionClapEncoder(Encoder):
    """A laion-clap checkpoint (``lukewys/laion_clap``: ``630k-audioset-best.pt``, music checkpoints, ...).

    For parity with published numbers computed with laion-clap (Tango, TangoFlux). ``audio_model`` is the
    audio tower of the checkpoint (``HTSAT-tiny``; the music checkpoints use ``HTSAT-base``) and
    ``enable_fusion`` must match it (the ``*-fusion-*`` checkpoints).
    """

    modality = "audio"

    def __init__(
        self,
        checkpoint: str,
        audio_model: str = "HTSAT-tiny",
        enable_fusion: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if importlib.util.find_spec("laion_clap") is None:
            raise ImportError("the laion_clap encoder needs laion-clap: pip install 'diffalign[clap]'")
        path = resolve_weights_file(checkpoint, "laion-clap checkpoint")
        require_cached_hub_files(LAION_CLAP_HUB_FILES, "laion-clap")
        import laion_clap

        self.clap = laion_clap.CLAP_Module(
            enable_fusion=enable_fusion, amodel=audio_model, device=str(device)
        )
        self.clap.load_ckpt(str(path), verbose=False)
        self.clap.to(dtype).eval().requires_grad_(False)
        self.identity = f"laion_clap:{audio_model}:{'fusion' if enable_fusion else 'unfused'}:{checkpoint}"

    def embed(self, audio: Audio) -> Tensor:
        # Cropped to the 10 s window; shorter clips are left to laion-clap's repeat-padding.
        clips = np.stack(resample(audio, LAION_CLAP_SAMPLE_RATE))[:, :LAION_CLAP_WINDOW]
        waveforms = torch.from_numpy(clips).to(self.device, self.dtype)
        return unit(self.clap.get_audio_embedding_from_data(waveforms, use_tensor=True))

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        return unit(self.clap.get_text_embedding(list(texts), use_tensor=True))

    def logit_scale(self) -> float:
        return self.clap.model.logit_scale_a.exp().item()
