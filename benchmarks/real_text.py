"""Real scanned and photographed text: our recognizer and the peers on word crops cut from
images that installable packages ship (docs/results.md, "Real text").

  python -m benchmarks.real_text --workdir=workdirs/rec                 # ours + peers
  python -m benchmarks.real_text --workdir=workdirs/rec --picture=docs/img/real_text.png
  python -m benchmarks.real_text --sources=gutenberg --peers=            # ours only

The recognizer never saw these images: it trains on generated text only. Sources, fetched
once into --cache_dir (the only network use; a source whose tool or network is missing is
skipped with a message):

  gutenberg  A page scan of Project Gutenberg's illustrated "Adventures of Huckleberry Finn"
             (1884; chapter 3, page 29; public domain), which ocrmypdf's source
             distribution carries as tests/resources/c03-29.pdf. Downloaded from PyPI
             (ocrmypdf 17.13.0 sdist, sha256 checked against PyPI's record); the page is
             the PDF's one embedded JPEG (770 x 995). 36 printed words, each cut out at a
             fixed box with a few pixels of margin.
  opencv     Street photographs of signs in Debian's opencv-doc package
             (`apt-get download opencv-doc`, 96 MB; /usr/share/doc/opencv-doc/examples/
             text/; Apache-2.0 / BSD-3-Clause by the package's copyright file): 8 words
             or short lines cut from scenetext01.jpg and scenetext02.jpg, and the four
             word photographs scenetext_word01-04.jpg as they are.

Every reader gets every crop: ours resized and normalised as `mms_jax.read` does (its
library functions), Tesseract (`--psm 7`) the crop scaled to 96 px high on a white border
(what it gets from a 32 px synthetic crop in recognition_peers), RapidOCR the crop as it
is. Scored with the 36-character protocol of the synthetic benchmarks (text_metrics:
case and punctuation ignored), per source: word accuracy and 1 - NED.
"""

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import urllib.parse
import urllib.request

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from benchmarks import recognition_peers
from mms_jax.evaluate import text_metrics

FLAGS = flags.FLAGS

GUTENBERG_SDIST = ("ocrmypdf", "17.13.0", "tests/resources/c03-29.pdf")
GUTENBERG_PAGE_SIZE = (770, 995)
OPENCV_TEXT_DIR = "usr/share/doc/opencv-doc/examples/text"

# (box (left, top, right, bottom) on the page or None for the whole file, printed text).
GUTENBERG_WORDS = (
  ((665, 237, 749, 264), "morning,"),
  ((488, 266, 562, 288), "Watson,"),
  ((606, 266, 679, 288), "account"),
  ((338, 294, 403, 317), "clothes"),
  ((497, 294, 556, 317), "widow"),
  ((600, 294, 657, 317), "didn\u2019t"),
  ((660, 294, 713, 317), "scold,"),
  ((391, 323, 459, 346), "cleaned"),
  ((552, 323, 609, 346), "grease"),
  ((340, 350, 400, 373), "looked"),
  ((435, 350, 484, 373), "sorry"),
  ((559, 350, 630, 373), "thought"),
  ((532, 408, 586, 431), "closet"),
  ((641, 408, 710, 431), "prayed,"),
  ((340, 436, 414, 459), "nothing"),
  ((482, 465, 565, 488), "whatever"),
  ((587, 465, 639, 488), "asked"),
  ((422, 521, 501, 544), "fish-line,"),
  ((496, 550, 568, 573), "without"),
  ((574, 550, 633, 573), "hooks."),
  ((441, 578, 489, 601), "three"),
  ((669, 578, 752, 601), "somehow"),
  ((370, 721, 431, 748), "woods,"),
  ((344, 750, 429, 780), "anything"),
  ((684, 750, 751, 780), "Deacon"),
  ((208, 779, 270, 808), "money"),
  ((58, 808, 109, 835), "silver"),
  ((111, 808, 198, 835), "snuff-box"),
  ((425, 865, 496, 894), "praying"),
  ((596, 865, 690, 894), "\u201cspiritual"),
  ((214, 923, 313, 950), "everything"),
  ((588, 923, 630, 950), "look"),
  ((182, 951, 235, 978), "never"),
  ((241, 951, 293, 978), "think"),
  ((359, 951, 424, 978), "myself."),
  ((534, 951, 623, 978), "including"),
)
# file -> ((box or None, printed text), ...)
OPENCV_WORDS = {
  "scenetext01.jpg": (
    ((270, 28, 435, 82), "NOTICE"),
    ((270, 84, 430, 124), "DOUBLE"),
    ((270, 124, 430, 166), "PARKING"),
    ((268, 166, 430, 210), "PROHIBITED"),
    ((278, 210, 414, 254), "AT ALL TIMES"),
  ),
  "scenetext02.jpg": (
    ((425, 605, 779, 688), "Sports Centre"),
    ((425, 750, 730, 832), "Conference"),
    ((425, 822, 685, 905), "Car Parks"),
  ),
  "scenetext_word01.jpg": ((None, "CHINA"),),
  "scenetext_word02.jpg": ((None, "HERE"),),
  "scenetext_word03.jpg": ((None, "riser"),),
  "scenetext_word04.jpg": ((None, "Produkt"),),
}


