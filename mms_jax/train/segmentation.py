"""Text segmentation: a pretrained ViT encoder + light transformer head predicting a
foreground patch per token, trained with per-pixel binary cross-entropy (docs/method.md §4).

  python -m mms_jax.main --config=configs/finetune_segmentation.py --workdir=DIR \
      --config.init_from=PRETRAIN_WORKDIR

The trainer is dense.train_and_evaluate; this file is the task: loss, metrics (foreground
IoU, F-score from summed confusion counts), picture.
Evaluation only: --config.eval_only=True [--config.eval_from=CHECKPOINT].
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax.evaluate import image_metrics
from mms_jax.evaluate import pictures
from mms_jax.models import dense_heads
from mms_jax.train import common
from mms_jax.train import dense


def _check(config):
  if not 0 < config.threshold < 1:
    raise common.ConfigError(f"config.threshold={config.threshold} must be in (0, 1)")


def _fields(config):
  height, width = config.image_size
  return {"image": (height, width, 3), "mask": (height, width)}


def _loss(model, config):
  def loss_fn(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"], train=True)
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["mask"]).mean()
    counts = image_metrics.confusion_counts(jax.nn.sigmoid(logits), batch["mask"], config.threshold)
    tp, fp, fn = (counts[k].sum() for k in ("tp", "fp", "fn"))
    return loss, {"train_iou": tp / jnp.maximum(tp + fp + fn, 1.0)}

  return loss_fn


def _per_image(model, config):
  """Per-image confusion counts {'tp', 'fp', 'fn'} [B]; no output images."""

  def per_image(params, batch):
    logits, _ = model.apply({"params": params}, batch["image"])
    return image_metrics.confusion_counts(
      jax.nn.sigmoid(logits), batch["mask"], config.threshold
    ), {}

  return per_image


def _summarize(acc):
  values = acc.values()
  return image_metrics.segmentation_summary(values["tp"], values["fp"], values["fn"])


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, params, images):
  return jax.nn.sigmoid(model.apply({"params": params}, images)[0])


def segmentation_picture(model, config, params, batch, path):
  """Rows: image / ground-truth mask / predicted probability / thresholded prediction."""
  probs = np.asarray(_predict(model, params, jnp.asarray(batch["image"])))
  kinds = (
    ("input", pictures.to_uint8(batch["image"])),
    ("ground truth", pictures.mask_rgb(batch["mask"])),
    ("probability", pictures.mask_rgb(probs)),
    ("prediction", pictures.mask_rgb(probs >= config.threshold)),
  )
  pictures.save_labelled_rows(
    [pictures.side_by_side(x) for _, x in kinds], [k for k, _ in kinds], path
  )


TASK = dense.Task(
  program="segmentation",
  eval_splits={"synthetic": ("val", "test_heldout_fonts", "test_hard"), "textseg": ("val", "test")},
  targets="masks",
  model_class=dense_heads.Segmenter,
  model_options=lambda config: {},
  check_config=_check,
  fields=_fields,
  input_key="image",
  loss=_loss,
  per_image=_per_image,
  summarize=_summarize,
  picture=segmentation_picture,
)


# What programs.py and the tests call.
build_model, check_config, train_and_evaluate = dense.entry_points(TASK)
