"""The diffusion preference trainer: a recipe for the shared loop.

It loads a pipeline into its model family, makes the denoiser trainable (LoRA or full), sets up the frozen
reference, turns each batch into latents (from the cache or by encoding on the fly), lets the method produce the
core's scores and the core produce the loss. Evaluation samples fixed prompts from the base and the aligned model
with the same seeds, writes a before/after grid (images, or spectrograms plus WAV clips) and, given a reward, the
win rate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig
from torch import nn

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.data import build_pair_dataset
from diffalign.diffusion.export import save_lora
from diffalign.diffusion.families import DiffusionFamily, load_family
from diffalign.diffusion.methods import METHODS, LatentPairBatch, TrainingContext
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.reference_cache import FixedDraws, ReferenceErrors, load_or_build_reference_errors
from diffalign.diffusion.sampling import Samples, generate_samples, save_samples, win_rate
from diffalign.losses import LOSSES
from diffalign.training import StepOutput, make_accelerator, run_training
from diffalign.training.distributed import compute_loss_on_global_batch

logger = logging.getLogger("diffalign")


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen weights: the mixed-precision dtype on GPU, fp32 otherwise."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def make_trainable(denoiser: nn.Module, config: DiffusionTrainConfig) -> None:
    denoiser.requires_grad_(False)
    if config.model.trainable == "full":
        denoiser.requires_grad_(True)
        return
    lora = config.model.lora
    denoiser.add_adapter(
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian" if lora.init == "gaussian" else True,
            target_modules=lora.target_modules,
        )
    )


class DiffusionRecipe:
    def __init__(self, config: DiffusionTrainConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.output_dir = Path(config.run.output_dir)
        device = accelerator.device
        weight_dtype = weight_dtype_for(accelerator)

        self.family: DiffusionFamily = load_family(config.model.pretrained, config.model.vae)
        family = self.family
        for module in family.frozen_modules().values():
            module.requires_grad_(False).eval()
        vae_dtype = torch.float32 if getattr(family, "vae_needs_fp32", False) else weight_dtype
        family.to(device, weight_dtype, vae_dtype=vae_dtype)

        denoiser = family.denoiser
        make_trainable(denoiser, config)
        if config.model.trainable == "lora":
            # Frozen base weights in the low-precision dtype; the LoRA weights stay fp32 masters.
            denoiser.to(device, dtype=weight_dtype)
            for parameter in denoiser.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        if config.run.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if config.model.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        self.model = denoiser

        losses_need_reference = any(LOSSES[name].needs_reference for name in config.loss.type)
        if not config.data.drop_ties and not any(LOSSES[name].uses_label for name in config.loss.type):
            raise ValueError(
                f"data.drop_ties is false, so ties (label 0.5) reach the loss, but loss.type {config.loss.type} "
                "ignores soft labels; keep data.drop_ties: true or use a loss that takes labels (e.g. sigmoid)"
            )
        reference_mode = config.model.reference
        if reference_mode == "auto":
            reference_mode = "adapter_disabled" if config.model.trainable == "lora" else "frozen_copy"
        self.base_model = ReferenceDenoiser(
            denoiser, frozen_copy=reference_mode == "frozen_copy", offload_to_cpu=config.model.offload_reference
        )
        if reference_mode == "frozen_copy" and self.base_model.copy is not None:
            self.base_model.copy.to(dtype=weight_dtype)
        reference = self.base_model if losses_need_reference else None
        if config.model.compile:
            # After the frozen copy is made: a deep copy of a compiled module would call the original's forward.
            # Compiled in place, so parameter names, checkpoints and exported files stay those of the module.
            settings = {"mode": config.model.compile_mode, "backend": config.model.compile_backend}
            denoiser.compile(**settings)
            if self.base_model.copy is not None:
                self.base_model.copy.compile(**settings)
        self.method = METHODS[config.method.name](family, reference, config.method)

        self.decoder = family.media_decoder(config.data)
        # Online methods bring their own training data (prompts, subject images); the others read pairs.
        training_data = getattr(self.method, "training_data", None)
        if training_data is not None:
            self.train_dataset, self.collate, self.data_stats = training_data(config, accelerator)
        else:
            self.train_dataset, self.collate, self.data_stats = build_pair_dataset(
                config.data, family=family, seed=config.run.seed, accelerator=accelerator, decoder=self.decoder
            )
        logger.info("training data: %s", self.data_stats)
        # The reference cache (Diffusion-DPO, config-checked) freezes each pair's draws to those of its first
        # visit, for which its reference errors are computed once: a change of the estimator, see reference_cache.py.
        self.fixed_draws = config.model.reference_cache is not None
        self.reference_errors: ReferenceErrors | None = None
        if self.fixed_draws:
            self.train_dataset = FixedDraws(self.train_dataset)
            self.reference_errors = self._reference_errors()
        self.eval_prompts = self._eval_prompts()
        self._base_eval: tuple[Samples, torch.Tensor | None] | None = None
        self._scorer = None
        # The loop keeps the model that maximises this evaluation metric (early stopping), if the method has one.
        self.selection_metric = getattr(self.method, "selection_metric", None)
        self.micro_batches = 0  # seen by training_step, so online methods know the optimizer step

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
            settings={"seed": config.run.seed, "data": data_settings, "precision": self.accelerator.mixed_precision},
            accelerator=self.accelerator,
        )
        self.data_stats.update(reference_cache_pairs=errors.num_pairs, reference_cache_built=int(errors.built))
        # Training never calls the reference again; only base-model samples for evaluation do.
        self.base_model.offload()
        return errors

    # --- training -----------------------------------------------------------------------------------------------
    def noise_seeds(self, batch: dict[str, Any]) -> list[int]:
        # Every random draw of a pair is a function of (run seed, sample id): see training/sampler.py. With fixed
        # draws (the reference cache) every visit of a pair reuses its first visit's id, sample id mod N.
        size = len(self.train_dataset)
        sample_ids = [i % size for i in batch["sample_ids"]] if self.fixed_draws else batch["sample_ids"]
        return [self.config.run.seed * 2**32 + sample_id for sample_id in sample_ids]

    def latent_batch(self, batch: dict[str, Any]) -> LatentPairBatch:
        """Latents and prompt embeddings for a batch: read from the cache, or encoded now."""
        family = self.family
        noise_seeds = self.noise_seeds(batch)
        if "chosen_latents" in batch:
            chosen, rejected, prompt_embeds = batch["chosen_latents"], batch["rejected_latents"], batch["prompt_embeds"]
        else:
            with torch.no_grad():
                media = self.decoder.name
                both = torch.cat([batch[f"chosen_{media}"], batch[f"rejected_{media}"]])
                # Posterior samples draw from their own streams (odd seeds), apart from the diffusion noise.
                posterior_seeds = [2 * seed + 1 for seed in noise_seeds] + [2 * seed + 2 for seed in noise_seeds]
                latents = family.encode(both).sample(posterior_seeds) * family.latent_scale
                chosen, rejected = latents.chunk(2)
                prompt_embeds = family.encode_prompts(batch["caption"])
        # Per-sample conditioning of the decoded media (SDXL sizes, audio spans), laid out like the latents:
        # [chosen; rejected].
        media_keys = {f"chosen_{self.decoder.name}", "chosen_latents"}
        extras = {
            key.removeprefix("chosen_"): torch.cat([batch[key], batch["rejected_" + key.removeprefix("chosen_")]])
            for key in batch
            if key.startswith("chosen_") and key not in media_keys
        }
        label = batch["label"] if not self.config.data.drop_ties else None
        dtype = weight_dtype_for(self.accelerator)
        return LatentPairBatch(
            chosen_latents=chosen.to(dtype),
            rejected_latents=rejected.to(dtype),
            prompt_embeds={name: value.to(dtype) for name, value in prompt_embeds.items()},
            label=label,
            extras=extras,
            noise_seeds=noise_seeds,
        )

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        make_pairs = getattr(self.method, "make_pairs", None)  # online methods generate (part of) the pairs
        if make_pairs is None:
            pair_batch, pair_metrics = self.latent_batch(batch), {}
        else:
            context = TrainingContext(
                step=self.micro_batches // self.config.run.gradient_accumulation_steps,
                seed=self.config.run.seed,
                noise_seeds=self.noise_seeds(batch),
                encode=self.latent_batch,
            )
            pair_batch, pair_metrics = make_pairs(model, batch, context)
        self.micro_batches += 1
        if self.reference_errors is None:
            scores, method_metrics = self.method.pair_scores(model, pair_batch)
        else:  # Diffusion-DPO reading its reference errors (a gather on the device, no reference forward)
            cached = self.reference_errors.lookup(batch["index"])
            scores, method_metrics = self.method.pair_scores(model, pair_batch, reference_errors=cached)
        # Batch-level losses (AOT) sort the scores of every process's pairs, not just this process's.
        output = compute_loss_on_global_batch(scores, self.config.loss)
        return StepOutput(
            loss=output.loss,
            metrics={**output.metrics, **pair_metrics, **method_metrics},
            counts={"pairs": pair_batch.size},
        )

    # --- evaluation ---------------------------------------------------------------------------------------------
    def _eval_prompts(self) -> list[str]:
        prompts = list(self.config.eval.prompts)
        if self.config.eval.prompts_file:
            path = Path(self.config.eval.prompts_file)
            if not path.is_file():
                raise FileNotFoundError(f"eval.prompts_file: {path} does not exist")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if self.config.eval.max_prompts:
            prompts = prompts[: self.config.eval.max_prompts]
        return prompts * self.config.eval.samples_per_prompt

    def _generate(self, denoiser: nn.Module) -> Samples:
        settings = self.config.eval
        return generate_samples(
            self.family,
            denoiser,
            self.eval_prompts,
            seed=settings.seed,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
        )

    def _score(self, samples: Samples) -> torch.Tensor | None:
        if not self.config.eval.reward:
            return None
        if self._scorer is None:
            from diffalign.rewards import build_scorer

            self._scorer = build_scorer(self.config.eval.reward)
        return self._scorer(samples, self.eval_prompts).float().cpu()

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self.accelerator.is_main_process:
            return {}
        method_evaluate = getattr(self.method, "evaluate", None)  # e.g. RPO's validation reward
        metrics = method_evaluate(model, step) if method_evaluate is not None else {}
        return {**metrics, **self.evaluate_prompts(model, step)}

    def evaluate_prompts(self, model: nn.Module, step: int) -> dict[str, float]:
        if not self.eval_prompts or not self.accelerator.is_main_process:
            return {}
        if self._base_eval is None:  # the base model does not change: sample and score it once
            # The evaluated model's adapters off (under FSDP/ZeRO-3 it is a gathered copy: the sharded policy
            # cannot run on the main process alone).
            with self.base_model.use(self.accelerator.device, policy=model) as base:
                base_samples = self._generate(base)
            self._base_eval = (base_samples, self._score(base_samples))
        base_samples, base_scores = self._base_eval
        aligned_samples = self._generate(model)
        count = self.config.eval.grid_prompts
        grid_path = self.output_dir / "samples" / f"step-{step:07d}.png"
        save_samples({"base": base_samples[:count], "aligned": aligned_samples[:count]}, grid_path)
        aligned_scores = self._score(aligned_samples)
        if aligned_scores is None:
            return {}
        return {
            "win_rate": win_rate(aligned_scores, base_scores),
            "reward_aligned": aligned_scores.mean().item(),
            "reward_base": base_scores.mean().item(),
        }

    # --- resumption ---------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"micro_batches": self.micro_batches}
        if hasattr(self.method, "extra_state"):  # e.g. SePPO's checkpoint bank
            state["method"] = self.method.extra_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.micro_batches = state.get("micro_batches", 0)
        if "method" in state:
            self.method.load_extra_state(state["method"])

    # --- export -------------------------------------------------------------------------------------------------
    def save_final(self, model: nn.Module, output_dir: Path) -> None:
        """LoRA in diffusers format with its adapter settings, or the full denoiser (``from_pretrained``)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.config.model.trainable == "lora":
            save_lora(model, self.family.denoiser_subfolder, output_dir)
        else:
            model.save_pretrained(output_dir / self.family.denoiser_subfolder)


def train(config: DiffusionTrainConfig) -> dict[str, float]:
    accelerator = make_accelerator(config.run)
    # Distinct noise per process; the data order is seeded separately (ResumableBatchSampler).
    set_seed(config.run.seed + accelerator.process_index)
    recipe = DiffusionRecipe(config, accelerator)
    return run_training(recipe, run=config.run, optim=config.optim, accelerator=accelerator, config=config)
