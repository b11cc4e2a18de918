"""diffalign: preference alignment for diffusion models and LLMs on one shared loss core."""

from diffalign.library_noise import silence_library_noise

__version__ = "0.1.0"

silence_library_noise()
