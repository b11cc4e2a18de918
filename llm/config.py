"""The config of an LLM preference run (``kind: llm``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffalign.config import require_at_least_one
from diffalign.llm.logprobs import RowLayout
from diffalign.losses import LOSSES, LossConfig
from diffalign.training.config import OptimConfig, RunConfig
from diffalign.training.lora import LoraSettings


@dataclass
class LLMLoraSettings(LoraSettings):
    """LoRA for a causal LM: rank 16, alpha 32, on every linear layer, with peft's default initialisation."""

    rank: int = 16
    alpha: float | None = 32.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    init: Literal["gaussian", "default"] = "default"


@dataclass
class LLMModelConfig:
    pretrained: str = "assets/toy-llm"  # a local directory or a hub id
    revision: str | None = None
    trainable: Literal["lora", "full"] = "lora"
    lora: LLMLoraSettings = field(default_factory=LLMLoraSettings)
    # Dtype of the frozen weights (and of full fine-tunes' forward under autocast). auto: bf16 when
    # run.mixed_precision is bf16 on a GPU, fp32 otherwise. Trainable weights are always fp32 masters.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2; None: transformers' default
    # Pack each batch's rows into one sequence (position ids restart on every row) so no compute goes to
    # padding. Pays off when rows differ in length, most with flash attention's variable-length kernels; with
    # SDPA or eager attention the packed sequence gets one block-diagonal mask, whose attention cost grows with
    # the square of the packed length.
    padding_free: bool = False
    # Run each prompt once for all the rows that share it (a pair's chosen and rejected rows, a sampled
    # group): they become one sequence, the prompt then each completion, under an attention mask that hides
    # the completions from one another (llm/shared_prompt.py). The same log-probs from fewer tokens: a
    # quarter fewer for pairs whose prompt is as long as a completion. Needs SDPA and full-attention layers.
    share_prompt: bool = False
    # Dropout makes the policy and reference log-probs of one batch disagree at step 0; TRL also turns it off.
    disable_dropout: bool = True
    # What a LoRA run writes to <output_dir>/final: the merged model or the adapter (both load with
    # transformers' from_pretrained; the adapter needs peft installed).
    save: Literal["merged", "adapter"] = "merged"

    def __post_init__(self) -> None:
        if self.share_prompt and self.padding_free:
            raise ValueError(
                "model.share_prompt and model.padding_free are two layouts of a batch's rows; set one of them"
            )
        if self.share_prompt and self.attn_implementation not in (None, "sdpa"):
            raise ValueError(
                f"model.share_prompt needs SDPA attention (its custom 4D mask), but "
                f"model.attn_implementation is {self.attn_implementation!r}; set it to sdpa or null, or set "
                "model.share_prompt: false"
            )

    @property
    def layout(self) -> RowLayout:
        """How each batch's rows go through the model (``llm/logprobs.py``)."""
        return "shared_prompt" if self.share_prompt else "packed" if self.padding_free else "padded"


@dataclass
class LLMDataConfig:
    """Preference data in one of TRL's schemas, from a local JSONL/JSON/parquet file, a directory or a hub id."""

    # A .jsonl/.json/.parquet/.arrow file, a save_to_disk folder, a folder of data files, or a hub dataset id.
    path: str = "assets/toy-llm/data/conversational_train.jsonl"
    split: str = "train"  # for folders, saved DatasetDicts and hub ids
    subset: str | None = None  # a hub dataset's config name
    revision: str | None = None  # a hub dataset's branch, tag or commit
    # Tokenized rows are cached here (an arrow file per data content, tokenizer and truncation setting), so a
    # second run does not tokenize again.
    cache_dir: str = ".cache/diffalign/tokenized"
    num_proc: int | None = None  # processes that tokenize (datasets' Dataset.map); null: this one
    # Read and tokenize rows as they are trained on (diffalign/streaming.py) instead of all before training:
    # for data too large to download or tokenize ahead.
    streaming: bool = False
    shuffle_buffer: int = 1000  # rows per shuffle window of a stream (1: the stored order within each shard)
    # auto: standard/conversational/implicit-prompt/unpaired from the columns and value types of the first row.
    schema: Literal["auto", "standard", "conversational", "implicit_prompt", "unpaired"] = "auto"
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    max_length: int | None = 1024  # prompt + completion; longer completions keep their first tokens
    # A malformed row (missing field, empty completion, chosen == rejected): stop with an error naming the row,
    # or skip it and log how many were skipped.
    bad_rows: Literal["error", "skip"] = "error"
    max_rows: int | None = None  # use only the first N valid rows (quick experiments)
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        limits = ("max_prompt_length", "max_length", "max_rows", "num_proc")
        require_at_least_one(self, "data", limits, nullable=True)
        if (
            self.max_prompt_length is not None
            and self.max_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"data.max_prompt_length={self.max_prompt_length} must be < data.max_length={self.max_length} "
                "so that every completion keeps at least one token"
            )
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (rows per shuffle window), got {self.shuffle_buffer}")
        if self.streaming and self.max_rows is not None:
            raise ValueError("data.max_rows needs the whole data (data.streaming: false); remove one of them")


