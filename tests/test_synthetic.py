"""Tests of the synthetic text-image generator and font discovery."""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mms_jax.data import fonts as fonts_lib
from mms_jax.data import synthetic

# Only matplotlib's bundled fonts: works on every machine, and is fast.
MPL_ONLY = ("/nonexistent-font-dir",)


def _config(**kw):
  kw.setdefault("font_dirs", MPL_ONLY)
  return synthetic.SyntheticConfig(**kw)


def _plain(**kw):
  return _config(appearance=False, degradations=False, occluders=False, **kw)


@pytest.fixture(scope="module")
def gen():
  return synthetic.SyntheticGenerator(_config())


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      assert a[k] == b[k], k


# -- determinism ---------------------------------------------------------------


def test_same_index_same_output_regardless_of_order(gen):
  first = gen.sample(7)
  for i in (3, 100, 0):
    gen.sample(i)
  _assert_same(first, gen.sample(7))
  _assert_same(first, synthetic.SyntheticGenerator(_config()).sample(7))
  _assert_same(first, synthetic.render_sample(7, _config()))


def test_different_index_or_seed_differs(gen):
  a, b = gen.sample(1), gen.sample(2)
  assert not np.array_equal(a["image"], b["image"])
  c = synthetic.SyntheticGenerator(_config(seed=1)).sample(1)
  assert not np.array_equal(a["image"], c["image"])


def test_deterministic_across_processes():
  code = (
    "import hashlib; from mms_jax.data import synthetic as s;"
    f"e = s.render_sample(5, s.SyntheticConfig(font_dirs={MPL_ONLY!r}));"
    'print(hashlib.sha256(e["image"].tobytes() + e["mask"].tobytes()'
    ' + e["lr_image"].tobytes()).hexdigest(), e["label"], e["font"])'
  )
  outs = {
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    for _ in range(2)
  }
  assert len(outs) == 1
  import hashlib

  e = synthetic.render_sample(5, _config())
  here = hashlib.sha256(
    e["image"].tobytes() + e["mask"].tobytes() + e["lr_image"].tobytes()
  ).hexdigest()
  assert outs.pop().split()[0] == here


# -- shapes, dtypes, labels ----------------------------------------------------