class SourceUnavailable(Exception):
  """A source cannot be fetched here (no network, no apt-get, an unexpected file)."""


@dataclasses.dataclass
class Crop:
  source: str
  name: str
  image: np.ndarray  # uint8 [h, w, 3]
  text: str


def _define_flags():  # only when run as a program: tests import this module
  flags.DEFINE_string("workdir", "", "our recognition workdir (empty: peers only)")
  flags.DEFINE_list("sources", ["gutenberg", "opencv"], "gutenberg and/or opencv")
  flags.DEFINE_list("peers", ["tesseract", "rapidocr"], "peers to run, if installed")
  flags.DEFINE_string("cache_dir", "workdirs/real_text_cache", "downloads and extracted files")
  flags.DEFINE_string("out", "", "also write the tables (markdown) to this file")
  flags.DEFINE_string("picture", "", "also draw every crop with the readings to this PNG")
  flags.DEFINE_enum("fit", "auto", ["auto", "center", "stretch", "keep_aspect"], "ours: --fit")


# ------------------------------------------------------------------------------ fetch ----
def _download(url, path, sha256=None):
  tmp = path.with_suffix(path.suffix + ".part")
  try:
    with urllib.request.urlopen(url, timeout=120) as r, open(tmp, "wb") as f:
      shutil.copyfileobj(r, f)
  except OSError as e:
    raise SourceUnavailable(f"cannot download {url}: {e}") from None
  if sha256 and hashlib.sha256(tmp.read_bytes()).hexdigest() != sha256:
    tmp.unlink()
    raise SourceUnavailable(f"{url}: sha256 differs from PyPI's record")
  tmp.rename(path)


def pypi_sdist(name, version, cache):
  """The path of `name`'s source distribution at `version`, downloaded once into cache."""
  meta_url = f"https://pypi.org/pypi/{name}/json"
  try:
    with urllib.request.urlopen(meta_url, timeout=60) as r:
      meta = json.load(r)
  except OSError as e:
    cached = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    if cached:
      return cached[0]
    raise SourceUnavailable(f"cannot reach {meta_url}: {e}") from None
  files = meta.get("releases", {}).get(version, [])
  sdist = next((u for u in files if u["packagetype"] == "sdist"), None)
  if sdist is None:
    raise SourceUnavailable(f"{name} {version} has no source distribution on PyPI")
  path = cache / sdist["filename"]
  if not path.exists():
    # urljoin: a PyPI mirror may give file addresses relative to the metadata's
    _download(urllib.parse.urljoin(meta_url, sdist["url"]), path, sdist["digests"]["sha256"])
  return path


