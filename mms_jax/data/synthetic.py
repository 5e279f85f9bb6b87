"""Synthetic text images: the embedded default data of every mms_jax program.

Each sample is rendered with Pillow from a word (or a random alphanumeric
string) in a random font, composited onto a procedural background, optionally
warped and degraded, and returned together with its exact text mask and a
degraded low-resolution copy (a TextZoom-style super-resolution pair).

Sample `i` depends only on `(config, i)`: the random generator is
`np.random.default_rng([config.seed, i])`, font and word lists are sorted and
the texture bank is a function of the seed, so output does not depend on call
order, worker process or machine (given the same fonts, word list and Pillow).

Usage:

  config = SyntheticConfig(image_size=(32, 128), seed=0, difficulty='normal')
  gen = SyntheticGenerator(config)
  ex = gen.sample(17)      # == gen[17] == render_sample(17, config)
  ex['image']     # uint8 [H, W, 3]
  ex['mask']      # uint8 [H, W], glyph alpha 0..255 (occluders excluded)
  ex['lr_image']  # uint8 [H // lr_scale, W // lr_scale, 3]
  ex['label']     # str
  ex['font']      # font file name, e.g. 'DejaVuSans.ttf'
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import functools
import importlib.resources
import io
import math
import os
import string
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter
from PIL import ImageFont

from mms_jax.data import fonts as fonts_lib

DEFAULT_CHARSET = string.digits + string.ascii_lowercase + string.ascii_uppercase
SYSTEM_WORD_LIST = "/usr/share/dict/words"
BUNDLED_WORD_LIST = "bundled"
DIFFICULTIES = ("normal", "hard")
# Order of `SyntheticConfig.case_probs`.
CASE_MODES = ("as_is", "lower", "upper", "title")

_MIN_STEM = 0.05
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Configuration of the synthetic generator.

  Attributes:
    image_size: (H, W) of the output image.
    seed: non-negative integer; sample i uses default_rng([seed, i]).
    num_samples: length of the generator as a random-access data source.
    min_label_length: shortest label.
    max_label_length: longest label.
    charset: characters allowed in labels; random strings draw from it and
      words are re-cased (or replaced) to fit it.
    fraction_random_strings: probability that a label is a random string from
      `charset` rather than a word.
    case_probs: probabilities of the casings (as_is, lower, upper, title) of
      words.
    word_list: path of a word list (one word per line), 'bundled' for
      mms_jax/assets/words.txt, or None: /usr/share/dict/words when present,
      else the bundled list.
    font_dirs: directories searched for fonts; None means the system font
      directories (or $MMS_JAX_FONT_DIRS). Falls back to matplotlib's fonts.
    font_split: 'train', 'heldout' or 'all' (see fonts.split_fonts).
    heldout_fraction: fraction of fonts held out from 'train'.
    font_split_salt: string mixed into the font hash (a different hold-out).
    difficulty: 'normal' or 'hard' (heavy occlusion, heavy blur, low contrast).
    lr_scale: integer down-sampling factor of `lr_image`.
    render_scale: text is rendered at this multiple of H, then resized.
    appearance: random colours and backgrounds; False draws black text on a
      white background.
    geometry: random rotation, perspective warp and curved baseline.
    degradations: blur, noise, JPEG and contrast reduction of the image.
    occluders: random strokes drawn over the text (not part of the mask).
    clean_fraction: probability that a sample is drawn clean (as with appearance,
      geometry, degradations and occluders all False), decided by its own random
      stream, so 0 leaves every other sample exactly as it is (a training mixture
      of easy images, e.g. to leave the CTC plateau sooner).
    hard_fraction: probability that a sample is drawn at the 'hard' difficulty
      (its own random stream too; a training mixture for robustness). A sample
      drawn clean is clean.
    glyph_augment: probability that a sample's letter shapes are varied beyond its
      font: slanted or back-slanted, bolder or thinner strokes, wider or narrower
      letters (`vary_glyphs`). Its own random stream too, so 0 leaves every sample
      as it is; a training augmentation for fonts never seen in training.
  """

  image_size: tuple[int, int] = (32, 128)
  seed: int = 0
  num_samples: int = 1_000_000
  min_label_length: int = 1
  max_label_length: int = 25
  charset: str = DEFAULT_CHARSET
  fraction_random_strings: float = 0.3
  case_probs: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)
  word_list: str | None = None
  font_dirs: tuple[str, ...] | None = None
  font_split: str = "train"
  heldout_fraction: float = 0.1
  font_split_salt: str = ""
  difficulty: str = "normal"
  lr_scale: int = 2
  render_scale: float = 2.0
  appearance: bool = True
  geometry: bool = True
  degradations: bool = True
  occluders: bool = True
  clean_fraction: float = 0.0
  hard_fraction: float = 0.0
  glyph_augment: float = 0.0

  def __post_init__(self):
    # Accept lists (e.g. from a ConfigDict) but store hashable tuples.
    object.__setattr__(self, "image_size", tuple(self.image_size))
    object.__setattr__(self, "case_probs", tuple(self.case_probs))
    if self.font_dirs is not None:
      if isinstance(self.font_dirs, str):
        object.__setattr__(self, "font_dirs", (self.font_dirs,))
      object.__setattr__(self, "font_dirs", tuple(self.font_dirs))
    self.validate()

  def validate(self):
    """Raises ValueError naming the first invalid field."""

    def check(ok, field, allowed):
      if not ok:
        raise ValueError(f"SyntheticConfig.{field} must be {allowed}; got {getattr(self, field)!r}")

    h_w = self.image_size
    check(
      len(h_w) == 2
      and all(isinstance(v, (int, np.integer)) for v in h_w)
      and h_w[0] >= 8
      and h_w[1] >= 8,
      "image_size",
      "a pair of integers (H, W), each >= 8",
    )
    check(
      isinstance(self.seed, (int, np.integer)) and self.seed >= 0, "seed", "a non-negative integer"
    )
    check(
      isinstance(self.num_samples, (int, np.integer)) and self.num_samples > 0,
      "num_samples",
      "a positive integer",
    )
    check(
      isinstance(self.min_label_length, (int, np.integer)) and self.min_label_length >= 1,
      "min_label_length",
      "an integer >= 1",
    )
    check(
      isinstance(self.max_label_length, (int, np.integer))
      and self.max_label_length >= self.min_label_length,
      "max_label_length",
      f"an integer >= min_label_length ({self.min_label_length})",
    )
    check(
      isinstance(self.charset, str)
      and self.charset
      and all(c.isprintable() and not c.isspace() for c in self.charset),
      "charset",
      "a non-empty string of printable, non-space characters",
    )
    for field in ("clean_fraction", "hard_fraction", "glyph_augment"):
      value = getattr(self, field)
      check(
        isinstance(value, (int, float)) and 0.0 <= value <= 1.0, field, "a probability in [0, 1]"
      )
    check(0.0 <= self.fraction_random_strings <= 1.0, "fraction_random_strings", "in [0, 1]")
    check(
      len(self.case_probs) == len(CASE_MODES)
      and all(p >= 0 for p in self.case_probs)
      and sum(self.case_probs) > 0,
      "case_probs",
      f"{len(CASE_MODES)} non-negative weights for {CASE_MODES} with a positive sum",
    )
    check(
      self.word_list is None or isinstance(self.word_list, str),
      "word_list",
      f"None, {BUNDLED_WORD_LIST!r} or a file path",
    )
    check(
      self.font_dirs is None or all(isinstance(d, str) for d in self.font_dirs),
      "font_dirs",
      "None or a sequence of directory paths",
    )
    check(self.font_split in fonts_lib.FONT_SPLITS, "font_split", f"one of {fonts_lib.FONT_SPLITS}")
    check(0.0 <= self.heldout_fraction < 1.0, "heldout_fraction", "in [0, 1)")
    check(self.difficulty in DIFFICULTIES, "difficulty", f"one of {DIFFICULTIES}")
    check(
      isinstance(self.lr_scale, (int, np.integer))
      and self.lr_scale >= 1
      and h_w[0] // self.lr_scale >= 1
      and h_w[1] // self.lr_scale >= 1,
      "lr_scale",
      "an integer >= 1 not larger than H or W",
    )
    check(1.0 <= self.render_scale <= 8.0, "render_scale", "in [1, 8]")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | Any) -> SyntheticConfig:
    """Builds a config from a dict or an ml_collections.ConfigDict."""
    if hasattr(d, "to_dict"):
      d = d.to_dict()
    d = dict(d)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
      raise ValueError(f"Unknown SyntheticConfig field(s) {unknown}; allowed fields: {allowed}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Style:
  """Probabilities and ranges of the random appearance, per difficulty."""

  contrast: tuple[float, float]  # |luma(text) - luma(background)|, 0..1
  text_height: tuple[float, float]  # fraction of H taken by the text box
  p_rotate: float
  max_angle: float  # degrees
  p_perspective: float
  perspective: float  # max corner shift, fraction of size
  p_curve: float
  curve: float  # max baseline bend, fraction of height
  p_blur: float
  blur: tuple[float, float]  # Gaussian radius at output resolution
  p_noise: float
  noise: tuple[float, float]  # sigma, 0..255
  p_jpeg: float
  jpeg: tuple[int, int]  # quality
  p_low_contrast: float
  low_contrast: tuple[float, float]  # factor applied around the mean
  p_occlude: float
  occluders: tuple[int, int]  # number of strokes
  occluder_width: tuple[float, float]  # fraction of H
  lr_blur: tuple[float, float]  # extra blur before down-sampling (x s)
  lr_noise: tuple[float, float]
  lr_jpeg: tuple[int, int]


_STYLES = {
  "normal": _Style(
    contrast=(0.35, 0.95),
    text_height=(0.55, 0.9),
    p_rotate=0.3,
    max_angle=4.0,
    p_perspective=0.2,
    perspective=0.08,
    p_curve=0.15,
    curve=0.12,
    p_blur=0.25,
    blur=(0.3, 0.9),
    p_noise=0.3,
    noise=(2.0, 8.0),
    p_jpeg=0.3,
    jpeg=(40, 95),
    p_low_contrast=0.1,
    low_contrast=(0.65, 0.9),
    p_occlude=0.15,
    occluders=(1, 1),
    occluder_width=(0.03, 0.07),
    lr_blur=(0.2, 0.6),
    lr_noise=(1.0, 5.0),
    lr_jpeg=(50, 95),
  ),
  "hard": _Style(
    contrast=(0.25, 0.5),
    text_height=(0.45, 0.95),
    p_rotate=0.5,
    max_angle=8.0,
    p_perspective=0.4,
    perspective=0.15,
    p_curve=0.3,
    curve=0.2,
    p_blur=0.9,
    blur=(0.8, 1.5),
    p_noise=0.7,
    noise=(6.0, 18.0),
    p_jpeg=0.5,
    jpeg=(20, 60),
    p_low_contrast=0.6,
    low_contrast=(0.6, 0.85),
    p_occlude=0.9,
    occluders=(2, 4),
    occluder_width=(0.05, 0.12),
    lr_blur=(0.4, 1.0),
    lr_noise=(3.0, 10.0),
    lr_jpeg=(20, 70),
  ),
}


# ----------------------------------------------------------------------------
# Word lists and fonts.


def bundled_word_list_path() -> str:
  return str(importlib.resources.files("mms_jax") / "assets" / "words.txt")


@functools.lru_cache(maxsize=8)
def load_words(path: str | None = None, min_len: int = 2, max_len: int = 25) -> tuple[str, ...]:
  """Reads a word list: plain ASCII alphabetic words, min_len..max_len chars.

  Args:
    path: file path, 'bundled', or None (system list if present, else
      bundled).

  Returns:
    Words in file order, duplicates removed.
  """
  if path is None:
    path = SYSTEM_WORD_LIST if os.path.exists(SYSTEM_WORD_LIST) else (BUNDLED_WORD_LIST)
  if path == BUNDLED_WORD_LIST:
    path = bundled_word_list_path()
  with open(path, encoding="utf-8", errors="ignore") as f:
    words = (line.strip() for line in f)
    keep = (
      w for w in words if w.isascii() and w.isalpha() and max(2, min_len) <= len(w) <= max_len
    )
    return tuple(dict.fromkeys(keep))


@functools.lru_cache(maxsize=1024)
def _load_font(path: str, size: int) -> tuple[ImageFont.FreeTypeFont, int, int]:
  """Returns (font, cap height in pixels, stroke width for thin fonts).

  Hairline fonts vanish at 32 pixels; they get a faux-bold stroke so that
  their mean stem is at least `_MIN_STEM` of the font size.
  """
  font = ImageFont.truetype(path, size)
  cap = max(int(-font.getbbox("H", anchor="ls")[1]), 1)
  canvas = Image.new("L", (size * 2, size * 2), 0)
  ImageDraw.Draw(canvas).text((size // 2, size // 2), "l", fill=255, font=font)
  glyph = np.asarray(canvas, np.float32)
  ink_rows = max(int((glyph > 0).any(axis=1).sum()), 1)
  stem = glyph.sum() / 255.0 / ink_rows
  stroke = max(0, int(math.ceil((_MIN_STEM * size - stem) / 2)))
  return font, cap, stroke


def vary_glyphs(rng: np.random.Generator, text: Image.Image) -> Image.Image:
  """Letter shapes beyond the font, on an 'L' text layer at render resolution.

  Each with probability 1/2: a shear (slant -0.2..0.35 of the height, top to the
  right when positive), a stroke change (one pixel bolder, or thinner when at least
  half the ink survives), a horizontal scale (0.75..1.3).
  """
  w, h = text.size
  if rng.random() < 0.5:
    slant = float(rng.uniform(-0.2, 0.35))
    extra = int(math.ceil(abs(slant) * h))
    # Output (x, y) reads input (x + slant * y + offset, y); PIL's AFFINE maps that way.
    offset = -slant * h if slant > 0 else 0.0
    text = text.transform((w + extra, h), Image.AFFINE, (1, slant, offset, 0, 1, 0), Image.BILINEAR)
  if rng.random() < 0.5:
    if rng.random() < 0.5:
      text = text.filter(ImageFilter.MaxFilter(3))
    else:
      thinner = text.filter(ImageFilter.MinFilter(3))
      ink = float(np.asarray(text, np.float32).sum())
      if np.asarray(thinner, np.float32).sum() >= 0.5 * ink:
        text = thinner
  if rng.random() < 0.5:
    w, h = text.size
    text = text.resize((max(1, int(round(w * rng.uniform(0.75, 1.3)))), h), Image.BILINEAR)
  return text


# ----------------------------------------------------------------------------
# Small random helpers (all take the per-sample generator).


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
  return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _luma(rgb: np.ndarray) -> float:
  return float(rgb @ _LUMA)


def _color_with_luma(rng: np.random.Generator, target: float) -> np.ndarray:
  """A random RGB colour in [0, 1]^3 with luma exactly `target`."""
  rgb = rng.random(3, dtype=np.float32)
  if rng.random() < 0.5:  # Many real texts are nearly grey.
    rgb = rgb * 0.3 + rgb.mean() * 0.7
  lum = _luma(rgb)
  if target <= lum:  # Mix towards black or white: luma is linear in RGB.
    return rgb * (target / max(lum, 1e-6))
  return rgb + (1.0 - rgb) * ((target - lum) / max(1.0 - lum, 1e-6))


def _text_and_background_colors(rng, style: _Style):
  """Returns (fg, bg, contrast): RGB in 0..255 with |luma difference| set."""
  contrast = _uniform(rng, style.contrast)
  bg_luma = float(rng.random())
  room_up, room_down = 1.0 - bg_luma, bg_luma
  if max(room_up, room_down) < contrast:  # Move the background to make room.
    bg_luma = 0.0 if rng.random() < 0.5 else 1.0
    room_up, room_down = 1.0 - bg_luma, bg_luma
  up_ok, down_ok = room_up >= contrast, room_down >= contrast
  go_up = up_ok and (not down_ok or rng.random() < 0.5)
  fg_luma = bg_luma + contrast if go_up else bg_luma - contrast
  bg = _color_with_luma(rng, bg_luma) * 255.0
  fg = _color_with_luma(rng, fg_luma) * 255.0
  return fg, bg, contrast


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Coefficients for Image.transform(PERSPECTIVE) mapping dst -> src points."""
  rows = []
  for (x, y), (u, v) in zip(dst, src):
    rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
  a = np.asarray(rows, np.float64)
  return np.linalg.solve(a, src.reshape(8).astype(np.float64))


# ----------------------------------------------------------------------------
# Procedural textures.


def _smooth_noise(rng, shape: tuple[int, int], cell: int, cell_x: int | None = None) -> np.ndarray:
  """Value noise in [-1, 1] with features about `cell` pixels wide."""
  h, w = shape
  cell_x = cell_x or cell
  small = rng.standard_normal((max(h // cell, 1) + 2, max(w // cell_x, 1) + 2), dtype=np.float32)
  img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
  arr = np.asarray(img, np.float32)
  return arr / (np.abs(arr).max() + 1e-6)


def _make_texture(rng, shape: tuple[int, int]) -> np.ndarray:
  """One procedural texture, float32 [h, w] in about [-1, 1]."""
  h, w = shape
  kind = rng.integers(5)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  if kind == 0:  # Clouds: octaves of value noise.
    tex = sum(_smooth_noise(rng, shape, c) / k for k, c in enumerate((64, 24, 8, 3), start=1))
  elif kind == 1:  # Wood / marble: warped stripes.
    warp = _smooth_noise(rng, shape, 48) * rng.uniform(4, 12)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.04, 0.2)
    tex = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + warp)
  elif kind == 2:  # Paper grain: fibres plus fine noise.
    fibres = _smooth_noise(rng, shape, 2, 16) + _smooth_noise(rng, shape, 16, 2)
    tex = fibres + 0.4 * rng.standard_normal(shape, dtype=np.float32)
  elif kind == 3:  # Ruled or squared paper.
    period = rng.integers(8, 24)
    tex = ((yy % period) < 1).astype(np.float32)
    if rng.random() < 0.5:
      tex = np.maximum(tex, (xx % period) < 1)
    tex = tex * 2 - 0.3 + 0.2 * _smooth_noise(rng, shape, 16)
  else:  # Blotches: thresholded noise, like stains or worn paint.
    tex = np.tanh(3 * _smooth_noise(rng, shape, 32)) + 0.3 * _smooth_noise(rng, shape, 6)
  tex = tex - tex.mean()
  return (tex / (np.abs(tex).max() + 1e-6)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _texture_bank(seed: int, shape: tuple[int, int], count: int = 12) -> tuple[np.ndarray, ...]:
  """Textures to crop backgrounds from; a pure function of (seed, shape)."""
  rng = np.random.default_rng([seed, 0x7E7])
  return tuple(_make_texture(rng, shape) for _ in range(count))


# ----------------------------------------------------------------------------
# The generator.


class SyntheticGenerator:
  """Deterministic random-access source of synthetic text images.

  `gen.sample(i)` (also `gen[i]`) returns a dict:
    image: uint8 [H, W, 3].
    mask: uint8 [H, W], per-pixel glyph alpha in 0..255 (255 = fully text),
      after exactly the warps and placement applied to the image; occluding
      strokes are not part of it.
    lr_image: uint8 [H // lr_scale, W // lr_scale, 3], a blurred, down-sampled
      and noisy/JPEG copy of `image`.
    label: str, 1..max_label_length characters from config.charset.
    font: file name of the font used.
  """

  def __init__(self, config: SyntheticConfig | Mapping[str, Any] | None = None):
    if config is None:
      config = SyntheticConfig()
    elif not isinstance(config, SyntheticConfig):
      config = SyntheticConfig.from_dict(config)
    self.config = config
    self._base_style = _STYLES[config.difficulty]
    all_fonts = fonts_lib.discover_fonts(config.font_dirs, "".join(sorted(set(config.charset))))
    self.fonts = fonts_lib.split_fonts(
      all_fonts, config.font_split, config.heldout_fraction, config.font_split_salt
    )
    self._charset = "".join(sorted(set(config.charset)))
    self._charset_set = frozenset(self._charset)
    self.words = tuple(
      w
      for w in load_words(config.word_list, config.min_label_length, config.max_label_length)
      if self._fits_charset(w)
    )
    h, w = config.image_size
    self._textures = (
      _texture_bank(config.seed, (max(4 * h, 128), max(4 * w, 512))) if config.appearance else ()
    )
    case_p = np.asarray(config.case_probs, np.float64)
    self._case_cdf = np.cumsum(case_p / case_p.sum())

  def __repr__(self) -> str:
    return f"SyntheticGenerator({self.config!r})"

  def __len__(self) -> int:
    return self.config.num_samples

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.sample(index)

  @property
  def font_names(self) -> tuple[str, ...]:
    return tuple(os.path.basename(p) for p in self.fonts)

  # -- labels ----------------------------------------------------------------

  def _fits_charset(self, word: str) -> bool:
    return any(set(v) <= self._charset_set for v in (word, word.lower(), word.upper()))

  def _random_string(self, rng) -> str:
    cfg = self.config
    lo, hi = cfg.min_label_length, cfg.max_label_length
    if rng.random() < 0.85:  # Mostly word-like lengths; long ones are rare.
      hi = max(lo, min(hi, 10))
    n = int(rng.integers(lo, hi + 1))
    idx = rng.integers(len(self._charset), size=n)
    return "".join(self._charset[i] for i in idx)

  def _word(self, rng) -> str:
    word = self.words[int(rng.integers(len(self.words)))]
    mode_index = int(np.searchsorted(self._case_cdf, rng.random(), side="right"))
    mode = CASE_MODES[min(mode_index, len(CASE_MODES) - 1)]
    cased = {
      "as_is": word,
      "lower": word.lower(),
      "upper": word.upper(),
      "title": word[:1].upper() + word[1:].lower(),
    }[mode]
    for candidate in (cased, word, word.lower(), word.upper()):
      if set(candidate) <= self._charset_set:
        return candidate
    return word  # Unreachable: words are filtered by _fits_charset.

  def sample_label(self, rng: np.random.Generator) -> str:
    if not self.words or rng.random() < self.config.fraction_random_strings:
      return self._random_string(rng)
    return self._word(rng)

  # -- text layer ------------------------------------------------------------

  def _render_text(self, rng, label: str, font_path: str) -> Image.Image:
    """Renders `label` as an 'L' alpha image at render resolution.

    The canvas spans from the cap height (or the highest ink) to the lowest
    ink, so lower-case words keep their x-height relative to capitals.
    """
    h = self.config.image_size[0]
    size = max(
      8, int(round(h * self.config.render_scale * (0.55, 0.65, 0.75)[int(rng.integers(3))]))
    )
    font, cap, stroke = _load_font(font_path, size)
    x0, y0, x1, y1 = font.getbbox(label, anchor="ls")
    top, bottom = min(y0, -cap), max(y1, 0)
    pad = max(2, size // 10) + stroke
    width, height = max(x1 - x0, 1) + 2 * pad, bottom - top + 2 * pad
    img = Image.new("L", (width, height), 0)
    if rng.random() < 0.1:  # Occasional faux bold.
      stroke += 1
    ImageDraw.Draw(img).text(
      (pad - x0, pad - top),
      label,
      fill=255,
      font=font,
      anchor="ls",
      stroke_width=stroke,
      stroke_fill=255,
    )
    return img

  def _warp(self, rng, img: Image.Image, st: _Style) -> Image.Image:
    """Curved baseline, perspective and rotation, each with some probability."""
    if rng.random() < st.p_curve:
      img = self._curve(rng, img, st)
    if rng.random() < st.p_perspective:
      w, h = img.size
      src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
      shift = rng.uniform(0, st.perspective, size=(4, 2)) * [w, h]
      shift[:, 0] = np.minimum(shift[:, 0], 0.5 * h)  # Keep words readable.
      dst = src + shift * [[1, 1], [-1, 1], [-1, -1], [1, -1]]
      img = img.transform(
        img.size, Image.PERSPECTIVE, _perspective_coeffs(src, dst), Image.BILINEAR
      )
    if rng.random() < st.p_rotate:
      w, h = img.size
      # Long texts rotate less so they still fit the output box.
      max_angle = min(st.max_angle, math.degrees(math.atan(2.0 * h / w)))
      img = img.rotate(
        float(rng.uniform(-max_angle, max_angle)), resample=Image.BILINEAR, expand=True
      )
    return img

  def _curve(self, rng, img: Image.Image, st: _Style) -> Image.Image:
    """Shifts columns vertically along a sine arc (a curved baseline)."""
    a = np.asarray(img)
    h, w = a.shape
    amp = st.curve * h * float(rng.uniform(0.4, 1.0))
    phase = rng.uniform(0, 2 * np.pi)
    cycles = rng.uniform(0.3, 0.8)
    dy = amp * np.sin(phase + 2 * np.pi * cycles * np.arange(w) / w)
    dy = np.round(dy - dy.min()).astype(np.int32)
    out = np.zeros((h + int(dy.max()), w), np.uint8)
    rows = np.arange(h)[:, None] + dy[None, :]
    out[rows, np.arange(w)[None, :]] = a
    return Image.fromarray(out)

  def _fit(self, rng, img: Image.Image, st: _Style) -> np.ndarray:
    """Resizes the text layer into an [H, W] uint8 alpha, at a random spot.

    The height is a random fraction of H; long texts are squeezed
    horizontally by at most 1.5x, then shrunk as a whole.
    """
    out_h, out_w = self.config.image_size
    w, h = img.size
    target_h = out_h * _uniform(rng, st.text_height)
    max_w = out_w * float(rng.uniform(0.85, 1.0))
    scale = target_h / h
    new_w = w * scale * float(rng.uniform(0.9, 1.1))
    if new_w > max_w:
      new_w = max(max_w, new_w / 1.5)
      if new_w > max_w:
        scale *= max_w / new_w
        new_w = max_w
    new_h = min(out_h, max(1, int(round(h * scale))))
    new_w = min(out_w, max(1, int(round(new_w))))
    small = np.asarray(img.resize((new_w, new_h), Image.BILINEAR))
    y = int(rng.integers(0, out_h - new_h + 1))
    x = int(rng.integers(0, out_w - new_w + 1))
    if rng.random() < 0.6:  # Mostly roughly centred, as in cropped words.
      x = (x + (out_w - new_w) // 2) // 2
    alpha = np.zeros((out_h, out_w), np.uint8)
    alpha[y : y + new_h, x : x + new_w] = small
    return alpha

  # -- appearance ------------------------------------------------------------

  def _background(self, rng, bg: np.ndarray, contrast: float) -> np.ndarray:
    """Float32 [H, W, 3] background around colour `bg` (0..255).

    Variations stay within a third of the text contrast so text stays visible.
    """
    h, w = self.config.image_size
    kind = rng.random()
    amp = 255.0 * contrast / 3.0
    if kind < 0.3:
      return np.broadcast_to(bg, (h, w, 3)).astype(np.float32)
    tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    if kind < 0.55:  # Linear gradient in a random direction.
      angle = rng.uniform(0, 2 * np.pi)
      ramp = (
        np.cos(angle) * np.linspace(-1, 1, w, dtype=np.float32)[None]
        + np.sin(angle) * np.linspace(-1, 1, h, dtype=np.float32)[:, None]
      )
      field = ramp / max(abs(np.cos(angle)) + abs(np.sin(angle)), 1e-6)
    elif kind < 0.7:  # Smooth blotchy noise.
      field = _smooth_noise(rng, (h, w), int(rng.integers(4, 24)))
    else:  # A crop of a procedural texture.
      tex = self._textures[int(rng.integers(len(self._textures)))]
      y = int(rng.integers(0, tex.shape[0] - h + 1))
      x = int(rng.integers(0, tex.shape[1] - w + 1))
      field = tex[y : y + h, x : x + w]
    return bg + field[..., None] * (amp * tint)

  def _occlude(self, rng, img: Image.Image, fg: np.ndarray, st: _Style) -> None:
    """Draws random strokes (lines, arcs) over `img` in place."""
    h, w = self.config.image_size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(st.occluders[0], st.occluders[1] + 1))):
      width = max(1, int(round(h * _uniform(rng, st.occluder_width))))
      if rng.random() < 0.5:  # Text-coloured strokes are the hardest.
        color = tuple(int(c) for c in fg)
      else:
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
      x0, x1 = sorted(rng.uniform(-0.1 * w, 1.1 * w, size=2))
      y0, y1 = rng.uniform(-0.1 * h, 1.1 * h, size=2)
      if rng.random() < 0.6:
        draw.line([(x0, y0), (x1, y1)], fill=color, width=width)
      else:
        box = [x0, min(y0, y1) - h, max(x1, x0 + 4), max(y0, y1) + h]
        start = float(rng.uniform(0, 360))
        draw.arc(box, start, start + float(rng.uniform(60, 200)), fill=color, width=width)

  def _degrade(self, rng, img: Image.Image, st: _Style) -> np.ndarray:
    """Blur, contrast loss, noise and JPEG; returns uint8 [H, W, 3]."""
    if rng.random() < st.p_blur:
      img = img.filter(ImageFilter.GaussianBlur(_uniform(rng, st.blur)))
    arr = None
    if rng.random() < st.p_low_contrast:
      arr = np.asarray(img, np.float32)
      mean = arr.mean(axis=(0, 1), keepdims=True)
      arr = mean + (arr - mean) * _uniform(rng, st.low_contrast)
    if rng.random() < st.p_noise:
      if arr is None:
        arr = np.asarray(img, np.float32)
      # Luminance-only (grey) noise half the time, colour noise otherwise.
      channels = 1 if rng.random() < 0.5 else 3
      arr = arr + _uniform(rng, st.noise) * rng.standard_normal(
        arr.shape[:2] + (channels,), dtype=np.float32
      )
    if arr is not None:
      img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < st.p_jpeg:
      img = _jpeg(img, int(rng.integers(st.jpeg[0], st.jpeg[1] + 1)))
    return np.asarray(img)

  def _low_res(self, rng, image: np.ndarray, st: _Style) -> np.ndarray:
    """TextZoom-style LR copy: blur, down-sample, noise and/or JPEG."""
    h, w = self.config.image_size
    s = self.config.lr_scale
    img = Image.fromarray(image)
    # Area (BOX) and bilinear down-sampling already low-pass; extra optical
    # blur is added to most samples.
    if rng.random() < 0.7:
      img = img.filter(ImageFilter.GaussianBlur(_uniform(rng, st.lr_blur) * s))
    resample = (Image.BILINEAR, Image.BICUBIC, Image.BOX)[int(rng.integers(3))]
    img = img.resize((w // s, h // s), resample)
    if rng.random() < 0.5:
      arr = np.asarray(img, np.float32) + _uniform(rng, st.lr_noise) * rng.standard_normal(
        (h // s, w // s, 3), dtype=np.float32
      )
      img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
      img = _jpeg(img, int(rng.integers(st.lr_jpeg[0], st.lr_jpeg[1] + 1)))
    return np.asarray(img)

  # -- public ----------------------------------------------------------------

  def sample(
    self, index: int, clean_fraction: float | None = None, hard_fraction: float | None = None
  ) -> dict[str, Any]:
    """Renders sample `index` (deterministic in (config, index, fractions)).

    clean_fraction, hard_fraction: override the config's mixture for this sample
    (a training curriculum); None keeps the config's.
    """
    cfg = self.config
    index = int(index)
    if index < 0:
      raise ValueError(f"index must be >= 0, got {index}")
    clean_fraction = cfg.clean_fraction if clean_fraction is None else clean_fraction
    hard_fraction = cfg.hard_fraction if hard_fraction is None else hard_fraction
    rng = np.random.default_rng([int(cfg.seed), index])
    clean = clean_fraction > 0 and (
      np.random.default_rng([int(cfg.seed), index, 1]).random() < clean_fraction
    )
    hard = hard_fraction > 0 and (
      np.random.default_rng([int(cfg.seed), index, 2]).random() < hard_fraction
    )
    # The style travels as an argument: one generator serves concurrent reader threads.
    style = _STYLES["hard"] if hard else self._base_style
    label = self.sample_label(rng)
    font_path = self.fonts[int(rng.integers(len(self.fonts)))]

    text = self._render_text(rng, label, font_path)
    if cfg.glyph_augment > 0:
      glyph_rng = np.random.default_rng([int(cfg.seed), index, 3])
      if glyph_rng.random() < cfg.glyph_augment:
        text = vary_glyphs(glyph_rng, text)
    if cfg.geometry and not clean:
      text = self._warp(rng, text, style)
    mask = self._fit(rng, text, style)

    if cfg.appearance and not clean:
      fg, bg, contrast = _text_and_background_colors(rng, style)
      background = self._background(rng, bg, contrast)
    else:
      h, w = cfg.image_size
      fg = np.zeros(3, np.float32)
      background = np.full((h, w, 3), 255.0, np.float32)
    a = mask[..., None].astype(np.float32) * (1.0 / 255.0)
    composite = background + (fg - background) * a
    img = Image.fromarray(np.clip(composite + 0.5, 0, 255).astype(np.uint8))

    if cfg.occluders and not clean and rng.random() < style.p_occlude:
      self._occlude(rng, img, fg, style)
    image = self._degrade(rng, img, style) if cfg.degradations and not clean else np.asarray(img)
    lr_image = self._low_res(rng, image, style)
    return {
      "image": np.ascontiguousarray(image, np.uint8),
      "mask": mask,
      "lr_image": np.ascontiguousarray(lr_image, np.uint8),
      "label": label,
      "font": os.path.basename(font_path),
    }

  def sample_batch(self, indices: Sequence[int]) -> dict[str, Any]:
    """Stacks `sample(i)` for `indices`: arrays get a leading batch axis."""
    examples = [self.sample(i) for i in indices]
    return {
      k: (
        np.stack([e[k] for e in examples])
        if isinstance(examples[0][k], np.ndarray)
        else [e[k] for e in examples]
      )
      for k in examples[0]
    }


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=quality)
  buf.seek(0)
  out = Image.open(buf)
  out.load()
  return out


@functools.lru_cache(maxsize=8)
def _generator_for(config: SyntheticConfig) -> SyntheticGenerator:
  return SyntheticGenerator(config)


def render_sample(index: int, config: SyntheticConfig | None = None) -> dict[str, Any]:
  """Functional form of `SyntheticGenerator(config).sample(index)`."""
  return _generator_for(config or SyntheticConfig()).sample(index)


def save_sample_grid(path: str, config: SyntheticConfig | None = None, n: int = 8) -> None:
  """Saves a PNG grid of n samples: image, mask and LR copy, normal and hard.

  Args:
    path: output PNG path.
    config: base config; its difficulty is overridden with 'normal' / 'hard'.
    n: rows (samples per difficulty).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  config = config or SyntheticConfig()
  columns = []
  for difficulty in DIFFICULTIES:
    gen = SyntheticGenerator(dataclasses.replace(config, difficulty=difficulty))
    columns.append((difficulty, [gen.sample(i) for i in range(n)]))
  h, w = config.image_size
  fig, axes = plt.subplots(n, 6, figsize=(6 * 2.2 * w / 128 + 1, n * 0.9), squeeze=False)
  for c, (difficulty, examples) in enumerate(columns):
    for r, ex in enumerate(examples):
      panels = (
        ("image", ex["image"], None),
        ("mask", ex["mask"], "gray"),
        ("LR", ex["lr_image"], None),
      )
      for k, (name, arr, cmap) in enumerate(panels):
        ax = axes[r, 3 * c + k]
        ax.imshow(arr, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
          ax.set_title(f"{difficulty}: {name}", fontsize=9)
        if k == 0:
          ax.set_xlabel(f"{ex['label']}  ({ex['font']})", fontsize=6, labelpad=1)
  fig.tight_layout(pad=0.3, h_pad=0.6, w_pad=0.3)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
