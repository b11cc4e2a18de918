"""The toy text-to-music world on an ACE-Step 1.5 architecture: ``assets/toy-t2m-ace``.

The world of ``assets/toy-t2m`` (:mod:`diffalign.toy.music`: the same synthesized clips, captions, prompt splits
and scripted reward), modelled as ACE-Step 1.5 models music (ACE-Step Team, arXiv 2602.00744; diffusers
``AceStepPipeline``):

1. an ``AutoencoderOobleck`` on the 16 kHz mono waveforms themselves (no mel spectrogram, no vocoder), 640× down
   to 25 latent frames per second as ACE-Step's VAE (1920× at 48 kHz), 8 channels: a 1.28 s clip is ``[32, 8]``.
   It trains on the toy vocoder's multi-resolution STFT loss plus a small KL term;
2. a byte-level BPE ``Qwen2Tokenizer`` whose merges are learnt from the pipeline's own prompt template around the
   caption vocabulary, and a tiny random ``Qwen3Model`` as the text encoder: frozen, as ACE-Step's is, and its
   states still tell the captions apart;
3. a tiny random ``AceStepConditionEncoder``, frozen as well, whose ``silence_latent`` is the VAE's latent of
   silence: the pipeline's timbre path and text2music context read it;
4. an ``AceStepTransformer1DModel`` trained with the ACE-Step family's own flow-matching objective and conditioning
   (:class:`~diffalign.diffusion.families.ace_step.AceStepFamily`), with 10% empty captions (the null condition)
   for guidance;
5. the pipeline saved in the standard layout; audio-alpaca preference pairs sampled by the family from the saved
   pipeline and labelled by the toy reward, exactly as toy-t2m's
   (:func:`diffalign.toy.music_build.build_preference_split`), and the measured quality.

Train on it with ``model.audio_seconds: 1.28`` and ``model.max_text_length: 64`` (``configs/toy_ace_music_dpo.yaml``).
Run it with ``python -m diffalign.toy build t2m-ace``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AceStepPipeline,
    AceStepTransformer1DModel,
    AutoencoderOobleck,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.pipelines.ace_step.modeling_ace_step import AceStepConditionEncoder
from tokenizers.pre_tokenizers import ByteLevel
from torch import Tensor
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from diffalign.diffusion.families import FamilyOptions, load_family
from diffalign.diffusion.families.ace_step import AceStepFamily
from diffalign.toy import music
from diffalign.toy.bpe import train_bpe
from diffalign.toy.music import CLIP_SAMPLES, SAMPLE_RATE
from diffalign.toy.music_build import (
    ClipSet,
    MusicDataSettings,
    caption_variants,
    make_clips,
    optimise,
    sample_quality,
    training_captions,
    variant_caption,
    vocoder_loss,
    write_preference_splits,
)
from diffalign.toy.prompts import write_prompt_files
from diffalign.toy.stages import BuildStages, cosine_schedule, log_interval, write_build_info
from diffalign.toy.t2i_build import DenoiserTraining, train_denoiser

log = logging.getLogger(__name__)

TOY_T2M_ACE_DIR = music.TOY_T2M_DIR.parent / "toy-t2m-ace"
"""Where the built ACE-Step toy lives in a source checkout."""

DOWNSAMPLING = (2, 4, 8, 10)  # 640 samples a frame: 25 frames/s at 16 kHz, ACE-Step's latent rate
LATENT_CHANNELS = 8
FRAME_SAMPLES = 640
AUDIO_SECONDS = CLIP_SAMPLES / SAMPLE_RATE  # 1.28 s: 32 latent frames
TEXT_TOKENS = 64  # the formatted prompt of every caption fits (the pipeline pads to 256)
TEXT_WIDTH = 32
END_OF_TEXT = "<|endoftext|>"


@dataclass
class MusicAceBuildConfig(MusicDataSettings):
    """The VAE's and the transformer's size and training. The defaults build the shipped asset
    (``assets/README.md``)."""

    vae_steps: int = 3000
    vae_batch_size: int = 4
    vae_crop_frames: int = 16  # the VAE is convolutional: it trains on crops, and runs on whole clips
    vae_learning_rate: float = 1e-3
    # The family decodes unscaled latents (as ACE-Step's pipeline), so the KL term keeps them near unit scale.
    vae_kl_weight: float = 1e-2
    # The reward reads the frame-RMS envelope; the STFT losses alone let it drift (docs/experiments.md).
    vae_envelope_weight: float = 1.0
    transformer_layers: int = 4
    transformer_width: int = 64
    transformer_steps: int = 3000
    transformer_batch_size: int = 64
    transformer_learning_rate: float = 1e-3
    transformer_ema_decay: float = 0.998

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vae_crop_frames * FRAME_SAMPLES > CLIP_SAMPLES:
            raise ValueError(f"vae_crop_frames must be at most {CLIP_SAMPLES // FRAME_SAMPLES}")
        if self.transformer_layers % 2:
            raise ValueError(f"transformer_layers must be even (sliding and full attention alternate), got {self.transformer_layers}")
        if not 0 <= self.transformer_ema_decay < 1:
            raise ValueError(f"transformer_ema_decay must be in [0, 1), got {self.transformer_ema_decay!r}")

    @property
    def transformer_training(self) -> DenoiserTraining:
        return DenoiserTraining(
            self.transformer_steps,
            self.transformer_batch_size,
            self.transformer_learning_rate,
            self.transformer_ema_decay,
        )


# ------------------------------------------------------------------------------------------------- VAE


def make_vae() -> AutoencoderOobleck:
    """A small Oobleck autoencoder of 16 kHz mono audio; its encoder's width is twice the latent channels (the
    posterior's mean and scale)."""
    return AutoencoderOobleck(
        encoder_hidden_size=2 * LATENT_CHANNELS,
        downsampling_ratios=list(DOWNSAMPLING),
        channel_multiples=[1, 2, 2, 4],
        decoder_channels=16,
        decoder_input_channels=LATENT_CHANNELS,
        audio_channels=1,
        sampling_rate=SAMPLE_RATE,
    )


