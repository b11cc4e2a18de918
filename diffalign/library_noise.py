"""Library messages that mean nothing for diffalign's use, silenced once at import (each named exactly, so that
anything else those libraries say still shows):

- diffusers' ``ModelMixin.to(dtype)`` warns "There are modules in X that should be kept in float32: []" on every
  cast, also when the list is empty (``_keep_in_fp32_modules or []`` is never None); with modules listed the
  warning stays, since then it does mean something.
- diffusers' ``load_config`` passes ``local_dir_use_symlinks`` to huggingface_hub, which warns that it is deprecated
  and ignored whenever a config comes from a hub id.
- diffusers marks ``MusicLDMPipeline`` deprecated (no fixes in later releases) and says so each time one is built;
  the MusicLDM family builds one only to sample, and its tests pin what it computes.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_library_noise() -> None:
    """Install the filters (idempotent: a filter already installed is not added again)."""
    drops = {
        "diffusers.models.modeling_utils": _DropMessages("that should be kept in float32: []."),
        "diffusers.pipelines.pipeline_utils": _DropMessages("The MusicLDMPipeline has been deprecated"),
    }
    for name, drop in drops.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(drop)
    warnings.filterwarnings(
        "ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning
    )
