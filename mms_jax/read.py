"""Read text in image files with a trained recognizer.

  python -m mms_jax.read --workdir=workdirs/rec word.png crops/ [--csv=out.csv]

Loads the latest good checkpoint of a recognition workdir (its config.json decides the
model, image size and charset), reads every image given or found under a folder
(recursively; any size or PIL mode), fits it to the model's input size as its training
images were laid out (`--fit`, below), normalises it as training does, and prints one
line per image: `path<TAB>text<TAB>confidence`. The confidence is the
probability of the greedy decoding path (models.recognition.Recognizer.predict_scored).
Unreadable files are skipped, counted and named on stderr; the exit status is non-zero
when no image could be read.

--fit (how a crop of any size becomes an H x W input):
  center       scaled to height H at its own aspect ratio (squeezed to W if wider) and
               centred on a canvas of its border colour: how the synthetic generator lays
               out a word, so the default for a recognizer trained on generated images.
  stretch      resized to H x W (the pipeline's Resize): the default for real training
               data read without data.keep_aspect.
  keep_aspect  the pipeline's Resize with keep_aspect (scaled to height H, grey padding
               on the right): the default when the training config set data.keep_aspect.
  auto         (default) the one that matches the workdir's training data, as above.
On 48 real word crops the default recognizer reads 75 % with `center`, 61-67 % with
`stretch` (docs/results.md, "Real text").
"""

from collections.abc import Iterable
from collections.abc import Sequence
import csv
import json
import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from mms_jax import cli
from mms_jax import errors
from mms_jax import onnx_reader
from mms_jax import shipped

IMAGE_SUFFIXES = onnx_reader.IMAGE_SUFFIXES

FITS = ("center", "stretch", "keep_aspect")

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when it runs as a program, so that importing this
  module elsewhere does not clash with the importer's own flags)."""
  flags.DEFINE_string(
    "workdir",
    None,
    "Recognition workdir (config.json + checkpoints/) or a shipped model's name "
    f"(default: the shipped {shipped.DEFAULT_RECOGNIZER}).",
  )
  flags.DEFINE_string(
    "checkpoint", "", "A step directory to read instead of the workdir's latest good checkpoint."
  )
  flags.DEFINE_string("csv", "", "Also write path,text,confidence rows to this CSV file.")
  flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
  flags.DEFINE_enum("fit", "auto", ("auto",) + FITS, "How a crop becomes the model's input.")
  flags.DEFINE_string(
    "model", "", "An ONNX export (convert --format=onnx) to read with instead of --workdir."
  )


class ReadError(errors.UserError):
  """A workdir, checkpoint or argument that cannot be used; the message says why."""


def load_recognizer(workdir, checkpoint=""):
  """(config, predict) of a recognition workdir (models/recognition.load).

  predict(images float32[n, H, W, 3] in [-1, 1]) -> (texts, confidences float32[n]).
  Raises ReadError for a missing config.json, another program's workdir or a missing
  or corrupt checkpoint.
  """
  workdir = shipped.resolve(workdir)  # a shipped model's name works too
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise ReadError(
      f"{config_path} not found: --workdir must be a directory written by "
      "`python -m mms_jax.main --config=configs/finetune_recognition.py`"
    )
  program = json.loads(config_path.read_text()).get("program")
  if program != "recognition":
    raise ReadError(
      f"{workdir} is a {program!r} workdir, not a recognition one: point --workdir at a "
      "fine-tuned recognizer (configs/finetune_recognition.py)"
    )
  import jax  # the JAX path only: `--model` reads without it
  import ml_collections

  from mms_jax import checkpoints
  from mms_jax.models import recognition as rec

  what = "--checkpoint" if checkpoint else "--workdir"
  try:
    trained = rec.load(checkpoint or workdir, what=what)
  except checkpoints.CheckpointError as e:
    raise ReadError(f"{e} (train it first, or wait for its first checkpoint)") from None
  print(f"reading with {trained.step_dir} (step {trained.step})", file=sys.stderr, flush=True)
  model, tokenizer, params = trained.model, trained.tokenizer, trained.params
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.predict_scored))

  def predict(images):
    ids, confidence = apply(params, images)
    return tokenizer.decode(np.asarray(ids)), np.asarray(confidence)

  return ml_collections.ConfigDict(trained.run_config), predict


