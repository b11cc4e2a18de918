"""Set-level metrics on any embeddings: Fréchet distance (FID/FAD), Vendi diversity, and leave-one-out
attribution of a set score to its members. Pure functions on tensors, computed in float64.

They let DRAGON-style training build instance-to-distribution rewards (each sample against a reference
set's Gaussian) and distribution-to-distribution rewards (the whole generated set against it, or each
sample's leave-one-out share of that) from any encoder and exemplar set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``count`` embeddings."""

    mean: Tensor
    cov: Tensor
    count: int


def gaussian_stats(embeddings: Tensor) -> GaussianStats:
    """Mean and unbiased (``n − 1``) covariance of ``[N, D]`` embeddings, like ``numpy.cov(rowvar=False)``."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"a Gaussian needs [N >= 2, D] embeddings, got shape {tuple(embeddings.shape)}")
    embeddings = embeddings.double()
    return GaussianStats(embeddings.mean(0), _covariance(embeddings), embeddings.shape[0])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, eps: float = 1e-6) -> Tensor:
    """Fréchet distance between two Gaussians (Dowson & Landau, 1982), as in FID (Heusel et al., 2017) and
    FAD (Kilgour et al., 2019):

        d² = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^{1/2})

    ``tr((Σ1Σ2)^{1/2})`` is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``Σ1^{1/2} Σ2 Σ1^{1/2}`` (similar to Σ1Σ2), found with ``eigh`` and clamped at 0, so singular covariances
    (fewer samples than dimensions) are fine. ``eps·I`` is added to both covariances, as FID code does for
    near-singular ones; the result is the distance between those regularised Gaussians (0 for equal inputs).
    """
    sigma1, sigma2 = _regularise(sigma1, eps), _regularise(sigma2, eps)
    return _frechet(mu1, sigma1, _sqrt_psd(sigma1), mu2, sigma2)


def frechet_distance_to(embeddings: Tensor, reference: GaussianStats, eps: float = 1e-6) -> Tensor:
    """Full-set Fréchet distance between ``[N, D]`` embeddings (N ≥ 2) and a reference Gaussian."""
    stats = gaussian_stats(embeddings)
    return frechet_distance(reference.mean, reference.cov, stats.mean, stats.cov, eps)


def per_sample_frechet_distance(embeddings: Tensor, reference: GaussianStats, eps: float = 1e-6) -> Tensor:
    """Instance-to-distribution Fréchet distance of each sample, ``[B]``.

    ``[B, D]`` embeddings are point masses (zero covariance), for which ``d² = ‖x − μ‖² + tr(Σ)``; ``[B, N, D]``
    gives N embeddings per sample (e.g. frames of a song, as in per-song FAD) and each sample's own Gaussian is
    compared with the reference. ``eps`` regularises the reference covariance only: on a point mass it would
    shift every distance by about ``2√ε·Σ√λ(Σ)``.
    """
    if embeddings.ndim == 2:
        embeddings = embeddings[:, None]
    if embeddings.ndim != 3:
        raise ValueError(f"expected [B, D] or [B, N, D] embeddings, got shape {tuple(embeddings.shape)}")
    reference_cov = _regularise(reference.cov, eps)
    sqrt_reference_cov = _sqrt_psd(reference_cov)  # shared by every sample
    distances = []
    for sample in embeddings.double():
        cov = (
            _covariance(sample) if sample.shape[0] > 1 else sample.new_zeros(sample.shape[1], sample.shape[1])
        )
        distances.append(_frechet(reference.mean, reference_cov, sqrt_reference_cov, sample.mean(0), cov))
    return torch.stack(distances)


def vendi_score(embeddings: Tensor | None = None, kernel: Tensor | None = None) -> Tensor:
    """Vendi score (Friedman & Dieng, TMLR 2023): the exponential of the Shannon entropy of the eigenvalues
    of ``K / n``, for a PSD similarity matrix with ``K_ii = 1``. It is the effective number of distinct items:
    1 when all are identical, n when all are orthogonal.

    Give ``kernel [n, n]`` or ``embeddings [n, D]``, which use the cosine kernel; the latter is computed from the
    ``D × D`` matrix ``X̂ᵀX̂ / n`` when D < n, which has the same non-zero eigenvalues.
    """
    if (embeddings is None) == (kernel is None):
        raise ValueError("vendi_score takes exactly one of `embeddings` or `kernel`")
    if kernel is not None:
        kernel = kernel.double()
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(f"kernel must be a square [n, n] matrix, got shape {tuple(kernel.shape)}")
        if not torch.allclose(kernel.diagonal(), torch.ones_like(kernel.diagonal()), atol=1e-6):
            raise ValueError("kernel must have ones on its diagonal (k(x, x) = 1); normalise it first")
        count, gram = kernel.shape[0], kernel
    else:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [n, D], got shape {tuple(embeddings.shape)}")
        unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
        count = unit.shape[0]
        gram = unit.T @ unit if unit.shape[1] < count else unit @ unit.T
    eigenvalues = torch.linalg.eigvalsh(gram / count).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 0]  # 0 · log 0 = 0
    return torch.exp(-(eigenvalues * eigenvalues.log()).sum())


def leave_one_out(set_score: Callable[[Tensor], Tensor], embeddings: Tensor) -> Tensor:
    """Each member's contribution to a set-level score: ``c_i = f(S) − f(S \\ {i})``, ``[B]``.

    For a higher-is-better score (Vendi) a positive contribution means the sample helps; for a distance (FAD)
    it means the sample pulls the set away from the reference.
    """
    if embeddings.shape[0] < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples, got {embeddings.shape[0]}")
    full = set_score(embeddings)
    keep = ~torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    return torch.stack([full - set_score(embeddings[mask]) for mask in keep])


def _covariance(embeddings: Tensor) -> Tensor:
    dim = embeddings.shape[1]
    return torch.cov(embeddings.T).reshape(dim, dim)  # torch.cov returns a scalar for D = 1


def _regularise(cov: Tensor, eps: float) -> Tensor:
    cov = cov.double()
    return cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _frechet(mu1: Tensor, sigma1: Tensor, sqrt_sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """The Fréchet distance given ``Σ1^{1/2}`` too (shared when one Gaussian meets many)."""
    product = sqrt_sigma1 @ sigma2.double() @ sqrt_sigma1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    difference = mu1.double() - mu2.double()
    return difference @ difference + sigma1.trace() + sigma2.double().trace() - 2 * trace_sqrt
