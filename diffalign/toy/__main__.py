"""Rebuild the shipped toy models: ``python -m diffalign.toy build all|t2i|llm|music``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"

# toy name → (module with a ``build(output_dir, seed)`` function, folder under assets/)
TOYS = {
    "t2i": ("diffalign.toy.t2i", "toy-t2i"),
    "llm": ("diffalign.toy.llm", "toy-llm"),
    "music": ("diffalign.toy.music", "toy-t2m"),
}


def build_toy(name: str, assets_dir: Path, seed: int) -> bool:
    """Build one toy into ``assets_dir/<folder>``; False (with a message) if its module does not exist yet."""
    module_name, folder = TOYS[name]
    try:
        # Imported lazily: each toy pulls in its own heavy dependencies and may not be written yet.
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"[{name}] skipped: {module_name} does not exist yet, so there is nothing to build", flush=True)
        return False
    output_dir = assets_dir / folder
    print(f"[{name}] building into {output_dir} (seed {seed})", flush=True)
    start = time.perf_counter()
    module.build(output_dir, seed)
    minutes, seconds = divmod(time.perf_counter() - start, 60)
    print(f"[{name}] done in {int(minutes)}m{seconds:04.1f}s", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffalign.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="rebuild toy models from scratch")
    build.add_argument("toy", choices=["all", *TOYS], help="which toy to build")
    build.add_argument("--assets-dir", type=Path, default=ASSETS_DIR, help="parent folder of the toy folders")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(TOYS) if args.toy == "all" else [args.toy]
    start = time.perf_counter()
    built = [name for name in names if build_toy(name, args.assets_dir, args.seed)]
    if len(names) > 1:
        print(f"built {', '.join(built) or 'nothing'} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0 if len(built) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