def pdf_jpeg(pdf_bytes):
  """The embedded JPEG of a one-image PDF (a scanned page), as a PIL image."""
  start = pdf_bytes.find(b"\xff\xd8\xff")
  end = pdf_bytes.rfind(b"\xff\xd9")
  if start < 0 or end < start:
    raise SourceUnavailable("no embedded JPEG in the PDF")
  image = Image.open(io.BytesIO(pdf_bytes[start : end + 2]))
  image.load()
  return image.convert("RGB")


def _tar_members(archive, names):
  """{name: bytes} of the named files in a tar archive (a path or bytes); a missing file
  or an unreadable archive is SourceUnavailable."""
  label = archive if isinstance(archive, pathlib.Path) else "the package's files"
  try:
    opened = (
      tarfile.open(archive)
      if isinstance(archive, pathlib.Path)
      else tarfile.open(fileobj=io.BytesIO(archive))
    )
    with opened as tar:
      return {name: tar.extractfile(name).read() for name in names}
  except KeyError as e:
    raise SourceUnavailable(f"{label} has no {e}") from None
  except (tarfile.TarError, OSError) as e:
    raise SourceUnavailable(f"cannot read {label}: {e}") from None


def gutenberg_page(cache):
  page_path = cache / "gutenberg_c03-29.png"
  if not page_path.exists():
    name, version, member = GUTENBERG_SDIST
    path = f"{name}-{version}/{member}"
    pdf = _tar_members(pypi_sdist(name, version, cache), [path])[path]
    pdf_jpeg(pdf).save(page_path)
  page = Image.open(page_path).convert("RGB")
  if page.size != GUTENBERG_PAGE_SIZE:
    raise SourceUnavailable(f"{page_path} is {page.size}, expected {GUTENBERG_PAGE_SIZE}")
  return page


def opencv_text_dir(cache):
  out = cache / "opencv"
  if all((out / f).exists() for f in OPENCV_WORDS):
    return out
  debs = sorted(cache.glob("opencv-doc_*.deb"))
  if not debs:
    if shutil.which("apt-get") is None:
      raise SourceUnavailable("apt-get not found (Debian's opencv-doc package is the source)")
    r = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=cache, capture_output=True)
    debs = sorted(cache.glob("opencv-doc_*.deb"))
    if r.returncode or not debs:
      raise SourceUnavailable(f"apt-get download opencv-doc failed: {r.stderr.decode()[-300:]}")
  try:
    r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True)
  except FileNotFoundError:
    raise SourceUnavailable("dpkg-deb not found (it unpacks Debian's opencv-doc)") from None
  if r.returncode:
    raise SourceUnavailable(f"dpkg-deb cannot unpack {debs[-1]}: {r.stderr.decode()[-300:]}")
  files = _tar_members(r.stdout, [f"./{OPENCV_TEXT_DIR}/{f}" for f in OPENCV_WORDS])
  out.mkdir(exist_ok=True)
  for f in OPENCV_WORDS:
    (out / f).write_bytes(files[f"./{OPENCV_TEXT_DIR}/{f}"])
  return out


def crops_of(image, words, source, stem):
  """Crops of `image` (PIL) at each (box or None, text) of `words`."""
  out = []
  for i, (box, text) in enumerate(words):
    if box is not None and not (box[2] <= image.width and box[3] <= image.height):
      raise SourceUnavailable(f"{stem}: box {box} outside the {image.size} image")
    part = image.crop(box) if box is not None else image
    out.append(Crop(source, f"{stem}_{i + 1}", np.asarray(part.convert("RGB")), text))
  return out


def load_crops(sources, cache):
  crops = []
  for source in sources:
    try:
      if source == "gutenberg":
        crops += crops_of(gutenberg_page(cache), GUTENBERG_WORDS, source, "c03-29")
      elif source == "opencv":
        folder = opencv_text_dir(cache)
        for f, words in OPENCV_WORDS.items():
          crops += crops_of(Image.open(folder / f), words, source, f.split(".")[0])
      else:
        raise app.UsageError(f"unknown source {source!r}: gutenberg or opencv")
    except SourceUnavailable as e:
      print(f"[skip] {source}: {e}")
  return crops


