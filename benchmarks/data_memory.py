"""Peak memory of the diffusion data pipeline against the size of the dataset: streamed (``data.streaming``)
and loaded.

Generates Pick-a-Pic-schema parquet shards (caption, jpg_0, jpg_1, label_0; small PNG images, 10,000 rows a
shard, 1 row in 10 a tie, as the hub dataset is sharded) of each ``--rows`` size, then reads one whole epoch in
a fresh process per size and mode: every row checked, every pair decoded and transformed (the trainer's
resolution and flips) and collated into batches, as training reads them. Printed: the process's peak resident
memory, its growth over the process after the imports, rows/s, and the ratio of the largest dataset's peak to
the smallest's. The bar: streamed peak at 200k rows within 10% of the peak at 20k rows.

    python benchmarks/data_memory.py                        # 20k and 200k rows, streamed and loaded
    python benchmarks/data_memory.py --rows 20000 200000 --modes streamed
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROWS_PER_SHARD = 10_000


def png(index: int, variant: int, size: int) -> bytes:
    from PIL import Image

    color = ((index * 37 + variant * 101) % 256, (index // 256) % 256, (index * 7 + 50 * variant) % 256)
    buffer = io.BytesIO()
    image = Image.new("RGB", (size + variant * 4, size), color)
    image.putpixel((index % size, variant), (255 - color[0], 0, 0))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, rows: int, image_size: int) -> Path:
    """``rows`` pairs in ``train-XXXXX.parquet`` shards; reused when already written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        indices = range(start, min(rows, start + ROWS_PER_SHARD))
        table = pa.table(
            {
                "caption": [f"a picture number {i}" for i in indices],
                "jpg_0": [png(i, 0, image_size) for i in indices],
                "jpg_1": [png(i, 1, image_size) for i in indices],
                "label_0": [0.5 if i % 10 == 0 else float(i % 2) for i in indices],
            }
        )
        pq.write_table(table, folder / f"train-{shard:05d}.parquet", row_group_size=1000)
    done.write_text("")
    return folder


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_epoch(source: Path, mode: str, batch_size: int, resolution: int) -> dict:
    """One epoch of the pipeline in this process; what the parent prints."""
    from diffalign.diffusion.data import (
        DiffusionDataConfig,
        PreferencePairDataset,
        collate_pairs,
        image_decoder,
        load_preference_pairs,
    )
    from diffalign.diffusion.streamed_pairs import StreamedPairs
    from diffalign.progress import configure_progress

    configure_progress(False)
    after_imports = peak_rss_gib()
    config = DiffusionDataConfig(source=str(source), resolution=resolution, streaming=mode == "streamed")
    decoder = image_decoder(config)
    started = time.perf_counter()
    if mode == "streamed":
        stream = StreamedPairs(config, decoder, seed=0)
        batches = stream.batches(batch_size, collate=collate_pairs)
        pairs = 0
        while True:
            batch = next(batches)
            if batches.position()["epoch"] > 0:
                break  # the first batch of the next epoch: one epoch read
            pairs += len(batch["caption"])
    else:
        dataset = PreferencePairDataset(load_preference_pairs(config, decoder), decoder, seed=0)
        pairs = len(dataset) // batch_size * batch_size
        for start in range(0, pairs, batch_size):
            collate_pairs([dataset[index] for index in range(start, start + batch_size)])
    return {
        "pairs": pairs,
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": peak_rss_gib(),
        "after_imports_gib": after_imports,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--modes", nargs="+", choices=["streamed", "loaded"], default=["streamed", "loaded"])
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/bench-data-memory"))
    parser.add_argument(
        "--image-size", type=int, default=24, help="pixels of the stored images' shorter side"
    )
    parser.add_argument("--resolution", type=int, default=16, help="data.resolution of the pipeline")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("SOURCE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(read_epoch(Path(args.worker[0]), args.worker[1], args.batch_size, args.resolution)))
        return

    results = []
    for rows in args.rows:
        source = write_shards(args.work_dir / f"pickapic-{rows}", rows, args.image_size)
        for mode in args.modes:
            command = [sys.executable, __file__, "--worker", str(source), mode]
            command += ["--batch-size", str(args.batch_size), "--resolution", str(args.resolution)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append({"rows": rows, "mode": mode, **json.loads(output.strip().splitlines()[-1])})

    print("| mode | rows | pairs read | peak RSS GiB | growth after imports GiB | pairs/s |")
    print("|---|---|---|---|---|---|")
    for row in results:
        growth = row["peak_rss_gib"] - row["after_imports_gib"]
        print(
            f"| {row['mode']} | {row['rows']:,} | {row['pairs']:,} | {row['peak_rss_gib']:.3f} | {growth:.3f} | "
            f"{row['pairs'] / row['seconds']:.0f} |"
        )
    for mode in args.modes:
        peaks = [row["peak_rss_gib"] for row in results if row["mode"] == mode]
        print(
            f"{mode}: peak RSS at {max(args.rows):,} rows / at {min(args.rows):,} rows = {peaks[-1] / peaks[0]:.3f}"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": results}, indent=2)
        )


if __name__ == "__main__":
    main()
