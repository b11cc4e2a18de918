"""``diffalign eval``: sample a base and an aligned model on the same prompts and seeds, score both, report."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffalign.config import to_dict
from diffalign.diffusion.families import load_family
from diffalign.eval.config import EvalConfig
from diffalign.eval.generation import Samples, load_aligned_denoiser, locate_aligned, sample_model
from diffalign.eval.prompts import load_prompt_set
from diffalign.eval.report import write_report
from diffalign.eval.scoring import build_with_reference, score_samples
from diffalign.eval.statistics import ScorerResult
from diffalign.hub import check_source, loading
from diffalign.rewards.registry import parse_dtype

logger = logging.getLogger(__name__)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the evaluation of ``config`` and write its report folder; returns what ``report.json`` holds."""
    prompts = load_prompt_set(config.prompts)
    settings = config.generation
    # Sample i of the expanded list uses seed + i, so repeated prompts get distinct seeds (as in training evals).
    sample_prompts = prompts * settings.samples_per_prompt
    seeds = [settings.seed + index for index in range(len(sample_prompts))]
    device = (
        settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )

    base_samples, aligned_samples, models = sample_both_models(config, sample_prompts, device)
    # The scorers may need the accelerator memory the pipeline held.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    results = []
    for index, spec in enumerate(config.scorers):
        scorer, reference = build_with_reference(spec, device, where=f"scorers[{index}]")
        logger.info("scoring with %s", spec.key)
        base_scores, aligned_scores = (
            score_samples(scorer, samples, sample_prompts, reference, spec.batch_size)
            for samples in (base_samples, aligned_samples)
        )
        results.append(
            ScorerResult(
                spec.key, spec.name, scorer.higher_is_better, scorer.set_level, base_scores, aligned_scores
            )
        )

    header = {
        **models,
        "prompts": {"source": config.prompts.source, "count": len(prompts)},
        "seeds": f"{seeds[0]}–{seeds[-1]}",
        "generation": to_dict(settings),
        "config": to_dict(config),
    }
    report = write_report(
        Path(config.report.output_dir),
        header=header,
        prompts=sample_prompts,
        seeds=seeds,
        results=results,
        base_samples=base_samples,
        aligned_samples=aligned_samples,
        confidence=config.report.confidence,
        grid_prompts=config.report.grid_prompts,
        save_samples=config.report.save_samples,
    )
    logger.info("report written to %s", Path(config.report.output_dir) / "report.md")
    return report


def sample_both_models(
    config: EvalConfig, prompts: list[str], device: str
) -> tuple[Samples, Samples, dict[str, str]]:
    """Samples of the base and the aligned model (same prompts, same seeds) and what the two models were."""
    aligned_source = locate_aligned(config.model.aligned)
    run_pretrained, run_vae = aligned_source.base_model()
    base_path = config.model.base or run_pretrained
    if not base_path:
        raise ValueError(
            f"model.base is empty and {aligned_source.directory} has no config.yaml naming model.pretrained; set "
            "model.base to the pipeline the aligned weights were trained from"
        )
    vae_path = config.model.vae or run_vae
    if vae_path:
        check_source("model.vae", vae_path)
    with loading("model.base", base_path, "diffusers pipeline"):
        family = load_family(base_path, vae_path, options=aligned_source.family_options())
    settings = config.generation
    dtype = parse_dtype(settings.dtype)
    for module in [*family.frozen_modules().values(), family.denoiser]:
        module.requires_grad_(False).eval()
    # SDXL's stock VAE overflows in half precision; the family says when it must stay in fp32.
    vae_dtype = torch.float32 if family.vae_needs_fp32 else dtype
    family.to(torch.device(device), dtype, vae_dtype=vae_dtype)
    family.denoiser.to(dtype=dtype)

    def sample(denoiser: nn.Module) -> Samples:
        return sample_model(
            family,
            denoiser,
            prompts,
            seed=settings.seed,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            batch_size=settings.batch_size,
        )

    logger.info("sampling the base model %s on %d prompts", base_path, len(prompts))
    base_samples = sample(family.denoiser)
    aligned_denoiser, aligned_kind = load_aligned_denoiser(family, aligned_source.directory)
    logger.info("sampling the aligned model (%s from %s)", aligned_kind, aligned_source.directory)
    aligned_samples = sample(aligned_denoiser)
    models = {
        "base_model": base_path,
        "aligned_model": str(aligned_source.directory),
        "aligned_kind": aligned_kind,
    }
    return base_samples, aligned_samples, models
