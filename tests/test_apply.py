"""`mms_jax.apply`: a segmentation or SR model on the user's own image files: outputs at
the image's own size (twice it for SR), the same numbers as the model on the fitted
input, skip rules as in `read`, another program's workdir refused in one line."""

from conftest import load_config
from conftest import module_process
import numpy as np
from PIL import Image
import pytest

from mms_jax import apply as apply_lib
from mms_jax.train import segmentation
from mms_jax.train import super_resolution

PROGRAMS = {"segmentation": segmentation, "super_resolution": super_resolution}
CONFIGS = {"segmentation": "finetune_segmentation", "super_resolution": "finetune_sr"}


@pytest.fixture(scope="module", params=sorted(PROGRAMS))
def trained(request, tmp_path_factory):
  program = request.param
  workdir = tmp_path_factory.mktemp(program)
  config = load_config(CONFIGS[program], "tiny")
  config.update(total_steps=2, pictures=False)
  PROGRAMS[program].train_and_evaluate(config, str(workdir))
  return program, workdir


def _images(folder):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 150, 3), np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 256, (20, 70), np.uint8)).save(folder / "b.jpg")  # grey
  (folder / "c.png").write_bytes(b"not an image")


def test_apply_writes_one_output_per_readable_image(trained, tmp_path):
  program, workdir = trained
  (tmp_path / "in").mkdir()
  _images(tmp_path / "in")
  result = module_process(
    "mms_jax.apply", f"--workdir={workdir}", f"--out={tmp_path / 'out'}", tmp_path / "in"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "wrote 2 image(s), skipped 1 unreadable" in result.stderr and "c.png" in result.stderr
  suffix = apply_lib.OUTPUTS[program]
  a = np.asarray(Image.open(tmp_path / "out" / f"a{suffix}"))
  b = np.asarray(Image.open(tmp_path / "out" / f"b{suffix}"))
  if program == "segmentation":
    assert a.shape == (40, 150) and b.shape == (20, 70)
    assert set(np.unique(a)) <= {0, 255}
  else:
    assert a.shape == (80, 300, 3) and b.shape == (40, 140, 3)


def test_apply_matches_the_model_on_the_fitted_input(trained):
  program, workdir = trained
  _, run_config, apply = apply_lib.load(str(workdir))
  image = np.random.default_rng(1).integers(0, 256, (32, 128, 3), np.uint8)
  if program == "segmentation":
    mask = apply_lib.process(program, run_config, apply, image, threshold=0.5)
    logits = apply(image[None])[0]
    np.testing.assert_array_equal(mask > 0, logits >= 0.0)
  else:
    small = image[::2, ::2]  # 16 x 64: the SR input size, output 32 x 128
    out = apply_lib.process(program, run_config, apply, small)
    want = np.clip((apply(small[None])[0] + 1) * 127.5, 0, 255).astype(np.uint8)
    assert out.shape == want.shape == (32, 128, 3)
    assert np.abs(out.astype(int) - want).max() <= 1


def test_a_recognizer_or_pretraining_workdir_is_refused(tmp_path):
  from conftest import run_main

  run_main("pretrain.py:tiny", tmp_path / "pre", "--config.total_steps=1")
  Image.fromarray(np.zeros((32, 128, 3), np.uint8)).save(tmp_path / "x.png")
  result = module_process(
    "mms_jax.apply", f"--workdir={tmp_path / 'pre'}", f"--out={tmp_path / 'o'}", tmp_path / "x.png"
  )
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "is a 'pretrain' run" in lines[0]
  assert not (tmp_path / "o").exists()
