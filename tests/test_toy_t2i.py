"""The toy text-to-image world: shipped assets, checker, reward, preference data, CLIP, build."""

from __future__ import annotations

import io
import json
import os
import sys
import time
import types

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from diffalign.toy import __main__ as toy_cli
from diffalign.toy import t2i
from diffalign.toy.t2i_build import T2IBuildConfig, build_toy_t2i, preference_labels

ASSETS = t2i.TOY_T2I_DIR


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _decode(data: bytes) -> torch.Tensor:
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------- captions


def test_parse_caption_reads_attributes_and_ignores_other_words():
    assert t2i.parse_caption("a large red circle") == {"shape": "circle", "colour": "red", "size": "large"}
    assert t2i.parse_caption("a small sks triangle") == {"shape": "triangle", "colour": None, "size": "small"}
    assert t2i.parse_caption("") == {"shape": None, "colour": None, "size": None}
    with pytest.raises(ValueError, match="two shapes"):
        t2i.parse_caption("a red circle square")


def test_prompt_splits_partition_the_captions_and_hold_out_colour_shape_pairs():
    train, heldout = t2i.load_prompts("train"), t2i.load_prompts("heldout")
    assert len(train) == 24 and len(heldout) == 12
    assert sorted(train + heldout) == sorted(t2i.all_captions())
    train_pairs = {(t2i.parse_caption(p)["colour"], t2i.parse_caption(p)["shape"]) for p in train}
    assert train_pairs.isdisjoint(t2i.HELDOUT_COLOUR_SHAPES)
    with pytest.raises(ValueError, match="split"):
        t2i.load_prompts("test")


# ------------------------------------------------------------------------------------------- checker


def test_checker_is_exact_on_clean_renders():
    scenes = t2i.sample_scenes(360, torch.Generator().manual_seed(123))
    detections = t2i.detect_shape(scenes.images)
    assert [d["shape"] for d in detections] == scenes.shapes
    assert [d["colour"] for d in detections] == scenes.colours
    assert [d["size"] for d in detections] == scenes.sizes
    centres = torch.tensor([d["centre"] for d in detections])
    assert (centres - scenes.centres).abs().max() < 0.5 / t2i.RESOLUTION  # within half a pixel
    assert t2i.prompt_fidelity(scenes.images, scenes.captions).min() > 0.7


def test_checker_on_hand_placed_scenes_and_blank_images():
    image = t2i.render_scene("triangle", "purple", "small", centre=(0.25, 0.7))
    (found,) = t2i.detect_shape(image[None])
    assert (found["shape"], found["colour"], found["size"]) == ("triangle", "purple", "small")
    assert found["centre"] == pytest.approx((0.25, 0.7), abs=0.01)
    radius = sum(t2i.SIZE_RADII["small"]) / 2
    assert found["radius"] == pytest.approx(radius, rel=0.03)  # equal-area radius, by construction

    blank = torch.full((2, 3, 32, 32), 0.9)
    assert [d["present"] for d in t2i.detect_shape(blank)] == [False, False]
    assert t2i.prompt_fidelity(blank, ["a red circle", ""]).tolist() == [0.0, 0.0]


