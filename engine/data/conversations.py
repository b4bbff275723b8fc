"""Conversation files as a caption source: LLaVA's `llava_v1_5_mix665k.json` layout, an image
and its (question, answer) turns a sample (`SampleBuilder.build_caption` lays the turns out)."""
from __future__ import annotations

import json
import os
from typing import Any

from reca.engine.data.sources import log, printable
from reca.engine.errors import UserError

Turns = tuple  # a conversation: ((question, answer), ...), the first question without its <image> mark


class LlavaSource:
    """A LLaVA-style conversation file (`llava_v1_5_mix665k.json`: a JSON list of {"image":
    relative path, "conversations": [{"from": "human" | "gpt", "value": ...}, ...]}) as a caption
    source: sample i is the image, its "caption" the conversation's (question, answer) turns.
    Image paths are relative to `image_root` (default: the JSON's folder, LLaVA's layout).
    Entries without an image (text-only conversations) or without a human -> gpt turn are left
    out, counted in one line; an image file that cannot be read is a bad sample at read time
    (skipped and counted as any other)."""

    def __init__(self, path: str, image_root: str = ""):
        self.path = os.path.abspath(os.path.expanduser(path))
        try:
            with open(self.path, "rb") as f:
                entries = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise UserError(f"data source {path!r}: no such file") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"data source {path!r}: not a JSON conversation file ({' '.join(str(e).split())[:120]})") \
                from None
        if not isinstance(entries, list):
            raise UserError(f"data source {path!r}: a LLaVA conversation file is a JSON list of entries")
        self.root = os.path.abspath(os.path.expanduser(image_root)) if image_root else os.path.dirname(self.path)
        self.images: list[str] = []
        self.turns: list[Turns] = []
        left = 0
        for entry in entries:
            turns = _turns(entry.get("conversations")) if isinstance(entry, dict) else None
            image = entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(image, str) or not turns:
                left += 1
                continue
            self.images.append(image)
            self.turns.append(turns)
        if not self.images:
            raise UserError(f"data source {path!r}: no entry with an image and a human -> gpt turn")
        if left:
            log.warning("%s: %d of %d entries left out (no image, or no human -> gpt turn)", printable(path),
                        left, len(entries))

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return self.images[i]

    def read(self, i: int) -> bytes:
        with open(os.path.join(self.root, self.images[i]), "rb") as f:
            return f.read()

    def caption(self, i: int) -> Turns:
        return self.turns[i]


def _turns(conversation: Any) -> Turns | None:
    """[{"from": "human", "value": q}, {"from": "gpt", "value": a}, ...] -> ((q, a), ...); the
    first question without LLaVA's <image> mark (the family's template places the image)."""
    if not isinstance(conversation, list):
        return None
    out, question = [], None
    for turn in conversation:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None
        who, text = turn.get("from"), turn["value"]
        if who == "human":
            question = text.replace("<image>", "").strip() if not out else text.strip()
        elif who == "gpt" and question is not None:
            out.append((question, text.strip()))
            question = None
    return tuple(out) or None
