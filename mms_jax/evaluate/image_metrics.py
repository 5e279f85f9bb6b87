"""Metrics of the dense programs: foreground IoU / F-score and PSNR / SSIM.

Segmentation (from thresholded probabilities, foreground = 1):
  per image:  tp, fp, fn = pixel counts;  IoU = tp / (tp + fp + fn);
              F = 2 tp / (2 tp + fp + fn)  (= 2 P R / (P + R));
              an image with no foreground in either mask nor prediction scores 1.
  data set:   the same ratios over the counts summed over all images ('iou',
              'fscore'), plus the mean of the per-image values ('iou_per_image', ...).

Super-resolution: images in [-1, 1] are mapped to [0, 1] (x + 1) / 2 and clipped,
then scored with dm-pix with data range 1:
  PSNR = 10 log10(1 / MSE), MSE over all pixels and channels of one image;
  SSIM = dm_pix.ssim: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, 'valid'
         filtering, computed per channel and averaged (equal to scikit-image's
         structural_similarity(..., data_range=1, channel_axis=-1,
         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)).
  Data-set values are means of the per-image values.

The jnp functions run under jit on per-batch arrays; `Accumulator` gathers their
per-image outputs on the host and drops padding rows.
"""

from collections.abc import Mapping

import dm_pix
import jax.numpy as jnp
import numpy as np


# ------------------------------------------------------------------------------------
# Segmentation.
# ------------------------------------------------------------------------------------
def confusion_counts(probs, masks, threshold=0.5):
  """probs: [B, H, W] foreground probabilities, masks: [B, H, W] in {0, 1}.

  Returns {'tp', 'fp', 'fn'}: float32[B] pixel counts per image.
  """
  pred = (probs >= threshold).astype(jnp.float32)
  truth = (masks > 0.5).astype(jnp.float32)
  axes = tuple(range(1, pred.ndim))
  return {
    "tp": jnp.sum(pred * truth, axes),
    "fp": jnp.sum(pred * (1 - truth), axes),
    "fn": jnp.sum((1 - pred) * truth, axes),
  }


def _ratio(num, den):
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den > 0, num / np.maximum(den, 1e-12), 1.0)


def iou(tp, fp, fn):
  return _ratio(tp, tp + fp + fn)


def fscore(tp, fp, fn):
  return _ratio(2 * tp, 2 * tp + fp + fn)


def segmentation_summary(tp, fp, fn) -> dict[str, float]:
  """Data-set IoU / F-score / precision / recall from per-image counts [N]."""
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  total = tp.sum(), fp.sum(), fn.sum()
  return {
    "iou": float(iou(*total)),
    "fscore": float(fscore(*total)),
    "precision": float(_ratio(total[0], total[0] + total[1])),
    "recall": float(_ratio(total[0], total[0] + total[2])),
    "iou_per_image": float(np.mean(iou(tp, fp, fn))),
    "fscore_per_image": float(np.mean(fscore(tp, fp, fn))),
  }


# ------------------------------------------------------------------------------------
# Super-resolution.
# ------------------------------------------------------------------------------------
def to_unit(images):
  """[-1, 1] -> [0, 1], clipped: the range PSNR and SSIM are computed in."""
  return jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(a, b):
  """a, b: [B, H, W, C] in [0, 1] -> float32[B] (inf for identical images)."""
  return dm_pix.psnr(a, b)


def ssim(a, b):
  """a, b: [B, H, W, C] in [0, 1], H and W >= 11 -> float32[B]."""
  return dm_pix.ssim(a, b, max_val=1.0)


def image_quality(pred, target):
  """pred, target: [B, H, W, C] in [-1, 1] -> {'psnr': [B], 'ssim': [B]}."""
  a, b = to_unit(pred), to_unit(target)
  return {"psnr": psnr(a, b), "ssim": ssim(a, b)}


# ------------------------------------------------------------------------------------
# Host-side accumulation over an evaluation set.
# ------------------------------------------------------------------------------------
class Accumulator:
  """Concatenates per-image metric arrays [B] over batches, skipping padding rows."""

  def __init__(self):
    self._values = {}

  def update(self, per_image: Mapping[str, np.ndarray], valid: np.ndarray):
    keep = np.asarray(valid, bool)
    for name, value in per_image.items():
      self._values.setdefault(name, []).append(np.asarray(value, np.float64)[keep])

  def values(self) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v) for k, v in self._values.items()}

  @property
  def count(self) -> int:
    values = self.values()
    return len(next(iter(values.values()))) if values else 0

  def means(self) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in self.values().items()}
