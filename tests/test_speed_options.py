"""The speed switches of the diffusion trainer: the reference cache, torch.compile, and no host syncs in a step."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import diffusion_config, write_random_pairs

from diffalign.diffusion.config import DiffusionTrainConfig
from diffalign.diffusion.families import load_family
from diffalign.diffusion.methods import LatentPairBatch
from diffalign.diffusion.methods.dpo import DiffusionDPO
from diffalign.diffusion.models import make_trainable
from diffalign.diffusion.reference import ReferenceDenoiser
from diffalign.diffusion.reference_cache import ReferenceErrors, precompute_reference_errors
from diffalign.diffusion.trainer import DiffusionRecipe, train
from diffalign.losses import LossConfig, compute_loss
from diffalign.training import make_accelerator
from diffalign.training.sampler import collate_with_sample_ids

NUM_PAIRS = 8


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_random_pairs(tmp_path_factory.mktemp("data") / "pairs.parquet", count=NUM_PAIRS)


@pytest.fixture(scope="module")
def other_sd_dir(sd_dir, tmp_path_factory) -> Path:
    """The same architecture with one denoiser weight changed: another model."""
    pipeline = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        pipeline.unet.conv_in.bias.add_(0.01)
    directory = tmp_path_factory.mktemp("other-sd")
    pipeline.save_pretrained(directory)
    return directory


def recipe_for(config: DiffusionTrainConfig) -> DiffusionRecipe:
    torch.manual_seed(0)  # the LoRA initialisation
    recipe = DiffusionRecipe(config, make_accelerator(config.run))
    move_policy_off_reference(recipe.model)
    return recipe


def move_policy_off_reference(model: torch.nn.Module) -> None:
    """LoRA starts as a no-op (B = 0), where policy and reference agree and every loss is log 2."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def batch_of(recipe: DiffusionRecipe, sample_ids: list[int]) -> dict:
    """What the loop hands ``training_step`` for these sample ids (epoch · N + position)."""
    from diffalign.training.sampler import SampleIdDataset

    dataset = SampleIdDataset(recipe.train_dataset)
    return collate_with_sample_ids(recipe.collate)([dataset[sample_id] for sample_id in sample_ids])


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# --- reference cache ------------------------------------------------------------------------------------------------


def test_cached_reference_errors_give_exactly_the_on_the_fly_loss(sd_dir):
    family = load_family(str(sd_dir))
    policy = family.denoiser
    make_trainable(policy, DiffusionTrainConfig().model)
    move_policy_off_reference(policy)
    method = DiffusionDPO(family, ReferenceDenoiser(policy, frozen_copy=False))
    generator = torch.Generator().manual_seed(0)
    batch = LatentPairBatch(
        chosen_latents=torch.randn(3, 4, 8, 8, generator=generator),
        rejected_latents=torch.randn(3, 4, 8, 8, generator=generator),
        prompt_embeds=family.encode_prompts(["a red circle", "a blue square", "a small green circle"]),
        noise_seeds=[11, 12, 13],
    )
    pair_index = torch.tensor([5, 0, 2])
    indices, errors = precompute_reference_errors(method, iter([(pair_index, batch)]))
    table = torch.full((6, 2), float("nan"))
    table[indices] = errors
    cached = ReferenceErrors(table=table, path=Path("unused"), built=True)

    on_the_fly, _ = method.pair_scores(policy, batch)
    from_cache, _ = method.pair_scores(policy, batch, reference_errors=cached.lookup(pair_index))
    assert torch.equal(from_cache.ref_chosen, on_the_fly.ref_chosen)
    assert torch.equal(from_cache.ref_rejected, on_the_fly.ref_rejected)
    config = LossConfig(type=["sigmoid"], beta=5000.0)
    loss, expected = compute_loss(from_cache, config).loss, compute_loss(on_the_fly, config).loss
    assert torch.equal(loss, expected)
    assert abs(expected.item() - np.log(2)) > 1e-3  # the policy is away from the reference


