"""``diffalign eval``: confidence intervals and win rates against their formulas, prompt sets from every local
format and from (cached or missing) hub presets, and reports produced end to end on tiny pipelines, checked
against samples and scores computed independently with the diffusers pipeline and the scorers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from scipy import stats
from tiny_pipelines import build_tiny_sd, save_tiny_clap, save_tiny_clip

from diffalign.cli import main
from diffalign.config import ConfigError, from_dict, load_config
from diffalign.eval.config import EvalConfig
from diffalign.eval.grid import labelled_grid
from diffalign.eval.prompts import (
    PROMPT_PRESETS,
    PromptSetConfig,
    dreambench_prompts,
    load_prompt_set,
    read_prompts,
)
from diffalign.eval.statistics import mean_interval, win_rate_interval
from diffalign.rewards import Audio, build_scorer

PROMPTS = ["a red circle", "a blue square", "a small green circle"]
FLOW_TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-t2i-flow"


pytestmark = pytest.mark.usefixtures("one_thread")


# --- statistics ---------------------------------------------------------------------------------------------------


def test_mean_interval_is_the_student_t_interval():
    estimate = mean_interval(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # t_{0.975, 4} = 2.7764451 (tables); s² = 2.5.
    half_width = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert estimate.value == 3.0 and estimate.count == 5
    assert estimate.low == pytest.approx(3.0 - half_width, abs=1e-12)
    assert estimate.high == pytest.approx(3.0 + half_width, abs=1e-12)

    values = np.random.default_rng(0).normal(2.0, 3.0, size=40)
    estimate = mean_interval(torch.from_numpy(values), confidence=0.9)
    half_width = stats.t.ppf(0.95, 39) * values.std(ddof=1) / math.sqrt(40)
    assert estimate.value == pytest.approx(values.mean(), abs=1e-12)
    assert (estimate.low, estimate.high) == pytest.approx(
        (values.mean() - half_width, values.mean() + half_width)
    )

    single = mean_interval(torch.tensor([7.0]))
    assert (single.value, single.low, single.high) == (7.0, None, None)


def wilson(rate: float, count: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre = (rate + z * z / (2 * count)) / (1 + z * z / count)
    half_width = z / (1 + z * z / count) * math.sqrt(rate * (1 - rate) / count + z * z / (4 * count * count))
    return centre - half_width, centre + half_width


def test_win_rate_counts_ties_one_half_with_a_wilson_interval():
    aligned = torch.tensor([3.0, 2.0, 1.0, 5.0, 4.0])
    base = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0])
    result = win_rate_interval(aligned, base)
    assert (result.wins, result.ties, result.losses, result.count) == (2, 2, 1, 5)
    assert result.value == pytest.approx(0.6)  # (2 + 2/2) / 5
    assert (result.low, result.high) == pytest.approx(wilson(0.6, 5))

    lower_is_better = win_rate_interval(aligned, base, higher_is_better=False)
    assert (lower_is_better.wins, lower_is_better.ties, lower_is_better.losses) == (1, 2, 2)
    assert lower_is_better.value == pytest.approx(0.4)

    sweep = win_rate_interval(torch.ones(4), torch.zeros(4))
    z2 = 1.959963984540054**2
    assert sweep.value == 1.0 and sweep.high == pytest.approx(1.0)
    assert sweep.low == pytest.approx(4 / (4 + z2))  # Wilson's lower bound at p̂ = 1 is n / (n + z²)

    with pytest.raises(ValueError, match="one aligned and one base score"):
        win_rate_interval(torch.ones(3), torch.ones(4))


# --- prompt sets --------------------------------------------------------------------------------------------------


def write_prompt_files(folder: Path, prompts: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "txt": folder / "prompts.txt",
        "json_strings": folder / "strings.json",
        "json_records": folder / "records.json",
        "jsonl": folder / "prompts.jsonl",
        "parquet": folder / "prompts.parquet",
        "csv": folder / "prompts.csv",
        "tsv": folder / "prompts.tsv",
    }
    files["txt"].write_text("\n".join(prompts[:1] + [""] + [f"  {p}  " for p in prompts[1:]]) + "\n")
    files["json_strings"].write_text(json.dumps(prompts))
    files["json_records"].write_text(json.dumps([{"caption": p, "id": i} for i, p in enumerate(prompts)]))
    files["jsonl"].write_text("\n".join(json.dumps({"caption": p, "id": i}) for i, p in enumerate(prompts)))
    pq.write_table(pa.table({"id": list(range(len(prompts))), "caption": prompts}), files["parquet"])
    for name, delimiter in (("csv", ","), ("tsv", "\t")):
        with files[name].open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter=delimiter)
            writer.writerow(["id", "caption"])
            writer.writerows(enumerate(prompts))
    return files


def test_prompts_load_from_every_local_format(tmp_path):
    prompts = ["a red circle", "a blue square, on white", 'a "quoted" green circle']
    for kind, path in write_prompt_files(tmp_path, prompts).items():
        assert load_prompt_set(PromptSetConfig(source=str(path), column="caption")) == prompts, kind
    two = load_prompt_set(
        PromptSetConfig(source=str(tmp_path / "prompts.parquet"), column="caption", max_prompts=2)
    )
    assert two == prompts[:2]


def test_prompt_file_errors_name_the_file_the_row_and_the_fix(tmp_path):
    files = write_prompt_files(tmp_path, PROMPTS)
    with pytest.raises(
        ValueError, match=r"prompts.parquet: no prompt column 'prompt'.*\['id', 'caption'\].*prompts.column"
    ):
        read_prompts(files["parquet"])
    with pytest.raises(ValueError, match=r"prompts.csv: no prompt column 'text'"):
        read_prompts(files["csv"], column="text")

    holes = tmp_path / "holes.jsonl"
    holes.write_text(
        '{"caption": "a red circle"}\n{"caption": null}\n{"caption": "  "}\n{"caption": "a square"}\n'
    )
    with pytest.raises(ValueError, match=r"holes.jsonl, line 2: the prompt is missing.*prompts.skip_empty"):
        read_prompts(holes, column="caption")
    assert read_prompts(holes, column="caption", skip_empty=True) == ["a red circle", "a square"]

    with pytest.raises(ValueError, match=r"neither a preset .* nor a prompt file"):
        read_prompts(tmp_path / "prompts.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("preset", sorted(PROMPT_PRESETS))
def test_hub_presets_offline_name_the_file_to_place_locally(preset, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = PromptSetConfig(source=preset, subject="dog6" if preset == "dreambench" else None)
    with pytest.raises(FileNotFoundError) as error:
        load_prompt_set(config)
    message = str(error.value)
    spec = PROMPT_PRESETS[preset]
    for fragment in ["HF_HUB_OFFLINE", spec.repo_id, spec.files[0], "prompts.source"]:
        assert fragment in message


def fake_hub_dataset(cache: Path, repo_id: str, files: dict[str, str | bytes]) -> None:
    """A dataset snapshot laid out as huggingface_hub caches it (refs/main → snapshots/<commit>/...)."""
    commit = "0" * 40
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


DREAMBENCH_EXCERPT = """Classes

