r"""Draws every masking strategy on a few text images into one PNG.

  python -m mms_jax.show_masks --out docs/img/masks.png \
      [--image_size 32,128 --patch 4,4 --ratio 0.75 --num_images 4 --seed 0 --scale 3]

Columns are images; the first row shows them unmasked, every other row masked by one
strategy (the samplers of mms_jax/masking.py, exactly as pretraining calls them):
hidden patches are filled with flat grey and the patch grid is drawn lightly.
Images come from the synthetic generator (mms_jax/data/synthetic.py), or, if it is
unavailable, are a few words drawn with Pillow's default font.
"""

import dataclasses
import importlib

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from mms_jax import masking

_OUT = flags.DEFINE_string("out", "docs/img/masks.png", "Output PNG.")
_IMAGE_SIZE = flags.DEFINE_list("image_size", ["32", "128"], "Image H,W in pixels.")
_PATCH = flags.DEFINE_list("patch", ["4", "4"], "Patch h,w in pixels.")
_RATIO = flags.DEFINE_float("ratio", 0.75, "Mask ratio.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Number of image columns.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the images and the masks.")
_SCALE = flags.DEFINE_integer("scale", 3, "Nearest-neighbour upscaling of the panels.")

# (row label, masking config overrides).
ROWS = (
  ("random patch", dict(mode="single", strategies=("random_patch",))),
  ("blockwise", dict(mode="single", strategies=("blockwise",))),
  ("span", dict(mode="single", strategies=("span",))),
  ("horizontal block", dict(mode="single", strategies=("horizontal_block",))),
  (
    "union: horizontal\nblock + random patch",
    dict(mode="union", strategies=("horizontal_block", "random_patch")),
  ),
  ("per_sample: patch,\nblock or span", dict(mode="per_sample")),
)
HIDDEN = (92, 92, 92)  # fill of hidden patches
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
MUTED = (110, 110, 110)
_GRID_ALPHA = 0.3  # weight of the white grid lines over visible pixels
_GRID_HIDDEN = (78, 78, 78)  # grid lines inside hidden areas
_IMAGE_GAP, _ROW_GAP, _MARGIN = 16, 8, 14
_WORDS = ("masked", "Image", "MODEL", "text", "Pretrain", "spans")


@dataclasses.dataclass
class Layout:
  """Where everything is in the figure (used by tests and callers)."""

  size: tuple[int, int]  # (width, height) of the PNG
  grid: tuple[int, int]
  scale: tuple[int, int]  # (y, x) pixels per patch in the panels
  num_masked: int
  images: np.ndarray  # uint8[N, H, W, 3], the source images
  original: list  # (x, y) top-left corner of each original panel
  rows: list  # per strategy: dict(label, mask: bool[N, L], masked: [(x, y)] per image)
  source: str  # 'synthetic' or 'default font'


def _font(size):
  return ImageFont.load_default(size=size)


def sample_images(num_images, image_size, seed):
  """uint8[N, H, W, 3] text images and where they come from."""
  try:
    synthetic = importlib.import_module("mms_jax.data.synthetic")
    generator = synthetic.SyntheticGenerator(
      synthetic.SyntheticConfig(image_size=tuple(image_size), seed=seed)
    )
    images = np.stack([generator.sample(i)["image"] for i in range(num_images)])
    if images.shape[1:] == (*image_size, 3) and images.dtype == np.uint8:
      return images, "synthetic"
  except Exception:
    pass  # the generator is optional here; fall back to plain words
  height, width = image_size
  images = []
  for i in range(num_images):
    word = _WORDS[(i + seed) % len(_WORDS)]
    font = _font(max(8, int(0.7 * height)))
    img = Image.new("RGB", (width, height), (245, 240, 228))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.text(
      ((width - right - left) / 2, (height - bottom - top) / 2), word, fill=(30, 30, 60), font=font
    )
    images.append(np.asarray(img))
  return np.stack(images), "default font"


def upscale(image, scale):
  return np.repeat(np.repeat(image, scale[0], axis=0), scale[1], axis=1)


def masked_panel(image, mask, grid, patch, scale):
  """uint8[H * s, W * s, 3]: hidden patches grey, the patch grid drawn lightly.

  Grid lines only touch the first pixel row and column of every patch, so the
  centre of a patch is either HIDDEN or the original pixel.
  """
  cell = (patch[0] * scale, patch[1] * scale)
  hidden = upscale(mask.reshape(grid), cell)
  panel = upscale(image, (scale, scale)).astype(np.float32)
  line = np.zeros(hidden.shape, bool)
  line[:: cell[0], :] = True
  line[:, :: cell[1]] = True
  panel[line] = (1 - _GRID_ALPHA) * panel[line] + _GRID_ALPHA * 255
  panel[hidden] = HIDDEN
  panel[hidden & line] = _GRID_HIDDEN
  return panel.round().astype(np.uint8)