@pytest.mark.parametrize("latent_cache", [False, True])
def test_trainer_with_reference_cache_matches_on_the_fly_in_the_first_epoch_then_repeats_it(
    sd_dir, pairs_file, tmp_path, latent_cache
):
    data = {"cache_dir": str(tmp_path / "latents")} if latent_cache else {}
    plain = recipe_for(diffusion_config(sd_dir, pairs_file, tmp_path / "plain", data=data))
    cached = recipe_for(
        diffusion_config(
            sd_dir, pairs_file, tmp_path / "cached", data=data, model={"reference_cache": str(tmp_path / "ref")}
        )
    )
    assert cached.data_stats["reference_cache_pairs"] == NUM_PAIRS
    assert cached.data_stats["reference_cache_built"] == 1

    def never_called(*args, **kwargs):
        raise AssertionError("a step with the reference cache ran the reference")

    cached.method.reference_errors = never_called

    def loss(recipe, sample_ids):
        with torch.no_grad():
            return recipe.training_step(recipe.model, batch_of(recipe, sample_ids)).loss

    # First epoch: the same draws, so the same loss (the cache was filled in batches [0,1], [2,3], ...).
    first_epoch = [5, 2]
    assert loss(cached, first_epoch).item() == pytest.approx(loss(plain, first_epoch).item(), rel=1e-6)
    # Second epoch: on-the-fly draws afresh; the cached run repeats the first visit's draws exactly.
    second_epoch = [NUM_PAIRS + 5, NUM_PAIRS + 2]
    assert torch.equal(loss(cached, second_epoch), loss(cached, first_epoch))
    assert abs(loss(plain, second_epoch).item() - loss(plain, first_epoch).item()) > 1e-4


def test_reference_cache_is_reused_only_for_the_same_reference_data_and_seed(
    sd_dir, other_sd_dir, pairs_file, tmp_path
):
    reference_dir = tmp_path / "ref"

    def build(model_dir=sd_dir, data_file=pairs_file, **sections):
        model = {"reference_cache": str(reference_dir), **sections.pop("model", {})}
        config = diffusion_config(model_dir, data_file, tmp_path / "run", model=model, **sections)
        return recipe_for(config)

    first = build()
    assert first.data_stats["reference_cache_built"] == 1 and len(cache_files(reference_dir)) == 1
    again = build()
    assert again.data_stats["reference_cache_built"] == 0
    assert torch.equal(again.reference_errors.table, first.reference_errors.table)
    # The adapters are off when the reference runs, so another LoRA shape reads the same table.
    other_lora = build(model={"lora": {"rank": 2}})
    assert other_lora.data_stats["reference_cache_built"] == 0

    other_model = build(model_dir=other_sd_dir)
    assert other_model.data_stats["reference_cache_built"] == 1 and len(cache_files(reference_dir)) == 2
    assert not torch.equal(other_model.reference_errors.table, first.reference_errors.table)
    other_data = build(data_file=write_random_pairs(tmp_path / "other.parquet", count=NUM_PAIRS, seed=1))
    assert other_data.data_stats["reference_cache_built"] == 1
    other_seed = build(run={"seed": 3})  # other noise, timesteps and caption dropout per pair
    assert other_seed.data_stats["reference_cache_built"] == 1
    assert len(cache_files(reference_dir)) == 4


def test_reference_cache_moves_a_frozen_copy_off_the_device_and_trains(sd_dir, pairs_file, tmp_path):
    config = diffusion_config(
        sd_dir,
        pairs_file,
        tmp_path / "run",
        model={"trainable": "full", "reference_cache": str(tmp_path / "ref")},
        run={"max_steps": 2},
    )
    metrics = train(config)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    recipe = recipe_for(config)
    assert recipe.base_model.offload_to_cpu and next(recipe.base_model.copy.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"method": {"name": "inpo"}}, r"method.name: \['dpo'\] only"),
        ({"loss": {"type": ["simpo"]}}, "uses no reference"),
    ],
)
def test_reference_cache_is_refused_where_it_cannot_apply(sd_dir, pairs_file, tmp_path, sections, message):
    with pytest.raises(ValueError, match=message):
        diffusion_config(sd_dir, pairs_file, tmp_path, model={"reference_cache": str(tmp_path)}, **sections)


# --- host syncs ----------------------------------------------------------------------------------------------------


