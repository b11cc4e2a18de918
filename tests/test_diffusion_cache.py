"""The latent and text-embedding cache: posterior round trip, stochastic latents, content keys, resumable builds."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import data_config, image_bytes, pick_a_pic_columns, reference_pixels, write_parquet
from safetensors import safe_open
from torch import nn

from diffalign.diffusion.cache import (
    CachedPairDataset,
    build_pair_cache,
    posterior_draw,
    vae_posterior,
)
from diffalign.diffusion.data import (
    PreferencePairDataset,
    collate_pairs,
    image_decoder,
    load_preference_pairs,
)
from diffalign.diffusion.families import LatentNormalization
from diffalign.diffusion.training_data import build_pair_dataset
from diffalign.diffusion.transforms import ImageDecoder, draw_pair_randomness
from diffalign.hashing import module_fingerprint


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    settings = {
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 16,
    }
    return AutoencoderKL(**{**settings, **overrides}).eval()


class FakeTextEncoder:
    """``encode_prompts`` stand-in: embeddings spell the caption's characters; calls are recorded."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(captions))
        return {
            name: torch.stack([self.expected(caption)[name] for caption in captions])
            for name in ("hidden", "pooled")
        }

    @staticmethod
    def expected(caption: str) -> dict[str, torch.Tensor]:
        codes = torch.tensor([float(ord(char)) for char in caption.ljust(12)[:12]])
        return {"hidden": codes.reshape(3, 4), "pooled": codes[:4] * 2}

    @property
    def encoded(self) -> list[str]:
        return [caption for call in self.calls for caption in call]


def pairs_and_decoder(source: Path, **overrides):
    config = data_config(source, **overrides)
    return load_preference_pairs(config), image_decoder(config)


def build(pairs, decoder, cache_dir, vae, text_encoder=None, **options):
    return build_pair_cache(
        pairs.records(),
        decoder,
        cache_dir,
        vae=vae,
        normalization=LatentNormalization.of_vae(vae),
        encode_prompts=text_encoder or FakeTextEncoder(),
        text_encoder_id=options.pop("text_encoder_id", "fake-text-encoder"),
        **options,
    )


