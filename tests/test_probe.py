"""Linear probes on cached features: each head reaches its task with oracle features,
and the program probes the encoder it was given."""

import json

from conftest import load_config
from conftest import run_main
import jax
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax.data import tokenizer as tokenizer_lib
from mms_jax.models import vit
from mms_jax.train import common
from mms_jax.train import probe

PATCH, GRID = (4, 4), (8, 32)
H, W = 32, 128


def _fit_and_score(task, data, config, tokenizer=None, fit=True, **fields):
  """Fits the task's probe head to `data` (config fields overridden by `fields`, e.g.
  total_steps=...) and scores it on the same data; fit=False scores the initial head."""
  width = next(v for k, v in data.items() if k in ("columns", "tokens", "lr_tokens")).shape[-1]
  outputs = {"recognition": len(tokenizer or ()), "segmentation": 16, "super_resolution": 48}
  head = probe.make_head(task, outputs[task])
  params = head.init(jax.random.PRNGKey(0), np.zeros((1, 1, width), np.float32))["params"]
  train = dict(data)
  if task == "recognition":
    train["ids"], train["lengths"] = tokenizer.encode_labels(train.pop("label"), 25)
  with config.unlocked():
    for name, value in fields.items():
      parent, _, leaf = name.rpartition(".")
      (config[parent] if parent else config)[leaf] = value
  if fit:
    params = probe.fit_task(task, head, params, train, config, PATCH, GRID)
  return probe.evaluate_task(task, head, params, data, config, tokenizer, PATCH, GRID)


def _random_masks(rng, n):
  """Foreground blobs not aligned to the 4x4 patch grid."""
  masks = np.zeros((n, H, W), np.float32)
  for m in masks:
    for _ in range(12):
      y, x = rng.integers(0, H - 6), rng.integers(0, W - 9)
      m[y : y + rng.integers(3, 7), x : x + rng.integers(3, 10)] = 1
  return masks


def test_segmentation_probe_reads_an_oracle_encoder_exactly():
  """Tokens that carry their own patch's mask pixels: a linear head must recover the
  mask, which it only does if the head's patches land where unpatchify puts them."""
  config = load_config("probe", "tiny")
  masks = _random_masks(np.random.default_rng(0), 96)
  tokens = np.asarray(vit.patchify(masks[..., None], PATCH)) * 2 - 1  # [N, 256, 16]
  scores = _fit_and_score(
    "segmentation", {"tokens": tokens, "mask": masks}, config, **{"segmentation.iterations": 50}
  )
  assert scores["iou"] > 0.97
  # Tokens from the wrong images carry no information: the probe cannot fake it.
  shuffled = _fit_and_score(
    "segmentation",
    {"tokens": tokens[::-1].copy(), "mask": masks},
    config,
    **{"segmentation.iterations": 50},
  )
  assert shuffled["iou"] < 0.5


def test_sr_probe_starts_at_bicubic_and_reads_an_oracle_residual():
  config = load_config("probe", "tiny")
  rng = np.random.default_rng(1)
  image = rng.uniform(-1, 1, (64, H, W, 3)).astype(np.float32)
  upsampled = np.clip(image + rng.normal(0, 0.2, image.shape), -1, 1).astype(np.float32)
  residual = np.asarray(vit.patchify(image - upsampled, PATCH))  # [N, 256, 48]
  data = {"lr_tokens": residual, "upsampled": upsampled, "image": image}
  untrained = _fit_and_score("super_resolution", data, config, fit=False)
  assert untrained["psnr"] == pytest.approx(untrained["bicubic_psnr"], abs=1e-4)
  trained = _fit_and_score("super_resolution", data, config)
  assert trained["psnr"] > trained["bicubic_psnr"] + 15
  # Pure noise features: ridge regression can only stay near bicubic.
  noise = dict(data, lr_tokens=rng.normal(size=residual.shape).astype(np.float32))
  assert abs(_fit_and_score("super_resolution", noise, config)["psnr"] - untrained["psnr"]) < 0.5


