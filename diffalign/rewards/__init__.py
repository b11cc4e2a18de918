"""Rewards and metrics behind one interface: ``build_scorer(name, **options)(samples, prompts, reference=...)``.

Registered scorers (options in each factory's signature):

=================  ===============================================================  ==================
name               score                                                            per
=================  ===============================================================  ==================
clip_score         100 · max(cos(image, prompt), 0), transformers or open_clip CLIP  sample
clip_t             cos(image, prompt) (DreamBench CLIP-T)                           sample
pickscore          exp(logit_scale) · cos, CLIP-H PickScore checkpoint               sample
hpsv2              cos with open_clip ViT-H-14 + HPSv2 checkpoint                    sample
aesthetic          LAION aesthetic MLP on CLIP ViT-L/14 image embeddings             sample
image_reward       ImageReward (needs its checkpoint)                                sample
clip_i, dino       mean cosine to reference images (DreamBench)                      sample
lambda_harmonic    weighted harmonic mean of image–image and text–image similarity   sample
clap_score         cos(audio, prompt), transformers ClapModel or laion-clap          sample
fad                Fréchet distance to a reference set, any encoder (CLAP default)   set or sample
vendi              Vendi diversity, any encoder                                      set or sample
toy_t2i, toy_llm   the toy worlds' scripted rewards                                  sample
=================  ===============================================================  ==================

Weights come from explicit local paths or hub ids; with ``HF_HUB_OFFLINE=1`` anything missing raises
:class:`WeightsNotFoundError` naming the file and where to put it. Heavy optional backends (open_clip,
laion-clap, ImageReward) are imported only when a scorer that needs them is built.
"""

from diffalign.rewards import aesthetic, distribution, image_reward, similarity, toy  # noqa: F401  (registration)
from diffalign.rewards.base import Audio, EmbeddedReference, Images, Modality, Samples, Scorer
from diffalign.rewards.embedding_metrics import (
    GaussianStats,
    frechet_distance,
    frechet_distance_to,
    gaussian_stats,
    leave_one_out,
    per_sample_frechet_distance,
    vendi_score,
)
from diffalign.rewards.encoders import Encoder, EncoderBackend, build_encoder, embed_reference
from diffalign.rewards.reference_stats import content_digest, load_stats, reference_stats, save_stats
from diffalign.rewards.registry import ScorerConfig, build_scorer, register_scorer, scorer_names
from diffalign.rewards.similarity import lambda_harmonic_reward, mean_cosine_to_reference
from diffalign.rewards.weights import WeightsNotFoundError

__all__ = [
    "Audio",
    "EmbeddedReference",
    "Encoder",
    "EncoderBackend",
    "GaussianStats",
    "Images",
    "Modality",
    "Samples",
    "Scorer",
    "ScorerConfig",
    "WeightsNotFoundError",
    "build_encoder",
    "build_scorer",
    "content_digest",
    "embed_reference",
    "frechet_distance",
    "frechet_distance_to",
    "gaussian_stats",
    "lambda_harmonic_reward",
    "leave_one_out",
    "load_stats",
    "mean_cosine_to_reference",
    "per_sample_frechet_distance",
    "reference_stats",
    "register_scorer",
    "save_stats",
    "scorer_names",
    "vendi_score",
]
