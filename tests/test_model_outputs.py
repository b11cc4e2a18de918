"""What a diffusion run leaves for people: final/ as a pipeline folder (full) or a LoRA file, its config.yaml with
provenance, its model card, checkpoints exported by `diffalign export` or evaluated directly, EMA exports, and
run.push_to_hub refused offline."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from helpers import diffusion_config
from huggingface_hub import ModelCard
from peft import LoraConfig
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import load_config, to_dict
from diffalign.diffusion.export import link_tree
from diffalign.diffusion.trainer import train
from diffalign.provenance import hub_references

ROOT = Path(__file__).resolve().parents[1]
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
EVAL = {"prompts": ["a red circle", "a blue square"], "num_inference_steps": 2, "reward": "toy_t2i"}

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def sample(pipeline, seed: int = 0) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipeline("a red circle", num_inference_steps=2, generator=generator, output_type="pt").images


def unet_with(model_dir: Path, weights: dict[str, torch.Tensor], lora: dict | None = None) -> UNet2DConditionModel:
    """The tiny U-Net holding a checkpoint's weights, built here as the trainer builds it."""
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    if lora is not None:
        unet.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"]))
    result = unet.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and set(weights) <= set(unet.state_dict())
    return unet.eval()


def test_a_full_fine_tune_writes_a_pipeline_folder_with_provenance_and_a_card(sd_dir, pairs_file, tmp_path, monkeypatch):
    # Run from the models' folder with relative paths, as a user would from a repository.
    monkeypatch.chdir(sd_dir.parent)
    run = tmp_path / "run"
    config = diffusion_config(
        Path("sd"), pairs_file, run, steps=2, model={"trainable": "full"}, eval=EVAL, run={"checkpoint_every": 1}
    )
    metrics = train(config)
    final = run / "final"

    pipeline = DiffusionPipeline.from_pretrained(final, safety_checker=None)
    assert isinstance(pipeline, StableDiffusionPipeline)
    trained = load_file(checkpoint(run, 2) / "trainable.safetensors")
    state = pipeline.unet.state_dict()
    assert all(torch.equal(state[name], value) for name, value in trained.items())
    # The loaded folder samples what the base pipeline with the trained U-Net samples.
    base = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    reference = sample(base)
    base.unet = unet_with(sd_dir, trained)
    torch.testing.assert_close(sample(pipeline), sample(base), rtol=0, atol=1e-6)
    assert (sample(pipeline) - reference).abs().max() > 1e-4

    # Untouched weights are hard links to the base's; configs are copies (editing them leaves the base alone).
    for weights in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert os.stat(final / weights).st_ino == os.stat(sd_dir / weights).st_ino
    for small in ("text_encoder/config.json", "tokenizer/vocab.json", "model_index.json"):
        assert (final / small).read_bytes() == (sd_dir / small).read_bytes()
        assert os.stat(final / small).st_ino != os.stat(sd_dir / small).st_ino

    saved = yaml.safe_load((final / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(sd_dir.resolve())
    assert saved["data"]["source"] == str(pairs_file.resolve())
    provenance = saved["provenance"]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance["git_commit"] == commit and isinstance(provenance["git_dirty"], bool)
    assert provenance["diffalign_version"] == importlib.metadata.version("diffalign")
    assert provenance["libraries"]["diffusers"] == importlib.metadata.version("diffusers")
    assert provenance["working_directory"] == str(sd_dir.parent) and "exported" not in provenance
    reloaded = load_config(final / "config.yaml")  # the provenance is no setting: the config loads as it is
    assert reloaded.model.pretrained == str(sd_dir.resolve()) and reloaded.model.trainable == "full"

    card = ModelCard.load(final / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model is None  # a local base is named in the text, not as a hub id
    assert {"diffalign", "dpo", "sigmoid", "full-fine-tune"} <= set(card.data.tags)
    assert f"`{sd_dir.resolve()}`" in card.text and "sigmoid, β = 5000.0" in card.text
    assert "| optimizer steps | 2, each on 2 examples (batch 2 × accumulation 1 × 1 processes) |" in card.text
    assert "| hardware | 1 × CPU, mixed precision no |" in card.text
    assert f"| win_rate | {metrics['eval/win_rate']:.4f} |" in card.text
    assert "DiffusionPipeline.from_pretrained(FOLDER)" in card.text

    # The step-1 checkpoint exports to the same layout, holding the step-1 weights.
    exported = tmp_path / "step-1"
    assert main(["export", str(checkpoint(run, 1)), str(exported)]) == 0
    step_1 = load_file(checkpoint(run, 1) / "trainable.safetensors")
    unet = UNet2DConditionModel.from_pretrained(exported / "unet")
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in step_1.items())
    assert not all(torch.equal(step_1[name], trained[name]) for name in trained)
    assert isinstance(DiffusionPipeline.from_pretrained(exported, safety_checker=None), StableDiffusionPipeline)
    exported_card = ModelCard.load(exported / "README.md")
    assert "| optimizer steps | 1, each" in exported_card.text and "## Evaluation" not in exported_card.text
    exported_config = yaml.safe_load((exported / "config.yaml").read_text())
    assert exported_config["model"]["pretrained"] == str(sd_dir.resolve())
    assert exported_config["provenance"]["git_commit"] == commit and "exported" in exported_config["provenance"]


def card_on_a_full_disk(folder: Path, *args, **kwargs) -> None:
    (folder / "README.md").write_text("half a card")
    raise OSError(28, "No space left on device")


def test_a_lora_checkpoint_exports_and_evaluates_at_its_trained_strength(sd_dir, pairs_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    lora_run = {"model": {"lora": LORA}, "optim": {"lr": 0.05}, "run": {"checkpoint_every": 1}}
    train(diffusion_config(sd_dir, pairs_file, run, steps=2, **lora_run))
    exported = tmp_path / "exported"
    # A disk that fills while the card is written leaves no folder that looks exported, and a retry succeeds.
    with monkeypatch.context() as patch:
        patch.setattr("diffalign.export.describe_folder", card_on_a_full_disk)
        with pytest.raises(OSError, match="No space left"):
            main(["export", str(checkpoint(run, 1)), str(exported)])
    assert not exported.exists() and not list(tmp_path.glob(".exported*"))
    assert main(["export", str(checkpoint(run, 1)), str(exported)]) == 0
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.yaml", "pytorch_lora_weights.safetensors"]

    pipeline = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipeline.load_lora_weights(exported)
    trained = unet_with(sd_dir, load_file(checkpoint(run, 1) / "trainable.safetensors"), LORA)
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 16, 16, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            pipeline.unet(latents, 500, text).sample, trained(latents, 500, text).sample, rtol=1e-5, atol=1e-6
        )
    card = ModelCard.load(exported / "README.md")
    assert "lora" in card.data.tags and "LoRA rank 4, alpha 8.0, on to_k, to_q, to_v, to_out.0" in card.text
    assert "pipeline.load_lora_weights(FOLDER)" in card.text

    # `diffalign eval` takes the checkpoint itself and samples what the exported LoRA samples.
    reports = {}
    for name, aligned in (("checkpoint", checkpoint(run, 1)), ("exported", exported)):
        settings = {
            "kind": "eval",
            "model": {"aligned": str(aligned)},
            "prompts": {"source": str(tmp_path / "prompts.txt")},
            "generation": {"num_inference_steps": 2, "batch_size": 2},
            "scorers": [{"name": "toy_t2i"}],
            "report": {"output_dir": str(tmp_path / f"report-{name}"), "grid_prompts": 2},
        }
        (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(settings))
        assert main(["eval", str(tmp_path / f"{name}.yaml")]) == 0
        reports[name] = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())
    assert reports["checkpoint"]["aligned_kind"] == "checkpoint" and reports["exported"]["aligned_kind"] == "lora"
    assert reports["checkpoint"]["base_model"] == str(sd_dir.resolve())
    for role in ("base", "aligned"):
        assert [s["scores"]["toy_t2i"][role] for s in reports["checkpoint"]["samples"]] == pytest.approx(
            [s["scores"]["toy_t2i"][role] for s in reports["exported"]["samples"]], abs=1e-6
        )

    with pytest.raises(FileExistsError, match="not empty"):
        main(["export", str(checkpoint(run, 2)), str(exported)])


def test_a_run_with_ema_exports_the_average_and_the_raw_weights_on_request(sd_dir, pairs_file, tmp_path):
    run = tmp_path / "run"
    train(
        diffusion_config(
            sd_dir, pairs_file, run, model={"lora": LORA}, optim={"lr": 0.05},
            run={"max_steps": 3, "checkpoint_every": 3, "ema": {"decay": 0.5, "every": 1}},
        )
    )
    average = load_file(checkpoint(run, 3) / "ema.safetensors")
    raw = load_file(checkpoint(run, 3) / "trainable.safetensors")
    assert any(not torch.equal(average[name], raw[name]) for name in raw)

    def as_lora_file(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"unet." + name.replace(".default.", "."): value for name, value in weights.items()}

    final = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert final.keys() == as_lora_file(average).keys()
    assert all(torch.equal(final[name], value) for name, value in as_lora_file(average).items())
    assert main(["export", str(checkpoint(run, 3)), str(tmp_path / "ema")]) == 0
    assert main(["export", "--raw-weights", str(checkpoint(run, 3)), str(tmp_path / "raw")]) == 0
    for folder, expected in (("ema", average), ("raw", raw)):
        written = load_file(tmp_path / folder / "pytorch_lora_weights.safetensors")
        assert all(torch.equal(written[name], value) for name, value in as_lora_file(expected).items())
    assert "| weights | EMA, decay 0.5 every 1 steps |" in ModelCard.load(run / "final" / "README.md").text


def test_push_to_hub_is_refused_offline_before_any_model_loads(sd_dir, pairs_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = diffusion_config(sd_dir, pairs_file, tmp_path / "run", run={"push_to_hub": True, "hub_repo_id": "me/tiny"})
    path = tmp_path / "push.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert "run.push_to_hub is true but the Hub is off limits (HF_HUB_OFFLINE is set)" in error
    assert "hf upload me/tiny" in error
    assert not (tmp_path / "run").exists()  # refused before the run started

    assert main(["train", str(path), "run.hub_repo_id=null"]) == 2
    assert "run.push_to_hub is true but run.hub_repo_id is empty" in capsys.readouterr().err
    assert main(["train", str(path), "run.hub_repo_id=no-slash"]) == 2
    assert "run.hub_repo_id must look like 'user/name'" in capsys.readouterr().err


def test_hub_revisions_come_from_the_local_cache_and_cached_files_are_linked(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "a" * 40
    repo = tmp_path / "cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    blob = repo / "blobs" / "0123"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snapshot = repo / "snapshots" / commit / "text_encoder"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    config = {"model": {"pretrained": "org/tiny", "vae": "org/not-cached"}, "loss": {"type": ["sigmoid"]}}
    assert hub_references(config) == {"model.pretrained": {"repo_id": "org/tiny", "revision": commit}}
    # A cached weight file is a link into the blob store: the pipeline folder links the blob itself.
    link_tree(repo / "snapshots" / commit, tmp_path / "final")
    linked = tmp_path / "final" / "text_encoder" / "model.safetensors"
    assert not linked.is_symlink() and os.stat(linked).st_ino == os.stat(blob).st_ino


def test_a_push_needs_a_token_and_uploads_the_folder_through_the_hub_client(tmp_path, monkeypatch):
    """The push itself against a stand-in for huggingface_hub's client: nothing remote is contacted."""
    import huggingface_hub

    from diffalign.config import ConfigError
    from diffalign.hub import check_push_possible, push_folder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("diffalign.hub.hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token is set.*hf auth login"):
        check_push_possible("me/tiny")

    calls: list[tuple] = []

    class Client:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, folder_path, commit_message))

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", Client)
    assert push_folder(tmp_path, "me/tiny", private=True, message="step 3") == "https://huggingface.co/me/tiny"
    assert calls == [("create_repo", "me/tiny", True, True), ("upload_folder", "me/tiny", str(tmp_path), "step 3")]

    class Failing(Client):
        def upload_folder(self, repo_id, folder_path, commit_message):
            raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    with pytest.raises(RuntimeError, match=f"the folder is complete, upload it with `hf upload me/tiny {tmp_path}`"):
        push_folder(tmp_path, "me/tiny", private=True, message="step 3")


def test_git_provenance_is_read_only_at_the_top_of_a_checkout(tmp_path):
    from diffalign.provenance import git_state

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(ROOT)[0] == commit
    # A package installed below a checkout (a virtual environment inside a repository) records no commit.
    assert git_state(ROOT / "diffalign") == (None, None)
    assert git_state(tmp_path) == (None, None)
