"""The diffusion preference trainer: a recipe for the shared loop.

It builds the models (diffusion/models.py), the method (diffusion/methods/), the training data (the method's own,
or the ``data:`` pairs through the latent cache) and the evaluation (diffusion/evaluation.py). Each step turns a
batch into latents (from the cache, or encoded by the family), lets the method produce the core's scores and the
core produce the loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from diffalign.config import ConfigError
from diffalign.diffusion.config import DiffusionTrainConfig, check_family_support
from diffalign.diffusion.evaluation import SampleEvaluation
from diffalign.diffusion.export import denoiser_card_facts, save_denoiser
from diffalign.diffusion.families import family_class, load_family
from diffalign.diffusion.methods import METHODS, LatentPairBatch, TrainingContext, TrainingData
from diffalign.diffusion.methods.base import DiffusionMethod
from diffalign.diffusion.models import build_models
from diffalign.diffusion.reference_cache import FixedDraws, ReferenceErrors, load_or_build_reference_errors
from diffalign.diffusion.training_data import build_pair_dataset
from diffalign.hub import loading, under_key
from diffalign.model_card import CardFacts
from diffalign.preflight import preflight_diffusion
from diffalign.training import Recipe, StepOutput, make_accelerator, run_training
from diffalign.training.engines import shards_parameters, uses_deepspeed
from diffalign.training.loop import backward_part
from diffalign.training.loss_state import MarginBaseline
from diffalign.training.precision import mixed_precision_dtype
from diffalign.training.reference_sync import ReferenceSync
from diffalign.training.trackers import LoggedSamples

logger = logging.getLogger("diffalign")


class DiffusionRecipe(Recipe):
    def __init__(self, config: DiffusionTrainConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.output_dir = Path(config.run.output_dir)
        self.family, self.base_model, synced_reference = build_models(config, accelerator)
        self.model = self.family.denoiser
        method_class = METHODS[config.method.name]
        reference = self.base_model if config.uses_reference else None
        self.reference_sync = None
        if synced_reference is not None and config.uses_reference:
            # TR-DPO: the loss's reference is a frozen copy of its own that moves towards the policy; the base
            # model that evaluation samples stays the initial one.
            if shards_parameters(accelerator):
                raise ValueError(
                    "model.reference_sync_steps (TR-DPO) is not supported under FSDP or ZeRO-3, where the policy's "
                    "parameters are sharded; use DDP or ZeRO-2, or set model.reference_sync_steps: null"
                )
            reference = synced_reference
            self.reference_sync = ReferenceSync(
                synced_reference.copy,
                every=config.model.reference_sync_steps,
                alpha=config.model.reference_mixup_alpha,
                accumulation_steps=config.run.gradient_accumulation_steps,
            )
        with under_key(f"method.{config.method.name}"):  # online methods build their rewards here
            self.method = method_class(self.family, reference, config.method.settings())
        # The loop keeps the model that maximises this evaluation metric (early stopping), if the method has one.
        self.selection_metric = method_class.selection_metric

        self.decoder = self.family.media_decoder(config.data)
        data = self.method.training_data(config, accelerator) or TrainingData(
            *build_pair_dataset(
                config.data,
                family=self.family,
                seed=config.run.seed,
                accelerator=accelerator,
                decoder=self.decoder,
            )
        )
        self.train_dataset, self.collate, self.data_stats = data.dataset, data.collate, data.stats
        logger.info("training data: %s", self.data_stats)
        # The reference cache (config-checked) freezes each pair's draws to those of its first visit, for which its
        # reference errors are computed once: a change of the estimator, see reference_cache.py.
        self.fixed_draws = config.model.reference_cache is not None
        self.reference_errors: ReferenceErrors | None = None
        if self.fixed_draws:
            self.train_dataset = FixedDraws(self.train_dataset)
            self.reference_errors = self._reference_errors()
        self.sample_evaluation = SampleEvaluation(config.eval, self.family, self.base_model, self.output_dir)
        self.micro_batches = 0  # seen by training_step, so online methods know the optimizer step
        self.margin_baseline = MarginBaseline() if "beta_dpo" in config.loss.type else None

    def _reference_errors(self) -> ReferenceErrors:
        config = self.config
        ignored = {"source", "cache_dir", "vae_encode_batch_size"}  # paths and batching: not the content
        data_settings = {k: v for k, v in vars(config.data).items() if k not in ignored}
        errors = load_or_build_reference_errors(
            config.model.reference_cache,
            method=self.method,
            dataset=self.train_dataset,
            collate=self.collate,
            latent_batch=self.latent_batch,
            batch_size=config.run.batch_size,
            settings={
                "seed": config.run.seed,
                "data": data_settings,
                "timesteps": dataclasses.asdict(config.timesteps),
                "precision": self.accelerator.mixed_precision,
            },
            accelerator=self.accelerator,
        )
        self.data_stats.update(
            reference_cache_pairs=errors.num_pairs, reference_cache_built=int(errors.built)
        )
        # Training never calls the reference again; only base-model samples for evaluation do.
        self.base_model.offload()
        return errors

    # --- training -----------------------------------------------------------------------------------------------
    def noise_seeds(self, batch: dict[str, Any]) -> list[int]:
        # Every random draw of a pair is a function of (run seed, sample id): see training/sampler.py. With fixed
        # draws (the reference cache) every visit of a pair reuses its first visit's id, sample id mod N.
        if self.fixed_draws:
            size = len(self.train_dataset)
            sample_ids = [i % size for i in batch["sample_ids"]]
        else:
            sample_ids = batch["sample_ids"]
        return [self.config.run.seed * 2**32 + sample_id for sample_id in sample_ids]

    def latent_batch(self, batch: dict[str, Any]) -> LatentPairBatch:
        """Latents and prompt embeddings for a batch: read from the cache, or encoded now."""
        family = self.family
        noise_seeds = self.noise_seeds(batch)
        if "chosen_latents" in batch:
            chosen, rejected, prompt_embeds = (
                batch["chosen_latents"],
                batch["rejected_latents"],
                batch["prompt_embeds"],
            )
        else:
            with torch.no_grad():
                media = self.decoder.name
                both = torch.cat([batch[f"chosen_{media}"], batch[f"rejected_{media}"]])
                # Posterior samples draw from their own streams (odd seeds), apart from the diffusion noise.
                posterior_seeds = [2 * seed + 1 for seed in noise_seeds] + [
                    2 * seed + 2 for seed in noise_seeds
                ]
                chosen, rejected = family.to_latents(family.encode(both).sample(posterior_seeds)).chunk(2)
                prompt_embeds = family.encode_prompts(batch["caption"])
        # Per-sample conditioning of the decoded media (SDXL sizes, audio spans), laid out like the latents:
        # [chosen; rejected].
        media_keys = {f"chosen_{self.decoder.name}", "chosen_latents"}
        extras = {
            key.removeprefix("chosen_"): torch.cat(
                [batch[key], batch["rejected_" + key.removeprefix("chosen_")]]
            )
            for key in batch
            if key.startswith("chosen_") and key not in media_keys
        }
        label = batch["label"] if not self.config.data.drop_ties else None
        dtype = mixed_precision_dtype(self.accelerator.mixed_precision)
        return LatentPairBatch(
            chosen_latents=chosen.to(dtype),
            rejected_latents=rejected.to(dtype),
            prompt_embeds={name: value.to(dtype) for name, value in prompt_embeds.items()},
            label=label,
            extras=extras,
            noise_seeds=noise_seeds,
        )

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        if self.reference_sync is not None:
            self.reference_sync.before_micro_batch(self.micro_batches, model)
        context = TrainingContext(
            step=self.micro_batches // self.config.run.gradient_accumulation_steps,
            seed=self.config.run.seed,
            noise_seeds=self.noise_seeds(batch),
            encode=self.latent_batch,
            loss=self.config.loss,
            reference_errors=None if self.reference_errors is None else self.reference_errors.lookup(batch["index"]),
            margin_baseline=self.margin_baseline,
            backward=None if uses_deepspeed(self.accelerator) else functools.partial(backward_part, self.accelerator),
        )
        self.micro_batches += 1
        return self.method.training_loss(model, batch, context)

    # --- evaluation, resumption, export -------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self.accelerator.is_main_process:
            return {}
        return {**self.method.evaluate(model, step), **self.sample_evaluation(model, step)}

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"micro_batches": self.micro_batches, "method": self.method.extra_state()}
        if self.reference_sync is not None:  # the moved reference, not the initial model
            state["reference"] = self.reference_sync.state_dict()
        if self.margin_baseline is not None:
            state["margin_baseline"] = self.margin_baseline.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.micro_batches = state.get("micro_batches", 0)
        self.method.load_extra_state(state.get("method", {}))
        if self.reference_sync is not None and "reference" in state:
            self.reference_sync.load_state_dict(state["reference"])
        if self.margin_baseline is not None and "margin_baseline" in state:
            self.margin_baseline.load_state_dict(state["margin_baseline"])

    def logged_samples(self) -> LoggedSamples | None:
        return self.sample_evaluation.logged

    def card_facts(self) -> CardFacts:
        return denoiser_card_facts(self.family, self.config.model.trainable)

    def save_final(self, model: nn.Module, output_dir: Path) -> None:
        save_denoiser(model, self.family, self.config.model, output_dir)


def train(config: DiffusionTrainConfig) -> dict[str, float]:
    preflight_diffusion(config)
    # A hub model's family is known once its model_index.json is read; a local one was checked with the config.
    with loading("model.pretrained", config.model.pretrained, "diffusers pipeline"):
        family = family_class(config.model.pretrained)
    check_family_support(config, family)
    accelerator = make_accelerator(config.run)
    # Distinct noise per process; the data order is seeded separately (ResumableBatchSampler).
    set_seed(config.run.seed + accelerator.process_index)
    recipe = DiffusionRecipe(config, accelerator)
    return run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)


def build_cache(config: DiffusionTrainConfig) -> dict[str, int]:
    """Build (or complete) the latent cache of ``config``'s pairs in ``data.cache_dir`` and return its counts;
    under ``accelerate launch`` every process encodes its share. Only the VAE and text encoders run."""
    if config.data.cache_dir is None:
        raise ConfigError("data.cache_dir is not set; set data.cache_dir=DIR, the folder the latent cache is built in")
    if METHODS[config.method.name].training_data is not DiffusionMethod.training_data:
        raise ConfigError(
            f"method.name={config.method.name!r} trains on its own data (prompts), not on cached pairs; "
            "`diffalign cache` builds the latent cache of the data: pairs"
        )
    preflight_diffusion(config)
    with loading("model.pretrained", config.model.pretrained, "diffusers pipeline"):
        check_family_support(config, family_class(config.model.pretrained))
    accelerator = make_accelerator(config.run)
    model = config.model
    with loading("model.pretrained", model.pretrained, "diffusers pipeline"):
        family = load_family(model.pretrained, model.vae, config.timesteps, model.family_options())
    weight_dtype = mixed_precision_dtype(accelerator.mixed_precision)
    for module in family.frozen_modules().values():
        module.requires_grad_(False).eval()
    family.to(accelerator.device, weight_dtype, vae_dtype=torch.float32 if family.vae_needs_fp32 else weight_dtype)
    decoder = family.media_decoder(config.data)
    _, _, stats = build_pair_dataset(
        config.data, family=family, seed=config.run.seed, accelerator=accelerator, decoder=decoder
    )
    return stats
