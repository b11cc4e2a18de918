"""LoRA settings (``model.lora:``) shared by both trainers, and the peft config they describe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class LoraSettings:
    """A LoRA adapter: ``W + (alpha / rank)·B·A`` on every module named in ``target_modules``.

    ``alpha: null`` means alpha = rank (scale 1), in every trainer. ``target_modules: [all-linear]`` is peft's
    shorthand for every linear layer except the output head. ``init``: ``gaussian`` draws A from N(0, 1/rank) as
    the diffusers training examples do; ``default`` is peft's Kaiming-uniform A. B starts at zero either way, so
    the adapted model starts equal to the base.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0 (or null: alpha = rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be a probability in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty; give module names or [all-linear]")

    def peft_config(self, **extra: Any) -> Any:
        """The ``peft.LoraConfig`` of these settings (``extra``: e.g. ``task_type``)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            target_modules="all-linear" if self.target_modules == ["all-linear"] else self.target_modules,
            init_lora_weights="gaussian" if self.init == "gaussian" else True,
            **extra,
        )
