"""The ``diffalign`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from diffalign.config import CONFIG_KINDS, ConfigError, LoadError, entry_point, kinds_for, load_config
from diffalign.demo import DEFAULT_DEMO, DEMO_CONFIGS

DESCRIPTION = (
    "diffalign: align diffusion models and LLMs with human preferences on one shared loss core. "
    "Start with `diffalign demo`; `diffalign COMMAND --help` describes each command."
)


def command_train(args: argparse.Namespace) -> int:
    from diffalign.training.signals import TrainingInterrupted

    config = load_config(args.config, args.overrides, command="train")
    try:
        metrics = entry_point(config.kind)(config)
    except TrainingInterrupted as stop:  # a scheduler's SIGTERM/SIGUSR1: checkpointed, exit as the signal would
        print(stop, file=sys.stderr)
        return 128 + stop.signal_number
    print_metrics(metrics)
    return 0


def command_cache(args: argparse.Namespace) -> int:
    from diffalign.diffusion.trainer import build_cache

    config = load_config(args.config, args.overrides, command="train")
    if config.kind != "diffusion":
        raise ConfigError(
            f"{args.config}: kind: {config.kind}; `diffalign cache` builds the latent cache of a kind: diffusion "
            "config (LLM data is tokenized and cached by `diffalign train`)"
        )
    stats = build_cache(config)
    print(f"latent cache {config.data.cache_dir}: " + ", ".join(f"{key} {value}" for key, value in stats.items()))
    return 0


def command_losses(args: argparse.Namespace) -> int:
    from diffalign.losses import list_losses

    entries = list_losses()
    width = max(len(name) for name, _ in entries)
    for name, description in entries:
        print(f"{name:<{width}}  {description}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from diffalign.demo import run_demo

    metrics = run_demo(args.output_dir, args.overrides, args.method)
    print_metrics(metrics)
    return 0


def command_eval(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides, command="eval")
    report = entry_point(config.kind)(config)
    if "reward" in report:  # an LLM report: one reward
        entry = report["reward"]
        print(
            f"{entry['name']}: base {entry['base']['value']:.4g}  aligned {entry['aligned']['value']:.4g}  "
            f"win rate {entry['win_rate']['value']:.1%}"
        )
    for key, entry in report.get("scorers", {}).items():
        if entry["set_level"]:
            print(f"{key:>20}: base {entry['base']['value']:.4g}  aligned {entry['aligned']['value']:.4g}")
        else:
            print(
                f"{key:>20}: base {entry['base']['value']:.4g}  aligned {entry['aligned']['value']:.4g}  "
                f"win rate {entry['win_rate']['value']:.1%}"
            )
    print(f"report: {config.report.output_dir}/report.md")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from diffalign.export import export_checkpoint

    folder = export_checkpoint(
        Path(args.checkpoint), Path(args.output_dir), raw_weights=args.raw_weights, hub_repo_id=args.push_to_hub,
        hub_private=not args.public,
    )
    print(f"model written to {folder}")
    return 0


def command_relabel(args: argparse.Namespace) -> int:
    from diffalign.eval.relabel import load_relabel_config, relabel

    arguments = list(args.arguments)
    config_path = arguments.pop(0) if arguments and "=" not in arguments[0] else None
    summary = relabel(load_relabel_config(config_path, arguments))
    print(json.dumps(summary, indent=2))
    return 0


def command_prompts(args: argparse.Namespace) -> int:
    from diffalign.config import from_dict
    from diffalign.eval.prompts import PromptSetConfig, write_prompt_split

    config = from_dict(PromptSetConfig, {"source": args.source, "column": args.column, "skip_empty": True})
    counts = write_prompt_split(config, args.output_dir, heldout=args.heldout, seed=args.seed)
    print(f"{args.output_dir}/train.txt: {counts['train']} prompts, {args.output_dir}/heldout.txt: {counts['heldout']}")
    return 0


def print_metrics(metrics: dict[str, float]) -> None:
    for name in sorted(metrics):
        print(f"{name:>28}: {metrics[name]:.4f}")


def train_description() -> str:
    kinds = "; ".join(f"kind: {kind} runs {CONFIG_KINDS[kind].description}" for kind in kinds_for("train"))
    return (
        "Train from a YAML config in configs/. The config's top-level `kind:` picks the trainer: "
        f"{kinds}. Any key can be overridden as section.key=value, e.g. `diffalign train configs/toy_dpo.yaml "
        "optim.lr=1e-5 loss.beta=2500`. The config is validated before any model loads; the resolved config is "
        "saved as <run.output_dir>/config.yaml."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add_command in (
        _add_train, _add_cache, _add_losses, _add_demo, _add_eval, _add_export, _add_relabel, _add_prompts
    ):
        add_command(commands)
    return parser


def _add_config_arguments(command: argparse.ArgumentParser, config_help: str) -> None:
    command.add_argument("config", help=config_help)
    command.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train from a YAML config", description=train_description())
    _add_config_arguments(train, "path to a YAML config")
    train.set_defaults(handler=command_train)


def _add_cache(commands: argparse._SubParsersAction) -> None:
    cache = commands.add_parser(
        "cache",
        help="build the latent cache of a diffusion config",
        description="Encode every image and caption of a diffusion config's pairs into data.cache_dir (VAE latents "
        "and prompt embeddings), completing a cache a killed build left; `diffalign train` then reads it. Under "
        "`accelerate launch --num_processes N diffalign cache CONFIG` the N processes share the images by content "
        "key. Example: `diffalign cache configs/toy_dpo.yaml data.cache_dir=outputs/cache`.",
    )
    _add_config_arguments(cache, "path to a YAML config with kind: diffusion")
    cache.set_defaults(handler=command_cache)


def _add_losses(commands: argparse._SubParsersAction) -> None:
    losses = commands.add_parser("losses", help="list the preference losses", description="List every loss of "
                                 "the core by its config name (loss.type) with a one-line description.")
    losses.set_defaults(handler=command_losses)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="align a shipped toy text-to-image model on the CPU and show what changed",
        description="Run a shipped toy job on the CPU in a few minutes (default: Flow-GRPO (LoRA) on the "
        "SD3-architecture toy, configs/toy_flow_grpo.yaml; --method dpo: Diffusion-DPO (LoRA) on the U-Net toy, "
        "configs/toy_dpo.yaml), then sample base and aligned models on held-out prompts with the same seeds, print "
        "the win rate under the toy reward and write a labelled before/after image grid (prompts, rewards).",
    )
    demo.add_argument("--method", choices=sorted(DEMO_CONFIGS), default=DEFAULT_DEMO, help="which toy job to run")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the run, grid and LoRA are written")
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides of the job's config")
    demo.set_defaults(handler=command_demo)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser(
        "eval",
        help="compare an aligned model with its base and write a report",
        description="Sample the base and the aligned model (a LoRA, a denoiser, a training output directory or a "
        "checkpoint) on the same prompts with the same seeds, score both with the configured scorers and write a "
        "report folder: report.json (means with confidence intervals, win rates, per-prompt scores), report.md, a "
        "labelled grid of sample pairs (spectrograms and WAV clips for audio) and a plot. An LLM config (kind: "
        "llm_eval) compares completions under a reward and shows them side by side. Example: `diffalign eval "
        "configs/eval_toy.yaml model.aligned=outputs/demo report.output_dir=outputs/demo-eval`.",
    )
    _add_config_arguments(evaluation, "path to a YAML config with kind: eval (diffusion) or kind: llm_eval")
    evaluation.set_defaults(handler=command_eval)


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="turn a training checkpoint into a model folder like final/",
        description="Write the model of a training checkpoint (<run.output_dir>/checkpoints/step-N, diffusion LoRA "
        "or full, or LLM) into OUTPUT_DIR in the formats of final/: a diffusers LoRA file or pipeline folder, or a "
        "transformers model or adapter, with config.yaml (absolute paths, provenance) and a model card README.md. "
        "The run's config comes from the checkpoint; a run with run.ema exports the averaged weights.",
    )
    export.add_argument("checkpoint", help="a checkpoints/step-N folder")
    export.add_argument("output_dir", help="a new or empty folder")
    export.add_argument("--raw-weights", action="store_true", help="the trained weights, not their EMA (run.ema)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repository")
    export.add_argument("--public", action="store_true", help="a repository the push creates is public")
    export.set_defaults(handler=command_export)


def _add_relabel(commands: argparse._SubParsersAction) -> None:
    relabel = commands.add_parser(
        "relabel",
        help="relabel a pair dataset with a scorer (AI feedback)",
        description="Score both members of every pair of a parquet pair dataset (Pick-a-Pic or audio-alpaca "
        "schema) and write a parquet file with new labels in the same schema, plus <output>.summary.json "
        "(label counts, ties, agreement with the old labels). Give a YAML config, key=value settings, or both: "
        "`diffalign relabel source=pairs.parquet output=relabelled.parquet scorer.name=pickscore tie_margin=0.1`.",
    )
    relabel.add_argument(
        "arguments", nargs="*", metavar="[config.yaml] key=value", help="a config and/or settings"
    )
    relabel.set_defaults(handler=command_relabel)


def _add_prompts(commands: argparse._SubParsersAction) -> None:
    prompts = commands.add_parser(
        "prompts",
        help="write train/held-out prompt files from a caption source",
        description="Write OUTPUT_DIR/train.txt and OUTPUT_DIR/heldout.txt, one prompt per line (what "
        "method.*.prompts_file and eval.prompts_file read), from a prompt preset (musiccaps, partiprompts, ...) or a "
        "local .txt/.csv/.tsv/.json/.jsonl/.parquet file: duplicates dropped, a seeded shuffle, --heldout prompts "
        "held out. Example: `diffalign prompts musiccaps data/musiccaps --heldout 500`.",
    )
    prompts.add_argument("source", help="a prompt preset name or a local prompt file")
    prompts.add_argument("output_dir", help="where train.txt and heldout.txt are written")
    prompts.add_argument("--column", default="prompt", help="the prompt column of a table file (presets know theirs)")
    prompts.add_argument("--heldout", type=int, default=64, help="prompts held out for evaluation (default 64)")
    prompts.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    prompts.set_defaults(handler=command_prompts)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except ConfigError as error:  # a LoadError too: bad input, reported in one line
        label = "load error" if isinstance(error, LoadError) else "config error"
        print(f"{label}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