subject_name,class
can,can
dog6,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]
"""


def test_hub_presets_read_from_the_hub_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    fake_hub_dataset(
        tmp_path,
        "nateraw/parti-prompts",
        {"PartiPrompts.tsv": "Prompt\tCategory\nA cat\tAnimals\nA dog\tAnimals\n"},
    )
    styles = ("anime", "concept-art", "paintings", "photo")
    fake_hub_dataset(
        tmp_path,
        "zhwang/HPDv2",
        {f"benchmark/{style}.json": json.dumps([f"{style} {i}" for i in range(2)]) for style in styles},
    )
    fake_hub_dataset(tmp_path, "google/dreambooth", {"dataset/prompts_and_classes.txt": DREAMBENCH_EXCERPT})

    assert load_prompt_set(PromptSetConfig(source="partiprompts")) == ["A cat", "A dog"]
    assert load_prompt_set(PromptSetConfig(source="hpsv2")) == [f"{s} {i}" for s in styles for i in range(2)]
    assert load_prompt_set(PromptSetConfig(source="dreambench", subject="can", unique_token="zwx")) == [
        "a zwx can in the jungle",
        "a cube shaped zwx can",
    ]


def test_dreambench_subjects_get_the_object_or_the_live_prompt_list(tmp_path):
    path = tmp_path / "prompts_and_classes.txt"
    path.write_text(DREAMBENCH_EXCERPT)
    assert dreambench_prompts(path, "dog6") == [
        "a sks dog in the jungle",
        "a sks dog wearing a red hat",
        "a cube shaped sks dog",
    ]
    with pytest.raises(ValueError, match=r"'cat9' is not a DreamBench subject.*\['can', 'dog6'\]"):
        dreambench_prompts(path, "cat9")
    with pytest.raises(ConfigError, match="prompts.subject is empty"):
        from_dict(PromptSetConfig, {"source": "dreambench"}, prefix="prompts.")


# --- config -------------------------------------------------------------------------------------------------------


def test_eval_configs_are_checked_before_anything_loads(tmp_path):
    base = {
        "kind": "eval",
        "model": {"aligned": "run"},
        "prompts": {"source": "p.txt"},
        "scorers": [{"name": "toy_t2i"}],
    }
    path = tmp_path / "eval.yaml"
    for change, fragment in [
        ({"scorers": []}, "scorers is empty"),
        ({"scorers": [{"name": "toy_t2i"}, {"name": "toy_t2i"}]}, "'toy_t2i' appears twice; give each use"),
        ({"scorers": [{"name": "nonsense"}]}, "'nonsense' is not a registered scorer"),
        ({"model": {}}, "model.aligned is empty"),
        ({"prompts": {}}, "prompts.source is empty"),
        ({"generation": {"dtype": "float8"}}, "generation.dtype"),
        ({"report": {"confidence": 95}}, "report.confidence must lie in (0, 1)"),
    ]:
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert fragment in str(error.value)
    path.write_text(yaml.safe_dump(base))
    config = load_config(path, ["generation.num_inference_steps=7"])
    assert isinstance(config, EvalConfig) and config.generation.num_inference_steps == 7


def test_shipped_eval_and_relabel_configs_load():
    from diffalign.eval.relabel import RelabelConfig, load_relabel_config
    from diffalign.llm.config import LLMEvalRunConfig

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/eval_*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        if "kind" in yaml.safe_load(path.read_text()):
            assert isinstance(load_config(path), (EvalConfig, LLMEvalRunConfig)), path
        else:
            assert isinstance(load_relabel_config(str(path), []), RelabelConfig), path


# --- end to end on tiny pipelines -----------------------------------------------------------------------------------

STEPS, GUIDANCE = 3, 3.0
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD pipeline, a LoRA and a full fine-tune of its UNet saved as the trainer saves them, a tiny CLIP,
    a tiny CLAP, and reference folders of images and of audio clips."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("eval_models")
    sd = build_tiny_sd(root / "sd")
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    # Random B matrices (not the zero init), so that the LoRA changes the samples.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=lora_layers)

    full = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    with torch.no_grad():
        for parameter in full.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    full.save_pretrained(root / "run" / "final" / "unet")
    run_config = {"kind": "diffusion", "model": {"pretrained": str(sd), "vae": None, "trainable": "full"}}
    (root / "run" / "final" / "config.yaml").write_text(yaml.safe_dump(run_config))

    images = root / "reference_images"
    images.mkdir()
    generator = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(generator.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / f"{index}.png")
    clips = root / "reference_clips"
    clips.mkdir()
    for index in range(3):
        soundfile.write(
            clips / f"{index}.wav", 0.3 * generator.standard_normal(16_000).astype(np.float32), 16_000
        )
    return {
        "sd": sd,
        "lora": root / "lora",
        "run": root / "run",
        "clip": save_tiny_clip(root / "clip"),
        "clap": save_tiny_clap(root / "clap"),
        "reference_images": images,
        "reference_clips": clips,
    }


def pipeline_samples(
    models, prompts: list[str], *, lora: bool = False, unet: Path | None = None
) -> torch.Tensor:
    """Samples straight from the diffusers pipeline, one prompt at a time with the generator seeded by its index:
    ``[N,3,H,W]`` floats in [0,1]."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        models["sd"], safety_checker=None, requires_safety_checker=False
    )
    if unet is not None:
        pipeline.unet = UNet2DConditionModel.from_pretrained(unet)
    if lora:
        pipeline.load_lora_weights(models["lora"])
    return samples_one_prompt_at_a_time(pipeline, prompts)


