"""Reference log-probs: from a frozen copy, from the policy with its adapter disabled, or precomputed and cached.

Precomputed log-probs come from one pass of the initial model over the training data before the first update
(as TRL's ``precompute_ref_log_probs``). They are cached under a key hashed from the model's weights and
config, the tokenizer and the tokenized data, so a rerun on the same inputs reads them back, and any change to
the model, the tokenizer, the data or the truncation settings computes them afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.files import read_cache_file, save_tensors_atomically
from diffalign.hashing import ContentHash
from diffalign.llm.batching import PreferenceDataset
from diffalign.llm.data import tokenizer_fingerprint
from diffalign.llm.logprobs import RowLayout, TokenLogps, completion_logps, completion_token_logps
from diffalign.progress import progress

logger = logging.getLogger("diffalign")


class ModelReference:
    """Reference log-probs from a model: a frozen copy, or the PEFT policy with its adapter switched off."""

    def __init__(self, model: nn.Module, *, adapter_disabled: bool, layout: RowLayout = "padded") -> None:
        self.model = model
        self.adapter_disabled = adapter_disabled
        self.layout = layout  # model.layout: how the rows go through the model

    def _context(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter() if self.adapter_disabled else contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        with self._context():
            logps, _ = completion_logps(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"],
                layout=self.layout,
            )
        return logps

    @torch.no_grad()
    def tokens(
        self, batch: dict[str, Tensor], *, keep_logits: bool = False, temperature: float = 1.0
    ) -> TokenLogps:
        """Per-token reference log-probs of the batch's rows (and the logits, for TDPO's KL), of
        ``softmax(logits / temperature)``."""
        with self._context():
            return completion_token_logps(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"],
                keep_logits=keep_logits,
                temperature=temperature,
                layout=self.layout,
            )


def precomputed_reference(batch: dict[str, Tensor]) -> Tensor:
    """The reference log-probs the dataset attached to the batch (see ``load_or_precompute``)."""
    return batch["reference_logps"]


# --- precomputing and caching ----------------------------------------------------------------------------------


def reference_cache_key(model: nn.Module, tokenizer: Any, dataset: PreferenceDataset) -> str:
    """A content hash of the model (class, config and every weight), the tokenizer and the tokenized rows."""
    digest = ContentHash().update_module(model)
    digest.update(tokenizer_fingerprint(tokenizer))
    rows = [vars(item) for item in dataset.items]
    digest.update(json.dumps([dataset.with_mismatched, rows], sort_keys=True))
    return digest.hexdigest()


@torch.no_grad()
def precompute_reference_logps(
    model: nn.Module, dataset: PreferenceDataset, batch_size: int, layout: RowLayout = "padded"
) -> Tensor:
    """``[N, k]`` summed completion log-probs of every item's k rows (chosen and rejected, or completion and
    mismatched completion), in dataset order; ``layout`` as in training (``model.layout``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    columns = []
    for start in progress(range(0, len(dataset), batch_size), desc="reference log-probs", unit="batch"):
        batch = dataset.collate(list(range(start, min(start + batch_size, len(dataset)))))
        logps, _ = completion_logps(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["completion_mask"].to(device),
            layout=layout,
        )
        # Rows are [first of every item; second of every item]: fold into one row per item.
        columns.append(logps.float().cpu().view(-1, len(batch["index"])).T)
    model.train(was_training)
    return torch.cat(columns)


def load_or_precompute(
    model: nn.Module,
    tokenizer: Any,
    dataset: PreferenceDataset,
    *,
    cache_dir: str | Path,
    batch_size: int,
    accelerator: Any,
    layout: RowLayout = "padded",
) -> Tensor:
    """The reference log-probs of ``dataset`` under ``model`` (the initial policy), from the cache or computed.

    The main process computes and writes the cache; the others read it.
    """
    path = Path(cache_dir) / f"{reference_cache_key(model, tokenizer, dataset)}.safetensors"
    cached = path.is_file()
    if not cached and accelerator.is_main_process:
        logger.info("precomputing reference log-probs of %d items into %s", len(dataset), path)
        logps = precompute_reference_logps(model, dataset, batch_size, layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomically({"reference_logps": logps}, path)
    accelerator.wait_for_everyone()
    if cached:
        logger.info("reference log-probs read from the cache %s", path)
    logps = read_cache_file(path)["reference_logps"]
    if logps.shape[0] != len(dataset):
        raise ValueError(
            f"the reference cache {path} has {logps.shape[0]} rows but the data has {len(dataset)}; delete it"
        )
    return logps
