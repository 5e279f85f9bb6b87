"""Readers and writers for the text-image data formats used by mms_jax.

Formats (see docs/data.md for the folder layouts):

* STR LMDB: `num-samples`, `image-%09d` (encoded image), `label-%09d` (UTF-8),
  indices from 1. A folder tree may hold many of them (every directory holding a
  `data.mdb` is one dataset); `find_datasets` lists them.
* Unlabeled LMDB: the same without labels; or a plain folder of images.
* TextZoom LMDB: `image_hr-%09d`, `image_lr-%09d`, `label-%09d`.
* TextSeg: `image/*.jpg`, `semantic_label/*_maskfg.png`, `annotation/*_anno.json`;
  read as word crops with their foreground masks.
* Folder: images plus a `gt.txt` of `relative/path<TAB or space>label` lines.

Every reader has the same interface: `len(reader)` records, `reader.read(i)` ->
example dict or `BadRecord(reason)` raised, `reader.examples()` yields
`(key, example)` for the good records and counts the others in `reader.skips`
(a `SkipCounts`), `reader[i]` returns the example or None (counted) for direct
random access from grain. Examples hold numpy arrays:

  image:    uint8[H, W, 3]
  label:    str                      (labeled formats)
  mask:     uint8[H, W] in {0, 1}     (TextSeg)
  lr_image: uint8[h, w, 3]            (TextZoom)
"""

import collections
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import threading
from typing import Any
import warnings

import lmdb
import numpy as np
from PIL import Image

from mms_jax import errors
from mms_jax.data import labels as labels_lib

Array = np.ndarray
Example = dict[str, Any]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LMDB_MARKER = "data.mdb"
GT_FILE = "gt.txt"

# Skip reasons (keys of SkipCounts).
MISSING_RECORD = "missing_record"  # num-samples larger than the records.
MISSING_IMAGE = "missing_image"
MISSING_LABEL = "missing_label"
MISSING_MASK = "missing_mask"
UNDECODABLE = "undecodable_image"
ZERO_SIZE = "zero_size_image"
EXTREME_ASPECT = "extreme_aspect"
TOO_MANY_PIXELS = "decompression_bomb"
LABEL_NOT_UTF8 = "label_not_utf8"
LABEL_EMPTY = labels_lib.LABEL_EMPTY
LABEL_TOO_LONG = labels_lib.LABEL_TOO_LONG
BAD_ANNOTATION = "bad_annotation"
BAD_BOX = "bad_box"


class DataError(errors.UserError):
  """A data path or data set that cannot be used; the message says how to fix it."""


