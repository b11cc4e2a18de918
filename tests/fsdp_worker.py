"""A tiny preference problem trained under torch's FSDP2 on CPU (gloo), started by torchrun from
tests/test_distributed.py. It exercises the engine-facing code of diffalign/training with really sharded
parameters: the global-batch loss gather under FSDP's gradient reduce-scatter, the gathered checkpoint (saved
under N processes, resumed under M) and the plain copy used for evaluation and export.

accelerate 1.15 sets up FSDP only on accelerators, so the model is sharded with ``fully_shard`` directly and
only accelerate's bookkeeping (``distributed_type``) is stood in for.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUTPUT_DIR --steps 0 2 [--resume CHECKPOINT]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from torch import nn

from diffalign.losses import LossConfig, PairScores
from diffalign.training.checkpoint import GatheredModelState
from diffalign.training.distributed import compute_loss_on_global_batch
from diffalign.training.engines import PlainModelView, parameters_finite, total_norm

GLOBAL_BATCH = 8
LOSS = LossConfig(type=["sigmoid", "aot"], beta=2.0)  # a per-pair and a batch-level (sorting) term


def make_policy() -> nn.Module:
    """Scores a pair of inputs: output 0 is the chosen sample's log-likelihood, output 1 the rejected one's."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def global_batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 6, generator=torch.Generator().manual_seed(step))


def probe() -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1000))


def train_steps(
    policy: nn.Module,
    reference: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    process_index: int = 0,
    num_processes: int = 1,
) -> tuple[list[float], list[float]]:
    """The trainers' step on this process's slice of each global batch (as ResumableBatchSampler slices it);
    returns the losses and the gradient norms."""
    losses, norms = [], []
    for step in steps:
        inputs = global_batch(step).chunk(num_processes)[process_index]
        scores = policy(inputs)
        with torch.no_grad():
            reference_scores = reference(inputs)
        pair_scores = PairScores(
            policy_chosen=scores[:, 0],
            policy_rejected=scores[:, 1],
            ref_chosen=reference_scores[:, 0],
            ref_rejected=reference_scores[:, 1],
        )
        loss = compute_loss_on_global_batch(pair_scores, LOSS).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # What the loop does with accelerate's clipping result (a DTensor under FSDP2).
        norms.append(total_norm(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)).item())
        optimizer.step()
        losses.append(loss.item())
    return losses, norms


def make_optimizer(policy: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.parameters(), lr=0.05, weight_decay=0.01)


def main() -> None:
    from torch.distributed.fsdp import fully_shard

    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--steps", type=int, nargs=2, required=True)
    parser.add_argument("--resume", type=Path)
    args = parser.parse_args()

    state = PartialState(cpu=True)  # gloo, from torchrun's environment
    policy = make_policy()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # frozen, never sharded (as the trainers')
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        is_main_process=state.is_main_process,
        device=torch.device("cpu"),
        unwrap_model=lambda model: model,
    )
    plain_view = PlainModelView(accelerator, policy)  # before sharding, as in the loop
    for layer in policy:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(policy)
    assert all(type(parameter).__name__ == "DTensor" for parameter in policy.parameters())
    optimizer = make_optimizer(policy)
    model_state = GatheredModelState(policy, optimizer)
    if args.resume is not None:
        model_state.load(args.resume)

    steps = range(*args.steps)
    losses, norms = train_steps(policy, reference, optimizer, steps, state.process_index, state.num_processes)

    checkpoint = args.output / "checkpoint"
    if state.is_main_process:
        checkpoint.mkdir(parents=True)
    state.wait_for_everyone()
    model_state.save(checkpoint, state.is_main_process)
    with plain_view.gathered(policy) as plain:
        if plain is not None:
            with torch.no_grad():
                outputs = plain(probe()).tolist()
            kinds = sorted({type(parameter).__name__ for parameter in plain.parameters()})
            result = {
                "losses": losses,
                "grad_norms": norms,
                "probe_outputs": outputs,
                "plain_parameter_types": kinds,
            }
            (args.output / "result.json").write_text(json.dumps(result))
    state.wait_for_everyone()
    # The plain copy is back to storage-less placeholders after the evaluation.
    if plain_view.shell is not None:
        assert all(parameter.is_meta for parameter in plain_view.shell.parameters())

    # The loop's weight check spans the shards: a NaN in one process's shard is seen by every process.
    finite = [parameters_finite(policy)]
    if state.process_index == state.num_processes - 1:
        with torch.no_grad():
            next(policy.parameters()).to_local().view(-1)[-1] = float("nan")
    finite.append(parameters_finite(policy))
    (args.output / f"finite-{state.process_index}.json").write_text(json.dumps(finite))
    # As the trainers' accelerator.end_training() does: a process that exits with its gloo group alive can abort
    # in the group's teardown (std::terminate, SIGABRT of one rank; seen once in CI).
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
