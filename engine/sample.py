"""RecA sample builder: the family's prompt template around the visual prompt, as token ids.

For each image the template's `{image}` becomes `num_visual_tokens` placeholder ids (the
conditioning op later writes the visual prompt over them) and `{instruction}` becomes an
instruction drawn from a pool of "reproduce every visual detail" requests, or, with
probability `fixed_prob`, the fixed short one ("Generate an image."), the visual tokens kept.
Prompts are right-padded to one fixed length so the step never changes shape. Every random
choice is a pure function of (seed, stream position): resuming reproduces it exactly.
"""
from __future__ import annotations

import ast
import importlib.resources
import re
from pathlib import Path

import numpy as np
import torch

from reca.engine.errors import UserError
from reca.models.adapter import PromptBatch, PromptTemplate, TextTokenizer

_FIELD = re.compile(r"(\{image\}|\{instruction\})")


def load_instructions(path: str = "") -> list[str]:
    """One instruction a line from `path` (UTF-8 text), the list of a Python file in the RecA
    authors' format (`path` ending in .py: see `instructions_from_python`), or the pool shipped
    with reca when `path` is empty. A binary file (NUL bytes, or not UTF-8) or one without a line
    of printable text is refused with one line: its bytes would otherwise reach the model as
    garbage tokens."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"prompts file not found: {path}")
        raw = p.read_bytes()
        if b"\0" in raw:
            raise UserError(f"prompts file {path} is binary (it holds NUL bytes); give one instruction a line")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"prompts file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        if p.suffix == ".py":
            return instructions_from_python(text, path)
    else:
        text = (importlib.resources.files("reca.engine.prompts") / "instructions.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if any(ch.isprintable() and not ch.isspace() for ch in line)]
    if not lines:
        raise UserError(f"prompts file has no instructions (no line of printable text): {path}")
    return lines


def instructions_from_python(source: str, path: str = "<prompts>") -> list[str]:
    """The instruction list of a Python file in the RecA authors' format: their `consts.py`
    (BAGEL/data/, Harmon/src/datasets/text2image/, OpenUni/src/datasets/image2image/,
    Show-o/training/), whose `get_recon_prompt_list()` returns a literal list. The file is parsed
    with `ast`, never executed: the list is a function's `return [...]` (or a module-level
    `NAME = [...]`), `get_recon_prompt_list` preferred when there are several; every element must
    be a string literal (adjacent literals are one string, as Python joins them). Duplicates are
    kept: they weight the authors' draw. Anything else is one line."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"prompts file {path} is not valid Python (line {e.lineno}: {e.msg})") from None
    found: list[tuple[str, ast.List]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [(node.name, r.value) for r in ast.walk(node) if isinstance(r, ast.Return) and isinstance(r.value, ast.List)]
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            found += [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.List) and isinstance(node.target, ast.Name):
            found.append((node.target.id, node.value))
    preferred = [f for f in found if f[0] == "get_recon_prompt_list"]
    if preferred:
        found = preferred[:1]
    if len(found) != 1:
        names = ", ".join(sorted({name for name, _ in found})) or "none"
        raise UserError(f"prompts file {path}: expected one literal list of instructions (a function returning "
                        f"[...] or NAME = [...], get_recon_prompt_list preferred); found {len(found)} ({names})")
    name, literal = found[0]
    out = []
    for k, elt in enumerate(literal.elts):
        if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)) or not elt.value.strip():
            what = "an empty string" if isinstance(elt, ast.Constant) and isinstance(elt.value, str) else type(elt).__name__
            raise UserError(f"prompts file {path}: element {k + 1} of {name} (line {elt.lineno}) is {what}, "
                            "not a string literal; the list is read, never run, so it must be literal")
        out.append(elt.value)
    if not out:
        raise UserError(f"prompts file {path}: {name} is an empty list")
    return out


def _parts(text: str, tokenizer: TextTokenizer) -> list:
    parts = _FIELD.split(text)
    if parts.count("{image}") != 1 or parts.count("{instruction}") != 1:
        raise ValueError(f"template needs exactly one {{image}} and one {{instruction}}: {text!r}")
    return [p if p in ("{image}", "{instruction}") else tokenizer.encode(p) for p in parts if p]


def _literal(parts: list) -> int:
    return sum(len(p) for p in parts if isinstance(p, list))


