"""Hub access on loopback only: an endpoint that accepts connections and never answers, one that answers with
hub errors, an unresolvable one, and HF_HUB_OFFLINE=1. Every case ends in seconds with a LoadError naming the
config key, the value, the endpoint and the offline fix; nothing hangs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants

from diffalign.config import LoadError
from diffalign.hub import check_source, loading

ROOT = Path(__file__).resolve().parents[1]
# Far above the few seconds these take with the 2 s hub timeouts set below; reached only by a hang.
HANG = 240


class SilentEndpoint:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.server.close()


@pytest.fixture
def silent_endpoint() -> Iterator[SilentEndpoint]:
    endpoint = SilentEndpoint()
    yield endpoint
    endpoint.close()


class HubErrors(BaseHTTPRequestHandler):
    """Answers every API request as the hub does for a missing (404) or gated (403) repository."""

    def do_GET(self) -> None:
        gated = "gated" in self.path
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": "gated" if gated else "Repository not found"}).encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def erroring_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubErrors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode, short hub timeouts and an empty hub cache of our own."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def use_endpoint(monkeypatch, url: str) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", url)


def run_cli(*arguments: str, endpoint: str, cache: Path):
    """``diffalign ...`` online against ``endpoint``, with 2 s hub timeouts and an empty hub cache."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        HF_ENDPOINT=endpoint, HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2", OMP_NUM_THREADS="1"
    )
    env["HF_HUB_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "diffalign", *arguments], env=env, capture_output=True, text=True, timeout=HANG
    )


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_request_made_without_a_timeout_is_bounded(silent_endpoint):
    # transformers' tokenizers call model_info with no timeout; the hub's client has none either.
    code = (
        "from diffalign.hub import bound_hub_timeouts; bound_hub_timeouts()\n"
        "from huggingface_hub import HfApi\n"
        "try:\n    HfApi().model_info('org/name')\nexcept Exception as error:\n    print(type(error).__name__)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": silent_endpoint.url, "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG
    )
    assert result.stdout.strip() == "ReadTimeout", result.stderr[-2000:]


def test_a_silent_endpoint_fails_the_llm_trainer_in_one_line_naming_key_endpoint_and_fix(
    silent_endpoint, tmp_path
):
    result = run_cli(
        "train",
        str(ROOT / "configs" / "toy_llm_dpo.yaml"),
        "model.pretrained=Qwen/Qwen2.5-0.5B-Instruct",
        f"run.output_dir={tmp_path}",
        endpoint=silent_endpoint.url,
        cache=tmp_path / "cache",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = last_line(result.stderr)
    assert message.startswith("load error: model.pretrained='Qwen/Qwen2.5-0.5B-Instruct' is a hub id")
    assert silent_endpoint.url in message and "ReadTimeout" in message
    assert (
        "hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR" in message and "HF_HUB_OFFLINE=1" in message
    )


def test_a_silent_endpoint_fails_the_diffusion_trainer_before_any_retried_download(silent_endpoint, tmp_path):
    result = run_cli(
        "train",
        str(ROOT / "configs" / "toy_dpo.yaml"),
        "model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5",
        f"run.output_dir={tmp_path}",
        endpoint=silent_endpoint.url,
        cache=tmp_path / "cache",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = last_line(result.stderr)
    assert "model.pretrained='stable-diffusion-v1-5/stable-diffusion-v1-5' is a hub id" in message
    assert silent_endpoint.url in message and "model_index.json" not in message


def test_a_hub_dataset_id_on_a_silent_endpoint_names_data_path(online, monkeypatch, silent_endpoint):
    from diffalign.llm.data import read_rows

    use_endpoint(monkeypatch, silent_endpoint.url)
    with pytest.raises(LoadError) as error:
        read_rows("trl-lib/ultrafeedback_binarized", key="data.path")
    message = str(error.value)
    assert message.startswith("data.path='trl-lib/ultrafeedback_binarized' is a hub id")
    assert silent_endpoint.url in message and "ReadTimeout" in message
    assert "hf download trl-lib/ultrafeedback_binarized --repo-type dataset" in message


def test_offline_nothing_is_asked_of_the_endpoint(online, monkeypatch, silent_endpoint):
    from diffalign.llm.config import LLMModelConfig
    from diffalign.llm.model import load_tokenizer

    use_endpoint(monkeypatch, silent_endpoint.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError) as error:
        load_tokenizer(LLMModelConfig(pretrained="Qwen/Qwen2.5-0.5B-Instruct"))
    message = str(error.value)
    assert "model.pretrained='Qwen/Qwen2.5-0.5B-Instruct': HF_HUB_OFFLINE is set" in message
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in message
    assert silent_endpoint.connections == []


def test_an_unresolvable_endpoint_fails_with_the_endpoint_and_the_fix(online, monkeypatch):
    use_endpoint(monkeypatch, "http://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(LoadError) as error:
        check_source("model.pretrained", "org/model")
    message = str(error.value)
    assert "model.pretrained='org/model' is a hub id" in message and "http://hub.invalid" in message
    assert "ConnectError" in message and "set model.pretrained=DIR" in message


def test_a_missing_repository_and_a_gated_one_say_so(online, monkeypatch, erroring_endpoint):
    use_endpoint(monkeypatch, erroring_endpoint)
    with pytest.raises(
        LoadError, match=r"data.source='org/pairs' is not a local path, and .* has no dataset"
    ):
        check_source("data.source", "org/pairs", "dataset")
    with pytest.raises(LoadError, match=r"model.pretrained='org/gated-model' is gated .*hf auth login"):
        check_source("model.pretrained", "org/gated-model")


def test_offline_a_cached_repository_passes_and_an_uncached_one_is_refused(online, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    check_source("model.pretrained", "org/cached")
    with pytest.raises(LoadError, match=r"model.pretrained='org/other': HF_HUB_OFFLINE is set"):
        check_source("model.pretrained", "org/other")


def test_local_paths_are_checked_without_the_hub(tmp_path):
    check_source("model.pretrained", str(tmp_path))
    with pytest.raises(LoadError, match="no such file or directory"):
        check_source("model.pretrained", str(tmp_path / "missing"))
    with pytest.raises(LoadError, match="neither an existing local path nor a hub id"):
        check_source("model.pretrained", "org/name/with/slashes")


def test_a_failed_load_becomes_one_line_naming_key_value_and_fix(tmp_path):
    with pytest.raises(LoadError) as error, loading("model.pretrained", str(tmp_path), "diffusers pipeline"):
        raise OSError(f"{tmp_path} does not appear to have a file named model_index.json.\nSecond line.")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"model.pretrained={str(tmp_path)!r}: cannot load the diffusers pipeline (OSError:"
    )
    assert "point model.pretrained at a complete diffusers pipeline" in message


def test_a_reward_that_cannot_be_loaded_names_the_config_key_that_asked_for_it(tmp_path, monkeypatch):
    from diffalign.eval.scoring import ScoringConfig, build_with_reference

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoadError) as error:
        build_with_reference(ScoringConfig(name="pickscore"), "cpu", where="scorers[0]")
    message = str(error.value)
    assert message.startswith("scorers[0]: ") and "yuvalkirstain/PickScore_v1" in message
    assert "hf download yuvalkirstain/PickScore_v1" in message
