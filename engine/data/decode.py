"""Bytes -> RGB image -> the two RecA views: the pixel half of `reca.engine.data`.

Kept apart from the loader so a GPU decoder (DALI, a later issue) can replace `PillowDecoder`
behind the same `ImageDecoder.decode(data, key)` interface, and so worker processes import
nothing but Pillow and numpy to do their part.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # duck-typed at run time: workers need not import the model package
    from reca.models.adapter import ViewSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Transparent pixels are composited over mid-grey: it maps to ~0 in the [-1, 1] generation view
# and close to the dataset mean in the understanding view, so transparency adds no hard black or
# white edges for the model to learn as content, and it is fixed, so it never costs determinism.
ALPHA_BACKGROUND = 127

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(Exception):
    """A sample that cannot be used; `str(e)` is the reason, one line."""


class ImageDecoder(Protocol):
    """What the loader needs from a decoder: encoded bytes in, an RGB `PIL.Image` out."""

    def decode(self, data: bytes, key: str) -> Image.Image:
        """Return an RGB image; raise `BadImage(reason)` for input that cannot be used."""
        ...


def needed_side(views: ViewSpec, crop_scale: float) -> int:
    """Short side a decoded image must keep so that the smallest crop still covers the largest
    view at 2x (a margin for the bicubic resize): images are reduced to this, never below."""
    return math.ceil(2 * max(views.und_size, views.gen_size) / min(crop_scale, 1.0))


class PillowDecoder:
    """Pillow decoding that trusts the content, never the file name, and fails only as `BadImage`.

    `target_side` (see `needed_side`) lets large images be decoded or reduced to a smaller copy
    whose short side is still >= target_side: JPEG via draft mode (DCT scaling, cheap), other
    formats by an integer box reduction after decoding. 0 keeps full resolution.
    """

    def __init__(self, *, min_side: int = 16, max_pixels: int = 64_000_000, target_side: int = 0):
        self.min_side = min_side
        self.max_pixels = max_pixels
        self.target_side = target_side

    def decode(self, data: bytes, key: str) -> Image.Image:
        if not data:
            raise BadImage("empty file")
        try:
            with warnings.catch_warnings():
                # our max_pixels is the limit; Pillow's own bomb warning would only be noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # header only: pixels are not decoded yet
            w, h = img.size
            if w * h > self.max_pixels:
                raise BadImage(f"{w}x{h} pixels exceeds max_pixels={self.max_pixels} (not decoded)")
            if min(w, h) < self.min_side:
                raise BadImage(f"{w}x{h} is smaller than min_side={self.min_side}")
            if self.target_side and img.format == "JPEG":
                img.draft("RGB", (self.target_side, self.target_side))
            img.load()
            img = _exif_upright(img)
            img = to_rgb(img)
        except BadImage:
            raise
        except Image.DecompressionBombError as e:
            raise BadImage(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:  # its message names a BytesIO object, not the file
            raise BadImage("not an image in any format Pillow reads (content, not name, decides)") from None
        except Exception as e:  # Pillow raises many types for corrupt data; all mean "unusable"
            raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
        return _reduce(img, self.target_side)


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not cost an otherwise good image
        return img


def _reduce(img: Image.Image, target_side: int) -> Image.Image:
    factor = min(img.size) // target_side if target_side else 1
    return img.reduce(factor) if factor >= 2 else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha composited over `ALPHA_BACKGROUND`."""
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode))
    elif img.mode == "1":
        img = img.convert("L")
    has_alpha = img.mode in _ALPHA_MODES or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        background = Image.new("RGBA", img.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (and 32-bit int, taken as 16-bit range) or float grey -> uint8 [H, W].

    Pillow's convert() clips these to 0..255 instead of scaling, turning most photos white.
    """
    a = a.astype(np.float32)
    if mode == "F":
        scale = 255.0 if a.size and float(a.max()) <= 1.0 else 1.0  # [0, 1] floats, else 0..255
    else:
        scale = 1.0 / 257.0  # 65535 -> 255 exactly
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def crop_box(w: int, h: int, views: ViewSpec, cfg: Any,
             rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """The ONE crop (x0, y0, x1, y1 in pixels of a w x h image) and flip both views share.

    Every backend calls this (GPU ones on the header's size) so they cut the same region.
    """
    u_scale, u_x, u_y, u_flip = rng.random(4)  # always 4 draws, whatever the settings
    short = min(w, h)
    if cfg.crop_scale < 1.0:
        side = min(short, max(1, round(short * (cfg.crop_scale + (1.0 - cfg.crop_scale) * u_scale))))
        x0, y0 = int(u_x * (w - side + 1)), int(u_y * (h - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
    elif views.gen_resize in ("stretch", "pad"):  # pad: `make_views` adds the grey bands
        box = (0, 0, w, h)
    elif cfg.square_offset == "random":  # OpenUni's crop2square: randint(0, long - short)
        x0, y0 = min(int(u_x * (w - short + 1)), w - short), min(int(u_y * (h - short + 1)), h - short)
        box = (x0, y0, x0 + short, y0 + short)
    else:
        x0, y0 = (w - short) // 2, (h - short) // 2
        box = (x0, y0, x0 + short, y0 + short)
    return box, bool(cfg.hflip) and u_flip < 0.5


def probe(data: bytes, *, max_pixels: int, min_side: int) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header alone, upright (EXIF orientation applied
    to the size), with the same size checks as `PillowDecoder`; raises `BadImage`."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            fmt, mode = img.format or "", img.mode
            if "transparency" in img.info:
                mode += "+t"  # palette/grey transparency: only Pillow composites it
            if w * h > max_pixels:
                raise BadImage(f"{w}x{h} pixels exceeds max_pixels={max_pixels} (not decoded)")
            if min(w, h) < min_side:
                raise BadImage(f"{w}x{h} is smaller than min_side={min_side}")
            orient = img.getexif().get(0x0112, 1) if fmt in ("JPEG", "WEBP", "PNG", "TIFF") else 1
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image in any format Pillow reads (content, not name, decides)") from None
    except Exception as e:
        raise BadImage(f"cannot read the header: {type(e).__name__}: {e}") from None
    return (fmt, mode, h, w) if orient in (5, 6, 7, 8) else (fmt, mode, w, h)


def views_for(views: ViewSpec, cfg: Any) -> ViewSpec:
    """The model's views with `cfg.und_resize` (a DataConfig's) applied: "auto" keeps the family's."""
    choice = getattr(cfg, "und_resize", "auto")
    if choice == "auto" or choice == views.und_resize:
        return views
    return dataclasses.replace(views, und_resize=choice)


def make_views(
    img: Image.Image, views: ViewSpec, cfg: Any, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cut both RecA views from one RGB image with ONE crop and ONE flip draw.

    Returns (und [3, Hu, Wu] float32, normalised by views.und_mean/und_std,
             gen [3, Hg, Wg] float32 in [-1, 1]); both show the same content, and are the
             same array when `views.same_pixels(cfg.und_downscale)`.
    `cfg` is a DataConfig (crop_scale, hflip, und_downscale). All randomness comes from `rng`,
    which the loader seeds from (seed, stream position) alone, so a sample is reproducible
    anywhere: in a worker, in the main process, or after a resume.
    """
    box, flip = crop_box(img.width, img.height, views, cfg, rng)
    und_src, und_box = img, box
    if views.und_resize == "pad" and cfg.crop_scale >= 1.0 and img.width != img.height:
        # the whole image, padded to a square with the understanding mean (expand2square)
        und_src, und_box = _pad_square(img, tuple(int(255 * m) for m in views.und_mean)), None
    if views.gen_resize == "pad" and box[2] - box[0] != box[3] - box[1]:
        img, box = _pad_square(img.crop(box)), None  # Harmon's image-to-text input: grey bands, nothing cut
        if views.und_resize == "same":
            und_src, und_box = img, box
    if views.same_pixels(cfg.und_downscale):  # one array serves as both views
        gen_img = img.resize((views.gen_size,) * 2, Image.Resampling.BICUBIC, box=box)
        gen = np.ascontiguousarray(_chw(gen_img, flip) * np.float32(2 / 255) - np.float32(1.0), np.float32)
        return gen, gen
    if cfg.und_downscale < 1.0:  # down then up: detail is lost on purpose, the size is kept
        small = max(1, round(views.und_size * cfg.und_downscale))
        und_img = und_src.resize((small, small), Image.Resampling.BICUBIC, box=und_box)
        und_img = und_img.resize((views.und_size,) * 2, Image.Resampling.BICUBIC)
    else:
        und_img = und_src.resize((views.und_size,) * 2, Image.Resampling.BICUBIC, box=und_box)
    gen_img = img.resize((views.gen_size,) * 2, Image.Resampling.BICUBIC, box=box)

    mean = np.asarray(views.und_mean, np.float32)[:, None, None]
    std = np.asarray(views.und_std, np.float32)[:, None, None]
    und = (_chw(und_img, flip) * np.float32(1 / 255) - mean) / std
    gen = _chw(gen_img, flip) * np.float32(2 / 255) - np.float32(1.0)
    return np.ascontiguousarray(und, np.float32), np.ascontiguousarray(gen, np.float32)


def _pad_square(img: Image.Image, fill: tuple[int, int, int] = (ALPHA_BACKGROUND,) * 3) -> Image.Image:
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def _chw(img: Image.Image, flip: bool) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)  # [3, H, W]
    return a[:, :, ::-1] if flip else a
