"""Show-o's unified vocabulary and the tokenizer that lays it out (FAMILY_FACTS.md B2).

    [0, T)                 text tokens of the LLM's tokenizer (Phi-1.5: T = 50295)
    [T, T + 10)            [PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>
    [T + 10, T + 10 + K)   image code c -> T + 10 + c (MAGVIT-v2: K = 8192)
    T + 10 + K             the mask token (Show-o: vocab_size - 1 = 58497); total 58498

Show-o adds [PAD] as the pad token first, then the nine task tokens (`UniversalPrompting`);
`<|sot|>`/`<|eot|>` are the tokenizer's bos/eos (`<|endoftext|>` for Phi). The mask token has
no text form upstream; here it is named `<|mask|>` so that it can serve as the placeholder of
the visual prompt in the template (the conditioning op overwrites those positions; the mask id
never occurs in a prompt otherwise).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

SPECIALS = ("[PAD]", "<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
MASK = "<|mask|>"


@dataclass(frozen=True)
class VocabLayout:
    text: int  # T, text tokens
    codebook: int  # K, image codes

    @property
    def code_offset(self) -> int:
        return self.text + len(SPECIALS)

    @property
    def mask_id(self) -> int:
        return self.code_offset + self.codebook

    @property
    def size(self) -> int:
        return self.mask_id + 1


class ShowoTokenizer:
    """A text tokenizer (`TextTokenizer`) extended with Show-o's special tokens and mask token.

    Specials the base tokenizer already has (a directory saved after Show-o added them) keep
    their ids, which must match the layout. The engine ends image-to-text answers with
    `<|im_end|>`; Show-o ends them with the eos, so that name resolves to `<|endoftext|>` when
    the base tokenizer lacks it (Phi's does)."""

    def __init__(self, base, layout: VocabLayout):
        self.base, self.layout = base, layout
        self.vocab_size = layout.size
        self._ids = {name: layout.text + i for i, name in enumerate(SPECIALS)}
        self._ids[MASK] = layout.mask_id
        for name, want in list(self._ids.items()):
            try:
                have = base.token_id(name)
            except KeyError:
                continue
            if have != want:
                raise ValueError(f"tokenizer has {name} at id {have}, Show-o's layout puts it at {want}")
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self._ids) + ")")

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split.split(text):
            if piece in self._ids:
                out.append(self._ids[piece])
            elif piece:
                out += self.base.encode(piece)
        return out

    def token_id(self, token: str) -> int:
        if token in self._ids:
            return self._ids[token]
        try:
            return self.base.token_id(token)
        except KeyError:
            if token == "<|im_end|>":
                return self.base.token_id("<|endoftext|>")
            raise

    def save(self, directory: str) -> None:
        self.base.save(directory)
        with open(os.path.join(directory, "showo_vocab.json"), "w", encoding="utf-8") as f:
            json.dump({"text": self.layout.text, "codebook": self.layout.codebook,
                       "specials": {k: v for k, v in self._ids.items()}}, f, indent=2)

    def __repr__(self) -> str:
        return f"ShowoTokenizer({self.base!r}, vocab={self.vocab_size})"
