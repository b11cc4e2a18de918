"""What an LLM run leaves for people: final/ with its card and provenance, checkpoints exported or evaluated
directly, `diffalign eval` with kind: llm_eval (rewards, t and Wilson intervals, completions side by side), and the
completions in TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TOY_LLM, llm_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from scipy import stats
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffalign.cli import main
from diffalign.config import from_dict
from diffalign.llm.config import LLMEvalConfig
from diffalign.llm.evaluate import generate_completions, load_eval_prompts, render_prompt, score
from diffalign.llm.trainer import train
from diffalign.toy.llm import toy_reward
from diffalign.training.trackers import cell_text

PROMPTS = str(TOY_LLM / "data" / "prompts_heldout.jsonl")
EVAL = {"prompts": PROMPTS, "reward": "diffalign.toy.llm:toy_reward", "max_prompts": 6, "max_new_tokens": 24}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The toy LLM after 3 large LoRA steps, checkpointed every step, evaluated every step into TensorBoard."""
    output = tmp_path_factory.mktemp("llm") / "run"
    train(
        llm_config(
            TOY_LLM, output, eval=EVAL, optim={"lr": 3e-3},
            run={"max_steps": 3, "checkpoint_every": 1, "eval_every": 1, "trackers": ["tensorboard"]},
        )
    )
    return output


def ids() -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(TOY_LLM)
    return tokenizer("<|user|>\nList two cats one per line.<|end|><|assistant|>\n", return_tensors="pt")["input_ids"]