def envelope_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """``Σ|rms(ŷ) − rms(y)| / Σ rms(y)``: the relative L1 distance of the 20 ms frame-RMS envelopes, which the toy
    reward's sustain is computed from (:func:`diffalign.toy.music.measure`)."""
    predicted_rms, target_rms = music.frame_rms(predicted), music.frame_rms(target)
    return (predicted_rms - target_rms).abs().mean() / target_rms.mean().clamp_min(1e-6)


def train_vae(clips: ClipSet, config: MusicAceBuildConfig, generator: torch.Generator) -> AutoencoderOobleck:
    """Train on frame-aligned crops of the clips: the toy vocoder's STFT losses and the envelope loss of the
    reconstruction from a posterior sample, plus ``vae_kl_weight`` × the KL per latent element."""
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, betas=(0.8, 0.99), weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.vae_steps, warmup=30)
    crop = config.vae_crop_frames * FRAME_SAMPLES
    starts_per_clip = (CLIP_SAMPLES - crop) // FRAME_SAMPLES + 1
    vae.train()
    for step in range(config.vae_steps):
        indices = torch.randint(len(clips.waveforms), (config.vae_batch_size,), generator=generator)
        starts = torch.randint(starts_per_clip, (config.vae_batch_size,), generator=generator) * FRAME_SAMPLES
        target = clips.waveforms[indices[:, None], starts[:, None] + torch.arange(crop)]
        posterior = vae.encode(target.unsqueeze(1)).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        kl = posterior.kl().mean() / latents[0].numel()
        reconstruction = vae.decode(latents).sample.squeeze(1)
        loss = (
            vocoder_loss(reconstruction, target)
            + config.vae_envelope_weight * envelope_loss(reconstruction, target)
            + config.vae_kl_weight * kl
        )
        optimise(loss, optimizer, schedule, vae.parameters(), clip=1.0)
        if step % log_interval(config.vae_steps) == 0 or step == config.vae_steps - 1:
            log.info("  vae step %d/%d  loss %.3f  kl %.2f", step + 1, config.vae_steps, loss.item(), kl.item())
    return vae.eval()


@torch.no_grad()
def silence_latent(vae: AutoencoderOobleck, frames: int) -> Tensor:
    """``[1, frames, C]``: the posterior mean of silence, one interior frame repeated (edge frames see padding)."""
    latents = vae.encode(torch.zeros(1, 1, 8 * FRAME_SAMPLES)).latent_dist.mean  # [1, C, 8]
    return latents[:, :, 4:5].transpose(1, 2).repeat(1, frames, 1)


# ----------------------------------------------------------------------------------------------- text side


def formatted_prompt(caption: str) -> str:
    """A caption in the pipeline's SFT template, as :class:`AceStepFamily` encodes it (its metadata: the clip's
    duration). The template method reads only a static method of the pipeline, so the class stands in for it."""
    text, _ = AceStepPipeline._format_prompt(AceStepPipeline, caption, lyrics="", audio_duration=AUDIO_SECONDS)
    return text


