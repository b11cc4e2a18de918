"""The toy LLM world: a tiny Llama asked to list things in a given format, which it does only sometimes.

A user asks e.g. "List three fruits as a numbered list." The base model was pretrained on procedurally
generated dialogues in which the assistant uses the asked format 60% of the time (otherwise another of the
four formats) and gives the asked number of items 85% of the time (`FOLLOW_FORMAT_PROB`, `RIGHT_COUNT_PROB`);
the small model learns that imperfectly, and sampling it satisfies the request in about a third of answers
(`build_info.json` records the shipped build's rate on held-out prompts). `toy_reward` scores an answer
against the request; the preference data under `assets/toy-llm/data/` are the base model's own samples
labelled by that reward. Alignment is visible as a
rise in the share of answers that follow the request on held-out prompts.

Build: ``python -m diffalign.toy build llm`` (7 minutes on one CPU core).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from diffalign.toy.bpe import train_bpe

_CATEGORY_TABLE = """
fruits: apple banana cherry grape lemon mango orange peach pear plum kiwi melon
animals: cat dog horse cow sheep goat lion tiger bear wolf fox rabbit
colors: red blue green yellow purple pink brown black white gray violet gold
countries: France Spain Italy Japan China India Brazil Canada Mexico Egypt Peru Chile
vegetables: carrot potato onion garlic pepper tomato cabbage lettuce celery spinach radish pea
tools: hammer saw drill wrench shovel rake chisel pliers axe ladder file clamp
instruments: piano guitar violin drum flute trumpet cello harp banjo organ oboe tuba
sports: tennis soccer golf rugby hockey boxing rowing cycling skiing surfing karate judo
birds: eagle owl robin crow swan duck goose parrot hawk dove finch heron
metals: iron copper silver tin zinc lead nickel cobalt platinum steel bronze brass
"""
CATEGORIES: dict[str, tuple[str, ...]] = {
    name: tuple(words.split())
    for name, words in (line.split(":") for line in _CATEGORY_TABLE.strip().splitlines())
}
COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5}
FORMATS: dict[str, str] = {
    "numbered": "as a numbered list",
    "bulleted": "as a bulleted list",
    "comma": "separated by commas",
    "lines": "one per line",
}
TEMPLATES = (
    "List {count} {category} {format}.",
    "Name {count} {category} {format}.",
    "Give me {count} {category}, {format}.",
)

# How often the pretraining dialogues follow the request: the base model inherits these rates.
FOLLOW_FORMAT_PROB = 0.6
RIGHT_COUNT_PROB = 0.85
# The train/held-out split of the prompts is a property of the world, independent of the build seed.
SPLIT_SEED = 1234
HELDOUT_FRACTION = 0.2

PAD, END, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_REQUEST = re.compile(
    r"(?:List|Name|Give me) (?P<count>"
    + "|".join(COUNT_WORDS)
    + r") (?P<category>"
    + "|".join(CATEGORIES)
    + r"),? (?P<format>"
    + "|".join(FORMATS.values())
    + r")\."
)
_NUMBERED_LINE = re.compile(r"(\d+)\. (\S.*)")


# ---------------------------------------------------------------------------------------------------------
# The world: prompts, answers, reward
# ---------------------------------------------------------------------------------------------------------


def all_prompts() -> list[str]:
    return [
        template.format(count=count, category=category, format=phrase)
        for template in TEMPLATES
        for category in CATEGORIES
        for count in COUNT_WORDS
        for phrase in FORMATS.values()
    ]


def load_prompts(split: Literal["train", "heldout"]) -> list[str]:
    """User requests of one split (the held-out ones are never used to build preference training data)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not a toy-LLM prompt split; use 'train' or 'heldout'")
    prompts = all_prompts()
    random.Random(SPLIT_SEED).shuffle(prompts)
    n_heldout = round(HELDOUT_FRACTION * len(prompts))
    return prompts[:n_heldout] if split == "heldout" else prompts[n_heldout:]


def parse_request(prompt: str) -> tuple[int, str, str]:
    """(count, category, format name) asked for in `prompt` (a bare request or a chat-templated text)."""
    match = _REQUEST.search(prompt)
    if match is None:
        raise ValueError(
            f"no toy-LLM request (e.g. 'List three fruits as a numbered list.') in prompt {prompt!r}"
        )
    format_name = next(name for name, phrase in FORMATS.items() if phrase == match["format"])
    return COUNT_WORDS[match["count"]], match["category"], format_name


def render_answer(items: Sequence[str], format_name: str) -> str:
    if format_name == "numbered":
        return "\n".join(f"{i}. {item}" for i, item in enumerate(items, start=1))
    if format_name == "bulleted":
        return "\n".join(f"- {item}" for item in items)
    if format_name == "comma":
        return ", ".join(items)
    if format_name == "lines":
        return "\n".join(items)
    raise ValueError(f"format {format_name!r} is not one of {sorted(FORMATS)}")


