r"""Reading speed side by side: our JAX path, our ONNX export, RapidOCR and Tesseract on
the same images; and whether each reader's confidence means something.

  python -m benchmarks.reader_speed --workdir=workdirs/rec --onnx=export/rec_onnx [--num=500]

Reads the first --num images of the generated test_heldout_fonts split (32 x 128 word
crops) with every reader that is installed and prints, per reader, ms per image at batch
1 and batched (readers without a batch API: n/a), the cold start (a new process, from
its start to the first text printed: what a command-line user waits for), and word
accuracy when only the most confident 100 / 90 / 75 / 50 % of the words are kept
(accuracy against coverage; pick a rejection threshold from it). 36-character protocol.
"""

import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from benchmarks import recognition_peers
from mms_jax.data import pipeline
from mms_jax.evaluate import text_metrics

FLAGS = flags.FLAGS
COVERAGES = (1.0, 0.9, 0.75, 0.5)


def _define_flags():
  flags.DEFINE_string("workdir", "", "our recognition workdir (or a shipped name)")
  flags.DEFINE_string("onnx", "", "its ONNX export (convert --format=onnx)")
  flags.DEFINE_integer("num", 500, "images")
  flags.DEFINE_integer("batch_size", 64, "the batched readers' batch")
  flags.DEFINE_string("out", "", "also write the table (markdown) here")


def accuracy_at_coverage(gts, preds, confidences, coverage):
  """Word accuracy of the `coverage` fraction of words read with the highest confidence."""
  order = np.argsort(-np.asarray(confidences, np.float64), kind="stable")
  keep = order[: max(1, int(round(coverage * len(order))))]
  return text_metrics.score([gts[i] for i in keep], [preds[i] for i in keep], "36")["word_accuracy"]


def timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def cold_start(command, cwd):
  """Seconds from starting `command` to its first line on stdout."""
  start = time.perf_counter()
  proc = subprocess.Popen(
    command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  line = proc.stdout.readline()
  elapsed = time.perf_counter() - start
  _, err = proc.communicate()
  if proc.returncode or not line:
    raise RuntimeError(f"{command[:3]} failed (status {proc.returncode}): {err[-500:]}")
  return elapsed


def our_readers(workdir, onnx_dir, batch_size):
  """{name: (read(images, batch) -> (texts, confidences), command for one image)}."""
  from mms_jax import onnx_reader
  from mms_jax import read as read_lib

  readers = {}
  if workdir:
    config, predict = read_lib.load_recognizer(workdir)
    fit = read_lib.default_fit(config)

    def jax_read(images, batch):
      arrays = np.stack([read_lib.fit_array(x, config.image_size, fit) for x in images])
      return read_lib.read_arrays(predict, arrays, batch)

    readers["mms_jax (JAX)"] = (
      jax_read,
      [sys.executable, "-m", "mms_jax.read", f"--workdir={workdir}", "{image}"],
    )
  if onnx_dir:
    reader = onnx_reader.Reader(onnx_dir)

    def onnx_read(images, batch):
      texts, confidences = [], []
      for start in range(0, len(images), batch):
        chunk = np.stack([reader.prepare(x) for x in images[start : start + batch]])
        t, c = reader.read_arrays(chunk)
        texts, confidences = texts + t, confidences + c
      return texts, confidences

    readers["mms_jax (ONNX)"] = (
      onnx_read,
      [sys.executable, os.path.join(onnx_dir, "read.py"), "{image}"],
    )
  return readers


def peer_readers():
  """RapidOCR and Tesseract with confidences, where installed."""
  readers = {}
  try:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def rapid(images, batch):
      del batch
      texts, confidences = [], []
      for image in images:
        result, _ = engine(image[:, :, ::-1].copy(), use_det=False, use_cls=False, use_rec=True)
        texts.append(result[0][0] if result else "")
        confidences.append(float(result[0][1]) if result else 0.0)
      return texts, confidences

    code = (
      "import sys; from PIL import Image; import numpy as np; "
      "from rapidocr_onnxruntime import RapidOCR; e = RapidOCR(); "
      "r, _ = e(np.asarray(Image.open(sys.argv[1]).convert('RGB'))[:, :, ::-1].copy(), "
      "use_det=False, use_cls=False, use_rec=True); print(r[0][0] if r else '')"
    )
    readers["RapidOCR (PP-OCRv4, ONNX Runtime)"] = (rapid, [sys.executable, "-c", code, "{image}"])
  except ImportError:
    print("[skip] RapidOCR: not installed (pip install -e .[peers])")
  read, about = recognition_peers.tesseract_reader(scale=3)
  if read is not None:

    def tesseract(images, batch):
      del batch
      texts, confidences = [], []
      with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images):
          path = os.path.join(tmp, f"{i}.png")
          recognition_peers.tesseract_input(image, scale=3).save(path)
          tsv = subprocess.run(
            ["tesseract", path, "stdout", "--psm", "7", "-l", "eng", "tsv"],
            capture_output=True,
            text=True,
          ).stdout.splitlines()[1:]
          words = [r.split("\t") for r in tsv if r.count("\t") >= 11 and r.split("\t")[11].strip()]
          texts.append(" ".join(w[11] for w in words))
          conf = [float(w[10]) for w in words if float(w[10]) >= 0]
          confidences.append(float(np.mean(conf)) / 100 if conf else 0.0)
      return texts, confidences

    readers[f"Tesseract ({about.split()[1] if len(about.split()) > 1 else about})"] = (
      tesseract,
      ["tesseract", "{image}", "stdout", "--psm", "7"],
    )
  return readers


