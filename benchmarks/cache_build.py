"""Latent cache build throughput on 1 and N processes, and the projected time to cache Pick-a-Pic v2.

Every process of ``diffalign.diffusion.cache.build_pair_cache`` reads every pair and encodes the images whose
content key falls to it. This script writes ``--pairs`` Pick-a-Pic-schema pairs (distinct PNG images), builds
their cache into an empty folder with the SD1.5 VAE architecture (configs/models/sd15/vae.json, random weights:
speed does not depend on them; each image encoded plain and flipped, as with data.random_flip) on 1 process and
on each of ``--processes``, launched with torchrun as ``accelerate launch`` would, each process with
``--threads`` CPU threads, and prints images/s (VAE encodes per second of the whole build, from the first record
read to every process done) and the speed-up over 1 process. The bar: ≥ 1.8× with 2 processes on 2 CPU cores.

Then it measures one process's encode rate at ``--project-resolution`` (512 px: SD1.5's training resolution)
and projects the cache time of Pick-a-Pic v2 (851,293 pairs once ties are dropped, two images each, two views)
on 8 such devices with the measured N-process efficiency. On CPU that is 8 CPU processes; the 8-GPU figure is
this command with ``--device cuda`` on one GPU (it then measures the GPU's rate).

    python benchmarks/cache_build.py                                  # CPU, 1 and 2 processes, 1 thread each
    python benchmarks/cache_build.py --device cuda --processes 1 --project-resolution 512 --project-images 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PICKAPIC_V2_PAIRS = 851_293  # train pairs without ties (Wallace et al., 2023)
VIEWS = 2  # plain and flipped


def write_pairs(path: Path, pairs: int, size: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def image() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    table = {
        "caption": [f"caption {i}" for i in range(pairs)],
        "jpg_0": [image() for _ in range(pairs)],
        "jpg_1": [image() for _ in range(pairs)],
        "label_0": [1.0] * pairs,
    }
    pq.write_table(pa.table(table), path)


def build_vae(device: str, dtype: str):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = AutoencoderKL.load_config(str(ROOT / "configs" / "models" / "sd15" / "vae.json"))
    return AutoencoderKL.from_config(config).to(device, getattr(torch, dtype)).eval()


def worker(args: argparse.Namespace) -> None:
    """One process of a build (under torchrun); the main process prints the build's images/s."""
    import torch
    from accelerate import Accelerator

    from diffalign.diffusion.cache import build_pair_cache
    from diffalign.diffusion.data import DiffusionDataConfig, image_decoder, load_preference_pairs
    from diffalign.diffusion.families.base import LatentNormalization
    from diffalign.progress import configure_progress

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.device == "cpu")
    configure_progress(False)
    config = DiffusionDataConfig(
        source=str(args.source), resolution=args.resolution, cache_dir=str(args.cache_dir)
    )
    decoder = image_decoder(config)
    pairs = load_preference_pairs(config, decoder)
    vae = build_vae(str(accelerator.device), args.dtype)
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    cache = build_pair_cache(
        pairs.records(),
        decoder,
        args.cache_dir,
        vae=vae,
        normalization=LatentNormalization.of_vae(vae),
        encode_prompts=lambda captions: {"prompt_embeds": torch.zeros(len(captions), 4, 8)},
        text_encoder_id="none",
        batch_size=args.vae_batch_size,
        vae_dtype=getattr(torch, args.dtype),
        total=len(pairs),
        accelerator=accelerator,
    )
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        encodes = cache.stats["cache_images_encoded"] * len(cache.augmentations)
        print(json.dumps({"encodes": encodes, "seconds": seconds}))


def launch_build(args: argparse.Namespace, processes: int, work: Path) -> dict:
    cache_dir = work / f"cache-{processes}-{time.monotonic_ns()}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    command += [__file__, "--worker", "--source", str(work / "pairs.parquet"), "--cache-dir", str(cache_dir)]
    command += ["--threads", str(args.threads), "--resolution", str(args.resolution), "--device", args.device]
    command += ["--dtype", args.dtype, "--vae-batch-size", str(args.vae_batch_size)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def per_image_seconds(args: argparse.Namespace) -> float:
    """One process's seconds per VAE encode at ``--project-resolution`` (after one untimed encode)."""
    import torch

    from diffalign.diffusion.cache import vae_posterior

    torch.set_num_threads(args.threads)
    vae = build_vae(args.device, args.dtype)
    size = args.project_resolution
    pixels = torch.rand(args.vae_batch_size, 3, size, size) * 2 - 1
    vae_posterior(vae, pixels[:1])
    batches = max(1, args.project_images // args.vae_batch_size)
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        vae_posterior(vae, pixels)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / (batches * args.vae_batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=64, help="data.resolution of the timed builds")
    parser.add_argument("--processes", type=int, nargs="+", default=[2], help="compared with 1 process")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--vae-batch-size", type=int, default=8, help="data.vae_encode_batch_size")
    parser.add_argument(
        "--repeats", type=int, default=2, help="builds per process count; the fastest is kept"
    )
    parser.add_argument("--project-resolution", type=int, default=512)
    parser.add_argument("--project-images", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_pairs(work / "pairs.parquet", args.pairs, args.resolution)
        rows = []
        for processes in [1, *args.processes]:
            builds = [launch_build(args, processes, work) for _ in range(args.repeats)]
            best = min(builds, key=lambda build: build["seconds"])
            rows.append({"processes": processes, **best, "images_per_s": best["encodes"] / best["seconds"]})
    print_table(rows, args)
    project_pickapic(rows, args)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"{args.pairs} pairs at {args.resolution} px, {args.device}, {args.threads} thread(s) per process, "
        f"SD1.5 VAE in {args.dtype}"
    )
    print("| processes | VAE encodes | seconds | images/s | speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        speedup = row["images_per_s"] / rows[0]["images_per_s"]
        print(
            f"| {row['processes']} | {row['encodes']} | {row['seconds']:.1f} | {row['images_per_s']:.2f} | {speedup:.2f}× |"
        )


def project_pickapic(rows: list[dict], args: argparse.Namespace) -> None:
    """Pick-a-Pic v2's cache build on 8 devices, from one process's time per image at the project resolution and
    the measured multi-process efficiency (written with the rows to ``--json``)."""
    seconds = per_image_seconds(args)
    widest = rows[-1]
    efficiency = widest["images_per_s"] / rows[0]["images_per_s"] / widest["processes"]
    encodes = PICKAPIC_V2_PAIRS * 2 * VIEWS
    hours = encodes * seconds / (8 * min(1.0, efficiency)) / 3600
    print(
        f"one process at {args.project_resolution} px: {seconds:.3f} s per image ({1 / seconds:.2f} images/s); "
        f"Pick-a-Pic v2 ({PICKAPIC_V2_PAIRS:,} pairs × 2 images × {VIEWS} views = {encodes:,} encodes) on 8 such "
        f"devices at the measured {widest['processes']}-process efficiency {efficiency:.2f}: {hours:,.1f} h"
    )
    if args.json is not None:
        record = {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
            "project": {"seconds_per_image": seconds, "efficiency": efficiency, "hours_on_8": hours},
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
