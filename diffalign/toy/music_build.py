"""Build the toy text-to-music world from synthetic clips, on a CPU, reproducibly from a seed.

Stages, each small enough to read on its own:

1. captioned clips (:func:`diffalign.toy.music.synthesize`) and their log-mel spectrograms;
2. a ``RobertaTokenizer`` whose byte-level BPE merges are learnt from the caption vocabulary;
3. a toy ``ClapModel`` trained contrastively on the clips and (full or partial) captions;
4. an ``AutoencoderKL`` on log-mel spectrograms (128×64 → 32×16×8, as MusicLDM's ÷4);
5. a ``SpeechT5HifiGan`` vocoder (log-mel → 16 kHz waveform);
6. a ``UNet2DConditionModel`` (ε-prediction, MusicLDM's noise schedule) conditioned through its class
   embedding on the frozen toy CLAP's text embedding, with 10% empty captions for classifier-free guidance;
7. the components saved in the ``MusicLDMPipeline`` layout;
8. audio-alpaca-style preference pairs sampled from those components and labelled by
   :func:`~diffalign.toy.music.toy_reward` (with ties and label noise), an exemplar set and the prompt
   splits as text files (``prompts/train.txt``, ``prompts/heldout.txt``);
9. measured quality: reward of base samples, CLAP retrieval, pitch and tempo after vocoding.

Run it with ``python -m diffalign.toy build t2m``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, MusicLDMPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from tokenizers.pre_tokenizers import ByteLevel
from torch import Tensor
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from diffalign.toy import music
from diffalign.toy.bpe import train_bpe
from diffalign.toy.music import (
    ATTRIBUTES,
    CLIP_SAMPLES,
    HOP_LENGTH,
    MEL_BINS,
    SAMPLE_RATE,
    VOCABULARY,
    ClipSpec,
    ToyMusicModel,
)
from diffalign.toy.prompts import write_prompt_files
from diffalign.toy.stages import (
    BuildStages,
    check_build_settings,
    cosine_schedule,
    log_interval,
    unit_variance_scaling_factor,
    write_build_info,
)

log = logging.getLogger(__name__)

CLAP_DIM = 32  # joint text–audio embedding, the UNet's class-embedding input (MusicLDM: 512)
TEXT_POSITIONS = 32  # RoBERTa-style positions start after the padding index, so 30 tokens fit
LATENT_CHANNELS = 8  # as MusicLDM's VAE
# MusicLDM's noise schedule (scheduler_config.json of ucsd-reach/musicldm).
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")


@dataclass
class MusicDataSettings:
    """What every toy music builder shares: the clips it trains on, their captions, and how its preference data
    are sampled and labelled."""

    clips: int = 6_000  # synthesized captioned clips, shared by every stage
    empty_caption_fraction: float = 0.1  # unconditional training for classifier-free guidance
    partial_caption_fraction: float = 0.15  # captions naming only some attributes ("a fast sine arpeggio")
    train_samples_per_prompt: int = 8
    heldout_samples_per_prompt: int = 2
    sampling_steps: int = 25
    guidance_scale: float = 3.0
    tie_fraction: float = 0.05  # pairs with the closest rewards are marked as ties
    label_flip_fraction: float = 0.1  # of the other pairs, chosen and rejected swapped at random
    quality_clips: int = 96  # fresh synthesized clips on which the built autoencoders are measured
    threads: int = 1  # a busy shared CPU runs small models faster on one thread than on contended two

    def __post_init__(self) -> None:
        check_build_settings(self, paired=("train_samples_per_prompt", "heldout_samples_per_prompt"), unit="clips")


@dataclass
class MusicBuildConfig(MusicDataSettings):
    """How much of everything to train and sample. The defaults build the shipped assets (see
    ``assets/README.md`` for their time and size); tiny values give a quick smoke build."""

    clap_steps: int = 1000
    clap_batch_size: int = 128
    # The preference pairs reach the trainer as VAE latents: a VAE that loses how long the notes ring hides the
    # preference from every method (docs/experiments.md, "The toy music build").
    vae_steps: int = 2000
    vae_batch_size: int = 32
    vae_crop_frames: int = 32  # the VAE is convolutional: it trains on crops, and runs on whole clips
    vae_kl_weight: float = 1e-4
    vocoder_steps: int = 1600
    vocoder_batch_size: int = 16
    vocoder_crop_frames: int = 32
    unet_steps: int = 1000
    unet_batch_size: int = 64
    unet_learning_rate: float = 2e-3
    unet_ema_decay: float = 0.995
    exemplars: int = 48

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vae_crop_frames", "vocoder_crop_frames"):
            if getattr(self, name) % 4 or getattr(self, name) > music.MEL_FRAMES:
                raise ValueError(
                    f"{name} must be a multiple of 4 up to {music.MEL_FRAMES}, got {getattr(self, name)}"
                )
        if not 0 <= self.unet_ema_decay < 1:
            raise ValueError(f"unet_ema_decay must be in [0, 1), got {self.unet_ema_decay!r}")


class ClipSampler(Protocol):
    """What the preference data are sampled from: a toy model's own sampling loop, or a family's."""

    def generate(self, prompts: list[str], steps: int, guidance_scale: float, generator: torch.Generator) -> Tensor:
        """Clips ``[len(prompts), CLIP_SAMPLES]`` at 16 kHz, drawn from ``generator``."""


def optimise(loss: Tensor, optimizer: torch.optim.Optimizer, schedule, parameters, clip: float | None = None) -> None:
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


# -------------------------------------------------------------------------------------------------- data


@dataclass
class ClipSet:
    specs: list[ClipSpec]
    waveforms: Tensor  # [N, CLIP_SAMPLES]
    mels: Tensor  # [N, MEL_FRAMES, MEL_BINS]

    @property
    def captions(self) -> list[str]:
        return [spec.caption for spec in self.specs]


def make_clips(count: int, generator: torch.Generator, batch_size: int = 200, **sample_options) -> ClipSet:
    """Synthesize ``count`` random clips and their log-mel spectrograms."""
    specs = music.sample_clip_specs(count, generator, **sample_options)
    waveforms = torch.cat([music.synthesize(specs[i : i + batch_size]) for i in range(0, count, batch_size)])
    mels = torch.cat([music.waveform_to_mel(waveforms[i : i + batch_size]) for i in range(0, count, batch_size)])
    return ClipSet(specs, waveforms, mels)


# ------------------------------------------------------------------------------------------ text side


def build_tokenizer(directory: Path) -> RobertaTokenizer:
    """Learn byte-level BPE merges on the caption vocabulary (every word becomes one token) and save it.

    The 256 byte tokens stay in the vocabulary, so any text tokenizes.
    """
    words = ["a", "clip", *(word for values in VOCABULARY.values() for word in values)]
    tokenizer = RobertaTokenizer()  # RoBERTa's byte-level pre-tokenizer around an empty BPE model
    # Words appear after a space ("Ġloud") and alone, since a caption's first word has no space before it.
    train_bpe(
        tokenizer.backend_tokenizer,
        [*words, *(" " + word for word in words)],
        vocab_size=1000,  # more than enough: merging stops once every word is one token
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        alphabet=ByteLevel.alphabet(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    # Reloading rebuilds the <s> … </s> post-processor with the trained ids.
    tokenizer = RobertaTokenizer.from_pretrained(directory, model_max_length=TEXT_POSITIONS - 2)
    tokenizer.save_pretrained(directory)
    for word in words:
        if len(tokenizer.tokenize(" " + word)) != 1:
            raise RuntimeError(f"tokenizer splits the vocabulary word {word!r}: {tokenizer.tokenize(' ' + word)}")
    return tokenizer


def make_feature_extractor() -> ClapFeatureExtractor:
    """CLAP's audio front-end at 16 kHz: 64 mel bands to 8 kHz, 32 ms hop, one 2 s window.

    Clips (1.28 s) are zero-padded to the window, so every clip is seen whole and ``rand_trunc`` (the
    unfused models' mode) never crops at random. 63 frames fit the audio tower's 64×64 input.
    """
    return ClapFeatureExtractor(
        feature_size=MEL_BINS,
        sampling_rate=SAMPLE_RATE,
        hop_length=512,
        max_length_s=2,
        fft_window_size=1024,
        frequency_min=0,
        frequency_max=music.MEL_FMAX,
        truncation="rand_trunc",
        padding="repeatpad",
    )


def clap_features(feature_extractor: ClapFeatureExtractor, waveforms: Tensor, batch_size: int = 500) -> Tensor:
    """``input_features`` ``[N,1,63,64]`` of the toy CLAP for 16 kHz clips ``[N,T]``."""
    batches = []
    for start in range(0, len(waveforms), batch_size):
        clips = list(waveforms[start : start + batch_size].numpy())
        batches.append(feature_extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"])
    return torch.cat(batches)


def caption_variants() -> list[dict[str, str | None]]:
    """Every combination of attribute values a caption can name; ``None`` where it leaves one out."""
    variants: list[dict[str, str | None]] = [{}]
    for attribute in ATTRIBUTES:
        variants = [{**v, attribute: value} for v in variants for value in (*VOCABULARY[attribute], None)]
    return variants


def _consistent(variants: list[dict[str, str | None]], specs: list[ClipSpec]) -> Tensor:
    """``[len(variants), len(specs)]``: does caption variant v truly describe clip i."""
    table = torch.ones(len(variants), len(specs), dtype=torch.bool)
    for attribute in ATTRIBUTES:
        values = VOCABULARY[attribute]
        asked = torch.tensor([values.index(v[attribute]) if v[attribute] is not None else -1 for v in variants])
        actual = torch.tensor([values.index(getattr(spec, attribute)) for spec in specs])
        table &= (asked[:, None] == -1) | (asked[:, None] == actual[None, :])
    return table


def variant_caption(variant: dict[str, str | None]) -> str:
    return music.make_caption(**variant)


def make_clap(tokenizer: RobertaTokenizer) -> ClapModel:
    """A tiny CLAP: a 2-layer RoBERTa-style text tower and a 2-stage HTSAT audio tower on 64×64 mels."""
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TEXT_POSITIONS,
            projection_dim=CLAP_DIM,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        audio_config=dict(
            spec_size=64,
            num_mel_bins=MEL_BINS,
            window_size=4,
            patch_size=4,
            patch_stride=4,
            depths=[1, 1],
            num_attention_heads=[2, 4],
            patch_embeds_hidden_size=32,
            hidden_size=64,  # the last stage's width: patch_embeds_hidden_size · 2^(stages − 1)
            projection_dim=CLAP_DIM,
            enable_fusion=False,
        ),
        projection_dim=CLAP_DIM,
    )
    return ClapModel(config)


def tokenize(tokenizer: RobertaTokenizer, texts: list[str]) -> dict[str, Tensor]:
    return tokenizer(texts, padding=True, return_tensors="pt")


def train_clap(
    tokenizer: RobertaTokenizer, features: Tensor, specs: list[ClipSpec], config: MusicBuildConfig, generator: torch.Generator
) -> ClapModel:
    """Contrastive training as CLAP (Wu et al., 2023, arXiv 2211.06687): symmetric cross-entropy over
    audio–text similarities, with CLAP's two learnt temperatures.

    Captions may be partial ("a fast clip" describes every fast clip), so a batch has several true captions
    per clip: each direction's cross-entropy uses a target spread evenly over all true matches. The text
    side scores every caption variant each step (576 short texts), the audio side a batch of clips.
    """
    clap = make_clap(tokenizer)
    variants = caption_variants()
    tokens = tokenize(tokenizer, [variant_caption(variant) for variant in variants])
    consistent = _consistent(variants, specs)
    optimizer = torch.optim.AdamW(clap.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = cosine_schedule(optimizer, config.clap_steps, warmup=50)
    clap.train()
    for step in range(config.clap_steps):
        indices = torch.randint(len(features), (config.clap_batch_size,), generator=generator)
        audio_embeds = clap.get_audio_features(input_features=features[indices]).pooler_output
        text_embeds = clap.get_text_features(**tokens).pooler_output
        similarity = audio_embeds @ text_embeds.T  # [clips, variants]
        match = consistent[:, indices].T.float()
        audio_to_text = F.cross_entropy(clap.logit_scale_a.exp() * similarity, match / match.sum(1, keepdim=True))
        present = match.sum(0) > 0  # variants with at least one true clip in the batch
        text_to_audio = F.cross_entropy(
            (clap.logit_scale_t.exp() * similarity.T)[present], (match.T / match.sum(0)[:, None].clamp_min(1))[present]
        )
        loss = (audio_to_text + text_to_audio) / 2
        optimise(loss, optimizer, schedule, clap.parameters())
        with torch.no_grad():  # as CLIP: temperatures capped at 100
            clap.logit_scale_a.clamp_(0, math.log(100))
            clap.logit_scale_t.clamp_(0, math.log(100))
        if step % log_interval(config.clap_steps) == 0 or step == config.clap_steps - 1:
            log.info("  clap step %d/%d  loss %.3f", step + 1, config.clap_steps, loss.item())
    return clap.eval()


@torch.no_grad()
def clap_retrieval_accuracy(clap: ClapModel, tokenizer: RobertaTokenizer, features: Tensor, specs: list[ClipSpec]) -> dict:
    """How often each clip's own full caption is the most similar of all 108, and each attribute's value
    the most similar among captions that differ from the clip's in that attribute only."""
    captions = music.all_captions()
    text = clap.get_text_features(**tokenize(tokenizer, captions)).pooler_output
    audio = clap.get_audio_features(input_features=features).pooler_output
    best = (audio @ text.T).argmax(1)
    parsed = [music.parse_caption(caption) for caption in captions]
    result = {"caption_top1": float(np.mean([captions[b] == s.caption for b, s in zip(best.tolist(), specs)]))}
    for attribute in ATTRIBUTES:
        correct = []
        for i, spec in enumerate(specs):
            own = {name: getattr(spec, name) for name in ATTRIBUTES}
            options = [music.make_caption(**{**own, attribute: value}) for value in VOCABULARY[attribute]]
            scores = audio[i] @ text[[captions.index(option) for option in options]].T
            correct.append(VOCABULARY[attribute][scores.argmax().item()] == own[attribute])
        result[f"{attribute}_accuracy"] = float(np.mean(correct))
    del parsed
    return result


# ------------------------------------------------------------------------------------------ autoencoder


def make_vae() -> AutoencoderKL:
    """A KL autoencoder on log-mel (1×128×64 → 8×32×16), MusicLDM's layout at toy width."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=music.MEL_FRAMES,
        mid_block_add_attention=False,  # trained on crops: attention would not see whole clips
    )


def _crops(mels: Tensor, frames: int, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` random crops ``[count, frames, MEL_BINS]`` with their clip indices and first frames."""
    indices = torch.randint(len(mels), (count,), generator=generator)
    starts = torch.randint(mels.shape[1] - frames + 1, (count,), generator=generator)
    offsets = starts[:, None] + torch.arange(frames)
    return mels[indices[:, None], offsets], indices, starts


def train_vae(mels: Tensor, config: MusicBuildConfig, generator: torch.Generator) -> AutoencoderKL:
    """KL autoencoder training on log-mel crops: MSE plus a small KL term (Rombach et al., 2022; no GAN or
    perceptual loss: pure tones need neither)."""
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.vae_steps, warmup=30)
    vae.train()
    for step in range(config.vae_steps):
        crops = _crops(mels, config.vae_crop_frames, config.vae_batch_size, generator)[0].unsqueeze(1)
        posterior = vae.encode(crops).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        mse = F.mse_loss(vae.decode(latents).sample, crops)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        optimise(mse + config.vae_kl_weight * kl, optimizer, schedule, vae.parameters())
        if step % log_interval(config.vae_steps) == 0 or step == config.vae_steps - 1:
            log.info("  vae step %d/%d  mse %.4f  kl %.2f", step + 1, config.vae_steps, mse.item(), kl.item())
    return vae.eval()


