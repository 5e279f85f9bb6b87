"""Train/test leakage: copies of evaluation images among the training images, exact and
near (re-encoded, resized, brightened), found on both sides of the threshold; the
program warns and lists them; the command runs alone."""

import io

from conftest import module_process
import numpy as np
from PIL import Image
from PIL import ImageEnhance
import pytest

from mms_jax.data import formats
from mms_jax.data import leakage
from mms_jax.data import pipeline


@pytest.fixture(scope="module")
def crops():
  config = pipeline.default_config()
  config.update(reader="direct", size={"test_heldout_fonts": 60})
  source = pipeline.make_source(config, "test_heldout_fonts")
  return [source[i] for i in range(60)]


def _jpeg(image, quality):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


def _resized(image, factor):
  h, w = image.shape[:2]
  return np.asarray(Image.fromarray(image).resize((int(w * factor), int(h * factor))))


def _brighter(image):
  return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(1.2))


def test_copies_are_near_and_different_words_are_far(crops):
  hashes = np.stack([leakage.fingerprints(c["image"])[1] for c in crops])
  distances = leakage.hamming(hashes, hashes)
  np.fill_diagonal(distances, 10_000)
  assert distances.min() > 2 * leakage.MAX_DISTANCE  # 60 different words: far apart
  for change in (lambda x: _jpeg(x, 60), lambda x: _resized(x, 0.7), lambda x: _resized(x, 1.5)):
    copies = np.stack([leakage.fingerprints(change(c["image"]))[1] for c in crops])
    near = np.diag(leakage.hamming(copies, hashes))
    assert np.mean(near <= leakage.MAX_DISTANCE) >= 0.95


def test_find_names_exact_and_near_copies(crops, tmp_path):
  train = crops[:40]
  test = [crops[3], {"image": _jpeg(crops[7]["image"], 70), "label": "x"}, *crops[40:50]]
  formats.write_folder(str(tmp_path / "train"), train)
  formats.write_folder(str(tmp_path / "test"), test)
  config = pipeline.default_config()
  config.update(source="folder", path=str(tmp_path))
  found = leakage.check(config, "train", ["test"], str(tmp_path / "leaks.tsv"))
  rows = sorted(found["test"])
  assert [(e.split("/")[-1], t.split("/")[-1], kind) for e, t, _, kind in rows] == [
    ("000000.png", "000003.png", "exact"),
    ("000001.png", "000007.png", "near"),
  ]
  assert (tmp_path / "leaks.tsv").read_text().count("\n") == 3
  assert leakage.check(config, "train", ["test"], max_train=10) is None

  # The command alone.
  result = module_process("mms_jax.data.leakage", f"--path={tmp_path}", "--eval=test")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "test: 2 image(s) also in train (1 exact, 1 near duplicates)" in result.stdout


def test_the_program_warns_and_lists_the_copies(crops, tmp_path):
  from conftest import run_main

  formats.write_folder(str(tmp_path / "tree" / "train"), crops[:16])
  formats.write_folder(str(tmp_path / "tree" / "test"), [crops[0], *crops[20:26]])
  log = run_main(
    "finetune_recognition.py:tiny",
    tmp_path / "w",
    "--config.data.source=folder",
    f"--config.data.path={tmp_path / 'tree'}",
    "--config.total_steps=1",
  )
  assert "also training images (test: 1 (1 exact, 0 near duplicates))" in log
  assert (tmp_path / "w" / "leakage.tsv").exists()
