"""Our recognizer next to the recognizers a user could pick instead, on the same images.

  python -m benchmarks.recognition_peers --workdir=workdirs/rec            # ours + peers
  python -m benchmarks.recognition_peers --peers=tesseract --num=300       # peers only
  python -m benchmarks.recognition_peers --workdir=workdirs/rec --by_font  # + per font

Every recognizer reads the same first `--num` images of each synthetic test split (the
records the recognition program evaluates, from its config) and is scored with the
same protocol: text_metrics' 36-character case-insensitive normalisation, word
accuracy and 1 - NED; samples whose normalised label is empty or longer than the
config's data.max_label_length (25) are left out, as the program's evaluation does. Prints one table.

`--by_font` adds a table per split of word accuracy per font (the generator records
each sample's font): which fonts a recognizer cannot read, and whether the peers can.

Peers (each optional; skipped with a message when it is not installed):
  tesseract  Tesseract 5 (`apt-get install tesseract-ocr tesseract-ocr-eng`), one line
             per image (`--psm 7`), the crop upscaled `--tesseract_scale` times
             (bicubic) with a white border, as tessdoc's ImproveQuality advises.
  rapidocr   RapidOCR (`pip install -e .[peers]`: rapidocr_onnxruntime), PP-OCRv4
             recognition in ONNX, bundled in the wheel (runs offline); recognition
             only (`use_det=False, use_cls=False`), the crop as it is.
"""

import os
import shutil
import subprocess
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from mms_jax.data import labels
from mms_jax.data import pipeline
from mms_jax.evaluate import text_metrics

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program: tests import this module
  flags.DEFINE_string("workdir", "", "our recognition workdir (empty: peers only)")
  flags.DEFINE_list("peers", ["tesseract", "rapidocr"], "peers to run, if installed")
  flags.DEFINE_list("splits", ["test_heldout_fonts", "test_hard"], "synthetic splits")
  flags.DEFINE_integer("num", 300, "images per split")
  flags.DEFINE_integer("tesseract_scale", 3, "upscaling of the crops for Tesseract")
  flags.DEFINE_string("out", "", "also write the table (markdown) to this file")
  flags.DEFINE_bool("by_font", False, "also print word accuracy per font, per split")


def load_split_with_fonts(data_config, split, num):
  """(uint8 images [n, H, W, 3], labels, font file names) of the first `num` scorable
  records (label non-empty and at most data_config.max_label_length after
  normalisation); a font is None where the source is not generated on the fly."""
  source = pipeline.make_source(data_config, split)
  generator = None
  if isinstance(source, pipeline.SyntheticSource):
    from mms_jax.data import synthetic

    generator = synthetic.SyntheticGenerator(synthetic.SyntheticConfig.from_dict(source.config))
  images, texts, fonts = [], [], []
  for i in range(min(num, len(source))):
    record = generator.sample(i) if generator is not None else source[i]
    label = labels.normalize_label(
      str(record["label"]), labels.CHARSETS["36"], data_config.max_label_length
    )
    if label:
      images.append(np.asarray(record["image"], np.uint8))
      texts.append(str(record["label"]))
      fonts.append(record.get("font"))
  return np.stack(images), texts, fonts


def font_table(split, fonts, gts, preds_by_reader):
  """Markdown: one row per font (fewest words read by the first reader first)."""
  names = list(preds_by_reader)
  rows = []
  for font in sorted(set(fonts)):
    idx = [i for i, f in enumerate(fonts) if f == font]
    accs = [
      text_metrics.score([gts[i] for i in idx], [preds_by_reader[n][i] for i in idx], "36")[
        "word_accuracy"
      ]
      for n in names
    ]
    rows.append((font, len(idx), accs))
  rows.sort(key=lambda r: (r[2][0], r[0]))
  lines = [
    f"{split}: word accuracy (%) per font",
    "| font | n | " + " | ".join(names) + " |",
    "|---|---:|" + "---:|" * len(names),
  ]
  lines += [
    f"| {font} | {n} | " + " | ".join(f"{100 * a:.0f}" for a in accs) + " |"
    for font, n, accs in rows
  ]
  return "\n".join(lines)


def tesseract_input(image, scale=3, height=None):
  """The PIL image Tesseract gets for a uint8 crop: upscaled `scale` times, or to `height`
  pixels when given (bicubic), on a 10-pixel white border."""
  h, w = image.shape[:2]
  factor = height / h if height else scale
  size = (max(1, round(w * factor)), max(1, round(h * factor)))
  big = Image.fromarray(image).resize(size, Image.BICUBIC)
  canvas = Image.new("RGB", (big.width + 20, big.height + 20), "white")
  canvas.paste(big, (10, 10))
  return canvas