@torch.no_grad()
def encode_mels(vae: AutoencoderKL, mels: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Posterior mean and std ``[N,8,32,16]`` of each whole clip's log-mel (unscaled)."""
    means, stds = [], []
    for start in range(0, len(mels), batch_size):
        posterior = vae.encode(mels[start : start + batch_size].unsqueeze(1)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------------------- vocoder


def make_vocoder() -> SpeechT5HifiGan:
    """A small HiFi-GAN generator: 64 mel bands at 100 frames/s up ×160 to 16 kHz."""
    return SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=MEL_BINS,
            sampling_rate=SAMPLE_RATE,
            upsample_initial_channel=64,
            upsample_rates=[5, 4, 4, 2],
            upsample_kernel_sizes=[10, 8, 8, 4],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3, 5]],
            normalize_before=False,
        )
    )


STFT_RESOLUTIONS = ((256, 64), (512, 128), (1024, 256))  # (n_fft, hop) of the multi-resolution STFT loss


# Where the vocoder loss's log stops resolving magnitude: log(magnitude + floor). A hard clamp at HiFi-GAN's
# 1e-5 leaves no gradient below it and makes any faint artefact in an empty band cost as much as a missing
# note, so the small vocoder learnt to stay silent on pure sine tones; the soft floor keeps a gradient there
# (docs/experiments.md, "The toy music build").
VOCODER_LOSS_FLOOR = 0.1


