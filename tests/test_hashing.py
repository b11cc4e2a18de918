"""Content hashes: length-prefixed parts, module fingerprints over class, config and every tensor."""

import torch
from torch import nn

from diffalign.hashing import ContentHash, content_hash, module_fingerprint


def test_parts_are_length_prefixed():
    assert content_hash("ab", "c") != content_hash("a", "bc")
    assert content_hash("abc") == ContentHash().update("abc").hexdigest() and len(content_hash("x")) == 32


def test_a_module_fingerprint_follows_its_weights_dtype_and_class():
    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    same = nn.Linear(3, 2)
    same.load_state_dict(first.state_dict())
    assert module_fingerprint(first) == module_fingerprint(same)
    with torch.no_grad():
        same.bias[0] += 1e-6
    assert module_fingerprint(first) != module_fingerprint(same)
    assert module_fingerprint(first) != module_fingerprint(first.to(torch.float64))
    assert ContentHash().update_module(first, skip=["bias"]).hexdigest() != module_fingerprint(first)