@pytest.mark.parametrize("size,scale", [((32, 128), 2), ((48, 160), 4)])
@pytest.mark.parametrize("difficulty", synthetic.DIFFICULTIES)
def test_shapes_and_dtypes(size, scale, difficulty):
  g = synthetic.SyntheticGenerator(_config(image_size=size, lr_scale=scale, difficulty=difficulty))
  h, w = size
  for i in range(20):
    ex = g.sample(i)
    assert ex["image"].shape == (h, w, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (h, w) and ex["mask"].dtype == np.uint8
    assert ex["lr_image"].shape == (h // scale, w // scale, 3)
    assert ex["lr_image"].dtype == np.uint8
    assert ex["mask"].max() > 0
    assert isinstance(ex["font"], str) and ex["font"] in g.font_names


def test_labels_respect_length_and_charset():
  cfg = _config(
    max_label_length=8, fraction_random_strings=0.5, charset="abcdefghijklmnopqrstuvwxyz0123456789"
  )
  g = synthetic.SyntheticGenerator(cfg)
  labels = [g.sample(i)["label"] for i in range(200)]
  allowed = set(cfg.charset)
  for label in labels:
    assert 1 <= len(label) <= 8
    assert set(label) <= allowed, label
  assert any(l.isalpha() and len(l) > 3 for l in labels)  # some words
  assert len(set(labels)) > 150


def test_all_random_strings_use_charset():
  g = synthetic.SyntheticGenerator(
    _config(fraction_random_strings=1.0, charset="XYZ01", min_label_length=3, max_label_length=5)
  )
  for i in range(50):
    label = g.sample(i)["label"]
    assert 3 <= len(label) <= 5 and set(label) <= set("XYZ01")


def test_word_lists():
  bundled = synthetic.load_words("bundled", 2, 25)
  assert len(bundled) > 2000
  assert all(w.isascii() and w.isalpha() and 2 <= len(w) <= 25 for w in bundled)
  g = synthetic.SyntheticGenerator(_config(word_list="bundled", fraction_random_strings=0.0))
  assert set(g.sample(i)["label"].lower() for i in range(30)) <= set(bundled)


# -- fonts ---------------------------------------------------------------------


def test_fallback_to_matplotlib_fonts(tmp_path):
  found = fonts_lib.discover_fonts((str(tmp_path),))
  mpl_dir = fonts_lib.matplotlib_font_dir()
  assert found and all(p.startswith(mpl_dir) for p in found)
  names = [os.path.basename(p) for p in found]
  assert "DejaVuSans.ttf" in names
  assert names == sorted(names)


def test_symbol_and_fallback_fonts_are_excluded():
  names = {os.path.basename(p) for p in fonts_lib.discover_fonts(MPL_ONLY)}
  for bad in (
    "cmex10.ttf",
    "cmsy10.ttf",
    "LastResortHE-Regular.ttf",
    "STIXSizOneSymReg.ttf",
    "DejaVuSansDisplay.ttf",
  ):
    assert bad not in names
  # The glyph checks reject them even without the name list.
  mpl_dir = fonts_lib.matplotlib_font_dir()
  for bad in ("cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf"):
    ok, _ = fonts_lib.check_font(os.path.join(mpl_dir, bad), use_name_list=False)
    assert not ok, bad


def test_system_symbol_fonts_are_excluded():
  system = fonts_lib.list_font_files(fonts_lib.SYSTEM_FONT_DIRS)
  symbols = [p for p in system if os.path.basename(p).startswith(("StandardSymbolsPS", "D050000L"))]
  if not symbols:
    pytest.skip("fonts-urw-base35 not installed")
  usable = set(fonts_lib.discover_fonts(fonts_lib.SYSTEM_FONT_DIRS))
  for p in symbols:
    assert p not in usable
    assert not fonts_lib.check_font(p, use_name_list=False)[0]


def test_name_list_applies_even_over_a_stale_disk_cache(tmp_path, monkeypatch):
  # A text font under a keyboard-symbol name, checked as usable by an older name list.
  font_dir = tmp_path / "fonts"
  font_dir.mkdir()
  source = os.path.join(fonts_lib.matplotlib_font_dir(), "DejaVuSans.ttf")
  keyboard = font_dir / "LinBiolinum_K.ttf"
  shutil.copy(source, keyboard)
  shutil.copy(source, font_dir / "Plain.ttf")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setenv("MMS_JAX_FONT_CACHE", "1")
  cache_file = fonts_lib._disk_cache_path()
  os.makedirs(os.path.dirname(cache_file))
  chars = "".join(sorted(set(fonts_lib.ALNUM)))
  with open(cache_file, "w") as f:
    json.dump({fonts_lib._file_key(str(keyboard), chars): True}, f)
  found = fonts_lib.discover_fonts((str(font_dir),))
  assert [os.path.basename(p) for p in found] == ["Plain.ttf"]


def test_font_holdout_is_disjoint_and_used():
  train_g = synthetic.SyntheticGenerator(_config(font_split="train"))
  held_g = synthetic.SyntheticGenerator(_config(font_split="heldout"))
  all_g = synthetic.SyntheticGenerator(_config(font_split="all"))
  train, held = set(train_g.font_names), set(held_g.font_names)
  assert train and held and not train & held
  assert train | held == set(all_g.font_names)
  assert {train_g.sample(i)["font"] for i in range(40)} <= train
  assert {held_g.sample(i)["font"] for i in range(20)} <= held


def test_split_is_stable_per_font():
  fonts = [f"/x/font{i}.ttf" for i in range(200)]
  held = set(fonts_lib.split_fonts(fonts, "heldout", 0.2))
  assert 20 < len(held) < 60
  # Adding fonts does not move existing ones between splits.
  more = set(fonts_lib.split_fonts(fonts + ["/y/new.ttf"], "heldout", 0.2))
  assert held == more - {"/y/new.ttf"}
  assert set(fonts_lib.split_fonts(fonts, "heldout", 0.2, salt="b")) != held


# -- masks and LR copies -------------------------------------------------------


def test_mask_matches_dark_pixels():
  g = synthetic.SyntheticGenerator(_plain())
  ious = []
  for i in range(40):
    ex = g.sample(i)
    text = ex["mask"] > 127
    dark = ex["image"].astype(np.float32).mean(-1) < 128
    ious.append((text & dark).sum() / max((text | dark).sum(), 1))
  assert np.mean(ious) > 0.9 and min(ious) > 0.8, ious


def test_mask_excludes_occluders():
  cfg = _config(appearance=False, degradations=False, difficulty="hard")
  g = synthetic.SyntheticGenerator(cfg)
  plain = synthetic.SyntheticGenerator(dataclasses.replace(cfg, occluders=False))
  changed = 0
  for i in range(10):
    a, b = g.sample(i), plain.sample(i)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    changed += not np.array_equal(a["image"], b["image"])
  assert changed >= 5


def test_lr_correlates_with_downsampled_hr(gen):
  corrs = []
  for i in range(20):
    ex = gen.sample(i)
    hr = ex["image"].astype(np.float32).mean(-1)
    h, w = ex["lr_image"].shape[:2]
    down = hr[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean((1, 3))
    lr = ex["lr_image"].astype(np.float32).mean(-1)
    if down.std() > 3:  # flat images have no meaningful correlation
      corrs.append(np.corrcoef(down.ravel(), lr.ravel())[0, 1])
  assert np.median(corrs) > 0.8, corrs


def test_hard_is_harder_than_normal():
  def contrast(g):
    vals = []
    for i in range(40):
      ex = g.sample(i)
      gray = ex["image"].astype(np.float32).mean(-1)
      m = ex["mask"] > 127
      if m.any() and (~m).any():
        vals.append(abs(gray[m].mean() - gray[~m].mean()))
    return np.mean(vals)

  normal = contrast(synthetic.SyntheticGenerator(_config()))
  hard = contrast(synthetic.SyntheticGenerator(_config(difficulty="hard")))
  assert hard < 0.7 * normal


# -- config --------------------------------------------------------------------


def test_from_dict_and_validation():
  cfg = synthetic.SyntheticConfig.from_dict(
    {"image_size": [32, 64], "difficulty": "hard", "font_dirs": ["/a"]}
  )
  assert cfg.image_size == (32, 64) and cfg.font_dirs == ("/a",)
  hash(cfg)
  with pytest.raises(ValueError, match="difficulty"):
    synthetic.SyntheticConfig(difficulty="extreme")
  with pytest.raises(ValueError, match="font_split"):
    synthetic.SyntheticConfig(font_split="test")
  with pytest.raises(ValueError, match="max_label_length"):
    synthetic.SyntheticConfig(min_label_length=5, max_label_length=3)
  with pytest.raises(ValueError, match="fraction_random_strings"):
    synthetic.SyntheticConfig(fraction_random_strings=1.5)
  with pytest.raises(ValueError, match="lr_scale"):
    synthetic.SyntheticConfig(lr_scale=0)
  with pytest.raises(ValueError, match="Unknown .*colour"):
    synthetic.SyntheticConfig.from_dict({"colour": 1})


def test_from_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cd = ml_collections.ConfigDict({"seed": 3, "image_size": (32, 100), "heldout_fraction": 0.2})
  cfg = synthetic.SyntheticConfig.from_dict(cd)
  assert cfg.seed == 3 and cfg.image_size == (32, 100)
  assert synthetic.SyntheticGenerator(cd).sample(0)["image"].shape == (32, 100, 3)


def test_sample_batch_and_grid(tmp_path, gen):
  batch = gen.sample_batch([0, 1, 2])
  assert batch["image"].shape == (3, 32, 128, 3)
  assert len(batch["label"]) == 3
  path = tmp_path / "grid.png"
  synthetic.save_sample_grid(str(path), _config(), n=2)
  assert path.stat().st_size > 1000


def test_clean_fraction_mixes_clean_samples_and_leaves_the_rest_unchanged(gen):
  mixed = synthetic.SyntheticGenerator(_config(clean_fraction=0.5))
  all_clean = synthetic.SyntheticGenerator(_config(clean_fraction=1.0))
  clean_count = 0
  for i in range(40):
    base, m, c = gen.sample(i), mixed.sample(i), all_clean.sample(i)
    assert base["label"] == m["label"] == c["label"]  # labels and fonts come first
    image = c["image"].astype(int)  # black on white: grey levels, mostly white
    assert np.all(image[..., 0] == image[..., 1]) and np.all(image[..., 1] == image[..., 2])
    assert np.median(image) == 255
    if np.array_equal(m["image"], c["image"]):
      clean_count += 1
    else:  # not drawn clean: exactly the sample of clean_fraction=0
      np.testing.assert_array_equal(m["image"], base["image"])
  assert 10 <= clean_count <= 30
  with pytest.raises(ValueError, match="clean_fraction"):
    _config(clean_fraction=1.5)


def test_hard_fraction_draws_some_samples_at_the_hard_difficulty(gen):
  mixed = synthetic.SyntheticGenerator(_config(hard_fraction=0.5))
  hard = synthetic.SyntheticGenerator(_config(difficulty="hard"))
  same_as_hard = same_as_normal = 0
  for i in range(30):
    m = mixed.sample(i)
    same_as_hard += np.array_equal(m["image"], hard.sample(i)["image"])
    same_as_normal += np.array_equal(m["image"], gen.sample(i)["image"])
  assert same_as_hard + same_as_normal == 30 and 5 <= same_as_hard <= 25


def test_glyph_augment_varies_some_samples_and_leaves_the_rest_unchanged(gen):
  mixed = synthetic.SyntheticGenerator(_config(glyph_augment=0.5))
  varied = 0
  for i in range(40):
    base, m = gen.sample(i), mixed.sample(i)
    assert (base["label"], base["font"]) == (m["label"], m["font"])
    np.testing.assert_array_equal(m["image"], mixed.sample(i)["image"])  # reproducible
    varied += not np.array_equal(m["image"], base["image"])
  assert 8 <= varied <= 30  # a drawn sample can draw none of the three changes
  with pytest.raises(ValueError, match="glyph_augment"):
    _config(glyph_augment=-0.1)


def _bar(width=6, height=40):
  text = np.zeros((height, 40), np.uint8)
  text[:, 17 : 17 + width] = 255
  return Image.fromarray(text)


class _Draws:
  """A stand-in random stream: `random()` answers in turn, `uniform` the given value."""

  def __init__(self, randoms, value):
    self.randoms, self.value = list(randoms), value

  def random(self):
    return self.randoms.pop(0)

  def uniform(self, lo, hi):
    assert lo <= self.value <= hi
    return self.value


def _ink_columns(img):
  a = np.asarray(img, np.float32)
  cols = np.arange(a.shape[1])
  return [(row * cols).sum() / row.sum() for row in (a[:4], a[-4:])]


def test_vary_glyphs_slants_thickens_thins_and_stretches():
  bar = _bar()
  ink = float(np.asarray(bar, np.float32).sum())
  italic = synthetic.vary_glyphs(_Draws([0.0, 0.9, 0.9], 0.3), bar)
  top, bottom = _ink_columns(italic)
  assert italic.size == (40 + 12, 40) and top - bottom == pytest.approx(0.3 * 36, abs=1.5)
  back = synthetic.vary_glyphs(_Draws([0.0, 0.9, 0.9], -0.2), bar)
  top, bottom = _ink_columns(back)
  assert back.size == (40 + 8, 40) and bottom - top == pytest.approx(0.2 * 36, abs=1.5)
  bold = synthetic.vary_glyphs(_Draws([0.9, 0.0, 0.0, 0.9], 0), bar)
  thin = synthetic.vary_glyphs(_Draws([0.9, 0.0, 0.9, 0.9], 0), bar)
  assert np.asarray(bold, np.float32).sum() == pytest.approx(ink * 8 / 6, rel=0.1)
  assert np.asarray(thin, np.float32).sum() == pytest.approx(ink * 4 / 6, rel=0.1)
  hairline = _bar(width=1)  # thinning would erase it: left as it is
  kept = synthetic.vary_glyphs(_Draws([0.9, 0.0, 0.9, 0.9], 0), hairline)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(hairline))
  wide = synthetic.vary_glyphs(_Draws([0.9, 0.9, 0.0], 1.25), bar)
  assert wide.size == (50, 40)


def test_one_generator_serves_concurrent_threads_with_a_mixture():
  # grain reads a source from 8 threads; a hard/normal mixture must not let one
  # sample's difficulty leak into another's (a shared per-sample style once did).
  mixed = synthetic.SyntheticGenerator(_config(hard_fraction=0.5))
  sequential = [mixed.sample(i)["image"] for i in range(48)]
  shared = synthetic.SyntheticGenerator(_config(hard_fraction=0.5))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    threaded = list(pool.map(lambda i: shared.sample(i)["image"], range(48)))
  for i, (want, got) in enumerate(zip(sequential, threaded)):
    np.testing.assert_array_equal(got, want, err_msg=f"sample {i}")