@torch.no_grad()
def direct_posterior(
    vae: AutoencoderKL, data: bytes, flip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    distribution = vae.encode(reference_pixels(data, flip=flip)[None]).latent_dist
    return distribution.mean[0], distribution.std[0]


@pytest.fixture
def source(tmp_path) -> Path:
    return write_parquet(tmp_path / "pairs.parquet", pick_a_pic_columns(5, labels=[1.0, 0.0, 1.0, 0.0, 1.0]))


def test_cache_stores_the_vae_posterior_of_every_view(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source, random_flip=True)
    vae = tiny_vae()
    text_encoder = FakeTextEncoder()
    cache = build(pairs, decoder, tmp_path / "cache", vae, text_encoder, batch_size=3)
    assert cache.augmentations == decoder.cache_augmentations() and len(cache.augmentations) == 2
    for index in range(len(pairs)):
        for key, data in zip(cache.image_keys[index], pairs.media_bytes(index)):
            for view, flip in enumerate((False, True)):
                entry = cache.posterior(key, view)
                mean, std = direct_posterior(vae, data, flip=flip)
                assert entry["mean"].shape == (4, 8, 8)
                torch.testing.assert_close(entry["mean"], mean, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(entry["std"], std, atol=1e-5, rtol=1e-5)
                assert entry["original_size"].tolist() == [20, 30]
                assert entry["crop_top_left"].tolist() == [0, 4]
    assert sorted(text_encoder.encoded) == sorted(["", *pairs.captions])
    for caption in ["", *pairs.captions]:
        stored = cache.prompt_embeds(caption)
        assert stored.keys() == {"hidden", "pooled"}
        for name, value in FakeTextEncoder.expected(caption).items():
            assert torch.equal(stored[name], value)
    assert cache.stats == {
        "cache_pairs": 5,
        "cache_images_encoded": 10,
        "cache_images_reused": 0,
        "cache_captions_encoded": 6,
        "cache_captions_reused": 0,
        "cache_bad_rows_skipped": 0,
    }


class PaddedTextEncoder:
    """``encode_prompts`` stand-in that pads as Qwen-Image's does: one row per character, zero rows up to 16, and
    a mask; a ``pooled`` vector with no zero rows at all."""

    @staticmethod
    def expected(caption: str) -> dict[str, torch.Tensor]:
        hidden, mask = torch.zeros(16, 4), torch.zeros(16, dtype=torch.int64)
        for row, char in enumerate(caption[:16]):
            hidden[row], mask[row] = torch.arange(4) + ord(char), 1
        return {"hidden": hidden, "mask": mask, "pooled": torch.full((3,), float(len(caption) + 1))}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeddings = [self.expected(caption) for caption in captions]
        return {name: torch.stack([entry[name] for entry in embeddings]) for name in embeddings[0]}


def test_captions_are_stored_without_their_padding_and_read_with_it(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source)
    cache = build(pairs, decoder, tmp_path / "cache", tiny_vae(), PaddedTextEncoder())
    for caption in ["", *pairs.captions]:
        stored = cache.prompt_embeds(caption)
        assert stored.keys() == {"hidden", "mask", "pooled"}
        for name, value in PaddedTextEncoder.expected(caption).items():
            assert torch.equal(stored[name], value), (caption, name)
    rows: dict[str, list[int]] = {"hidden": [], "mask": [], "pooled": []}
    for path in (tmp_path / "cache" / "texts").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if name.split("/", 1)[1] in rows:
                    rows[name.split("/", 1)[1]].append(shard.get_slice(name).get_shape()[0])
    # "caption i" is 9 characters; the empty caption's all-zero rows keep one.
    assert sorted(rows["hidden"]) == sorted(rows["mask"]) == [1] + [9] * len(pairs.captions)
    assert rows["pooled"] == [3] * (len(pairs.captions) + 1)


def test_posterior_draw_is_the_reparameterised_normalised_sample():
    mean, std = torch.randn(4, 8, 8), torch.rand(4, 8, 8)
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(11))
    latents = posterior_draw(mean, std, LatentNormalization(0.18215), torch.Generator().manual_seed(11))
    torch.testing.assert_close(latents, (mean + std * noise) * 0.18215, atol=0, rtol=0)
    shifted = posterior_draw(mean, std, LatentNormalization(1.5, 0.25), torch.Generator().manual_seed(11))
    torch.testing.assert_close(shifted, (mean + std * noise - 0.25) * 1.5, atol=1e-6, rtol=0)


def test_cached_items_sample_latents_from_the_pair_generator(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source, random_flip=True)
    vae = tiny_vae()
    cache = build(pairs, decoder, tmp_path / "cache", vae)
    dataset = CachedPairDataset(cache, caption_dropout=0.4, seed=1)  # a seed whose 5 pairs have both flips
    flips = set()
    for index in range(len(dataset)):
        item = dataset[index]
        generator, drop_caption, augmentation = draw_pair_randomness(1, 0, index, 0.4, decoder)
        flips.add(augmentation.flip)
        caption = "" if drop_caption else pairs.captions[index]
        assert item["caption"] == caption and item["index"] == index and item["label"] == 1.0
        for name, value in FakeTextEncoder.expected(caption).items():
            assert torch.equal(item["prompt_embeds"][name], value)
        for role, data in zip(("chosen", "rejected"), pairs.media_bytes(index)):
            mean, std = direct_posterior(vae, data, flip=augmentation.flip)
            noise = torch.randn(mean.shape, generator=generator)
            expected = (mean + std * noise) * vae.config.scaling_factor
            torch.testing.assert_close(item[f"{role}_latents"], expected, atol=1e-5, rtol=1e-5)
            assert item[f"{role}_original_size"] == (20, 30)
    assert flips == {False, True}


def test_reads_open_each_shard_once_and_a_pickled_dataset_reads_the_same(tmp_path, source, monkeypatch):
    """Opening a shard parses its whole header (every entry's names): a read of one entry must not redo it."""
    import pickle

    import diffalign.diffusion.cache as cache_module

    pairs, decoder = pairs_and_decoder(source)
    cache = build(pairs, decoder, tmp_path / "cache", tiny_vae())
    opened = []
    open_shard = cache_module._open_shard
    monkeypatch.setattr(cache_module, "_open_shard", lambda path: opened.append(path) or open_shard(path))
    dataset = CachedPairDataset(cache, seed=3)
    first = [dataset[index] for index in range(len(dataset))]
    again = [dataset[index] for index in range(len(dataset))]
    shards = {*cache.images.index.values(), *cache.texts.index.values()}
    assert sorted(opened) == sorted(shards)  # each once, though every entry was read twice
    copied = pickle.loads(pickle.dumps(dataset))  # what a spawned data-loader worker gets: no open shard
    # A forked worker inherits the open shards of the main process.
    forked = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1))
    for items in (again, [copied[index] for index in range(len(copied))], forked):
        for item, expected in zip(items, first):
            assert torch.equal(item["chosen_latents"], expected["chosen_latents"])
            assert torch.equal(item["rejected_latents"], expected["rejected_latents"])
            assert torch.equal(item["prompt_embeds"]["hidden"], expected["prompt_embeds"]["hidden"])