def tesseract_reader(scale=3, height=None):
  """(read, version) or (None, why): read(uint8 images, any sizes) -> texts. Each crop is
  upscaled `scale` times, or to `height` pixels when given (bicubic), on a white border."""
  if shutil.which("tesseract") is None:
    return None, "not installed (apt-get install tesseract-ocr tesseract-ocr-eng)"
  version = subprocess.run(["tesseract", "--version"], capture_output=True, text=True).stdout.split(
    "\n"
  )[0]

  def read(images):
    with tempfile.TemporaryDirectory() as tmp:
      paths = []
      for i, image in enumerate(images):
        paths.append(os.path.join(tmp, f"{i:05d}.png"))
        tesseract_input(image, scale, height).save(paths[-1])
      out = []
      for path in paths:  # one process per image: a list file would merge the pages' text
        r = subprocess.run(
          ["tesseract", path, "stdout", "--psm", "7", "-l", "eng"], capture_output=True, text=True
        )
        out.append(r.stdout.strip())
      return out

  return read, version


def rapidocr_reader():
  try:
    from rapidocr_onnxruntime import RapidOCR
  except ImportError:
    return None, "not installed (pip install -e .[peers])"
  engine = RapidOCR()

  def read(images):
    out = []
    for image in images:
      result, _ = engine(image[:, :, ::-1].copy(), use_det=False, use_cls=False, use_rec=True)
      out.append(result[0][0] if result else "")
    return out

  import importlib.metadata

  return read, f"rapidocr_onnxruntime {importlib.metadata.version('rapidocr_onnxruntime')}"


def installed_peers(names, **tesseract_options):
  """{name: (read, about)} of the named peers that are installed (a '[skip]' line for
  each one that is not); tesseract_options go to tesseract_reader."""
  makers = {"tesseract": lambda: tesseract_reader(**tesseract_options), "rapidocr": rapidocr_reader}
  readers = {}
  for name in names:
    if name not in makers:
      raise app.UsageError(f"unknown peer {name!r}: tesseract or rapidocr")
    read, about = makers[name]()
    if read is None:
      print(f"[skip] {name}: {about}")
      continue
    readers[name] = (read, about)
  return readers


def ours_reader(workdir):
  from mms_jax import read as read_lib

  config, predict = read_lib.load_recognizer(workdir)

  def read(images):
    normalised = pipeline.Normalize().map({"image": images})["image"]
    return read_lib.read_arrays(predict, normalised)[0]

  return config, read


def main(argv):
  del argv
  readers = {}
  if FLAGS.workdir:
    config, read = ours_reader(FLAGS.workdir)
    readers["mms_jax"] = (read, f"mms_jax ({FLAGS.workdir})")
    data_config = config.data
  else:
    from configs import finetune_recognition

    data_config = finetune_recognition.get_config().data
  readers.update(installed_peers(FLAGS.peers, scale=FLAGS.tesseract_scale))

  rows, font_tables = [], []
  for split in FLAGS.splits:
    images, gts, fonts = load_split_with_fonts(data_config, split, FLAGS.num)
    preds_by_reader = {}
    for name, (read, _) in readers.items():
      read(images[:2])  # warm-up (compile, model load)
      start = time.time()
      preds = read(images)
      seconds = time.time() - start
      preds_by_reader[name] = preds
      s = text_metrics.score(gts, preds, "36")
      rows.append(
        (
          name,
          split,
          s["num"],
          s["word_accuracy"],
          s["one_minus_ned"],
          1000 * seconds / len(images),
        )
      )
      print(f"{name} {split}: {100 * s['word_accuracy']:.1f} % word accuracy", flush=True)
    if FLAGS.by_font and readers and None not in fonts:
      font_tables.append(font_table(split, fonts, gts, preds_by_reader))

  lines = [
    "| recognizer | split | num | word acc (%) | 1 - NED (%) | ms / image |",
    "|---|---|---:|---:|---:|---:|",
  ]
  lines += [
    f"| {n} | {sp} | {num} | {100 * a:.1f} | {100 * e:.1f} | {ms:.1f} |"
    for n, sp, num, a, e, ms in rows
  ]
  lines += [""] + [f"- {name}: {about}" for name, (_, about) in readers.items()]
  table = "\n\n".join(["\n".join(lines), *font_tables])
  print("\n" + table)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