class Reader:
  """Reads words in images with the CLI's defaults, in Python:

    reader = Reader.from_workdir()                 # the shipped recognizer
    reader = Reader.from_workdir("workdirs/rec")   # or a workdir, step or shipped name
    reader = Reader.from_onnx("export/rec_onnx")   # an ONNX export, without JAX
    reader.read(["word.png", pil_image, grey_or_rgb_or_rgba_array])  # [(text, confidence)]

  The fit is the one of the recognizer's training data (default_fit), EXIF orientation
  is applied, the checkpoint step is logged, an input far wider than a line of text is
  read with a warning."""

  def __init__(self, predict, image_size, fit, batch_size=64):
    self.predict, self.image_size, self.fit = predict, tuple(image_size), fit
    self.batch_size = batch_size

  @classmethod
  def from_workdir(cls, workdir=shipped.DEFAULT_RECOGNIZER, checkpoint="", fit="auto"):
    config, predict = load_recognizer(shipped.resolve(workdir), checkpoint)
    return cls(predict, config.image_size, default_fit(config) if fit == "auto" else fit)

  @staticmethod
  def from_onnx(folder):
    """The export's own reader (onnx_reader.Reader): the same `read`."""
    return onnx_reader.Reader(folder)

  def read(self, images):
    """[(text, confidence)] of paths, PIL images or arrays, in order."""
    arrays = [onnx_reader.as_rgb_array(x) for x in images]
    for array in arrays:
      h, w = array.shape[:2]
      if w / max(h, 1) > onnx_reader.MAX_ASPECT_FACTOR * self.image_size[1] / self.image_size[0]:
        print(
          f"warning: an input of {w}x{h} is far wider than the one line of text the model "
          f"reads ({self.image_size[1]}x{self.image_size[0]}); crop the words first",
          file=sys.stderr,
        )
    fitted = np.stack([fit_array(a, self.image_size, self.fit) for a in arrays])
    return list(zip(*read_arrays(self.predict, fitted, self.batch_size)))


def find_images(paths: Sequence[str]) -> list[pathlib.Path]:
  """Files named on the command line as they are; folders searched recursively for
  IMAGE_SUFFIXES files (sorted). Raises ReadError for a path that does not exist."""
  try:
    return onnx_reader.find_images(paths)
  except FileNotFoundError as e:
    raise ReadError(str(e)) from None


def to_rgb(image: Image.Image) -> np.ndarray:
  """Any PIL image -> uint8 [h, w, 3]: EXIF orientation applied, transparency
  composited on white, 16-bit and float greyscale rescaled to their own range (the ONNX
  reader does the same: onnx_reader.to_rgb)."""
  return onnx_reader.to_rgb(image)


def default_fit(config) -> str:
  """The --fit that matches a recognition config's training images (module docstring);
  `config`: a ConfigDict or the dict of a run's config."""
  data = config.get("data") or {}
  if data.get("source", "synthetic") == "synthetic":
    return "center"
  return "keep_aspect" if data.get("keep_aspect", False) else "stretch"