def checkpoint_policy(run: Path, step: int) -> torch.nn.Module:
    """The policy rebuilt here from a checkpoint: the toy LLM with peft's LoRA, loaded with the weights."""
    from peft import get_peft_model

    config = llm_config(TOY_LLM, run)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TOY_LLM), config.model.lora.peft_config(task_type="CAUSAL_LM"))
    weights = load_file(run / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors")
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    return model.eval()


def checkpoint_logits(run: Path, step: int) -> torch.Tensor:
    with torch.no_grad():
        return checkpoint_policy(run, step)(ids()).logits


def test_final_has_a_card_and_provenance_and_checkpoints_export_to_the_same_format(run, tmp_path):
    card = ModelCard.load(run / "final" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"diffalign", "sigmoid", "lora"} <= set(card.data.tags)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [record for record in metrics if "eval/win_rate" in record][-1]
    assert final_eval["step"] == 3 and f"| win_rate | {final_eval['eval/win_rate']:.4f} |" in card.text
    saved = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(TOY_LLM) and saved["provenance"]["libraries"]["transformers"]

    assert main(["export", str(run / "checkpoints" / "step-0000001"), str(tmp_path / "step-1")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "step-1")
    with torch.no_grad():
        logits = exported(ids()).logits
    torch.testing.assert_close(logits, checkpoint_logits(run, 1), atol=1e-5, rtol=1e-5)
    assert (logits - checkpoint_logits(run, 3)).abs().max() > 1e-4  # step 1 is not the final model
    assert AutoTokenizer.from_pretrained(tmp_path / "step-1").eos_token_id == AutoTokenizer.from_pretrained(TOY_LLM).eos_token_id
    card = ModelCard.load(tmp_path / "step-1" / "README.md")
    assert "| optimizer steps | 1, each" in card.text
    step_1_eval = {k: v for r in metrics if r["step"] == 1 for k, v in r.items() if k.startswith("eval/")}
    assert f"| win_rate | {step_1_eval['eval/win_rate']:.4f} |" in card.text  # the evaluation logged at step 1


def test_tensorboard_gets_both_models_completions_with_their_rewards(run):
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    events = EventAccumulator(str(run / "diffalign"), size_guidance={TENSORS: 0})
    events.Reload()
    tables = events.Tensors("samples/table/text_summary")
    assert [table.step for table in tables] == [1, 2, 3]
    lines = tables[-1].tensor_proto.string_val[0].decode().splitlines()
    assert lines[0] == "| prompt | base | base toy_reward | aligned | aligned toy_reward |"
    written = [json.loads(line) for line in (run / "samples" / "step-0000003.jsonl").read_text().splitlines()]
    requests = [json.loads(line)["prompt"][-1]["content"] for line in Path(PROMPTS).read_text().splitlines()[:6]]
    assert lines[2:] == [
        f"| {request} | {cell_text(r['base'])} | {r['base_reward']:.4f} | "
        f"{cell_text(r['aligned'])} | {r['aligned_reward']:.4f} |"
        for request, r in zip(requests, written)
    ]


def interval(values: torch.Tensor) -> tuple[float, float, float]:
    values = values.double()
    half = stats.t.ppf(0.975, len(values) - 1) * values.std().item() / math.sqrt(len(values))
    return values.mean().item(), values.mean().item() - half, values.mean().item() + half


@pytest.mark.parametrize("aligned", ["run", "checkpoint"])
def test_llm_eval_compares_base_and_aligned_on_the_same_seeds(run, tmp_path, aligned):
    target = run if aligned == "run" else run / "checkpoints" / "step-0000003"
    settings = {
        "kind": "llm_eval",
        "model": {"aligned": str(target)},
        "eval": {**EVAL, "samples_per_prompt": 2},
        "report": {"output_dir": str(tmp_path / "report"), "side_by_side": 4},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(settings))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["aligned_kind"] == ("model" if aligned == "run" else "checkpoint")
    assert report["base_model"] == str(TOY_LLM) and report["prompts"]["count"] == 6

    # Independently: both models sample the same prompts from the same seed, and the toy reward scores them.
    config = from_dict(LLMEvalConfig, settings["eval"])
    tokenizer = AutoTokenizer.from_pretrained(TOY_LLM)
    prompts = load_eval_prompts(config)
    texts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    base = generate_completions(AutoModelForCausalLM.from_pretrained(TOY_LLM).eval(), tokenizer, prompts, config)
    trained = (
        AutoModelForCausalLM.from_pretrained(run / "final").eval() if aligned == "run" else checkpoint_policy(run, 3)
    )
    aligned_completions = generate_completions(trained, tokenizer, prompts, config)
    assert [s["base"] for s in report["samples"]] == base
    assert [s["aligned"] for s in report["samples"]] == aligned_completions
    base_rewards, aligned_rewards = score(toy_reward, texts, base), score(toy_reward, texts, aligned_completions)
    assert [s["aligned_reward"] for s in report["samples"]] == pytest.approx(aligned_rewards.tolist())
    assert [s["prompt_text"] for s in report["samples"]] == texts
    assert [s["prompt"] for s in report["samples"]] == [prompt[-1]["content"] for prompt in prompts]

    entry = report["reward"]
    for key, values in (("base", base_rewards), ("aligned", aligned_rewards), ("difference", aligned_rewards - base_rewards)):
        assert (entry[key]["value"], entry[key]["low"], entry[key]["high"]) == pytest.approx(interval(values))
    wins, ties = int((aligned_rewards > base_rewards).sum()), int((aligned_rewards == base_rewards).sum())
    count, z = len(base_rewards), stats.norm.ppf(0.975)
    rate = (wins + ties / 2) / count
    centre = (rate + z**2 / (2 * count)) / (1 + z**2 / count)
    half = z * math.sqrt(rate * (1 - rate) / count + z**2 / (4 * count**2)) / (1 + z**2 / count)
    assert (entry["win_rate"]["wins"], entry["win_rate"]["ties"]) == (wins, ties)
    assert (entry["win_rate"]["value"], entry["win_rate"]["low"], entry["win_rate"]["high"]) == pytest.approx(
        (rate, max(0.0, centre - half), min(1.0, centre + half))
    )

    page = (tmp_path / "report" / "report.md").read_text()
    assert f"({wins}/{ties}/{count - wins - ties}) |" in page and "## Completions (4 of 12)" in page
    first = report["samples"][0]
    assert (
        f"| {cell_text(first['prompt'])} | {cell_text(first['base'])} | {first['base_reward']:.3f} | "
        f"{cell_text(first['aligned'])} | {first['aligned_reward']:.3f} |" in page
    )


def test_llm_eval_configs_are_checked_before_anything_loads(tmp_path, capsys):
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"kind": "llm_eval", "eval": EVAL}))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 2
    assert "model.aligned is empty" in capsys.readouterr().err
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"kind": "llm_eval", "model": {"aligned": "x"}}))
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 2
    assert "eval.prompts and eval.reward must both be set" in capsys.readouterr().err


@pytest.mark.parametrize("model", [{"trainable": "full"}, {"trainable": "lora", "save": "adapter"}])
def test_full_and_adapter_checkpoints_export_as_their_final_folders(tmp_path, model):
    from test_llm_trainer import build_tiny_llm

    tiny = build_tiny_llm(tmp_path / "tiny")
    run = tmp_path / "run"
    train(llm_config(tiny, run, model=model, run={"max_steps": 2, "checkpoint_every": 1}))
    assert main(["export", str(run / "checkpoints" / "step-0000001"), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "adapter_config.json").is_file() == (model.get("save") == "adapter")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    weights = load_file(run / "checkpoints" / "step-0000001" / "trainable.safetensors")
    if model["trainable"] == "full":
        state = exported.state_dict()
        assert state.keys() == weights.keys()
        assert all(torch.equal(state[name], value) for name, value in weights.items())
    else:
        assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    with torch.no_grad():
        step_1, step_2 = exported(ids()).logits, final(ids()).logits
    assert (step_1 - step_2).abs().max() > 1e-5  # the checkpoint's weights, not the final ones
    card = ModelCard.load(tmp_path / "exported" / "README.md")
    assert card.data.library_name == ("peft" if model.get("save") == "adapter" else "transformers")
