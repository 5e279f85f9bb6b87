"""Font discovery for the synthetic text-image generator.

Finds TrueType/OpenType files, keeps only those that really draw Latin letters
and digits, and splits them deterministically into a training and a held-out
set so that evaluation can use fonts never seen in training.

Search order (see `discover_fonts`):
  1. the given directories (default: `SYSTEM_FONT_DIRS`, or the
     `MMS_JAX_FONT_DIRS` environment variable, a `os.pathsep`-separated list);
  2. if they hold no usable font: matplotlib's bundled fonts (DejaVu, ...).

A font is rejected when
  * its name is on `EXCLUDED_FONT_NAMES` (symbol/dingbat/fallback fonts),
  * its cmap lacks one of the required characters,
  * a required character maps to a glyph whose name belongs to another letter
    or symbol (e.g. StandardSymbolsPS maps "a" to "alpha", D050000L to "a60"),
  * the required characters do not map to distinct glyphs, or draw nothing, or
    draw too many identical bitmaps (fonts that draw boxes for digits).

Checking a font costs a few milliseconds, so results are cached in memory and
on disk (`$XDG_CACHE_HOME/mms_jax/font_check_v1.json`, keyed by path, size and
mtime). Set `MMS_JAX_FONT_CACHE=0` to disable the disk cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import functools
import hashlib
import json
import logging
import os
import re
import string

from PIL import ImageFont

ALNUM = string.ascii_letters + string.digits
FONT_EXTENSIONS = (".ttf", ".otf")
SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FONT_SPLITS = ("train", "heldout", "all")

# Lower-cased substrings of file names that are never text fonts.
EXCLUDED_FONT_NAMES = (
  "standardsymbol",
  "d050000l",
  "dingbat",
  "wingding",
  "webdings",
  "opensymbol",
  "symbol",
  "lastresort",
  "emoji",
  "cmex",
  "cmsy",
  "stixsiz",
  "stixnonuni",
  "marlett",
  "musical",
  "linbiolinum_k",  # Linux Biolinum Keyboard: letters drawn inside key caps
)

# Fingerprints of the default split (heldout_fraction 0.1, no salt) over the fonts
# launch/install.sh installs on Debian 12; figures in docs/results.md are on these.
REFERENCE_FINGERPRINTS = {"train": "27bff209f8cb", "heldout": "2d796740ecd7"}

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Glyph names that carry no information (post table format 3, CID fonts).
_GENERIC_GLYPH_NAME = re.compile(r"^(glyph|cid|gid|g|index|afii)?\d+$", re.I)
_CACHE_VERSION = 1


def matplotlib_font_dir() -> str | None:
  """Returns matplotlib's bundled TrueType directory, or None."""
  try:
    import matplotlib
  except ImportError:
    return None
  path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
  return path if os.path.isdir(path) else None


def list_font_files(font_dirs: Iterable[str]) -> list[str]:
  """Lists .ttf/.otf files under `font_dirs`, one path per file name.

  Returns paths sorted by (file name, path); when two directories hold the same
  file name the first in that order wins, so file names are unique keys.
  """
  found = []
  for root_dir in font_dirs:
    if not os.path.isdir(root_dir):
      continue
    for dirpath, _, filenames in os.walk(root_dir, followlinks=True):
      for name in filenames:
        if name.lower().endswith(FONT_EXTENSIONS):
          found.append((name, os.path.join(dirpath, name)))
  unique = {}
  for name, path in sorted(found):
    unique.setdefault(name, path)
  return list(unique.values())


def is_excluded_name(path: str) -> bool:
  """True if the file name marks a symbol/dingbat/fallback font."""
  name = os.path.basename(path).lower().replace(" ", "").replace("-", "")
  return any(bad in name for bad in EXCLUDED_FONT_NAMES)


