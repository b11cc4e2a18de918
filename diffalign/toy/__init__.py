"""Toy worlds: tiny pretrained models in the formats of the real ones, with rewards and preference data.

Each toy module (``t2i``, ``llm``, ``music``) has a ``build(output_dir, seed)`` that rebuilds its assets
from procedurally generated data; ``python -m diffalign.toy build all`` runs them all.
"""
