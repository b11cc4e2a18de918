"""Tiny SD1.5-like and SDXL-like pipelines with random weights, saved as real diffusers directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "small", "large", "on", "white"]


def tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in WORDS:
        vocab[f"{word}</w>"] = len(vocab)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(f"{letter}</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def text_config(hidden_size: int, vocab_size: int, projection_dim: int = 8) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=16,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


def build_tiny_sd(directory: Path, prediction_type: str = "epsilon") -> Path:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(directory / "tokenizer")
    text_encoder = CLIPTextModel(text_config(16, len(tokenizer)))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return directory


def build_tiny_sdxl(directory: Path, prediction_type: str = "epsilon") -> Path:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(directory / "tokenizer")
    tokenizer_2 = tiny_tokenizer(directory / "tokenizer_2")
    text_encoder = CLIPTextModel(text_config(16, len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(16, len(tokenizer), projection_dim=16))
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
        transformer_layers_per_block=1,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler(prediction_type),
    )
    pipeline.save_pretrained(directory)
    return directory