def _glyph_name_matches(char: str, glyph: str) -> bool:
  """Whether `glyph` is a plausible glyph name for `char`."""
  code = ord(char)
  base = re.split(r"[._]", glyph, maxsplit=1)[0] or glyph
  if base == char:
    return True
  if char.isdigit() and base.lower() == _DIGIT_NAMES[int(char)]:
    return True
  if base.lower() in (f"uni{code:04x}", f"u{code:04x}", f"u{code:05x}"):
    return True
  # Names that say nothing about the glyph cannot be judged; accept them.
  return bool(_GENERIC_GLYPH_NAME.match(glyph))


def _rendered_ok(path: str, chars: str) -> bool:
  """Renders every char; rejects fonts drawing nothing or mostly duplicates."""
  font = ImageFont.truetype(path, 28)
  bitmaps = set()
  for char in chars:
    mask = font.getmask(char, mode="L")
    data = bytes(mask)
    if mask.size[0] == 0 or mask.size[1] == 0 or not any(data):
      return False
    bitmaps.add((mask.size, data))
  # A few look-alike pairs (l/I, o/O at some sizes) are fine, boxes are not.
  return len(bitmaps) >= len(set(chars)) - 4


def check_font(path: str, chars: str = ALNUM, use_name_list: bool = True) -> tuple[bool, str]:
  """Checks that `path` draws every character of `chars` as itself.

  Args:
    path: font file.
    chars: characters that must be drawn.
    use_name_list: also reject names on `EXCLUDED_FONT_NAMES` (the glyph
      checks alone catch the known symbol fonts too).

  Returns:
    (ok, reason) where reason explains a rejection ('' when ok).
  """
  from fontTools.ttLib import TTFont

  if use_name_list and is_excluded_name(path):
    return False, "excluded name"
  try:
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    font = TTFont(path, lazy=True, fontNumber=0)
    cmap = font.getBestCmap() or {}
  except Exception as e:
    return False, f"unreadable: {type(e).__name__}"
  chars = "".join(sorted(set(chars)))
  missing = [c for c in chars if ord(c) not in cmap]
  if missing:
    return False, f"cmap lacks {''.join(missing)!r}"
  glyphs = [cmap[ord(c)] for c in chars]
  if len(set(glyphs)) < len(chars):
    return False, "characters share glyphs"
  foreign = [
    c
    for c, g in zip(chars, glyphs)
    if (c.isalnum() and c.isascii()) and not _glyph_name_matches(c, g)
  ]
  if foreign:
    return False, f"non-Latin glyph names for {''.join(foreign)!r}"
  try:
    if not _rendered_ok(path, chars):
      return False, "draws empty or duplicate glyphs"
  except Exception as e:
    return False, f"cannot render: {type(e).__name__}"
  return True, ""


def _disk_cache_path() -> str | None:
  if os.environ.get("MMS_JAX_FONT_CACHE", "1") == "0":
    return None
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "mms_jax", f"font_check_v{_CACHE_VERSION}.json")


def _file_key(path: str, chars: str) -> str:
  st = os.stat(path)
  return f"{path}|{st.st_size}|{int(st.st_mtime)}|{chars}"


def _check_fonts_cached(paths: Sequence[str], chars: str) -> list[str]:
  """Runs `check_font` over `paths`, reusing the on-disk cache."""
  cache_file = _disk_cache_path()
  cache = {}
  if cache_file and os.path.exists(cache_file):
    try:
      with open(cache_file) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}
  changed = False
  good = []
  for path in paths:
    if is_excluded_name(path):  # Before the cache: the name list may have grown.
      continue
    key = _file_key(path, chars)
    if key not in cache:
      cache[key] = check_font(path, chars)[0]
      changed = True
    if cache[key]:
      good.append(path)
  if cache_file and changed:
    try:
      os.makedirs(os.path.dirname(cache_file), exist_ok=True)
      tmp = f"{cache_file}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(cache, f)
      os.replace(tmp, cache_file)
    except OSError:
      pass
  return good


