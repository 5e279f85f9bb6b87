"""Readers and writers of every data format, including bad records."""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from mms_jax.data import formats


def _image(h=16, w=48, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(array, mode=None):
  im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def _examples(n=6, labeled=True):
  return [
    {"image": _image(16, 32 + 4 * i, i), **({"label": f"word{i}"} if labeled else {})}
    for i in range(n)
  ]


def _corrupted_lmdb(path):
  """An STR LMDB with one record per bad case; returns the expected counts."""
  good = _png(_image())
  items = {
    # 1: good.
    "image-000000001": good,
    "label-000000001": b"good",
    # 2: garbage bytes.
    "image-000000002": b"\x00garbage\xff" * 10,
    "label-000000002": b"garbage",
    # 3: truncated PNG.
    "image-000000003": good[: len(good) // 2],
    "label-000000003": b"truncated",
    # 4: empty label (whitespace only).
    "image-000000004": good,
    "label-000000004": b"   ",
    # 5: non-UTF-8 label.
    "image-000000005": good,
    "label-000000005": b"\xff\xfebad",
    # 6: label key missing.
    "image-000000006": good,
    # 7: image key missing.
    "label-000000007": b"noimage",
    # 8: extreme aspect (4 x 200).
    "image-000000008": _png(_image(4, 200)),
    "label-000000008": b"thin",
    # 9: over-long label.
    "image-000000009": good,
    "label-000000009": b"x" * 40,
    # 10: grayscale, 11: RGBA, 12: 16-bit, 13: palette -> converted, kept.
    "image-000000010": _png(_image(), "L"),
    "label-000000010": b"gray",
    "image-000000011": _png(_image(), "RGBA"),
    "label-000000011": b"rgba",
    "image-000000012": _png((np.arange(16 * 48).reshape(16, 48) * 80).astype(np.uint16)),
    "label-000000012": b"sixteen",
    "image-000000013": _png(_image(), "P"),
    "label-000000013": b"palette",
    # 14: empty bytes.
    "image-000000014": b"",
    "label-000000014": b"empty",
    # 15, 16: promised by num-samples, absent.
    "num-samples": b"16",
  }
  formats.write_lmdb_raw(path, items)
  skipped = {
    formats.UNDECODABLE: 3,
    formats.LABEL_EMPTY: 1,
    formats.LABEL_NOT_UTF8: 1,
    formats.MISSING_LABEL: 1,
    formats.MISSING_IMAGE: 1,
    formats.EXTREME_ASPECT: 1,
    formats.LABEL_TOO_LONG: 1,
    formats.MISSING_RECORD: 2,
  }
  kept = ["good", "gray", "rgba", "sixteen", "palette"]
  return skipped, kept


def test_corrupted_lmdb_skips_and_counts(tmp_path):
  path = str(tmp_path / "bad")
  skipped, kept = _corrupted_lmdb(path)
  reader = formats.LmdbReader(path, "str", formats.ReadOptions(max_label_length=25))
  assert len(reader) == 16
  out = list(reader.examples())
  assert [e["label"] for _, e in out] == kept
  for _, e in out:
    assert e["image"].dtype == np.uint8 and e["image"].ndim == 3
    assert e["image"].shape[-1] == 3
  assert dict(reader.skips.skipped) == skipped
  assert reader.skips.read == len(kept)
  assert {"mode_L", "mode_RGBA", "mode_P"} <= set(reader.skips.converted)
  assert any(k.startswith("mode_I") for k in reader.skips.converted)
  summary = reader.skips.summary("bad")
  assert "undecodable_image=3" in summary and "missing_record=2" in summary


def test_conversions_values():
  sixteen = np.full((4, 6), 65535, np.uint16)
  img = formats.decode_image(_png(sixteen))
  assert img.shape == (4, 6, 3) and img.dtype == np.uint8 and (img == 255).all()
  rgba = np.zeros((4, 6, 4), np.uint8)  # fully transparent -> white background
  assert (formats.decode_image(_png(rgba)) == 255).all()


def test_decompression_bomb_refused():
  data = _png(np.zeros((200, 300), np.uint8))
  with pytest.raises(formats.BadRecord) as e:
    formats.decode_image(data, formats.ReadOptions(max_pixels=10_000))
  assert e.value.reason == formats.TOO_MANY_PIXELS
  # PIL's own limit (a warning turned into an error) is refused the same way.
  old = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = 20_000
    with pytest.raises(formats.BadRecord) as e:
      formats.decode_image(data)
    assert e.value.reason == formats.TOO_MANY_PIXELS
  finally:
    Image.MAX_IMAGE_PIXELS = old


def test_charset_filtering_in_reader(tmp_path):
  path = str(tmp_path / "lmdb")
  formats.write_lmdb(
    path, [{"image": _image(), "label": "Café"}, {"image": _image(), "label": "日本"}]
  )
  reader = formats.LmdbReader(path, "str", formats.ReadOptions(charset="36"))
  assert [e["label"] for _, e in reader.examples()] == ["cafe"]
  assert reader.skips.skipped == {formats.LABEL_EMPTY: 1}


def test_str_lmdb_round_trip(tmp_path):
  path = str(tmp_path / "lmdb")
  examples = _examples()
  assert formats.write_lmdb(path, examples) == len(examples)
  reader = formats.LmdbReader(path)
  got = [e for _, e in reader.examples()]
  assert len(got) == len(examples) and reader.skips.total == 0
  for a, b in zip(examples, got):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"]


def test_unlabeled_lmdb_and_image_folder(tmp_path):
  path = str(tmp_path / "unlabeled")
  examples = _examples(4, labeled=False)
  formats.write_lmdb(path, examples, kind="unlabeled")
  got = [e for _, e in formats.open_source("unlabeled", path).examples()]
  assert [set(e) for e in got] == [{"image"}] * 4
  np.testing.assert_array_equal(got[2]["image"], examples[2]["image"])

  folder = tmp_path / "images" / "sub"
  folder.mkdir(parents=True)
  for i, e in enumerate(examples):
    Image.fromarray(e["image"]).save(folder / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  reader = formats.open_source("unlabeled", str(tmp_path / "images"))
  assert isinstance(reader, formats.ImageFolderReader) and len(reader) == 4
  np.testing.assert_array_equal(reader[3]["image"], examples[3]["image"])


def test_textzoom_round_trip(tmp_path):
  path = str(tmp_path / "textzoom" / "test" / "easy")
  hr = [_image(32, 128, i) for i in range(3)]
  lr = [_image(16, 64, 10 + i) for i in range(3)]
  formats.write_lmdb(
    path,
    [{"image": h, "lr_image": l, "label": f"w{i}"} for i, (h, l) in enumerate(zip(hr, lr))],
    kind="textzoom",
  )
  reader = formats.open_source("textzoom", str(tmp_path / "textzoom"), "test")
  got = [e for _, e in reader.examples()]
  np.testing.assert_array_equal(got[1]["image"], hr[1])
  np.testing.assert_array_equal(got[1]["lr_image"], lr[1])
  assert [e["label"] for e in got] == ["w0", "w1", "w2"]


def test_lmdb_tree_selection(tmp_path):
  root = tmp_path / "data"
  for rel, n in [
    ("train/real/ArT", 3),
    ("train/synth/MJ", 2),
    ("evaluation/IIIT5k_3000", 4),
    ("evaluation/SVT", 1),
  ]:
    formats.write_lmdb(str(root / rel), _examples(n))
  assert formats.find_datasets(str(root)) == [
    "evaluation/IIIT5k_3000",
    "evaluation/SVT",
    "train/real/ArT",
    "train/synth/MJ",
  ]
  assert len(formats.open_source("str_lmdb", str(root))) == 10
  assert len(formats.open_source("str_lmdb", str(root), "train")) == 5
  assert len(formats.open_source("str_lmdb", str(root), "evaluation/SVT")) == 1
  assert formats.select_datasets(str(root), "train/real+evaluation/SVT") == [
    "train/real/ArT",
    "evaluation/SVT",
  ]
  concat = formats.open_source("str_lmdb", str(root), "evaluation")
  keys = [k for k, _ in concat.examples()]
  assert keys[0] == "evaluation/IIIT5k_3000/000000001" and len(keys) == 5
  with pytest.raises(formats.DataError, match="nothing_here"):
    formats.open_source("str_lmdb", str(root), "nothing_here")


def test_folder_reader_separators(tmp_path):
  formats.write_folder(str(tmp_path / "tab"), _examples(3))
  got = [e["label"] for _, e in formats.FolderReader(str(tmp_path / "tab")).examples()]
  assert got == ["word0", "word1", "word2"]

  root = tmp_path / "space"
  formats.write_folder(str(root), _examples(3), separator=" ")
  with open(root / "gt.txt", "ab") as f:  # a missing file and a non-UTF-8 label
    f.write(b"images/absent.png hello\n\nimages/000000.png \xff\xfe\n")
  reader = formats.FolderReader(str(root))
  assert [e["label"] for _, e in reader.examples()] == ["word0", "word1", "word2"]
  assert reader.skips.skipped == {formats.MISSING_IMAGE: 1, formats.LABEL_NOT_UTF8: 1}
  assert formats.parse_gt_line("a b.png\tNew York") == ("a b.png", "New York")
  assert formats.parse_gt_line("a.png New York") == ("a.png", "New York")


def _textseg_fixture(root):
  h, w = 60, 100
  image = np.full((h, w, 3), 200, np.uint8)
  mask = np.zeros((h, w), np.uint8)
  mask[12:18, 15:45] = 1
  mask[40:50, 60:90] = 1
  image[mask > 0] = 20
  words = [
    {"text": "Hello", "bbox": [10, 10, 50, 12, 49, 20, 11, 19]},  # a rotated quad
    {"text": "World", "bbox": [55, 35, 95, 35, 95, 55, 55, 55]},
    {"text": "", "bbox": [0, 0, 5, 0, 5, 5, 0, 5]},  # empty label
    {"text": "out", "bbox": [120, 70, 130, 70, 130, 80, 120, 80]},  # outside
  ]
  formats.write_textseg(root, [{"id": "a1", "image": image, "mask": mask, "words": words}])
  return image, mask


def test_textseg_crops(tmp_path):
  root = str(tmp_path / "textseg")
  image, mask = _textseg_fixture(root)
  assert formats.box_from_points([10, 10, 50, 12, 49, 20, 11, 19]) == (10, 10, 50, 20)
  reader = formats.TextSegReader(root)
  assert len(reader) == 4
  got = [e for _, e in reader.examples()]
  assert [e["label"] for e in got] == ["Hello", "World"]
  assert got[0]["image"].shape == (10, 40, 3) and got[0]["mask"].shape == (10, 40)
  np.testing.assert_array_equal(got[0]["mask"], mask[10:20, 10:50])
  np.testing.assert_array_equal(got[1]["mask"], mask[35:55, 55:95])
  assert set(np.unique(got[1]["mask"])) == {0, 1}
  # JPEG is lossy: compare loosely.
  assert np.abs(got[1]["image"].astype(int) - image[35:55, 55:95]).mean() < 8
  assert reader.skips.skipped == {formats.LABEL_EMPTY: 1, formats.BAD_BOX: 1}
  ids = formats.textseg_split_ids(root)
  assert sum(len(v) for v in ids.values()) == 1


def test_missing_and_empty_paths(tmp_path):
  missing = str(tmp_path / "nope")
  for source in ("str_lmdb", "textzoom", "unlabeled", "folder", "textseg"):
    with pytest.raises(formats.DataError, match="nope"):
      formats.open_source(source, missing)
  with pytest.raises(formats.DataError, match="data.mdb"):
    formats.LmdbReader(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(formats.DataError):
    formats.open_source("str_lmdb", str(empty))
  with pytest.raises(formats.DataError, match="no records"):
    formats.open_source("unlabeled", str(empty))
  formats.write_lmdb_raw(str(tmp_path / "zero"), {"num-samples": b"0"})
  with pytest.raises(formats.DataError, match="no records"):
    formats.open_source("str_lmdb", str(tmp_path / "zero"))


def test_readers_pickle(tmp_path):
  import pickle

  path = str(tmp_path / "lmdb")
  formats.write_lmdb(path, _examples(2))
  reader = formats.LmdbReader(path)
  assert reader[0] is not None
  clone = pickle.loads(pickle.dumps(reader))
  assert clone[1]["label"] == "word1" and repr(clone) == repr(reader)
  json.dumps(reader.skips.to_dict())
  assert os.path.basename(path) in repr(reader)