def test_cached_and_decoded_datasets_draw_the_same_dropout_and_flips(tmp_path):
    source = write_parquet(tmp_path / "p.parquet", pick_a_pic_columns(12))
    pairs, decoder = pairs_and_decoder(source, random_flip=True)
    vae = tiny_vae()
    cached = CachedPairDataset(build(pairs, decoder, tmp_path / "cache", vae), caption_dropout=0.5, seed=9)
    decoded = PreferencePairDataset(pairs, decoder, caption_dropout=0.5, seed=9)
    for index in (0, 3, 7, 11, 12 + 3):  # the last one is in the second epoch
        pixels_item, latents_item = decoded[index], cached[index]
        assert pixels_item["caption"] == latents_item["caption"]
        generator, _, _ = draw_pair_randomness(9, index // 12, index % 12, 0.5, decoder)
        for role in ("chosen", "rejected"):
            mean, std = vae_posterior(vae, pixels_item[f"{role}_pixels"][None])
            expected = posterior_draw(mean[0], std[0], LatentNormalization.of_vae(vae), generator)
            torch.testing.assert_close(latents_item[f"{role}_latents"], expected, atol=1e-5, rtol=1e-5)
            assert latents_item[f"{role}_crop_top_left"] == pixels_item[f"{role}_crop_top_left"]
    batch = collate_pairs([cached[0], cached[1]])
    assert batch["chosen_latents"].shape == (2, 4, 8, 8)
    assert batch["prompt_embeds"]["hidden"].shape == (2, 3, 4)
    assert batch["chosen_original_size"].tolist() == [[20, 30], [20, 30]]


# --- content keys ------------------------------------------------------------------------------------------------


def test_rebuilding_reuses_every_entry(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source)
    vae = tiny_vae()
    first = build(pairs, decoder, tmp_path / "cache", vae)
    text_encoder = FakeTextEncoder()
    again = build(pairs, decoder, tmp_path / "cache", vae, text_encoder)
    assert again.stats["cache_images_encoded"] == 0 and again.stats["cache_images_reused"] == 10
    assert again.stats["cache_captions_encoded"] == 0 and text_encoder.calls == []
    assert again.image_keys == first.image_keys


def test_a_changed_image_is_encoded_again_and_nothing_else(tmp_path):
    columns = pick_a_pic_columns(4)
    vae = tiny_vae()
    build(*pairs_and_decoder(write_parquet(tmp_path / "a.parquet", columns)), tmp_path / "cache", vae)
    columns["jpg_1"][2] = image_bytes(77)
    pairs, decoder = pairs_and_decoder(write_parquet(tmp_path / "b.parquet", columns))
    cache = build(pairs, decoder, tmp_path / "cache", vae)
    assert cache.stats["cache_images_encoded"] == 1 and cache.stats["cache_images_reused"] == 7
    mean, std = direct_posterior(vae, image_bytes(77))
    entry = cache.posterior(
        cache.image_keys[2][1], 0
    )  # pair 2 has label 1: its second image is the rejected one
    torch.testing.assert_close(entry["mean"], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entry["std"], std, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    ["vae_config", "vae_weights", "vae_dtype", "resolution", "random_flip"],
)
def test_a_changed_vae_or_transform_never_reads_stale_entries(tmp_path, source, change):
    pairs, decoder = pairs_and_decoder(source, random_flip=False)
    vae = tiny_vae()
    original = build(pairs, decoder, tmp_path / "cache", vae)
    options = {}
    if change == "vae_config":
        vae = tiny_vae(scaling_factor=0.5)
    elif change == "vae_weights":
        with torch.no_grad():
            vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.1
    elif change == "vae_dtype":
        options["vae_dtype"] = torch.float64
    elif change == "resolution":
        decoder = ImageDecoder(resolution=8, random_flip=False)
    else:
        decoder = ImageDecoder(resolution=16, random_flip=True)
    cache = build(pairs, decoder, tmp_path / "cache", vae, **options)
    assert cache.stats["cache_images_encoded"] == 10 and cache.stats["cache_images_reused"] == 0
    old_keys = {key for keys in original.image_keys for key in keys}
    assert not old_keys.intersection(key for keys in cache.image_keys for key in keys)

    view = len(cache.augmentations) - 1  # the flipped view when there is one
    pixels = decoder.transform(decoder.load(pairs.media_bytes(0)[0]), cache.augmentations[view]).values
    encoding_vae = copy.deepcopy(vae).to(options.get("vae_dtype", torch.float32))
    mean, _ = vae_posterior(encoding_vae, pixels[None])
    torch.testing.assert_close(
        cache.posterior(cache.image_keys[0][0], view)["mean"], mean[0], atol=1e-5, rtol=1e-5
    )
    assert cache.normalization.scale == vae.config.scaling_factor


def test_a_changed_text_encoder_encodes_every_caption_again(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source)
    vae = tiny_vae()
    build(pairs, decoder, tmp_path / "cache", vae, text_encoder_id="encoder-a")
    text_encoder = FakeTextEncoder()
    cache = build(pairs, decoder, tmp_path / "cache", vae, text_encoder, text_encoder_id="encoder-b")
    assert sorted(text_encoder.encoded) == sorted(["", *pairs.captions])
    assert cache.stats["cache_images_reused"] == 10


def test_images_shared_by_pairs_are_encoded_once(tmp_path):
    columns = pick_a_pic_columns(4)
    columns["jpg_0"] = [image_bytes(5)] * 4
    pairs, decoder = pairs_and_decoder(write_parquet(tmp_path / "p.parquet", columns))
    cache = build(pairs, decoder, tmp_path / "cache", tiny_vae())
    assert cache.stats["cache_images_encoded"] == 5
    # Labels alternate 1, 0, ...: the shared first image is chosen in even pairs and rejected in odd ones.
    assert len({keys[index % 2] for index, keys in enumerate(cache.image_keys)}) == 1


def test_module_fingerprint_tracks_class_config_weights_and_dtype():
    assert module_fingerprint(tiny_vae(seed=0)) == module_fingerprint(tiny_vae(seed=0))
    assert module_fingerprint(tiny_vae(seed=0)) != module_fingerprint(tiny_vae(seed=1))
    assert module_fingerprint(tiny_vae()) != module_fingerprint(tiny_vae(scaling_factor=0.3))
    assert module_fingerprint(tiny_vae()) != module_fingerprint(tiny_vae().to(torch.bfloat16))
    assert module_fingerprint(nn.Linear(2, 2), nn.Linear(2, 2)) != module_fingerprint(nn.Linear(2, 2))


# --- resumable builds ----------------------------------------------------------------------------------------------


def test_an_interrupted_build_resumes_without_recomputing(tmp_path):
    pairs, decoder = pairs_and_decoder(
        write_parquet(tmp_path / "p.parquet", pick_a_pic_columns(6)), random_flip=False
    )
    vae = tiny_vae()
    encode = vae.encode
    calls = []

    def encode_then_crash(pixels):
        calls.append(len(pixels))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return encode(pixels)

    vae.encode = encode_then_crash
    with pytest.raises(KeyboardInterrupt):
        build(pairs, decoder, tmp_path / "cache", vae, batch_size=2, shard_size=2)
    assert calls == [2, 2, 2, 2]
    (tmp_path / "cache" / "images" / ".leftover.safetensors.partial").write_bytes(b"half a shard")
    del vae.encode

    text_encoder = FakeTextEncoder()
    resumed = build(pairs, decoder, tmp_path / "cache", vae, text_encoder, batch_size=2, shard_size=2)
    assert resumed.stats["cache_images_encoded"] == 12 - 6
    assert resumed.stats["cache_images_reused"] == 6
    assert sorted(text_encoder.encoded) == sorted(["", *pairs.captions])  # the crash came before any caption
    fresh = build(pairs, decoder, tmp_path / "fresh", vae)
    for keys in resumed.image_keys:
        for key in keys:
            assert torch.equal(resumed.posterior(key, 0)["mean"], fresh.posterior(key, 0)["mean"])
    assert len(list((tmp_path / "cache" / "images").glob("*.safetensors"))) == 6


# --- bad input -----------------------------------------------------------------------------------------------------


def test_random_crops_cannot_be_cached(tmp_path, source):
    pairs, _ = pairs_and_decoder(source)
    with pytest.raises(ValueError, match=r"data\.crop: 'random' cannot be cached.*data\.crop: center"):
        build(pairs, ImageDecoder(resolution=16, crop="random"), tmp_path / "cache", tiny_vae())


def test_a_corrupt_image_found_while_building_names_its_row_or_is_skipped(tmp_path):
    columns = pick_a_pic_columns(5)
    columns["jpg_1"][2] = b"not an image"
    pairs, decoder = pairs_and_decoder(write_parquet(tmp_path / "p.parquet", columns), verify_media=False)
    with pytest.raises(ValueError, match=r"p\.parquet, row 3: cannot decode the image.*skip_bad_rows: true"):
        build(pairs, decoder, tmp_path / "cache", tiny_vae())
    cache = build(pairs, decoder, tmp_path / "cache", tiny_vae(), skip_bad_rows=True)
    assert cache.pair_indices == [0, 1, 3, 4]
    assert cache.stats["cache_skipped_corrupt_image"] == 1 and cache.stats["cache_bad_rows_skipped"] == 1
    dataset = CachedPairDataset(cache)
    assert len(dataset) == 4 and [dataset[i]["index"] for i in range(4)] == [0, 1, 3, 4]


def test_an_image_file_gone_before_the_build_names_its_row(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(3):
        for side in "ab":
            (tmp_path / "img" / f"{i}{side}.png").write_bytes(image_bytes(10 * i + (side == "b")))
        rows.append({"caption": f"c{i}", "jpg_0": f"img/{i}a.png", "jpg_1": f"img/{i}b.png", "label_0": 0})
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    pairs, decoder = pairs_and_decoder(tmp_path / "index.jsonl")
    (tmp_path / "img" / "1a.png").unlink()
    with pytest.raises(ValueError, match=r"index\.jsonl, row 2 \(line 2\): the image file .*1a\.png"):
        build(pairs, decoder, tmp_path / "cache", tiny_vae())
    cache = build(pairs, decoder, tmp_path / "cache", tiny_vae(), skip_bad_rows=True)
    assert cache.pair_indices == [0, 2] and cache.stats["cache_skipped_missing_image"] == 1


def test_non_finite_latents_raise_with_the_fix(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source)
    vae = tiny_vae()
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"pairs\.parquet, row 1: the VAE produced non-finite latents in torch\.float32.*fp16-fix",
    ):
        build(pairs, decoder, tmp_path / "cache", vae)


def test_a_vae_out_of_memory_halves_the_micro_batch_and_keeps_every_entry(tmp_path, source, monkeypatch, caplog):
    """A device that fits 3 views at a time: the batches of 8 are encoded 2 views at a time, with the same
    posteriors as a build that fits; one view that does not fit is a clear error."""
    import diffalign.diffusion.cache as cache_module

    pairs, decoder = pairs_and_decoder(source, random_flip=True)
    vae = tiny_vae()
    expected = build(pairs, decoder, tmp_path / "fits", vae, batch_size=8)
    sizes = []

    def fits_three(vae, pixels):
        sizes.append(len(pixels))
        if len(pixels) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return vae_posterior(vae, pixels)

    monkeypatch.setattr(cache_module, "vae_posterior", fits_three)
    with caplog.at_level("WARNING"):
        cache = build(pairs, decoder, tmp_path / "cache", vae, batch_size=8)
    assert sizes[:2] == [8, 4] and set(sizes[2:]) == {2} and sum(sizes[2:]) == 10 * 2  # 10 images, 2 views each
    assert "encoding the cache 2 views at a time" in caplog.text
    for index in range(len(pairs)):
        for key in cache.image_keys[index]:
            for view in range(2):
                for name in ("mean", "std"):
                    torch.testing.assert_close(
                        cache.posterior(key, view)[name], expected.posterior(key, view)[name], atol=1e-6, rtol=1e-5
                    )

    def fits_none(vae, pixels):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(cache_module, "vae_posterior", fits_none)
    single = r"out of memory encoding a single \(3, 16, 16\) input .* lower data.resolution"
    with pytest.raises(RuntimeError, match=single):
        build(pairs, decoder, tmp_path / "none", vae, batch_size=2)


def test_the_vae_is_returned_in_its_own_dtype(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source)
    vae = tiny_vae().to(torch.bfloat16)
    build(pairs, decoder, tmp_path / "cache", vae)  # encodes in fp32 by default
    assert vae.dtype == torch.bfloat16


def test_bad_encode_prompts_output_is_reported(tmp_path, source):
    pairs, decoder = pairs_and_decoder(source)
    with pytest.raises(ValueError, match=r"encode_prompts returned 'hidden' of shape .* batch-first"):
        build_pair_cache(
            pairs.records(),
            decoder,
            tmp_path / "cache",
            vae=tiny_vae(),
            normalization=LatentNormalization(1.0),
            encode_prompts=lambda captions: {"hidden": torch.zeros(3, 4)},
            text_encoder_id="broken",
        )


# --- the trainer's entry point -------------------------------------------------------------------------------------


def test_build_pair_dataset_with_a_cache_dir(tmp_path, source):
    vae = tiny_vae()
    text_encoder = FakeTextEncoder()
    family = SimpleNamespace(
        vae=vae,
        latent_normalization=LatentNormalization.of_vae(vae),
        encode_prompts=text_encoder,
        frozen_modules=lambda: {"vae": vae, "text_encoder": nn.Linear(3, 3)},
        prompt_encoding_id=lambda: "FakeFamily",
    )
    config = data_config(source, cache_dir=str(tmp_path / "cache"))
    dataset, collate, stats = build_pair_dataset(config, family=family, seed=0)
    assert isinstance(dataset, CachedPairDataset) and len(dataset) == 5
    assert stats["pairs"] == 5 and stats["cache_images_encoded"] == 10
    batch = collate([dataset[0], dataset[1]])
    assert batch["chosen_latents"].shape == (2, 4, 8, 8) and batch["prompt_embeds"]["pooled"].shape == (2, 4)
    _, _, stats = build_pair_dataset(config, family=family, seed=0)
    assert stats["cache_images_encoded"] == 0 and stats["cache_images_reused"] == 10


def test_the_reference_cache_key_follows_a_per_channel_normalisation(tmp_path, source):
    """The reference cache is keyed by the latent normalisation: scalar factors as the tuple (scale, shift), as
    before per-channel normalisations existed (keys made then stay valid), per-channel means and stds too."""
    import dataclasses

    from diffalign.diffusion.families.base import ChannelNormalization
    from diffalign.diffusion.reference_cache import dataset_fingerprint

    vae = tiny_vae()
    family = SimpleNamespace(
        vae=vae,
        latent_normalization=LatentNormalization.of_vae(vae),
        encode_prompts=FakeTextEncoder(),
        frozen_modules=lambda: {"vae": vae},
        prompt_encoding_id=lambda: "FakeFamily",
    )
    dataset, _, _ = build_pair_dataset(data_config(source, cache_dir=str(tmp_path / "cache")), family=family, seed=0)
    assert dataclasses.astuple(dataset.cache.normalization) == (vae.config.scaling_factor, 0.0)
    keys = set()
    for mean in (0.1, 0.2):
        dataset.cache.normalization = ChannelNormalization(1.0, 0.0, (mean,) * 4, (1.5,) * 4)
        keys.add(dataset_fingerprint(dataset))
    assert len(keys) == 2


def test_the_cache_command_builds_the_latent_cache_that_training_reuses(tmp_path, capsys):
    from diffalign.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy_dpo.yaml"
    overrides = [
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run.output_dir={tmp_path / 'run'}",
        "data.max_pairs=16",
        "run.trackers=[]",
    ]
    assert main(["cache", str(config), *overrides]) == 0
    first = capsys.readouterr().out
    assert "cache_pairs 16" in first and "cache_images_reused 0" in first
    encoded = int(first.split("cache_images_encoded ")[1].split(",")[0])
    assert 16 < encoded <= 32
    assert main(["cache", str(config), *overrides]) == 0  # a second build (or the trainer) encodes nothing
    second = capsys.readouterr().out
    assert "cache_images_encoded 0" in second and f"cache_images_reused {encoded}" in second


def test_the_cache_command_refuses_a_config_without_a_cache_dir_or_of_another_kind(tmp_path, capsys):
    from diffalign.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["cache", str(configs / "toy_dpo.yaml"), "data.cache_dir=null"]) == 2
    assert "data.cache_dir is not set; set data.cache_dir=DIR" in capsys.readouterr().err
    assert main(["cache", str(configs / "toy_llm_dpo.yaml")]) == 2
    assert "kind: llm; `diffalign cache` builds the latent cache of a kind: diffusion config" in capsys.readouterr().err
