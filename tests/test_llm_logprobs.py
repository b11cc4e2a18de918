"""Completion log-probs against a naive full-softmax computation: left and right padding, packed rows, the
chunked output projection (values and gradients, LoRA and full, tied embeddings), and that it never forms the
logits of more than one chunk of positions."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from diffalign.llm import logprobs
from diffalign.llm.batching import collate_rows
from diffalign.llm.logprobs import completion_logps, completion_token_logps, selective_log_softmax, token_kl
from diffalign.llm.model import check_shared_prompt_support

# A 50-token vocabulary, two layers of width 32: the shapes both tiny models below share.
TINY_SHAPES = dict(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_SHAPES)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


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


def test_a_model_that_soft_caps_its_logits_is_scored_through_its_own_forward():
    """Gemma 2 soft-caps lm_head's output in its forward (c·tanh(logits/c), here c = 0.3): the log-probs are
    those of the capped logits, which projecting the hidden states through lm_head alone would miss (by 8e-3)."""
    torch.manual_seed(2)
    config = Gemma2Config(**TINY_SHAPES, head_dim=8, final_logit_softcapping=0.3)
    model = Gemma2ForCausalLM(config).eval()
    assert logprobs.body_and_head(model) is None
    prompts, completions = [[3, 4, 5], [7]], [[10, 11], [12, 13, 14]]
    with torch.no_grad():
        logps, _ = completion_logps(model, **collate_rows(prompts, completions, pad_token_id=0, padding_side="right"))
    expected = [naive_completion_logp(model, p, c) for p, c in zip(prompts, completions)]
    torch.testing.assert_close(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


def test_left_and_right_padding_agree(model):
    prompts, completions = [[1, 2, 3], [4]], [[5], [6, 7, 8, 9]]
    with torch.no_grad():
        right, _ = completion_logps(model, **collate_rows(prompts, completions, 0, "right"))
        left, _ = completion_logps(model, **collate_rows(prompts, completions, 0, "left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def tied_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_SHAPES, tie_word_embeddings=True)).eval()


def with_lora(model: nn.Module) -> nn.Module:
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def make_policy(name: str) -> nn.Module:
    """A tiny fp32 policy: ``llama`` (untied head) or ``qwen2-tied``, fully trainable or with a LoRA."""
    architecture, trainable = name.rsplit("-", 1)
    model = tiny_llama() if architecture == "llama" else tied_qwen2()
    return with_lora(model) if trainable == "lora" else model


PROMPTS = [[3, 4, 5, 6], [7], [8, 9], [10, 11, 12]]
COMPLETIONS = [[13, 14], [15, 16, 17, 18, 19], [20], [21, 22, 23]]
REJECTED = [[24, 25, 26], [27], [28, 29, 30, 31], [32, 33, 34]]  # 11 tokens, as COMPLETIONS


def naive_token_logps(model: nn.Module, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """The plain path: the model's full ``[N, T, V]`` logits, a full log-softmax, the next tokens gathered."""
    mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=False,
    ).logits[:, :-1]
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = log_probs.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked * batch["completion_mask"][:, 1:]


def gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 positions on the 50-token vocabulary, so every batch spans several chunks."""
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 150)
    return 3


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("policy", ["llama-full", "llama-lora", "qwen2-full", "qwen2-lora"])
def test_chunked_logps_and_gradients_equal_the_full_logits_path(policy, side, layout, small_chunks):
    model = make_policy(policy)
    batch = collate_rows(PROMPTS, COMPLETIONS, pad_token_id=0, padding_side=side)
    # Weights of the tokens, so that the gradient depends on each token's log-prob, not only on their sum.
    weights = torch.linspace(0.5, 1.5, batch["input_ids"].shape[1] - 1)

    expected = naive_token_logps(model, batch, temperature=0.7)
    expected_grads = gradients(model, (expected * weights).sum())
    got = completion_token_logps(model, **batch, temperature=0.7, layout=layout)
    got_grads = gradients(model, (got.token_logps * weights).sum())

    torch.testing.assert_close(got.token_logps, expected.detach(), atol=1e-5, rtol=1e-5)
    assert got.lengths.tolist() == [2, 5, 1, 3]
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_chunked_head_gives_log_softmax_and_its_gradients_with_a_bias_and_temperature():
    """``ChunkedLinearLogProbs`` against log_softmax((h·Wᵀ + b)/τ) gathered at the targets, through autograd."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((7, 5), (11, 5), (11,)))
    targets = torch.randint(11, (7,), generator=generator)
    upstream = torch.randn(7, generator=generator)
    results = []
    for chunked in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if chunked:
            logps, _ = logprobs.ChunkedLinearLogProbs.apply(*leaves, targets, 0.7, 3, False)
        else:
            z = (leaves[0] @ leaves[1].T + leaves[2]) / 0.7
            logps = torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (logps * upstream).sum().backward()
        results.append([logps.detach()] + [leaf.grad for leaf in leaves])
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def is_new_tensor(out, args) -> bool:
    """Whether an op's result is a tensor with storage of its own: no view of an input, no in-place result."""
    leaves = torch.utils._pytree.tree_leaves(args)
    inputs = {t.untyped_storage().data_ptr() for t in leaves if torch.is_tensor(t)}
    return isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs


