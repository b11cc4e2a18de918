"""Test support shared by the test modules (import as ``from helpers import ...``; tests/ is on the path):
data writers, the run-config builders, a tiny regression recipe and a torchrun launcher. Tiny models come from
``tiny_pipelines``; the test rewards and scorers from ``online_rewards``."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from diffalign.config import from_dict
from diffalign.diffusion.config import DiffusionTrainConfig, MethodConfig
from diffalign.diffusion.data import DiffusionDataConfig
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.models import make_trainable
from diffalign.llm.config import LLMTrainConfig
from diffalign.training import OptimConfig, Recipe, RunConfig, StepOutput, make_accelerator, run_training

TESTS = Path(__file__).resolve().parent
TOY_LLM = TESTS.parent / "assets" / "toy-llm"
CAPTIONS = ["a red circle", "a blue square", "a small green circle", "a large red square"]
RESOLUTION = 16

# --- images and Pick-a-Pic pairs --------------------------------------------------------------------------------


def random_png(rng: np.random.Generator) -> bytes:
    """A 20×18 RGB PNG of uniform noise: an odd size, so resizing and cropping paths are exercised."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (18, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_random_pairs(path: Path, count: int = 8, seed: int = 0) -> Path:
    """``count`` Pick-a-Pic-style rows (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) of random images, the four
    captions in turn and the preferred side alternating, in a parquet file."""
    rng = np.random.default_rng(seed)
    table = {
        "caption": [CAPTIONS[index % len(CAPTIONS)] for index in range(count)],
        "jpg_0": [random_png(rng) for _ in range(count)],
        "jpg_1": [random_png(rng) for _ in range(count)],
        "label_0": [1.0 - index % 2 for index in range(count)],
    }
    pq.write_table(pa.table(table), path)
    return path


def random_image(seed: int, height: int = 20, width: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_bytes(seed: int, height: int = 20, width: int = 30, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_image(seed, height, width)).save(buffer, format=image_format)
    return buffer.getvalue()


def pick_a_pic_columns(count: int, labels: list[float] | None = None) -> dict[str, list]:
    """``count`` rows: caption ``"caption i"``, images from seeds ``i`` and ``1000 + i``, labels 1, 0, 1, ..."""
    return {
        "caption": [f"caption {i}" for i in range(count)],
        "jpg_0": [image_bytes(i) for i in range(count)],
        "jpg_1": [image_bytes(1000 + i) for i in range(count)],
        "label_0": labels if labels is not None else [float(i % 2 == 0) for i in range(count)],
    }


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def data_config(source: Path | str, **overrides) -> DiffusionDataConfig:
    return DiffusionDataConfig(source=str(source), resolution=RESOLUTION, **overrides)


def reference_pixels(data: bytes, resolution: int = RESOLUTION, flip: bool = False) -> torch.Tensor:
    """The official transforms written out with PIL: shorter side to ``resolution`` (bilinear), centre crop,
    optional flip, then (x/255 − 0.5)/0.5."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    if height <= width:
        new_height, new_width = resolution, int(resolution * width / height)
    else:
        new_height, new_width = int(resolution * height / width), resolution
    image = image.resize((new_width, new_height), Image.BILINEAR)
    top, left = round((new_height - resolution) / 2), round((new_width - resolution) / 2)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1)


def random_images(count: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> torch.Tensor:
    """Images on the 0–255 grid, so PIL copies hold exactly the same pixels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, *size), generator=generator).float() / 255


# --- audio-alpaca pairs -----------------------------------------------------------------------------------------

# audio-alpaca's column names, for the data section of a music run.
AUDIO_PAIR_COLUMNS = {
    "caption_column": "prompt",
    "image_0_column": "chosen",
    "image_1_column": "rejected",
    "label_0_column": None,
}


def wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_audio_pairs(path: Path, prompts: list[str], shortest: float, step: float) -> Path:
    """audio-alpaca's schema, a row per prompt: tonal stereo 22.05 kHz winners, noisy mono 16 kHz losers, the
    ``i``-th pair ``shortest + i·step`` seconds long."""
    rng = np.random.default_rng(0)
    chosen, rejected = [], []
    for number in range(len(prompts)):
        seconds = shortest + step * number
        time = np.arange(round(seconds * 22_050)) / 22_050
        note = 0.3 * np.sin(2 * np.pi * (220 + 40 * number) * time)
        chosen.append({"bytes": wav(np.stack([note, 0.5 * note], axis=1), 22_050), "path": f"w{number}.wav"})
        noise = 0.2 * rng.standard_normal(round(seconds * 16_000))
        rejected.append({"bytes": wav(noise, 16_000), "path": f"l{number}.wav"})
    return write_parquet(path, {"prompt": list(prompts), "chosen": chosen, "rejected": rejected})


