"""Read words in image files with an exported mms_jax recognizer, without JAX.

  python read.py [--model=DIR] IMAGE_OR_FOLDER ... [--csv=out.csv] [--batch_size=32]
  python -m mms_jax.read --model=DIR IMAGE_OR_FOLDER ...        (the same, where installed)

DIR is what `python -m mms_jax.convert --format=onnx` writes: model.onnx (images
float32[B, H, W, 3] in [-1, 1] -> CTC logits [B, T, K]), reader.json (charset, image
size, fit, decoding) and this file as read.py. It needs numpy, Pillow and onnxruntime
only, and imports nothing else outside the standard library, so a deployment without
JAX can copy DIR and run it. In Python:

  reader = Reader("DIR")                       # or Reader() beside reader.json
  reader.read(["word.png", pil_image, array])  # -> [(text, confidence), ...]

Images are read as the JAX path reads them (mms_jax/read.py): EXIF orientation applied,
any PIL mode to RGB (transparency on white), fitted to the model's input with the fit
of its training data, scaled to [-1, 1]; greedy CTC decoding; the confidence is the
probability of the greedy path.
"""

import argparse
import csv
import json
import os
import pathlib
import sys

import numpy as np
from PIL import Image
from PIL import ImageOps

IMAGE_SUFFIXES = (
  ".png",
  ".jpg",
  ".jpeg",
  ".bmp",
  ".gif",
  ".tif",
  ".tiff",
  ".webp",
  ".pgm",
  ".ppm",
  ".pbm",
)
PAD_VALUE = 128  # keep_aspect padding: ~0 after scaling to [-1, 1]
# Aspect ratio (width / height) above which a crop is more than the one line of text the
# model reads (a page, a paragraph): read anyway, with a warning.
MAX_ASPECT_FACTOR = 3.0


def to_rgb(image):
  """A PIL image (EXIF orientation applied) -> uint8 [h, w, 3]."""
  image = ImageOps.exif_transpose(image)
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    a = np.asarray(image, np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    image = Image.fromarray(a.astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return np.asarray(image.convert("RGB"))


def as_rgb_array(image):
  """A path, PIL image or array (grey [h, w], RGB or RGBA [h, w, 3|4]) -> uint8 RGB."""
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as opened:
      opened.load()
      return to_rgb(opened)
  if isinstance(image, Image.Image):
    return to_rgb(image)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    array = np.clip(array, 0, 255).astype(np.uint8)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f"an image array is [h, w], [h, w, 3] or [h, w, 4], not {array.shape}")
  return to_rgb(Image.fromarray(array)) if array.shape[-1] == 4 else array


def fit(array, size, how):
  """uint8 [h, w, 3] -> uint8 [H, W, 3] as mms_jax.read fits a crop (center, stretch or
  keep_aspect)."""
  height, width = size
  h, w = array.shape[:2]
  if h == 0 or w == 0:
    raise ValueError("zero-size image")
  if how == "center":
    new_w = max(1, min(width, int(round(w * height / h))))
    resized = np.asarray(Image.fromarray(array).resize((new_w, height), Image.BILINEAR))
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    left = (width - new_w) // 2
    canvas[:, left : left + new_w] = resized
    return canvas
  if how not in ("stretch", "keep_aspect"):
    raise ValueError(f"fit={how!r}: center, stretch or keep_aspect")
  new_w = max(1, min(width, int(round(w * height / h)))) if how == "keep_aspect" else width
  if (h, w) != (height, new_w):
    array = np.asarray(Image.fromarray(array).resize((new_w, height), Image.BILINEAR))
  if new_w < width:
    array = np.pad(array, [(0, 0), (0, width - new_w), (0, 0)], constant_values=PAD_VALUE)
  return array


def ctc_decode(logits, charset):
  """logits [B, T, K] (class 0 = blank, k = charset[k - 1]) -> (texts, confidences):
  best class per frame, repeats collapsed, blanks dropped; the confidence is the
  product over frames of the best class' probability."""
  logits = np.asarray(logits, np.float64)
  best = logits.argmax(-1)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  confidence = np.exp(log_probs.max(-1).sum(-1))
  texts = []
  for row in best:
    keep = (row != 0) & np.concatenate([[True], row[1:] != row[:-1]])
    texts.append("".join(charset[k - 1] for k in row[keep]))
  return texts, confidence


class Reader:
  """An exported recognizer (module docstring)."""

  def __init__(self, model_dir=None, providers=("CPUExecutionProvider",)):
    import onnxruntime  # imported here: the fitting and decoding above do not need it

    self.dir = pathlib.Path(model_dir or pathlib.Path(__file__).resolve().parent)
    spec_path = self.dir / "reader.json"
    if not spec_path.is_file():
      raise FileNotFoundError(
        f"{spec_path} not found: give the folder `python -m mms_jax.convert --format=onnx` wrote"
      )
    self.spec = json.loads(spec_path.read_text())
    if self.spec.get("decoding") != "ctc_greedy":
      raise ValueError(f"{spec_path}: decoding {self.spec.get('decoding')!r} is not ctc_greedy")
    self.image_size = tuple(self.spec["image_size"])
    self.charset = self.spec["charset"]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    self.session = onnxruntime.InferenceSession(
      str(self.dir / self.spec["model"]), options, providers=list(providers)
    )
    self.input_name = self.session.get_inputs()[0].name

  def prepare(self, image, how=None):
    """float32 [H, W, 3] in [-1, 1] of one image (any form as_rgb_array takes)."""
    array = as_rgb_array(image)
    return fit(array, self.image_size, how or self.spec["fit"]).astype(np.float32) / 127.5 - 1.0

  def too_wide(self, image):
    """True when `image` (uint8 RGB) is much wider than the one text line the model reads."""
    h, w = image.shape[:2]
    return w / max(h, 1) > MAX_ASPECT_FACTOR * self.image_size[1] / self.image_size[0]

  def read_arrays(self, images):
    """(texts, confidences) of prepared float32 images [n, H, W, 3]."""
    logits = self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})[0]
    texts, confidence = ctc_decode(logits, self.charset)
    return texts, [float(c) for c in confidence]

  def read(self, images, batch_size=32, how=None):
    """[(text, confidence)] of paths, PIL images or arrays, in order."""
    out = []
    for start in range(0, len(images), batch_size):
      chunk = [self.prepare(x, how) for x in images[start : start + batch_size]]
      out += list(zip(*self.read_arrays(np.stack(chunk))))
    return out