class NewTensorsShaped(TorchDispatchMode):
    """Counts the new tensors of one shape."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_new_tensor(out, args):
            self.count += tuple(out.shape) == self.shape
        return out


def test_the_head_weight_gradient_is_one_buffer_however_many_chunks():
    """A full fine-tune's ``lm_head`` gradient accumulates in place: one ``[V, H]`` tensor for the whole backward,
    not one more per chunk (at Qwen2-0.5B's vocabulary each is 0.5 GiB, the run's peak)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 5, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, generator=generator, requires_grad=True)
    targets = torch.randint(11, (10,), generator=generator)
    logps, _ = logprobs.ChunkedLinearLogProbs.apply(hidden, weight, None, targets, 1.0, 2, False)  # 5 chunks
    with NewTensorsShaped(tuple(weight.shape)) as seen:
        logps.sum().backward()
    assert seen.count == 1


class VocabularyWideOutputs(TorchDispatchMode):
    """Records the shape of every new tensor (no view, no in-place result) whose last dimension is the vocabulary,
    and the rows of those that are products."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size, self.shapes, self.projections = vocab_size, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if is_new_tensor(out, args) and out.dim() >= 2 and out.shape[-1] == self.vocab_size:
            self.shapes.append(tuple(out.shape))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.projections.append(out.shape[0])
        return out


def test_the_output_projection_sees_one_chunk_of_completion_positions_at_a_time(small_chunks):
    """No op of the forward or of the backward makes a vocabulary-wide tensor of more than one chunk, and the
    forward projects exactly the positions that predict a completion token, each chunk once more in backward."""
    model = make_policy("qwen2-full")
    batch = collate_rows(PROMPTS, COMPLETIONS, pad_token_id=0, padding_side="right")
    with VocabularyWideOutputs(vocab_size=50) as forward:
        logps, lengths = completion_logps(model, **batch)
    with VocabularyWideOutputs(vocab_size=50) as backward:
        logps.sum().backward()

    for seen in (forward, backward):
        assert seen.shapes and all(len(shape) == 2 and shape[0] <= small_chunks for shape in seen.shapes)
    assert sum(forward.projections) == lengths.sum() == 11
    assert sorted(backward.projections) == sorted(forward.projections)  # each chunk recomputed once
    # ... into the one vocabulary-wide buffer of its backward: the logits become their own gradient in place
    assert len(backward.shapes) == len(backward.projections)
    assert model.model.embed_tokens.weight.grad is not None  # the tied head's gradient reaches the embedding


def test_padding_free_runs_one_packed_sequence_with_restarting_positions(small_chunks):
    """The packed forward sees one row of the real tokens only, with positions that restart on every row."""
    model = make_policy("llama-full")
    seen = {}

    def record(module, args, kwargs):
        seen.update(ids=kwargs["input_ids"], positions=kwargs["position_ids"], mask=kwargs["attention_mask"])

    model.model.register_forward_pre_hook(record, with_kwargs=True)
    batch = collate_rows(PROMPTS, COMPLETIONS, pad_token_id=0, padding_side="left")
    with torch.no_grad():
        padded, _ = completion_logps(model, **batch)
        packed, _ = completion_logps(model, **batch, layout="packed")
    rows = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    assert seen["ids"].tolist() == [[token for row in rows for token in row]]
    assert seen["positions"].tolist() == [[i for row in rows for i in range(len(row))]]
    assert seen["mask"] is None
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_shared_prompts_run_once_per_prompt_with_each_completion_after_it(small_chunks):
    """Rows in any order are grouped by prompt: one sequence per prompt, its completions after it with
    positions from the prompt's length, each completion attending to the prompt and itself only."""
    model = make_policy("llama-full")
    seen = {}

    def record(module, args, kwargs):
        seen.update(ids=kwargs["input_ids"], positions=kwargs["position_ids"], mask=kwargs["attention_mask"])

    model.model.register_forward_pre_hook(record, with_kwargs=True)
    prompts, completions = [[3, 4], [7], [3, 4]], [[13, 14], [15, 16, 17], [20]]
    batch = collate_rows(prompts, completions, pad_token_id=0, padding_side="left")
    with torch.no_grad():
        padded, _ = completion_logps(model, **batch)
        shared, _ = completion_logps(model, **batch, layout="shared_prompt")
    assert seen["ids"].tolist() == [[3, 4, 13, 14, 20], [7, 15, 16, 17, 0]]
    assert seen["positions"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    first_group = [  # prompt, prompt, completion 1, completion 1, completion 2
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    second_group = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert seen["mask"].squeeze(1).int().tolist() == [first_group, second_group]
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("policy", ["llama-full", "qwen2-lora"])
def test_shared_prompts_give_the_padded_pair_logps_and_gradients(policy, side, small_chunks):
    """Pairs as the collation lays them out (chosen rows, then rejected rows) and as sampled groups come (each
    prompt's rows together): the same per-token log-probs and parameter gradients as separate padded rows."""
    model = make_policy(policy)
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 4, 1, 5, 2, 6, 3, 7]):
        prompts = [(PROMPTS * 2)[i] for i in order]
        completions = [(COMPLETIONS + REJECTED)[i] for i in order]
        batch = collate_rows(prompts, completions, pad_token_id=0, padding_side=side)
        weights = torch.linspace(0.5, 1.5, batch["input_ids"].numel()).view(batch["input_ids"].shape)[:, 1:]
        expected = completion_token_logps(model, **batch)
        expected_grads = gradients(model, (expected.token_logps * weights).sum())
        got = completion_token_logps(model, **batch, layout="shared_prompt")
        got_grads = gradients(model, (got.token_logps * weights).sum())
        torch.testing.assert_close(got.token_logps, expected.token_logps.detach(), atol=1e-5, rtol=1e-5)
        assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 0
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_completion_before_its_prompt_is_refused():
    batch = collate_rows([[3, 4]], [[5]], pad_token_id=0, padding_side="right")
    batch["completion_mask"] = torch.tensor([[1, 0, 1]])
    with pytest.raises(ValueError, match="row 0: its completion tokens are not all after its prompt tokens"):
        completion_logps(make_policy("llama-full"), **batch, layout="shared_prompt")