def _masks(overrides, image_size, patch, ratio, num_images, key):
  config = masking.default_config()
  config.update(overrides)
  config.ratio = ratio
  spec = masking.build_spec(config, image_size, patch)
  mask, ids = masking.make_sampler(spec)(key, num_images, spec.num_masked())
  names = masking.strategy_names(spec)
  captions = (
    [names[i].replace("_", " ") for i in np.asarray(ids)] if (spec.mode == "per_sample") else None
  )
  return np.asarray(mask), captions, spec


def render(image_size=(32, 128), patch=(4, 4), ratio=0.75, num_images=4, seed=0, scale=3):
  """The figure as a PIL image, and its Layout.

  The first row shows the originals; every other row shows one strategy's masks of
  the same images, in the same columns.
  """
  image_size, patch = tuple(image_size), tuple(patch)
  images, source = sample_images(num_images, image_size, seed)
  panel_h, panel_w = image_size[0] * scale, image_size[1] * scale
  label_font, small_font = _font(16), _font(13)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label_w = (
    max(probe.multiline_textbbox((0, 0), label, font=label_font, spacing=3)[2] for label, _ in ROWS)
    + 2 * _MARGIN
  )
  title_h, caption_h = 42, 16
  row_h = panel_h + caption_h + _ROW_GAP
  width = label_w + num_images * panel_w + (num_images - 1) * _IMAGE_GAP + _MARGIN
  height = title_h + (len(ROWS) + 1) * row_h + _MARGIN - _ROW_GAP

  canvas = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  xs = [label_w + i * (panel_w + _IMAGE_GAP) for i in range(num_images)]

  def row_label(y, text, color=INK):
    draw.multiline_text(
      (_MARGIN, y + panel_h / 2), text, font=label_font, fill=color, anchor="lm", spacing=3
    )

  row_label(title_h, "original", MUTED)
  originals = [(x, title_h) for x in xs]
  for image, xy in zip(images, originals):
    canvas.paste(Image.fromarray(upscale(image, (scale, scale))), xy)

  rows, spec = [], None
  keys = jax.random.split(jax.random.key(seed), len(ROWS))
  for r, ((label, overrides), key) in enumerate(zip(ROWS, keys)):
    mask, captions, spec = _masks(overrides, image_size, patch, ratio, num_images, key)
    y = title_h + (r + 1) * row_h
    row_label(y, label)
    row = dict(label=label.replace("\n", " "), mask=mask, masked=[(x, y) for x in xs])
    for i, x in enumerate(xs):
      panel = masked_panel(images[i], mask[i], spec.grid, patch, scale)
      canvas.paste(Image.fromarray(panel), (x, y))
      if captions:
        draw.text(
          (x + panel_w / 2, y + panel_h + 2), captions[i], font=small_font, fill=MUTED, anchor="mt"
        )
    rows.append(row)

  count = spec.num_masked()
  title = (
    f"{image_size[0]}x{image_size[1]} images, {patch[0]}x{patch[1]} patches "
    f"({spec.grid[0]}x{spec.grid[1]} grid), ratio {ratio:g}: {count} of "
    f"{spec.num_cells} patches hidden (grey) in every mask"
  )
  draw.text((_MARGIN, _MARGIN), title, font=label_font, fill=INK)
  layout = Layout(
    size=(width, height),
    grid=spec.grid,
    scale=(scale, scale),
    num_masked=count,
    images=images,
    original=originals,
    rows=rows,
    source=source,
  )
  return canvas, layout


def write(out, **settings):
  """Renders the figure into `out` (PNG); returns its Layout."""
  canvas, layout = render(**settings)
  canvas.save(out, optimize=True)
  return layout


def main(argv):
  del argv
  layout = write(
    _OUT.value,
    image_size=[int(v) for v in _IMAGE_SIZE.value],
    patch=[int(v) for v in _PATCH.value],
    ratio=_RATIO.value,
    num_images=_NUM_IMAGES.value,
    seed=_SEED.value,
    scale=_SCALE.value,
  )
  print(
    f"wrote {_OUT.value}: {layout.size[0]}x{layout.size[1]} px, "
    f"{len(layout.rows)} strategies x {layout.images.shape[0]} images "
    f"({layout.source} images)"
  )


if __name__ == "__main__":
  app.run(main)
