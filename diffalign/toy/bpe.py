"""Byte-pair-encoding training that depends on its input alone, for the toy tokenizers.

`tokenizers`' ``BpeTrainer`` numbers the initial alphabet in hash-map order, which changes from run to run,
and breaks ties between equally frequent pairs by those numbers: two builds from the same seed then get
different token ids and different models. Here ties are broken by the pair's text and ids follow a fixed order
(special tokens, the sorted alphabet, then each merge in the order it was learnt), so a build is reproducible.
The algorithm is Sennrich et al. (2016, arXiv 1508.07909).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models


def learn_merges(
    word_counts: Counter[str], vocab_size: int, special_tokens: list[str], alphabet: Iterable[str], suffix: str = ""
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges learnt from pre-tokenized words; ``suffix`` marks a word's last symbol (CLIP's ``</w>``)."""
    symbols = {word: [*word[:-1], word[-1] + suffix] for word in word_counts if word}
    base = set(alphabet) | {symbol for word_symbols in symbols.values() for symbol in word_symbols}
    tokens = list(special_tokens) + sorted(base - set(special_tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, word_symbols in symbols.items():
            for pair in itertools.pairwise(word_symbols):
                pair_counts[pair] += word_counts[word]
        if not pair_counts:
            break  # every word is one token
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for word, word_symbols in symbols.items():
            symbols[word] = _apply_merge(word_symbols, best)
    return vocab, merges


def _apply_merge(word_symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, index = [], 0
    while index < len(word_symbols):
        if index + 1 < len(word_symbols) and (word_symbols[index], word_symbols[index + 1]) == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(word_symbols[index])
            index += 1
    return merged


def train_bpe(
    backend: Tokenizer, corpus: Iterable[str], vocab_size: int, special_tokens: list[str], alphabet: Iterable[str]
) -> None:
    """Replace ``backend``'s BPE model by one learnt on ``corpus`` through the backend's own normalizer and
    pre-tokenizer, keeping the model's options (end-of-word suffix, unknown token, ...)."""
    options = json.loads(backend.to_str())["model"]
    if options.get("type") != "BPE":
        raise ValueError(f"train_bpe needs a BPE tokenizer, got a {options.get('type')} model")
    # Special tokens in the text are matched whole at encoding time, so they are not learnt from.
    special = re.compile("|".join(re.escape(token) for token in special_tokens))
    word_counts: Counter[str] = Counter()
    for text in corpus:
        for piece in special.split(text) if special_tokens else [text]:
            if backend.normalizer is not None:
                piece = backend.normalizer.normalize_str(piece)
            if backend.pre_tokenizer is None:
                word_counts[piece] += 1
            else:
                word_counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(piece))
    suffix = options.get("end_of_word_suffix") or ""
    vocab, merges = learn_merges(word_counts, vocab_size, special_tokens, alphabet, suffix)
    kept = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback")
    backend.model = models.BPE(
        vocab=vocab, merges=merges, **{key: options[key] for key in kept if options.get(key) is not None}
    )
    backend.add_special_tokens(special_tokens)