def main(argv):
  del argv
  data = pipeline.default_config()
  data.update(reader="direct", size={"test_heldout_fonts": FLAGS.num})
  images, gts, _ = recognition_peers.load_split_with_fonts(data, "test_heldout_fonts", FLAGS.num)
  images = list(images)
  readers = {**our_readers(FLAGS.workdir, FLAGS.onnx, FLAGS.batch_size), **peer_readers()}
  with tempfile.TemporaryDirectory() as tmp:
    sample = os.path.join(tmp, "word.png")
    Image.fromarray(images[0]).save(sample)
    rows = []
    for name, (read, command) in readers.items():
      batched = name.startswith("mms_jax")
      read(images[:2], 1)  # compile / warm up
      if batched:
        read(images[: FLAGS.batch_size], FLAGS.batch_size)
      (texts, confidences), seconds_1 = timed(read, images, 1)
      batch_ms = "n/a"
      if batched:
        _, seconds_b = timed(read, images, FLAGS.batch_size)
        batch_ms = f"{1000 * seconds_b / len(images):.2f}"
      cold = cold_start([c.replace("{image}", sample) for c in command], os.getcwd())
      accuracy = [accuracy_at_coverage(gts, texts, confidences, c) for c in COVERAGES]
      rows.append((name, 1000 * seconds_1 / len(images), batch_ms, cold, accuracy))
  lines = [
    f"{len(images)} generated test_heldout_fonts crops (32 x 128), 36-character protocol; "
    f"batched = batches of {FLAGS.batch_size}",
    "",
    "| reader | ms / image, batch 1 | ms / image, batched | cold start (s) | "
    + " | ".join(f"word acc @ {int(100 * c)} % kept" for c in COVERAGES)
    + " |",
    "|---|---:|---:|---:|" + "---:|" * len(COVERAGES),
  ]
  for name, ms1, msb, cold, acc in rows:
    lines.append(
      f"| {name} | {ms1:.2f} | {msb} | {cold:.2f} | "
      + " | ".join(f"{100 * a:.1f}" for a in acc)
      + " |"
    )
  table = "\n".join(lines)
  print(table)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
