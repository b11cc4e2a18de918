"""``diffalign relabel``: new labels from a scorer whose preference is known (brightness, loudness), checked row by
row against the rule label_0 = 1 / 0 / 0.5 (tie margin), in the source's schema, with the summary's counts."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from PIL import Image
from torch import Tensor

from diffalign.cli import main
from diffalign.eval.relabel import RelabelConfig, preference_labels, relabel
from diffalign.rewards import Audio, Scorer, register_scorer


class Brightness(Scorer):
    """Mean pixel value: brighter images are preferred."""

    modality = "image"

    def forward(self, images, prompts=None, reference=None) -> Tensor:
        if not isinstance(images, Tensor):  # images of different sizes arrive as PIL images
            return self.output(
                torch.tensor([np.asarray(image, dtype=np.float64).mean() / 255 for image in images])
            )
        return self.output(images.double().mean(dim=(1, 2, 3)))


class Darkness(Brightness):
    """Brightness, but lower is better: darker images are preferred."""

    higher_is_better = False


class Loudness(Scorer):
    """Root mean square of each clip: louder clips are preferred."""

    modality = "audio"

    def forward(self, audio: Audio, prompts=None, reference=None) -> Tensor:
        return self.output(audio.waveforms.double().pow(2).mean(dim=1).sqrt())


@register_scorer("brightness_for_relabel_tests")
def brightness(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Brightness:
    return Brightness(device, dtype)


def png(level: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (level, level, level)).save(buffer, format="PNG")
    return buffer.getvalue()


# (image_0 grey level, image_1 grey level, old label_0); levels are on the 0–255 grid so PNGs hold them exactly.
ROWS = [
    (204, 51, 1.0),  # first brighter: 1, agrees
    (51, 204, 1.0),  # second brighter: 0, disagrees
    (128, 133, 0.0),  # 5/255 ≈ 0.0196 apart: a tie under a 0.05 margin, decisive without one
    (77, 230, 0.0),  # second brighter: 0, agrees
    (153, 102, 0.5),  # an old tie, now 1
]


def write_pickapic(path, rows=ROWS, image_1_override: dict[int, bytes | None] | None = None) -> pa.Table:
    image_1_override = image_1_override or {}
    table = pa.table(
        {
            "caption": [f"prompt {i}" for i in range(len(rows))],
            "jpg_0": pa.array(
                [png(first, size=8 if i != 3 else 12) for i, (first, _, _) in enumerate(rows)], pa.binary()
            ),
            "jpg_1": pa.array(
                [image_1_override.get(i, png(second)) for i, (_, second, _) in enumerate(rows)], pa.binary()
            ),
            "label_0": pa.array([label for _, _, label in rows], pa.float64()),
            "label_1": pa.array([1 - label for _, _, label in rows], pa.float64()),
            "user_id": pa.array([10 * i for i in range(len(rows))], pa.int64()),
        }
    ).replace_schema_metadata({"huggingface": '{"info": "kept as it is"}'})
    pq.write_table(table, path)
    return table


def test_preference_labels_follow_the_rule():
    first = torch.tensor([1.0, 0.0, 0.50, 0.50, 0.50])
    second = torch.tensor([0.0, 1.0, 0.52, 0.46, 0.50])
    assert preference_labels(first, second, 0.05, True).tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert preference_labels(first, second, 0.0, True).tolist() == [1.0, 0.0, 0.0, 1.0, 0.5]
    assert preference_labels(first, second, 0.0, False).tolist() == [0.0, 1.0, 1.0, 0.0, 0.5]


def test_pickapic_pairs_get_new_labels_in_the_same_schema(tmp_path):
    source = write_pickapic(tmp_path / "pairs.parquet")
    config = RelabelConfig(
        source=str(tmp_path / "pairs.parquet"), output=str(tmp_path / "out" / "new.parquet"), tie_margin=0.05
    )
    summary = relabel(config, scorer=Brightness())

    output = pq.read_table(tmp_path / "out" / "new.parquet")
    assert output.schema == source.schema and output.schema.metadata == source.schema.metadata
    assert output.column("label_0").to_pylist() == [1.0, 0.0, 0.5, 0.0, 1.0]
    assert output.column("label_1").to_pylist() == [0.0, 1.0, 0.5, 1.0, 0.0]
    for column in ("caption", "jpg_0", "jpg_1", "user_id"):
        assert output.column(column).equals(source.column(column))
    on_disk = json.loads((tmp_path / "out" / "new.summary.json").read_text())
    assert on_disk == summary
    assert summary["rows_read"] == summary["rows_written"] == 5
    assert (summary["first_preferred"], summary["second_preferred"], summary["ties"]) == (2, 2, 1)
    # Decisive under both labellings: rows 0, 1, 3; rows 0 and 3 agree.
    assert summary["decisive_pairs"] == 3 and summary["agreement"] == pytest.approx(2 / 3)
    assert summary["old_ties"] == 1 and summary["bad_rows_skipped"] == 0

    no_margin = relabel(
        RelabelConfig(source=config.source, output=str(tmp_path / "exact.parquet")), scorer=Brightness()
    )
    assert pq.read_table(tmp_path / "exact.parquet").column("label_0").to_pylist() == [
        1.0,
        0.0,
        0.0,
        0.0,
        1.0,
    ]
    assert no_margin["ties"] == 0 and no_margin["agreement"] == pytest.approx(3 / 4)

    relabel(
        RelabelConfig(source=config.source, output=str(tmp_path / "dark.parquet"), tie_margin=0.05),
        scorer=Darkness(),
    )
    assert pq.read_table(tmp_path / "dark.parquet").column("label_0").to_pylist() == [0.0, 1.0, 0.5, 1.0, 0.0]


def test_bad_rows_fail_with_their_location_or_are_skipped_and_counted(tmp_path):
    write_pickapic(tmp_path / "pairs.parquet", image_1_override={2: b"not an image", 4: None})
    config = RelabelConfig(source=str(tmp_path / "pairs.parquet"), output=str(tmp_path / "new.parquet"))
    config.scorer.batch_size = 2  # row 3 opens the second batch: rows are counted across batches
    with pytest.raises(
        ValueError, match=r"pairs.parquet, row 3: column 'jpg_1'.*not a readable image.*skip_bad_rows"
    ):
        relabel(config, scorer=Brightness())
    # The first batch was relabelled before row 3 failed; no partial file is left to pass for the whole output.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pairs.parquet"]

    config.skip_bad_rows = True
    summary = relabel(config, scorer=Brightness())
    output = pq.read_table(tmp_path / "new.parquet")
    assert output.column("user_id").to_pylist() == [0, 10, 30]
    assert output.column("label_0").to_pylist() == [1.0, 0.0, 0.0]
    assert summary["bad_rows_skipped"] == 2
    assert (summary["skipped_corrupt_media"], summary["skipped_missing_image"]) == (1, 1)
    assert (summary["rows_read"], summary["rows_written"]) == (5, 3)


def test_a_source_in_another_schema_is_named(tmp_path):
    pq.write_table(
        pa.table({"prompt": ["x"], "chosen": [b""], "rejected": [b""]}), tmp_path / "audio.parquet"
    )
    config = RelabelConfig(source=str(tmp_path / "audio.parquet"), output=str(tmp_path / "new.parquet"))
    with pytest.raises(
        ValueError,
        match=r"column 'caption' not found.*\['prompt', 'chosen', 'rejected'\].*schema: pickapic or audio_alpaca",
    ):
        relabel(config, scorer=Brightness())


def wav(amplitude: float, samples: int, rate: int = 16_000) -> dict:
    buffer = io.BytesIO()
    waveform = amplitude * np.sin(np.linspace(0, 200 * np.pi, samples)).astype(np.float32)
    soundfile.write(buffer, waveform, rate, format="WAV", subtype="FLOAT")
    return {"bytes": buffer.getvalue(), "path": f"clip-{amplitude}-{samples}.wav"}


def test_audio_alpaca_pairs_are_reordered_and_ties_dropped(tmp_path):
    """The audio-alpaca schema (prompt, chosen, rejected as datasets' {bytes, path} audio structs) has no label:
    the preferred clip becomes `chosen`, and ties, which it cannot state, are dropped."""
    chosen = [wav(0.5, 800), wav(0.1, 1200), wav(0.3, 1000)]
    rejected = [wav(0.1, 1000), wav(0.5, 900), wav(0.3, 1000)]
    source = pa.table(
        {
            "prompt": ["rain", "a dog", "wind"],
            "chosen": chosen,
            "rejected": rejected,
            "strategy": ["a", "b", "c"],
        }
    )
    pq.write_table(source, tmp_path / "alpaca.parquet")
    config = RelabelConfig(
        source=str(tmp_path),
        output=str(tmp_path / "out" / "new.parquet"),
        schema="audio_alpaca",
        tie_margin=1e-3,
    )
    summary = relabel(config, scorer=Loudness())

    output = pq.read_table(tmp_path / "out" / "new.parquet")
    assert output.schema == source.schema
    assert output.column("prompt").to_pylist() == ["rain", "a dog"]
    assert output.column("strategy").to_pylist() == ["a", "b"]
    assert output.column("chosen").to_pylist() == [chosen[0], rejected[1]]
    assert output.column("rejected").to_pylist() == [rejected[0], chosen[1]]
    assert (
        summary["first_preferred"],
        summary["second_preferred"],
        summary["ties"],
        summary["ties_dropped"],
    ) == (1, 1, 1, 1)
    assert summary["agreement"] == pytest.approx(1 / 2) and summary["rows_written"] == 2


def test_relabel_cli_takes_settings_a_config_or_both(tmp_path, capsys):
    write_pickapic(tmp_path / "pairs.parquet")
    settings = [
        f"source={tmp_path / 'pairs.parquet'}",
        f"output={tmp_path / 'new.parquet'}",
        "scorer.name=brightness_for_relabel_tests",
    ]
    # Batches of 2: rows 2 and 3 hold images of two sizes and reach the scorer as PIL images, the others as tensors.
    assert main(["relabel", *settings, "tie_margin=0.05", "scorer.batch_size=2"]) == 0
    assert json.loads(capsys.readouterr().out)["ties"] == 1
    assert pq.read_table(tmp_path / "new.parquet").column("label_0").to_pylist() == [1.0, 0.0, 0.5, 0.0, 1.0]

    config = tmp_path / "relabel.yaml"
    config.write_text(
        "\n".join(setting.replace("=", ": ", 1) for setting in settings[:2])
        + "\nscorer:\n  name: brightness_for_relabel_tests\n"
    )
    assert main(["relabel", str(config), "tie_margin=0"]) == 0
    assert json.loads(capsys.readouterr().out)["ties"] == 0

    assert main(["relabel", *settings, "tie_margin=-1"]) == 2
    assert "tie_margin must be >= 0, got -1" in capsys.readouterr().err
