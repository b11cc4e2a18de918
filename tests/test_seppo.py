"""SePPO on a tiny SD1.5-like model: the anchor criterion, the checkpoint bank, the loss re-derived from its
formula, bounded memory over steps, and exact resume of a run whose references come from the bank."""

import copy
import gc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from helpers import diffusion_config, method_settings, random_png

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import LatentPairBatch, TrainingContext
from diffalign.diffusion.methods.online import derived_seed
from diffalign.diffusion.methods.seppo import (
    GENERATION_STREAM,
    REENCODE_STREAM,
    CheckpointBank,
    SemiPolicyPreferenceOptimization,
    SeppoSettings,
    anchor_weights,
)
from diffalign.diffusion.models import make_trainable
from diffalign.diffusion.trainer import train
from diffalign.losses import LossConfig, compute_loss

CAPTIONS = ["a red circle", "a large blue square", "a small green circle", "a blue circle"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    table = {
        "caption": CAPTIONS * 3,
        "jpg_0": [random_png(rng) for _ in range(12)],
        "jpg_1": [random_png(rng) for _ in range(12)],
        "label_0": [1.0, 0.0] * 6,
    }
    pq.write_table(pa.table(table), path)
    return path


def seppo_config(**settings) -> SeppoSettings:
    return method_settings("seppo", **{"num_inference_steps": 3, **settings})


def perturb_lora(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def test_anchor_criterion_on_constructed_errors():
    """The winner is the anchor: the policy fitting it at least as well as the reference → the sample is a loser."""
    policy = torch.tensor([0.10, 0.50, 0.30, 0.20])
    reference = torch.tensor([0.20, 0.40, 0.30, 0.10])
    assert anchor_weights(policy, reference, "pull").tolist() == [1.0, -1.0, 1.0, -1.0]
    assert anchor_weights(policy, reference, "no_push").tolist() == [1.0, 0.0, 1.0, 0.0]
    assert anchor_weights(policy, reference, "push").tolist() == [1.0, 1.0, 1.0, 1.0]


def small_weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value)}


def test_reservoir_bank_is_bounded_and_keeps_every_checkpoint_equally_often():
    capacity, offered, runs = 3, 12, 400
    kept = torch.zeros(offered)
    for seed in range(runs):
        bank = CheckpointBank(capacity, admission="reservoir")
        for step in range(offered):
            bank.add(step, small_weights(step), seed)
            assert len(bank) == min(step + 1, capacity)
        kept[bank.steps] += 1
        assert all(bank.weights(step)["w"][0] == step for step in bank.steps)
    # Each checkpoint survives with probability capacity/offered = 0.25; binomial sd over 400 runs ≈ 0.022.
    torch.testing.assert_close(kept / runs, torch.full((offered,), capacity / offered), atol=0.075, rtol=0)


def test_newest_and_first_admission_and_uniform_draws():
    newest, first = CheckpointBank(2, admission="newest"), CheckpointBank(2, admission="first")
    for step in range(0, 50, 10):
        newest.add(step, small_weights(step))
        first.add(step, small_weights(step))
    assert sorted(newest.steps) == [30, 40] and sorted(first.steps) == [0, 10]
    draws = [newest.draw(step, seed=7) for step in range(400)]
    assert abs(draws.count(30) / 400 - 0.5) < 0.1
    assert newest.draw(5, seed=7) == newest.draw(5, seed=7)  # the same on every process


def test_bank_on_disk_holds_at_most_capacity_files_and_restores_exactly(tmp_path):
    bank = CheckpointBank(2, directory=str(tmp_path / "bank"))
    for step in range(6):
        bank.add(step, small_weights(step), seed=3)
        assert len(list((tmp_path / "bank").iterdir())) == len(bank) <= 2
    restored = CheckpointBank(2, directory=str(tmp_path / "bank"))
    restored.load_state_dict(bank.state_dict())
    assert restored.steps == bank.steps and restored.offered == 6
    for step in bank.steps:
        assert torch.equal(restored.weights(step)["w"], bank.weights(step)["w"])
    # The same admissions from here on.
    bank.add(6, small_weights(6), seed=3)
    restored.add(6, small_weights(6), seed=3)
    assert restored.steps == bank.steps
    (tmp_path / "bank" / f"step-{bank.steps[0]:07d}.safetensors").unlink()
    reloaded = CheckpointBank(2, directory=str(tmp_path / "bank"))
    reloaded.load_state_dict(bank.state_dict())
    with pytest.raises(FileNotFoundError, match="missing"):
        reloaded.weights(bank.steps[0])