def samples_one_prompt_at_a_time(pipeline, prompts: list[str], **arguments) -> torch.Tensor:
    """``pipeline``'s samples, one prompt at a time with the generator seeded by its index (eval's seeds):
    ``[N,3,H,W]`` floats in [0,1]."""
    pipeline.set_progress_bar_config(disable=True)
    images = [
        pipeline(
            prompt,
            generator=torch.Generator().manual_seed(index),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="pt",
            **arguments,
        ).images
        for index, prompt in enumerate(prompts)
    ]
    return torch.cat(images).float()


def quantised(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round() / 255


def run_eval(tmp_path: Path, settings: dict, *overrides: str) -> dict:
    config = {
        "kind": "eval",
        "generation": {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "batch_size": 4},
        "report": {"output_dir": str(tmp_path / "report"), "grid_prompts": 3},
        **settings,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", str(path), *overrides]) == 0
    return json.loads((tmp_path / "report" / "report.json").read_text())


def per_sample(report: dict, key: str, role: str) -> torch.Tensor:
    return torch.tensor([sample["scores"][key][role] for sample in report["samples"]], dtype=torch.float64)


def assert_interval(entry: dict, values: torch.Tensor, confidence: float = 0.95) -> None:
    count = len(values)
    half_width = stats.t.ppf((1 + confidence) / 2, count - 1) * values.std().item() / math.sqrt(count)
    assert entry["value"] == pytest.approx(values.mean().item(), rel=1e-9)
    assert (entry["low"], entry["high"]) == pytest.approx(
        (values.mean().item() - half_width, values.mean().item() + half_width)
    )


def test_eval_report_for_a_lora_on_tiny_sd(models, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    report = run_eval(
        tmp_path,
        {
            "model": {"base": str(models["sd"]), "aligned": str(models["lora"])},
            "prompts": {"source": str(prompts_file)},
            "scorers": [
                {"name": "clip_score", "options": {"model": str(models["clip"])}},
                {
                    "name": "fad",
                    "label": "fid_per_sample",
                    "options": {"encoder": "clip", "model": str(models["clip"]), "reduction": "per_sample"},
                    "reference": str(models["reference_images"]),
                },
                {"name": "vendi", "options": {"encoder": "clip", "model": str(models["clip"])}},
            ],
        },
        "generation.samples_per_prompt=2",
    )
    sample_prompts = PROMPTS * 2  # sample i: prompt i mod 3, seed i
    assert [(s["prompt"], s["seed"]) for s in report["samples"]] == [
        (p, i) for i, p in enumerate(sample_prompts)
    ]
    assert report["aligned_kind"] == "lora" and report["prompts"]["count"] == 3

    base = quantised(pipeline_samples(models, sample_prompts))
    aligned = quantised(pipeline_samples(models, sample_prompts, lora=True))
    assert (aligned - base).abs().max() > 0.05  # the LoRA changes the samples
    folder = tmp_path / "report"
    for role, expected in (("base", base), ("aligned", aligned)):
        for index in range(len(sample_prompts)):
            saved = torch.from_numpy(
                np.array(Image.open(folder / "samples" / role / f"{index:05d}.png"))
            ).permute(2, 0, 1)
            torch.testing.assert_close(saved.float() / 255, expected[index], atol=1.5 / 255, rtol=0)

    with torch.no_grad():
        clip_score = build_scorer("clip_score", model=str(models["clip"]))
        fad = build_scorer("fad", encoder="clip", model=str(models["clip"]), reduction="per_sample")
        reference = fad.prepare_reference(
            [Image.open(p) for p in sorted(models["reference_images"].iterdir())]
        )
        vendi = build_scorer("vendi", encoder="clip", model=str(models["clip"]))
        for role, images in (("base", base), ("aligned", aligned)):
            torch.testing.assert_close(
                per_sample(report, "clip_score", role).float(),
                clip_score(images, sample_prompts),
                rtol=1e-3,
                atol=1e-3,
            )
            torch.testing.assert_close(
                per_sample(report, "fid_per_sample", role).float(),
                fad(images, reference=reference),
                rtol=1e-3,
                atol=1e-4,
            )
            assert report["scorers"]["vendi"][role]["value"] == pytest.approx(vendi(images).item(), rel=1e-3)

    for key, higher_is_better in (("clip_score", True), ("fid_per_sample", False)):
        entry = report["scorers"][key]
        base_scores, aligned_scores = per_sample(report, key, "base"), per_sample(report, key, "aligned")
        assert entry["higher_is_better"] is higher_is_better and entry["set_level"] is False
        assert_interval(entry["base"], base_scores)
        assert_interval(entry["aligned"], aligned_scores)
        assert_interval(entry["difference"], aligned_scores - base_scores)
        better = aligned_scores > base_scores if higher_is_better else aligned_scores < base_scores
        ties = int((aligned_scores == base_scores).sum())
        assert (entry["win_rate"]["wins"], entry["win_rate"]["ties"]) == (int(better.sum()), ties)
        assert entry["win_rate"]["value"] == pytest.approx((int(better.sum()) + ties / 2) / 6)
    vendi_entry = report["scorers"]["vendi"]
    assert vendi_entry["set_level"] and "win_rate" not in vendi_entry
    assert vendi_entry["aligned_better"] == (vendi_entry["aligned"]["value"] > vendi_entry["base"]["value"])

    # The grid: base row over aligned row, the first 3 samples, 16-pixel images enlarged 8 times to 128-pixel
    # tiles, each with its clip_score under it and its prompt under the column.
    grid = Image.open(folder / "grid.png")
    scores = {role: per_sample(report, "clip_score", role)[:3] for role in ("base", "aligned")}
    redrawn, layout = labelled_grid({"base": base[:3], "aligned": aligned[:3]}, PROMPTS, scores, "clip_score")
    assert (layout.tile_height, layout.tile_width) == (128, 128) and grid.size == layout.size == redrawn.size
    for row, expected in enumerate((base, aligned)):
        for column in range(3):
            tile = np.array(grid.crop(layout.tile_box(row, column)))[::8, ::8]
            torch.testing.assert_close(
                torch.from_numpy(tile.copy()).permute(2, 0, 1).float() / 255, expected[column], atol=1.5 / 255, rtol=0
            )
    # The labels (row names, scores, prompts) are drawn: the saved grid is the one drawn with these scores.
    assert np.abs(np.array(grid, dtype=int) - np.array(redrawn, dtype=int)).max() <= 2
    assert Image.open(folder / "plot.png").size[0] > 0
    page = (folder / "report.md").read_text()
    win = report["scorers"]["clip_score"]["win_rate"]
    assert f"| clip_score | higher | {report['scorers']['clip_score']['base']['value']:.4g} ± " in page
    assert f"({win['wins']}/{win['ties']}/{win['losses']}) |" in page
    assert "| fid_per_sample | lower |" in page and "| vendi | higher |" in page and "set-level |" in page
    assert "![samples: base (top) / aligned (bottom), prompts below, scores under each sample](grid.png)" in page and "![scores](plot.png)" in page


def test_eval_of_a_training_run_takes_the_base_model_from_its_config(models, tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    report = run_eval(
        tmp_path,
        {
            "model": {"aligned": str(models["run"])},
            "prompts": {"source": str(tmp_path / "prompts.json")},
            "scorers": [{"name": "clip_t", "options": {"model": str(models["clip"])}}],
            "report": {"output_dir": str(tmp_path / "report"), "save_samples": False},
        },
    )
    assert report["base_model"] == str(models["sd"])
    assert report["aligned_model"] == str(models["run"] / "final") and report["aligned_kind"] == "denoiser"
    assert not (tmp_path / "report" / "samples").exists()
    with torch.no_grad():
        clip_t = build_scorer("clip_t", model=str(models["clip"]))
        base = clip_t(quantised(pipeline_samples(models, PROMPTS)), PROMPTS)
        aligned = clip_t(
            quantised(pipeline_samples(models, PROMPTS, unet=models["run"] / "final" / "unet")), PROMPTS
        )
    torch.testing.assert_close(per_sample(report, "clip_t", "base").float(), base, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(per_sample(report, "clip_t", "aligned").float(), aligned, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(base, aligned)


def test_eval_of_a_run_without_t5_samples_both_models_with_the_runs_text_encoders(tmp_path):
    """The run's ``model:`` options reach the base pipeline: a run that dropped SD3's T5 (the flow toy ships none)
    is sampled without it and with its text length; eval used to load every text encoder and failed."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_pretrained(FLOW_TOY, subfolder="transformer")
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    final = tmp_path / "run" / "final"
    transformer.save_pretrained(final / "transformer")
    model = {"pretrained": str(FLOW_TOY), "trainable": "full", "drop_text_encoders": ["text_encoder_3"]}
    (final / "config.yaml").write_text(yaml.safe_dump({"kind": "diffusion", "model": {**model, "max_text_length": 8}}))
    prompts = ["a small red circle", "a large blue square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    report = run_eval(
        tmp_path,
        {
            "model": {"aligned": str(tmp_path / "run")},
            "prompts": {"source": str(tmp_path / "prompts.txt")},
            "scorers": [{"name": "toy_t2i"}],
            "report": {"output_dir": str(tmp_path / "report"), "grid_prompts": 2, "save_samples": False},
        },
    )
    pipeline = StableDiffusion3Pipeline.from_pretrained(FLOW_TOY, text_encoder_3=None, tokenizer_3=None)
    toy_reward = build_scorer("toy_t2i")
    for role, denoiser in (("base", pipeline.transformer), ("aligned", transformer)):
        pipeline.transformer = denoiser
        images = samples_one_prompt_at_a_time(pipeline, prompts, max_sequence_length=8)
        expected = toy_reward(quantised(images), prompts)
        torch.testing.assert_close(per_sample(report, "toy_t2i", role).float(), expected, rtol=1e-3, atol=1e-4)


def test_eval_of_an_audio_family_writes_clips_spectrograms_and_audio_scores(models, tmp_path, monkeypatch):
    """The audio path against the family interface: a stand-in family whose sampler returns :class:`Audio`
    (the tiny SD pipeline's images read out as 8 kHz waveforms), scored with a tiny CLAP and a CLAP FAD against
    a folder of reference clips."""
    from diffalign.diffusion.families import StableDiffusionFamily

    class WaveformFamily(StableDiffusionFamily):
        sample_rate = 8000

        def generate(self, denoiser, prompts, generators, *, num_inference_steps, guidance_scale):
            images = super().generate(
                denoiser,
                prompts,
                generators,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            return Audio(images.flatten(1) * 2 - 1, self.sample_rate)

    monkeypatch.setattr("diffalign.eval.run.load_family", lambda path, vae=None, options=None: WaveformFamily(path, vae, options=options))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    report = run_eval(
        tmp_path,
        {
            "model": {"base": str(models["sd"]), "aligned": str(models["lora"])},
            "prompts": {"source": str(tmp_path / "prompts.txt")},
            "scorers": [
                {"name": "clap_score", "options": {"model": str(models["clap"])}},
                {
                    "name": "fad",
                    "options": {"model": str(models["clap"])},
                    "reference": str(models["reference_clips"]),
                },
            ],
        },
    )
    waveforms = {
        "base": pipeline_samples(models, PROMPTS).flatten(1) * 2 - 1,
        "aligned": pipeline_samples(models, PROMPTS, lora=True).flatten(1) * 2 - 1,
    }
    folder = tmp_path / "report"
    with torch.no_grad():
        clap = build_scorer("clap_score", model=str(models["clap"]))
        fad = build_scorer("fad", model=str(models["clap"]))
        clips = [
            soundfile.read(path, dtype="float32")[0] for path in sorted(models["reference_clips"].iterdir())
        ]
        reference = fad.prepare_reference(Audio(torch.from_numpy(np.stack(clips)), 16_000))
        for role, waveform in waveforms.items():
            audio = Audio(waveform, 8000)
            torch.testing.assert_close(
                per_sample(report, "clap_score", role).float(), clap(audio, PROMPTS), rtol=1e-3, atol=1e-4
            )
            assert report["scorers"]["fad"][role]["value"] == pytest.approx(
                fad(audio, reference=reference).item(), rel=1e-3
            )
            for index in range(len(PROMPTS)):
                saved, rate = soundfile.read(folder / "samples" / role / f"{index:05d}.wav", dtype="float32")
                assert rate == 8000
                np.testing.assert_allclose(saved, waveform[index].clamp(-1, 1).numpy(), atol=2e-4)
                assert (folder / "grid" / f"{role}-{index:03d}.wav").is_file()
    assert report["files"]["clips"] == "grid/" and Image.open(folder / "grid.png").size[0] > 0
    assert report["scorers"]["fad"]["set_level"] and not report["scorers"]["fad"]["higher_is_better"]
    page = (folder / "report.md").read_text()
    assert "spectrograms: base (top) / aligned (bottom), prompts below, scores under each; clips in grid/" in page


def test_missing_or_unexpected_reference_sets_and_aligned_weights_are_named(models, tmp_path):
    from diffalign.eval.config import EvalScorerConfig
    from diffalign.eval.generation import load_aligned_denoiser, locate_aligned
    from diffalign.eval.scoring import build_with_reference

    with pytest.raises(
        ValueError, match=r"scorers\[1\].reference is empty, but clip_i compares samples to a reference"
    ):
        build_with_reference(
            EvalScorerConfig("clip_i", {"model": str(models["clip"])}), "cpu", where="scorers[1]"
        )
    with pytest.raises(ValueError, match=r"scorers\[0\].reference: clip_score takes no reference set"):
        spec = EvalScorerConfig(
            "clip_score", {"model": str(models["clip"])}, reference=str(models["reference_images"])
        )
        build_with_reference(spec, "cpu", where="scorers[0]")
    with pytest.raises(FileNotFoundError, match="reference: .* is neither a folder of images"):
        spec = EvalScorerConfig("clip_i", {"model": str(models["clip"])}, reference=str(tmp_path / "nowhere"))
        build_with_reference(spec, "cpu", where="scorers[0]")

    with pytest.raises(FileNotFoundError, match="model.aligned: .* is not a local directory"):
        locate_aligned(str(tmp_path / "missing-run"))
    (tmp_path / "empty").mkdir()
    from diffalign.diffusion.families import load_family

    with pytest.raises(
        FileNotFoundError, match=r"holds neither LoRA weights \(pytorch_lora_weights.safetensors"
    ):
        load_aligned_denoiser(
            load_family(str(models["sd"])), locate_aligned(str(tmp_path / "empty")).directory
        )


def test_eval_cli_rejects_a_training_config(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"kind": "diffusion"}))
    assert main(["eval", str(path)]) == 2
    assert "`diffalign eval` takes kind: eval" in capsys.readouterr().err


def test_a_musicldm_lora_loads_without_a_pipeline_loader_and_is_evaluated(tmp_path):
    """MusicLDM's pipeline has no LoRA loader: the trainer's LoRA file goes into the U-Net under its prefix."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_audio_families import build_musicldm

    from diffalign.diffusion.families import load_family
    from diffalign.eval.generation import load_aligned_denoiser

    pipeline_dir = build_musicldm(tmp_path / "musicldm")
    clap = save_tiny_clap(tmp_path / "clap")
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    LoraBaseMixin.write_lora_layers(
        LoraBaseMixin.pack_weights(lora_layers, "unet"),
        tmp_path / "lora",
        is_main_process=True,
        weight_name="pytorch_lora_weights.safetensors",
        save_function=None,
        safe_serialization=True,
    )

    family = load_family(str(pipeline_dir))
    assert not hasattr(family.build_pipeline(family.denoiser), "load_lora_weights")
    denoiser, kind = load_aligned_denoiser(family, tmp_path / "lora")
    assert kind == "lora" and denoiser is family.denoiser
    (adapter,) = denoiser.peft_config
    loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=adapter))
    assert loaded.keys() == lora_layers.keys()
    for name, value in lora_layers.items():
        torch.testing.assert_close(loaded[name], value)

    (tmp_path / "prompts.txt").write_text("rain\na dog\n")
    report = run_eval(
        tmp_path,
        {
            "model": {"base": str(pipeline_dir), "aligned": str(tmp_path / "lora")},
            "prompts": {"source": str(tmp_path / "prompts.txt")},
            "scorers": [{"name": "clap_score", "options": {"model": str(clap)}}],
        },
    )
    assert report["aligned_kind"] == "lora"
    base, aligned = per_sample(report, "clap_score", "base"), per_sample(report, "clap_score", "aligned")
    assert not torch.equal(base, aligned)  # the LoRA changes the clips
    rate = family.sample_rate
    for role in ("base", "aligned"):
        for index in range(2):
            assert (
                soundfile.info(tmp_path / "report" / "samples" / role / f"{index:05d}.wav").samplerate == rate
            )
            assert (tmp_path / "report" / "grid" / f"{role}-{index:03d}.wav").is_file()
