"""The segmentation and super-resolution programs end to end on tiny models: the
pretrained encoder is transferred exactly, freeze_encoder keeps it bit-identical,
metrics and pictures are written, and eval-only mode reproduces the final evaluation."""

import json

from conftest import load_config
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax.data import formats
from mms_jax.train import common
from mms_jax.train import pretrain
from mms_jax.train import segmentation
from mms_jax.train import super_resolution


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny pretraining workdir (encoder 32 wide, 1 block, 2 heads: the tiny variants')."""
  workdir = tmp_path_factory.mktemp("pretrain")
  config = load_config("pretrain", "tiny")
  config.total_steps, config.picture_every, config.checkpoint.every = 2, 0, 2
  pretrain.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def recognizer_workdir(tmp_path_factory):
  """An (untrained) tiny CTC recognition run: config.json + one checkpoint."""
  from mms_jax.train import recognition

  workdir = tmp_path_factory.mktemp("recognition")
  config = load_config("finetune_recognition", "tiny")
  config.model.head = "ctc"
  tokenizer = recognition.check_config(config)
  model = recognition.build_model(config, tokenizer)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 128, 3)))["params"]
  common.write_config(config, workdir)
  with checkpoints.Checkpointer(workdir, program="recognition") as ckpt:
    ckpt.save(1, {"step": jnp.ones((), jnp.int32), "params": params}, force=True)
  return workdir


def _tiny(name, pretrained, **overrides):
  config = load_config(name, "tiny")
  config.init_from = str(pretrained)
  config.total_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def _tree_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  return all(np.array_equal(x, y) for (_, x), (_, y) in zip(flat_a, flat_b))


def _jsonl(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_segmentation_with_frozen_encoder_trains_evaluates_and_reevaluates(tmp_path, pretrained):
  workdir = tmp_path / "seg"
  config = _tiny("finetune_segmentation", pretrained, freeze_encoder=True)
  state = segmentation.train_and_evaluate(config, str(workdir)).state
  assert int(state.step) == 2

  # The encoder is the pretrained one, bit for bit (transferred exactly, then frozen);
  # the head is new (not in the pretraining checkpoint) and it trained.
  loaded = checkpoints.load_params(pretrained)
  params = jax.device_get(state.params)
  assert _tree_equal(params["encoder"], loaded["encoder"])
  assert "head" not in loaded
  model = segmentation.build_model(config)
  before = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, 32, 128, 3)))
  assert jax.tree.map(np.shape, params["head"]) == jax.tree.map(np.shape, before["params"]["head"])
  before = jax.device_get(before["params"]["head"])
  assert not _tree_equal(params["head"], before)

  rows = _jsonl(workdir)
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  final = json.loads((workdir / "eval_0000002.json").read_text())
  for split, count in (("val", 12), ("test_heldout_fonts", 8), ("test_hard", 8)):
    assert final[f"eval/{split}/count"] == count  # padded last batch not counted
    for metric in ("iou", "fscore", "iou_per_image", "precision", "recall"):
      assert 0 <= final[f"eval/{split}/{metric}"] <= 1
  table = (workdir / "eval.md").read_text().splitlines()
  assert table[2].startswith("| benchmark | fscore | fscore_per_image | iou | iou_per_image |")
  iou = final["eval/test_hard/iou"]
  assert any(line.startswith("| test_hard | ") and f"| {iou:.4g} |" in line for line in table)
  assert (workdir / "segmentation_0000002.png").stat().st_size > 1000

  # Eval-only on the trained workdir gives the same numbers, and trains nothing.
  config = load_config("finetune_segmentation", "tiny")
  config.eval_only, config.eval_from, config.pictures = True, str(workdir), False
  again = segmentation.train_and_evaluate(config, str(tmp_path / "eval")).metrics
  assert again == pytest.approx(final)
  assert not (tmp_path / "eval" / "checkpoints").exists()