class BadRecord(Exception):
  """One unusable record; `reason` is its skip-count key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class SkipCounts:
  """Counts skipped records per reason, and converted records per conversion.

  Safe to update from grain's reader threads (evaluation reads with several).
  """

  def __init__(
    self, skipped: Mapping[str, int] | None = None, converted: Mapping[str, int] | None = None
  ):
    self.skipped = collections.Counter(skipped or {})
    self.converted = collections.Counter(converted or {})
    self.read = 0
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def skip(self, reason: str, n: int = 1) -> None:
    with self._lock:
      self.skipped[reason] += n

  def convert(self, what: str, n: int = 1) -> None:
    with self._lock:
      self.converted[what] += n

  def count_read(self, n: int = 1) -> None:
    with self._lock:
      self.read += n

  @property
  def total(self) -> int:
    return sum(self.skipped.values())

  def update(self, other: "SkipCounts") -> None:
    with self._lock:
      self.skipped.update(other.skipped)
      self.converted.update(other.converted)
      self.read += other.read

  def to_dict(self) -> dict[str, Any]:
    return {
      "read": self.read,
      "skipped": dict(sorted(self.skipped.items())),
      "converted": dict(sorted(self.converted.items())),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SkipCounts":
    counts = cls(d.get("skipped"), d.get("converted"))
    counts.read = int(d.get("read", 0))
    return counts

  def summary(self, name: str = "") -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
    converted = ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items()))
    return (
      f"[data] {name}: kept {self.read}, skipped {self.total}"
      f" ({skipped or 'none'}); converted ({converted or 'none'})"
    )

  def log(self, name: str = "") -> str:
    """Logs (and prints) the summary; returns it."""
    text = self.summary(name)
    logging.info(text)
    print(text, flush=True)
    return text

  def __repr__(self) -> str:
    return f"SkipCounts({self.to_dict()})"


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """What a reader accepts.

  Attributes:
    max_aspect: images with max(w/h, h/w) above this are skipped.
    max_pixels: images with more pixels are refused (decompression bombs).
    charset: label charset (name in labels.CHARSETS or characters); None keeps
      the stripped label as is.
    max_label_length: longer labels (after normalisation) are skipped; None: any.
    case_sensitive: see labels.check_label; None infers it from the charset.
    require_label: False keeps records with a bad or missing label (label '').
  """

  max_aspect: float = 25.0
  max_pixels: int = 4096 * 4096
  charset: str | None = None
  max_label_length: int | None = 25
  case_sensitive: bool | None = None
  require_label: bool = True

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "ReadOptions":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------ images ----


def _to_rgb_uint8(im: Image.Image, counts: SkipCounts | None) -> Array:
  """Any PIL mode -> uint8[H, W, 3]; transparent pixels are put on white."""
  mode = im.mode
  if mode == "RGB":
    return np.asarray(im, dtype=np.uint8)
  if counts is not None:
    counts.convert(f"mode_{mode}")
  if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.asarray(im).astype(np.float64)
    # 16-bit files decode as I;16 or I with values up to 65535.
    scale = 257.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
    arr = np.clip(np.round(arr / scale), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  if mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    im = im.convert("RGBA")
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, im)
  return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _open_checked(data: bytes, options: ReadOptions) -> Image.Image:
  """Opens and fully decodes image bytes; raises BadRecord."""
  if not data:
    raise BadRecord(UNDECODABLE, "empty bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data))
      w, h = im.size
      if w * h > options.max_pixels:
        raise BadRecord(TOO_MANY_PIXELS, f"{w}x{h}")
      im.load()
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadRecord(TOO_MANY_PIXELS, str(e)) from e
  except BadRecord:
    raise
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...).
    raise BadRecord(UNDECODABLE, f"{type(e).__name__}: {e}") from e
  return im


def decode_image(
  data: bytes, options: ReadOptions = ReadOptions(), counts: SkipCounts | None = None
) -> Array:
  """Encoded bytes -> uint8[H, W, 3]; raises BadRecord with the skip reason."""
  im = _open_checked(data, options)
  w, h = im.size
  if w == 0 or h == 0:
    raise BadRecord(ZERO_SIZE, f"{w}x{h}")
  if max(w / h, h / w) > options.max_aspect:
    raise BadRecord(EXTREME_ASPECT, f"{w}x{h}")
  return _to_rgb_uint8(im, counts)


def decode_mask(data: bytes, options: ReadOptions = ReadOptions()) -> Array:
  """Encoded mask -> uint8[H, W] in {0, 1} (any non-zero value is foreground)."""
  im = _open_checked(data, options)
  if im.mode not in ("L", "1", "P", "I", "I;16"):
    im = im.convert("L")
  arr = np.asarray(im)
  return (arr.reshape(arr.shape[:2]) > 0).astype(np.uint8)


def encode_png(array: Array) -> bytes:
  """uint8[H, W], uint8[H, W, 1] or uint8[H, W, 3|4] -> PNG bytes."""
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def encode_image(image: Array | bytes, image_format: str = "png") -> bytes:
  if isinstance(image, (bytes, bytearray)):
    return bytes(image)
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buf, format=image_format.upper())
  return buf.getvalue()


def decode_label(data: bytes | None, options: ReadOptions, counts: SkipCounts | None = None) -> str:
  """Label bytes -> normalised str; raises BadRecord unless require_label=False."""
  try:
    if data is None:
      raise BadRecord(MISSING_LABEL)
    if isinstance(data, bytes):
      try:
        data = data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise BadRecord(LABEL_NOT_UTF8, repr(data[:20])) from e
    label, reason = labels_lib.check_label(
      data, options.charset, options.max_label_length, options.case_sensitive
    )
    if reason:
      raise BadRecord(reason, repr(data[:40]))
    return label
  except BadRecord as e:
    if options.require_label:
      raise
    if counts is not None:
      counts.convert(f"label_dropped_{e.reason}")
    return ""


# ------------------------------------------------------------- base reader ----


class Reader:
  """Random-access reader base class; subclasses define __len__ and read()."""

  options: ReadOptions
  skips: SkipCounts
  name: str

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, index: int) -> Example:
    """Record `index` (0-based); raises BadRecord."""
    raise NotImplementedError

  def key(self, index: int) -> str:
    return f"{self.name}/{index:09d}"

  def __getitem__(self, index: int) -> Example | None:
    try:
      example = self.read(int(index))
    except BadRecord as e:
      self.skips.skip(e.reason)
      logging.debug("skipped %s: %s", self.key(index), e)
      return None
    self.skips.count_read()
    return example

  def examples(self) -> Iterator[tuple[str, Example]]:
    """Yields (key, example) for every good record; counts the bad ones."""
    for i in range(len(self)):
      example = self[i]
      if example is not None:
        yield self.key(i), example

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {self.options})"


def check_path(path: str, what: str, fix: str) -> str:
  """Raises DataError naming the path and the fix when `path` does not exist."""
  if not path or not os.path.exists(path):
    raise DataError(f"{what} not found: {path!r}. {fix}")
  return path


# -------------------------------------------------------------------- LMDB ----

# Key prefixes of every LMDB kind: field -> prefix.
LMDB_KINDS = {
  "str": {"image": "image", "label": "label"},
  "unlabeled": {"image": "image"},
  "textzoom": {"image": "image_hr", "lr_image": "image_lr", "label": "label"},
}


_ENVS: dict[tuple[int, str], lmdb.Environment] = {}


def _open_lmdb(path: str) -> lmdb.Environment:
  """One read-only environment per (process, path): LMDB refuses to open twice."""
  key = (os.getpid(), path)
  if key not in _ENVS:
    _ENVS[key] = lmdb.open(
      path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1024, subdir=True
    )
  return _ENVS[key]


class LmdbReader(Reader):
  """One LMDB directory (holding data.mdb) of kind 'str', 'unlabeled' or 'textzoom'.

  `num-samples` gives the record count; when it is missing, the count is the
  number of image keys. Indices above the stored records are skipped as
  'missing_record'. The LMDB environment opens lazily, so readers pickle to grain
  worker processes.
  """

  def __init__(
    self,
    path: str,
    kind: str = "str",
    options: ReadOptions = ReadOptions(),
    name: str | None = None,
  ):
    if kind not in LMDB_KINDS:
      raise ValueError(f"Unknown LMDB kind {kind!r}; expected one of {list(LMDB_KINDS)}.")
    check_path(
      os.path.join(path, LMDB_MARKER),
      "LMDB data file",
      "Point data_config.path at a folder holding data.mdb (or a tree of them).",
    )
    self.path = os.path.abspath(path)
    self.kind = kind
    self.prefixes = LMDB_KINDS[kind]
    self.options = options
    self.name = name or os.path.basename(self.path)
    self.skips = SkipCounts()
    self._env = None
    self._num = self._count()

  def _open(self) -> lmdb.Environment:
    if self._env is None:
      self._env = _open_lmdb(self.path)
    return self._env

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_env"] = None
    return state

  def _count(self) -> int:
    with self._open().begin() as txn:
      raw = txn.get(b"num-samples")
      if raw is not None:
        try:
          return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
          logging.warning("%s: unreadable num-samples %r; counting keys.", self.path, raw)
      prefix = f"{self.prefixes['image']}-".encode()
      top = 0
      for key in txn.cursor().iternext(keys=True, values=False):
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
          top = max(top, int(key[len(prefix) :]))
      return top

  def __len__(self) -> int:
    return self._num

  def read(self, index: int) -> Example:
    if not 0 <= index < self._num:
      raise IndexError(index)
    n = index + 1
    with self._open().begin() as txn:
      raw = {f: txn.get(f"{p}-{n:09d}".encode()) for f, p in self.prefixes.items()}
    if all(v is None for v in raw.values()):
      raise BadRecord(MISSING_RECORD, f"index {n}")
    example = {}
    for field in ("image", "lr_image"):
      if field in raw:
        if raw[field] is None:
          raise BadRecord(MISSING_IMAGE, f"{self.prefixes[field]}-{n:09d}")
        example[field] = decode_image(raw[field], self.options, self.skips)
    if "label" in raw:
      example["label"] = decode_label(raw["label"], self.options, self.skips)
    return example

  def key(self, index: int) -> str:
    return f"{self.name}/{index + 1:09d}"

  def __repr__(self) -> str:
    return f"LmdbReader({self.path!r}, kind={self.kind!r}, {self.options})"


def write_lmdb_raw(path: str, items: Mapping[str | bytes, bytes], map_size: int = 1 << 30) -> None:
  """Writes raw key -> value pairs into a new LMDB at `path` (for fixtures)."""
  os.makedirs(path, exist_ok=True)
  env = lmdb.open(path, map_size=map_size)
  with env.begin(write=True) as txn:
    for k, v in items.items():
      txn.put(k.encode() if isinstance(k, str) else k, v)
  env.close()


def write_lmdb(
  path: str,
  examples: Iterable[Mapping[str, Any]],
  kind: str = "str",
  image_format: str = "png",
  map_size: int = 1 << 30,
) -> int:
  """Writes examples (dicts with image [, label] [, lr_image]) as an LMDB of `kind`.

  Images may be uint8 arrays or already encoded bytes; labels str or bytes.
  Returns the number of records.
  """
  prefixes = LMDB_KINDS[kind]
  items: dict[bytes, bytes] = {}
  n = 0
  for n, example in enumerate(examples, start=1):
    for field, prefix in prefixes.items():
      value = example[field]
      if field == "label":
        value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
      else:
        value = encode_image(value, image_format)
      items[f"{prefix}-{n:09d}".encode()] = value
  items[b"num-samples"] = str(n).encode()
  write_lmdb_raw(path, items, map_size)
  return n


# -------------------------------------------------------------------- trees ----


def find_datasets(root: str, marker: str = LMDB_MARKER) -> list[str]:
  """Relative paths ('.' for root) of every directory under root holding `marker`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    if marker in filenames:
      found.append(os.path.relpath(dirpath, root))
  return sorted(found)


