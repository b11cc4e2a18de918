"""The training loop shared by every trainer (diffusion and LLM).

A trainer supplies a *recipe*: the model holding the trainable parameters, a dataset with its collate function
and a ``training_step`` that turns a batch into a loss. The loop owns everything else: precision, gradient
accumulation, clipping, the NaN/inf guard, logging and trackers, the progress bar, periodic evaluation, and
atomic checkpoints that resume exactly (parameters, optimizer, scheduler, scaler, RNG states, data position).

It runs under every accelerate engine: one process, DDP, FSDP2 and DeepSpeed ZeRO (configs/accelerate/); what
differs per engine is in ``engines.py``. Only ``recipe.model`` is prepared; frozen modules stay outside.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.config import save_config
from diffalign.training.checkpoint import (
    LoopState,
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from diffalign.training.config import OptimConfig, RunConfig
from diffalign.training.engines import (
    PlainModelView,
    check_engine,
    configure_deepspeed,
    model_state_for,
    total_norm,
    uses_deepspeed,
)
from diffalign.training.optim import build_lr_scheduler, build_optimizer
from diffalign.training.sampler import ResumableBatchSampler, SampleIdDataset, collate_with_sample_ids

logger = logging.getLogger("diffalign")


@dataclass
class StepOutput:
    loss: Tensor  # scalar, differentiable
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached scalars, averaged over the log window
    # Counts summed over the log window and turned into rates, e.g. {"pairs": 8, "tokens": 1900}.
    counts: dict[str, float] = field(default_factory=dict)


class Recipe(Protocol):
    model: nn.Module  # the module whose parameters with requires_grad=True are trained
    train_dataset: Dataset

    def collate(self, items: list[Any]) -> dict[str, Any]: ...

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput: ...

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]: ...

    def save_final(self, model: nn.Module, output_dir: Path) -> None: ...


def make_accelerator(run: RunConfig) -> Accelerator:
    """An Accelerator for ``run``; mixed precision falls back to fp32 on a CPU-only machine.

    The engine (DDP, FSDP2, DeepSpeed) comes from ``accelerate launch --config_file``; it is checked here,
    before the trainers load any model.
    """
    mixed_precision = run.mixed_precision
    if mixed_precision != "no" and not torch.cuda.is_available():
        logger.info("run.mixed_precision=%s needs a GPU; running in fp32 on CPU", mixed_precision)
        mixed_precision = "no"
    trackers = []
    for name in run.trackers:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}[name]
        try:
            __import__(module)
        except ImportError:
            raise ImportError(
                f"run.trackers lists {name!r} but it is not installed: pip install {module}"
            ) from None
        trackers.append(name)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        # accelerate's own accumulation: backward divides the loss by it (DeepSpeed's engine does the division and
        # steps at the window's end itself), and ``accumulate`` skips the gradient sync inside a window.
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=run.output_dir,
        # Without cpu=True accelerate ignores a torchrun launch on a machine without GPUs (one process each).
        cpu=not torch.cuda.is_available(),
    )
    if accelerator.gradient_accumulation_steps != run.gradient_accumulation_steps:
        # The environment (accelerate launch --gradient_accumulation_steps, or the accelerate config) overrides the
        # argument; the loop's windows are the run config's, so accelerate's count must be too.
        logger.warning(
            "accelerate was launched with gradient_accumulation_steps=%d; run.gradient_accumulation_steps=%d is used",
            accelerator.gradient_accumulation_steps,
            run.gradient_accumulation_steps,
        )
        accelerator.gradient_accumulation_steps = run.gradient_accumulation_steps
    check_engine(accelerator)
    return accelerator


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def flat_scalars(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config as flat ``section/key`` scalars, as trackers' hyperparameter tables want."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(config).items() if dataclasses.is_dataclass(config) else config.items()
    for key, value in items:
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteUpdateError(NonFiniteLossError):
    """A non-finite update was already applied (DeepSpeed steps inside backward): the weights are lost."""


def run_training(
    recipe: Recipe,
    *,
    run: RunConfig,
    optim: OptimConfig,
    accelerator: Accelerator,
    config: Any = None,
) -> dict[str, float]:
    """Train ``recipe.model`` for ``run.max_steps`` optimizer steps; returns the last logged metrics."""
    output_dir = Path(run.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    trainable = [p for p in recipe.model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
    lr = optim.lr
    if optim.scale_lr:
        lr *= run.batch_size * run.gradient_accumulation_steps * accelerator.num_processes
    optimizer = build_optimizer(trainable, optim, lr)
    lr_scheduler = build_lr_scheduler(optimizer, optim, run.max_steps)
    if uses_deepspeed(accelerator):
        configure_deepspeed(accelerator, run, optim)
    # Made before prepare, which may shard the model: evaluation and export need its plain form.
    plain_view = PlainModelView(accelerator, recipe.model)
    # The scheduler and the data loader are deliberately not prepared: accelerate would step the scheduler once
    # per process and re-seed the data order, and both must stay exactly reproducible on resume. (The scheduler
    # changes the torch optimizer's learning rate, which DeepSpeed's and accelerate's wrappers read.)
    model, optimizer = accelerator.prepare(recipe.model, optimizer)
    model_state = model_state_for(accelerator, model, optimizer)

    state = LoopState()
    resume_from = resolve_resume(run.resume, checkpoint_root)
    if resume_from is not None:
        state, extra_state = load_checkpoint(
            resume_from,
            model_state=model_state,
            lr_scheduler=lr_scheduler,
            scaler=accelerator.scaler,
            process_index=accelerator.process_index,
        )
        if extra_state is not None and hasattr(recipe, "load_extra_state"):
            recipe.load_extra_state(extra_state)
        logger.info("resumed from %s at step %d", resume_from, state.step)

    sampler = ResumableBatchSampler(
        len(recipe.train_dataset),
        run.batch_size,
        seed=run.seed,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        start_batch=state.micro_step,
    )
    loader = DataLoader(
        SampleIdDataset(recipe.train_dataset),
        batch_sampler=sampler,
        collate_fn=collate_with_sample_ids(recipe.collate),
        num_workers=run.dataloader_workers,
        pin_memory=run.pin_memory and accelerator.device.type == "cuda",
        # Its own generator: iter() would otherwise draw a worker seed from the global RNG, which a resumed run
        # does at a different point of the noise stream than an uninterrupted one.
        generator=torch.Generator().manual_seed(run.seed),
    )
    batches = iter(loader)

    if config is not None and accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
    if accelerator.log_with:
        accelerator.init_trackers("diffalign", config=flat_scalars(config) if config is not None else None)

    def checkpoint(at_state: LoopState, rng_state: dict[str, Any]) -> Path:
        extra = recipe.extra_state() if hasattr(recipe, "extra_state") else None
        return save_checkpoint(
            checkpoint_root,
            model_state=model_state,
            lr_scheduler=lr_scheduler,
            scaler=accelerator.scaler,
            loop_state=at_state,
            rng_state=rng_state,
            process_index=accelerator.process_index,
            is_main_process=accelerator.is_main_process,
            wait_for_everyone=accelerator.wait_for_everyone,
            extra_state=extra,
            keep_last=run.keep_last_checkpoints,
        )

    progress = tqdm(
        total=run.max_steps,
        initial=state.step,
        desc="train",
        disable=not (run.progress_bar and accelerator.is_local_main_process),
        file=sys.stdout,
    )
    window_metrics: dict[str, Tensor] = {}
    window_counts: dict[str, float] = {}
    window_micro_steps = 0
    window_start = time.perf_counter()
    last_logged: dict[str, float] = {}
    # The state after the last completed optimizer step: what an emergency checkpoint saves if the run crashes.
    completed = (dataclasses.replace(state), capture_rng_state())
    last_saved_step = state.step
    model.train()
    try:
        while state.step < run.max_steps:
            for _ in range(run.gradient_accumulation_steps):
                batch = move_to_device(next(batches), accelerator.device)
                state.micro_step += 1
                # Gradients are synchronised only on the last micro-batch of an accumulation window (accelerate
                # counts the micro-batches; a resumed run starts at a window's start like its count).
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        output = recipe.training_step(model, batch)
                    accelerator.backward(output.loss)
                for name, value in output.metrics.items():
                    value = value.detach().float()
                    window_metrics[name] = window_metrics[name] + value if name in window_metrics else value
                window_metrics["loss"] = window_metrics.get("loss", 0.0) + output.loss.detach().float()
                for name, count in output.counts.items():
                    window_counts[name] = window_counts.get(name, 0.0) + count
                window_micro_steps += 1

            max_norm = optim.max_grad_norm if optim.max_grad_norm is not None else math.inf
            # The prepared model's parameters, not ``trainable``: FSDP2 and DeepSpeed replace the parameters while
            # preparing, and accelerate's FSDP clipping computes the norm over every shard only when given exactly
            # the model's parameters (frozen ones have no gradient and do not count). Under DeepSpeed the engine
            # has already clipped and stepped inside the last backward; this returns the norm it measured.
            measured = total_norm(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            grad_norm = measured if measured is not None else torch.tensor(math.nan, device=accelerator.device)
            # One host sync per optimizer step: the guard needs to know whether this update is finite.
            if measured is not None and not torch.isfinite(measured).item() and accelerator.mixed_precision != "fp16":
                if uses_deepspeed(accelerator):
                    raise NonFiniteUpdateError(
                        f"non-finite gradient at step {state.step} under DeepSpeed, which applies the update "
                        "inside backward, so it cannot be skipped; lower the learning rate or beta, or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_steps += 1
                logger.warning(
                    "non-finite gradient at step %d: update skipped (%d/%d)",
                    state.step,
                    state.nonfinite_steps,
                    run.max_nonfinite_steps,
                )
                if state.nonfinite_steps > run.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_steps} non-finite steps (run.max_nonfinite_steps="
                        f"{run.max_nonfinite_steps}); lower the learning rate or beta, or check the data"
                    )
                continue
            # Under fp16 an overflow is routine: the loss scaler skips that update and lowers its scale.
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            completed = (dataclasses.replace(state), capture_rng_state())
            progress.update(1)
            # Summed per micro-step like the other metrics, so the window average is the mean norm per update.
            window_metrics["grad_norm"] = (
                window_metrics.get("grad_norm", 0.0)
                + grad_norm.detach().float() * run.gradient_accumulation_steps
            )

            if state.step % run.log_every == 0 or state.step == run.max_steps:
                elapsed = time.perf_counter() - window_start
                last_logged = reduce_window(accelerator, window_metrics, window_micro_steps)
                for name, count in window_counts.items():
                    last_logged[f"{name}_per_s"] = count * accelerator.num_processes / max(elapsed, 1e-9)
                last_logged["lr"] = lr_scheduler.get_last_lr()[0]
                last_logged["peak_memory_gb"] = peak_memory_gb(accelerator.device)
                last_logged["nonfinite_steps"] = state.nonfinite_steps
                accelerator.log(last_logged, step=state.step)
                if accelerator.is_main_process:
                    append_jsonl(output_dir / "metrics.jsonl", {"step": state.step, **last_logged})
                progress.set_postfix(loss=f"{last_logged['loss']:.4f}")
                window_metrics, window_counts, window_micro_steps = {}, {}, 0
                window_start = time.perf_counter()

            if state.step % run.checkpoint_every == 0:
                checkpoint(state, completed[1])
                last_saved_step = state.step

            if run.eval_every and state.step % run.eval_every == 0 and state.step < run.max_steps:
                with plain_view.gathered(model) as plain_model:
                    evaluate_and_log(recipe, accelerator, plain_model, state, last_logged, output_dir)
    except BaseException as error:
        # Never lose progress: save the last completed step before the error propagates (unless the weights
        # already hold a non-finite update).
        completed_state, completed_rng = completed
        weights_intact = not isinstance(error, NonFiniteUpdateError)
        if completed_state.step > last_saved_step and accelerator.num_processes == 1 and weights_intact:
            path = checkpoint(completed_state, completed_rng)
            logger.error("training stopped by an error; progress saved to %s", path)
        raise
    finally:
        progress.close()

    if last_saved_step != state.step:
        checkpoint(state, completed[1])
    with plain_view.gathered(model) as plain_model:
        final_metrics = evaluate_and_log(recipe, accelerator, plain_model, state, last_logged, output_dir)
        if accelerator.is_main_process:
            recipe.save_final(plain_model, output_dir / "final")
            if config is not None:  # the final model travels with the config that produced it
                save_config(config, output_dir / "final" / "config.yaml")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_metrics


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One line per log step: a machine-readable training log beside the trackers'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


def reduce_window(accelerator: Accelerator, window: dict[str, Tensor], micro_steps: int) -> dict[str, float]:
    """Average the window's summed metrics over micro-steps and processes; the only sync of logging."""
    names = sorted(window)
    stacked = torch.stack(
        [torch.as_tensor(window[name], device=accelerator.device).float() for name in names]
    )
    stacked = accelerator.reduce(stacked / max(micro_steps, 1), reduction="mean")
    return dict(zip(names, stacked.tolist()))