def test_checker_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        t2i.detect_shape(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="uint8"):
        t2i.detect_shape(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one prompt per image"):
        t2i.toy_reward(torch.rand(2, 3, 32, 32), ["a red circle"])


# -------------------------------------------------------------------------------------------- reward


def test_reward_matches_its_formula_on_constructed_scenes():
    centres = [(0.5, 0.5), (0.3, 0.6), (0.22, 0.22)]
    images = torch.stack([t2i.render_scene("circle", "red", "large", centre=c) for c in centres])
    prompts = ["a large red circle"] * 3
    fidelity = t2i.prompt_fidelity(images, prompts)
    distance_squared = torch.tensor([(x - 0.5) ** 2 + (y - 0.5) ** 2 for x, y in centres])
    expected = fidelity * (1 + torch.exp(-distance_squared / (2 * t2i.CENTRE_SIGMA**2))) / 2
    reward = t2i.toy_reward(images, prompts)
    # The checker measures centres to within 0.01 of where they were drawn (rasterisation), hence the tolerance.
    torch.testing.assert_close(reward, expected, atol=5e-3, rtol=0)
    assert reward[0] > 0.95 and reward[0] > reward[1] > reward[2] > 0.5
    torch.testing.assert_close(t2i.toy_reward(images, prompts), reward, atol=0, rtol=0)  # deterministic


def test_reward_prefers_the_asked_shape_colour_and_size_wherever_it_is():
    prompt = ["a large blue square"]
    correct_at_edge = t2i.render_scene("square", "blue", "large", centre=(0.25, 0.75))
    wrong = [
        t2i.render_scene("circle", "blue", "large"),  # centred, wrong shape
        t2i.render_scene("square", "green", "large"),  # centred, wrong colour
        t2i.render_scene("square", "blue", "small"),  # centred, wrong size
    ]
    correct_reward = t2i.toy_reward(correct_at_edge[None], prompt)
    for image in wrong:
        assert t2i.toy_reward(image[None], prompt) < 0.2 < 0.5 < correct_reward


def test_reward_is_smooth_in_the_position():
    xs = torch.linspace(0.3, 0.7, 21)
    images = torch.stack([t2i.render_scene("triangle", "yellow", "large", centre=(float(x), 0.55)) for x in xs])
    reward = t2i.toy_reward(images, ["a large yellow triangle"] * len(xs))
    assert reward.diff().abs().max() < 0.05
    assert reward.argmax() in (9, 10, 11)  # peak at the centre


# -------------------------------------------------------------------------------------- shipped model


def test_pipeline_loads_with_stock_classes_and_generates_32px_images(pipeline):
    assert isinstance(pipeline.unet, UNet2DConditionModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert isinstance(pipeline.tokenizer, CLIPTokenizer)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.safety_checker is None
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert pipeline.vae_scale_factor == 4 and pipeline.unet.config.sample_size == 8
    images = pipeline(
        ["a small green square", ""],
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1


def test_tokenizer_files_and_whole_word_tokens():
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (ASSETS / "tokenizer" / name).is_file()
    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "tokenizer")
    assert tokenizer.model_max_length == 77
    assert len(tokenizer("a large red circle").input_ids) == 6  # bos + 4 words + eos
    assert tokenizer.tokenize("a [V] circle")[1:4] == ["[</w>", "v</w>", "]</w>"]


def test_base_model_meets_the_quality_bar_but_leaves_room_for_alignment(pipeline):
    """Shape and colour right clearly more often than chance (1/18), shapes not reliably centred."""
    prompts = [p for p in t2i.all_captions() for _ in range(2)]  # 72 samples
    images = pipeline(
        prompts,
        num_inference_steps=25,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(1234),
        output_type="pt",
    ).images
    detections = t2i.detect_shape(images)
    asked = [t2i.parse_caption(p) for p in prompts]
    shape_and_colour = np.mean([d["shape"] == a["shape"] and d["colour"] == a["colour"] for d, a in zip(detections, asked)])
    assert shape_and_colour >= 0.4, f"shape-and-colour accuracy {shape_and_colour:.2f} (chance 0.06)"
    assert t2i.centredness(images).mean() < 0.6


def test_clip_ranks_matching_captions_above_the_others():
    clip = CLIPModel.from_pretrained(ASSETS / "clip").eval()
    processor = CLIPProcessor.from_pretrained(ASSETS / "clip")
    captions = t2i.all_captions()
    images = []
    for index, caption in enumerate(captions):
        asked = t2i.parse_caption(caption)
        centre = (0.3 + 0.4 * (index % 5) / 4, 0.3 + 0.4 * (index % 3) / 2)
        images.append(t2i.render_scene(asked["shape"], asked["colour"], asked["size"], centre=centre))
    pixels = [(image.permute(1, 2, 0) * 255).round().byte().numpy() for image in images]
    inputs = processor(text=captions, images=pixels, return_tensors="pt", padding="max_length")
    with torch.no_grad():
        logits = clip(**inputs).logits_per_image  # [36 images, 36 captions]
    top1 = (logits.argmax(1) == torch.arange(len(captions))).float().mean()
    assert top1 >= 0.9
    margin = logits.diagonal()[:, None] - logits
    assert (margin[~torch.eye(len(captions), dtype=torch.bool)] > 0).float().mean() >= 0.97


# --------------------------------------------------------------------------------------- preference data


@pytest.mark.parametrize("toy", ["toy-t2i", "toy-t2i-flow"])  # the U-Net toy and the SD3-architecture one
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_preference_data_schema_and_label_distribution(split, toy):
    table = pq.read_table(ASSETS.parent / toy / "data" / f"{split}.parquet")
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(table.column_names)
    assert set(table.column("caption").to_pylist()) == set(t2i.load_prompts(split))
    labels = torch.tensor(table.column("label_0").to_pylist())
    assert set(labels.tolist()) <= {0.0, 0.5, 1.0}
    tie_rate = (labels == 0.5).float().mean()
    assert 0.03 <= tie_rate <= 0.07

    rows = table.to_pylist()
    first = torch.stack([_decode(row["jpg_0"]) for row in rows])
    second = torch.stack([_decode(row["jpg_1"]) for row in rows])
    assert first.shape[1:] == (3, 32, 32)
    captions = [row["caption"] for row in rows]
    reward_0, reward_1 = t2i.toy_reward(first, captions), t2i.toy_reward(second, captions)
    decided = labels != 0.5
    agrees = (labels[decided] == 1.0) == (reward_0 > reward_1)[decided]
    assert 0.83 <= agrees.float().mean() <= 0.95  # ~10% label noise
    gap = (reward_0 - reward_1).abs()
    assert gap[~decided].max() <= gap[decided].median()  # ties are the close calls


def test_preference_labels_ties_and_flips():
    generator = torch.Generator().manual_seed(0)
    reward_0 = torch.rand(2000, generator=generator)
    reward_1 = torch.rand(2000, generator=generator)
    labels = preference_labels(reward_0, reward_1, 0.05, 0.1, generator)
    ties = labels == 0.5
    assert ties.sum() == 100
    assert (reward_0 - reward_1).abs()[ties].max() < (reward_0 - reward_1).abs()[~ties].min()
    flipped = (labels[~ties] == 1.0) != (reward_0 > reward_1)[~ties]
    assert 0.08 < flipped.float().mean() < 0.12


# ------------------------------------------------------------------------------------------ subject set


def test_subject_set_is_loadable_and_shows_a_circle():
    subject = t2i.subject_set()
    images = subject.load_images()
    assert 4 <= len(images) <= 6 and images.shape[1:] == (3, 32, 32)
    assert all("[V]" in template for template in subject.prompt_templates)
    assert subject.prompts("xyz")[0] == subject.prompt_templates[0].replace("[V]", "xyz")
    assert {d["shape"] for d in t2i.detect_shape(images)} == {subject.class_noun}
    # Two-tone: the upper and lower halves of the shape differ in colour.
    assert (images[:, :, :16].amin((2, 3)) - images[:, :, 16:].amin((2, 3))).abs().amax() > 0.1


# ------------------------------------------------------------------------------------------------ build


def test_build_config_names_the_bad_key():
    with pytest.raises(ValueError, match="unet_steps"):
        T2IBuildConfig(unet_steps=0)
    with pytest.raises(ValueError, match="train_images_per_prompt"):
        T2IBuildConfig(train_images_per_prompt=3)


def _tiny_config() -> T2IBuildConfig:
    return T2IBuildConfig(
        scenes=64,
        autoencoder_scenes=32,
        clip_steps=2,
        clip_batch_size=16,
        vae_steps=2,
        vae_batch_size=8,
        unet_steps=2,
        unet_batch_size=8,
        train_images_per_prompt=2,
        heldout_images_per_prompt=2,
        sampling_steps=2,
        subject_images=4,
    )


def test_small_build_is_reproducible_and_loadable(tmp_path):
    infos = [build_toy_t2i(tmp_path / name, seed=7, config=_tiny_config()) for name in ("a", "b")]
    for split in ("train", "heldout"):
        assert pq.read_table(tmp_path / "a" / "data" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "b" / "data" / f"{split}.parquet")
        )
    for component in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
        assert (tmp_path / "a" / component / name).read_bytes() == (tmp_path / "b" / component / name).read_bytes()
    assert infos[0]["quality"] == infos[1]["quality"]
    assert json.loads((tmp_path / "a" / "build_info.json").read_text())["seed"] == 7
    assert pq.read_table(tmp_path / "a" / "data" / "train.parquet").num_rows == 24 * 2
    StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    other_seed = build_toy_t2i(tmp_path / "c", seed=8, config=_tiny_config())
    assert other_seed["quality"] != infos[0]["quality"] or not pq.read_table(
        tmp_path / "c" / "data" / "train.parquet"
    ).equals(pq.read_table(tmp_path / "a" / "data" / "train.parquet"))


# -------------------------------------------------------------------------------------------------- cli


def test_cli_builds_one_toy_or_all_side_by_side(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("diffalign.toy.fake_toy")

    def build(output_dir, seed):  # leaves a trace on disk, so it is seen from a worker process too
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "seed.txt").write_text(f"{seed} {os.getpid()}")

    fake.build = build
    monkeypatch.setitem(sys.modules, "diffalign.toy.fake_toy", fake)
    monkeypatch.setattr(
        toy_cli, "TOYS", {"one": ("diffalign.toy.fake_toy", "toy-one"), "two": ("diffalign.toy.fake_toy", "toy-two")}
    )
    assert toy_cli.main(["build", "one", "--assets-dir", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert (tmp_path / "a" / "toy-one" / "seed.txt").read_text() == f"3 {os.getpid()}"
    assert not (tmp_path / "a" / "toy-two").exists()

    assert toy_cli.main(["build", "all", "--assets-dir", str(tmp_path / "b"), "--jobs", "2"]) == 0
    traces = [(tmp_path / "b" / f"toy-{name}" / "seed.txt").read_text().split() for name in ("one", "two")]
    assert [seed for seed, _ in traces] == ["0", "0"]
    assert all(int(pid) != os.getpid() for _, pid in traces)  # each built in a worker process
    output = capsys.readouterr().out  # the workers' own lines go to the real stdout, not to capsys
    assert "[one] done in" in output and "built one, two in" in output


def test_cli_builds_a_toy_after_the_toys_it_reuses(tmp_path, monkeypatch):
    def build_base(output_dir, seed):
        time.sleep(0.5)  # still building when a worker would start the next toy
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "model.txt").write_text("base")

    def build_reuser(output_dir, seed):  # fails unless the toy it reuses is already built
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "model.txt").write_text((output_dir.parent / "toy-base" / "model.txt").read_text() + "+reuser")

    for name, build in (("base", build_base), ("reuser", build_reuser)):
        module = types.ModuleType(f"diffalign.toy.fake_{name}")
        module.build = build
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(
        toy_cli,
        "TOYS",
        {"base": ("diffalign.toy.fake_base", "toy-base"), "reuser": ("diffalign.toy.fake_reuser", "toy-reuser")},
    )
    monkeypatch.setattr(toy_cli, "REUSES", {"reuser": ("base",)})
    assert toy_cli.main(["build", "all", "--assets-dir", str(tmp_path), "--jobs", "2"]) == 0
    assert (tmp_path / "toy-reuser" / "model.txt").read_text() == "base+reuser"