def make_context(family, step: int, seeds: list[int]) -> TrainingContext:
    generator = torch.Generator().manual_seed(step)

    def encode(batch):
        count = len(batch["caption"])
        return LatentPairBatch(
            chosen_latents=torch.randn(count, 4, 8, 8, generator=generator),
            rejected_latents=torch.randn(count, 4, 8, 8, generator=generator),
            prompt_embeds=family.encode_prompts(batch["caption"]),
            noise_seeds=seeds,
        )

    return TrainingContext(step=step, seed=11, noise_seeds=seeds, encode=encode)


@pytest.mark.parametrize("likely_winner", ["pull", "no_push"])
def test_loss_equals_the_formula_with_a_past_checkpoint_as_reference(sd_dir, likely_winner):
    """−log σ(−½β[(e_θ^w − e_ref^w) − μ(e_θ^r − e_ref^r)]), x^r sampled by the reference checkpoint, written out here."""
    family = load_family(str(sd_dir))
    policy = family.denoiser
    torch.manual_seed(0)  # LoRA's A matrices: the same models whichever tests ran before
    make_trainable(policy, DiffusionTrainConfig().model)
    perturb_lora(policy, seed=1)
    method = SemiPolicyPreferenceOptimization(
        family, None, seppo_config(selection="initial", likely_winner=likely_winner)
    )
    method.update_bank(policy, step=0, seed=11)  # the bank's only checkpoint: these weights
    reference_unet = copy.deepcopy(policy)
    perturb_lora(policy, seed=2)  # the policy has moved on since

    seeds = [1001, 2002, 3003, 4004]
    batch = {"caption": CAPTIONS, "sample_ids": [0, 1, 2, 3]}
    pairs, metrics = method.make_pairs(policy, batch, make_context(family, step=3, seeds=seeds))
    assert metrics["seppo/reference_step"] == 0
    scores, method_metrics = method.pair_scores(policy, pairs)
    loss = compute_loss(scores, LossConfig(type=["sigmoid"], beta=5000.0)).loss

    # The reference sample: the stock DDIM pipeline around the reference weights, each prompt's own seed.
    pipeline = StableDiffusionPipeline.from_pretrained(
        sd_dir, unet=reference_unet, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(derived_seed(seed, GENERATION_STREAM)) for seed in seeds]
    with torch.no_grad():
        expected_samples = pipeline(
            CAPTIONS, generator=generators, num_inference_steps=3, guidance_scale=7.5, output_type="latent"
        ).images
    # ...then decoded, clamped to the pixel range, encoded and drawn from the posterior, as a stored image would be.
    vae, scale = family.vae, family.vae.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode(vae.decode(expected_samples / scale).sample.clamp(-1, 1)).latent_dist
    draws = torch.stack(
        [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(derived_seed(seed, REENCODE_STREAM))) for seed in seeds]
    )
    torch.testing.assert_close(pairs.rejected_latents, (posterior.mean + posterior.std * draws) * scale)
    unencoded = SemiPolicyPreferenceOptimization(family, None, seppo_config(selection="initial", reencode_samples=False))
    unencoded.bank = method.bank
    raw_pairs, _ = unencoded.make_pairs(policy, batch, make_context(family, step=3, seeds=seeds))
    torch.testing.assert_close(raw_pairs.rejected_latents, expected_samples)

    noises, timesteps = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        noises.append(torch.randn(4, 8, 8, generator=generator))
        timesteps.append(torch.randint(0, 1000, (1,), generator=generator))
    noise, timesteps = torch.stack(noises), torch.cat(timesteps)
    alphas = family.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    embeds = family.encode_prompts(CAPTIONS)["prompt_embeds"]

    def error(model, latents):
        noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
        return ((model(noisy, timesteps, encoder_hidden_states=embeds).sample - noise) ** 2).mean(dim=(1, 2, 3))

    with torch.no_grad():
        policy_w, policy_r = error(policy, pairs.chosen_latents), error(policy, pairs.rejected_latents)
        reference_w = error(reference_unet, pairs.chosen_latents)
        reference_r = error(reference_unet, pairs.rejected_latents)
    winner_weight = -1.0 if likely_winner == "pull" else 0.0
    mu = torch.where(policy_w <= reference_w, 1.0, winner_weight)
    assert 0 < (mu > 0).sum() < len(mu)  # both branches of the criterion occur in this batch
    expected = -F.logsigmoid(-0.5 * 5000 * ((policy_w - reference_w) - mu * (policy_r - reference_r))).mean()
    # ½β = 2500 scales float32 rounding of the errors (the method batches both members, this test does not).
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(method_metrics["seppo/likely_loser_fraction"], (mu > 0).float().mean())
    assert abs(expected.item() - np.log(2)) > 1e-3  # policy ≠ reference: a non-trivial case


