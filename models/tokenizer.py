"""Text tokenizers behind the `TextTokenizer` protocol (`reca.models.adapter`).

* `BPETokenizer`: a byte-level BPE trained with the `tokenizers` library. Any text encodes
  (the full 256-byte alphabet is always in the vocabulary), training is deterministic, and the
  special tokens (`SPECIAL_TOKENS` unless a family names its own) take ids 0, 1, ... in their
  order and are matched literally inside text.
* `tiny_tokenizer(vocab_size, special_tokens)`: the no-download tokenizer of the tiny presets,
  trained on the shipped instruction pool (`reca.engine` package data `prompts/instructions.txt`).
* `HFTokenizer`: a transformers tokenizer loaded from a local directory (never the hub).
* `load_tokenizer(path, vocab_size, special_tokens)`: the first when `path` holds tokenizer
  files, else the tiny one with these special tokens.

The default special tokens follow Qwen2, so a real Qwen tokenizer and ours agree on what the
built-in families' prompt templates use; another family names its own (its template's image,
pad and end-of-turn tokens), the first being the pad / end-of-text token of the saved config.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)

FIXED_INSTRUCTION = "Generate an image."  # RecA's fixed instruction (not part of the pool)
TEMPLATE_STRINGS = ("user", "assistant", "system", "\n", "user\n", "assistant\n")

TOKENIZER_FILE = "tokenizer.json"
# files any of which makes a directory a transformers tokenizer directory
_HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt",
)
_BYTE_ALPHABET_SIZE = 256


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` behind the `TextTokenizer` protocol."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (e.g. for `PreTrainedTokenizerFast(tokenizer_object=...)`)."""
        return self._tok

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens, in id order (id 0 first)."""
        added = self._tok.get_added_tokens_decoder()
        return tuple(added[i].content for i in sorted(added) if added[i].special)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> "BPETokenizer":
        """Train a byte-level BPE on `texts`; `vocab_size` counts specials, bytes and merges (an upper
        bound: a small corpus may run out of merges first). `special_tokens` take ids 0, 1, ... in
        their order. Same inputs give the same vocabulary."""
        special_tokens = tuple(special_tokens)
        if not special_tokens or len(set(special_tokens)) != len(special_tokens) or not all(special_tokens):
            raise ValueError(f"special_tokens must be distinct non-empty strings, got {special_tokens!r}")
        floor = len(special_tokens) + _BYTE_ALPHABET_SIZE
        if vocab_size < floor:
            raise ValueError(f"vocab_size must be at least {floor} (special tokens + 256 bytes), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False: text after a special token (e.g. "<|im_start|>user") stays as written
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),  # ids 0, 1, ... in this order; added as special tokens
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
            min_frequency=0,
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        for i, t in enumerate(special_tokens):  # guaranteed by the trainer; cheap to make sure
            if tok.token_to_id(t) != i:
                raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
        return cls(tok)

    @classmethod
    def load(cls, directory: str) -> "BPETokenizer":
        return cls(Tokenizer.from_file(os.path.join(directory, TOKENIZER_FILE)))

    def save(self, directory: str) -> None:
        """Write `tokenizer.json` (plus a minimal `tokenizer_config.json`, so the directory also loads
        with `transformers.AutoTokenizer` / `HFTokenizer` and gives the same ids)."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.special_tokens[0],
            "pad_token": self.special_tokens[0],
            "model_max_length": 1 << 30,
        }
        config_path = os.path.join(directory, "tokenizer_config.json")
        if not os.path.exists(config_path):  # never clobber a config written by someone else
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(token)
        return i

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def instruction_pool() -> list[str]:
    """The shipped RecA instruction pool (package data of `reca.engine`), one instruction a line."""
    text = (importlib.resources.files("reca.engine.prompts") / "instructions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 1024, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> BPETokenizer:
    """The no-download tokenizer of the tiny presets: a byte-level BPE trained on the instruction
    pool, the fixed instruction and the chat-template words, with `special_tokens` (a family's
    own: its template's image, pad and end-of-turn tokens) at ids 0, 1, ... Cached per arguments."""
    texts = instruction_pool() + [FIXED_INSTRUCTION, *TEMPLATE_STRINGS]
    return BPETokenizer.train(texts, vocab_size, tuple(special_tokens))


class HFTokenizer:
    """A transformers tokenizer from a local directory behind the `TextTokenizer` protocol."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # heavy import: only when a real tokenizer is asked for

        self.path = path
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size: int = len(self._tok)

    @property
    def backend(self):
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)

    def token_id(self, token: str) -> int:
        i = self._tok.convert_tokens_to_ids(token)
        unk = getattr(self._tok, "unk_token", None)
        if i is None or (i == getattr(self._tok, "unk_token_id", None) and token != unk):
            raise KeyError(token)
        return int(i)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save_pretrained(directory)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def is_tokenizer_dir(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in _HF_TOKENIZER_FILES
    )


def load_tokenizer(path: str | None, vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """`HFTokenizer(path)` for a directory holding tokenizer files; `tiny_tokenizer(vocab_size,
    special_tokens)` when no path is given (a family names the special tokens its templates use).
    A path without tokenizer files is an error, never the tiny one."""
    if not path:  # (the default called as tiny_tokenizer(n): one cache entry for both spellings)
        special_tokens = tuple(special_tokens)
        return tiny_tokenizer(vocab_size) if special_tokens == SPECIAL_TOKENS else tiny_tokenizer(vocab_size, special_tokens)
    if not is_tokenizer_dir(path):
        raise ValueError(f"model.tokenizer={path}: " + ("no such directory" if not os.path.isdir(path) else
                         f"no tokenizer files there ({', '.join(_HF_TOKENIZER_FILES)})"))
    return HFTokenizer(path)


__all__ = [
    "SPECIAL_TOKENS", "FIXED_INSTRUCTION", "BPETokenizer", "HFTokenizer", "instruction_pool",
    "tiny_tokenizer", "load_tokenizer", "is_tokenizer_dir",
]
