"""The PNG pictures the programs write: labelled image rows and a prediction grid.

Images come in the models' [-1, 1] range; masks and probabilities in [0, 1].
"""

import numpy as np
from PIL import Image
from PIL import ImageDraw

from mms_jax.evaluate import text_metrics


def to_uint8(images):
  """[..., H, W, 3] in [-1, 1] -> uint8 in [0, 255]."""
  return np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).astype(np.uint8)


def mask_rgb(mask):
  """[B, H, W] in [0, 1] -> uint8 [B, H, W, 3], foreground white."""
  return np.repeat((np.clip(np.asarray(mask), 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)


def side_by_side(images_uint8):
  """[B, H, W, 3] -> one row [H, B * W, 3]."""
  return np.concatenate(list(images_uint8), axis=1)


def save_labelled_rows(rows, labels, path, scale=2, gap=4, label_width=170):
  """Stacks uint8 image rows, upscaled, with a text label left of each row."""
  height, width = rows[0].shape[0] * scale, rows[0].shape[1] * scale
  canvas = Image.new("RGB", (label_width + width, len(rows) * (height + gap)), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (row, label) in enumerate(zip(rows, labels)):
    top = i * (height + gap)
    canvas.paste(Image.fromarray(row).resize((width, height), Image.NEAREST), (label_width, top))
    draw.text((6, top + height // 2 - 6), label, fill="black")
  canvas.save(path)


def save_prediction_grid(examples, path, charset="36", scale=2, columns=4):
  """A grid of (image, ground truth, prediction): 'pred' green when it matches 'gt'."""
  examples = list(examples)
  h, w = examples[0][0].shape[:2]
  cell_w, cell_h = w * scale + 8, h * scale + 34
  rows = (len(examples) + columns - 1) // columns
  canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, gt, pred) in enumerate(examples):
    x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 2
    canvas.paste(
      Image.fromarray(to_uint8(image)).resize((w * scale, h * scale), Image.NEAREST), (x, y)
    )
    ok = text_metrics.normalize(gt, charset) == text_metrics.normalize(pred, charset)
    draw.text((x, y + h * scale + 2), f"pred: {pred}", fill=(0, 128, 0) if ok else (200, 0, 0))
    draw.text((x, y + h * scale + 16), f"gt:   {gt}", fill="black")
  canvas.save(path)
