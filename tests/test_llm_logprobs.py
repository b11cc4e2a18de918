"""Completion log-probs against a naive full-softmax computation, with left and right padding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffalign.llm.batching import collate_rows
from diffalign.llm.logprobs import completion_logps, selective_log_softmax


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def naive_completion_logp(model, prompt: list[int], completion: list[int]) -> float:
    """One unpadded sequence, the full log-softmax, the completion tokens summed."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_equals_full_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 300) * 4).to(dtype)
    tokens = torch.randint(0, 300, (5, 7))
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, tokens, chunk_rows=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_completion_logps_equal_naive_computation(model, side):
    prompts = [[3, 4, 5, 6], [7], [8, 9]]
    completions = [[10, 11], [12, 13, 14, 15, 16], [17]]
    batch = collate_rows(prompts, completions, pad_token_id=0, padding_side=side)
    with torch.no_grad():
        logps, lengths = completion_logps(model, **batch)
    expected = [naive_completion_logp(model, p, c) for p, c in zip(prompts, completions)]
    torch.testing.assert_close(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    assert lengths.tolist() == [2, 5, 1]


def test_left_and_right_padding_agree(model):
    prompts, completions = [[1, 2, 3], [4]], [[5], [6, 7, 8, 9]]
    with torch.no_grad():
        right, _ = completion_logps(model, **collate_rows(prompts, completions, 0, "right"))
        left, _ = completion_logps(model, **collate_rows(prompts, completions, 0, "left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def test_gradient_flows_only_through_completion_tokens(model):
    """Changing a prompt token's logit row must not change anything; changing a completion token's must."""
    batch = collate_rows([[1, 2, 3]], [[4, 5]], 0, "right")
    logits = torch.zeros(1, 5, 50, requires_grad=True)

    class FixedLogits(torch.nn.Module):
        def forward(self, **kwargs):
            return type("Output", (), {"logits": logits})()

    logp, _ = completion_logps(FixedLogits(), **batch)
    logp.sum().backward()
    # Position t predicts token t+1: rows 2 and 3 predict the completion tokens 4 and 5.
    touched = logits.grad.abs().sum(-1)[0]
    assert touched[2] > 0 and touched[3] > 0
    assert touched[0] == 0 and touched[1] == 0 and touched[4] == 0
    assert logp.item() == pytest.approx(2 * -torch.log(torch.tensor(50.0)).item(), abs=1e-5)
