"""The mask picture: layout, and hidden patches exactly where the sampler put them."""

from absl import flags
from absl.testing import flagsaver
import numpy as np
from PIL import Image

from mms_jax import show_masks


def _cell_centres(layout, xy):
  """(y, x) pixel of the centre of every patch of the panel at xy, row-major."""
  (gh, gw), (sy, sx) = layout.grid, layout.scale
  ph = layout.images.shape[1] // gh * sy
  pw = layout.images.shape[2] // gw * sx
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  return (xy[1] + rows.ravel() * ph + ph // 2, xy[0] + cols.ravel() * pw + pw // 2)


def test_main_writes_masked_panels_that_hide_exactly_the_sampled_patches(tmp_path, monkeypatch):
  out = tmp_path / "masks.png"
  layouts = []
  write = show_masks.write
  monkeypatch.setattr(
    show_masks, "write", lambda *a, **k: layouts.append(write(*a, **k)) or layouts[-1]
  )
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(
    out=str(out),
    image_size=["16", "64"],
    patch=["4", "4"],
    ratio=0.5,
    num_images=2,
    seed=3,
    scale=2,
  ):
    show_masks.main(["show_masks"])
  (layout,) = layouts
  png = np.asarray(Image.open(out).convert("RGB"))
  assert png.shape == (layout.size[1], layout.size[0], 3)
  assert len(layout.rows) == len(show_masks.ROWS) == 6
  assert len(layout.original) == 2 and all(len(r["masked"]) == 2 for r in layout.rows)
  assert layout.grid == (4, 16) and layout.num_masked == 32

  panel_h, panel_w = 16 * 2, 64 * 2
  for i, (x, y) in enumerate(layout.original):
    np.testing.assert_array_equal(
      png[y : y + panel_h, x : x + panel_w], show_masks.upscale(layout.images[i], (2, 2))
    )
  hidden_colour = np.array(show_masks.HIDDEN)
  for row in layout.rows:
    assert row["mask"].shape == (2, 64) and (row["mask"].sum(axis=1) == 32).all()
    for i, xy in enumerate(row["masked"]):
      assert xy[0] + panel_w <= layout.size[0] and xy[1] + panel_h <= layout.size[1]
      original = png[_cell_centres(layout, layout.original[i])]
      masked = png[_cell_centres(layout, xy)]
      hidden = row["mask"][i]
      # Hidden patches (in row-major grid order) are grey, visible ones untouched.
      assert (masked[hidden] == hidden_colour).all(), row["label"]
      np.testing.assert_array_equal(masked[~hidden], original[~hidden], row["label"])
      grey = (masked == hidden_colour).all(axis=1)
      assert grey.sum() >= 32 and grey[hidden].all()


def test_hidden_panel_pixels_follow_the_grid_orientation():
  image = np.full((8, 16, 3), 200, np.uint8)
  mask = np.zeros(2 * 4, bool)
  mask[1] = True  # row 0, column 1 of a 2x4 grid
  panel = show_masks.masked_panel(image, mask, (2, 4), (4, 4), 1)
  hidden = (panel == show_masks.HIDDEN).all(axis=-1) | (panel == show_masks._GRID_HIDDEN).all(
    axis=-1
  )
  expected = np.zeros((8, 16), bool)
  expected[0:4, 4:8] = True
  np.testing.assert_array_equal(hidden, expected)


def test_fallback_images_without_the_generator(monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, "mms_jax.data.synthetic", None)  # import fails
  images, source = show_masks.sample_images(3, (32, 128), seed=0)
  assert source == "default font"
  assert images.shape == (3, 32, 128, 3) and images.dtype == np.uint8
  assert (images.reshape(3, -1).std(axis=1) > 5).all()  # some text was drawn
