"""`python -m mms_jax.read` end to end on a tiny trained recognizer: files of odd sizes
and modes, a folder, a corrupt file, the CSV, and the errors a user meets."""

import csv

from conftest import load_config
from conftest import module_process
import numpy as np
from PIL import Image
import pytest

from mms_jax import read as read_lib
from mms_jax.train import pretrain
from mms_jax.train import recognition


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rec")
  config = load_config("finetune_recognition", "tiny")
  config.model.head = "ctc"
  config.data.size = dict(train=32, val=8, test_heldout_fonts=8, test_hard=8)
  config.total_steps = 2
  config.eval.splits = ("test_hard",)
  recognition.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """A folder of images in many sizes and modes, one corrupt file, one non-image."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), np.uint8)
  Image.fromarray(rgb(32, 128)).save(folder / "a_rgb.png")
  Image.fromarray(rgb(7, 300)).convert("L").save(folder / "b_grey_thin.png")
  Image.fromarray(rgb(200, 50)).save(folder / "c_tall.jpg", quality=90)
  rgba = np.concatenate([rgb(40, 90), rng.integers(0, 255, (40, 90, 1), np.uint8)], -1)
  Image.fromarray(rgba).save(folder / "d_rgba.png")
  Image.fromarray(rgb(30, 60)).convert("P").save(folder / "e_palette.gif")
  Image.fromarray(rng.integers(0, 65535, (20, 80), np.uint16)).save(folder / "f_16bit.png")
  Image.fromarray(rgb(1, 1)).convert("1").save(folder / "g_one_pixel.bmp")
  (folder / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (folder / "notes.txt").write_text("not an image, ignored when reading a folder")
  return folder


def run_read(*args):
  return module_process("mms_jax.read", *args)


def test_reads_a_folder_skips_the_corrupt_file_and_writes_csv(rec_dir, images, tmp_path):
  out = tmp_path / "out.csv"
  result = run_read(f"--workdir={rec_dir}", f"--csv={out}", "--batch_size=3", images)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().split("\n")
  assert len(lines) == 7  # every image but the corrupt one; notes.txt is not an image
  for line, name in zip(
    lines, ["a_rgb", "b_grey", "c_tall", "d_rgba", "e_palette", "f_16bit", "g_one_pixel"]
  ):
    path, text, confidence = line.split("\t")
    assert name in path and 0.0 <= float(confidence) <= 1.0
    assert set(text) <= set("0123456789abcdefghijklmnopqrstuvwxyz")
  assert "skipped" in result.stderr and "h_corrupt.png" in result.stderr
  assert "read 7 image(s), skipped 1 unreadable" in result.stderr
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert [r["path"] for r in rows] == [line.split("\t")[0] for line in lines]


def test_batching_and_padding_do_not_change_the_results(rec_dir, images):
  config, predict = read_lib.load_recognizer(rec_dir)
  files = sorted(p for p in images.iterdir() if p.suffix == ".png")[:3]
  one = list(read_lib.read(predict, files, tuple(config.image_size), batch_size=1))
  many = list(read_lib.read(predict, files, tuple(config.image_size), batch_size=8))
  assert [r[1] for r in one] == [r[1] for r in many]
  np.testing.assert_allclose([r[2] for r in one], [r[2] for r in many], rtol=1e-4)
  # The same image as the program's evaluation sees it: resized and scaled to [-1, 1].
  array = read_lib.load_image(files[0], (32, 128), "stretch")
  assert array.shape == (32, 128, 3) and -1.0 <= array.min() and array.max() <= 1.0


def test_clear_errors(rec_dir, images, tmp_path):
  result = run_read(f"--workdir={tmp_path}", images)
  assert result.returncode != 0 and "config.json not found" in result.stderr

  pretrain_dir = tmp_path / "pretrain"
  config = load_config("pretrain", "tiny")
  config.total_steps, config.picture_every, config.checkpoint.every = 1, 0, 1
  pretrain.train_and_evaluate(config, str(pretrain_dir))
  result = run_read(f"--workdir={pretrain_dir}", images)
  assert result.returncode != 0 and "'pretrain' workdir, not a recognition" in result.stderr

  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  (no_ckpt / "config.json").write_text((rec_dir / "config.json").read_text())
  result = run_read(f"--workdir={no_ckpt}", images)
  assert result.returncode != 0 and "no checkpoint" in result.stderr

  result = run_read(f"--workdir={rec_dir}", tmp_path / "missing.png")
  assert result.returncode != 0 and "missing.png does not exist" in result.stderr

  result = run_read(f"--workdir={rec_dir}", images / "h_corrupt.png")
  assert result.returncode == 1 and "read 0 image(s), skipped 1" in result.stderr


def test_center_lays_a_crop_out_as_the_generator_does():
  crop = np.full((10, 20, 3), (200, 180, 160), np.uint8)
  crop[3:7, 4:16] = 0  # a dark "word" on a uniform background
  out = read_lib.center(crop, (32, 128))
  assert out.shape == (32, 128, 3) and out.dtype == np.uint8
  # Height 10 -> 32 at the crop's aspect ratio: 64 columns, centred; the rest is the
  # border colour, not grey padding.
  np.testing.assert_array_equal(out[:, :32], np.full((32, 32, 3), (200, 180, 160)))
  np.testing.assert_array_equal(out[:, 96:], np.full((32, 32, 3), (200, 180, 160)))
  dark_columns = np.flatnonzero(out.min(axis=(0, 2)) < 50)
  assert 32 < dark_columns.min() and dark_columns.max() < 96
  # Wider than W at height H: squeezed to W, nothing cut off.
  wide = np.zeros((10, 200, 3), np.uint8)
  wide[:, -1] = 255
  assert read_lib.center(wide, (32, 128))[:, -1].min() > 0


def test_default_fit_follows_the_training_images():
  config = load_config("finetune_recognition", "tiny")
  assert read_lib.default_fit(config) == "center"  # generated images
  config.data.source = "str_lmdb"
  assert read_lib.default_fit(config) == "stretch"
  config.data.keep_aspect = True
  assert read_lib.default_fit(config) == "keep_aspect"
  array = np.zeros((10, 20, 3), np.uint8)
  for fit in read_lib.FITS:
    out = read_lib.fit_array(array, (32, 128), fit)
    assert out.shape == (32, 128, 3) and out.dtype == np.float32
  with pytest.raises(ValueError, match="fit='squash'"):
    read_lib.fit_array(array, (32, 128), "squash")
