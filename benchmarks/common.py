"""What both benchmark scripts share: their common options, the machine line and the JSON record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def benchmark_parser(description: str | None, models: list[str]) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes; each script adds its own."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=models, default="tiny")
    parser.add_argument("--trainable", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and settings here")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's); 1 is steadier on a busy CPU",
    )
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def trainables(args: argparse.Namespace) -> list[str]:
    return ["lora", "full"] if args.trainable == "both" else [args.trainable]


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_record(args: argparse.Namespace, rows: list[dict], versions: dict[str, str]) -> None:
    """With ``--json``, write the settings, machine, versions and rows of this run there."""
    if args.json is None:
        return
    record: dict[str, Any] = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        },
        "machine": machine(args.device),
        "versions": versions,
        "rows": rows,
    }
    args.json.write_text(json.dumps(record, indent=2))


def measure(step, device: torch.device, warmup: int, steps: int, count_flops: bool = True):
    """(seconds per step, peak GiB on a GPU, FLOPs per step or None) of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # one sync at the end, as a real loop's logging does
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return elapsed, peak, flops


def resident_gib() -> float:
    """The process's resident set now (Linux), in GiB."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
