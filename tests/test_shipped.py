"""Shipped models: packaged from a trained workdir, found by name wherever a checkpoint
path is taken (init_from, read), read with no --workdir, exported for JAX-free reading."""

import json
import pathlib

from conftest import load_config
from conftest import module_process
import jax
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax import shipped
from mms_jax.models import recognition as rec
from mms_jax.train import recognition


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rec")
  config = load_config("finetune_recognition")
  config.data.size = dict(train=256, val=8, test_heldout_fonts=8, test_hard=8)
  config.update(total_steps=2, batch_size=8, pictures=False)
  config.eval.splits = ("test_heldout_fonts",)
  recognition.train_and_evaluate(config, str(workdir))
  root = tmp_path_factory.mktemp("models")
  shipped.package(workdir, "recognizer_36", "# a card\n", into=root)
  return workdir, root


def test_a_packaged_model_holds_params_config_onnx_and_card(models):
  workdir, root = models
  folder = root / "recognizer_36"
  assert {p.name for p in folder.iterdir()} == {
    "checkpoints",
    "config.json",
    "onnx",
    "MODEL_CARD.md",
  }
  assert json.loads((folder / "config.json").read_text())["program"] == "recognition"
  trained, kept = checkpoints.load_params(workdir), checkpoints.load_params(folder)
  assert jax.tree.structure(trained) == jax.tree.structure(kept)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(a, b)
  assert (folder / "onnx" / "read.py").exists()


def test_a_shipped_name_works_where_a_checkpoint_path_does(models, monkeypatch):
  _, root = models
  monkeypatch.setenv("MMS_JAX_MODELS", str(root))
  assert shipped.names() == ["recognizer_36"]
  assert checkpoints.resolve_checkpoint("recognizer_36").parent.parent == root / "recognizer_36"
  assert rec.load("recognizer_36").tokenizer.charset.startswith("0123")
  config = load_config("finetune_recognition")
  config.init_from = "recognizer_36"
  assert recognition.source_recognizer(config)["program"] == "recognition"


def test_read_without_a_workdir_uses_the_shipped_recognizer(models, tmp_path, monkeypatch):
  _, root = models
  from PIL import Image

  Image.fromarray(np.full((32, 100, 3), 255, np.uint8)).save(tmp_path / "blank.png")
  monkeypatch.setenv("MMS_JAX_MODELS", str(root))
  result = module_process("mms_jax.read", tmp_path / "blank.png")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"reading with {root}/recognizer_36/checkpoints/" in result.stderr
  monkeypatch.setenv("MMS_JAX_MODELS", str(tmp_path / "none"))
  result = module_process("mms_jax.read", tmp_path / "blank.png")
  assert result.returncode == 2 and "no shipped recognizer" in result.stderr


def test_the_shipped_reader_is_the_packages_onnx_reader():
  """The committed export carries read.py as a copy: it must not drift from its source."""
  from mms_jax import onnx_reader

  for name in shipped.names():
    copy = shipped.PACKAGED / name / "onnx" / "read.py"
    if copy.exists():
      assert copy.read_text() == pathlib.Path(onnx_reader.__file__).read_text(), name
