"""The README's complete adapter ("Using reca from another repository"), taken from the README
itself and saved as `my_adapter.py`, as a user would: the tests run the very code the README
shows, so the two never drift apart."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- my_adapter.py: begin -->", "<!-- my_adapter.py: end -->"


def example_source() -> str:
    """The Python block between the README's markers."""
    block = README.read_text(encoding="utf-8").split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block.startswith("```python") and block.endswith("```"), "the README's example is one python block"
    return block.removeprefix("```python").removesuffix("```").strip() + "\n"


def write_example(folder: Path) -> Path:
    """`folder`/my_adapter.py -> its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "my_adapter.py"
    path.write_text(example_source(), encoding="utf-8")
    return path


def captioned_images(folder: Path, n: int = 4) -> Path:
    """`n` small images, each with its caption beside it (NAME.txt): a `mix.caption_source`."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    for i, (name, rgb) in enumerate(list(colours.items())[:n]):
        img = np.zeros((24, 32, 3), np.uint8) + np.array(rgb, np.uint8)
        img[6:18, 8:20] = 255 - np.array(rgb, np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} picture with a square", encoding="utf-8")
    return folder
