"""Rebuild the shipped toy models: ``python -m diffalign.toy build all|t2i|llm|t2m|t2i-flow|t2m-ace``.

``build all`` runs the toys side by side, one process per CPU core (each builder trains on one thread: small
models run faster on one uncontended core than on two shared ones), so the whole world rebuilds in the time of
its slowest chain of toys: a toy that reuses another's models starts once that one is built.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"

# toy name → (module with a ``build(output_dir, seed)`` function that fills the empty folder ``output_dir``, folder
# under assets/); a toy comes after the toys it reuses.
TOYS = {
    "t2i": ("diffalign.toy.t2i", "toy-t2i"),
    "llm": ("diffalign.toy.llm", "toy-llm"),
    "t2m": ("diffalign.toy.music", "toy-t2m"),
    "t2m-ace": ("diffalign.toy.music_ace", "toy-t2m-ace"),
    "t2i-flow": ("diffalign.toy.t2i_flow", "toy-t2i-flow"),
}
# toy name → the toys whose built models it reads (from the same assets folder).
REUSES = {"t2i-flow": ("t2i",)}


def build_toy(name: str, assets_dir: Path, seed: int, threads: int | None = None) -> None:
    """Build one toy into ``assets_dir/<folder>``, on ``threads`` torch threads (default: torch's)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # again in a worker process
    module_name, folder = TOYS[name]
    # Imported here: each toy pulls in its own heavy dependencies (and diffalign.files pulls in torch).
    module = importlib.import_module(module_name)
    from diffalign.files import folder_written_whole
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    output_dir = assets_dir / folder
    print(f"[{name}] building into {output_dir} (seed {seed})", flush=True)
    start = time.perf_counter()
    # Built beside the toy and swapped in at the end: a failed or interrupted rebuild leaves the earlier toy whole.
    with folder_written_whole(output_dir) as staging:
        module.build(staging, seed)
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    print(f"[{name}] done in {int(minutes)}m{seconds:04.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffalign.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="rebuild toy models from scratch")
    build.add_argument("toy", choices=["all", *TOYS], help="which toy to build")
    build.add_argument("--assets-dir", type=Path, default=ASSETS_DIR, help="parent folder of the toy folders")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="toys built at once, one process each (default: cores)"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(TOYS) if args.toy == "all" else [args.toy]
    start = time.perf_counter()
    if args.jobs > 1 and len(names) > 1:
        # fork: workers inherit this process's view of the toys (and run no torch code before forking).
        with ProcessPoolExecutor(min(args.jobs, len(names)), mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {}
            for name in names:
                for reused in REUSES.get(name, ()):
                    if reused in futures:
                        futures[reused].result()  # built before the toy that reads it
                futures[name] = pool.submit(build_toy, name, args.assets_dir, args.seed, 1)
            for future in futures.values():
                future.result()  # re-raises a worker's error
    else:
        for name in names:
            build_toy(name, args.assets_dir, args.seed)
    if len(names) > 1:
        print(f"built {', '.join(names)} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
