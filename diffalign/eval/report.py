"""The evaluation report folder: ``report.json``, ``report.md``, the sample-pair grid (or clips and
spectrograms for audio), a plot of the scores, and every sample under ``samples/{base,aligned}/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from diffalign.diffusion.sampling import save_samples as save_sample_grid
from diffalign.eval.generation import Samples
from diffalign.eval.media import write_png, write_wav
from diffalign.eval.statistics import ScorerResult, format_interval
from diffalign.files import write_text_whole
from diffalign.rewards import Audio

BASE_COLOUR, ALIGNED_COLOUR = "#8c8c8c", "#1f77b4"


def write_report(
    output_dir: Path,
    *,
    header: dict[str, Any],
    prompts: list[str],
    seeds: list[int],
    results: list[ScorerResult],
    base_samples: Samples,
    aligned_samples: Samples,
    confidence: float,
    grid_prompts: int,
    save_samples: bool,
) -> dict[str, Any]:
    """Write every file of the report and return what ``report.json`` holds."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = write_sample_views(
        output_dir, base_samples, aligned_samples, prompts[:grid_prompts], results, save_samples
    )
    files["plot"] = "plot.png"
    report = {
        **header,
        "confidence": confidence,
        "scorers": {
            result.key: {
                "name": result.name,
                "higher_is_better": result.higher_is_better,
                "set_level": result.set_level,
                **result.summary(confidence),
            }
            for result in results
        },
        "samples": [
            {
                "index": index,
                "prompt": prompt,
                "seed": seed,
                "scores": {
                    result.key: {"base": result.base[index].item(), "aligned": result.aligned[index].item()}
                    for result in results
                    if not result.set_level
                },
            }
            for index, (prompt, seed) in enumerate(zip(prompts, seeds))
        ],
        "files": files,
    }
    write_text_whole(output_dir / "report.json", json.dumps(report, indent=2))
    plot_scores(report, output_dir / "plot.png")
    write_text_whole(output_dir / "report.md", markdown(report))
    return report


def write_sample_views(
    output_dir: Path,
    base: Samples,
    aligned: Samples,
    grid_prompts: list[str],
    results: list[ScorerResult],
    save_samples: bool,
) -> dict[str, str]:
    """The labelled grid of the first samples (one per prompt of ``grid_prompts``, scored by the first per-sample
    scorer) and, optionally, every sample as a file."""
    audio = isinstance(base, Audio)
    if save_samples:
        for role, samples in (("base", base), ("aligned", aligned)):
            for index in range(len(samples)):
                path = output_dir / "samples" / role / f"{index:05d}"
                if audio:
                    write_wav(path.with_suffix(".wav"), samples.waveforms[index], samples.sample_rate)
                else:
                    write_png(path.with_suffix(".png"), samples[index].float() / 255)
    files = {"samples": "samples/"} if save_samples else {}
    count = min(len(grid_prompts), len(base))
    if audio:
        rows = {"base": base[:count], "aligned": aligned[:count]}
    else:
        rows = {"base": base[:count].float() / 255, "aligned": aligned[:count].float() / 255}
    scored = next((result for result in results if not result.set_level), None)
    scores = None if scored is None else {"base": scored.base[:count], "aligned": scored.aligned[:count]}
    # Audio: spectrograms in grid.png, the clips beside it in grid/.
    save_sample_grid(
        rows, output_dir / "grid.png", grid_prompts[:count], scores, scored.key if scored else "score",
        higher_is_better=scored.higher_is_better if scored else True,
    )
    return {**files, "grid": "grid.png", **({"clips": "grid/"} if audio else {})}


def plot_scores(report: dict[str, Any], path: Path) -> None:
    """One panel per scorer (base and aligned means with their intervals) and one of the win rates."""
    scorers = report["scorers"]
    paired = {key: entry for key, entry in scorers.items() if not entry["set_level"]}
    panels = len(scorers) + (1 if paired else 0)
    figure = Figure(figsize=(2.6 * panels, 3.2), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for axis, (key, entry) in zip(axes, scorers.items()):
        for position, (role, colour) in enumerate((("base", BASE_COLOUR), ("aligned", ALIGNED_COLOUR))):
            estimate = entry[role]
            error = None
            if estimate.get("low") is not None:
                error = [[estimate["value"] - estimate["low"]], [estimate["high"] - estimate["value"]]]
            axis.errorbar([position], [estimate["value"]], yerr=error, fmt="o", capsize=5, color=colour)
        axis.set_xticks([0, 1], ["base", "aligned"])
        axis.set_xlim(-0.6, 1.6)
        direction = "higher" if entry["higher_is_better"] else "lower"
        axis.set_title(f"{key}\n({direction} is better)", fontsize=9)
    if paired:
        axis = axes[-1]
        keys = list(paired)
        rates = [paired[key]["win_rate"]["value"] for key in keys]
        errors = np.array(
            [
                [rate - paired[key]["win_rate"]["low"], paired[key]["win_rate"]["high"] - rate]
                for key, rate in zip(keys, rates)
            ]
        ).T
        axis.barh(keys, rates, xerr=errors, capsize=4, color=ALIGNED_COLOUR)
        axis.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
        axis.set_xlim(0, 1)
        axis.set_title("win rate of aligned", fontsize=9)
    figure.savefig(path, dpi=100)


def markdown(report: dict[str, Any]) -> str:
    """A readable page: the settings, one table row per scorer, the sample grid and the plot."""
    percent = round(100 * report["confidence"])
    lines = [
        "# Evaluation: aligned vs base",
        "",
        f"- base model: `{report['base_model']}`",
        f"- aligned model: `{report['aligned_model']}` ({report['aligned_kind']})",
        f"- prompts: `{report['prompts']['source']}`: {report['prompts']['count']} prompts × "
        f"{report['generation']['samples_per_prompt']} samples, seeds {report['seeds']}",
        f"- sampling: {report['generation']['num_inference_steps']} steps, guidance "
        f"{report['generation']['guidance_scale']}",
        "",
        f"Means ± {percent}% confidence interval (Student t), the paired difference aligned − base with its interval, "
        f"and the win rate of aligned over base on the same prompt and seed (ties count one half; Wilson interval).",
        "",
        "| scorer | better | base | aligned | aligned − base | win rate of aligned (W/T/L) |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in report["scorers"].items():
        direction = "higher" if entry["higher_is_better"] else "lower"
        if entry["set_level"]:
            base, aligned = entry["base"]["value"], entry["aligned"]["value"]
            lines.append(
                f"| {key} | {direction} | {base:.4g} | {aligned:.4g} | {aligned - base:+.4g} | set-level |"
            )
            continue
        win = entry["win_rate"]
        lines.append(
            f"| {key} | {direction} | {format_interval(entry['base'])} | {format_interval(entry['aligned'])} | "
            f"{format_interval(entry['difference'], signed=True)} | {win['value']:.1%} [{win['low']:.1%}, {win['high']:.1%}] "
            f"({win['wins']}/{win['ties']}/{win['losses']}) |"
        )
    grid = report["files"]["grid"]
    caption = "samples: base (top) / aligned (bottom), prompts below, scores under each sample"
    if "clips" in report["files"]:
        caption = (
            "spectrograms: base (top) / aligned (bottom), prompts below, scores under each; clips in "
            f"{report['files']['clips']}"
        )
    lines += ["", f"![{caption}]({grid})", "", "![scores](plot.png)", ""]
    return "\n".join(lines)
