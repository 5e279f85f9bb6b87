"""Data sets laid out as the community's tools write them, user errors at the CLI.

The LMDBs here are written with `lmdb` and PIL directly, the way
deep-text-recognition-benchmark's create_lmdb_dataset.py (and PARSeq, which reads the
same layout), TextZoom and the Union14M-U release store them: JPEG bytes, 1-based
`image-%09d` / `label-%09d` keys, `num-samples` written last. Not with our writer.
"""

import csv
import io
import logging

from conftest import load_config
from conftest import main_process
import lmdb
import numpy as np
from PIL import Image
import pytest

from mms_jax.data import formats
from mms_jax.data import pipeline
from mms_jax.evaluate import str_benchmarks
from mms_jax.train import common
from mms_jax.train import recognition


def _jpeg(seed, h=24, w=80):
  pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _write_like_create_lmdb_dataset(path, records, fields=("image", "label")):
  """records: list of dicts {field: bytes or None (absent)}; keys are 1-based."""
  path.mkdir(parents=True, exist_ok=True)
  env = lmdb.open(str(path), map_size=1 << 26)
  cache = {}
  for i, record in enumerate(records, start=1):
    for field in fields:
      if record.get(field) is not None:
        cache[f"{field}-{i:09d}".encode()] = record[field]
  cache[b"num-samples"] = str(len(records)).encode()
  with env.begin(write=True) as txn:
    for k, v in cache.items():
      txn.put(k, v)
  env.close()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  root = tmp_path_factory.mktemp("zoo")
  good = [{"image": _jpeg(i), "label": f"word{i}".encode()} for i in range(6)]
  bad = [
    {"image": _jpeg(90)[:200], "label": b"truncated"},  # undecodable
    {"image": _jpeg(91), "label": b"x" * 40},  # longer than 25
    {"image": _jpeg(92), "label": None},
  ]  # label key missing
  _write_like_create_lmdb_dataset(root / "str" / "evaluation" / "IIIT5k", good + bad)
  _write_like_create_lmdb_dataset(root / "str" / "evaluation" / "SVT", good[:4])
  # Union14M-U release: one root, image-only LMDBs, no train/ folder.
  for i, name in enumerate(("book32_lmdb", "cc_lmdb", "openvino_lmdb")):
    _write_like_create_lmdb_dataset(
      root / "union14m_u" / name,
      [{"image": _jpeg(10 * i + j)} for j in range(3 + i)],
      fields=("image",),
    )
  return root


def _str_config(path, **kw):
  c = pipeline.default_config()
  c.update({"source": "str_lmdb", "path": str(path), "reader": "direct", "charset": "36", **kw})
  return c


def _echo_labels():
  """A 'recognizer' that reads every image as 'word0'."""
  return lambda images: ["word0"] * len(images)


@pytest.mark.parametrize("reader", ["direct", "tfds"])
def test_benchmark_rows_count_the_skipped_records(zoo, tmp_path, reader, caplog):
  data = _str_config(zoo / "str", reader=reader, data_dir=str(tmp_path / "tfds"))
  with caplog.at_level(logging.WARNING):
    rows = str_benchmarks.evaluate(
      _echo_labels(), data, "evaluation", batch_size=4, image_size=(32, 128)
    )
  by_name = {r["benchmark"]: r for r in rows}
  assert by_name["evaluation/IIIT5k"]["num"] == 6
  assert by_name["evaluation/IIIT5k"]["skipped"] == 3
  assert by_name["evaluation/SVT"]["skipped"] == 0
  assert by_name["average"]["skipped"] == 3 and by_name["average"]["num"] == 10
  assert "evaluation/IIIT5k: 3 record(s) skipped" in caplog.text
  table = str_benchmarks.format_table(rows)
  assert "| evaluation/IIIT5k | 6 | 16.67 |" in table and table.count("| 3 |") == 2


def test_a_single_benchmark_folder_is_named_after_itself(zoo, caplog):
  data = _str_config(zoo / "str" / "evaluation" / "IIIT5k")
  with caplog.at_level(logging.WARNING):
    rows = str_benchmarks.evaluate(_echo_labels(), data, ".", batch_size=4, image_size=(32, 128))
  assert [r["benchmark"] for r in rows] == ["IIIT5k"]
  # IIIT5k has 3,000 samples under the protocol: the size check now fires.
  assert "Benchmark IIIT5k has 6 samples, the protocol expects 3000" in caplog.text


def test_the_program_reports_skips_for_a_benchmark_folder(zoo, tmp_path):
  config = load_config("finetune_recognition", "tiny")
  config.data.size = dict(train=64, val=8, test_heldout_fonts=8, test_hard=8)
  config.total_steps = 2
  config.eval.update(splits=(), benchmarks_path=str(zoo / "str" / "evaluation" / "IIIT5k"))
  recognition.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "eval_benchmarks.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["benchmark"], r["num"], r["skipped"]) for r in rows] == [("IIIT5k", "6", "3")]


@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_a_bad_benchmarks_path_is_refused_before_any_work(tmp_path, bad):
  config = load_config("finetune_recognition", "tiny")
  path = tmp_path / "nowhere"
  if bad == "empty":
    path.mkdir()
  config.eval.benchmarks_path = str(path)
  with pytest.raises(common.ConfigError, match="config.eval.benchmarks_path"):
    recognition.check_config(config)


@pytest.mark.parametrize("reader", ["direct", "tfds"])
def test_union14m_u_release_layout_trains_on_the_whole_tree(zoo, tmp_path, reader):
  data = pipeline.default_config()
  data.update(
    source="unlabeled", path=str(zoo / "union14m_u"), reader=reader, data_dir=str(tmp_path / "tfds")
  )
  assert len(pipeline.make_source(data, "train")) == 3 + 4 + 5
  # A tree that has a train/ folder keeps using it.
  (zoo / "union14m_u" / "train").mkdir(exist_ok=True)
  try:
    with pytest.raises(formats.DataError, match="train"):
      pipeline.make_source(data, "train")
  finally:
    (zoo / "union14m_u" / "train").rmdir()


def test_documented_override_forms_run(zoo, tmp_path):
  """docs/data.md's unlabeled pretraining command with the attribute form of a split
  override (--config.data.splits.train=.), two steps of the tiny model."""
  result = main_process(
    "pretrain.py:tiny",
    tmp_path / "w",
    "--config.data.source=unlabeled",
    f"--config.data.path={zoo / 'union14m_u'}",
    "--config.data.reader=direct",
    "--config.data.splits.train=.",
    "--config.total_steps=2",
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert (tmp_path / "w" / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize(
  "override, field",
  [
    ("--config.masking.ratio=1.5", "masking.ratio"),
    ("--config.masking.strategies=('random_patch','no_such_strategy')", "masking.strategies"),
    ("--config.grad_accum_steps=3", "config.batch_size"),
    ("--config.data.source=str_lmdb", "data_config.path"),
  ],
)
def test_user_errors_are_one_message_without_a_traceback(tmp_path, override, field):
  result = main_process("pretrain.py:tiny", tmp_path / "w", override)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert "mms_jax.main: error:" in result.stderr and field in result.stderr
  verbose = main_process("pretrain.py:tiny", tmp_path / "w", override, "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
