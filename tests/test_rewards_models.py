"""Every model-based scorer on tiny random models saved the way real checkpoints are (transformers directories,
open_clip config + state dict, aesthetic MLP state dict), against scores computed independently from the raw
models: values, ranges, batch invariance, PIL vs tensor input, dtype and device, and gradients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_images
from PIL import Image
from tiny_pipelines import LETTERS, save_tiny_clap, save_tiny_clip

from diffalign.rewards import Audio, EmbeddedReference, build_scorer, gaussian_stats, lambda_harmonic_reward
from diffalign.rewards.aesthetic import AestheticHead

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = ["a red dog", "photo of a blue square", "a"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --- tiny models, saved like real checkpoints -------------------------------------------------------------------


def save_tiny_align(directory: Path) -> Path:
    from transformers import AlignConfig, AlignModel, BertTokenizer, EfficientNetImageProcessor

    directory.mkdir(parents=True)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "blue",
        "dog",
        "photo",
        "of",
        "square",
        *LETTERS,
    ]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    config = AlignConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        ),
        vision_config=dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=32),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = AlignModel(config)
    for parameter in model.vision_model.parameters():  # the tiny EfficientNet's default init pools to ~1e-18
        torch.nn.init.normal_(parameter, std=0.3)
    model.save_pretrained(directory)
    # ALIGN maps pixels to [-1, 1] (rescale with offset) and does not normalise.
    EfficientNetImageProcessor(
        size={"height": 32, "width": 32},
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
    ).save_pretrained(directory)
    return directory


def save_tiny_vit(directory: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def save_tiny_open_clip_config(directory: Path) -> Path:
    directory.mkdir(parents=True)
    config = {
        "model_cfg": {
            "embed_dim": 8,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_models")
    return {
        "clip": save_tiny_clip(root / "clip"),
        "align": save_tiny_align(root / "align"),
        "vit": save_tiny_vit(root / "vit"),
        "open_clip": save_tiny_open_clip_config(root / "open_clip"),
        "clap": save_tiny_clap(root / "clap"),
    }


def as_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(image) for image in array]


def assert_batch_invariant(scorer, samples, prompts=None, **kwargs):
    batch = scorer(samples, prompts, **kwargs)
    single = torch.cat(
        [
            scorer(samples[i : i + 1], None if prompts is None else prompts[i : i + 1], **kwargs)
            for i in range(len(samples))
        ]
    )
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)
    return batch


# --- independent references: the raw transformers models, not our encoders --------------------------------------


def clip_cosines(directory: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(image_i, prompt_i) from CLIPModel.forward's logits, with the processor run on PIL images."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(directory).eval()
    tokens = AutoTokenizer.from_pretrained(directory)(prompts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(directory)(images=as_pil(images), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        logits = model(**tokens, pixel_values=pixels).logits_per_image
    return logits.diagonal() / model.logit_scale.exp(), model.logit_scale.exp().item()


def test_clip_score_pickscore_and_clip_t_follow_their_definitions(models):
    images = random_images(3)
    cosine, logit_scale = clip_cosines(models["clip"], images, PROMPTS)
    with torch.no_grad():
        clip_score = assert_batch_invariant(
            build_scorer("clip_score", model=str(models["clip"])), images, PROMPTS
        )
        pickscore = build_scorer("pickscore", model=str(models["clip"]), processor=None)(images, PROMPTS)
        clip_t = build_scorer("clip_t", model=str(models["clip"]))(as_pil(images), PROMPTS)
    torch.testing.assert_close(clip_score, 100 * cosine.clamp(min=0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pickscore, logit_scale * cosine, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clip_t, cosine, rtol=1e-4, atol=1e-5)
    assert (clip_t.abs() <= 1).all() and (clip_score >= 0).all() and (clip_score <= 100).all()
    assert (cosine < 0).any() and (cosine > 0).any()  # the clamp was exercised


def test_pil_and_tensor_inputs_agree_and_any_size_is_resized(models):
    scorer = build_scorer("clip_t", model=str(models["clip"]))
    images = random_images(2, size=(40, 56), seed=1)
    with torch.no_grad():
        from_tensor, from_pil = scorer(images, PROMPTS[:2]), scorer(as_pil(images), PROMPTS[:2])
    # Resizing float tensors and uint8 PIL images rounds differently; the cosines agree closely.
    torch.testing.assert_close(from_tensor, from_pil, atol=2e-3, rtol=0)


def test_reward_gradients_reach_the_pixels(models):
    scorer = build_scorer("clip_score", model=str(models["clip"]))
    images = random_images(2).requires_grad_()
    scorer(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_of_scores(models, device):
    images = random_images(2)
    reference = build_scorer("clip_t", model=str(models["clip"]))(images, PROMPTS[:2]).double()
    scorer = build_scorer("clip_t", model=str(models["clip"]), device=device, dtype="float64")
    scores = scorer(images.to(device), PROMPTS[:2])
    assert scores.dtype == torch.float64 and scores.device.type == device
    torch.testing.assert_close(scores.cpu(), reference, rtol=1e-4, atol=1e-5)
    # Moving the module moves its outputs too.
    scorer.to(torch.float32)
    assert scorer(images.to(device), PROMPTS[:2]).dtype == torch.float32


def test_prompts_are_checked(models):
    scorer = build_scorer("clip_t", model=str(models["clip"]))
    with pytest.raises(ValueError, match="list of 2 prompt strings"):
        scorer(random_images(2), ["only one"])
    with pytest.raises(ValueError, match="prompts=None"):
        scorer(random_images(2))


# --- image–image similarity and the λ-Harmonic reward -----------------------------------------------------------


def test_clip_i_and_dino_are_mean_cosines_to_the_reference(models):
    from transformers import CLIPImageProcessor, CLIPModel, ViTImageProcessor, ViTModel

    images, reference = random_images(3, seed=2), random_images(4, seed=3)
    clip = CLIPModel.from_pretrained(models["clip"]).eval()
    clip_processor = CLIPImageProcessor.from_pretrained(models["clip"])
    vit = ViTModel.from_pretrained(models["vit"]).eval()
    vit_processor = ViTImageProcessor.from_pretrained(models["vit"])
    with torch.no_grad():

        def clip_embed(x):
            return F.normalize(
                clip.get_image_features(
                    **clip_processor(images=as_pil(x), return_tensors="pt")
                ).pooler_output,
                dim=-1,
            )

        def dino_embed(x):
            return F.normalize(
                vit(**vit_processor(images=as_pil(x), return_tensors="pt")).last_hidden_state[:, 0], dim=-1
            )

        for name, model, embed in (
            ("clip_i", models["clip"], clip_embed),
            ("dino", models["vit"], dino_embed),
        ):
            expected = (embed(images) @ embed(reference).T).mean(1)
            scorer = build_scorer(name, model=str(model))
            scores = assert_batch_invariant(scorer, images, reference=reference)
            torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
            assert (scores.abs() <= 1 + 1e-6).all()
            # A prepared reference gives the same scores, and an image is most similar to itself.
            prepared = scorer.prepare_reference(reference)
            assert isinstance(prepared, EmbeddedReference) and prepared.embeddings.shape[0] == 4
            torch.testing.assert_close(scorer(images, reference=prepared), scores)
            assert scorer(images[:1], reference=images[:1]).item() == pytest.approx(1.0, abs=1e-5)
            with pytest.raises(ValueError, match="needs `reference`"):
                scorer(images)


def test_lambda_harmonic_with_align_follows_the_formula(models):
    from transformers import AlignModel, AutoTokenizer, EfficientNetImageProcessor

    images, reference = random_images(3, seed=4), random_images(2, seed=5)
    model = AlignModel.from_pretrained(models["align"]).eval()
    processor = EfficientNetImageProcessor.from_pretrained(models["align"])
    tokens = AutoTokenizer.from_pretrained(models["align"])(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():

        def embed(x):
            return F.normalize(
                model.get_image_features(**processor(images=as_pil(x), return_tensors="pt")).pooler_output,
                dim=-1,
            )

        image_embeddings = embed(images)
        text_embeddings = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        s_i2i = (image_embeddings @ embed(reference).T).mean(1)
        s_t2i = (image_embeddings * text_embeddings).sum(1)
        for lam in (0.0, 0.5, 1.0):
            scorer = build_scorer("lambda_harmonic", model=str(models["align"]), lam=lam)
            scores = assert_batch_invariant(scorer, images, PROMPTS, reference=reference)
            expected = 1 / (lam / (s_i2i + 1e-8) + (1 - lam) / (s_t2i + 1e-8))
            torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, s_i2i, rtol=1e-4, atol=1e-5)  # λ = 1: image similarity only
        torch.testing.assert_close(scores, lambda_harmonic_reward(s_i2i, s_t2i, 1.0), rtol=1e-4, atol=1e-5)


# --- open_clip (HPSv2 path) and the aesthetic predictor ----------------------------------------------------------


def test_hpsv2_loads_an_open_clip_checkpoint_and_scores_cosines(models, tmp_path):
    import open_clip

    reference_model = open_clip.create_model(
        f"local-dir:{models['open_clip']}", pretrained=None, load_weights=False
    ).eval()
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": reference_model.state_dict()}, checkpoint)  # HPSv2's file layout
    images = random_images(3, seed=6)
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{models['open_clip']}")
    with torch.no_grad():
        image_features = reference_model.encode_image(
            torch.stack([preprocess(image) for image in as_pil(images)]), normalize=True
        )
        text_features = reference_model.encode_text(tokenizer(PROMPTS), normalize=True)
        expected = (image_features * text_features).sum(1)
        scorer = build_scorer("hpsv2", model=str(models["open_clip"]), checkpoint=str(checkpoint))
        scores = assert_batch_invariant(scorer, images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_open_clip_directory_with_weights_and_the_clip_score_backend(models, tmp_path):
    import shutil

    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path / "open_clip_with_weights"
    shutil.copytree(models["open_clip"], directory)
    reference_model = open_clip.create_model(
        f"local-dir:{directory}", pretrained=None, load_weights=False
    ).eval()
    save_file(reference_model.state_dict(), directory / "open_clip_model.safetensors")
    images = random_images(2, seed=7)
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    with torch.no_grad():
        image_features = reference_model.encode_image(
            torch.stack([preprocess(image) for image in as_pil(images)]), normalize=True
        )
        text_features = reference_model.encode_text(tokenizer(PROMPTS[:2]), normalize=True)
        expected = (image_features * text_features).sum(1).clamp(min=0)
        scorer = build_scorer("clip_score", encoder="open_clip", model=str(directory), scale=1.0)
        torch.testing.assert_close(scorer(images, PROMPTS[:2]), expected, rtol=1e-4, atol=1e-5)


def test_open_clip_refuses_to_run_with_random_weights(models):
    from diffalign.rewards import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="has no weights: pass `checkpoint`"):
        build_scorer("clip_score", encoder="open_clip", model=str(models["open_clip"]))


def test_aesthetic_is_the_mlp_on_unit_clip_embeddings(models, tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    head = AestheticHead(embedding_dim=8).eval()
    head_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), head_file)
    assert sorted(head.state_dict()) == sorted(
        f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")
    )  # the released file's keys
    images = random_images(3, seed=8)
    clip = CLIPModel.from_pretrained(models["clip"]).eval()
    pixels = CLIPImageProcessor.from_pretrained(models["clip"])(images=as_pil(images), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        embeddings = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        x = embeddings
        for index in (0, 2, 4, 6, 7):  # linear layers only; dropout is off at evaluation
            layer = head.layers[index]
            x = x @ layer.weight.T + layer.bias
        scorer = build_scorer("aesthetic", head=str(head_file), model=str(models["clip"]))
        scores = assert_batch_invariant(scorer, images)
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_aesthetic_head_file_errors(models, tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth is not an aesthetic head for 8-d embeddings"):
        build_scorer("aesthetic", head=str(tmp_path / "wrong.pth"), model=str(models["clip"]))
    with pytest.raises(ValueError, match="aesthetic needs `head`"):
        build_scorer("aesthetic", model=str(models["clip"]))


# --- CLAP, FAD and Vendi on audio --------------------------------------------------------------------------------


def random_audio(count: int, seconds: float = 0.5, rate: int = 16_000, seed: int = 0) -> Audio:
    generator = torch.Generator().manual_seed(seed)
    return Audio(0.3 * torch.randn(count, int(seconds * rate), generator=generator), rate)


def clap_embeddings(directory: Path, waveforms_48k: list[np.ndarray], texts: list[str]):
    """Embeddings from ClapModel with the processor called as its documentation shows (unfused: rand_trunc)."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    model = ClapModel.from_pretrained(directory).eval()
    features = ClapFeatureExtractor.from_pretrained(directory)(
        waveforms_48k, sampling_rate=48_000, truncation="rand_trunc", return_tensors="pt"
    )
    tokens = AutoTokenizer.from_pretrained(directory)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        audio = F.normalize(model.get_audio_features(**features).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    return audio, text


def test_clap_score_resamples_to_48k_and_scores_cosines(models):
    import soxr

    audio = random_audio(3)
    resampled = [soxr.resample(clip, 16_000, 48_000).astype(np.float32) for clip in audio.waveforms.numpy()]
    audio_embeddings, text_embeddings = clap_embeddings(models["clap"], resampled, PROMPTS)
    scorer = build_scorer("clap_score", model=str(models["clap"]))
    with torch.no_grad():
        scores = assert_batch_invariant(scorer, audio, PROMPTS)
        at_48k = scorer(Audio(torch.from_numpy(np.stack(resampled)), 48_000), PROMPTS)
    torch.testing.assert_close(scores, (audio_embeddings * text_embeddings).sum(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at_48k, scores, rtol=1e-4, atol=1e-5)
    assert scores.shape == (3,) and (scores.abs() <= 1).all()


def test_clap_scores_of_long_clips_are_deterministic(models):
    scorer = build_scorer("clap_score", model=str(models["clap"]))
    # Longer than the 1 s window: cropped from the start (at the model's rate, so no resampling edge).
    audio = random_audio(2, seconds=2.5, rate=48_000, seed=1)
    with torch.no_grad():
        first, second = scorer(audio, PROMPTS[:2]), scorer(audio, PROMPTS[:2])
        cropped = scorer(Audio(audio.waveforms[:, :48_000], 48_000), PROMPTS[:2])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, cropped, rtol=1e-4, atol=1e-5)


def test_fad_and_vendi_on_clap_embeddings(models):
    audio, reference = random_audio(4, seed=2), random_audio(6, seed=3)
    exemplar_texts = ["a dog", "rain", "a piano", "wind"]
    with torch.no_grad():
        encoder = build_scorer("clap_score", model=str(models["clap"])).encoder
        embeddings, reference_embeddings = encoder.embed(audio), encoder.embed(reference)
        text_stats = gaussian_stats(encoder.embed_texts(exemplar_texts))
        audio_stats = gaussian_stats(reference_embeddings)

        full = build_scorer("fad", model=str(models["clap"]))(audio, reference=reference)
        per_sample = build_scorer("fad", model=str(models["clap"]), reduction="per_sample")(
            audio, reference=exemplar_texts
        )
        vendi = build_scorer("vendi", model=str(models["clap"]))(audio)

    mean, cov = audio_stats.mean.numpy(), audio_stats.cov.numpy()
    import scipy.linalg

    set_mean, set_cov = embeddings.double().mean(0).numpy(), np.cov(embeddings.double().numpy(), rowvar=False)
    eye = 1e-6 * np.eye(len(mean))
    expected_full = (
        ((mean - set_mean) ** 2).sum()
        + np.trace(cov + eye)
        + np.trace(set_cov + eye)
        - 2 * np.trace(scipy.linalg.sqrtm((cov + eye) @ (set_cov + eye)).real)
    )
    assert full.shape == () and full.item() == pytest.approx(expected_full, rel=1e-4, abs=1e-6)
    # Point masses against the text exemplars' Gaussian: ‖x − μ‖² + tr Σ (+ ε·D from the regularised Σ).
    expected_per_sample = ((embeddings.double() - text_stats.mean) ** 2).sum(1) + text_stats.cov.trace()
    torch.testing.assert_close(per_sample.double(), expected_per_sample, rtol=1e-5, atol=1e-5)
    normalised = F.normalize(embeddings.double(), dim=1)
    eigenvalues = torch.linalg.eigvalsh(normalised @ normalised.T / 4).clamp(min=1e-30)
    assert vendi.item() == pytest.approx(torch.exp(-(eigenvalues * eigenvalues.log()).sum()).item(), rel=1e-4)
    assert 1 <= vendi.item() <= 4


# --- toy rewards ------------------------------------------------------------------------------------------------


def test_toy_t2i_scorer_wraps_the_toy_reward():
    from diffalign.toy.t2i import sample_scenes, toy_reward

    scenes = sample_scenes(4, torch.Generator().manual_seed(0))
    scorer = build_scorer("toy_t2i", dtype="float64")
    scores = scorer(images=scenes.images, prompts=scenes.captions)
    torch.testing.assert_close(scores, toy_reward(scenes.images, scenes.captions).double())
    assert scores.dtype == torch.float64 and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="not PIL images"):
        scorer(as_pil(scenes.images), scenes.captions)