def live_tensor_count() -> int:
    gc.collect()
    return sum(1 for item in gc.get_objects() if torch.is_tensor(item))


def test_bank_and_generation_do_not_grow_memory_over_steps(sd_dir):
    family = load_family(str(sd_dir))
    policy = family.denoiser
    make_trainable(policy, DiffusionTrainConfig().model)
    method = SemiPolicyPreferenceOptimization(family, None, seppo_config(snapshot_every=1, bank_size=2))
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    counts = []
    for step in range(8):
        batch = {"caption": CAPTIONS[:2], "sample_ids": [2 * step, 2 * step + 1]}
        pairs, _ = method.make_pairs(policy, batch, make_context(family, step, seeds=[step, 100 + step]))
        scores, _ = method.pair_scores(policy, pairs)
        compute_loss(scores, LossConfig(beta=5000.0)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del pairs, scores
        assert len(method.bank) <= 2 and len(method.bank._weights) <= 2
        counts.append(live_tensor_count())
    assert method.bank.offered == 8
    assert counts[-1] <= counts[2], counts  # steady state after the first steps: nothing accumulates


def run_config(model_dir: Path, data: Path, output: Path, **run) -> DiffusionTrainConfig:
    seppo = {"num_inference_steps": 2, "snapshot_every": 1, "bank_size": 2, "guidance_scale": 3.0}
    return diffusion_config(
        model_dir, data, output, steps=4,
        method={"name": "seppo", "seppo": seppo}, data={"caption_dropout": 0.0}, run={"checkpoint_every": 2, **run},
    )


def test_a_resumed_run_draws_the_same_references_and_ends_bit_identical(sd_dir, pairs_file, tmp_path):
    full = train(run_config(sd_dir, pairs_file, tmp_path / "full"))
    train(run_config(sd_dir, pairs_file, tmp_path / "split", max_steps=2))
    resumed = train(run_config(sd_dir, pairs_file, tmp_path / "split", resume="latest"))
    assert np.isfinite(full["loss"]) and resumed["loss"] == full["loss"]
    assert resumed["seppo/reference_step"] == full["seppo/reference_step"]
    assert resumed["seppo/bank_size"] == 2
    from safetensors.torch import load_file

    final = {
        name: load_file(tmp_path / name / "checkpoints" / "step-0000004" / "trainable.safetensors")
        for name in ("full", "split")
    }
    assert all(torch.equal(final["full"][key], final["split"][key]) for key in final["full"])
    extra = torch.load(tmp_path / "split" / "checkpoints" / "step-0000004" / "extra.pt", weights_only=True)
    assert len(extra["method"]["bank"]["weights"]) == 2  # the bank travels with the checkpoint, bounded
