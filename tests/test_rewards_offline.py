"""Offline behaviour: with HF_HUB_OFFLINE=1 a missing weight is a clear, fast error naming the file and where to
put it; a cached hub id loads; the optional laion-clap / open_clip / ImageReward packages are never imported by
``import diffalign.rewards``, and laion-clap (which downloads at import) fails cleanly instead of hanging."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import random_images
from huggingface_hub import constants
from tiny_pipelines import save_tiny_clip

from diffalign.rewards import WeightsNotFoundError, build_scorer

FAKE_COMMIT = "0" * 40

PROMPTS = ["a red dog", "photo of a blue square"]  # words of the tiny CLIP's vocabulary


def put_in_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay ``files`` out as the hub cache does after ``hf download repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 with an empty hub cache of our own."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def run_python(code: str, cache: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_hub_id_missing_offline_fails_fast_and_says_what_to_download(offline_cache):
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        build_scorer("pickscore")
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "yuvalkirstain/PickScore_v1" in message
    assert (
        "hf download yuvalkirstain/PickScore_v1 --local-dir DIR" in message and str(offline_cache) in message
    )
    assert time.monotonic() - start < 10


def test_a_hub_file_missing_offline_names_repo_and_file(offline_cache):
    with pytest.raises(
        WeightsNotFoundError, match=r"HPS_v2_compressed\.pt of xswu/HPSv2 is not in the hub cache"
    ):
        build_scorer("hpsv2")


def test_a_cached_hub_id_loads_offline(offline_cache, tmp_path):
    put_in_hub_cache(offline_cache, "tiny-org/tiny-clip", save_tiny_clip(tmp_path / "clip"))
    with torch.no_grad():
        from_hub = build_scorer("clip_t", model="tiny-org/tiny-clip")(random_images(2), PROMPTS[:2])
        from_path = build_scorer("clip_t", model=str(tmp_path / "clip"))(random_images(2), PROMPTS[:2])
    torch.testing.assert_close(from_hub, from_path)


def test_online_fetches_configs_and_only_the_preferred_weights(tmp_path, monkeypatch):
    from fnmatch import fnmatch

    from diffalign.rewards import weights

    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    names = [
        "config.json",
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
        "tf_model.h5",
    ]
    for name in names:
        (remote / name).write_text(name)

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        assert repo_id == "org/model" and not local_files_only
        for path in remote.iterdir():
            if any(fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, local / path.name)
        return str(local)

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(weights, "check_hub_repo", lambda repo_id, **_: None)  # no hub to ask here
    directory = weights.resolve_pretrained_dir(
        "org/model", weights.MODEL_FILES, "model", weights.TRANSFORMERS_WEIGHTS
    )
    assert sorted(path.name for path in directory.iterdir()) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "vocab.json",
    ]


def test_an_incomplete_local_directory_names_the_missing_file(tmp_path):
    directory = save_tiny_clip(tmp_path / "clip")
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsNotFoundError, match=r"clip lacks preprocessor_config\.json"):
        build_scorer("clip_score", model=str(directory))
    with pytest.raises(WeightsNotFoundError, match=r"no file at /nonexistent/head\.pth"):
        build_scorer("aesthetic", head="/nonexistent/head.pth", model=str(directory))
    with pytest.raises(WeightsNotFoundError, match="is not a directory"):
        build_scorer("clip_score", model=str(tmp_path / "nowhere"))


def test_image_reward_needs_its_checkpoint_and_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="image_reward needs `checkpoint`"):
        build_scorer("image_reward")
    checkpoint = tmp_path / "ImageReward.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(WeightsNotFoundError, match="med_config.json beside its checkpoint"):
        build_scorer("image_reward", checkpoint=str(checkpoint))
    (tmp_path / "med_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as if the package were not installed
    with pytest.raises(ImportError, match="pip install image-reward"):
        build_scorer("image_reward", checkpoint=str(checkpoint))


def test_laion_clap_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(
        WeightsNotFoundError, match=r"laion-clap checkpoint: no file at .*630k-audioset-best\.pt"
    ):
        build_scorer("clap_score", encoder="laion_clap", checkpoint=str(tmp_path / "630k-audioset-best.pt"))
    with pytest.raises(ValueError, match="laion_clap needs `checkpoint`"):
        build_scorer("clap_score", encoder="laion_clap")


def test_importing_rewards_imports_no_optional_backend(tmp_path):
    result = run_python(
        """
        import sys
        import diffalign.rewards
        print(sorted(m for m in ("laion_clap", "clap_module", "open_clip", "ImageReward") if m in sys.modules))
        """,
        tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_laion_clap_offline_without_its_hub_files_is_a_clear_error_not_a_hang(tmp_path):
    # laion-clap loads roberta-base, bert-base-uncased and bart-base tokenizers by name at import; offline and
    # uncached, transformers would quietly build empty tokenizers (or, online without a network, wait).
    checkpoint = tmp_path / "630k-audioset-best.pt"
    checkpoint.write_bytes(b"")
    result = run_python(
        f"""
        import sys
        from diffalign.rewards import WeightsNotFoundError, build_scorer
        try:
            build_scorer("clap_score", encoder="laion_clap", checkpoint={str(checkpoint)!r})
        except WeightsNotFoundError as error:
            print("ERROR", error)
        print("laion_clap imported:", "laion_clap" in sys.modules)
        """,
        tmp_path / "empty-cache",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR laion-clap loads hub files by name and HF_HUB_OFFLINE is set" in result.stdout
    assert "roberta-base/config.json" in result.stdout and "hf download REPO" in result.stdout
    assert "laion_clap imported: False" in result.stdout


@pytest.mark.slow
def test_laion_clap_backend_scores_offline_with_cached_hub_files(tmp_path):
    """End to end with stand-ins for the hub files laion-clap needs (a 1-layer roberta-base, tiny tokenizers)
    and a checkpoint of the randomly initialised CLAP: cosine scores, batch invariance, resampling."""
    result = run_python(
        f"""
        import json, shutil
        from pathlib import Path
        import torch
        from transformers import BertTokenizer, RobertaConfig, RobertaModel, RobertaTokenizer

        root, cache = Path({str(tmp_path)!r}), Path({str(tmp_path / "hub")!r})

        def put(repo_id, files):
            repo = cache / ("models--" + repo_id.replace("/", "--"))
            shutil.copytree(files, repo / "snapshots" / {FAKE_COMMIT!r})
            (repo / "refs").mkdir(parents=True)
            (repo / "refs" / "main").write_text({FAKE_COMMIT!r})

        bpe = root / "bpe"
        bpe.mkdir()
        vocab = {{token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}}
        for letter in "abcdefghijklmnopqrstuvwxyz":
            vocab[letter] = len(vocab)
            vocab["Ġ" + letter] = len(vocab)
        (bpe / "vocab.json").write_text(json.dumps(vocab))
        (bpe / "merges.txt").write_text("#version: 0.2\\n")
        RobertaTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt")).save_pretrained(bpe)
        put("facebook/bart-base", bpe)
        # laion-clap's text projection expects roberta-base's width, 768.
        config = RobertaConfig(vocab_size=len(vocab), hidden_size=768, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=80)
        RobertaModel(config).save_pretrained(bpe)
        put("roberta-base", bpe)
        wordpiece = root / "wordpiece"
        wordpiece.mkdir()
        (wordpiece / "vocab.txt").write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\\n")
        BertTokenizer(str(wordpiece / "vocab.txt")).save_pretrained(wordpiece)
        put("bert-base-uncased", wordpiece)

        import laion_clap
        import torch.nn.functional as F
        from diffalign.rewards import Audio, build_scorer

        torch.manual_seed(0)
        clap = laion_clap.CLAP_Module(enable_fusion=False, device="cpu")
        state = clap.model.state_dict()
        state["text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # laion-clap deletes this key
        torch.save({{"state_dict": state}}, root / "clap.pt")

        scorer = build_scorer("clap_score", encoder="laion_clap", checkpoint=str(root / "clap.pt"))
        prompts = ["a dog", "rain"]
        audio = Audio(0.3 * torch.randn(2, 48_000, generator=torch.Generator().manual_seed(1)), 48_000)
        with torch.no_grad():
            scores = scorer(audio, prompts)
            single = torch.cat([scorer(audio[i : i + 1], prompts[i : i + 1]) for i in range(2)])
            clap.eval()
            expected = (F.normalize(clap.get_audio_embedding_from_data(audio.waveforms, use_tensor=True), dim=-1)
                        * F.normalize(clap.get_text_embedding(prompts, use_tensor=True), dim=-1)).sum(1)
        torch.testing.assert_close(scores, single, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
        assert scores.shape == (2,) and bool((scores.abs() <= 1).all())
        print("OK", scores.tolist())
        """,
        tmp_path / "hub",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_the_shipped_toy_clip_scores_with_its_transformers_5_processor_file():
    """The toy CLIP was saved by transformers 5, whose processor_config.json holds the image settings."""
    from diffalign.toy import t2i

    clip_dir = Path(__file__).resolve().parents[1] / "assets" / "toy-t2i" / "clip"
    assert not (clip_dir / "preprocessor_config.json").exists()
    scorer = build_scorer("clip_score", model=str(clip_dir))
    images = torch.stack(
        [t2i.render_scene(shape, colour, "large", centre=(0.5, 0.5)) for shape, colour in [("circle", "red"), ("square", "blue")]]
    )
    circle, square = scorer(images, ["a large red circle"] * 2), scorer(images, ["a large blue square"] * 2)
    assert circle[0] > circle[1] and square[1] > square[0]
