"""Text-image super-resolution: the LR image, bicubic-upsampled to the encoder size, goes
through a pretrained ViT encoder; a light transformer head predicts the HR pixels of
each patch. L2 loss, optionally + a gradient-profile term (docs/method.md §4).

  python -m mms_jax.main --config=configs/finetune_sr.py --workdir=DIR \
      --config.init_from=PRETRAIN_WORKDIR

The trainer is dense.train_and_evaluate; this file is the task: loss, metrics (PSNR /
SSIM of SR and of the bicubic baseline), picture, and the optional recognizer.
Evaluation only: --config.eval_only=True [--config.eval_from=CHECKPOINT].
With --config.sr_eval_recognizer=RECOGNITION_WORKDIR the evaluation also reads the
bicubic, SR and HR images with that recognizer and reports word accuracy.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mms_jax.evaluate import image_metrics
from mms_jax.evaluate import pictures
from mms_jax.evaluate import text_metrics
from mms_jax.models import dense_heads
from mms_jax.models import recognition
from mms_jax.train import common
from mms_jax.train import dense

SCALE = 2  # the pipeline's lr_image is always half the image size (TextZoom 16x64 -> 32x128)


# ------------------------------------------------------------------------------------
# Config checks and batch fields.
# ------------------------------------------------------------------------------------
def _check(config):
  height, width = config.image_size
  if height % SCALE or width % SCALE:
    raise common.ConfigError(
      f"config.image_size={tuple(config.image_size)} must be even (the LR image is half of it)"
    )
  if min(height, width) < 11:
    raise common.ConfigError("config.image_size: SSIM needs images of at least 11x11")
  if config.loss.gradient_weight < 0:
    raise common.ConfigError("config.loss.gradient_weight must be >= 0")
  if config.data.augment:
    raise common.ConfigError(
      "config.data.augment=True would warp each high-resolution image apart from its "
      "low-resolution pair: set --config.data.augment=False for super-resolution"
    )


def _fields(config):
  height, width = config.image_size
  return {"lr_image": (height // SCALE, width // SCALE, 3), "image": (height, width, 3)}


# ------------------------------------------------------------------------------------
# Loss and metrics.
# ------------------------------------------------------------------------------------
def image_gradients(images):
  """[B, H, W, C] -> (d/dy [B, H - 1, W, C], d/dx [B, H, W - 1, C]), forward differences."""
  return images[:, 1:] - images[:, :-1], images[:, :, 1:] - images[:, :, :-1]


def sr_loss(sr, hr, gradient_weight=0.0):
  """mean (sr - hr)^2 + gradient_weight * (mean |dy sr - dy hr| + mean |dx sr - dx hr|).

  Returns (loss, {'l2', 'gradient'}).
  """
  l2 = jnp.mean((sr - hr) ** 2)
  gradient = sum(jnp.mean(jnp.abs(a - b)) for a, b in zip(image_gradients(sr), image_gradients(hr)))
  return l2 + gradient_weight * gradient, {"l2": l2, "gradient": gradient}


def _loss(model, config):
  def loss_fn(params, batch):
    sr, _ = model.apply({"params": params}, batch["lr_image"], train=True)
    loss, parts = sr_loss(sr, batch["image"], config.loss.gradient_weight)
    mse = jnp.mean((image_metrics.to_unit(sr) - image_metrics.to_unit(batch["image"])) ** 2)
    return loss, {**parts, "train_psnr": -10.0 * jnp.log10(mse)}

  return loss_fn


def _per_image(model, config):
  """Per-image PSNR / SSIM of SR and of bicubic; outputs the SR (clipped) and bicubic
  images for the optional recognizer."""
  del config

  def per_image(params, batch):
    sr, aux = model.apply({"params": params}, batch["lr_image"])
    sr_q, bic_q = (image_metrics.image_quality(x, batch["image"]) for x in (sr, aux["upsampled"]))
    metrics = {
      "psnr": sr_q["psnr"],
      "ssim": sr_q["ssim"],
      "bicubic_psnr": bic_q["psnr"],
      "bicubic_ssim": bic_q["ssim"],
    }
    return metrics, {"sr": jnp.clip(sr, -1, 1), "bicubic": aux["upsampled"]}

  return per_image


def _word_accuracies(config):
  """None, or with config.sr_eval_recognizer: (outputs, batch) -> word accuracy of the
  bicubic, SR and HR images, per image."""
  if not config.sr_eval_recognizer:
    return None
  recognizer = load_recognizer(config.sr_eval_recognizer)

  def host_metrics(outputs, batch):
    images = {"bicubic": outputs["bicubic"], "sr": outputs["sr"], "hr": batch["image"]}
    return {f"word_accuracy_{k}": recognizer(v, batch["label"]) for k, v in images.items()}

  return host_metrics


# ------------------------------------------------------------------------------------
# Optional: word accuracy of a recognizer trained by the recognition program.
# ------------------------------------------------------------------------------------
def load_recognizer(path):
  """A callable (images [N, H, W, 3] in [-1, 1], labels [N]) -> correct float32[N].

  `path`: a recognition workdir, or a step directory inside one (models/recognition.load).
  Images of another size are resized (bilinear) to the recognizer's input size. Labels
  and predictions are compared after text_metrics.normalize with the run's first eval
  charset.
  """
  trained = recognition.load(path, what="sr_eval_recognizer")
  model, tokenizer, rec_config = trained.model, trained.tokenizer, trained.run_config
  params = jax.tree.map(jnp.asarray, trained.params)
  image_size = tuple(rec_config["image_size"])
  charset = (rec_config.get("eval") or {}).get("charset") or text_metrics.DEFAULT_CHARSET
  charset = charset.split(",")[0].strip()
  predict = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.predict))
  logging.info(
    "sr_eval_recognizer: %s (%s head, input %s, scored on charset %r).",
    trained.step_dir,
    model.head,
    image_size,
    charset,
  )

  def read(images, labels):
    images = jnp.asarray(images, jnp.float32)
    if tuple(images.shape[1:3]) != image_size:
      images = jax.image.resize(images, (images.shape[0], *image_size, 3), "bilinear")
    texts = tokenizer.decode(np.asarray(predict(params, images)))
    return np.array(
      [
        text_metrics.normalize(t, charset) == text_metrics.normalize(g, charset)
        for t, g in zip(texts, labels)
      ],
      np.float32,
    )

  return read


# ------------------------------------------------------------------------------------
# Pictures: LR (nearest-upscaled) / bicubic / SR / HR rows.
# ------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _predict(model, params, lr_images):
  sr, aux = model.apply({"params": params}, lr_images)
  return jnp.clip(sr, -1, 1), aux["upsampled"]


def sr_picture(model, config, params, batch, path):
  """A PNG of four rows; runs on this process only (params as host arrays)."""
  del config
  sr, up = (np.asarray(x) for x in _predict(model, params, jnp.asarray(batch["lr_image"])))
  lr = np.repeat(np.repeat(np.asarray(batch["lr_image"]), SCALE, axis=1), SCALE, axis=2)
  kinds = (("LR (pixels x2)", lr), ("bicubic", up), ("SR", sr), ("HR", batch["image"]))
  pictures.save_labelled_rows(
    [pictures.side_by_side(pictures.to_uint8(x)) for _, x in kinds], [k for k, _ in kinds], path
  )


TASK = dense.Task(
  program="super_resolution",
  eval_splits={
    "synthetic": ("val", "test_heldout_fonts", "test_hard"),
    "textzoom": ("test",),
  },  # -> test/easy, test/medium, test/hard
  targets="LR/HR pairs",
  model_class=dense_heads.SuperResolver,
  model_options=lambda config: {"scale": SCALE, "residual": config.model.residual},
  check_config=_check,
  fields=_fields,
  input_key="lr_image",
  loss=_loss,
  per_image=_per_image,
  summarize=lambda acc: acc.means(),
  picture=sr_picture,
  host_metrics=_word_accuracies,
  with_labels=True,
)


# What programs.py and the tests call.
build_model, check_config, train_and_evaluate = dense.entry_points(TASK)
