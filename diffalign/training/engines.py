"""What the training loop does differently under accelerate's sharding engines: FSDP2 and DeepSpeed ZeRO.

Only the trained model goes through ``accelerator.prepare``. The frozen modules (the reference copy, the VAE,
text encoders and reward models of the diffusion trainer, the LLM trainer's reference copy) are never prepared:
preparing them would give them gradient buckets (DDP), shard them (FSDP, ZeRO-3) or put them in a second
DeepSpeed engine, which accelerate does not support (accelerate #3170). Each process keeps them whole, in eval
mode, under ``no_grad``; a LoRA reference is the prepared policy itself with its adapter switched off, which every
process calls in lockstep like the policy.

Under an engine that shards the parameters (FSDP2, ZeRO-3) a forward of the trained model is collective, so it
cannot run on the main process alone, as evaluation and the final export do. ``PlainModelView`` gathers the full
weights into a plain copy of the model on the main process for those.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from diffalign.training.checkpoint import (
    DeepSpeedModelState,
    GatheredModelState,
    ModelState,
    ReplicatedModelState,
)
from diffalign.training.config import OptimConfig, RunConfig

logger = logging.getLogger("diffalign")


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def uses_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether the trained model's parameters are split across processes (FSDP, ZeRO-3)."""
    if uses_fsdp(accelerator):
        return True
    return uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def check_engine(accelerator: Accelerator) -> None:
    """Refuse engine settings the trainers cannot honour; called before any model is loaded."""
    if uses_fsdp(accelerator) and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP1 (fsdp_version: 1) is not supported: it flattens the model's parameters, while the trainers call "
            "the model's own modules (a LoRA reference is the policy with its adapter off) and checkpoint by "
            "parameter name. Use FSDP2: fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
        )
    if uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise ValueError(
            "zero3_init_flag: true partitions every from_pretrained model as it loads, including the frozen "
            "reference, VAE, text encoders and reward models, which then cannot run outside the DeepSpeed engine; "
            "set zero3_init_flag: false (configs/accelerate/zero3.yaml)"
        )


def configure_deepspeed(accelerator: Accelerator, run: RunConfig, optim: OptimConfig) -> None:
    """Write the run's batch size, accumulation and clipping into DeepSpeed's config before ``prepare``.

    DeepSpeed does the accumulation (it divides the loss and steps at the boundary) and the clipping itself, so
    they must be the run's. accelerate cannot infer the batch size: the loop's data loader is not prepared.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    configured = config.get("gradient_accumulation_steps", "auto")
    if configured not in ("auto", run.gradient_accumulation_steps):
        logger.warning(
            "the accelerate config sets gradient_accumulation_steps=%s; run.gradient_accumulation_steps=%d is used",
            configured,
            run.gradient_accumulation_steps,
        )
    config["train_micro_batch_size_per_gpu"] = run.batch_size
    config["gradient_accumulation_steps"] = run.gradient_accumulation_steps
    config["train_batch_size"] = run.batch_size * run.gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = optim.max_grad_norm if optim.max_grad_norm is not None else 0.0  # 0: off


def total_norm(norm: Tensor | float | None) -> Tensor | None:
    """The gradient norm ``accelerator.clip_grad_norm_`` returns, as a plain tensor.

    Under FSDP2 it is a DTensor (turned into the full value: every process calls this); under DeepSpeed a
    float, or None before the engine has measured one.
    """
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm)


def parameters_finite(model: nn.Module | list[nn.Parameter]) -> bool:
    """Whether every trained parameter of the prepared ``model`` (or the list of them) is finite; one host sync.

    The largest absolute value is NaN or inf exactly when some value is, and unlike a 2-norm it cannot
    overflow. Under FSDP2 each process checks its own shards and the processes agree by an all-reduce of the
    verdict (a max over the values themselves could drop a NaN); every process calls this. ZeRO-3 keeps the
    parameters inside DeepSpeed's partitions, which are not checked here (DeepSpeed's overflow check is).
    """
    parameters = model if isinstance(model, list) else [p for p in model.parameters() if p.requires_grad]
    shards = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
    shards = [shard for shard in shards if shard.numel() > 0]
    device = parameters[0].device if parameters else torch.device("cpu")
    nonfinite = torch.zeros((), device=device)
    if shards:
        largest = torch.nn.utils.get_total_norm(shards, norm_type=math.inf)
        nonfinite = (~torch.isfinite(largest)).float()
    if any(hasattr(p, "to_local") for p in parameters) and torch.distributed.is_initialized():
        torch.distributed.all_reduce(nonfinite, op=torch.distributed.ReduceOp.MAX)
    return not nonfinite.item()


def model_state_for(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
) -> ModelState:
    """How checkpoints hold the prepared ``model``'s parameters and ``optimizer``'s state under this engine."""
    if uses_deepspeed(accelerator):
        return DeepSpeedModelState(model)  # the prepared model is the DeepSpeed engine
    if uses_fsdp(accelerator):
        return GatheredModelState(accelerator.unwrap_model(model), optimizer)
    return ReplicatedModelState(accelerator.unwrap_model(model), optimizer)


def gather_full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer of the prepared ``model`` as full tensors on the main process's CPU
    (an empty dict on the others). Collective: every process calls it."""
    if uses_deepspeed(accelerator):
        # ZeRO-3: the 16-bit weights gathered by DeepSpeed (needs zero3_save_16bit_model: true).
        state = accelerator.get_state_dict(model)
        return state if accelerator.is_main_process else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(accelerator.unwrap_model(model), options=options)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are storage-less (meta) placeholders; buffers are copied.

    Buffers stay real because non-persistent ones (e.g. rotary frequencies) are in no state dict.
    """
    memo: dict[int, Any] = {
        id(parameter): nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
        for parameter in model.parameters()
    }
    shell = copy.deepcopy(model, memo)
    for module in shell.modules():
        # A module compiled in place (nn.Module.compile) would keep calling the original's compiled forward.
        module._compiled_call_impl = None
    return shell


class PlainModelView:
    """The trained model as one plain module on the main process, for evaluation and the final export.

    Without a sharding engine that is the unwrapped model itself. Under FSDP2 or ZeRO-3 a forward of the
    prepared model would wait for the other processes, so the main process instead fills a meta copy (made
    before ``prepare``, holding no memory) with the gathered full weights for the duration of the context.
    """

    def __init__(self, accelerator: Accelerator, model_before_prepare: nn.Module) -> None:
        self.accelerator = accelerator
        self.sharded = shards_parameters(accelerator)
        self.shell = meta_copy(model_before_prepare) if self.sharded and accelerator.is_main_process else None

    @contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module | None]:
        """The plain model on the main process (None on the others). Every process enters it together."""
        if not self.sharded:
            yield self.accelerator.unwrap_model(model)
            return
        state = gather_full_state_dict(self.accelerator, model)
        if self.shell is None:
            yield None
            return
        empty = dict(self.shell.named_parameters(remove_duplicate=False))
        self.shell.load_state_dict(state, assign=True)
        self.shell.to(self.accelerator.device)
        try:
            yield self.shell
        finally:
            # Back to placeholders: the gathered weights are freed until the next evaluation.
            self.shell.load_state_dict(empty, strict=False, assign=True)
