"""The LLM trainer's data step on a first run and on a second one that reads the tokenisation cache.

Writes ``--rows`` conversational preference rows (JSONL, the toy LLM's prompts with varied answers), then runs
``diffalign.llm.data.load_preference_items`` (read through ``datasets``, check, tokenize with the chat template,
truncate) twice, each in a fresh process with the toy tokenizer: the first with empty ``datasets`` and
tokenisation caches, the second with the caches the first left. Timed: the data step alone (the imports and
the tokenizer's loading are not). The bar: the second run ≥ 5× faster than the first.

    python benchmarks/llm_data.py                       # 20k rows
    python benchmarks/llm_data.py --rows 100000 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "toy-llm"
WORDS = ["red", "blue", "green", "white", "circle", "square", "star", "line", "big", "small", "two", "three"]


def write_rows(path: Path, count: int) -> None:
    rng = random.Random(0)
    prompts = [json.loads(line)["prompt"] for line in (TOKENIZER / "data" / "prompts_train.jsonl").open()]
    with path.open("w") as rows:
        for number in range(count):
            prompt = prompts[number % len(prompts)]
            chosen, rejected = (
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(2)
            )
            rows.write(
                json.dumps(
                    {
                        "prompt": prompt
                        if isinstance(prompt, list)
                        else [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": f"{chosen} {number}"}],
                        "rejected": [{"role": "assistant", "content": f"{rejected} {number}."}],
                    }
                )
                + "\n"
            )


def worker(data: Path, cache_dir: Path, num_proc: int | None) -> None:
    import datasets  # noqa: F401 (imported before the timer: a cost of the process, not of the data)
    from transformers import AutoTokenizer

    from diffalign.llm.config import LLMDataConfig
    from diffalign.llm.data import load_preference_items
    from diffalign.progress import configure_progress

    configure_progress(False)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LLMDataConfig(
        path=str(data), cache_dir=str(cache_dir), num_proc=num_proc, max_length=256, max_prompt_length=128
    )
    started = time.perf_counter()
    items, stats = load_preference_items(config, tokenizer)
    first, last = items[0], items[len(items) - 1]  # the items are read, not only indexed
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {"seconds": seconds, "rows": stats.used, "tokens": len(first.chosen_ids) + len(last.chosen_ids)}
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (tokenizing processes)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.num_proc)
        return
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_rows(work / "rows.jsonl", args.rows)
        environment = {**os.environ, "HF_DATASETS_CACHE": str(work / "datasets"), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, __file__, "--worker", str(work / "rows.jsonl"), str(work / "tokenized")]
        if args.num_proc:
            command += ["--num-proc", str(args.num_proc)]
        runs = []
        for _ in range(2):
            output = subprocess.run(
                command, capture_output=True, text=True, env=environment, check=True
            ).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
    print(f"{args.rows:,} conversational rows, data.num_proc={args.num_proc}")
    print("| run | caches | data step s | rows/s |")
    print("|---|---|---|---|")
    for name, caches, run in zip(("first", "second"), ("empty", "from the first run"), runs):
        print(f"| {name} | {caches} | {run['seconds']:.2f} | {run['rows'] / run['seconds']:,.0f} |")
    print(f"second run {runs[0]['seconds'] / runs[1]['seconds']:.1f}× faster")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2)
        )


if __name__ == "__main__":
    main()