# --- run configs ------------------------------------------------------------------------------------------------


def merged(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, nested dicts key by key (a copy: neither argument changes)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both_dicts else copy.deepcopy(value)
    return out


def quiet_run(output: Path, **settings: Any) -> dict:
    """A test run's ``run`` section: fp32, a metrics line every step, no trackers and no progress bar."""
    quiet = {"trackers": [], "progress_bar": False, "mixed_precision": "no", "log_every": 1}
    return {"output_dir": str(output), **quiet, **settings}


CONSTANT_LR = {"warmup_steps": 0, "scheduler": "constant"}


def diffusion_settings(
    model_dir: Path, source: Path | None, output: Path, steps: int = 1, **sections: dict
) -> dict:
    """The raw config of ``steps`` LoRA Diffusion-DPO steps (rank 4, β 5000, lr 1e-3, batch 2, a checkpoint at
    the end) on a tiny model at 16 px, on the pairs in ``source``; without ``source``, a run that makes its own pairs. ``sections`` merge over
    it."""
    data_section: dict[str, Any] = {"resolution": RESOLUTION}
    if source is not None:
        data_section |= {"source": str(source), "caption_dropout": 0.25}
    raw = {
        "model": {"pretrained": str(model_dir), "trainable": "lora", "lora": {"rank": 4}},
        "data": data_section,
        "loss": {"type": ["sigmoid"], "beta": 5000.0},
        "optim": {"lr": 1e-3, **CONSTANT_LR},
        "run": quiet_run(output, max_steps=steps, batch_size=2, checkpoint_every=steps),
    }
    return merged(raw, sections)


def diffusion_config(
    model_dir: Path, source: Path | None, output: Path, steps: int = 1, **sections: dict
) -> DiffusionTrainConfig:
    """:func:`diffusion_settings` as the typed config."""
    return from_dict(DiffusionTrainConfig, diffusion_settings(model_dir, source, output, steps, **sections))


def llm_settings(model_dir: Path, output: Path, **sections: dict) -> dict:
    """The raw config of one LoRA DPO step on 4 of the toy LLM's conversational pairs; ``sections`` merge over
    it. The large learning rate (as in TRL's tests) makes one update visibly move every trained weight."""
    raw = {
        "kind": "llm",
        "model": {"pretrained": str(model_dir), "trainable": "lora", "lora": {"rank": 4}},
        "data": {
            "path": str(TOY_LLM / "data" / "conversational_train.jsonl"),
            "max_rows": 16,
            "max_prompt_length": 32,
            "max_length": 64,
        },
        "reference": {"cache_dir": str(output / "reference-cache")},
        "optim": {"lr": 0.01, "weight_decay": 0.0, "scheduler": "constant"},
        "run": quiet_run(output, max_steps=1, batch_size=4, checkpoint_every=100),
    }
    return merged(raw, sections)


def llm_config(model_dir: Path, output: Path, **sections: dict) -> LLMTrainConfig:
    """:func:`llm_settings` as the typed config."""
    return from_dict(LLMTrainConfig, llm_settings(model_dir, output, **sections))


def trainable_snapshot(output: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a run's latest checkpoint."""
    return load_file(sorted((output / "checkpoints").iterdir())[-1] / "trainable.safetensors")


# --- methods on tiny models -----------------------------------------------------------------------------------


def method_settings(name: str, **settings) -> Any:
    """The settings section ``method.<name>`` built from ``settings``."""
    return getattr(from_dict(MethodConfig, {"name": name, name: settings}), name)


def lora_policy(family, seed: int = 5) -> torch.nn.Module:
    """The family's denoiser with LoRA adapters moved away from zero (B ~ 0.05·N(0, 1), drawn from ``seed``), so
    policy ≠ reference."""
    policy = family.denoiser
    make_trainable(policy, DiffusionTrainConfig().model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy


def latent_pairs(family, seeds=(101, 202, 303)) -> LatentPairBatch:
    """Random SD-shaped latent pairs (4×8×8) for up to three toy prompts, a noise seed per pair."""
    generator = torch.Generator().manual_seed(0)
    shape = (len(seeds), 4, 8, 8)
    prompts = ["a red circle", "a large blue square", "a small green circle"][: len(seeds)]
    return LatentPairBatch(
        chosen_latents=torch.randn(shape, generator=generator),
        rejected_latents=torch.randn(shape, generator=generator),
        prompt_embeds=family.encode_prompts(prompts),
        noise_seeds=list(seeds),
    )


def trained_weights_changed(output: Path, model_dir: Path, trainable: str) -> bool:
    """Whether the run's latest checkpoint differs from the model it started from (any LoRA B off zero, or any
    full weight changed)."""
    from diffusers import UNet2DConditionModel

    trained = trainable_snapshot(output)
    if trainable == "lora":
        # LoRA B starts at zero: any non-zero B means the step reached the adapters.
        return all("lora" in name for name in trained) and any(
            value.abs().max() > 0 for name, value in trained.items() if "lora_B" in name
        )
    base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
    return any(not torch.equal(trained[name], base[name]) for name in base)


# --- the shared loop on a regression ----------------------------------------------------------------------------


class RegressionRecipe(Recipe):
    """y = w·x + noise, with fresh noise drawn from the global RNG every step (like diffusion noise)."""

    def __init__(self, output_dir: Path, poison_steps: set[int] = frozenset(), crash_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        inputs = torch.randn(64, 4)
        self.train_dataset = TensorDataset(inputs, inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
        self.output_dir = output_dir
        self.losses: list[float] = []
        self.poison_steps = poison_steps
        self.crash_at = crash_at
        self.calls = 0

    def collate(self, items):
        inputs, targets = zip(*items)
        return {"inputs": torch.stack(inputs), "targets": torch.stack(targets)}

    def training_step(self, model, batch):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt
        noise = 0.1 * torch.randn_like(batch["targets"])
        loss = ((model(batch["inputs"]).squeeze(-1) - batch["targets"] - noise) ** 2).mean()
        if self.calls in self.poison_steps:
            loss = loss * float("nan")
        self.losses.append(loss.item())
        return StepOutput(loss=loss, metrics={"noise": noise.abs().mean()}, counts={"pairs": len(noise)})

    def save_final(self, model, output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), output_dir / "model.pt")


def train_regression(tmp_path: Path, recipe: RegressionRecipe | None = None, **run_overrides: Any):
    """Six steps of :class:`RegressionRecipe` (batch 4, checkpoints at 3 and 6); returns the recipe and metrics."""
    run = RunConfig(**quiet_run(tmp_path, max_steps=6, batch_size=4, checkpoint_every=3) | run_overrides)
    recipe = recipe or RegressionRecipe(tmp_path)
    torch.manual_seed(123)
    metrics = run_training(recipe, run=run, optim=OptimConfig(lr=0.05, warmup_steps=2), accelerator=make_accelerator(run))
    return recipe, metrics


# --- several processes ------------------------------------------------------------------------------------------


def run_diffalign(*arguments: str, cwd: Path) -> str:
    """``python -m diffalign ARGUMENTS`` from CWD, offline and on one thread; fails the test with the output's tail
    if it fails, else returns what it printed. One thread: a toy run's trajectory depends on the order of its
    floating-point sums, so the slow tests reproduce the one-thread figures of docs/experiments.md whatever the
    core count and the number of pytest-xdist workers (another CPU's kernels may still move a sample or two)."""
    # No time limit: on a loaded machine these runs take several times their recorded figures, and how long they
    # take is not what they check.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "diffalign", *arguments], cwd=cwd, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def final_eval(output_dir: Path) -> dict[str, float]:
    """The last evaluation record of a run's ``metrics.jsonl``."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in records if any(key.startswith("eval/") for key in record)]
    assert evaluations, f"no evaluation in {output_dir / 'metrics.jsonl'}"
    return evaluations[-1]


def torchrun(processes: int, *arguments: str) -> None:
    """``torchrun --standalone --nproc_per_node PROCESSES ARGUMENTS``, with tests/ on the path (configs may name
    the reward functions of ``online_rewards``); fails the test with the output's tail if any process fails."""
    # --standalone: a free rendezvous port, so that runs started at the same time (other test sessions) never meet.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += arguments
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
