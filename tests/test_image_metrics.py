"""IoU / F-score on hand-computed cases; PSNR / SSIM (dm-pix) against scikit-image."""

import numpy as np
import pytest
from skimage import metrics as skm

from mms_jax.evaluate import image_metrics as im


def _counts(probs, masks, threshold=0.5):
  return {
    k: np.asarray(v)
    for k, v in im.confusion_counts(
      np.asarray(probs, np.float32), np.asarray(masks, np.float32), threshold
    ).items()
  }


def test_iou_and_fscore_by_hand():
  masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]]], np.float32)  # [3, 1, 4]
  probs = np.array([[[0.9, 0.2, 0.7, 0.1]], [[0.1, 0.2, 0.3, 0.4]], [[0.4, 0.6, 0.8, 0.5]]])
  c = _counts(probs, masks)
  # image 0: tp 1 (px 0), fn 1 (px 1), fp 1 (px 2); image 1: nothing anywhere;
  # image 2: tp 0, fn 1, fp 3 (0.5 counts as foreground at threshold 0.5).
  np.testing.assert_array_equal(c["tp"], [1, 0, 0])
  np.testing.assert_array_equal(c["fp"], [1, 0, 3])
  np.testing.assert_array_equal(c["fn"], [1, 0, 1])
  np.testing.assert_allclose(im.iou(c["tp"], c["fp"], c["fn"]), [1 / 3, 1.0, 0.0])
  np.testing.assert_allclose(im.fscore(c["tp"], c["fp"], c["fn"]), [0.5, 1.0, 0.0])
  s = im.segmentation_summary(c["tp"], c["fp"], c["fn"])
  # Data set: tp 1, fp 4, fn 2.
  assert s["iou"] == pytest.approx(1 / 7)
  assert s["fscore"] == pytest.approx(2 / 8)
  assert s["precision"] == pytest.approx(1 / 5)
  assert s["recall"] == pytest.approx(1 / 3)
  assert s["iou_per_image"] == pytest.approx((1 / 3 + 1 + 0) / 3)
  assert s["fscore_per_image"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_fscore_is_harmonic_mean_of_precision_and_recall():
  rng = np.random.default_rng(0)
  masks = (rng.random((5, 8, 16)) < 0.3).astype(np.float32)
  probs = rng.random((5, 8, 16))
  c = _counts(probs, masks, threshold=0.7)
  s = im.segmentation_summary(c["tp"], c["fp"], c["fn"])
  p, r = s["precision"], s["recall"]
  assert s["fscore"] == pytest.approx(2 * p * r / (p + r))
  pred, truth = probs >= 0.7, masks > 0
  assert s["iou"] == pytest.approx((pred & truth).sum() / (pred | truth).sum())


def _structured(rng, shape):
  """Text-like images: dark strokes (bars) on a smooth background, plus noise."""
  b, h, w, c = shape
  y, x = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
  base = 0.6 + 0.3 * np.sin(3 * x + 2 * y)[None, ..., None] * rng.random((b, 1, 1, c))
  strokes = ((np.arange(w) // 3) % 4 == 0)[None, None, :, None] & (
    np.abs(np.arange(h) - h / 2) < h / 4
  )[None, :, None, None]
  return np.clip(np.where(strokes, 0.1, base) + 0.02 * rng.normal(size=shape), 0, 1)


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("shape", [(3, 32, 128, 3), (2, 24, 40, 1)])
def test_psnr_and_ssim_match_scikit_image(kind, shape):
  rng = np.random.default_rng(sum(shape))
  a = rng.random(shape) if kind == "random" else _structured(rng, shape)
  b = np.clip(a + rng.normal(0, 0.08, shape) + 0.05, 0, 1)
  a, b = a.astype(np.float32), b.astype(np.float32)
  psnr, ssim = np.asarray(im.psnr(a, b)), np.asarray(im.ssim(a, b))
  for i in range(shape[0]):
    assert psnr[i] == pytest.approx(
      skm.peak_signal_noise_ratio(a[i], b[i], data_range=1.0), abs=1e-3
    )
    expected = skm.structural_similarity(
      a[i],
      b[i],
      data_range=1.0,
      channel_axis=-1,
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
    )
    assert ssim[i] == pytest.approx(expected, abs=1e-4)


def test_image_quality_maps_minus_one_one_to_unit_range():
  rng = np.random.default_rng(1)
  hr = rng.uniform(-1, 1, (2, 32, 128, 3)).astype(np.float32)
  sr = np.clip(hr + rng.normal(0, 0.1, hr.shape), -1.2, 1.2).astype(np.float32)  # overshoots
  q = {k: np.asarray(v) for k, v in im.image_quality(sr, hr).items()}
  a, b = np.clip((sr + 1) / 2, 0, 1), (hr + 1) / 2
  for i in range(2):
    assert q["psnr"][i] == pytest.approx(
      skm.peak_signal_noise_ratio(b[i], a[i], data_range=1.0), abs=1e-3
    )
    assert q["ssim"][i] == pytest.approx(
      skm.structural_similarity(
        b[i],
        a[i],
        data_range=1.0,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
      ),
      abs=1e-4,
    )


def test_accumulator_drops_padding_rows():
  acc = im.Accumulator()
  acc.update({"psnr": np.array([10.0, 20.0, 99.0])}, np.array([True, True, False]))
  acc.update({"psnr": np.array([30.0, 99.0, 99.0])}, np.array([True, False, False]))
  assert acc.count == 3
  assert acc.means() == {"psnr": pytest.approx(20.0)}