def _stft_magnitude(waveforms: Tensor, n_fft: int, hop: int) -> Tensor:
    spectrum = torch.stft(
        waveforms, n_fft, hop_length=hop, window=torch.hann_window(n_fft, device=waveforms.device), return_complex=True
    )
    return torch.sqrt(spectrum.real**2 + spectrum.imag**2 + 1e-9)


def _log_distance(predicted: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(torch.log(predicted + VOCODER_LOSS_FLOOR), torch.log(target + VOCODER_LOSS_FLOOR))


def vocoder_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """Multi-resolution STFT loss (spectral convergence + log magnitude; Yamamoto et al., 2020,
    arXiv 1910.11480) plus HiFi-GAN's log-mel L1 (Kong et al., 2020), with the logs floored softly at
    ``VOCODER_LOSS_FLOOR``. There is no adversarial term: the toy vocoder only has to keep pitch, rhythm and
    note envelopes recognisable."""
    loss = _log_distance(music.mel_magnitude(predicted), music.mel_magnitude(target))
    for n_fft, hop in STFT_RESOLUTIONS:
        predicted_magnitude = _stft_magnitude(predicted, n_fft, hop)
        target_magnitude = _stft_magnitude(target, n_fft, hop)
        convergence = (target_magnitude - predicted_magnitude).norm() / target_magnitude.norm().clamp_min(1e-6)
        loss = loss + convergence + _log_distance(predicted_magnitude, target_magnitude) / len(STFT_RESOLUTIONS)
    return loss


def train_vocoder(clips: ClipSet, config: MusicBuildConfig, generator: torch.Generator) -> SpeechT5HifiGan:
    """Train the vocoder on aligned crops: mel frame i covers samples [160·i, 160·(i+1))."""
    vocoder = make_vocoder()
    optimizer = torch.optim.AdamW(vocoder.parameters(), lr=2e-3, betas=(0.8, 0.99), weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.vocoder_steps, warmup=30)
    frames = config.vocoder_crop_frames
    vocoder.train()
    for step in range(config.vocoder_steps):
        mels, indices, starts = _crops(clips.mels, frames, config.vocoder_batch_size, generator)
        samples = (starts * HOP_LENGTH)[:, None] + torch.arange(frames * HOP_LENGTH)
        target = clips.waveforms[indices[:, None], samples]
        loss = vocoder_loss(vocoder(mels), target)
        optimise(loss, optimizer, schedule, vocoder.parameters(), clip=1.0)
        if step % log_interval(config.vocoder_steps) == 0 or step == config.vocoder_steps - 1:
            log.info("  vocoder step %d/%d  loss %.3f", step + 1, config.vocoder_steps, loss.item())
    return vocoder.eval()


# ------------------------------------------------------------------------------------------------- unet


def make_unet() -> UNet2DConditionModel:
    """A small MusicLDM-layout UNet for 8×32×16 latents: the CLAP text embedding enters through the class
    embedding ("simple_projection", concatenated to the time embedding); the transformer blocks run with
    ``encoder_hidden_states=None``, so their "cross" attention attends to the block's own features."""
    block_out_channels = (32, 64, 64)
    return UNet2DConditionModel(
        sample_size=music.MEL_FRAMES // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=block_out_channels,
        attention_head_dim=8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=CLAP_DIM,
        class_embeddings_concat=True,
    )


def training_captions(specs: list[ClipSpec], config: MusicDataSettings, generator: torch.Generator) -> list[str]:
    """Each clip's caption: full, partial (each attribute kept with probability 1/2) or empty."""
    draw = torch.rand(len(specs), generator=generator).tolist()
    keep = (torch.rand(len(specs), len(ATTRIBUTES), generator=generator) < 0.5).tolist()
    captions = []
    for spec, value, kept in zip(specs, draw, keep):
        if value < config.empty_caption_fraction:
            captions.append("")
        elif value < config.empty_caption_fraction + config.partial_caption_fraction:
            captions.append(music.make_caption(**{a: getattr(spec, a) if k else None for a, k in zip(ATTRIBUTES, kept)}))
        else:
            captions.append(spec.caption)
    return captions


def train_unet(
    text_embeddings: Tensor,
    latent_means: Tensor,
    latent_stds: Tensor,
    config: MusicBuildConfig,
    generator: torch.Generator,
) -> UNet2DConditionModel:
    """ε-prediction denoising training as LDM (Rombach et al., 2022) on scaled VAE latents, conditioned
    on each clip's caption embedding ``text_embeddings[i]`` through the class embedding. Returns the EMA
    weights."""
    noise_scheduler = DDIMScheduler(**NOISE_SCHEDULE)
    unet = make_unet()
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_learning_rate, weight_decay=0.01)
    schedule = cosine_schedule(optimizer, config.unet_steps, warmup=50)
    unet.train()
    for step in range(config.unet_steps):
        indices = torch.randint(len(latent_means), (config.unet_batch_size,), generator=generator)
        latents = latent_means[indices] + latent_stds[indices] * torch.randn(latent_means[indices].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=None, class_labels=text_embeddings[indices]).sample
        loss = F.mse_loss(prediction, noise)
        optimise(loss, optimizer, schedule, unet.parameters(), clip=1.0)
        with torch.no_grad():
            decay = min(config.unet_ema_decay, (1 + step) / (10 + step))  # EMA warm-up for short runs
            for ema_parameter, parameter in zip(ema_unet.parameters(), unet.parameters()):
                ema_parameter.lerp_(parameter, 1 - decay)
        if step % log_interval(config.unet_steps) == 0 or step == config.unet_steps - 1:
            log.info("  unet step %d/%d  loss %.4f", step + 1, config.unet_steps, loss.item())
    return ema_unet.eval()


