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
from torch import nn


class ReferenceDenoiser:
    def __init__(self, policy: nn.Module, *, frozen_copy: bool, offload_to_cpu: bool = False) -> None:
        self.policy = policy
        self.copy: nn.Module | None = None
        self.offload_to_cpu = offload_to_cpu
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

    @contextmanager
    def use(self, device: torch.device, policy: nn.Module | None = None) -> Iterator[nn.Module]:
        """The reference, ready to call on ``device`` inside this context (gradients off).

        ``policy`` replaces the policy whose adapters are switched off (a LoRA run): evaluation passes the model
        it evaluates, which under FSDP/ZeRO-3 is a plain copy gathered on the main process.
        """
        policy = policy if policy is not None else self.policy
        with torch.no_grad():
            if self.copy is None:
                # diffusers' PEFT integration: the base weights alone are the pretrained model.
                policy.disable_adapters()
                try:
                    yield policy
                finally:
                    policy.enable_adapters()
            elif self.offload_to_cpu:
                self.copy.to(device)
                try:
                    yield self.copy
                finally:
                    self.copy.to("cpu")
            else:
                yield self.copy