class SampleBuilder:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        template: PromptTemplate,
        num_visual_tokens: int,
        instructions: list[str],
        *,
        fixed_instruction: str = "Generate an image.",
        fixed_prob: float = 0.1,
        max_text_tokens: int = 128,
        seed: int = 0,
    ):
        if template.instruction_per not in ("sample", "batch"):
            raise ValueError(f"template.instruction_per must be 'sample' or 'batch', got {template.instruction_per!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.image_id = tokenizer.token_id(template.image_token)
        self.pad_id = tokenizer.token_id(template.pad_token)
        self.num_visual_tokens = num_visual_tokens
        self.fixed_prob = fixed_prob
        self.seed = seed
        # The templates as lists of literal id chunks and two slots, tokenised once.
        self._parts = _parts(template.text, tokenizer)
        self._pooled = _parts(template.pooled_text, tokenizer) if template.pooled_text else self._parts
        literal = max(_literal(self._parts), _literal(self._pooled))
        if template.text_tokens:  # the text padded to a fixed count (Show-o: 128)
            if template.text_tokens <= literal:
                raise ValueError(f"the template's {literal} text tokens leave none of its {template.text_tokens}")
            max_text_tokens = min(max_text_tokens, template.text_tokens - literal)
            bound = f"the template's {template.text_tokens} text tokens ({literal} of them its own)"
        else:
            bound = f"sample.max_text_tokens={max_text_tokens}"
        self._pool = [tokenizer.encode(s) for s in instructions]
        longest = max(range(len(self._pool)), key=lambda k: len(self._pool[k]), default=None)
        if longest is not None and len(self._pool[longest]) > max_text_tokens:
            text = instructions[longest]
            raise UserError(f"instruction {longest + 1} of {len(instructions)} is {len(self._pool[longest])} tokens with "
                            f"this model's tokenizer, past {bound} (instructions are never cut): "
                            f"{text[:80]!r}{'...' if len(text) > 80 else ''}; raise sample.max_text_tokens or shorten it")
        self._fixed = tokenizer.encode(fixed_instruction)
        if len(self._fixed) > max_text_tokens:
            raise UserError(f"sample.fixed_instruction is {len(self._fixed)} tokens with this model's tokenizer, past "
                            f"{bound} (instructions are never cut)")
        self.max_text_tokens = max_text_tokens
        self.length = literal + num_visual_tokens + max_text_tokens  # P, the same for every batch

    def choose(self, position: int) -> int:
        """Index into the pool for the sample at stream `position`, or -1 for the fixed instruction."""
        rng = np.random.default_rng([self.seed, 0x5EC, position])
        if rng.random() < self.fixed_prob:
            return -1
        return int(rng.integers(len(self._pool)))

    def ids(self, choice: int) -> list[int]:
        """Unpadded prompt ids for a pool index (or -1: the fixed instruction)."""
        if choice < 0:
            return self._layout(self._fixed)
        return self._layout(self._pool[choice], self._pooled)

    def _layout(self, instruction: list[int], parts: list | None = None) -> list[int]:
        out: list[int] = []
        for part in parts or self._parts:
            if part == "{image}":
                out += [self.image_id] * self.num_visual_tokens
            elif part == "{instruction}":
                out += instruction
            else:
                out += part
        return out

    def build_caption(self, tokenizer: TextTokenizer, captions: list, question: str, max_answer_tokens: int
                      ) -> tuple[PromptBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An image-to-text batch: the template with `question` as the instruction, and the
        captions as answers (after the template's `answer_prefix`, ended by its `end_of_turn`),
        right-padded to `max_answer_tokens`. A caption may be a conversation's turns ((q, a), ...:
        a LLaVA source): its first question replaces `question`, and the answer part holds every
        turn, the later questions laid out by the template's `next_turn`, only the answers (and
        their end-of-turn tokens) targets; a conversation past `max_answer_tokens` is cut there,
        as the families' own code cuts it at its max length.
        -> prompt ids/mask [B, P], answer ids [B, A], answer mask [B, A] (all False for an image
        without a caption: it adds nothing to the loss), target mask [B, A] (the tokens scored)."""
        b = len(captions)
        prompt = PromptBatch(torch.full((b, self.length), self.pad_id, dtype=torch.long),
                             torch.zeros(b, self.length, dtype=torch.bool))
        end = tokenizer.token_id(self.template.end_of_turn)
        prefix = self.template.answer_prefix
        ids = torch.full((b, max_answer_tokens), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, max_answer_tokens, dtype=torch.bool)
        target = torch.zeros(b, max_answer_tokens, dtype=torch.bool)
        for row, caption in enumerate(captions):
            turns = caption if isinstance(caption, tuple) else ((question, caption),)
            first = tokenizer.encode(turns[0][0])
            if len(first) > self.max_text_tokens:
                first = first[: self.max_text_tokens]  # a dataset's question: cut as the family's code cuts
            seq = self._layout(first)
            prompt.input_ids[row, : len(seq)] = torch.tensor(seq)
            prompt.mask[row, : len(seq)] = True
            answer, scored = [], []
            for k, (q, a) in enumerate(turns):
                if not a:
                    break
                if k:
                    if not self.template.next_turn:
                        raise UserError("a multi-turn conversation needs the caption template's next_turn "
                                        "(how the family lays out a later question)")
                    between = tokenizer.encode(self.template.next_turn.replace("{instruction}", q))
                    answer, scored = answer + between, scored + [False] * len(between)
                reply = tokenizer.encode(prefix + a) + [end]
                answer, scored = answer + reply, scored + [True] * len(reply)
            if not answer:
                continue
            if len(answer) > max_answer_tokens:  # a single caption keeps its end-of-turn token
                answer = answer[: max_answer_tokens - 1] + [end] if len(turns) == 1 else answer[:max_answer_tokens]
                scored = scored[: max_answer_tokens]
            ids[row, : len(answer)] = torch.tensor(answer)
            mask[row, : len(answer)] = True
            target[row, : len(answer)] = torch.tensor(scored)
        return prompt, ids, mask, target

    def build(self, positions: list[int] | torch.Tensor, fixed: bool = False) -> PromptBatch:
        """Prompts for the samples at these stream positions -> ids [B, P], mask [B, P].

        `fixed=True` uses the fixed instruction for every sample (previews: the visual prompt alone).
        """
        positions = [int(p) for p in positions]
        ids = torch.full((len(positions), self.length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(positions), self.length, dtype=torch.bool)
        shared = self.choose(positions[0]) if positions and self.template.instruction_per == "batch" else None
        for row, pos in enumerate(positions):
            seq = self.ids(-1 if fixed else (shared if shared is not None else self.choose(pos)))
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        return PromptBatch(input_ids=ids, mask=mask)
