"""The library messages diffalign silences are exactly the meaningless ones; their meaningful variants still show."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from diffusers import AutoencoderKL

from diffalign.library_noise import silence_library_noise


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records_of():
    attached = []

    def attach(name: str) -> Records:
        handler = Records()
        logging.getLogger(name).addHandler(handler)
        attached.append((name, handler))
        return handler

    yield attach
    for name, handler in attached:
        logging.getLogger(name).removeHandler(handler)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        norm_num_groups=8,
        latent_channels=4,
    )


def test_a_cast_with_no_fp32_modules_is_silent_and_one_with_some_still_warns(records_of):
    records = records_of("diffusers.models.modeling_utils")
    vae = tiny_vae()
    vae.to(dtype=torch.float16)
    assert not any("should be kept in float32" in message for message in records.messages), records.messages
    vae._keep_in_fp32_modules = ["decoder"]
    vae.to(dtype=torch.float32)
    assert any("should be kept in float32: ['decoder']" in message for message in records.messages)


def test_only_the_musicldm_deprecation_notice_is_dropped(records_of):
    records = records_of("diffusers.pipelines.pipeline_utils")
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.warning(
        "The MusicLDMPipeline has been deprecated and will not receive bug fixes or feature updates."
    )
    logger.warning(
        "The AudioLDMPipeline has been deprecated and will not receive bug fixes or feature updates."
    )
    assert records.messages == [
        "The AudioLDMPipeline has been deprecated and will not receive bug fixes or feature updates."
    ]


def test_the_ignored_local_dir_use_symlinks_argument_does_not_warn(tmp_path, monkeypatch):
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        # Again inside: pytest restores the warning filters after collecting, where `import diffalign` set them.
        silence_library_noise()
        with pytest.raises(
            LocalEntryNotFoundError
        ):  # nothing is cached: only the argument check matters here
            hf_hub_download(
                "org/name", "model_index.json", local_files_only=True, local_dir_use_symlinks="auto"
            )
        warnings.warn("another user warning", UserWarning, stacklevel=1)
    messages = [str(warning.message) for warning in caught]
    assert not any("local_dir_use_symlinks" in message for message in messages), messages
    assert "another user warning" in messages
