"""The optimizer builder: which AdamW kernel each ``optim.fused`` setting gives, and that they agree."""

import pytest
import torch

from diffalign.config import ConfigError, from_dict
from diffalign.training.config import OptimConfig
from diffalign.training.optim import build_optimizer

INITIAL = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))


def adamw_after_steps(fused: str, steps: int = 5) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    parameter = torch.nn.Parameter(INITIAL.clone())
    optimizer = build_optimizer([parameter], OptimConfig(lr=1e-2, fused=fused), lr=1e-2)
    gradients = torch.Generator().manual_seed(1)
    for _ in range(steps):
        parameter.grad = torch.randn(parameter.shape, generator=gradients)
        optimizer.step()
    return optimizer, parameter.detach()


def test_the_fused_kernel_runs_on_a_cpu_only_when_asked_and_matches_the_loop():
    loop, loop_weights = adamw_after_steps("gpu")  # the default: these parameters are not on a GPU
    fused, fused_weights = adamw_after_steps("always")
    never, never_weights = adamw_after_steps("never")
    assert not loop.defaults["fused"] and fused.defaults["fused"] and not never.defaults["fused"]
    assert torch.equal(loop_weights, never_weights)
    assert (loop_weights - INITIAL).abs().mean() > 1e-3  # the steps moved the weights
    torch.testing.assert_close(fused_weights, loop_weights, rtol=1e-6, atol=1e-6)


def test_the_earlier_boolean_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"optim.fused: True is not allowed; choose one of \['gpu', 'always'"):
        from_dict(OptimConfig, {"fused": True}, prefix="optim.")
