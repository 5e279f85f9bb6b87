"""benchmarks/recognition_peers.py: the images it scores and the per-font table."""

import os

import numpy as np
import pytest

from benchmarks import recognition_peers
from configs import finetune_recognition
from mms_jax.data import fonts as fonts_lib
from mms_jax.data import pipeline


def test_split_with_fonts_is_the_programs_evaluation_records():
  data = finetune_recognition.get_config().data
  images, texts, fonts = recognition_peers.load_split_with_fonts(data, "test_heldout_fonts", 6)
  source = pipeline.make_source(data, "test_heldout_fonts")
  kept = [i for i in range(6) if str(source[i]["label"]) in texts]
  assert len(images) == len(texts) == len(fonts) == len(kept) >= 5
  for image, i in zip(images, kept):
    np.testing.assert_array_equal(image, source[i]["image"])
  heldout = fonts_lib.split_fonts(fonts_lib.discover_fonts(), "heldout")
  assert set(fonts) <= {os.path.basename(p) for p in heldout}


def test_font_table_sorts_by_the_first_readers_accuracy():
  gts = ["ab", "cd", "ef", "gh", "ij"]
  fonts = ["A.ttf", "B.ttf", "A.ttf", "B.ttf", "C.ttf"]
  preds = {"ours": ["ab", "xx", "ef", "xx", "ij"], "peer": ["xx", "cd", "ef", "gh", "xx"]}
  table = recognition_peers.font_table("test", fonts, gts, preds).splitlines()
  assert table[1] == "| font | n | ours | peer |"
  assert table[3:] == [
    "| B.ttf | 2 | 0 | 100 |",
    "| A.ttf | 2 | 100 | 50 |",
    "| C.ttf | 1 | 100 | 0 |",
  ]


def test_installed_peers_refuses_an_unknown_name_and_skips_a_missing_one(monkeypatch, capsys):
  from absl import app

  with pytest.raises(app.UsageError, match="unknown peer 'nope'"):
    recognition_peers.installed_peers(["nope"])
  monkeypatch.setattr(recognition_peers.shutil, "which", lambda name: None)
  assert recognition_peers.installed_peers(["tesseract"]) == {}
  assert "[skip] tesseract: not installed" in capsys.readouterr().out