@dataclass
class ReferenceConfig:
    """Where the reference log-probs come from.

    frozen_copy: a second, frozen copy of the initial model. adapter_disabled: the LoRA policy with its adapter
    switched off (no second copy). precomputed: one pass of the initial model over the data before training,
    cached on disk and keyed by a hash of the model weights, the tokenizer and the tokenized data, so no
    reference model stays in memory. auto: adapter_disabled for LoRA, frozen_copy for a full fine-tune.
    Reference-free losses (cpo, simpo, orpo, sft) use none of these.
    """

    strategy: Literal["auto", "frozen_copy", "adapter_disabled", "precomputed"] = "auto"
    cache_dir: str = ".cache/diffalign/reference_logps"
    batch_size: int = 8  # pairs per forward when precomputing
    # TR-DPO (TRL's sync_ref_model): every sync_steps optimizer steps π_ref ← mixup_alpha·πθ + (1 − α)·π_ref.
    # null: a fixed reference. Needs a frozen copy of a full fine-tune.
    sync_steps: int | None = None
    mixup_alpha: float = 0.6

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"reference.batch_size must be >= 1, got {self.batch_size}")
        if self.sync_steps is not None and self.sync_steps < 1:
            raise ValueError(f"reference.sync_steps must be >= 1 or null, got {self.sync_steps}")
        if not 0.0 < self.mixup_alpha <= 1.0:
            raise ValueError(f"reference.mixup_alpha must be in (0, 1], got {self.mixup_alpha}")

    def resolved(self, needed: bool, trainable: str) -> str:
        """The strategy a trainer uses: ``auto`` made concrete for ``trainable``; ``none`` when not ``needed``."""
        if not needed:
            return "none"
        if self.strategy == "auto":
            return "adapter_disabled" if trainable == "lora" else "frozen_copy"
        return self.strategy


@dataclass
class LLMEvalConfig:
    """Held-out evaluation: sample the base and the aligned model on the same prompts, compare under a reward.

    The win rate is the fraction of (prompt, sample) slots where the aligned completion scores higher than
    the base one; ties count one half.
    """

    # A JSONL/JSON/parquet file with a `prompt` column (a string, or a list of {role, content} messages that
    # is rendered with the chat template). None: no evaluation.
    prompts: str | None = None
    # "module:function" scoring (prompt_text, completion_text) -> float, e.g. diffalign.toy.llm:toy_reward.
    reward: str | None = None
    max_prompts: int | None = None
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0
    logged_samples: int = 16  # base and aligned completions of the first prompts sent to the trackers

    def __post_init__(self) -> None:
        if self.reward is not None and ":" not in self.reward:
            raise ValueError(
                f"eval.reward={self.reward!r} must be 'module:function', e.g. diffalign.toy.llm:toy_reward"
            )
        if self.reward is not None and self.prompts is None:
            raise ValueError("eval.reward is set but eval.prompts is null; give a file of held-out prompts")
        require_at_least_one(self, "eval", ("samples_per_prompt", "max_new_tokens", "batch_size"))
        if self.temperature <= 0:
            raise ValueError(f"eval.temperature must be > 0 (sampling), got {self.temperature}")


