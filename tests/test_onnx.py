"""ONNX export of a recognizer and reading without JAX: the export's logits equal JAX's,
the same text on every image, read.py runs in an interpreter where JAX and mms_jax cannot
be imported; the read-time fits and EXIF orientation the two paths share."""

import json
import subprocess
import sys

from conftest import load_config
from conftest import module_process
from conftest import subprocess_env
import numpy as np
from PIL import Image
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

from mms_jax import onnx_reader  # noqa: E402
from mms_jax import read as read_lib  # noqa: E402
from mms_jax.convert import onnx_export  # noqa: E402
from mms_jax.convert.torch_layouts import ConversionError  # noqa: E402
from mms_jax.data import pipeline  # noqa: E402
from mms_jax.train import recognition  # noqa: E402

# Imports that must fail inside the JAX-free reader.
BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "mms_jax", "ml_collections", "absl")


def _recognizer(tmp_path_factory, head="ctc"):
  """A recognizer with the default encoder (conv stem, ALiBi, 8x4 patches), a few big
  steps so that it predicts characters."""
  workdir = tmp_path_factory.mktemp(f"rec_{head}")
  config = load_config("finetune_recognition")
  config.data.size = dict(train=256, val=8, test_heldout_fonts=16, test_hard=8)
  config.model.head = head
  config.update(total_steps=4, batch_size=8)
  config.lr.update(base=2.0, warmup_steps=1)
  config.eval.splits = ("test_heldout_fonts",)
  config.pictures = False
  recognition.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  workdir = _recognizer(tmp_path_factory)
  return workdir, onnx_export.export(workdir, tmp_path_factory.mktemp("onnx") / "rec")


@pytest.fixture(scope="module")
def word_images():
  data = pipeline.default_config()
  data.update(reader="direct", size={"test_heldout_fonts": 16})
  source = pipeline.make_source(data, "test_heldout_fonts")
  return [source[i]["image"] for i in range(16)]


def test_the_export_reads_as_jax_does(exported, word_images):
  workdir, folder = exported
  spec = json.loads((folder / "reader.json").read_text())
  assert spec["fit"] == "center" and spec["max_abs_error_vs_jax"] <= onnx_export.TOLERANCE
  config, predict = read_lib.load_recognizer(str(workdir))
  arrays = np.stack([read_lib.fit_array(x, config.image_size, "center") for x in word_images])
  jax_texts, jax_confidences = read_lib.read_arrays(predict, arrays, batch_size=16)
  reader = onnx_reader.Reader(folder)
  onnx_texts, onnx_confidences = reader.read_arrays(arrays)
  assert any(jax_texts), "the tiny recognizer should predict some characters"
  assert onnx_texts == jax_texts
  np.testing.assert_allclose(onnx_confidences, jax_confidences, rtol=1e-3, atol=1e-6)
  # Files, PIL images and arrays in, the same texts out (a dynamic batch of 3).
  assert [t for t, _ in reader.read(word_images[:3], batch_size=3)] == jax_texts[:3]


def test_read_py_runs_where_jax_cannot_be_imported(exported, word_images, tmp_path):
  _, folder = exported
  for i, image in enumerate(word_images[:4]):
    Image.fromarray(image).save(tmp_path / f"w{i}.png")
  code = (
    "import runpy, sys\n"
    f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
    f"sys.argv = ['read.py', {str(tmp_path)!r}, '--csv={tmp_path / 'out.csv'}']\n"
    f"runpy.run_path({str(folder / 'read.py')!r}, run_name='__main__')\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "read 4 image(s), skipped 0" in result.stderr
  assert len((tmp_path / "out.csv").read_text().splitlines()) == 5
  # The installed command gives the same lines.
  again = module_process("mms_jax.read", f"--model={folder}", tmp_path)
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout == result.stdout


def test_an_ar_recognizer_is_refused_with_the_reason(tmp_path_factory, tmp_path):
  workdir = _recognizer(tmp_path_factory, head="ar")
  with pytest.raises(ConversionError, match="'ar' head: the ONNX export covers CTC"):
    onnx_export.export(workdir, tmp_path / "ar")


def test_exif_orientation_and_grey_arrays_are_read_upright(word_images, tmp_path):
  upright = word_images[0]
  exif = Image.Exif()
  exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
  # The file holds the pixels as the sensor saw them: the upright image turned left.
  Image.fromarray(np.rot90(upright)).save(tmp_path / "phone.jpg", exif=exif, quality=100)
  with Image.open(tmp_path / "phone.jpg") as image:
    seen = onnx_reader.to_rgb(image)
  assert seen.shape == upright.shape
  assert np.abs(seen.astype(int) - upright).mean() < 8  # JPEG noise only
  grey = upright.mean(-1).astype(np.uint8)
  fitted = read_lib.fit_array(grey, (32, 128), "center")
  assert fitted.shape == (32, 128, 3) and fitted.dtype == np.float32


def test_a_crop_far_wider_than_a_word_is_read_with_a_warning(
  exported, word_images, tmp_path, capsys
):
  _, folder = exported
  page = np.concatenate([word_images[0]] * 8, axis=1)  # 32 x 1024: a line of 8 crops
  Image.fromarray(page).save(tmp_path / "line.png")
  status = onnx_reader.main([str(tmp_path / "line.png"), f"--model={folder}"])
  assert status == 0
  assert "the model reads one line of text" in capsys.readouterr().err


def test_the_converter_cli_writes_the_folder(exported, tmp_path):
  workdir, _ = exported
  result = module_process(
    "mms_jax.convert", f"--src={workdir}", "--format=onnx", f"--dst={tmp_path / 'd'}"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert {p.name for p in (tmp_path / "d").iterdir()} == {"model.onnx", "reader.json", "read.py"}
  assert "onnx_ir" not in result.stderr


def test_the_python_reader_reads_the_same_with_both_backends(exported, word_images):
  workdir, folder = exported
  with_jax = read_lib.Reader.from_workdir(str(workdir)).read(word_images[:5])
  without = read_lib.Reader.from_onnx(folder).read(word_images[:5])
  assert [t for t, _ in with_jax] == [t for t, _ in without]
  np.testing.assert_allclose([c for _, c in with_jax], [c for _, c in without], rtol=1e-3)