def find_images(paths):
  """Files named as they are; folders searched recursively for IMAGE_SUFFIXES."""
  found = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.exists():
      found.append(p)
    else:
      raise FileNotFoundError(f"{p} does not exist")
  return found


def main(argv=None, prog="read.py"):
  parser = argparse.ArgumentParser(prog=prog, description="Read words in image files (ONNX).")
  parser.add_argument("images", nargs="+", help="image files or folders")
  parser.add_argument("--model", default=None, help="the exported folder (default: beside read.py)")
  parser.add_argument("--csv", default="", help="also write path,text,confidence rows here")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--fit", default=None, choices=("center", "stretch", "keep_aspect"))
  args = parser.parse_args(argv)
  try:
    if args.csv and not os.path.isdir(os.path.dirname(os.path.abspath(args.csv))):
      raise FileNotFoundError(f"--csv={args.csv}: its folder does not exist")
    files = find_images(args.images)
    if not files:
      raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {args.images}")
    reader = Reader(args.model)
  except (OSError, ValueError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  rows, skipped, pending, prepared = [], 0, [], []

  def flush():
    for path, (text, confidence) in zip(pending, zip(*reader.read_arrays(np.stack(prepared)))):
      rows.append((str(path), text, confidence))
      print(f"{path}\t{text}\t{confidence:.4f}", flush=True)
    pending.clear()
    prepared.clear()

  for path in files:
    try:
      array = as_rgb_array(path)
      if reader.too_wide(array):
        print(
          f"warning: {path} is {array.shape[1]}x{array.shape[0]}: the model reads one line of "
          f"text (its input is {reader.image_size[1]}x{reader.image_size[0]}); crop the words first",
          file=sys.stderr,
        )
      prepared.append(reader.prepare(array, args.fit))
    except Exception as e:  # PIL raises many kinds
      skipped += 1
      print(f"skipped {path}: {type(e).__name__}: {e}", file=sys.stderr)
      continue
    pending.append(path)
    if len(pending) == args.batch_size:
      flush()
  if pending:
    flush()
  if args.csv:
    with open(args.csv, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["path", "text", "confidence"])
      writer.writerows((p, t, f"{c:.6f}") for p, t, c in rows)
  print(f"read {len(rows)} image(s), skipped {skipped} unreadable", file=sys.stderr)
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
