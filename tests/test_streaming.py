"""Streamed data (diffalign/streaming.py): the seeded global stream, its split over processes, exact resume,
row checks as rows arrive, and the diffusion and LLM streams against their loaded counterparts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import RegressionRecipe, data_config, pick_a_pic_columns, train_regression, write_parquet
from transformers import AutoTokenizer

from diffalign.diffusion.data import (
    PreferencePairDataset,
    collate_pairs,
    image_decoder,
    load_preference_pairs,
)
from diffalign.diffusion.streamed_pairs import StreamedPairs
from diffalign.llm.batching import PreferenceStream
from diffalign.llm.config import LLMDataConfig
from diffalign.llm.data import load_preference_items
from diffalign.streaming import BadRow, RowStream, stream_files

TOY_LLM = Path(__file__).resolve().parents[1] / "assets" / "toy-llm"


class NumberStream(RowStream):
    """Rows ``{"number": n}``; multiples of ``bad_every`` are bad rows, and an item is its number."""

    def __init__(self, files: list[Path], *, seed: int = 0, shuffle_buffer: int = 4, bad_every: int = 0):
        super().__init__(
            stream_files(files, "parquet"), seed=seed, shuffle_buffer=shuffle_buffer, skip_bad_rows=True
        )
        self.bad_every = bad_every

    def check_row(self, row, location):
        if self.bad_every and row["number"] % self.bad_every == 0:
            raise BadRow("multiple", f"{row['number']} is a multiple of {self.bad_every}")
        return row["number"]

    def make_item(self, record, *, epoch, position):
        return record


def collate_numbers(items: list[int]) -> dict:
    return {"numbers": items}


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """Three parquet shards of 7, 5 and 9 rows (21 numbers), in row groups of 3."""
    files, start = [], 0
    for number, size in enumerate((7, 5, 9)):
        path = tmp_path / f"train-{number}.parquet"
        pq.write_table(pa.table({"number": list(range(start, start + size))}), path, row_group_size=3)
        files.append(path)
        start += size
    return files


def take(batches, count: int) -> list[tuple[list[int], list[int]]]:
    return [(batch["numbers"], batch["sample_ids"]) for batch in (next(batches) for _ in range(count))]


def test_an_epoch_reads_every_row_once_in_an_order_drawn_from_the_seed(shards):
    (first, _), (second, _) = take(NumberStream(shards).batches(21, collate=collate_numbers), 2)
    assert sorted(first) == list(range(21)) and sorted(second) == list(range(21))
    assert first != list(range(21)) and first != second  # shuffled, and differently in each epoch
    assert take(NumberStream(shards).batches(21, collate=collate_numbers), 1)[0][0] == first
    assert take(NumberStream(shards, seed=1).batches(21, collate=collate_numbers), 1)[0][0] != first
    # Shards are read one after another, each in windows of 4 consecutive rows: (shard, window) never goes back.
    starts = [0, 7, 12]
    shard_of = [max(i for i, start in enumerate(starts) if number >= start) for number in first]
    blocks = [(shard, (number - starts[shard]) // 4) for shard, number in zip(shard_of, first)]
    assert [block for i, block in enumerate(blocks) if i == 0 or block != blocks[i - 1]] == list(
        dict.fromkeys(blocks)
    )
    assert len(dict.fromkeys(blocks)) == 2 + 2 + 3


def test_processes_share_each_global_batch_as_one_process_with_the_global_batch(shards):
    """3 processes × 2 = 1 process × 6, step by step, with bad rows skipped and an epoch's tail dropped."""
    one = take(NumberStream(shards, bad_every=5).batches(6, collate=collate_numbers), 6)
    per_process = [
        take(
            NumberStream(shards, bad_every=5).batches(
                2, collate=collate_numbers, process_index=r, num_processes=3
            ),
            6,
        )
        for r in range(3)
    ]
    for step, (numbers, sample_ids) in enumerate(one):
        assert [number for r in range(3) for number in per_process[r][step][0]] == numbers
        assert [sample_id for r in range(3) for sample_id in per_process[r][step][1]] == sample_ids
    assert [ids for _, ids in one] == [list(range(6 * step, 6 * step + 6)) for step in range(6)]
    # 21 rows minus the 5 multiples of 5 leave 16 per epoch: two batches of 6, and 4 rows dropped.
    assert all(number % 5 for numbers, _ in one for number in numbers)
    assert one[0][0] + one[1][0] != one[2][0] + one[3][0]  # epoch 1 is another draw


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5])  # mid-window, mid-shard, at an epoch's end, in epoch 2
def test_a_stream_resumes_exactly_from_its_saved_position(shards, stop_after):
    batches = NumberStream(shards, bad_every=7).batches(3, collate=collate_numbers)
    uninterrupted = take(batches, 8)
    stopped = NumberStream(shards, bad_every=7).batches(3, collate=collate_numbers)
    take(stopped, stop_after)
    saved = json.loads(json.dumps(stopped.position()))  # as a checkpoint stores it
    resumed = NumberStream(shards, bad_every=7).batches(3, collate=collate_numbers, position=saved)
    assert take(resumed, 8 - stop_after) == uninterrupted[stop_after:]
    assert resumed.position() == batches.position()  # skip counts and rows read continue too
    assert batches.position()["skipped"]["multiple"] > 0