def test_toy_t2i_centredness_is_the_factor_the_toy_reward_multiplies_fidelity_by():
    from diffalign.toy.t2i import prompt_fidelity, sample_scenes, toy_reward

    scenes = sample_scenes(8, torch.Generator().manual_seed(1))
    centred = build_scorer("toy_t2i_centredness", dtype="float64")(scenes.images)
    # reward = fidelity · (1 + centredness) / 2, so centredness = 2 · reward / fidelity − 1 (rendered scenes are
    # faithful: fidelity near 1).
    fidelity = prompt_fidelity(scenes.images, scenes.captions).double()
    assert (fidelity > 0.5).all()
    from_reward = 2 * toy_reward(scenes.images, scenes.captions).double() / fidelity - 1
    torch.testing.assert_close(centred, from_reward, atol=1e-5, rtol=1e-5)
    assert centred.std() > 0.05 and ((centred > 0) & (centred <= 1)).all()


def test_toy_llm_scorer_wraps_the_toy_reward():
    from diffalign.toy.llm import CATEGORIES, all_prompts, parse_request, render_answer, toy_reward

    prompts = all_prompts()[:3]
    perfect = []
    for prompt in prompts:
        count, category, format_name = parse_request(prompt)
        perfect.append(render_answer(CATEGORIES[category][:count], format_name))
    completions = [perfect[0], "no idea", perfect[2].replace("\n", " ")]
    scores = build_scorer("toy_llm")(completions, prompts)
    assert scores.dtype == torch.float32 and scores[0].item() == 1.0
    expected = [toy_reward(p, c) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)