def select_datasets(root: str, subpath: str = "", marker: str = LMDB_MARKER) -> list[str]:
  """Datasets of `find_datasets(root)` at or below `subpath` ('' or '.': all).

  `subpath` may join several sub-folders with '+', e.g. 'train1+train2'.
  """
  check_path(root, "Data folder", "Set data_config.path to an existing folder.")
  found = find_datasets(root, marker)
  chosen = []
  for part in (subpath or ".").split("+"):
    sub = os.path.normpath(part.strip() or ".")
    chosen += [
      d for d in found if d not in chosen and (sub == "." or d == sub or d.startswith(sub + os.sep))
    ]
  if not chosen:
    where = os.path.join(root, subpath or ".")
    raise DataError(
      f"No data set ({marker}) found under {where!r}. Found: {found or 'nothing'}. "
      f"Set data_config.path to the tree root and the split (or "
      f"data_config.splits) to one of its sub-folders."
    )
  return chosen


def split_name(relpath: str) -> str:
  """A TFDS-safe split name for a tree-relative path ('.' -> 'root')."""
  if os.path.normpath(relpath) == ".":
    return "root"
  return re.sub(r"[^A-Za-z0-9_]", "_", os.path.normpath(relpath))


class ConcatReader(Reader):
  """Several readers seen as one (e.g. all LMDBs of a tree)."""

  def __init__(self, readers: list[Reader], name: str = "concat"):
    self.readers = readers
    self.name = name
    self.options = readers[0].options if readers else ReadOptions()
    self._offsets = np.cumsum([0] + [len(r) for r in readers])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _locate(self, index: int) -> tuple[Reader, int]:
    k = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self.readers[k], index - int(self._offsets[k])

  def read(self, index: int) -> Example:
    reader, i = self._locate(index)
    return reader.read(i)

  def __getitem__(self, index: int) -> Example | None:
    reader, i = self._locate(int(index))
    return reader[i]

  @property
  def skips(self) -> SkipCounts:
    total = SkipCounts()
    for r in self.readers:
      total.update(r.skips)
    return total

  def key(self, index: int) -> str:
    reader, i = self._locate(index)
    return reader.key(i)

  def __repr__(self) -> str:
    return f"ConcatReader({self.readers!r})"