def test_a_position_resumes_on_another_number_of_processes(shards):
    """Stopped with 2 processes × 2 after 3 steps, continued with 1 process × 4: the same global batches."""
    one = take(NumberStream(shards).batches(4, collate=collate_numbers), 6)
    two = [
        NumberStream(shards).batches(2, collate=collate_numbers, process_index=r, num_processes=2)
        for r in range(2)
    ]
    for batches in two:
        take(batches, 3)
    assert two[0].position() == two[1].position()  # every process holds the same position
    resumed = NumberStream(shards).batches(4, collate=collate_numbers, position=two[0].position())
    assert take(resumed, 3) == one[3:]


def test_a_stream_smaller_than_one_global_batch_is_refused(shards):
    with pytest.raises(
        ValueError, match=r"fewer valid rows than one global batch \(24.*lower run.batch_size"
    ):
        next(NumberStream(shards).batches(8, collate=collate_numbers, num_processes=3))


# --- diffusion pairs -------------------------------------------------------------------------------------------


def test_streamed_pairs_are_the_loaded_pairs_item_for_item(tmp_path):
    """One shard read in stored order (shuffle_buffer 1): item k of the stream is item k of the loaded dataset,
    pixels, flips and caption dropout included; a bad row and a tie are left out by both."""
    columns = pick_a_pic_columns(10, labels=[1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    columns["caption"][4] = ""
    source = write_parquet(tmp_path / "pairs.parquet", columns)
    settings = dict(skip_bad_rows=True, caption_dropout=0.5)
    loaded_config = data_config(source, **settings)
    decoder = image_decoder(loaded_config)
    loaded = PreferencePairDataset(load_preference_pairs(loaded_config), decoder, caption_dropout=0.5, seed=3)
    stream = StreamedPairs(data_config(source, streaming=True, shuffle_buffer=1, **settings), decoder, seed=3)
    batches = stream.batches(len(loaded), collate=collate_pairs)
    for epoch in range(2):
        streamed = next(batches)
        expected = collate_pairs([loaded[epoch * len(loaded) + index] for index in range(len(loaded))])
        assert streamed["caption"] == expected["caption"] and "" in streamed["caption"]
        torch.testing.assert_close(streamed["chosen_pixels"], expected["chosen_pixels"], rtol=0, atol=0)
        torch.testing.assert_close(streamed["rejected_pixels"], expected["rejected_pixels"], rtol=0, atol=0)
        assert streamed["sample_ids"] == [epoch * len(loaded) + index for index in range(len(loaded))]
    assert batches.position()["skipped"] == {"missing_caption": 2, "ties_dropped": 2}  # two epochs


def test_a_bad_streamed_row_names_its_file_and_row(tmp_path):
    write_parquet(tmp_path / "data" / "train-0.parquet", pick_a_pic_columns(4))
    columns = pick_a_pic_columns(4)
    columns["label_0"][2] = 0.7
    write_parquet(tmp_path / "data" / "train-1.parquet", columns)
    config = data_config(tmp_path / "data", streaming=True, shuffle_buffer=1)
    stream = StreamedPairs(config, image_decoder(config), seed=0)
    with pytest.raises(ValueError, match=r"train-1.parquet, row 3: label_0 is 0.7.*skip_bad_rows: true"):
        next(stream.batches(7, collate=collate_pairs))  # reaches the row in either shard order


def test_a_streamed_source_without_a_configured_column_is_refused(tmp_path):
    source = write_parquet(tmp_path / "pairs.parquet", pick_a_pic_columns(4))
    config = data_config(source, streaming=True, caption_column="prompt")
    with pytest.raises(ValueError, match=r"column 'prompt' not found.*data.caption_column"):
        StreamedPairs(config, image_decoder(config), seed=0)


# --- LLM rows --------------------------------------------------------------------------------------------------


def test_streamed_llm_rows_are_the_loaded_items(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(TOY_LLM)
    config = dict(path=str(TOY_LLM / "data" / "conversational_train.jsonl"), cache_dir=str(tmp_path / "tok"))
    items, _ = load_preference_items(LLMDataConfig(**config), tokenizer)
    stream = PreferenceStream(
        LLMDataConfig(**config, streaming=True, shuffle_buffer=1),
        tokenizer,
        seed=0,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert stream.schema == "conversational" and stream.paired
    batch = next(stream.batches(8, collate=stream.collate))
    expected = stream.collate([(index, items[index]) for index in range(8)])
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and batch["index"].tolist() == list(
        range(8)
    )


# --- through the training loop ---------------------------------------------------------------------------------


class StreamedRegression(RegressionRecipe):
    """The loop's regression recipe on a stream: row n is the input ``[n, 1, -n, 2]/10``."""

    def __init__(self, output_dir: Path, files: list[Path]):
        super().__init__(output_dir)
        self.train_dataset = NumberStream(files, bad_every=4)

    def collate(self, numbers):
        inputs = torch.tensor([[n / 10, 1.0, -n / 10, 2.0] for n in numbers])
        return {"inputs": inputs, "targets": inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0])}


def test_the_loop_resumes_a_stream_exactly(tmp_path, shards):
    full, _ = train_regression(tmp_path / "full", StreamedRegression(tmp_path / "full", shards), max_steps=8)
    first, _ = train_regression(
        tmp_path / "split", StreamedRegression(tmp_path / "split", shards), max_steps=4
    )
    resumed, _ = train_regression(
        tmp_path / "split", StreamedRegression(tmp_path / "split", shards), max_steps=8, resume="latest"
    )
    assert (
        first.losses + resumed.losses == full.losses
    )  # 15 usable rows: epochs of 3 steps of 4, resumed mid-epoch
    assert torch.equal(resumed.model.weight, full.model.weight)
