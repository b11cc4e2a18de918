"""Set-level reward maths, checked against independent computations: Fréchet distance (scipy), Vendi (its
definition on hand-built kernels), leave-one-out (brute force), λ-Harmonic (its formula); plus the reference
statistics cache, the registry and input validation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from diffalign.rewards import (
    Audio,
    GaussianStats,
    ScorerConfig,
    build_scorer,
    content_digest,
    frechet_distance,
    frechet_distance_to,
    gaussian_stats,
    lambda_harmonic_reward,
    leave_one_out,
    load_stats,
    mean_cosine_to_reference,
    per_sample_frechet_distance,
    reference_stats,
    vendi_score,
)
from diffalign.rewards.distribution import FrechetScorer, VendiScorer
from diffalign.rewards.encoders import Encoder, unit
from diffalign.rewards.inputs import check_images


def scipy_frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root (as pytorch-fid computes it)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def random_embeddings(count: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return torch.randn(count, dim, generator=generator, dtype=torch.float64) @ mixing + shift


# --- Fréchet distance -------------------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = random_embeddings(200, 6, seed=0), random_embeddings(150, 6, seed=1, shift=0.7)
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    sigma1, sigma2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = scipy_frechet(mu1, sigma1, mu2, sigma2)
    ours = frechet_distance(*(torch.from_numpy(x) for x in (mu1, sigma1, mu2, sigma2)), eps=0.0)
    assert ours.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert expected > 1.0  # the two sets really differ


def test_gaussian_stats_and_set_distance_follow_numpy():
    a, b = random_embeddings(50, 4, seed=2), random_embeddings(40, 4, seed=3, shift=-1.0)
    stats = gaussian_stats(a)
    np.testing.assert_allclose(stats.mean.numpy(), a.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-10)
    assert stats.count == 50
    expected = scipy_frechet(
        a.numpy().mean(0), np.cov(a.numpy(), rowvar=False), b.numpy().mean(0), np.cov(b.numpy(), rowvar=False)
    )
    assert frechet_distance_to(b, stats, eps=0.0).item() == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_gaussians_is_zero_even_when_singular():
    # 5 samples in 16 dimensions: a rank-4 covariance, where sqrtm-based FID code needs its eps fallback.
    a = random_embeddings(5, 16, seed=4)
    stats = gaussian_stats(a)
    assert torch.linalg.matrix_rank(stats.cov) == 4
    scale = stats.cov.trace().item()  # round-off in the zero eigenvalues is amplified by the square root
    for eps in (0.0, 1e-6):
        distance = frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov, eps=eps)
        assert torch.isfinite(distance) and abs(distance.item()) < 1e-7 * scale


def test_frechet_eps_regularises_both_covariances():
    a, b = random_embeddings(5, 16, seed=5), random_embeddings(6, 16, seed=6, shift=0.3)
    sa, sb = gaussian_stats(a), gaussian_stats(b)
    eps = 1e-3
    eye = np.eye(16)
    expected = scipy_frechet(
        sa.mean.numpy(), sa.cov.numpy() + eps * eye, sb.mean.numpy(), sb.cov.numpy() + eps * eye
    )
    assert frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov, eps=eps).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_per_sample_frechet_of_a_point_mass_is_squared_distance_plus_trace():
    reference = gaussian_stats(random_embeddings(100, 5, seed=7))
    samples = random_embeddings(4, 5, seed=8, shift=0.5)
    expected = ((samples - reference.mean) ** 2).sum(1) + reference.cov.trace()
    torch.testing.assert_close(
        per_sample_frechet_distance(samples, reference, eps=0.0), expected, rtol=1e-6, atol=1e-6
    )


def test_per_sample_frechet_with_frames_uses_each_samples_own_gaussian():
    reference = gaussian_stats(random_embeddings(100, 3, seed=9))
    frames = torch.stack([random_embeddings(20, 3, seed=10 + i) for i in range(2)])  # [B=2, N=20, D=3]
    ours = per_sample_frechet_distance(frames, reference, eps=0.0)
    for i in range(2):
        song = frames[i].numpy()
        expected = scipy_frechet(
            reference.mean.numpy(), reference.cov.numpy(), song.mean(0), np.cov(song, rowvar=False)
        )
        assert ours[i].item() == pytest.approx(expected, rel=1e-8)


def test_gaussian_stats_rejects_a_single_sample():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(torch.zeros(1, 4))


# --- Vendi ------------------------------------------------------------------------------------------------------


def test_vendi_of_identical_items_is_one_and_of_orthogonal_items_is_n():
    assert vendi_score(kernel=torch.ones(5, 5)).item() == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(kernel=torch.eye(7)).item() == pytest.approx(7.0, rel=1e-9)
    assert vendi_score(embeddings=torch.eye(4)).item() == pytest.approx(4.0, rel=1e-9)
    assert vendi_score(embeddings=torch.ones(6, 3) * 2.5).item() == pytest.approx(1.0, abs=1e-9)


def test_vendi_of_two_equal_clusters_is_two():
    # Items 0-2 identical, items 3-5 identical, the two groups orthogonal: K/n has eigenvalues 1/2, 1/2.
    kernel = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3))
    assert vendi_score(kernel=kernel).item() == pytest.approx(2.0, rel=1e-9)


def test_vendi_matches_its_definition_on_a_hand_built_kernel():
    kernel = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]], dtype=torch.float64)
    eigenvalues = np.linalg.eigvalsh(kernel.numpy() / 3)
    expected = math.exp(-sum(x * math.log(x) for x in eigenvalues if x > 0))
    assert vendi_score(kernel=kernel).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("count,dim", [(10, 4), (4, 10)])  # both the D×D and the n×n computation
def test_vendi_from_embeddings_equals_the_cosine_kernel(count, dim):
    embeddings = random_embeddings(count, dim, seed=11)
    normalised = embeddings / embeddings.norm(dim=1, keepdim=True)
    expected = vendi_score(kernel=normalised @ normalised.T)
    assert vendi_score(embeddings=embeddings).item() == pytest.approx(expected.item(), rel=1e-9)


def test_vendi_rejects_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        vendi_score()
    with pytest.raises(ValueError, match="ones on its diagonal"):
        vendi_score(kernel=2 * torch.eye(3))


# --- leave-one-out ----------------------------------------------------------------------------------------------


def test_leave_one_out_equals_brute_force_for_vendi_and_fad():
    embeddings = random_embeddings(6, 3, seed=12)
    reference = gaussian_stats(random_embeddings(50, 3, seed=13))
    for set_score in (vendi_score, lambda x: frechet_distance_to(x, reference)):
        expected = []
        for i in range(6):
            rest = torch.cat([embeddings[:i], embeddings[i + 1 :]])
            expected.append(set_score(embeddings).item() - set_score(rest).item())
        np.testing.assert_allclose(
            leave_one_out(set_score, embeddings).numpy(), expected, rtol=1e-9, atol=1e-12
        )


def test_leave_one_out_singles_out_the_duplicate_for_vendi():
    # Two copies of one direction and one orthogonal item: dropping a copy loses less diversity.
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    contributions = leave_one_out(vendi_score, embeddings)
    assert contributions[2] > contributions[0] == pytest.approx(contributions[1].item())


# --- λ-Harmonic and cosine to a reference -----------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_lambda_harmonic_reward_matches_its_formula(lam):
    image_similarity = torch.tensor([0.8, 0.5, 0.9, 0.2])
    text_similarity = torch.tensor([0.3, 0.5, 0.1, 0.25])
    expected = [
        1 / (lam / (i + 1e-8) + (1 - lam) / (t + 1e-8))
        for i, t in zip(image_similarity.tolist(), text_similarity.tolist())
    ]
    np.testing.assert_allclose(
        lambda_harmonic_reward(image_similarity, text_similarity, lam).numpy(), expected, rtol=1e-6
    )
    # The end points are the single similarities; equal similarities are a fixed point.
    if lam in (0.0, 1.0):
        torch.testing.assert_close(
            lambda_harmonic_reward(image_similarity, text_similarity, lam),
            image_similarity if lam else text_similarity,
        )
    assert lambda_harmonic_reward(torch.tensor(0.4), torch.tensor(0.4), lam).item() == pytest.approx(0.4)


def test_mean_cosine_to_reference():
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    expected = torch.tensor([1 / 3, (0.6 + 0.8 - 0.8) / 3])
    torch.testing.assert_close(mean_cosine_to_reference(embeddings, reference), expected)


# --- distribution scorers on a stand-in encoder, and the reference statistics cache -------------------------------


class LinearEncoder(Encoder):
    """A fixed random projection of flattened images, with texts mapped by their length."""

    modality = "image"
    identity = "test:linear"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Linear(3 * 4 * 4, 5)
        self.calls = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return unit(self.projection(images.flatten(1)))

    def embed_texts(self, texts):
        self.calls += 1
        lengths = torch.tensor([[len(text), 1.0, 0.0, 0.0, 0.0] for text in texts])
        return unit(lengths)


def test_frechet_scorer_reductions_agree_with_the_functions():
    encoder = LinearEncoder()
    samples, reference = torch.rand(5, 3, 4, 4), torch.rand(20, 3, 4, 4)
    stats = gaussian_stats(encoder.embed(reference))
    embeddings = encoder.embed(samples)
    set_scorer = FrechetScorer(encoder, "set")
    assert set_scorer.set_level and not set_scorer.higher_is_better
    torch.testing.assert_close(
        set_scorer(samples, reference=reference), frechet_distance_to(embeddings, stats).float()
    )
    per_sample = FrechetScorer(encoder, "per_sample")(samples, reference=stats)
    torch.testing.assert_close(per_sample, per_sample_frechet_distance(embeddings, stats).float())
    loo = FrechetScorer(encoder, "leave_one_out")(samples, reference=reference)
    torch.testing.assert_close(
        loo, leave_one_out(lambda x: frechet_distance_to(x, stats), embeddings).float()
    )
    assert per_sample.shape == loo.shape == (5,)


def test_frechet_scorer_takes_text_exemplars_through_the_text_tower():
    encoder = LinearEncoder()
    exemplars = ["a", "bb", "ccc", "dddd"]
    stats = gaussian_stats(encoder.embed_texts(exemplars))
    samples = torch.rand(3, 3, 4, 4)
    expected = per_sample_frechet_distance(encoder.embed(samples), stats).float()
    torch.testing.assert_close(FrechetScorer(encoder, "per_sample")(samples, reference=exemplars), expected)


def test_vendi_scorer():
    encoder = LinearEncoder()
    samples = torch.rand(6, 3, 4, 4)
    embeddings = encoder.embed(samples)
    torch.testing.assert_close(VendiScorer(encoder)(samples), vendi_score(embeddings).float())
    loo = VendiScorer(encoder, "leave_one_out")(samples)
    torch.testing.assert_close(loo, leave_one_out(vendi_score, embeddings).float())
    with pytest.raises(ValueError, match="reduction"):
        VendiScorer(encoder, "per_sample")


def test_reference_stats_cache_is_keyed_by_encoder_and_content(tmp_path):
    encoder = LinearEncoder()
    exemplars = torch.rand(10, 3, 4, 4)
    first = reference_stats(encoder, exemplars, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and encoder.calls == 1
    second = reference_stats(encoder, exemplars.clone(), tmp_path)
    assert encoder.calls == 1  # read from disk, not re-embedded
    torch.testing.assert_close(second.mean, first.mean)
    torch.testing.assert_close(second.cov, first.cov)
    assert second.count == 10
    changed = exemplars.clone()
    changed[0, 0, 0, 0] += 0.5
    reference_stats(encoder, changed, tmp_path)
    encoder.identity = "test:other-weights"
    reference_stats(encoder, exemplars, tmp_path)
    assert encoder.calls == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_corrupt_cache_file_names_itself(tmp_path):
    path = tmp_path / "stats.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"stats\.safetensors is unreadable.*delete it"):
        load_stats(path)


def test_content_digest_distinguishes_content_and_kind():
    texts = content_digest(["a dog", "a cat"])
    assert texts == content_digest(["a dog", "a cat"])
    assert texts != content_digest(["a doga cat"]) != content_digest(["a cat", "a dog"])
    waveforms = torch.zeros(2, 8)
    assert content_digest(Audio(waveforms, 16_000)) != content_digest(Audio(waveforms, 48_000))
    assert content_digest(torch.zeros(2, 3)) != content_digest(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="cannot hash"):
        content_digest([1, 2])


# --- registry and input validation ------------------------------------------------------------------------------


def test_every_listed_scorer_is_registered():
    expected = {
        "aesthetic",
        "clap_score",
        "clip_i",
        "clip_score",
        "clip_t",
        "dino",
        "fad",
        "hpsv2",
        "image_reward",
        "lambda_harmonic",
        "pickscore",
        "toy_llm",
        "toy_t2i",
        "toy_t2i_centredness",
        "toy_t2m",
        "toy_t2m_fidelity",
        "vendi",
    }
    # A fresh interpreter: other test modules register scorers of their own into this process's registry.
    listed = subprocess.run(
        [sys.executable, "-c", "from diffalign.rewards import scorer_names; print(' '.join(scorer_names()))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(listed) == expected


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'clip_scor' is not registered; available: \['aesthetic'"):
        build_scorer("clip_scor")
    with pytest.raises(ValueError, match=r"no option 'modle'; its options: \['model'"):
        build_scorer("clip_score", modle="x")
    with pytest.raises(ValueError, match=r"dtype: 'half' is not supported"):
        build_scorer("toy_t2i", dtype="half")
    with pytest.raises(ValueError, match="name: 'nope' is not a registered scorer"):
        ScorerConfig(name="nope")
    scorer = ScorerConfig(name="toy_t2i", options={"dtype": "float64"}).build()
    assert scorer.dtype == torch.float64


def test_lambda_must_lie_in_the_unit_interval():
    from diffalign.rewards.similarity import LambdaHarmonicScorer

    with pytest.raises(ValueError, match=r"lam: 1.5 is outside \[0, 1\]"):
        LambdaHarmonicScorer(LinearEncoder(), lam=1.5)


@pytest.mark.parametrize(
    "images,message",
    [
        (torch.rand(2, 4, 8, 8), r"\[batch, 3, height, width\]"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), "divide uint8 by 255"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, r"\(images \+ 1\) / 2"),
        ("image.png", "list of PIL images"),
    ],
)
def test_bad_images_are_rejected_with_the_fix(images, message):
    with pytest.raises(ValueError, match=message):
        check_images(images)


def test_audio_validation():
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        Audio(torch.zeros(2, 1, 100), 16_000)
    with pytest.raises(ValueError, match="32768"):
        Audio(torch.zeros(2, 100, dtype=torch.int16), 16_000)
    with pytest.raises(ValueError, match="sample_rate"):
        Audio(torch.zeros(2, 100), 0)
    audio = Audio(torch.arange(6.0).reshape(3, 2), 8_000)
    assert len(audio) == 3 and audio[1].waveforms.tolist() == [[2.0, 3.0]] and audio[1:].sample_rate == 8_000


def test_gaussian_stats_dataclass_roundtrip(tmp_path):
    from diffalign.rewards import save_stats

    stats = GaussianStats(torch.arange(3.0, dtype=torch.float64), torch.eye(3, dtype=torch.float64), 7)
    save_stats(stats, tmp_path / "s.safetensors", "enc")
    loaded = load_stats(tmp_path / "s.safetensors")
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.cov, stats.cov)
    assert loaded.count == 7