def make_scheduler() -> DDIMScheduler:
    """DDIM with MusicLDM's published scheduler config."""
    return DDIMScheduler(
        **NOISE_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


# ------------------------------------------------------------------------------------- preference data


def preference_pairs(
    rewards: Tensor, groups: int, tie_fraction: float, flip_fraction: float, generator: torch.Generator
) -> tuple[list[int], list[int], list[bool]]:
    """Pair the samples of each group (consecutive blocks of ``len(rewards) // groups``) at random, each
    sample in one pair; return (chosen, rejected, tie) per pair.

    The higher reward is chosen; the ``tie_fraction`` of pairs with the closest rewards are ties (their
    order is random); then ``flip_fraction`` of the other pairs are swapped at random, as careless human
    raters would.
    """
    size = len(rewards) // groups
    first, second = [], []
    for group in range(groups):
        order = (group * size + torch.randperm(size, generator=generator)).tolist()
        first += order[0::2]
        second += order[1::2]
    first_t, second_t = torch.tensor(first), torch.tensor(second)
    gap = (rewards[first_t] - rewards[second_t]).abs()
    ties = torch.zeros(len(gap), dtype=torch.bool)
    ties[gap.argsort()[: round(tie_fraction * len(gap))]] = True
    first_wins = rewards[first_t] > rewards[second_t]
    flips = torch.rand(len(gap), generator=generator) < flip_fraction
    coin = torch.rand(len(gap), generator=generator) < 0.5
    first_chosen = torch.where(ties, coin, first_wins ^ flips)
    chosen = torch.where(first_chosen, first_t, second_t).tolist()
    rejected = torch.where(first_chosen, second_t, first_t).tolist()
    return chosen, rejected, ties.tolist()


def build_preference_split(
    model: ClipSampler, prompts: list[str], samples_per_prompt: int, config: MusicDataSettings, generator: torch.Generator
) -> tuple[pa.Table, Tensor, list[str]]:
    """Sample ``samples_per_prompt`` clips per prompt, pair them, label the pairs.

    Returns the audio-alpaca-schema table (plus ``tie`` and the scripted rewards) and the samples with
    their prompts (for quality stats).
    """
    sample_prompts = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    waveforms = model.generate(sample_prompts, config.sampling_steps, config.guidance_scale, generator)
    # Stored as 16-bit FLAC: score exactly what a reader decodes (onset and peak picking are discontinuous, so
    # a requantised copy can score differently).
    stored = [music.audio_bytes(waveform, "FLAC") for waveform in waveforms]
    waveforms = torch.stack([music.read_audio(data) for data in stored])
    rewards = music.toy_reward(waveforms, SAMPLE_RATE, sample_prompts)
    chosen, rejected, ties = preference_pairs(
        rewards, len(prompts), config.tie_fraction, config.label_flip_fraction, generator
    )
    table = pa.table(
        {
            "prompt": pa.array([sample_prompts[i] for i in chosen], pa.string()),
            "chosen": pa.array([stored[i] for i in chosen], pa.binary()),
            "rejected": pa.array([stored[i] for i in rejected], pa.binary()),
            "strategy": pa.array(["resample"] * len(chosen), pa.string()),
            "tie": pa.array(ties, pa.bool_()),
            "chosen_reward": pa.array(rewards[chosen].tolist(), pa.float64()),
            "rejected_reward": pa.array(rewards[rejected].tolist(), pa.float64()),
        }
    )
    return table, waveforms, sample_prompts


def write_preference_splits(
    model: ClipSampler, data_dir: Path, config: MusicDataSettings, stages: BuildStages
) -> dict[str, dict[str, float]]:
    """Write ``data_dir/{train,heldout}.parquet`` from ``model``'s samples (streams 8 and 9 of ``stages``); returns
    the base samples' quality of each split."""
    data_dir.mkdir(exist_ok=True)
    quality = {}
    for offset, (split, per_prompt) in enumerate(
        (("train", config.train_samples_per_prompt), ("heldout", config.heldout_samples_per_prompt))
    ):
        table, waveforms, prompts = build_preference_split(
            model, music.load_prompts(split), per_prompt, config, stages.generator(8 + offset)
        )
        pq.write_table(table, data_dir / f"{split}.parquet", compression="zstd")
        quality[f"base_samples_{split}"] = sample_quality(waveforms, prompts)
        log.info(
            "[%s] %s: %d pairs; base samples: %s", stages.label, split, table.num_rows, quality[f"base_samples_{split}"]
        )
    return quality


def sample_quality(waveforms: Tensor, prompts: list[str]) -> dict[str, float]:
    """How often :func:`~diffalign.toy.music.describe` hears each attribute the prompt names, and the mean
    fidelity, sustain and reward."""
    detected = music.describe(waveforms, SAMPLE_RATE)
    asked = [music.parse_caption(prompt) for prompt in prompts]
    quality: dict[str, float] = {"samples": len(prompts)}
    for attribute in ATTRIBUTES:
        named = [(found[attribute], wanted[attribute]) for found, wanted in zip(detected, asked) if wanted[attribute]]
        quality[f"{attribute}_accuracy"] = float(np.mean([found == wanted for found, wanted in named]))
    quality["all_accuracy"] = float(
        np.mean([all(found[a] == wanted[a] for a in ATTRIBUTES if wanted[a]) for found, wanted in zip(detected, asked)])
    )
    measured = music.measure(waveforms, SAMPLE_RATE)
    quality["mean_fidelity"] = float(music._fidelity(measured, prompts).mean())
    quality["mean_sustain"] = float(measured.sustain.mean())
    quality["mean_reward"] = float(music.toy_reward(waveforms, SAMPLE_RATE, prompts).mean())
    return quality


# ------------------------------------------------------------------------------------------- exemplars


def build_exemplars(
    directory: Path, model: ToyMusicModel, count: int, generator: torch.Generator
) -> None:
    """``count`` sustained, faithful clips of random captions (WAV), with their toy-CLAP audio embeddings."""
    directory.mkdir(parents=True, exist_ok=True)
    clips = make_clips(count, generator, decay_range=(1.0, music.DECAY_RANGE[1]))
    names = [f"{index:02d}.wav" for index in range(count)]
    stored = torch.stack([music.read_audio(music.audio_bytes(waveform)) for waveform in clips.waveforms])
    for name, waveform in zip(names, stored):
        (directory / name).write_bytes(music.audio_bytes(waveform))
    save_file({"clap_embeddings": model.embed_audio(stored).contiguous()}, directory / "clap_embeddings.safetensors")
    spec = {
        "description": "sustained (decay ≥ 1 s), faithful synthetic clips of random captions: the distribution "
        "the scripted preference likes",
        "files": names,
        "prompts": clips.captions,
        "embeddings": "clap_embeddings.safetensors",
    }
    (directory / "exemplars.json").write_text(json.dumps(spec, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ build


def vocoding_quality(model: ToyMusicModel, clips: ClipSet) -> dict[str, dict[str, float]]:
    """Register/tempo accuracy and reward of clips, of their vocoded mels and of VAE + vocoder
    reconstructions, for their own captions."""
    with torch.no_grad():
        vocoded = model.vocoder(clips.mels)[:, :CLIP_SAMPLES]
        latents = model.vae.encode(clips.mels.unsqueeze(1)).latent_dist.mean
        reconstructed = model.vocoder(model.vae.decode(latents).sample.squeeze(1))[:, :CLIP_SAMPLES]
    return {
        name: sample_quality(waveforms, clips.captions)
        for name, waveforms in (("synthesized", clips.waveforms), ("vocoded", vocoded), ("vae_vocoded", reconstructed))
    }


def save_pipeline(pipeline: MusicLDMPipeline, output_dir: Path) -> None:
    pipeline.save_pretrained(output_dir)
    # text_encoder/ also gets the tokenizer and feature extractor, so it is a complete CLAP checkpoint that CLAP
    # scorers load by itself (as laion/clap-htsat-unfused on the hub).
    pipeline.tokenizer.save_pretrained(output_dir / "text_encoder")
    pipeline.feature_extractor.save_pretrained(output_dir / "text_encoder")


@torch.no_grad()
def caption_embeddings(clap: ClapModel, tokenizer: RobertaTokenizer, captions: list[str]) -> Tensor:
    """CLAP's pooled text embedding of each caption ``[N, D]``, each distinct caption encoded once."""
    texts = sorted(set(captions))
    embeddings = clap.get_text_features(**tokenize(tokenizer, texts)).pooler_output
    return embeddings[torch.tensor([texts.index(caption) for caption in captions])]


def text_and_vocoder_quality(model: ToyMusicModel, fresh: ClipSet) -> dict:
    """CLAP's caption retrieval accuracy and the vocoder's reconstruction quality on clips unseen in training."""
    features = clap_features(model.feature_extractor, fresh.waveforms)
    retrieval = clap_retrieval_accuracy(model.text_encoder, model.tokenizer, features, fresh.specs)
    return {"clap_retrieval": retrieval, **vocoding_quality(model, fresh)}


def build_toy_music(output_dir: str | Path, seed: int = 0, config: MusicBuildConfig | None = None) -> dict:
    """Build everything into ``output_dir``; returns (and saves as ``build_info.json``) timings, sizes and
    measured quality."""
    config = config or MusicBuildConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    stages = BuildStages("t2m", seed)
    generator = stages.generator

    with stages.stage("clips and tokenizer"):
        clips = make_clips(config.clips, generator(1))
        tokenizer = build_tokenizer(output_dir / "tokenizer")
        feature_extractor = make_feature_extractor()
        features = clap_features(feature_extractor, clips.waveforms)

    with stages.stage("clap", init_seed=0):
        clap = train_clap(tokenizer, features, clips.specs, config, generator(2))

    with stages.stage("vae", init_seed=1):
        vae = train_vae(clips.mels, config, generator(3))
        latent_means, latent_stds = encode_mels(vae, clips.mels)
        scaling_factor = unit_variance_scaling_factor(latent_means, latent_stds, generator(4))
        vae.register_to_config(scaling_factor=scaling_factor)

    with stages.stage("vocoder", init_seed=2):
        vocoder = train_vocoder(clips, config, generator(5))

    with stages.stage("unet", init_seed=3):
        captions = training_captions(clips.specs, config, generator(6))
        unet = train_unet(
            caption_embeddings(clap, tokenizer, captions),
            latent_means * scaling_factor,
            latent_stds * scaling_factor,
            config,
            generator(7),
        )

    with stages.stage("preference data"):
        pipeline = MusicLDMPipeline(
            vae=vae, text_encoder=clap, tokenizer=tokenizer, feature_extractor=feature_extractor, unet=unet,
            scheduler=make_scheduler(), vocoder=vocoder,
        )
        save_pipeline(pipeline, output_dir)
        # The preference data come from the components exactly as saved and loaded.
        model = ToyMusicModel.load(output_dir)
        quality = write_preference_splits(model, output_dir / "data", config, stages)

    with stages.stage("exemplars and quality"):
        build_exemplars(output_dir / "exemplars", model, config.exemplars, generator(10))
        write_prompt_files(output_dir / "prompts", music.load_prompts)
        quality.update(text_and_vocoder_quality(model, make_clips(config.quality_clips, generator(11))))
        log.info("[t2m] quality: %s", quality)

    folders = ("unet", "vae", "vocoder", "text_encoder", "tokenizer", "feature_extractor", "data", "exemplars")
    sampling = {"scheduler": "DDIM", "steps": config.sampling_steps, "guidance_scale": config.guidance_scale}
    return write_build_info(output_dir, stages, config, folders, quality, sampling=sampling)