def test_super_resolution_trains_evaluates_and_reevaluates(
  tmp_path, pretrained, recognizer_workdir
):
  workdir = tmp_path / "sr"
  config = _tiny("finetune_sr", pretrained)
  config.loss.gradient_weight = 0.5
  state = super_resolution.train_and_evaluate(config, str(workdir)).state
  assert int(state.step) == 2
  train_rows = [r for r in _jsonl(workdir) if "loss" in r]
  assert all(r["loss"] >= r["l2"] > 0 and r["gradient"] > 0 for r in train_rows)
  final = json.loads((workdir / "eval_0000002.json").read_text())
  for split in ("val", "test_heldout_fonts", "test_hard"):
    assert 10 < final[f"eval/{split}/psnr"] < 60
    assert 0 < final[f"eval/{split}/ssim"] <= 1
    assert 10 < final[f"eval/{split}/bicubic_psnr"] < 60
  assert (workdir / "super_resolution_0000002.png").stat().st_size > 1000

  # Eval-only on this workdir's checkpoint: the same numbers, plus (optional) word
  # accuracy of the bicubic, SR and HR images read by a recognition run's model.
  config = load_config("finetune_sr", "tiny")
  config.eval_only, config.pictures = True, False
  config.sr_eval_recognizer = str(recognizer_workdir)
  again = super_resolution.train_and_evaluate(config, str(workdir)).metrics
  assert {k: v for k, v in again.items() if "word_accuracy" not in k} == pytest.approx(final)
  for split in ("val", "test_heldout_fonts", "test_hard"):
    for kind in ("bicubic", "sr", "hr"):
      assert 0 <= again[f"eval/{split}/word_accuracy_{kind}"] <= 1

  # TextZoom layout: the 'test' split is scored per sub-folder and over all of them.
  rng = np.random.default_rng(0)
  sizes = {"easy": 3, "medium": 2, "hard": 4}
  for name, n in sizes.items():
    formats.write_lmdb(
      str(tmp_path / "textzoom" / "test" / name),
      [
        {
          "image": rng.integers(0, 256, (32, 128, 3), np.uint8),
          "lr_image": rng.integers(0, 256, (16, 64, 3), np.uint8),
          "label": "word",
        }
        for _ in range(n)
      ],
      kind="textzoom",
    )
  config = load_config("finetune_sr", "tiny")
  config.eval_only, config.pictures, config.eval_from = True, False, str(workdir)
  config.data.update(source="textzoom", path=str(tmp_path / "textzoom"), reader="direct")
  zoom = super_resolution.train_and_evaluate(config, str(tmp_path / "zoom")).metrics
  for name, n in sizes.items():
    assert zoom[f"eval/test/{name}/count"] == n
    assert zoom[f"eval/test/{name}/psnr"] > 0
  assert zoom["eval/test/all/count"] == 9
  assert zoom["eval/test/all/psnr"] == pytest.approx(
    sum(zoom[f"eval/test/{k}/psnr"] * n for k, n in sizes.items()) / 9
  )


def test_sr_loss_and_its_gradient_term():
  hr = jnp.zeros((1, 3, 3, 1))
  sr = hr.at[0, 1, 1, 0].set(1.0)  # one bright pixel
  loss, parts = super_resolution.sr_loss(sr, hr, gradient_weight=0.5)
  assert parts["l2"] == pytest.approx(1 / 9)
  # d/dy and d/dx each have 2 non-zero differences (|1|) among 6 entries.
  assert parts["gradient"] == pytest.approx(2 / 6 + 2 / 6)
  assert loss == pytest.approx(1 / 9 + 0.5 * 4 / 6)


def test_configs_without_masks_or_pairs_are_refused(tmp_path):
  config = load_config("finetune_segmentation", "tiny")
  config.data.source = "textzoom"
  with pytest.raises(common.ConfigError, match="config.data.source='textzoom'"):
    segmentation.train_and_evaluate(config, str(tmp_path))
  config = load_config("finetune_sr", "tiny")
  config.data.source = "textseg"
  with pytest.raises(common.ConfigError, match="config.data.source='textseg'"):
    super_resolution.train_and_evaluate(config, str(tmp_path))
  # Augmentation would warp the HR image apart from its LR pair.
  config = load_config("finetune_sr", "tiny")
  config.data.augment = True
  with pytest.raises(common.ConfigError, match="data.augment=False for super-resolution"):
    super_resolution.train_and_evaluate(config, str(tmp_path))
  assert not any(tmp_path.iterdir())  # refused before anything was written