def lyrics_prompt() -> str:
    _, lyrics = AceStepPipeline._format_prompt(AceStepPipeline, "", lyrics="", audio_duration=AUDIO_SECONDS)
    return lyrics


def build_tokenizer(directory: Path) -> Qwen2Tokenizer:
    """Qwen's byte-level BPE with merges learnt on every formatted caption and the empty lyrics: the template's
    words and the caption words become single tokens. ``<|endoftext|>`` pads on the right, as ACE-Step encodes."""
    vocab = {END_OF_TEXT: 0}
    for character in sorted(ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    corpus = [formatted_prompt(variant_caption(variant)) for variant in caption_variants()]
    train_bpe(
        tokenizer.backend_tokenizer,
        [*corpus, formatted_prompt(""), lyrics_prompt()],
        vocab_size=2000,
        special_tokens=[END_OF_TEXT],
        alphabet=ByteLevel.alphabet(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    tokenizer = Qwen2Tokenizer.from_pretrained(
        directory, pad_token=END_OF_TEXT, padding_side="right", model_max_length=TEXT_TOKENS
    )
    tokenizer.save_pretrained(directory)
    longest = max(len(tokenizer(text).input_ids) for text in corpus)
    if longest > TEXT_TOKENS:
        raise RuntimeError(f"a formatted caption takes {longest} tokens, more than TEXT_TOKENS = {TEXT_TOKENS}")
    return tokenizer


def make_text_encoder(vocab_size: int) -> Qwen3Model:
    return Qwen3Model(
        Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
        )
    ).eval()


# ------------------------------------------------------------------------------------------------ transformer


def make_condition_encoder(config: MusicAceBuildConfig) -> AceStepConditionEncoder:
    heads = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=config.transformer_width // 2)
    return AceStepConditionEncoder(
        hidden_size=config.transformer_width,
        intermediate_size=2 * config.transformer_width,
        text_hidden_dim=TEXT_WIDTH,
        timbre_hidden_dim=LATENT_CHANNELS,
        num_lyric_encoder_hidden_layers=1,
        num_timbre_encoder_hidden_layers=1,
        sliding_window=16,
        **heads,
    ).eval()


def make_transformer(config: MusicAceBuildConfig) -> AceStepTransformer1DModel:
    """ACE-Step 1.5's DiT at toy size: patches of 2 frames (16 tokens a clip), alternating sliding-window and full
    attention; its input is the noisy latents beside the text2music context (silence latent and chunk mask)."""
    layer_types = ["sliding_attention", "full_attention"] * (config.transformer_layers // 2)
    return AceStepTransformer1DModel(
        hidden_size=config.transformer_width,
        intermediate_size=2 * config.transformer_width,
        num_hidden_layers=len(layer_types),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=config.transformer_width // 2,
        in_channels=3 * LATENT_CHANNELS,
        audio_acoustic_hidden_dim=LATENT_CHANNELS,
        encoder_hidden_size=config.transformer_width,
        patch_size=2,
        sliding_window=8,
        layer_types=layer_types,
    )


def train_transformer(
    family: AceStepFamily, clips: ClipSet, config: MusicAceBuildConfig, generator: torch.Generator
) -> AceStepTransformer1DModel:
    """Flow matching on the VAE latents of the clips, with full, partial or empty captions."""
    with torch.no_grad():
        posteriors = [family.encode(clips.waveforms[i : i + 200].unsqueeze(1)) for i in range(0, len(clips.waveforms), 200)]
    means = family.to_latents(torch.cat([posterior.mean for posterior in posteriors]))
    stds = family.to_latents(torch.cat([posterior.std for posterior in posteriors]))  # the normalisation's scale is 1
    captions = training_captions(clips.specs, config, generator)
    texts = sorted(set(captions))
    embeds = family.encode_prompts(texts)
    return train_denoiser(
        family,
        family.denoiser,
        means,
        stds,
        family.denoiser_inputs(embeds, {}),
        torch.tensor([texts.index(caption) for caption in captions]),
        config.transformer_training,
        generator,
    )


# ------------------------------------------------------------------------------------------------- build

FAMILY_OPTIONS = FamilyOptions(audio_seconds=AUDIO_SECONDS, max_text_length=TEXT_TOKENS)


@dataclass
class FamilySampler:
    """The ACE-Step family's sampler (the trainers' and the evaluation's) behind toy-t2m's ``generate``."""

    family: AceStepFamily
    batch_size: int = 64

    @torch.no_grad()
    def generate(
        self, prompts: list[str], steps: int, guidance_scale: float, generator: torch.Generator
    ) -> Tensor:
        """Clips ``[B, CLIP_SAMPLES]``; clip i from a generator seeded by the i-th draw of ``generator``."""
        seeds = torch.randint(2**62, (len(prompts),), generator=generator).tolist()
        clips = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            audio = self.family.generate(
                self.family.denoiser,
                chunk,
                [torch.Generator().manual_seed(seed) for seed in seeds[start : start + len(chunk)]],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
            )
            clips.append(audio.waveforms[:, :CLIP_SAMPLES])
        return torch.cat(clips)


@torch.no_grad()
def round_trip(vae: AutoencoderOobleck, waveforms: Tensor, batch_size: int = 64) -> Tensor:
    """Clips through the VAE (posterior mean), ``[B, CLIP_SAMPLES]``."""
    chunks = []
    for start in range(0, len(waveforms), batch_size):
        latents = vae.encode(waveforms[start : start + batch_size].unsqueeze(1)).latent_dist.mean
        chunks.append(vae.decode(latents).sample.squeeze(1)[:, :CLIP_SAMPLES])
    return torch.cat(chunks)


def vae_quality(vae: AutoencoderOobleck, clips: ClipSet) -> dict[str, dict[str, float] | float]:
    """What the VAE keeps of fresh clips: the attributes heard before and after, and how well the sustain that
    labels the pairs survives (correlation and mean absolute change)."""
    reconstructed = round_trip(vae, clips.waveforms)
    before, after = music.measure(clips.waveforms).sustain, music.measure(reconstructed).sustain
    return {
        "synthesized": sample_quality(clips.waveforms, clips.captions),
        "vae": sample_quality(reconstructed, clips.captions),
        "sustain_correlation": float(torch.corrcoef(torch.stack([before, after]))[0, 1]),
        "sustain_mean_abs_change": float((after - before).abs().mean()),
    }


def build_toy_music_ace(output_dir: str | Path, seed: int = 0, config: MusicAceBuildConfig | None = None) -> dict:
    """Build the ACE-Step toy into ``output_dir``; returns (and saves as ``build_info.json``) timings, sizes and
    measured quality."""
    config = config or MusicAceBuildConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    stages = BuildStages("t2m-ace", seed)
    generator = stages.generator

    with stages.stage("clips and tokenizer"):
        clips = make_clips(config.clips, generator(1))
        tokenizer = build_tokenizer(output_dir / "tokenizer")

    with stages.stage("vae", init_seed=1):
        vae = train_vae(clips, config, generator(3))

    with stages.stage("transformer", init_seed=2):
        condition_encoder = make_condition_encoder(config)
        condition_encoder.silence_latent.copy_(silence_latent(vae, condition_encoder.silence_latent.shape[1]))
        AceStepPipeline(
            vae=vae,
            text_encoder=make_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
            transformer=make_transformer(config),
            condition_encoder=condition_encoder,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),  # as ACE-Step 1.5 ships
        ).save_pretrained(output_dir)
        # Trained through the family loaded from the saved folder: the conditioning it will be aligned with.
        family = load_family(str(output_dir), options=FAMILY_OPTIONS)
        train_transformer(family, clips, config, generator(7)).save_pretrained(output_dir / "transformer")

    with stages.stage("preference data"):
        family = load_family(str(output_dir), options=FAMILY_OPTIONS)
        quality = write_preference_splits(FamilySampler(family), output_dir / "data", config, stages)
        write_prompt_files(output_dir / "prompts", music.load_prompts)
        quality["vae_round_trip"] = vae_quality(family.vae, make_clips(config.quality_clips, generator(11)))
        log.info("[t2m-ace] VAE round trip: %s", quality["vae_round_trip"])

    return write_build_info(
        output_dir,
        stages,
        config,
        ("transformer", "vae", "text_encoder", "tokenizer", "condition_encoder", "data"),
        quality,
        family_options={"audio_seconds": AUDIO_SECONDS, "max_text_length": TEXT_TOKENS},
        sampling={"steps": config.sampling_steps, "guidance_scale": config.guidance_scale},
    )


def build(output_dir: str | Path, seed: int = 0) -> None:
    build_toy_music_ace(output_dir, seed)
