"""Tiny models with random weights, saved as real diffusers and transformers directories: SD1.5-like, SDXL-like,
the flow-matching SD3, FLUX.1 and Qwen-Image layouts (16-channel VAEs with their published normalisations), SANA's
(a 32-channel DC-AE, Gemma-2), FLUX.2 [klein]'s (Qwen3, a batch-normalised VAE), a Llama, and CLIP and CLAP reward models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from helpers import TOY_LLM
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

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


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def t5_tokenizer(model_max_length: int = 24) -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{letter}", -1.0) for letter in LETTERS] + [(letter, -1.0) for letter in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2)
    )


def tiny_vae(latent_channels: int = 4, **factors: float) -> AutoencoderKL:
    """An 2×-downsampling KL VAE; ``factors``: its ``scaling_factor`` and ``shift_factor``."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        **factors,
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


def build_tiny_sd3(directory: Path, drop_t5: bool = False) -> Path:
    """SD3 layout: CLIP-L (8) and CLIP-G (16) with projections, T5 of width 32 (the joint attention width),
    pooled 8 + 8, a 16-channel VAE with SD3's factors, the published scheduler shift 3.0; 16 px → 8×8 latents."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(directory / "tokenizer")
    pipeline = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(text_config(8, len(tokenizer), projection_dim=8)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config(16, len(tokenizer), projection_dim=8)),
        tokenizer_2=tiny_tokenizer(directory / "tokenizer_2"),
        text_encoder_3=None if drop_t5 else tiny_t5(32),
        tokenizer_3=None if drop_t5 else t5_tokenizer(),
    )
    pipeline.save_pretrained(directory)
    return directory


def build_tiny_flux(directory: Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1 layout: CLIP-L pooled (8), T5 of width 32, a 16-channel VAE with FLUX's factors packed 2×2 into 64
    input channels, rotary axes (2, 2, 4) over head width 8, the published dynamically shifted scheduler."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(directory / "tokenizer")
    pipeline = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=8,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        ),
        vae=tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(text_config(8, len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(32),
        tokenizer_2=t5_tokenizer(),
    )
    pipeline.save_pretrained(directory)
    return directory


def qwen_tokenizer(directory: Path) -> Qwen2Tokenizer:
    """A byte-level BPE without merges (one token per UTF-8 byte) and Qwen's chat tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    end = "<|endoftext|>"
    tokenizer = Qwen2Tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), eos_token=end, pad_token=end)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def build_tiny_qwen_image(directory: Path) -> Path:
    """Qwen-Image layout: a one-layer Qwen2.5-VL of width 32, a 16-channel video VAE with the published per-channel
    mean and std, packed 2×2 into 64 input channels, rotary axes (2, 2, 4), the published scheduler."""
    torch.manual_seed(0)
    published = Path(__file__).parents[1] / "configs" / "models" / "qwen-image"
    vae_config = json.loads((published / "vae.json").read_text())
    tokenizer = qwen_tokenizer(directory / "tokenizer")
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 1024,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
                "bos_token_id": None,
                "eos_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 32,
                "patch_size": 2,
                "spatial_merge_size": 1,
                "temporal_patch_size": 1,
                "window_size": 4,
                "fullatt_block_indexes": [0],
            },
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    pipeline = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(2, 2, 4),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(json.loads((published / "scheduler.json").read_text())),
        vae=AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=vae_config["latents_mean"],
            latents_std=vae_config["latents_std"],
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipeline.save_pretrained(directory)
    return directory


# Qwen3's chat template cut to what Flux2KleinPipeline renders: user turns and the generation prompt, thinking off.
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tiny_flux2_klein(directory: Path) -> Path:
    """FLUX.2 [klein] layout: a 27-layer Qwen3 of width 16 (the pipeline reads layers 9, 18 and 27), a two-stage
    VAE (factor 2) with FLUX.2's 32 latent channels and random batch-norm statistics, a one-block transformer on
    the 128 patchified channels, FLUX.1-dev's scheduler as diffusers' FLUX.2 conversion takes it."""
    torch.manual_seed(0)
    tokenizer = qwen_tokenizer(directory / "tokenizer")
    tokenizer.chat_template = QWEN3_TEMPLATE
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(std=0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler_config = Path(__file__).parents[1] / "configs" / "models" / "flux1-dev" / "scheduler.json"
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(json.loads(scheduler_config.read_text())),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(
            in_channels=128,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=48,
            timestep_guidance_channels=16,
            axes_dims_rope=(2, 2, 2, 2),
            guidance_embeds=False,
        ),
        is_distilled=False,
    )
    pipeline.save_pretrained(directory)
    return directory


def gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's special tokens and one token per UTF-8 byte (its byte fallback), without merges."""
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    return GemmaTokenizer(vocab=vocab, merges=[])


def build_tiny_sana(directory: Path) -> Path:
    """SANA layout: a one-layer Gemma-2 of width 32, a two-stage DC-AE (factor 2) with SANA's 32 latent channels and
    scaling factor, a one-block linear-attention transformer, the Euler scheduler with SANA's flow shift 3."""
    torch.manual_seed(0)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            sliding_window=2048,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    )
    blocks = ["ResBlock", "EfficientViTBlock"]
    vae = AutoencoderDC(
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=8,
        patch_size=1,
    )
    pipeline = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipeline.save_pretrained(directory)
    return directory


def build_tiny_llm(directory: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """A randomly initialised two-layer Llama with ``tokenizer`` (default: the toy LLM's), saved as a
    transformers directory."""
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(TOY_LLM)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_clip(directory: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in ("a", "red", "blue", "dog", "square", "photo", "of"):
        vocab[f"{word}</w>"] = len(vocab)
    for letter in LETTERS:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(f"{letter}</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=32
    ).save_pretrained(directory)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(vocab),
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(**tower, image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


def save_tiny_clap(directory: Path) -> Path:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    directory.mkdir(parents=True)
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[f"Ġ{letter}"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(directory)
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            projection_dim=8,
        ),
        audio_config=dict(
            num_mel_bins=64,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            hidden_size=32,
            patch_embeds_hidden_size=16,
            enable_fusion=False,
            projection_dim=8,
            spec_size=128,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(directory)
    # A 1 s window (the real models use 10 s) keeps the mel spectrogram small.
    ClapFeatureExtractor(feature_size=64, max_length_s=1).save_pretrained(directory)
    return directory
