"""Content hashes for the caches (latents, reference errors and log-probs, reward statistics): a key changes
whenever what it stands for would, and only then.

Every part is length-prefixed, so different splits of the same bytes never collide. A module's fingerprint covers
its class, its public config and every parameter and buffer (name, dtype, shape and bytes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import Tensor, nn


class ContentHash:
    """A sha256 fed with length-prefixed parts; ``hexdigest()`` is 32 hex characters."""

    def __init__(self, *parts: str | bytes) -> None:
        self._digest = hashlib.sha256()
        self.update(*parts)

    def update(self, *parts: str | bytes) -> ContentHash:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            self._digest.update(len(data).to_bytes(8, "little"))
            self._digest.update(data)
        return self

    def update_tensor(self, name: str, tensor: Tensor) -> ContentHash:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return self.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}", data)

    def update_module(self, module: nn.Module, skip: Iterable[str] = ()) -> ContentHash:
        """Class, public config (``_*`` keys aside) and every state tensor not named in ``skip``."""
        self.update(type(module).__name__)
        config = getattr(module, "config", None)
        if config is not None:
            settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            public = {key: value for key, value in settings.items() if not key.startswith("_")}
            self.update(json.dumps(public, sort_keys=True, default=str))
        skipped = set(skip)
        for name, tensor in sorted(module.state_dict().items()):
            if name not in skipped:
                self.update_tensor(name, tensor)
        return self

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:32]


def content_hash(*parts: str | bytes) -> str:
    return ContentHash(*parts).hexdigest()


def module_fingerprint(*modules: nn.Module) -> str:
    """The fingerprint of ``modules`` together (see :meth:`ContentHash.update_module`)."""
    digest = ContentHash()
    for module in modules:
        digest.update_module(module)
    return digest.hexdigest()