# ------------------------------------------------------------------------------ read -----
def ours_reader(workdir, fit="auto"):
  """read(crops) -> (texts, confidences), each crop fitted as `mms_jax.read --fit` does."""
  from mms_jax import read as read_lib

  config, predict = read_lib.load_recognizer(workdir)
  fit = read_lib.default_fit(config) if fit == "auto" else fit

  def read(images):
    arrays = np.stack([read_lib.fit_array(image, config.image_size, fit) for image in images])
    return read_lib.read_arrays(predict, arrays)

  return read


def read_correctly(text, pred):
  """Whether `pred` reads `text` under the 36-character protocol."""
  return text_metrics.score([text], [pred], "36")["word_accuracy"] == 1.0


def summary_table(crops, preds_by_reader):
  lines = [
    "| reader | source | crops | word acc (%) | 1 - NED (%) |",
    "|---|---|---:|---:|---:|",
  ]
  for name, preds in preds_by_reader.items():
    for source in sorted({c.source for c in crops}):
      idx = [i for i, c in enumerate(crops) if c.source == source]
      s = text_metrics.score([crops[i].text for i in idx], [preds[i] for i in idx], "36")
      lines.append(
        f"| {name} | {source} | {s['num']} | {100 * s['word_accuracy']:.1f} | "
        f"{100 * s['one_minus_ned']:.1f} |"
      )
  return "\n".join(lines)


def crop_table(crops, preds_by_reader, confidences=None):
  names = list(preds_by_reader)
  lines = [
    "| crop | printed | " + " | ".join(names) + " |",
    "|---|---|" + "---|" * len(names),
  ]
  for i, c in enumerate(crops):
    cells = []
    for n in names:
      pred = preds_by_reader[n][i]
      cell = f"`{pred}`" if pred else "(empty)"
      if n == "mms_jax" and confidences is not None:
        cell += f" {confidences[i]:.2f}"
      cells.append(cell + (" ✓" if read_correctly(c.text, pred) else ""))
    lines.append(f"| {c.name} | {c.text} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def draw(crops, preds, path):
  """Every crop with our reading above it (green where read correctly)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = 4
  rows = -(-len(crops) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 1.05 * rows))
  for ax in np.ravel(axes):
    ax.axis("off")
  for ax, (i, c) in zip(np.ravel(axes), enumerate(crops)):
    ax.imshow(c.image)
    color = "green" if read_correctly(c.text, preds[i]) else "red"
    ax.set_title(preds[i] or "(empty)", fontsize=12, color=color)
  fig.suptitle("mms_jax on real crops (green: read correctly under the 36-char protocol)")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=66)
  plt.close(fig)
  # 128 colours: the photographs would make a full-colour PNG of the page ~0.5 MB.
  Image.open(buffer).convert("RGB").quantize(128).save(path, optimize=True)


def main(argv):
  del argv
  if FLAGS.picture and not FLAGS.workdir:
    raise app.UsageError("--picture draws our readings: give --workdir too")
  cache = pathlib.Path(FLAGS.cache_dir)
  cache.mkdir(parents=True, exist_ok=True)
  crops = load_crops(FLAGS.sources, cache)
  if not crops:
    raise app.UsageError("no source could be loaded (see the [skip] lines)")
  images = [c.image for c in crops]
  preds_by_reader, confidences = {}, None
  if FLAGS.workdir:
    preds_by_reader["mms_jax"], confidences = ours_reader(FLAGS.workdir, FLAGS.fit)(images)
  for name, (read, about) in recognition_peers.installed_peers(FLAGS.peers, height=96).items():
    print(f"{name}: {about}")
    preds_by_reader[name] = read(images)
  tables = (
    summary_table(crops, preds_by_reader) + "\n\n" + crop_table(crops, preds_by_reader, confidences)
  )
  print("\n" + tables)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(tables + "\n")
  if FLAGS.picture:
    os.makedirs(os.path.dirname(FLAGS.picture) or ".", exist_ok=True)
    draw(crops, preds_by_reader["mms_jax"], FLAGS.picture)
    print(f"wrote {FLAGS.picture}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
