"""``diffalign demo``: Diffusion-DPO on the shipped toy text-to-image model, end to end on a CPU."""

from __future__ import annotations

from pathlib import Path

from diffalign.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "toy_dpo.yaml"


def run_demo(output_dir: str, overrides: list[str]) -> dict[str, float]:
    """Train with ``configs/toy_dpo.yaml``, then report the base-vs-aligned win rate and the image grid."""
    from diffalign.diffusion.trainer import train

    # The demo's paths are relative to the repository, wherever the command is run from.
    config = load_config(
        DEMO_CONFIG,
        [
            f"model.pretrained={REPO_ROOT / 'assets' / 'toy-t2i'}",
            f"data.source={REPO_ROOT / 'assets' / 'toy-t2i' / 'data' / 'train.parquet'}",
            f"eval.prompts_file={REPO_ROOT / 'assets' / 'toy-t2i' / 'prompts' / 'heldout.txt'}",
            f"data.cache_dir={Path(output_dir) / 'cache'}",
            f"run.output_dir={output_dir}",
            *overrides,
        ],
    )
    metrics = train(config)
    grids = sorted((Path(config.run.output_dir) / "samples").glob("*.png"))
    print()
    if "eval/win_rate" in metrics:
        prompts = sum(1 for line in Path(config.eval.prompts_file).read_text().splitlines() if line.strip())
        samples = prompts * config.eval.samples_per_prompt
        print(
            f"aligned beats base on {metrics['eval/win_rate']:.0%} of {samples} held-out samples "
            f"({prompts} prompts × {config.eval.samples_per_prompt} seeds) under the toy reward "
            f"(mean reward {metrics['eval/reward_base']:.3f} → {metrics['eval/reward_aligned']:.3f})"
        )
    for name in config.eval.metrics:
        print(f"mean {name}, base → aligned: {metrics[f'eval/{name}_base']:.3f} → {metrics[f'eval/{name}_aligned']:.3f}")
    output = Path(config.run.output_dir)
    if grids:
        print(
            f"grid: {grids[-1]} (base row over aligned row, one held-out prompt per column, each image's toy reward "
            "under it: green where aligned beats base on the same prompt and seed, red where it loses)"
        )
    print(f"LoRA weights (diffusers format) and model card: {output / 'final'}")
    toy = REPO_ROOT / "assets" / "toy-t2i"
    print(
        f"a report with confidence intervals: diffalign eval {REPO_ROOT / 'configs' / 'eval_toy.yaml'} "
        f"model.aligned={output} model.base={toy} prompts.source={toy / 'prompts' / 'heldout.txt'} "
        f"report.output_dir={output / 'eval'}"
    )
    return metrics