def center(array: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [H, W, 3]: scaled to height H at its aspect ratio (at most
  W wide), centred on a canvas filled with the median colour of its border pixels."""
  return onnx_reader.fit(array, tuple(image_size), "center")


def fit_array(array: np.ndarray, image_size: tuple[int, int], fit: str) -> np.ndarray:
  """An image array (grey [h, w], RGB or RGBA) -> float32 [H, W, 3] in [-1, 1] (`fit`:
  one of FITS; `stretch` and `keep_aspect` are the training pipeline's Resize)."""
  if fit not in FITS:
    raise ValueError(f"fit={fit!r}: one of {FITS}")
  fitted = onnx_reader.fit(onnx_reader.as_rgb_array(array), tuple(image_size), fit)
  return fitted.astype(np.float32) / 127.5 - 1.0


def load_image(path, image_size: tuple[int, int], fit: str = "center") -> np.ndarray:
  """float32 [H, W, 3] in [-1, 1]: the file at `path` as `fit_array` fits it."""
  with Image.open(path) as image:
    image.load()
    array = to_rgb(image)
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ValueError("zero-size image")
  h, w = array.shape[:2]
  if w / h > onnx_reader.MAX_ASPECT_FACTOR * image_size[1] / image_size[0]:
    print(
      f"warning: {path} is {w}x{h}: the model reads one line of text (its input is "
      f"{image_size[1]}x{image_size[0]}); crop the words first",
      file=sys.stderr,
    )
  return fit_array(array, image_size, fit)


def read_arrays(predict, images: np.ndarray, batch_size=64):
  """(texts, confidences) of float32 images [n, H, W, 3] in [-1, 1], read in batches
  padded to `batch_size` (one compiled shape)."""
  texts, confidences = [], []
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
    padded[: len(chunk)] = chunk
    batch_texts, batch_confidences = predict(padded)
    texts += batch_texts[: len(chunk)]
    confidences += [float(c) for c in batch_confidences[: len(chunk)]]
  return texts, confidences


def read(predict, paths: Iterable[pathlib.Path], image_size, fit="center", batch_size=64):
  """Yields (path, text, confidence) per readable image and (path, None, error) per
  unreadable one, in input order (read_arrays, batch by batch). `fit`: one of FITS
  (default_fit(config) gives the layout of the workdir's training images; `Reader`
  picks it)."""
  pending, images = [], []

  def flush():
    out = list(zip(pending, *read_arrays(predict, np.stack(images), batch_size)))
    pending.clear()
    images.clear()
    return out

  for path in paths:
    try:
      images.append(load_image(path, image_size, fit))
    except Exception as e:  # PIL raises many kinds
      yield path, None, f"{type(e).__name__}: {e}"
      continue
    pending.append(path)
    if len(images) == batch_size:
      yield from flush()
  if images:
    yield from flush()


def check_output(path):
  """Refuses a --csv that cannot be written before any image is read."""
  if not path:
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise app.UsageError(f"--csv={path} is a folder: give a file name, e.g. {path}/out.csv")
  if not os.path.isdir(folder):
    raise app.UsageError(f"--csv={path}: the folder {folder} does not exist; create it first")
  if not os.access(folder, os.W_OK):
    raise app.UsageError(f"--csv={path}: the folder {folder} is not writable")


def main(argv):
  paths = argv[1:]
  if FLAGS.model:  # the JAX-free path: the export's own reader
    args = [*paths, f"--model={FLAGS.model}", f"--batch_size={FLAGS.batch_size}"]
    args += [f"--csv={FLAGS.csv}"] if FLAGS.csv else []
    args += [f"--fit={FLAGS.fit}"] if FLAGS.fit != "auto" else []
    if not paths:
      raise app.UsageError("name the images to read: python -m mms_jax.read --model=D IMAGES")
    sys.exit(onnx_reader.main(args, prog="mms_jax.read"))
  workdir = FLAGS.workdir
  if not workdir:
    if shipped.DEFAULT_RECOGNIZER not in shipped.names():
      raise app.UsageError(
        "--workdir (a recognition workdir) or --model (an ONNX export) is required: this "
        "installation has no shipped recognizer"
      )
    workdir = shipped.DEFAULT_RECOGNIZER
  if not paths:
    raise app.UsageError(
      "name the images to read: python -m mms_jax.read --workdir=W IMAGE_OR_FOLDER ..."
    )
  if FLAGS.batch_size < 1:
    raise app.UsageError("--batch_size must be >= 1")
  check_output(FLAGS.csv)
  files = find_images(paths)
  if not files:
    raise ReadError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {paths}")
  config, predict = load_recognizer(shipped.resolve(workdir), FLAGS.checkpoint)
  rows, skipped = [], []
  for path, text, extra in read(
    predict,
    files,
    tuple(config.image_size),
    default_fit(config) if FLAGS.fit == "auto" else FLAGS.fit,
    FLAGS.batch_size,
  ):
    if text is None:
      skipped.append(path)
      print(f"skipped {path}: {extra}", file=sys.stderr)
      continue
    rows.append((os.fspath(path), text, extra))
    print(f"{path}\t{text}\t{extra:.4f}", flush=True)
  if FLAGS.csv:
    with open(FLAGS.csv, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["path", "text", "confidence"])
      writer.writerows((p, t, f"{c:.6f}") for p, t, c in rows)
  print(
    f"read {len(rows)} image(s), skipped {len(skipped)} unreadable"
    + (f"; wrote {FLAGS.csv}" if FLAGS.csv else ""),
    file=sys.stderr,
  )
  if not rows:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  cli.run(main, "mms_jax.read")
