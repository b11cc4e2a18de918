"""Diffusion preference data: sources, winner-first order, ties, bad rows, transforms, caption dropout."""

from __future__ import annotations

import io
import json
import logging
import math

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    RESOLUTION,
    data_config,
    image_bytes,
    pick_a_pic_columns,
    reference_pixels,
    write_parquet,
)
from PIL import Image

from diffalign import hub as hub_access
from diffalign.config import LoadError
from diffalign.diffusion.data import (
    DiffusionDataConfig,
    PreferencePairDataset,
    collate_pairs,
    image_decoder,
    load_preference_pairs,
)
from diffalign.diffusion.training_data import build_pair_dataset

# --- sources ---------------------------------------------------------------------------------------------------


def test_parquet_pairs_are_winner_first(tmp_path):
    columns = pick_a_pic_columns(4, labels=[1.0, 0.0, 1.0, 0.0])
    pairs = load_preference_pairs(data_config(write_parquet(tmp_path / "pairs.parquet", columns)))
    assert len(pairs) == 4
    for index in range(4):
        chosen, rejected = pairs.media_bytes(index)
        if columns["label_0"][index] == 1.0:
            assert (chosen, rejected) == (columns["jpg_0"][index], columns["jpg_1"][index])
        else:
            assert (chosen, rejected) == (columns["jpg_1"][index], columns["jpg_0"][index])
    assert pairs.labels == [1.0] * 4
    assert pairs.captions == columns["caption"]

    item = PreferencePairDataset(pairs, image_decoder(data_config("x", random_flip=False)))[1]
    torch.testing.assert_close(
        item["chosen_pixels"], reference_pixels(columns["jpg_1"][1]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        item["rejected_pixels"], reference_pixels(columns["jpg_0"][1]), atol=1e-6, rtol=0
    )


def test_arrow_stream_and_file_formats_are_concatenated_with_their_own_rows(tmp_path):
    first, second = pick_a_pic_columns(3), pick_a_pic_columns(2)
    second["caption"] = ["other 0", "other 1"]
    with (
        pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, pa.table(first).schema) as out,
    ):
        out.write_table(pa.table(first))  # the stream format `datasets` writes
    with (
        pa.OSFile(str(tmp_path / "b.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, pa.table(second).schema) as out,
    ):
        out.write_table(pa.table(second))
    pairs = load_preference_pairs(data_config(tmp_path))
    assert pairs.captions == first["caption"] + second["caption"]
    assert pairs.location(1) == f"{tmp_path / 'a.arrow'}, row 2"
    assert pairs.location(4) == f"{tmp_path / 'b.arrow'}, row 2"


def test_directory_source_picks_the_split_files(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", pick_a_pic_columns(2))
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", pick_a_pic_columns(3))
    validation = pick_a_pic_columns(4)
    validation["caption"] = [f"validation {i}" for i in range(4)]
    write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", validation)

    train = load_preference_pairs(data_config(tmp_path))
    assert len(train) == 5
    assert train.location(3) == f"{tmp_path / 'data' / 'train-00001-of-00002.parquet'}, row 2"
    assert load_preference_pairs(data_config(tmp_path, split="validation")).captions == validation["caption"]
    assert len(load_preference_pairs(data_config(tmp_path / "data" / "train-*.parquet"))) == 5


def test_jsonl_index_with_an_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(3):
        for name, seed in ((f"images/{i}_a.png", i), (f"images/{i}_b.jpg", 1000 + i)):
            (tmp_path / name).write_bytes(
                image_bytes(seed, image_format="PNG" if name.endswith("png") else "JPEG")
            )
        rows.append({"caption": f"caption {i}", "jpg_0": f"images/{i}_a.png", "jpg_1": f"images/{i}_b.jpg"})
    rows[0]["label_0"], rows[1]["label_0"], rows[2]["label_0"] = 0, 1, 0.0
    rows[2]["jpg_1"] = str(tmp_path / "images" / "2_b.jpg")  # absolute paths work too
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")

    pairs = load_preference_pairs(data_config(tmp_path / "index.jsonl"))
    assert pairs.media_bytes(0) == (
        (tmp_path / "images/0_b.jpg").read_bytes(),
        (tmp_path / "images/0_a.png").read_bytes(),
    )
    assert pairs.media_bytes(1)[0] == (tmp_path / "images/1_a.png").read_bytes()
    assert pairs.media_bytes(2)[0] == (tmp_path / "images/2_b.jpg").read_bytes()
    assert pairs.location(2) == f"{tmp_path / 'index.jsonl'}, row 3 (line 3)"


def test_image_feature_dicts_written_by_datasets(tmp_path):
    columns = pick_a_pic_columns(3)
    dataset = datasets.Dataset.from_dict(columns)
    for column in ("jpg_0", "jpg_1"):
        dataset = dataset.cast_column(column, datasets.Image())
    dataset.to_parquet(str(tmp_path / "pairs.parquet"))
    assert pa.types.is_struct(pq.read_schema(tmp_path / "pairs.parquet").field("jpg_0").type)

    pairs = load_preference_pairs(data_config(tmp_path / "pairs.parquet"))
    assert pairs.media_bytes(0) == (columns["jpg_0"][0], columns["jpg_1"][0])
    assert pairs.media_bytes(1) == (columns["jpg_1"][1], columns["jpg_0"][1])


def test_hub_dataset_is_read_as_its_raw_table(monkeypatch):
    columns = pick_a_pic_columns(3)
    hub = datasets.Dataset.from_dict(columns).cast_column("jpg_0", datasets.Image())
    requested = []

    def fake_load_dataset(name, split):
        requested.append((name, split))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(hub_access, "check_source", lambda *args: None)  # no hub to ask here (tests/test_hub.py)
    pairs = load_preference_pairs(data_config("someone/pick-a-pic-mini", split="validation"))
    assert requested == [("someone/pick-a-pic-mini", "validation")]
    assert pairs.media_bytes(1) == (columns["jpg_1"][1], columns["jpg_0"][1])
    assert pairs.location(2) == "someone/pick-a-pic-mini[validation], row 3"


def test_unavailable_hub_dataset_names_the_local_alternatives(monkeypatch):
    def offline(name, split):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(hub_access, "check_source", lambda *args: None)
    with pytest.raises(
        LoadError,
        match=r"data.source='someone/pairs': cannot load the hub dataset \(split 'train'\) \(ConnectionError: "
        r"offline mode is enabled\); on a connected machine run `hf download someone/pairs --repo-type dataset",
    ):
        load_preference_pairs(data_config("someone/pairs"))


def test_missing_local_file_and_empty_source(tmp_path):
    with pytest.raises(ValueError, match=r"file .*nothing\.parquet does not exist"):
        load_preference_pairs(data_config(tmp_path / "nothing.parquet"))
    with pytest.raises(ValueError, match="data.source is empty"):
        load_preference_pairs(DiffusionDataConfig())


# --- ties, labels, limits --------------------------------------------------------------------------------------


def test_ties_are_dropped_and_counted(tmp_path, caplog):
    source = write_parquet(tmp_path / "p.parquet", pick_a_pic_columns(5, labels=[1.0, 0.5, 0.0, 0.5, 1.0]))
    with caplog.at_level(logging.INFO, logger="diffalign.diffusion.data"):
        pairs = load_preference_pairs(data_config(source))
    assert pairs.captions == ["caption 0", "caption 2", "caption 4"]
    assert pairs.stats == {
        "rows_read": 5,
        "pairs": 3,
        "ties_dropped": 2,
        "ties_kept": 0,
        "bad_rows_skipped": 0,
    }
    assert "2 ties dropped" in caplog.text


def test_kept_ties_carry_the_soft_label_in_stored_order(tmp_path):
    columns = pick_a_pic_columns(3, labels=[0.5, 0.0, 0.5])
    pairs = load_preference_pairs(
        data_config(write_parquet(tmp_path / "p.parquet", columns), drop_ties=False)
    )
    assert pairs.labels == [0.5, 1.0, 0.5]
    assert pairs.media_bytes(0) == (columns["jpg_0"][0], columns["jpg_1"][0])
    assert pairs.media_bytes(1) == (columns["jpg_1"][1], columns["jpg_0"][1])
    assert pairs.stats["ties_kept"] == 2 and pairs.stats["ties_dropped"] == 0


def test_without_a_label_column_the_first_image_wins(tmp_path):
    columns = pick_a_pic_columns(2)
    columns = {"prompt": columns["caption"], "chosen": columns["jpg_0"], "rejected": columns["jpg_1"]}
    config = data_config(
        write_parquet(tmp_path / "p.parquet", columns),
        caption_column="prompt",
        image_0_column="chosen",
        image_1_column="rejected",
        label_0_column=None,
    )
    pairs = load_preference_pairs(config)
    assert [pairs.media_bytes(i) for i in range(2)] == list(zip(columns["chosen"], columns["rejected"]))
    assert pairs.labels == [1.0, 1.0]


def test_max_pairs_keeps_the_first_valid_pairs(tmp_path):
    source = write_parquet(
        tmp_path / "p.parquet", pick_a_pic_columns(6, labels=[0.5, 1.0, 0.0, 1.0, 0.0, 1.0])
    )
    pairs = load_preference_pairs(data_config(source, max_pairs=2))
    assert pairs.captions == ["caption 1", "caption 2"]
    assert pairs.stats["rows_read"] == 3


# --- bad rows --------------------------------------------------------------------------------------------------

TRUNCATED_PNG = image_bytes(7)[:60]

PARQUET_BAD_ROWS = [
    ("label_0", 2.0, "bad_label", r"label_0 is 2\.0; allowed values are 1 .*0 .*0\.5"),
    ("label_0", None, "bad_label", r"label_0 is None"),
    ("label_0", math.nan, "bad_label", r"label_0 is nan"),
    ("caption", None, "missing_caption", r"the caption \(column 'caption'\) is missing or empty"),
    ("caption", "  ", "missing_caption", r"the caption \(column 'caption'\) is missing or empty"),
    ("jpg_1", b"definitely not an image", "corrupt_image", r"cannot decode the image"),
    ("jpg_0", TRUNCATED_PNG, "corrupt_image", r"cannot decode the image"),
    ("jpg_0", None, "missing_image", r"the image \(column 'jpg_0'\) is missing"),
]


@pytest.mark.parametrize(("column", "value", "reason", "problem"), PARQUET_BAD_ROWS)
def test_bad_parquet_row_names_file_row_and_fix(tmp_path, column, value, reason, problem):
    columns = pick_a_pic_columns(4)
    columns[column][2] = value
    source = write_parquet(tmp_path / "pairs.parquet", columns)
    with pytest.raises(ValueError, match=rf"pairs\.parquet, row 3: {problem}.*data\.skip_bad_rows: true"):
        load_preference_pairs(data_config(source))

    pairs = load_preference_pairs(data_config(source, skip_bad_rows=True))
    assert pairs.captions == ["caption 0", "caption 1", "caption 3"]
    assert pairs.stats["bad_rows_skipped"] == 1
    assert pairs.stats[f"skipped_{reason}"] == 1


JSONL_BAD_ROWS = [
    ({"label_0": "1"}, "bad_label", r"label_0 is '1'"),
    ({"label_0": True}, "bad_label", r"label_0 is True"),
    ({"caption": 3}, "missing_caption", r"the caption \(column 'caption'\) is missing or empty: 3"),
    (
        {"jpg_1": "images/absent.png"},
        "missing_image",
        r"the image file .*absent\.png \(column 'jpg_1'\) cannot be read",
    ),
    ({"jpg_1": ["a list"]}, "missing_image", r"column 'jpg_1' holds a list"),
    ({"jpg_0": "images/corrupt.png"}, "corrupt_image", r"cannot decode the image"),
]


@pytest.mark.parametrize(("change", "reason", "problem"), JSONL_BAD_ROWS)
def test_bad_jsonl_row_names_file_line_and_fix(tmp_path, change, reason, problem):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "corrupt.png").write_bytes(TRUNCATED_PNG)
    rows = []
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(image_bytes(i))
        (tmp_path / "images" / f"{i}b.png").write_bytes(image_bytes(100 + i))
        rows.append(
            {"caption": f"caption {i}", "jpg_0": f"images/{i}.png", "jpg_1": f"images/{i}b.png", "label_0": 1}
        )
    rows[1].update(change)
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=rf"index\.jsonl, row 2 \(line 2\): {problem}.*skip_bad_rows"):
        load_preference_pairs(data_config(tmp_path / "index.jsonl"))
    pairs = load_preference_pairs(data_config(tmp_path / "index.jsonl", skip_bad_rows=True))
    assert pairs.captions == ["caption 0", "caption 2"]
    assert pairs.stats[f"skipped_{reason}"] == 1


def test_jsonl_row_without_a_key_is_a_bad_row_and_a_broken_line_fails(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "b.png").write_bytes(image_bytes(1))
    row = {"caption": "c", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1}
    lines = [json.dumps(row), json.dumps({key: value for key, value in row.items() if key != "caption"})]
    (tmp_path / "index.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"index\.jsonl, row 2 \(line 2\): the caption .* is missing"):
        load_preference_pairs(data_config(tmp_path / "index.jsonl"))

    (tmp_path / "index.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"index\.jsonl, line 2: not valid JSON"):
        load_preference_pairs(data_config(tmp_path / "index.jsonl", skip_bad_rows=True))


def test_missing_column_names_the_file_the_columns_and_the_setting(tmp_path):
    columns = pick_a_pic_columns(2)
    columns["prompt"] = columns.pop("caption")
    source = write_parquet(tmp_path / "pairs.parquet", columns)
    with pytest.raises(
        ValueError, match=r"pairs\.parquet: column 'caption' not found.*'prompt'.*data\.caption_column"
    ):
        load_preference_pairs(data_config(source))
    assert len(load_preference_pairs(data_config(source, caption_column="prompt"))) == 2


def test_skips_are_counted_per_reason_and_logged_once(tmp_path, caplog):
    columns = pick_a_pic_columns(7)
    columns["label_0"][1] = 3.0
    columns["label_0"][2] = -1.0
    columns["caption"][3] = None
    columns["jpg_0"][4] = b"\x89PNG broken"
    source = write_parquet(tmp_path / "p.parquet", columns)
    with caplog.at_level(logging.WARNING, logger="diffalign.diffusion.data"):
        pairs = load_preference_pairs(data_config(source, skip_bad_rows=True))
    assert pairs.stats == {
        "rows_read": 7,
        "pairs": 3,
        "ties_dropped": 0,
        "ties_kept": 0,
        "bad_rows_skipped": 4,
        "skipped_bad_label": 2,
        "skipped_corrupt_image": 1,
        "skipped_missing_caption": 1,
    }
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 4 bad rows" in warnings[0].getMessage()
    assert "'bad_label': 2" in warnings[0].getMessage()


def test_without_verification_a_corrupt_image_fails_when_read(tmp_path):
    columns = pick_a_pic_columns(3)
    columns["jpg_1"][1] = b"garbage"
    config = data_config(write_parquet(tmp_path / "p.parquet", columns), verify_media=False)
    dataset = PreferencePairDataset(load_preference_pairs(config), image_decoder(config))
    dataset[0]
    with pytest.raises(ValueError, match=r"p\.parquet, row 2: cannot decode the image"):
        dataset[1]


# --- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(20, 30), (30, 20), (16, 16), (9, 12)])
def test_pixels_follow_the_official_transforms(tmp_path, height, width):
    columns = pick_a_pic_columns(2)
    columns["jpg_0"] = [image_bytes(i, height, width) for i in range(2)]
    config = data_config(write_parquet(tmp_path / "p.parquet", columns), random_flip=False)
    item = PreferencePairDataset(load_preference_pairs(config), image_decoder(config))[0]
    assert item["chosen_pixels"].shape == (3, RESOLUTION, RESOLUTION)
    assert item["chosen_pixels"].dtype == torch.float32
    assert item["chosen_pixels"].min() >= -1.0 and item["chosen_pixels"].max() <= 1.0
    torch.testing.assert_close(
        item["chosen_pixels"], reference_pixels(columns["jpg_0"][0]), atol=1e-6, rtol=0
    )
    assert item["chosen_original_size"] == (height, width)
    scale = RESOLUTION / min(height, width)
    resized_height, resized_width = int(height * scale), int(width * scale)
    expected_corner = (round((resized_height - RESOLUTION) / 2), round((resized_width - RESOLUTION) / 2))
    assert item["chosen_crop_top_left"] == expected_corner


def test_flip_is_drawn_once_per_pair_and_applied_to_both_images(tmp_path):
    columns = pick_a_pic_columns(16)
    source = write_parquet(tmp_path / "p.parquet", columns)
    plain = PreferencePairDataset(
        load_preference_pairs(data_config(source, random_flip=False)),
        image_decoder(data_config(source, random_flip=False)),
    )
    flipping_config = data_config(source, random_flip=True)
    flipping = PreferencePairDataset(
        load_preference_pairs(flipping_config), image_decoder(flipping_config), seed=3
    )
    flipped_count = 0
    for index in range(len(plain)):
        expected, item = plain[index], flipping[index]
        chosen_flipped = torch.equal(item["chosen_pixels"], expected["chosen_pixels"].flip(-1))
        rejected_flipped = torch.equal(item["rejected_pixels"], expected["rejected_pixels"].flip(-1))
        assert chosen_flipped == rejected_flipped
        if not chosen_flipped:
            assert torch.equal(item["chosen_pixels"], expected["chosen_pixels"])
            assert torch.equal(item["rejected_pixels"], expected["rejected_pixels"])
        flipped_count += chosen_flipped
    assert 0 < flipped_count < len(plain)


def test_random_crop_reports_where_it_cropped(tmp_path):
    columns = pick_a_pic_columns(12)
    config = data_config(write_parquet(tmp_path / "p.parquet", columns), crop="random", random_flip=True)
    dataset = PreferencePairDataset(load_preference_pairs(config), image_decoder(config), seed=1)
    lefts, flips = set(), 0
    for index in range(len(dataset)):
        item = dataset[index]
        image = Image.open(io.BytesIO(columns["jpg_0"][index] if index % 2 == 0 else columns["jpg_1"][index]))
        resized = np.asarray(image.convert("RGB").resize((24, 16), Image.BILINEAR), dtype=np.float32) / 255
        top, left = item["chosen_crop_top_left"]
        assert top == 0 and 0 <= left <= 24 - RESOLUTION
        unflipped = torch.from_numpy((resized[:, left : left + RESOLUTION] - 0.5) / 0.5).permute(2, 0, 1)
        # A flipped image reports the corner of its crop in the flipped frame.
        mirrored_left = 24 - left - RESOLUTION
        flipped = torch.from_numpy((resized[:, mirrored_left : mirrored_left + RESOLUTION] - 0.5) / 0.5)
        flipped = flipped.permute(2, 0, 1).flip(-1)
        pixels = item["chosen_pixels"]
        assert torch.allclose(pixels, unflipped, atol=1e-6) or torch.allclose(pixels, flipped, atol=1e-6)
        flips += not torch.allclose(pixels, unflipped, atol=1e-6)
        lefts.add(left)
    assert len(lefts) > 2 and 0 < flips < len(dataset)


# --- caption dropout and per-item randomness ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_pairs(tmp_path_factory):
    count = 1500
    tiny, other = image_bytes(0, 8, 8), image_bytes(1, 8, 8)
    columns = {
        "caption": [f"caption {i}" for i in range(count)],
        "jpg_0": [tiny] * count,
        "jpg_1": [other] * count,
        "label_0": [1.0] * count,
    }
    config = DiffusionDataConfig(
        source=str(write_parquet(tmp_path_factory.mktemp("many") / "p.parquet", columns)), resolution=8
    )
    return load_preference_pairs(config), image_decoder(config)


def dropped_captions(dataset, indices) -> list[bool]:
    return [dataset[index]["caption"] == "" for index in indices]


def test_caption_dropout_rate_and_determinism(many_pairs):
    pairs, decoder = many_pairs
    dataset = PreferencePairDataset(pairs, decoder, caption_dropout=0.2, seed=7)
    dropped = dropped_captions(dataset, range(len(pairs)))
    # 1500 Bernoulli(0.2) draws: the standard deviation of the rate is 0.0103; 0.04 is almost four of them.
    assert abs(np.mean(dropped) - 0.2) < 0.04
    assert (
        dropped_captions(PreferencePairDataset(pairs, decoder, caption_dropout=0.2, seed=7), range(200))
        == dropped[:200]
    )
    reversed_order = dropped_captions(dataset, reversed(range(200)))
    assert reversed_order[::-1] == dropped[:200]  # an item does not depend on what was read before it
    other_seed = dropped_captions(
        PreferencePairDataset(pairs, decoder, caption_dropout=0.2, seed=8), range(200)
    )
    assert other_seed != dropped[:200]
    next_epoch = dropped_captions(dataset, range(len(pairs), len(pairs) + 200))
    assert next_epoch != dropped[:200]
    assert dataset[len(pairs) + 5]["index"] == 5
    kept = [dataset[index]["caption"] for index in range(20) if not dropped[index]]
    assert kept == [f"caption {index}" for index in range(20) if not dropped[index]]


def test_caption_dropout_extremes(many_pairs):
    pairs, decoder = many_pairs
    assert not any(dropped_captions(PreferencePairDataset(pairs, decoder, caption_dropout=0.0), range(100)))
    assert all(dropped_captions(PreferencePairDataset(pairs, decoder, caption_dropout=1.0), range(100)))


def test_collate_pairs_batches_every_field(tmp_path):
    config = data_config(write_parquet(tmp_path / "p.parquet", pick_a_pic_columns(3)))
    dataset = PreferencePairDataset(load_preference_pairs(config), image_decoder(config))
    items = [dataset[index] for index in range(3)]
    batch = collate_pairs(items)
    assert batch["caption"] == [item["caption"] for item in items]
    assert batch["chosen_pixels"].shape == (3, 3, RESOLUTION, RESOLUTION)
    assert torch.equal(batch["rejected_pixels"][2], items[2]["rejected_pixels"])
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == [1.0, 1.0, 1.0]
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["chosen_original_size"].dtype == torch.int64
    assert batch["chosen_original_size"].tolist() == [[20, 30]] * 3
    nested = collate_pairs(
        [{"prompt_embeds": {"a": torch.ones(2)}}, {"prompt_embeds": {"a": torch.zeros(2)}}]
    )
    assert nested["prompt_embeds"]["a"].tolist() == [[1.0, 1.0], [0.0, 0.0]]


# --- config and the trainer's entry point ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"crop": "random", "cache_dir": "cache"},
            r"data\.crop: 'random' cannot be combined with data\.cache_dir",
        ),
        ({"caption_dropout": 1.5}, r"data\.caption_dropout must be a probability in \[0, 1\], got 1\.5"),
        ({"resolution": 0}, r"data\.resolution must be a positive number of pixels, got 0"),
        ({"max_pairs": 0}, r"data\.max_pairs must be >= 1"),
        ({"vae_encode_batch_size": 0}, r"data\.vae_encode_batch_size must be >= 1"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionDataConfig(**overrides)


def test_config_defaults_follow_the_official_sd15_launcher():
    config = DiffusionDataConfig()
    assert (config.caption_column, config.image_0_column, config.image_1_column, config.label_0_column) == (
        "caption",
        "jpg_0",
        "jpg_1",
        "label_0",
    )
    assert config.random_flip and config.drop_ties and config.crop == "center"
    assert config.caption_dropout == 0.2 and config.resolution == 512 and config.vae_encode_batch_size == 8


def test_build_pair_dataset_without_cache_yields_pixels(tmp_path):
    config = data_config(write_parquet(tmp_path / "p.parquet", pick_a_pic_columns(4, [1.0, 0.5, 0.0, 1.0])))
    dataset, collate, stats = build_pair_dataset(config, family=None, seed=0)
    assert isinstance(dataset, PreferencePairDataset) and collate is collate_pairs
    assert len(dataset) == 3 and stats["ties_dropped"] == 1
    assert collate([dataset[0], dataset[1]])["chosen_pixels"].shape == (2, 3, RESOLUTION, RESOLUTION)