def evaluate_and_log(
    recipe: Recipe,
    accelerator: Accelerator,
    model: nn.Module | None,
    state: LoopState,
    last_logged: dict[str, float],
    output_dir: Path,
) -> dict[str, float]:
    """Run the recipe's evaluation; recipes with a ``selection_metric`` keep their best model in ``best/``.

    ``model`` is the plain trained model (None on the other processes under a sharding engine: recipes evaluate
    on the main process only).
    """
    if model is not None:
        model.eval()
    # Evaluation samples with its own seeds; the training RNG stream must continue as if it had not run.
    saved_rng = capture_rng_state()
    with torch.no_grad():
        eval_metrics = recipe.evaluate(model, state.step) or {}
    restore_rng_state(saved_rng)
    if model is not None:
        model.train()
    if eval_metrics:
        accelerator.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=state.step)
        if accelerator.is_main_process:
            append_jsonl(
                output_dir / "metrics.jsonl",
                {"step": state.step, **{f"eval/{k}": v for k, v in eval_metrics.items()}},
            )
        logger.info("step %d eval: %s", state.step, {k: round(v, 4) for k, v in eval_metrics.items()})
    selection_metric = getattr(recipe, "selection_metric", None)
    if selection_metric and selection_metric in eval_metrics:
        value = eval_metrics[selection_metric]
        if state.best_metric is None or value > state.best_metric:
            state.best_metric = value
            if accelerator.is_main_process:
                recipe.save_final(model, output_dir / "best")
            logger.info("new best %s=%.4f at step %d", selection_metric, value, state.step)
    return {**last_logged, **{f"eval/{k}": v for k, v in eval_metrics.items()}}