def parse_answer(completion: str) -> tuple[str | None, list[str]]:
    """(format name or None when it is none of the four, items) of an answer."""
    text = completion.replace(END, "").strip()
    lines = text.split("\n")
    if len(lines) == 1:
        items = [item.strip() for item in text.split(",")]
        return ("comma" if len(items) > 1 else None), items
    numbered = [_NUMBERED_LINE.fullmatch(line) for line in lines]
    if all(numbered):
        consecutive = [int(m[1]) for m in numbered] == list(range(1, len(lines) + 1))
        return ("numbered" if consecutive else None), [m[2].strip() for m in numbered]
    if all(line.startswith("- ") for line in lines):
        return "bulleted", [line[2:].strip() for line in lines]
    plain = all(
        line.strip() and not line.startswith("-") and "," not in line and not _NUMBERED_LINE.fullmatch(line)
        for line in lines
    )
    return ("lines" if plain else None), [line.strip() for line in lines]


def toy_reward(prompt: str, completion: str) -> float:
    """Score in [0, 1] of an answer to a toy request; 1.0 exactly when the request is fully satisfied.

    ``0.5·[asked format] + 0.25·[asked number of items] + 0.25·(distinct items of the asked category) / max(asked,
    given)``. `prompt` may be the bare request or the chat-templated text; a trailing end token is ignored.
    """
    count, category, format_name = parse_request(prompt)
    answer_format, items = parse_answer(completion)
    valid = {item for item in items if item in CATEGORIES[category]}
    return (
        0.5 * (answer_format == format_name)
        + 0.25 * (len(items) == count)
        + 0.25 * len(valid) / max(count, len(items))
    )


def sample_pretraining_answer(prompt: str, rng: random.Random) -> str:
    """An answer as the pretraining dialogues give it: right format and count only some of the time."""
    count, category, format_name = parse_request(prompt)
    if rng.random() >= FOLLOW_FORMAT_PROB:
        format_name = rng.choice([name for name in FORMATS if name != format_name])
    if rng.random() >= RIGHT_COUNT_PROB:
        count += rng.choice((-1, 1))
    return render_answer(rng.sample(CATEGORIES[category], count), format_name)


# ---------------------------------------------------------------------------------------------------------
# Building the shipped model and data
# ---------------------------------------------------------------------------------------------------------


def chat_text(prompt: str, completion: str | None = None) -> str:
    """The chat-template rendering of a user request (and the assistant's answer, closed by the end token)."""
    text = f"{USER}\n{prompt}{END}{ASSISTANT}\n"
    return text if completion is None else f"{text}{completion}{END}"