@dataclass
class LLMTrainConfig:
    kind: str = "llm"
    model: LLMModelConfig = field(default_factory=LLMModelConfig)
    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))  # TRL's DPO default
    run: RunConfig = field(default_factory=RunConfig)
    eval: LLMEvalConfig = field(default_factory=LLMEvalConfig)

    def __post_init__(self) -> None:
        if self.kind != "llm":
            raise ValueError(f"kind={self.kind!r} but this is the LLM trainer's config; use kind: llm")
        if self.reference.strategy == "adapter_disabled" and self.model.trainable != "lora":
            raise ValueError(
                "reference.strategy: adapter_disabled needs model.trainable: lora; use frozen_copy or "
                "precomputed (or auto) for a full fine-tune"
            )
        self._check_reference_needs()
        if self.data.streaming:
            if self.reference_strategy == "precomputed":
                raise ValueError(
                    "reference.strategy: precomputed computes the reference over the whole data before training, "
                    "which data.streaming never holds; use frozen_copy or adapter_disabled (or auto)"
                )
            if "kto" in self.loss.type:
                raise ValueError(
                    "loss.type kto pairs each prompt with another row's completion from the whole data, which "
                    "data.streaming never holds; set data.streaming: false"
                )
            if self.run.dataloader_workers:
                raise ValueError(
                    "data.streaming reads and tokenizes rows in the training process; set run.dataloader_workers: 0"
                )
        if self.data.schema == "unpaired":
            paired = [name for name in self.loss.type if LOSSES[name].paired]
            if paired:
                raise ValueError(
                    f"data.schema: unpaired has no chosen/rejected pairs, but loss.type has paired losses {paired}; "
                    f"use an unpaired loss ({[s.name for s in LOSSES.values() if not s.paired]}) or paired data"
                )

    def _check_reference_needs(self) -> None:
        strategy = self.reference_strategy
        token_inputs = self.loss.needed_inputs() & {"token_logps", "token_kl", "token_vocab"}
        if token_inputs and strategy == "precomputed":
            raise ValueError(
                f"loss.type={self.loss.type} (ld_alpha={self.loss.ld_alpha}) needs the reference's per-token "
                "log-probs, but reference.strategy: precomputed stores summed ones; use frozen_copy or "
                "adapter_disabled (or auto)"
            )
        if self.reference.sync_steps is not None and (
            strategy != "frozen_copy" or self.model.trainable != "full"
        ):
            raise ValueError(
                f"reference.sync_steps (TR-DPO) moves a frozen copy of the model towards the policy, but the "
                f"reference is {strategy!r} with model.trainable: {self.model.trainable}; use model.trainable: full "
                "with reference.strategy: frozen_copy (or auto), or set reference.sync_steps: null"
            )

    @property
    def needs_reference(self) -> bool:
        return any(LOSSES[name].needs_reference for name in self.loss.type)

    @property
    def reference_strategy(self) -> str:
        """The resolved strategy; ``none`` when no configured loss needs a reference."""
        return self.reference.resolved(self.needs_reference, self.model.trainable)


@dataclass
class LLMEvalModels:
    # A transformers model directory or hub id; empty: the model.pretrained (and revision) of the aligned run.
    base: str = ""
    revision: str | None = None  # of a hub base
    # A training output directory (its final/), a final/ folder (a merged model or an adapter), or a checkpoint
    # (<output_dir>/checkpoints/step-N, rebuilt from its config; its EMA with run.ema).
    aligned: str = ""


@dataclass
class LLMReportConfig:
    output_dir: str = "outputs/eval/llm"
    confidence: float = 0.95
    side_by_side: int = 16  # prompts whose base and aligned completions report.md shows side by side

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"report.confidence must lie in (0, 1), got {self.confidence}")
        if self.side_by_side < 0:
            raise ValueError(f"report.side_by_side must be >= 0, got {self.side_by_side}")


@dataclass
class LLMEvalRunConfig:
    """``diffalign eval`` of an LLM (``kind: llm_eval``): the base and the aligned model complete the same held-out
    prompts with the same seeds; a reward scores both."""

    kind: str = "llm_eval"
    model: LLMEvalModels = field(default_factory=LLMEvalModels)
    eval: LLMEvalConfig = field(default_factory=LLMEvalConfig)
    report: LLMReportConfig = field(default_factory=LLMReportConfig)
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        if not self.model.aligned:
            raise ValueError(
                "model.aligned is empty; set it to a training output directory, its final/ folder or a checkpoint"
            )
        if self.eval.prompts is None or self.eval.reward is None:
            raise ValueError(
                "eval.prompts and eval.reward must both be set: a file of held-out prompts and a 'module:function' "
                "reward, e.g. diffalign.toy.llm:toy_reward"
            )
