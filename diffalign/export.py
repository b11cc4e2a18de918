"""``diffalign export CHECKPOINT OUTPUT_DIR``: a training checkpoint as the model folder ``final/`` would be.

The checkpoint's ``config.yaml`` says which trainer wrote it; that trainer rebuilds the model, loads the
checkpoint's weights (the EMA when the run kept one) and writes them in its final format: a diffusers LoRA file
or pipeline folder, or a transformers model or adapter. ``config.yaml`` (with provenance) and the model card
``README.md`` are written beside them, and the folder can be pushed to the Hub.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from diffalign.files import folder_written_whole
from diffalign.hub import check_push_possible, push_folder
from diffalign.model_card import describe_folder
from diffalign.training.checkpoint_model import read_checkpoint_model

EXPORTERS = {
    "diffusion": "diffalign.diffusion.export:export_checkpoint",
    "llm": "diffalign.llm.model:export_checkpoint",
}


def export_checkpoint(
    checkpoint: Path, output_dir: Path, *, raw_weights: bool = False, hub_repo_id: str | None = None,
    hub_private: bool = True,
) -> Path:
    """Write checkpoint ``checkpoint``'s model into ``output_dir`` (new or empty); returns ``output_dir``."""
    if hub_repo_id is not None:
        check_push_possible(hub_repo_id)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; export into a new or empty folder")
    model = read_checkpoint_model(checkpoint, raw_weights)
    kind = model.config.get("kind")
    if kind not in EXPORTERS:
        raise ValueError(f"{checkpoint}/config.yaml has kind {kind!r}; checkpoints of {sorted(EXPORTERS)} export")
    module_name, function_name = EXPORTERS[kind].split(":")
    title = model.config.get("run", {}).get("run_name") or f"{Path(model.config['run']['output_dir']).name} {checkpoint.name}"
    with folder_written_whole(output_dir) as staging:
        facts = getattr(importlib.import_module(module_name), function_name)(model, staging)
        describe_folder(staging, model.config, facts, model.summary(), title, exported=True)
    if hub_repo_id is not None:
        push_folder(output_dir, hub_repo_id, private=hub_private, message=f"diffalign export of {checkpoint.name}")
    return output_dir