def test_a_training_step_never_reads_a_tensor_on_the_host(sd_dir, pairs_file, tmp_path, monkeypatch):
    """On a GPU each of these waits for the device; the loop reduces metrics lazily, so a step needs none."""
    recipes = [
        recipe_for(diffusion_config(sd_dir, pairs_file, tmp_path / "a", data={"cache_dir": str(tmp_path / "latents")})),
        recipe_for(
            diffusion_config(
                sd_dir,
                pairs_file,
                tmp_path / "b",
                data={"cache_dir": str(tmp_path / "latents")},
                model={"reference_cache": str(tmp_path / "ref")},
            )
        ),
    ]
    batches = [batch_of(recipe, [1, 6]) for recipe in recipes]

    def host_read(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host inside the step")

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    losses = []
    for recipe, batch in zip(recipes, batches):
        output = recipe.training_step(recipe.model, batch)
        output.loss.backward()
        losses.append(output.loss.detach())
    monkeypatch.undo()
    assert all(np.isfinite(loss.item()) for loss in losses)


def test_a_training_step_walks_no_module_tree(sd_dir, pairs_file, tmp_path, monkeypatch):
    """Listing a U-Net's modules or parameters costs more than a small denoiser's forward: the reference's adapter
    switch finds the adapter layers once, so a step after the first walks no module tree."""
    recipe = recipe_for(diffusion_config(sd_dir, pairs_file, tmp_path / "a", data={"cache_dir": str(tmp_path / "latents")}))
    batch = batch_of(recipe, [1, 6])
    recipe.training_step(recipe.model, batch).loss.backward()

    walks = []
    named_modules = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    output = recipe.training_step(recipe.model, batch)
    output.loss.backward()
    monkeypatch.undo()
    assert walks == []
    assert torch.isfinite(output.loss)


def test_the_reference_is_the_base_model_and_the_switch_changes_nothing_else(sd_dir, pairs_file, tmp_path):
    recipe = recipe_for(diffusion_config(sd_dir, pairs_file, tmp_path / "a"))
    policy = recipe.model
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10, 500])
    context = torch.randn(2, 77, policy.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    adapters = {name: p.requires_grad for name, p in policy.named_parameters() if "lora" in name}
    with torch.no_grad():
        lora_output = policy(sample, timesteps, context).sample
        policy.disable_adapters()  # diffusers' own switch: the base model
        base_output = policy(sample, timesteps, context).sample
        policy.enable_adapters()
    with recipe.base_model.use(sample.device) as reference:
        assert {name: p.requires_grad for name, p in policy.named_parameters() if "lora" in name} == adapters
        reference_output = reference(sample, timesteps, context).sample
    with torch.no_grad():
        after = policy(sample, timesteps, context).sample
    assert not torch.equal(base_output, lora_output)  # the adapters matter here
    assert torch.equal(reference_output, base_output)
    assert torch.equal(after, lora_output)
    assert all(adapters.values())


# --- torch.compile -------------------------------------------------------------------------------------------------


# aot_eager runs dynamo's capture and AOT autograd (graph breaks, the adapter switch of the reference, parameter
# names) in seconds; inductor also generates kernels, which takes minutes for the tiny U-Net on a small CPU.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow(minutes=2.5))])
def test_compiled_denoiser_trains_a_step_like_the_eager_one(sd_dir, pairs_file, tmp_path, backend):
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    # With eps far above every |gradient| Adam's first update is lr/eps × the gradient, so comparing weights
    # compares gradients (a sign-like update would turn rounding in tiny gradients into lr-sized steps).
    optim = {"lr": 1e4, "eps": 1e4, "weight_decay": 0.0, "max_grad_norm": None}
    # Compiled kernels round differently (about 1e-7 relative); β = 5000 would turn that into 1e-4 in the loss.
    loss = {"beta": 50.0}

    def one_step(name, compile_denoiser):
        model = {"compile": compile_denoiser, "compile_backend": backend}
        config = diffusion_config(sd_dir, pairs_file, tmp_path / name, model=model, optim=optim, loss=loss)
        metrics = train(config)
        checkpoint = sorted((tmp_path / name / "checkpoints").iterdir())[-1]
        return metrics, load_file(checkpoint / "trainable.safetensors")

    eager_metrics, eager = one_step("eager", False)
    counters.clear()
    compiled_metrics, compiled = one_step("compiled", True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did capture graphs: the step ran compiled
    assert compiled_metrics["loss"] == pytest.approx(eager_metrics["loss"], rel=1e-5)
    assert compiled_metrics["grad_norm"] == pytest.approx(eager_metrics["grad_norm"], rel=1e-4)
    assert eager.keys() == compiled.keys() and all("lora" in name for name in eager)  # names unchanged
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