def train_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained with `tokenizers`, wrapped for `AutoTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    train_bpe(
        tokenizer,
        corpus,
        vocab_size=vocab_size,
        special_tokens=[PAD, END, USER, ASSISTANT, SYSTEM],
        alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END, pad_token=PAD)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretraining_batch(tokenizer, prompts: Sequence[str], rng: random.Random, batch_size: int):
    """Input ids, attention mask and labels (prompt tokens masked) of freshly generated dialogues."""
    input_ids, labels = [], []
    for _ in range(batch_size):
        prompt = rng.choice(prompts)
        prompt_ids = tokenizer(chat_text(prompt), add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(
            chat_text(prompt, sample_pretraining_answer(prompt, rng)), add_special_tokens=False
        )["input_ids"]
        input_ids.append(full_ids)
        labels.append([-100] * len(prompt_ids) + full_ids[len(prompt_ids) :])
    width = max(map(len, input_ids))
    pad = tokenizer.pad_token_id
    return (
        torch.tensor([ids + [pad] * (width - len(ids)) for ids in input_ids]),
        torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in input_ids]),
        torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    )


def pretrain(model, tokenizer, steps: int, seed: int, batch_size: int = 64, lr: float = 3e-3) -> None:
    rng = random.Random(seed)
    prompts = all_prompts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    model.train()
    start = time.time()
    for step in range(steps):
        input_ids, attention_mask, labels = pretraining_batch(tokenizer, prompts, rng, batch_size)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(
                f"  pretrain step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)",
                flush=True,
            )
    model.eval()


def sample_completions(
    model, tokenizer, prompts: Sequence[str], num_samples: int, seed: int
) -> list[list[str]]:
    """`num_samples` completions per prompt, sampled at temperature 1 (the model's own distribution)."""
    from diffalign.llm.config import LLMEvalConfig
    from diffalign.llm.evaluate import generate_completions

    settings = LLMEvalConfig(max_new_tokens=48, batch_size=128, temperature=1.0, top_p=1.0, seed=seed)
    requests = [[{"role": "user", "content": prompt}] for prompt in prompts for _ in range(num_samples)]
    flat = generate_completions(model, tokenizer, requests, settings)
    return [flat[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def preference_rows(
    prompts: Sequence[str], completions: Sequence[Sequence[str]]
) -> tuple[list[dict], list[dict]]:
    """Pairs (best and worst sample of a prompt, then second best and second worst) and unpaired rows.

    A pair is kept only when its two rewards differ. Unpaired rows are the pairs' samples, labelled desirable
    exactly when they satisfy the request (reward 1).
    """
    pairs, unpaired = [], []
    for prompt, samples in zip(prompts, completions, strict=True):
        ranked = sorted({c: toy_reward(prompt, c) for c in samples}.items(), key=lambda kv: -kv[1])
        for k in range(len(ranked) // 2):
            (chosen, chosen_reward), (rejected, rejected_reward) = ranked[k], ranked[-1 - k]
            if chosen_reward <= rejected_reward:
                break
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            unpaired += [
                {"prompt": prompt, "completion": c, "label": r == 1.0}
                for c, r in ((chosen, chosen_reward), (rejected, rejected_reward))
            ]
    return pairs, unpaired


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_datasets(data_dir: Path, split: str, pairs: Sequence[dict], unpaired: Sequence[dict]) -> None:
    """One split in TRL's standard, conversational and unpaired schemas, plus the bare prompts."""

    def user(prompt: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    write_jsonl(
        data_dir / f"standard_{split}.jsonl",
        [{"prompt": chat_text(p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs],
    )
    write_jsonl(
        data_dir / f"conversational_{split}.jsonl",
        [
            {
                "prompt": user(p["prompt"]),
                "chosen": assistant(p["chosen"]),
                "rejected": assistant(p["rejected"]),
            }
            for p in pairs
        ],
    )
    write_jsonl(
        data_dir / f"unpaired_{split}.jsonl",
        [
            {"prompt": user(u["prompt"]), "completion": assistant(u["completion"]), "label": u["label"]}
            for u in unpaired
        ],
    )
    write_jsonl(data_dir / f"prompts_{split}.jsonl", [{"prompt": user(p)} for p in load_prompts(split)])


def pretrain_toy_llm(output_dir: Path, seed: int, steps: int) -> None:
    """Train the tokenizer and pretrain the toy Llama on generated dialogues; save both to `output_dir`."""
    rng = random.Random(seed)
    print(f"toy LLM: training the tokenizer (seed {seed})", flush=True)
    corpus = [chat_text(p, sample_pretraining_answer(p, rng)) for p in all_prompts() for _ in range(5)]
    tokenizer = train_tokenizer(corpus, vocab_size=1024)
    model = build_model(tokenizer, seed)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"toy LLM: pretraining {size:.2f}M parameters for {steps} steps", flush=True)
    pretrain(model, tokenizer, steps, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def write_preference_data(output_dir: Path, seed: int, samples_per_prompt: int) -> dict[str, dict]:
    """Sample the saved base model on each prompt split, label by `toy_reward`, write `output_dir/data`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    stats = {}
    for split in ("train", "heldout"):
        prompts = load_prompts(split)
        print(
            f"toy LLM: sampling {samples_per_prompt} answers for {len(prompts)} {split} prompts", flush=True
        )
        completions = sample_completions(
            model, tokenizer, prompts, samples_per_prompt, seed=seed + len(split)
        )
        rewards = [toy_reward(p, c) for p, cs in zip(prompts, completions) for c in cs]
        pairs, unpaired = preference_rows(prompts, completions)
        write_datasets(output_dir / "data", split, pairs, unpaired)
        stats[split] = {
            "prompts": len(prompts),
            "satisfied_rate": round(sum(r == 1.0 for r in rewards) / len(rewards), 4),
            "mean_reward": round(sum(rewards) / len(rewards), 4),
            "pairs": len(pairs),
            "unpaired": len(unpaired),
        }
        print(f"toy LLM: {split}: {stats[split]}", flush=True)
    return stats


def build(output_dir: Path, seed: int, *, pretrain_steps: int = 1200, samples_per_prompt: int = 6) -> None:
    """Build the toy LLM world into `output_dir`: tokenizer, pretrained model, preference data, build_info.json."""
    start = time.time()
    output_dir = Path(output_dir)
    pretrain_toy_llm(output_dir, seed, pretrain_steps)
    pretrain_seconds = round(time.time() - start)
    info = {
        "seed": seed,
        "pretrain_steps": pretrain_steps,
        "samples_per_prompt": samples_per_prompt,
        **write_preference_data(output_dir, seed, samples_per_prompt),
        "pretrain_seconds": pretrain_seconds,
        "build_seconds": round(time.time() - start),
    }
    (output_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"toy LLM: written to {output_dir} in {info['build_seconds']} s", flush=True)