def test_ctc_probe_transcribes_columns_that_spell_the_label():
  """Column j carries a one-hot of the j-th character of a CTC path (blanks between
  characters); a linear CTC head must learn to read every word exactly."""
  config = load_config("probe", "tiny")
  tokenizer = tokenizer_lib.Tokenizer("0123456789abcdefghijklmnopqrstuvwxyz", "ctc")
  rng = np.random.default_rng(2)
  words = [
    "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), rng.integers(1, 12)))
    for _ in range(128)
  ]
  ids, lengths = tokenizer.encode(words, 25)
  columns = np.zeros((len(words), GRID[1], len(tokenizer)), np.float32)
  columns[:, :, tokenizer_lib.BLANK] = 1
  for i, (row, n) in enumerate(zip(ids, lengths)):
    for j in range(n):
      columns[i, 2 * j + 1] = 0
      columns[i, 2 * j + 1, row[j]] = 1
  data = {"columns": columns, "label": np.asarray(words, object)}
  scores = _fit_and_score(
    "recognition", data, config, tokenizer, total_steps=400, **{"recognition.lr": 5e-2}
  )
  assert scores["word_accuracy"] == 1.0 and scores["one_minus_ned"] == 1.0
  columns[:, :, :] = 1.0 / len(tokenizer)  # no information: no word can be read
  blind = _fit_and_score(
    "recognition", data, config, tokenizer, total_steps=100, **{"recognition.lr": 5e-2}
  )
  assert blind["word_accuracy"] < 0.05
  assert scores["ctc_loss"] < 0.2 and blind["ctc_loss"] > 1.0


def test_probe_program_probes_the_given_encoder(tmp_path):
  """End to end on the tiny configs: the probe's encoder is the pretraining
  checkpoint's (not a fresh init), '' is a seeded random init, the metrics land in
  metrics.jsonl at config.total_steps."""
  pretrain_dir = tmp_path / "pretrain"
  run_main("pretrain.py:tiny", pretrain_dir)
  log = run_main("probe.py:tiny", tmp_path / "probe", f"--config.init_from={pretrain_dir}")
  assert "loaded" in log
  config = load_config("probe", "tiny")
  rows = [json.loads(line) for line in (tmp_path / "probe/metrics.jsonl").read_text().splitlines()]
  final = rows[-1]
  assert final["step"] == config.total_steps
  for split in config.eval.splits:
    assert 0 <= final[f"eval/{split}/segmentation/iou"] <= 1
    assert 0 <= final[f"eval/{split}/recognition/one_minus_ned"] <= 1
    assert np.isfinite(final[f"eval/{split}/super_resolution/psnr"])
  assert json.loads((tmp_path / "probe/probe.json").read_text())["init_from"] == str(pretrain_dir)

  encoder = probe.build_encoder(config)
  with config.unlocked():
    config.init_from = str(pretrain_dir)
  loaded = probe.encoder_params(config, encoder)
  saved = checkpoints.load_params(pretrain_dir)["encoder"]
  jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(loaded))
  with config.unlocked():
    config.init_from = ""
  fresh = jax.device_get(probe.encoder_params(config, encoder))
  assert not np.array_equal(fresh["patch_embed"]["kernel"], saved["patch_embed"]["kernel"])
  again = jax.device_get(probe.encoder_params(config, encoder))
  jax.tree.map(np.testing.assert_array_equal, fresh, again)


def _features(config, params, images):
  return probe.feature_encoder(config).apply({"params": params}, images)[0]


def test_read_depth_cuts_the_encoder_after_that_block():
  """read_depth=k reads the LayerNorm'd residual stream after block k: the full depth
  is the unset default, later blocks do not touch it, and 0 depends on no block."""
  config = load_config("probe", "tiny")
  with config.unlocked():
    config.model.encoder.depth = 2
  images = np.random.default_rng(0).uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
  params = probe.encoder_params(config, probe.build_encoder(config))
  full = _features(config, params, images)
  scrambled = jax.tree.map(lambda x: x, params)
  scrambled["blocks_1"] = jax.tree.map(lambda x: x[::-1] * 3.0, params["blocks_1"])
  with config.unlocked():
    config.read_depth = 2
  np.testing.assert_array_equal(_features(config, params, images), full)
  with config.unlocked():
    config.read_depth = 1
  after_one = _features(config, params, images)
  assert np.abs(after_one - full).max() > 1e-2
  np.testing.assert_array_equal(_features(config, scrambled, images), after_one)
  with config.unlocked():
    config.read_depth = 0
  scrambled["blocks_0"] = jax.tree.map(lambda x: x * 0.5, params["blocks_0"])
  np.testing.assert_array_equal(
    _features(config, scrambled, images), _features(config, params, images)
  )


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("tasks", ("recognition", "ocr"), "tasks"),
    ("total_steps", 0, "total_steps"),
    ("segmentation.l2", 0.0, "l2"),
    ("read_depth", 2, "read_depth=2: the encoder depth is 1"),
    ("read_depth", -1, "read_depth"),
  ],
)
def test_bad_probe_config_names_the_field(field, value, message):
  config = load_config("probe", "tiny")
  with config.unlocked():
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
  with pytest.raises(common.ConfigError, match=message):
    probe.check_config(config)