# ----------------------------------------------------------------- folders ----


def _read_file(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadRecord(MISSING_IMAGE, path) from e


def parse_gt_line(line: str) -> tuple[str, str] | None:
  """'path<TAB>label' (or 'path label') -> (path, label); None for blank lines."""
  line = line.rstrip("\r\n")
  if not line.strip():
    return None
  sep = "\t" if "\t" in line else " "
  path, _, label = line.partition(sep)
  return path.strip(), label


class FolderReader(Reader):
  """A folder with a labels file (`gt.txt`) of `relative/path<TAB>label` lines."""

  def __init__(
    self,
    root: str,
    options: ReadOptions = ReadOptions(),
    gt_file: str = GT_FILE,
    name: str | None = None,
  ):
    gt_path = check_path(
      os.path.join(root, gt_file),
      "Labels file",
      f'Put a {gt_file} of "relative/path<TAB>label" lines in the '
      "folder named by data_config.path.",
    )
    self.root = os.path.abspath(root)
    self.options = options
    self.name = name or os.path.basename(self.root)
    self.skips = SkipCounts()
    self.entries: list[tuple[str, bytes]] = []
    with open(gt_path, "rb") as f:
      for raw_line in f:
        # Labels stay bytes until read(), so non-UTF-8 lines are counted there.
        parsed = parse_gt_line(raw_line.decode("latin-1"))
        if parsed is not None:
          self.entries.append((parsed[0], parsed[1].encode("latin-1")))

  def __len__(self) -> int:
    return len(self.entries)

  def read(self, index: int) -> Example:
    rel, label = self.entries[index]
    image = decode_image(_read_file(os.path.join(self.root, rel)), self.options, self.skips)
    return {"image": image, "label": decode_label(label, self.options, self.skips)}

  def key(self, index: int) -> str:
    return f"{self.name}/{self.entries[index][0]}"

  def __repr__(self) -> str:
    return f"FolderReader({self.root!r}, {self.options})"


def write_folder(
  root: str, examples: Iterable[Mapping[str, Any]], separator: str = "\t", image_format: str = "png"
) -> int:
  """Writes images under root/images/ and a gt.txt; returns the record count."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  lines = []
  for i, example in enumerate(examples):
    rel = f"images/{i:06d}.{image_format}"
    with open(os.path.join(root, rel), "wb") as f:
      f.write(encode_image(example["image"], image_format))
    lines.append(f"{rel}{separator}{example['label']}\n")
  with open(os.path.join(root, GT_FILE), "w", encoding="utf-8") as f:
    f.writelines(lines)
  return len(lines)


class ImageFolderReader(Reader):
  """Every image file below a folder (recursively, sorted), without labels."""

  def __init__(self, root: str, options: ReadOptions = ReadOptions(), name: str | None = None):
    check_path(root, "Image folder", "Set data_config.path to a folder of images.")
    self.root = os.path.abspath(root)
    self.options = options
    self.name = name or os.path.basename(self.root)
    self.skips = SkipCounts()
    self.files = sorted(
      os.path.relpath(os.path.join(d, f), self.root)
      for d, _, files in os.walk(self.root, followlinks=True)
      for f in files
      if f.lower().endswith(IMAGE_EXTENSIONS)
    )

  def __len__(self) -> int:
    return len(self.files)

  def read(self, index: int) -> Example:
    data = _read_file(os.path.join(self.root, self.files[index]))
    return {"image": decode_image(data, self.options, self.skips)}

  def key(self, index: int) -> str:
    return f"{self.name}/{self.files[index]}"

  def __repr__(self) -> str:
    return f"ImageFolderReader({self.root!r}, {self.options})"


# ----------------------------------------------------------------- TextSeg ----


def box_from_points(points: Iterable[float]) -> tuple[int, int, int, int]:
  """8 numbers (4 corner points x, y) -> axis-aligned (x0, y0, x1, y1), x1/y1 excl."""
  pts = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
  if pts.shape[0] < 2 or not np.all(np.isfinite(pts)):
    raise BadRecord(BAD_BOX, repr(points))
  x0, y0 = np.floor(pts.min(axis=0)).astype(int)
  x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
  return int(x0), int(y0), int(x1), int(y1)


def _words(annotation: Any) -> list[Mapping[str, Any]]:
  """Word entries of a TextSeg annotation: a dict keyed by word id, or a list."""
  if isinstance(annotation, Mapping):
    return [
      annotation[k] for k in sorted(annotation, key=str) if isinstance(annotation[k], Mapping)
    ]
  if isinstance(annotation, list):
    return [w for w in annotation if isinstance(w, Mapping)]
  return []


class TextSegReader(Reader):
  """TextSeg word crops: one record per annotated word.

  Layout: root/image/<id>.jpg, root/semantic_label/<id>_maskfg.png,
  root/annotation/<id>_anno.json (words with 'text' and 'bbox' = 4 corner points).
  The crop is the axis-aligned box of the 4 points, clipped to the image;
  the mask is the foreground mask cropped the same way.
  """

  def __init__(
    self,
    root: str,
    options: ReadOptions = ReadOptions(),
    name: str | None = None,
    image_ids: list[str] | None = None,
  ):
    check_path(
      os.path.join(root, "image"),
      "TextSeg image folder",
      "Set data_config.path to the TextSeg root holding image/, semantic_label/ and annotation/.",
    )
    self.root = os.path.abspath(root)
    self.options = options
    self.name = name or os.path.basename(self.root)
    self.skips = SkipCounts()
    if image_ids is None:
      image_ids = sorted(
        os.path.splitext(f)[0]
        for f in os.listdir(os.path.join(self.root, "image"))
        if f.lower().endswith(IMAGE_EXTENSIONS)
      )
    self._image_files = {
      os.path.splitext(f)[0]: f for f in os.listdir(os.path.join(self.root, "image"))
    }
    # One entry per word: (image id, word index, text, bbox points); annotations
    # that cannot be parsed are counted now, at start-up.
    self.words: list[tuple[str, int, Any, Any]] = []
    self._scan_skips = SkipCounts()
    for image_id in image_ids:
      path = os.path.join(self.root, "annotation", f"{image_id}_anno.json")
      try:
        with open(path, "rb") as f:
          words = _words(json.loads(f.read().decode("utf-8")))
      except (OSError, ValueError) as e:
        self._scan_skips.skip(BAD_ANNOTATION)
        logging.warning("TextSeg: unreadable annotation %s: %s", path, e)
        continue
      for j, word in enumerate(words):
        self.words.append((image_id, j, word.get("text"), word.get("bbox")))
    self.skips.update(self._scan_skips)
    self._cache_id = None
    self._cache = None

  def __len__(self) -> int:
    return len(self.words)

  def _load(self, image_id: str) -> tuple[Array, Array]:
    if self._cache_id != image_id:
      image_file = self._image_files.get(image_id)
      if image_file is None:
        raise BadRecord(MISSING_IMAGE, image_id)
      image = decode_image(
        _read_file(os.path.join(self.root, "image", image_file)),
        dataclasses.replace(self.options, max_aspect=float("inf")),
        self.skips,
      )
      mask_path = os.path.join(self.root, "semantic_label", f"{image_id}_maskfg.png")
      try:
        mask = decode_mask(_read_file(mask_path), self.options)
      except BadRecord as e:
        raise BadRecord(MISSING_MASK, mask_path) from e
      if mask.shape != image.shape[:2]:
        raise BadRecord(MISSING_MASK, f"mask shape {mask.shape} != {image.shape[:2]}")
      self._cache_id, self._cache = image_id, (image, mask)
    return self._cache

  def read(self, index: int) -> Example:
    image_id, _, text, points = self.words[index]
    if text is None:
      raise BadRecord(MISSING_LABEL, f"{image_id} word {index}")
    label = decode_label(str(text), self.options, self.skips)
    if points is None:
      raise BadRecord(BAD_BOX, f"{image_id}: no bbox")
    try:
      x0, y0, x1, y1 = box_from_points(points)
    except (TypeError, ValueError) as e:
      raise BadRecord(BAD_BOX, repr(points)) from e
    image, mask = self._load(image_id)
    h, w = mask.shape
    x0, x1 = max(0, x0), min(w, x1)
    y0, y1 = max(0, y0), min(h, y1)
    if x1 <= x0 or y1 <= y0:
      raise BadRecord(BAD_BOX, f"{image_id}: empty box after clipping")
    crop_h, crop_w = y1 - y0, x1 - x0
    if max(crop_w / crop_h, crop_h / crop_w) > self.options.max_aspect:
      raise BadRecord(EXTREME_ASPECT, f"{crop_w}x{crop_h}")
    return {"image": image[y0:y1, x0:x1].copy(), "mask": mask[y0:y1, x0:x1].copy(), "label": label}

  def key(self, index: int) -> str:
    image_id, j, _, _ = self.words[index]
    return f"{self.name}/{image_id}/{j}"

  def examples(self) -> Iterator[tuple[str, Example]]:
    # Pre-scan skips are already counted; records are read in image order.
    yield from super().examples()

  def __repr__(self) -> str:
    return f"TextSegReader({self.root!r}, {self.options})"


def textseg_split_ids(root: str, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[str]]:
  """{'train'|'val'|'test': image ids}: from root/split.json when present, else
  from a stable hash of each id (so adding images never moves old ones)."""
  image_dir = check_path(
    os.path.join(root, "image"), "TextSeg image folder", "Set data_config.path to the TextSeg root."
  )
  ids = sorted(
    os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)
  )
  split_file = os.path.join(root, "split.json")
  if os.path.exists(split_file):
    with open(split_file) as f:
      given = json.load(f)
    known = set(ids)
    return {
      k: sorted(str(i) for i in given.get(k, []) if str(i) in known)
      for k in ("train", "val", "test")
    }
  out = {"train": [], "val": [], "test": []}
  edges = np.cumsum(fractions)
  for image_id in ids:
    u = int(hashlib.sha1(image_id.encode()).hexdigest()[:8], 16) / 16**8
    k = int(np.searchsorted(edges, u, side="right"))
    out[("train", "val", "test")[min(k, 2)]].append(image_id)
  return out


def write_textseg(root: str, samples: Iterable[Mapping[str, Any]]) -> int:
  """Writes TextSeg's layout for fixtures.

  Each sample: {'id': str, 'image': uint8[H, W, 3], 'mask': uint8[H, W] in {0, 1},
  'words': [{'text': str, 'bbox': 8 numbers}, ...]}. Annotations are written as
  a dict keyed by zero-padded word index. Returns the number of images.
  """
  for sub in ("image", "semantic_label", "annotation"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  n = 0
  for s in samples:
    n += 1
    Image.fromarray(np.asarray(s["image"], np.uint8)).save(
      os.path.join(root, "image", f"{s['id']}.jpg"), quality=95
    )
    Image.fromarray((np.asarray(s["mask"]) > 0).astype(np.uint8) * 255).save(
      os.path.join(root, "semantic_label", f"{s['id']}_maskfg.png")
    )
    anno = {
      f"{j:04d}": {"text": w["text"], "bbox": [float(v) for v in w["bbox"]]}
      for j, w in enumerate(s["words"])
    }
    with open(os.path.join(root, "annotation", f"{s['id']}_anno.json"), "w") as f:
      json.dump(anno, f)
  return n


# ------------------------------------------------------------- entry point ----

SOURCES = ("synthetic", "str_lmdb", "unlabeled", "textzoom", "textseg", "folder")


def list_datasets(source: str, path: str, subpath: str = "") -> list[str]:
  """Tree-relative paths of the data sets of a real source at or below subpath."""
  if source in ("str_lmdb", "textzoom"):
    return select_datasets(path, subpath, LMDB_MARKER)
  if source == "folder":
    return select_datasets(path, subpath, GT_FILE)
  if source == "unlabeled":
    check_path(
      path, "Unlabeled data folder", "Set data_config.path to an LMDB tree or a folder of images."
    )
    if find_datasets(path, LMDB_MARKER):
      return select_datasets(path, subpath, LMDB_MARKER)
    return [os.path.normpath(subpath or ".")]
  if source == "textseg":
    return [os.path.normpath(subpath or ".")]
  raise ValueError(f"Unknown source {source!r}; expected one of {SOURCES}.")


def open_reader(
  source: str, path: str, relpath: str = ".", options: ReadOptions = ReadOptions()
) -> Reader:
  """The reader of one data set `relpath` of a real source rooted at `path`."""
  full = os.path.normpath(os.path.join(path, relpath))
  name = relpath if os.path.normpath(relpath) != "." else os.path.basename(os.path.normpath(path))
  if source == "str_lmdb":
    return LmdbReader(full, "str", options, name)
  if source == "textzoom":
    return LmdbReader(full, "textzoom", options, name)
  if source == "unlabeled":
    if os.path.exists(os.path.join(full, LMDB_MARKER)):
      return LmdbReader(full, "unlabeled", options, name)
    return ImageFolderReader(full, options, name)
  if source == "folder":
    return FolderReader(full, options, name=name)
  if source == "textseg":
    return TextSegReader(full, options, name)
  raise ValueError(f"Unknown source {source!r}; expected one of {SOURCES}.")


def open_source(
  source: str, path: str, subpath: str = "", options: ReadOptions = ReadOptions()
) -> Reader:
  """All data sets at or below path/subpath as one reader; DataError if empty."""
  readers = [
    open_reader(source, path, rel, options) for rel in list_datasets(source, path, subpath)
  ]
  reader = (
    readers[0]
    if len(readers) == 1
    else ConcatReader(readers, name=f"{os.path.basename(os.path.normpath(path))}/{subpath or '.'}")
  )
  if len(reader) == 0:
    raise DataError(
      f"Data set {os.path.join(path, subpath)!r} ({source}) holds no "
      "records. Check data_config.path / the split, or build it again."
    )
  return reader
