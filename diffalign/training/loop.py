"""The training loop shared by every trainer (diffusion and LLM).

A trainer supplies a *recipe* (a :class:`Recipe`): the model holding the trainable parameters, a dataset with
its collate function and a ``training_step`` that turns a batch into a loss. The loop owns everything else:
precision, gradient accumulation, clipping, the NaN/inf guard (on the gradient before the step and on the
weights after it), logging and trackers, the progress bar, periodic evaluation, and atomic checkpoints that
resume exactly (parameters, optimizer, scheduler, scaler, RNG states, data position). An error, SIGINT, SIGTERM
or SIGUSR1 ends the run with the last completed step saved, unless the weights are no longer finite.

It runs under every accelerate engine: one process, DDP, FSDP2 and DeepSpeed ZeRO (configs/accelerate/); what
differs per engine is in ``engines.py``. Only ``recipe.model`` is prepared; frozen modules stay outside."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.config import save_config, to_dict
from diffalign.files import folder_written_whole
from diffalign.hub import check_push_possible, push_folder
from diffalign.model_card import CardFacts, TrainingSummary, describe_folder
from diffalign.progress import configure_progress
from diffalign.provenance import PROVENANCE_KEY, provenance
from diffalign.streaming import RowStream, StreamBatches
from diffalign.training.checkpoint import (
    CheckpointWriteError,
    LoopState,
    capture_rng_state,
    checkpoint_dir,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from diffalign.training.config import OptimConfig, RunConfig
from diffalign.training.ema import WeightAverage, WithAverage
from diffalign.training.engines import (
    PlainModelView,
    check_engine,
    configure_deepspeed,
    model_state_for,
    parameters_finite,
    shards_parameters,
    total_norm,
    uses_deepspeed,
)
from diffalign.training.optim import build_lr_scheduler, build_optimizer
from diffalign.training.resume import load_first_readable, resume_candidates, verify_config
from diffalign.training.sampler import ResumableBatchSampler, SampleIdDataset, collate_with_sample_ids
from diffalign.training.signals import StopRequests, TrainingInterrupted
from diffalign.training.trackers import LoggedSamples, log_samples, tracker_settings

logger = logging.getLogger("diffalign")


@dataclass
class StepOutput:
    loss: Tensor  # scalar, differentiable (detached when `backpropagated`)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached scalars, averaged over the log window
    # Counts summed over the log window and turned into rates, e.g. {"pairs": 8, "tokens": 1900}.
    counts: dict[str, float] = field(default_factory=dict)
    # True when `training_step` ran the backward itself, a part of the loss at a time, so that the graphs of only
    # one part are held at once (see `backward_part`); the loop then does not backpropagate `loss`.
    backpropagated: bool = False


class Recipe(abc.ABC):
    """What a trainer gives the loop: every hook the loop calls, the optional ones with no-op defaults.

    A recipe sets ``model`` (the module whose parameters with ``requires_grad=True`` are trained),
    ``train_dataset`` and ``collate`` (a batch of its items → the dict ``training_step`` reads), and implements
    ``training_step`` and ``save_final``. ``card_facts`` lets the model card of ``final/`` say what loads it.
    """

    model: nn.Module
    train_dataset: Dataset | RowStream  # map-style, read by sample id; or a stream (diffalign/streaming.py)
    collate: Callable[[list[Any]], dict[str, Any]]
    # A key of ``evaluate``'s metrics whose best (largest) value keeps its model in ``<output_dir>/best``.
    selection_metric: str | None = None

    @abc.abstractmethod
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """The loss of one micro-batch (the loop does backward, accumulation and the optimizer step)."""

    @abc.abstractmethod
    def save_final(self, model: nn.Module, output_dir: Path) -> None:
        """Export the trained model (plain, unwrapped) into ``output_dir``."""

    def evaluate(self, model: nn.Module | None, step: int) -> dict[str, float]:
        """Metrics of the model at ``step``, logged as ``eval/<name>``; ``model`` is None on the processes that
        do not hold a plain copy under a sharding engine."""
        return {}

    def logged_samples(self) -> LoggedSamples | None:
        """The samples of the last ``evaluate``, which the loop sends to the trackers; None: nothing to show."""
        return None

    def card_facts(self) -> CardFacts | None:
        """What loads the exported model, for its model card; None: no card."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """State of the recipe itself that a checkpoint must keep for an exact resume (tensors, plain values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""
        return None


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
    if run.push_to_hub:  # before any model loads: the push at the end must be possible
        check_push_possible(run.hub_repo_id)
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
    configure_progress(run.progress_bar and accelerator.is_local_main_process)
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


@dataclass
class LogWindow:
    """Metrics and counts summed over the micro-steps since the last log line."""

    metrics: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    micro_steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add_metric(self, name: str, value: Tensor) -> None:
        self.metrics[name] = self.metrics[name] + value if name in self.metrics else value

    def add(self, output: StepOutput) -> None:
        for name, value in output.metrics.items():
            self.add_metric(name, value.detach().float())
        self.add_metric("loss", output.loss.detach().float())
        for name, count in output.counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + count
        self.micro_steps += 1


def run_training(
    recipe: Recipe,
    *,
    run: RunConfig,
    optim: OptimConfig,
    accelerator: Accelerator,
    config: Any = None,
) -> dict[str, float]:
    """Train ``recipe.model`` for ``run.max_steps`` optimizer steps; returns the last logged metrics.

    ``config`` is the run's whole config (a dataclass): it is saved with the run and in every checkpoint, and a
    resumed run is checked against the checkpoint's.
    """
    return TrainingLoop(recipe, run=run, optim=optim, accelerator=accelerator, config=config).train()


class TrainingLoop:
    """One run of the loop. Built: the optimizer and schedule made, the model prepared, a checkpoint restored,
    the data stream positioned. ``train`` then repeats: accumulate a window of micro-batches, take the guarded
    optimizer step, log, checkpoint and evaluate on their cadences; on the way out it saves what would be lost.
    """

    def __init__(
        self, recipe: Recipe, *, run: RunConfig, optim: OptimConfig, accelerator: Accelerator, config: Any = None
    ) -> None:
        self.recipe, self.run, self.optim, self.accelerator, self.config = recipe, run, optim, accelerator, config
        self.output_dir = Path(run.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        # The config as checkpoints and final/ store it, with where and with what it runs (provenance.py).
        self.config_record = None
        if config is not None:
            self.config_record = {**to_dict(config), PROVENANCE_KEY: provenance(to_dict(config))}
        self._prepare_model()
        self.state = self._resume()
        self.state.num_processes = accelerator.num_processes
        self.state.device = device_name(accelerator.device)
        self.batches = iter(self._data_loader())
        if config is not None and accelerator.is_main_process:
            save_config(config, self.output_dir / "config.yaml")
        if accelerator.log_with:
            project, tracker_kwargs = tracker_settings(run)
            accelerator.init_trackers(
                project, config=flat_scalars(config) if config is not None else None, init_kwargs=tracker_kwargs
            )
        self.window = LogWindow()
        self.last_logged: dict[str, float] = {}
        # The state after the last completed optimizer step: what an emergency checkpoint saves if the run crashes.
        self.completed = (dataclasses.replace(self.state), capture_rng_state())
        self.last_saved_step = self.state.step

    def _prepare_model(self) -> None:
        recipe, run, optim, accelerator = self.recipe, self.run, self.optim, self.accelerator
        trainable = [p for p in recipe.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
        lr = optim.lr
        if optim.scale_lr:
            lr *= run.batch_size * run.gradient_accumulation_steps * accelerator.num_processes
        optimizer = build_optimizer(trainable, optim, lr)
        self.lr_scheduler = build_lr_scheduler(optimizer, optim, run.max_steps)
        if uses_deepspeed(accelerator):
            configure_deepspeed(accelerator, run, optim)
        # Made before prepare, which may shard the model: evaluation and export need its plain form.
        self.plain_view = PlainModelView(accelerator, recipe.model)
        # The scheduler and the data loader are deliberately not prepared: accelerate would step the scheduler
        # once per process and re-seed the data order, and both must stay exactly reproducible on resume. (The
        # scheduler changes the torch optimizer's learning rate, which DeepSpeed's and accelerate's wrappers read.)
        self.model, self.optimizer = accelerator.prepare(recipe.model, optimizer)
        # The prepared model's parameters, listed once: walking the module tree every step costs more than
        # clipping a LoRA's gradients (FSDP2 and DeepSpeed replace the parameters while preparing, so not before).
        self.parameters = list(self.model.parameters())
        self.trained_parameters = [p for p in self.parameters if p.requires_grad]
        self.model_state = model_state_for(accelerator, self.model, self.optimizer)
        self.average: WeightAverage | None = None
        if run.ema is not None:
            if shards_parameters(accelerator) or uses_deepspeed(accelerator):
                # FSDP and ZeRO-3 shard the parameters; DeepSpeed keeps its fp32 masters inside its engine.
                raise ValueError(
                    "run.ema is supported on one process and under DDP only, not under FSDP or DeepSpeed; use the "
                    "DDP config (configs/accelerate/ddp.yaml) or set run.ema: null"
                )
            self.average = WeightAverage(accelerator.unwrap_model(self.model), run.ema)
            self.model_state = WithAverage(self.model_state, self.average)

    def _resume(self) -> LoopState:
        candidates = resume_candidates(self.run.resume, self.checkpoint_root)
        if not candidates:
            return LoopState()
        path, (state, extra_state) = load_first_readable(candidates, self._load_checkpoint)
        if extra_state is not None:
            self.recipe.load_extra_state(extra_state)
        logger.info("resumed from %s at step %d", path, state.step)
        return state

    def _load_checkpoint(self, path: Path) -> tuple[LoopState, dict[str, Any] | None]:
        if self.config is not None:
            verify_config(
                path,
                to_dict(self.config),
                num_processes=self.accelerator.num_processes,
                allow_change=self.run.allow_config_change,
                output_dir=self.output_dir,
                is_main_process=self.accelerator.is_main_process,
            )
        return load_checkpoint(
            path,
            model_state=self.model_state,
            lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler,
            process_index=self.accelerator.process_index,
        )

    def _data_loader(self) -> DataLoader | StreamBatches:
        run, accelerator, recipe = self.run, self.accelerator, self.recipe
        if isinstance(recipe.train_dataset, RowStream):
            return recipe.train_dataset.batches(
                run.batch_size,
                collate=recipe.collate,
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                position=self.state.data_position,
            )
        sampler = ResumableBatchSampler(
            len(recipe.train_dataset),
            run.batch_size,
            seed=run.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            start_batch=self.state.micro_step,
        )
        return DataLoader(
            SampleIdDataset(recipe.train_dataset),
            batch_sampler=sampler,
            collate_fn=collate_with_sample_ids(recipe.collate),
            num_workers=run.dataloader_workers,
            pin_memory=run.pin_memory and accelerator.device.type == "cuda",
            # Its own generator: iter() would otherwise draw a worker seed from the global RNG, which a resumed
            # run does at a different point of the noise stream than an uninterrupted one.
            generator=torch.Generator().manual_seed(run.seed),
        )

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        run = self.run
        self.progress = tqdm(
            total=run.max_steps,
            initial=self.state.step,
            desc="train",
            # None: shown only on a terminal, like every bar of diffalign.progress.
            disable=None if run.progress_bar and self.accelerator.is_local_main_process else True,
            file=sys.stdout,
        )
        self.model.train()
        with StopRequests() as stops:
            try:
                while self.state.step < run.max_steps:
                    self._accumulate_window()
                    if self._guarded_step():
                        self._after_step()
                    signal_number = stops.requested(self.accelerator)
                    if signal_number:
                        self._stop(signal_number)
            except BaseException as error:
                self._emergency_save(error)
                raise
            finally:
                self.progress.close()
        return self._finish()

    def _accumulate_window(self) -> None:
        """Forward and backward ``gradient_accumulation_steps`` micro-batches into the gradients."""
        accelerator = self.accelerator
        for _ in range(self.run.gradient_accumulation_steps):
            batch = move_to_device(next(self.batches), accelerator.device)
            self.state.micro_step += 1
            # Gradients are synchronised only on the last micro-batch of an accumulation window (accelerate
            # counts the micro-batches; a resumed run starts at a window's start like its count).
            with accelerator.accumulate(self.model):
                with accelerator.autocast():
                    output = self.recipe.training_step(self.model, batch)
                if not output.backpropagated:
                    accelerator.backward(output.loss)
            self.window.add(output)
        if isinstance(self.batches, StreamBatches):
            self.state.data_position = self.batches.position()

    def _guarded_step(self) -> bool:
        """Clip the window's gradient and apply it; False when the NaN/inf guard skipped it.

        Raises :class:`NonFiniteUpdateError` when the applied update left a trained weight NaN or inf.
        """
        accelerator = self.accelerator
        max_norm = self.optim.max_grad_norm if self.optim.max_grad_norm is not None else math.inf
        # The prepared model's parameters, not the trainable list made before prepare: FSDP2 and DeepSpeed
        # replace the parameters while preparing, and accelerate's FSDP clipping computes the norm over every
        # shard only when given exactly the model's parameters (frozen ones have no gradient and do not count).
        # Under DeepSpeed the engine has already clipped and stepped inside the last backward; this returns the
        # norm it measured.
        measured = total_norm(accelerator.clip_grad_norm_(self.parameters, max_norm))
        # One host sync per optimizer step: the guard needs to know whether this update is finite. Under fp16
        # an overflow is routine: the loss scaler skips that update and lowers its scale.
        if measured is not None and not torch.isfinite(measured).item() and accelerator.mixed_precision != "fp16":
            self._skip_step()
            return False
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # A finite gradient can still make a non-finite update (an infinite learning rate, an overflowing
        # optimizer state); those weights must never be trained on or saved.
        if not parameters_finite(self.trained_parameters):
            raise NonFiniteUpdateError(
                f"the update of step {self.state.step + 1} made trained weights NaN or inf; nothing of it is "
                f"saved (the last checkpoint is step {self.last_saved_step}). Lower optim.lr (now "
                f"{self.lr_scheduler.get_last_lr()[0]:g}) or loss.beta"
            )
        self.state.step += 1
        if self.average is not None:
            self.average.after_step(self.state.step)
        self.completed = (dataclasses.replace(self.state), capture_rng_state())
        self.progress.update(1)
        grad_norm = measured if measured is not None else torch.tensor(math.nan, device=accelerator.device)
        # Summed per micro-step like the other metrics, so the window average is the mean norm per update.
        self.window.add_metric("grad_norm", grad_norm.detach().float() * self.run.gradient_accumulation_steps)
        return True

    def _skip_step(self) -> None:
        if uses_deepspeed(self.accelerator):
            raise NonFiniteUpdateError(
                f"non-finite gradient at step {self.state.step} under DeepSpeed, which applies the update "
                "inside backward, so it cannot be skipped; lower the learning rate or beta, or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        state, limit = self.state, self.run.max_nonfinite_steps
        state.nonfinite_steps += 1
        logger.warning(
            "non-finite gradient at step %d: update skipped (%d/%d)", state.step, state.nonfinite_steps, limit
        )
        if state.nonfinite_steps > limit:
            raise NonFiniteLossError(
                f"{state.nonfinite_steps} non-finite steps (run.max_nonfinite_steps={limit}); lower the learning "
                "rate or beta, or check the data"
            )

    def _after_step(self) -> None:
        """Log, checkpoint and evaluate, each on its cadence."""
        run, step = self.run, self.state.step
        if step % run.log_every == 0 or step == run.max_steps:
            self._log()
        if step % run.checkpoint_every == 0:
            self._save(self.state, self.completed[1])
        if run.eval_every and step % run.eval_every == 0 and step < run.max_steps:
            with self.plain_view.gathered(self.model) as plain_model, self.evaluated_weights():
                evaluate_and_log(
                    self.recipe, self.accelerator, plain_model, self.state, self.last_logged, self.output_dir,
                    self.write_model,
                )

    def _log(self) -> None:
        accelerator, window = self.accelerator, self.window
        elapsed = time.perf_counter() - window.start
        logged = reduce_window(accelerator, window.metrics, window.micro_steps)
        for name, count in window.counts.items():
            logged[f"{name}_per_s"] = count * accelerator.num_processes / max(elapsed, 1e-9)
        logged["lr"] = self.lr_scheduler.get_last_lr()[0]
        logged["peak_memory_gb"] = peak_memory_gb(accelerator.device)
        logged["nonfinite_steps"] = self.state.nonfinite_steps
        accelerator.log(logged, step=self.state.step)
        if accelerator.is_main_process:
            append_jsonl(self.output_dir / "metrics.jsonl", {"step": self.state.step, **logged})
        self.progress.set_postfix(loss=f"{logged['loss']:.4f}")
        self.last_logged = logged
        self.window = LogWindow()

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _save(self, state: LoopState, rng_state: dict[str, Any]) -> Path:
        """Checkpoint ``state``; every process calls it. Non-finite weights are refused, never saved."""
        if not parameters_finite(self.trained_parameters):
            raise NonFiniteUpdateError(f"the trained weights hold NaN or inf at step {state.step}; not saved")
        path = save_checkpoint(
            self.checkpoint_root,
            model_state=self.model_state,
            lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler,
            loop_state=state,
            rng_state=rng_state,
            process_index=self.accelerator.process_index,
            is_main_process=self.accelerator.is_main_process,
            wait_for_everyone=self.accelerator.wait_for_everyone,
            extra_state=self.recipe.extra_state(),
            config=self.config_record,
            keep_last=self.run.keep_last_checkpoints,
        )
        self.last_saved_step = state.step
        return path

    def _stop(self, signal_number: int) -> None:
        """Checkpoint the step just finished (every process is here: they agreed to stop) and stop."""
        if self.last_saved_step != self.state.step:
            self._save(self.state, capture_rng_state())
        step = self.state.step
        raise TrainingInterrupted(signal_number, step, checkpoint_dir(self.checkpoint_root, step))

    def _emergency_save(self, error: BaseException) -> None:
        """Save the last completed step when an error stops the run, where that can be done safely."""
        completed_state, completed_rng = self.completed
        if completed_state.step <= self.last_saved_step:
            return
        # Saving is collective, and the other processes may never reach it; weights holding a non-finite update
        # are lost; a failed write would only fail again on the same disk and hide the first error.
        if self.accelerator.num_processes > 1 or isinstance(error, (NonFiniteUpdateError, CheckpointWriteError)):
            logger.error("training stopped by %s; no emergency checkpoint written", type(error).__name__)
            return
        try:
            path = self._save(completed_state, completed_rng)
        except Exception as save_error:
            logger.error("the emergency checkpoint failed too (%s); the error that stopped training follows:", save_error)
            return
        logger.error("training stopped by %s; progress saved to %s", type(error).__name__, path)

    def _finish(self) -> dict[str, float]:
        """The last checkpoint, the final evaluation and the exported model (pushed to the Hub when asked)."""
        accelerator, output_dir = self.accelerator, self.output_dir
        if self.last_saved_step != self.state.step:
            self._save(self.state, self.completed[1])
        with self.plain_view.gathered(self.model) as plain_model, self.evaluated_weights():
            final_metrics = evaluate_and_log(
                self.recipe, accelerator, plain_model, self.state, self.last_logged, output_dir, self.write_model
            )
            if accelerator.is_main_process:
                self.write_model(plain_model, output_dir / "final", final_metrics)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if self.run.push_to_hub and accelerator.is_main_process:
            url = push_folder(
                output_dir / "final", self.run.hub_repo_id, private=self.run.hub_private,
                message=f"diffalign: {self.run.run_name or output_dir.name}, step {self.state.step}",
            )
            logger.info("final/ pushed to %s", url)
        return final_metrics

    def evaluated_weights(self) -> contextlib.AbstractContextManager:
        """The weights evaluation and export see: the weight average when ``run.ema`` is on."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def write_model(self, model: nn.Module | None, folder: Path, metrics: dict[str, float]) -> None:
        """A model folder (``final/``, ``best/``): the recipe's export, its config with provenance, its card."""
        with folder_written_whole(folder) as staging:
            self.recipe.save_final(model, staging)
            if self.config_record is not None:  # the model travels with the config that produced it
                summary = TrainingSummary(self.state.step, self.state.num_processes, self.state.device, metrics)
                describe_folder(staging, self.config_record, self.recipe.card_facts(), summary, self.run.run_name)


def backward_part(accelerator: Accelerator, loss: Tensor) -> None:
    """The loop's backward of one part of a micro-batch's loss, run from inside ``training_step`` (whose forward is
    under autocast; the backward runs outside it, as the loop's own). Each call divides by the accumulation steps
    and synchronises gradients where the loop's own backward would, so the parts' sum is the micro-batch's
    gradient: DDP all-reduces each part's (tested, two processes against one); FSDP2 reduce-scatters each part's
    the same way (not run with parts here). Not for DeepSpeed, whose engine steps the optimizer inside every
    backward."""
    if uses_deepspeed(accelerator):
        raise RuntimeError("backward_part under DeepSpeed would step the optimizer once per part")
    with torch.autocast(accelerator.device.type, enabled=False):
        accelerator.backward(loss)


def device_name(device: torch.device) -> str:
    """What a run computes on, for its model card: the GPU's name, or ``CPU``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type.upper()


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
    write_model: Callable[[nn.Module | None, Path, dict[str, float]], None],
) -> dict[str, float]:
    """Run the recipe's evaluation, log its metrics and samples; a recipe with a ``selection_metric`` keeps its
    best model in ``best/`` (written by ``write_model``).

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
    logged_metrics = {f"eval/{k}": v for k, v in eval_metrics.items()}
    if eval_metrics:
        accelerator.log(logged_metrics, step=state.step)
        if accelerator.is_main_process:
            append_jsonl(output_dir / "metrics.jsonl", {"step": state.step, **logged_metrics})
        logger.info("step %d eval: %s", state.step, {k: round(v, 4) for k, v in eval_metrics.items()})
    samples = recipe.logged_samples()
    if samples is not None and accelerator.is_main_process:
        log_samples(accelerator, samples, state.step)
    selection_metric = recipe.selection_metric
    if selection_metric and selection_metric in eval_metrics:
        value = eval_metrics[selection_metric]
        if state.best_metric is None or value > state.best_metric:
            state.best_metric = value
            if accelerator.is_main_process:
                write_model(model, output_dir / "best", logged_metrics)
            logger.info("new best %s=%.4f at step %d", selection_metric, value, state.step)
    return {**last_logged, **logged_metrics}
