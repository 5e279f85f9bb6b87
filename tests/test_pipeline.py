"""TFDS builders and grain pipelines: shapes, ranges, state, shards, errors."""

import gc
import io
import json

import numpy as np
from PIL import Image
import pytest

from mms_jax import errors
from mms_jax.data import builders
from mms_jax.data import formats
from mms_jax.data import pipeline

SIZE = (32, 128)


def _image(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _labeled(n, prefix, h=16, w=48):
  return [{"image": _image(h, w + i % 7, i), "label": f"{prefix}{i}"} for i in range(n)]


def _config(**kw):
  c = pipeline.default_config()
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def lmdb_tree(tmp_path_factory):
  """train/a (40), train/bad (corrupted: 2 good of 5), evaluation/X (10), /Y (7)."""
  root = tmp_path_factory.mktemp("str")
  formats.write_lmdb(str(root / "train" / "a"), _labeled(40, "a"))
  formats.write_lmdb(str(root / "evaluation" / "X"), _labeled(10, "x"))
  formats.write_lmdb(str(root / "evaluation" / "Y"), _labeled(7, "y"))
  buf = io.BytesIO()
  Image.fromarray(_image(16, 40, 99)).save(buf, format="PNG")
  good = buf.getvalue()
  formats.write_lmdb_raw(
    str(root / "train" / "bad"),
    {
      "num-samples": b"6",
      "image-000000001": good,
      "label-000000001": b"good1",
      "image-000000002": b"junk",
      "label-000000002": b"junk",
      "image-000000003": good,
      "label-000000003": b"",
      "image-000000004": good,
      "label-000000004": b"\xc3\x28",
      "image-000000005": good,
      "label-000000005": b"good5",
    },
  )
  data_dir = tmp_path_factory.mktemp("tfds")
  return _config(source="str_lmdb", path=str(root), data_dir=str(data_dir))


def _labels(batches):
  return [str(x) for b in batches for x in b["label"]]


def test_str_lmdb_build_counts_and_splits(lmdb_tree):
  source = pipeline.make_source(lmdb_tree, "train")
  assert len(source) == 42
  builder = builders.make_builder("str_lmdb", lmdb_tree.data_dir, path=lmdb_tree.path)
  assert builder.is_prepared()
  assert builders.split_names(builder) == ["evaluation_X", "evaluation_Y", "train_a", "train_bad"]
  bad = builder.info.metadata["skips"]["train_bad"]
  assert bad["read"] == 2
  assert bad["skipped"] == {
    formats.UNDECODABLE: 1,
    formats.LABEL_EMPTY: 1,
    formats.LABEL_NOT_UTF8: 1,
    formats.MISSING_RECORD: 1,
  }
  assert pipeline.list_benchmarks(lmdb_tree, "evaluation") == ["evaluation/X", "evaluation/Y"]
  it = pipeline.make_pipeline(lmdb_tree, "evaluation/Y", 4, train=False)
  assert sorted(_labels(it)) == sorted(f"y{i}" for i in range(7))


def test_eval_batches_shapes_and_range(lmdb_tree):
  batches = list(pipeline.make_pipeline(lmdb_tree, "evaluation", 4, train=False, image_size=SIZE))
  assert [len(b["label"]) for b in batches] == [4, 4, 4, 4, 1]  # full last batch
  b = batches[0]
  assert set(b) == {"image", "label"}
  assert b["image"].shape == (4, *SIZE, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == object
  images = np.concatenate([b["image"] for b in batches])
  assert images.min() >= -1.0 and images.max() <= 1.0
  assert images.min() < -0.9 and images.max() > 0.9


def _train(config, global_batch, shard_index=0, shard_count=1, **kw):
  kw = {"seed": 3, "image_size": SIZE, **kw}
  return pipeline.make_pipeline(
    config,
    "train",
    global_batch,
    train=True,
    shard_index=shard_index,
    shard_count=shard_count,
    **kw,
  )


def _assert_batches_equal(want, got):
  assert len(want) == len(got)
  for w, g in zip(want, got):
    assert set(w) == set(g)
    for key in w:
      np.testing.assert_array_equal(w[key], g[key], err_msg=key)


def _concat_hosts(host_batches):
  """Host batches of one step, concatenated in host order (the trainer's view)."""
  return {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("reader", ["tfds", "direct"])
def test_hosts_concatenate_to_the_global_batch(lmdb_tree, augment, reader):
  """1, 2 or 4 hosts: concat(host batches) == the 1-host batch, step by step."""
  config = _config(**{**lmdb_tree.to_dict(), "reader": reader})
  steps = 6  # 48 positions: past the first epoch (42 records)
  want = [next(it) for it in [_train(config, 8, augment=augment)] for _ in range(steps)]
  assert all(len(b["label"]) == 8 for b in want)
  for shard_count in (2, 4):
    hosts = [_train(config, 8, i, shard_count, augment=augment) for i in range(shard_count)]
    got = [_concat_hosts([next(h) for h in hosts]) for _ in range(steps)]
    _assert_batches_equal(want, got)


def test_direct_reader_replaces_bad_records_deterministically(lmdb_tree):
  """train/bad has 2 readable records of 5: bad slots repeat the next good one."""
  config = _config(**{**lmdb_tree.to_dict(), "reader": "direct"})
  it = pipeline.make_pipeline(
    config, "train/bad", 5, train=True, seed=0, shard_index=0, shard_count=1, num_epochs=2
  )
  labels = _labels(it)
  assert len(labels) == 10 and set(labels) == {"good1", "good5"}
  assert sorted(labels[:5]) == sorted(labels[5:])  # same multiset each epoch


def test_per_host_rows_disjoint_and_complete(lmdb_tree):
  """Each global batch (6 of 42 records: no epoch straddles) is split into
  disjoint host parts that together are the 1-host batch."""
  want = [set(b["label"]) for b in [next(it) for it in [_train(lmdb_tree, 6)] for _ in range(7)]]
  assert set().union(*want) == {f"a{i}" for i in range(40)} | {"good1", "good5"}
  hosts = [_train(lmdb_tree, 6, i, 3) for i in range(3)]
  for step in range(7):
    parts = [set(next(h)["label"]) for h in hosts]
    assert [len(p) for p in parts] == [2, 2, 2]
    assert not parts[0] & parts[1] and not parts[1] & parts[2] and not parts[0] & parts[2]
    assert parts[0] | parts[1] | parts[2] == want[step]


def test_epochs_reshuffle_and_finite_epochs_end(lmdb_tree):
  it = _train(lmdb_tree, 6)
  epochs = [_labels([next(it) for _ in range(7)]) for _ in range(3)]
  assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 42 for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
  other_seed = _labels([next(it) for it in [_train(lmdb_tree, 6, seed=4)] for _ in range(7)])
  assert other_seed != epochs[0]
  # Two epochs = 84 positions = 10 full global batches of 8 (4 positions dropped),
  # the same number on every host.
  for shard_count in (1, 2):
    hosts = [_train(lmdb_tree, 8, i, shard_count, num_epochs=2) for i in range(shard_count)]
    assert [len(list(h)) for h in hosts] == [10] * shard_count


def test_state_restore_in_process(lmdb_tree):
  it = _train(lmdb_tree, 8)
  for _ in range(7):  # past the first epoch (42 records)
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpointer stores it
  assert state["step"] == 7
  expected = [next(it) for _ in range(3)]
  restored = _train(lmdb_tree, 8)
  restored.set_state(state)
  _assert_batches_equal(expected, [next(restored) for _ in range(3)])
  # Another stream's state is refused.
  with pytest.raises(ValueError, match="seed"):
    _train(lmdb_tree, 8, seed=4).set_state(state)
  with pytest.raises(ValueError, match="global_batch_size"):
    _train(lmdb_tree, 16).set_state(state)


def test_state_restore_with_workers_and_other_host_counts(lmdb_tree):
  """A state saved with 2 workers on 1 host resumes exactly with 2 workers, with
  0 workers, and on 2 hosts (rows concatenated)."""
  config = _config(**{**lmdb_tree.to_dict(), "augment": True})
  it = _train(config, 4, worker_count=2)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it.close()
  _assert_batches_equal(first, [next(i) for i in [_train(config, 4)] for _ in range(3)])
  restored = _train(config, 4, worker_count=2)
  restored.set_state(state)
  _assert_batches_equal(expected, [next(restored) for _ in range(4)])
  restored.close()
  in_process = _train(config, 4)
  in_process.set_state(state)
  _assert_batches_equal(expected, [next(in_process) for _ in range(4)])
  hosts = [_train(config, 4, i, 2) for i in range(2)]
  for h in hosts:
    h.set_state(state)
  _assert_batches_equal(expected, [_concat_hosts([next(h) for h in hosts]) for _ in range(4)])
  gc.collect()


def test_eval_shards_disjoint_and_complete(lmdb_tree):
  per_shard = [
    _labels(
      pipeline.make_pipeline(lmdb_tree, "evaluation", 6, train=False, shard_index=i, shard_count=3)
    )
    for i in range(3)
  ]
  flat = [x for s in per_shard for x in s]
  assert len(flat) == len(set(flat)) == 17
  assert set(flat) == {f"x{i}" for i in range(10)} | {f"y{i}" for i in range(7)}


def test_direct_reader_skips_bad_records(lmdb_tree):
  config = _config(**{**lmdb_tree.to_dict(), "reader": "direct"})
  labels = _labels(pipeline.make_pipeline(config, "train/bad", 2, train=False))
  assert labels == ["good1", "good5"]
  labels = _labels(pipeline.make_pipeline(config, "evaluation/X", 4, train=False))
  assert labels == [f"x{i}" for i in range(10)]


def test_errors(tmp_path, lmdb_tree):
  with pytest.raises(formats.DataError, match="does_not_exist"):
    pipeline.make_pipeline(
      _config(source="str_lmdb", path=str(tmp_path / "does_not_exist"), data_dir=str(tmp_path)),
      "train",
      4,
      train=True,
    )
  with pytest.raises(formats.DataError, match="data_config.path"):
    pipeline.make_pipeline(_config(source="folder", path=""), "train", 4, train=True)
  with pytest.raises(ValueError, match="source"):
    pipeline.make_pipeline(_config(source="imagenet"), "train", 4, train=True)
  with pytest.raises(ValueError, match="multiple"):
    pipeline.make_pipeline(lmdb_tree, "train", 5, train=True, shard_index=0, shard_count=2)
  with pytest.raises(formats.DataError, match="nothing"):
    pipeline.make_pipeline(lmdb_tree, "nothing", 4, train=False)


def test_keep_aspect_pads_with_zero():
  ex = {"image": np.full((16, 32, 3), 255, np.uint8), "mask": np.ones((16, 32), np.uint8)}
  out = pipeline.Normalize().map(pipeline.Resize(SIZE, keep_aspect=True).map(ex))
  assert out["image"].shape == (*SIZE, 3) and out["mask"].shape == SIZE
  np.testing.assert_allclose(out["image"][:, :64], 1.0)
  np.testing.assert_allclose(out["image"][:, 64:], 128 / 127.5 - 1, atol=1e-6)
  assert out["mask"][:, :64].all() and not out["mask"][:, 64:].any()
  plain = pipeline.Resize(SIZE).map({"image": np.full((16, 32, 3), 255, np.uint8)})
  assert (plain["image"] == 255).all()


def test_augmentation_never_flips():
  """Dark left half, bright right half: every augmentation keeps the order."""
  image = np.zeros((*SIZE, 3), np.uint8)
  image[:, SIZE[1] // 2 :] = 255
  image[4:12, 8:24] = 128
  mask = np.zeros(SIZE, np.uint8)
  mask[:, :20] = 1
  strong = pipeline.AugmentConfig(p_affine=1.0, p_color=1.0, p_blur=1.0, p_noise=1.0)
  for seed in range(50):
    out = pipeline.augment_example(
      {"image": image.copy(), "mask": mask.copy()}, np.random.default_rng(seed), strong
    )
    img = out["image"].astype(float)
    assert img.shape == image.shape and out["image"].dtype == np.uint8
    assert img[:, :40].mean() + 60 < img[:, -40:].mean(), seed
    m = out["mask"]
    assert m[:, :32].sum() > 0 and m[:, -64:].sum() == 0, seed


def test_training_augmentation_through_pipeline(lmdb_tree):
  config = _config(**{**lmdb_tree.to_dict(), "augment": True})
  a = next(pipeline.make_pipeline(config, "train", 8, train=True, seed=0))
  b = next(pipeline.make_pipeline(lmdb_tree, "train", 8, train=True, seed=0))
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(a["image"], b["image"])
  assert a["image"].min() >= -1 and a["image"].max() <= 1


def test_other_real_sources(tmp_path):
  data_dir = str(tmp_path / "tfds")
  # TextZoom.
  tz = tmp_path / "textzoom"
  for split, n in [("train1", 5), ("train2", 3), ("test/easy", 4)]:
    formats.write_lmdb(
      str(tz / split),
      [
        {"image": _image(32, 128, i), "lr_image": _image(16, 64, i), "label": f"t{i}"}
        for i in range(n)
      ],
      kind="textzoom",
    )
  config = _config(source="textzoom", path=str(tz), data_dir=data_dir)
  batches = list(pipeline.make_pipeline(config, "train", 4, train=False))
  assert sum(len(b["label"]) for b in batches) == 8
  assert batches[0]["lr_image"].shape == (4, 16, 64, 3)
  assert pipeline.list_benchmarks(config, "test") == ["test/easy"]
  # Folder with gt.txt, and the same images unlabeled.
  formats.write_folder(str(tmp_path / "folder"), _labeled(6, "f"))
  config = _config(source="folder", path=str(tmp_path / "folder"), data_dir=data_dir)
  assert sorted(_labels(pipeline.make_pipeline(config, ".", 3, train=False))) == [
    f"f{i}" for i in range(6)
  ]
  config = _config(source="unlabeled", path=str(tmp_path / "folder"), data_dir=data_dir)
  b = next(pipeline.make_pipeline(config, ".", 3, train=True))
  assert set(b) == {"image"} and b["image"].shape == (3, *SIZE, 3)
  # TextSeg crops with masks (everything lands in one split for one image).
  mask = np.zeros((40, 80), np.uint8)
  mask[10:20, 10:30] = 1
  image = np.full((40, 80, 3), 220, np.uint8)
  image[mask > 0] = 10
  words = [
    {"text": "ab", "bbox": [8, 8, 32, 8, 32, 22, 8, 22]},
    {"text": "cd", "bbox": [40, 5, 70, 5, 70, 30, 40, 30]},
  ]
  formats.write_textseg(
    str(tmp_path / "ts"), [{"id": "img1", "image": image, "mask": mask, "words": words}]
  )
  split = [k for k, v in formats.textseg_split_ids(str(tmp_path / "ts")).items() if v][0]
  config = _config(source="textseg", path=str(tmp_path / "ts"), data_dir=data_dir)
  b = next(pipeline.make_pipeline(config, split, 2, train=False))
  assert b["mask"].shape == (2, *SIZE) and set(np.unique(b["mask"])) <= {0.0, 1.0}
  by_label = dict(zip(_labels([b]), b["mask"]))
  assert by_label["ab"].mean() > 0.3 and by_label["cd"].sum() == 0


# ---------------------------------------------------------------- synthetic ----


def _synthetic_config(data_dir, seed=0, train=32):
  return _config(
    source="synthetic",
    data_dir=str(data_dir),
    size={"train": train, "val": 8, "test_heldout_fonts": 4, "test_hard": 4},
    synthetic={"seed": seed},
  )


def test_synthetic_build_and_read(tmp_path):
  config = _synthetic_config(tmp_path)
  it = pipeline.make_pipeline(config, "train", 8, train=True, seed=0, image_size=SIZE)
  b = next(it)
  assert b["image"].shape == (8, *SIZE, 3) and b["lr_image"].shape == (8, 16, 64, 3)
  assert b["mask"].shape == (8, *SIZE) and set(np.unique(b["mask"])) <= {0.0, 1.0}
  assert 0 < b["mask"].mean() < 0.9
  assert -1 <= b["image"].min() and b["image"].max() <= 1
  val = _labels(pipeline.make_pipeline(config, "val", 4, train=False))
  direct = _config(**{**config.to_dict(), "reader": "direct"})
  assert sorted(val) == sorted(_labels(pipeline.make_pipeline(direct, "val", 4, train=False)))
  hard = _labels(pipeline.make_pipeline(config, "test_hard", 4, train=False))
  assert len(hard) == 4 and set(hard) != set(val[:4])


def test_synthetic_configs_do_not_collide(tmp_path):
  paths, labels = set(), []
  for seed, train in [(0, 16), (1, 16), (0, 24)]:
    config = _synthetic_config(tmp_path, seed, train)
    builder = builders.make_builder(
      "synthetic", config.data_dir, synthetic=config.synthetic.to_dict(), sizes=config.size
    )
    builders.prepare(builder)
    paths.add(str(builder.data_path))
    assert builder.info.splits["train"].num_examples == train
    labels.append(sorted(_labels(pipeline.make_pipeline(config, "val", 8, train=False))))
  assert len(paths) == 3
  assert labels[0] != labels[1] and labels[0] == labels[2]


def test_synthetic_direct_state_restore():
  config = _config(source="synthetic", reader="direct", size={"train": 50})
  it = pipeline.make_pipeline(config, "train", 4, train=True, seed=7)
  next(it)
  state = it.get_state()
  want = next(it)
  again = pipeline.make_pipeline(config, "train", 4, train=True, seed=7)
  again.set_state(state)
  got = next(again)
  np.testing.assert_array_equal(want["image"], got["image"])
  np.testing.assert_array_equal(want["mask"], got["mask"])


def test_synthetic_training_augmentation_warps_image_and_mask_together():
  """Synthetic records carry an lr_image; augmentation used to skip every such record,
  so data.augment=True did nothing on the default data. It drops the lr_image now."""
  config = _config(source="synthetic", reader="direct", size={"train": 16})
  augmented = _config(**{**config.to_dict(), "augment": True})
  a = next(pipeline.make_pipeline(augmented, "train", 16, train=True, seed=0))
  b = next(pipeline.make_pipeline(config, "train", 16, train=True, seed=0))
  np.testing.assert_array_equal(a["label"], b["label"])
  assert "lr_image" in b and "lr_image" not in a
  changed = [not np.array_equal(x, y) for x, y in zip(a["image"], b["image"])]
  assert 4 <= sum(changed) < 16  # each transform is drawn per image; some draw none
  # Where the image is untouched, so is its mask; the warp moves the mask with the text.
  moved = [not np.array_equal(x, y) for x, y in zip(a["mask"], b["mask"])]
  assert any(moved) and not any(m and not c for m, c in zip(moved, changed))
  assert set(np.unique(a["mask"])) <= {0.0, 1.0}


def test_synthetic_train_overrides_change_only_the_train_split():
  base = _config(source="synthetic", reader="direct", size={"train": 24, "val": 8})
  easy = _config(
    **{**base.to_dict(), "synthetic_train": {"max_label_length": 3, "fraction_random_strings": 1.0}}
  )
  train = _labels(pipeline.make_pipeline(easy, "train", 24, train=False))
  assert len(train) == 24 and max(len(t) for t in train) <= 3
  assert max(len(t) for t in _labels(pipeline.make_pipeline(base, "train", 24, train=False))) > 3
  assert _labels(pipeline.make_pipeline(easy, "val", 8, train=False)) == _labels(
    pipeline.make_pipeline(base, "val", 8, train=False)
  )


def test_synthetic_train_overrides_are_validated_and_named(tmp_path):
  with pytest.raises(ValueError, match="cannot set"):
    builders.synthetic_split_config({}, "train", {"difficulty": "hard"})
  bad = _config(source="synthetic", reader="direct", synthetic_train={"colour": 1})
  with pytest.raises(ValueError, match="colour"):
    pipeline.make_source(bad, "train")
  names = {
    builders.synthetic_config({}, {"train": 8}, overrides).name
    for overrides in (None, {}, {"max_label_length": 5})
  }
  assert len(names) == 2


def _curriculum_config(train_size=64, **curriculum):
  return _config(
    source="synthetic",
    reader="direct",
    size={"train": train_size, "val": 8},
    synthetic_train={"clean_fraction": 1.0, "hard_fraction": 1.0},
    curriculum=curriculum,
  )


def test_curriculum_ramps_the_training_mixture_by_step():
  # Steps 0-1 clean (fraction 1.0, then 0.5 at step 1: 2 steps to zero); steps 2-3
  # normal; step 4 on hard (fraction 1 from hard_end_step=4).
  config = _curriculum_config(clean_until_step=2, hard_start_step=3, hard_end_step=4)
  batch = 4
  it = pipeline.make_pipeline(config, "train", batch, train=True, seed=0)
  batches = [next(it) for _ in range(5)]
  from mms_jax.data import synthetic

  generator = synthetic.SyntheticGenerator(
    synthetic.SyntheticConfig.from_dict(
      builders.synthetic_split_config(
        {"seed": 0}, "train", {"clean_fraction": 1.0, "hard_fraction": 1.0}
      )
    )
  )
  expected = {0: (1.0, 0.0), 1: (0.5, 0.0), 2: (0.0, 0.0), 3: (0.0, 0.0), 4: (0.0, 1.0)}
  for step, (clean, hard) in expected.items():
    for row in range(batch):
      want = generator.sample(step * batch + row, clean, hard)  # read in order
      np.testing.assert_allclose(
        batches[step]["image"][row], want["image"].astype(np.float32) / 127.5 - 1.0, atol=1e-6
      )
  # Step 0 is all clean: black text on a white background.
  assert all((b == 1.0).mean() > 0.3 for b in batches[0]["image"])
  # The state resumes the ramp at the saved step.
  state = it.get_state()
  again = pipeline.make_pipeline(config, "train", batch, train=True, seed=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["image"], next(it)["image"])


def test_curriculum_is_refused_where_it_cannot_apply(tmp_path):
  with pytest.raises(errors.ConfigError, match="hard_end_step=2 must be after"):
    pipeline.validate(_curriculum_config(hard_start_step=2, hard_end_step=2))
  with pytest.raises(errors.ConfigError, match="clean_until_step=-1"):
    pipeline.validate(_curriculum_config(clean_until_step=-1))
  tfds = _curriculum_config(clean_until_step=10)
  tfds.reader, tfds.data_dir = "tfds", str(tmp_path)
  with pytest.raises(errors.ConfigError, match="reader=direct"):
    pipeline.validate(tfds)
  with pytest.raises(errors.ConfigError, match="raise data.size.train"):
    pipeline.check_curriculum_fits(
      _curriculum_config(train_size=64, clean_until_step=1), total_steps=17, global_batch_size=4
    )
  pipeline.check_curriculum_fits(
    _curriculum_config(train_size=64, clean_until_step=1), total_steps=16, global_batch_size=4
  )
  # Evaluation pipelines over the train split keep the config's fractions.
  evaluated = pipeline.make_pipeline(
    _curriculum_config(clean_until_step=1), "train", 4, train=False
  )
  assert next(iter(evaluated))["image"].shape == (4, 32, 128, 3)