def default_font_dirs() -> tuple[str, ...]:
  """`MMS_JAX_FONT_DIRS` (os.pathsep-separated) or `SYSTEM_FONT_DIRS`."""
  env = os.environ.get("MMS_JAX_FONT_DIRS")
  if env:
    return tuple(d for d in env.split(os.pathsep) if d)
  return SYSTEM_FONT_DIRS


@functools.lru_cache(maxsize=32)
def discover_fonts(font_dirs: tuple[str, ...] | None = None, chars: str = ALNUM) -> tuple[str, ...]:
  """Returns usable font paths, sorted by file name (stable across machines).

  Args:
    font_dirs: directories searched recursively; None means
      `default_font_dirs()`. When they hold no usable font, matplotlib's
      bundled fonts are used instead.
    chars: characters every font must draw (always includes [A-Za-z0-9]).

  Raises:
    RuntimeError: if no usable font exists at all.
  """
  chars = "".join(sorted(set(chars) | set(ALNUM)))
  dirs = default_font_dirs() if font_dirs is None else tuple(font_dirs)
  fonts = _check_fonts_cached(list_font_files(dirs), chars)
  if not fonts:
    mpl_dir = matplotlib_font_dir()
    if mpl_dir:
      fonts = _check_fonts_cached(list_font_files([mpl_dir]), chars)
  if not fonts:
    raise RuntimeError(
      f"No usable font drawing {chars!r} in {dirs} nor in matplotlib's "
      "bundled fonts; install fonts (launch/install.sh) or set "
      "MMS_JAX_FONT_DIRS."
    )
  return tuple(sorted(fonts, key=lambda p: (os.path.basename(p), p)))


def fingerprint(paths: Sequence[str]) -> str:
  """12 hex digits from the sorted file names: equal font sets, equal fingerprints."""
  names = sorted(os.path.basename(p) for p in paths)
  return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:12]


def font_hash(path: str, salt: str = "") -> float:
  """Deterministic value in [0, 1) from the font's file name."""
  digest = hashlib.sha256(f"{salt}/{os.path.basename(path)}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_fonts(
  fonts: Sequence[str], split: str = "train", heldout_fraction: float = 0.1, salt: str = ""
) -> tuple[str, ...]:
  """Deterministic train/held-out split of `fonts` by hashed file name.

  A font is held out when `font_hash(path, salt) < heldout_fraction`, so its
  membership does not depend on which other fonts are installed. If that
  leaves one side empty (few fonts), the font(s) with the smallest hash are
  moved so both sides are non-empty whenever there are >= 2 fonts and
  0 < heldout_fraction < 1.

  Args:
    fonts: font paths.
    split: 'train', 'heldout' or 'all'.
    heldout_fraction: expected fraction of held-out fonts, in [0, 1).
    salt: changes the split (e.g. for several disjoint hold-outs).

  Returns:
    The selected paths, in the input order.
  """
  if split not in FONT_SPLITS:
    raise ValueError(f"split must be one of {FONT_SPLITS}, got {split!r}")
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
  if split == "all":
    return tuple(fonts)
  ranked = sorted(fonts, key=lambda p: (font_hash(p, salt), p))
  n_held = sum(font_hash(p, salt) < heldout_fraction for p in fonts)
  if heldout_fraction > 0 and len(fonts) >= 2:
    n_held = min(max(n_held, 1), len(fonts) - 1)
  heldout = set(ranked[:n_held])
  if split == "heldout":
    chosen = tuple(p for p in fonts if p in heldout)
  else:
    chosen = tuple(p for p in fonts if p not in heldout)
  if not chosen:
    raise ValueError(
      f"font split {split!r} is empty ({len(fonts)} fonts, "
      f"heldout_fraction={heldout_fraction}); install more fonts or change "
      "heldout_fraction."
    )
  return chosen