def test_share_prompt_refuses_a_model_that_would_misread_its_mask():
    """Eager attention adds a mask to the scores (a boolean one would add 1 where it should block), and a
    sliding-window layer would lose its window."""
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    layers = ["sliding_attention"] * TINY_SHAPES["num_hidden_layers"]
    sliding = Qwen2ForCausalLM(Qwen2Config(**TINY_SHAPES, layer_types=layers, sliding_window=4))
    check_shared_prompt_support(tiny_llama(), "tiny")  # SDPA, full attention: accepted
    with pytest.raises(ValueError, match=r"model.pretrained='tiny' runs eager attention with layers \['full"):
        check_shared_prompt_support(eager, "tiny")
    with pytest.raises(ValueError, match="'sliding_attention'"):
        check_shared_prompt_support(sliding, "tiny")


class Wrapped(nn.Module):
    """A model reachable only through its forward, as under DDP or DeepSpeed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **kwargs):
        return self.module(**kwargs)


@pytest.mark.parametrize(
    ("layout", "projected_positions"), [("padded", 22), ("packed", 22), ("shared_prompt", 18)]
)
def test_a_wrapped_model_gets_only_the_completion_logits_from_its_forward(layout, projected_positions):
    """Each pair's chosen and rejected completions (11 tokens each side) are scored; with shared prompts the
    four positions where a prompt's last token predicts both completions' first tokens are projected once."""
    model = make_policy("llama-lora")
    projected = []
    model.get_base_model().lm_head.register_forward_hook(lambda m, a, output: projected.append(output.shape))
    batch = collate_rows(PROMPTS * 2, COMPLETIONS + REJECTED, pad_token_id=0, padding_side="right")
    expected = naive_token_logps(model, batch)
    projected.clear()
    got = completion_token_logps(Wrapped(model), **batch, layout=layout)
    torch.testing.assert_close(got.token_logps, expected.detach(), atol=1e-5, rtol=1e-5)
    assert projected == [torch.Size([projected_positions, 50])]


def test_kept_logits_log_sum_sq_probs_and_token_kl_equal_the_full_rows(small_chunks):
    policy = make_policy("qwen2-lora")
    batch = collate_rows(PROMPTS, COMPLETIONS, pad_token_id=0, padding_side="right")
    mask = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        full = policy(**batch, use_cache=False).logits[:, :-1]
        with policy.disable_adapter():
            reference_full = policy(**batch, use_cache=False).logits[:, :-1]
            reference = completion_token_logps(policy, **batch, keep_logits=True)
    kept = completion_token_logps(policy, **batch, keep_logits=True)
    chunked = completion_token_logps(policy, **batch, with_log_sum_sq_probs=True)

    torch.testing.assert_close(kept.logits, full[mask], atol=1e-5, rtol=0)
    log_probs = torch.log_softmax(full.double(), dim=-1)
    expected_sq = torch.logsumexp(2 * log_probs, dim=-1) * mask
    torch.testing.assert_close(chunked.log_sum_sq_probs.double(), expected_sq, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.token_logps, kept.token_logps, atol=1e-5, rtol=0)
    reference_log_probs = torch.log_softmax(reference_full.double(), dim=-1)
    expected_kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1) * mask
    kl = kept.spread(token_kl(reference.logits, kept.logits))
    torch.testing.assert_close(kl.double(), expected_kl, atol=1e-5, rtol=0)
