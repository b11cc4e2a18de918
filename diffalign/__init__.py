"""diffalign: preference alignment for diffusion models and LLMs on one shared loss core."""

__version__ = "0.1.0"
