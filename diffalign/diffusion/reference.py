"""The frozen reference denoiser of a preference loss.

With LoRA the reference is the policy itself with its adapters switched off, so no second copy is held; with a
full fine-tune it is a frozen copy made before training (optionally kept on the CPU and moved in per call).
Either way it runs under ``no_grad`` and is never part of what is trained or saved.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class ReferenceDenoiser:
    def __init__(self, policy: nn.Module, *, frozen_copy: bool, offload_to_cpu: bool = False) -> None:
        self.policy = policy
        self.copy: nn.Module | None = None
        self.offload_to_cpu = offload_to_cpu
        self._policy_adapter_layers: list[BaseTunerLayer] | None = None  # found at the first use
        if frozen_copy:
            self.copy = copy.deepcopy(policy).requires_grad_(False).eval()
            if offload_to_cpu:
                self.copy.to("cpu")

    def offload(self) -> None:
        """Keep the frozen copy on the CPU from now on, moved in per call: for when it is rarely needed (its
        errors were precomputed by the reference cache and only base-model samples still call it)."""
        if self.copy is not None and not self.offload_to_cpu:
            self.offload_to_cpu = True
            self.copy.to("cpu")

    def _adapter_layers(self, policy: nn.Module) -> list[BaseTunerLayer]:
        if policy is not self.policy:  # evaluation's gathered copy: found anew, it is rarely called
            return adapter_layers(policy)
        if self._policy_adapter_layers is None:
            self._policy_adapter_layers = adapter_layers(policy)
        return self._policy_adapter_layers

    @contextmanager
    def use(self, device: torch.device, policy: nn.Module | None = None) -> Iterator[nn.Module]:
        """The reference, ready to call on ``device`` inside this context (gradients off).

        ``policy`` replaces the policy whose adapters are switched off (a LoRA run): evaluation passes the model
        it evaluates, which under FSDP/ZeRO-3 is a plain copy gathered on the main process.
        """
        policy = policy if policy is not None else self.policy
        with torch.no_grad():
            if self.copy is None:
                # The base weights alone are the pretrained model.
                with adapters_disabled(self._adapter_layers(policy)):
                    yield policy
            elif self.offload_to_cpu:
                self.copy.to(device)
                try:
                    yield self.copy
                finally:
                    self.copy.to("cpu")
            else:
                yield self.copy


def adapter_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """The PEFT adapter layers of ``model`` (diffusers' ``add_adapter`` and ``load_lora_adapter`` make them)."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise ValueError(
            "the policy has no PEFT adapters to disable; a full fine-tune needs a frozen reference copy"
        )
    return layers


@contextmanager
def adapters_disabled(layers: list[BaseTunerLayer]) -> Iterator[None]:
    """The model of these adapter layers with its adapters switched off, for calls under ``no_grad``.

    diffusers' ``disable_adapters``/``enable_adapters`` walk every module and have PEFT reset ``requires_grad`` on
    every adapter weight, both ways, which costs more than a small denoiser's forward. Under ``no_grad`` only the
    layers' switch matters, so this flips that alone (the flag PEFT's ``enable_adapters`` sets), leaves
    ``requires_grad`` as training set it, and restores each layer's previous state.
    """
    switched = [layer for layer in layers if not layer.disable_adapters]
    for layer in switched:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in switched:
            layer._disable_adapters = False
