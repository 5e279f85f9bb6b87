"""Library pieces every fine-tuning program shares (recognition, segmentation, SR).

API (all trainers keep their params as {'encoder': vit.Encoder params, <head>: ...};
the pretrained encoder is put in by models/encoder_weights.merge, through
common.load_pretrained):

  make_finetune_optimizer(config, total_steps, params) -> (optimizer, schedule)
      AdamW + warmup/cosine (common.learning_rate_schedule), weight decay off on
      biases/norms/tokens (common.weight_decay_mask). config.freeze_encoder=True zeroes
      every encoder update (no Adam step, no weight decay: the encoder stays
      bit-identical; the frozen-encoder probe). config.layer_decay < 1 scales the lr of
      encoder block i of L by decay**(L - i), of patch_embed / cls_token by
      decay**(L + 1); the final encoder norm and the head keep the full lr.
  trainable_mask(params, config) -> bool tree (False = frozen), for reporting.
  eval_checkpoint(config, workdir) -> path   and
  load_for_eval(path, abstract_params) -> (params, step)
      The eval-only pattern: `config.eval_only=True` evaluates
      `config.eval_from` (a workdir or step directory; default: this workdir's latest
      good checkpoint) and exits without training.
"""

import logging
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax import checkpoints
from mms_jax.models import encoder_weights
from mms_jax.train import common

ENCODER = encoder_weights.ENCODER
_flat, _unflat = encoder_weights.flatten, encoder_weights.unflatten


# ------------------------------------------------------------------------------------
# Optimizer.
# ------------------------------------------------------------------------------------
def trainable_mask(params, config, key=ENCODER):
  """True for every tensor the optimizer may change."""
  frozen = bool(config.get("freeze_encoder", False))
  return {k: jax.tree.map(lambda _, k=k: not (frozen and k == key), v) for k, v in params.items()}


_BLOCK = re.compile(r"^blocks_(\d+)/")


def layer_lr_scales(params, decay, key=ENCODER):
  """Per-tensor lr multipliers of layer-wise decay (see the module docstring).

  Scanned blocks (leading [depth] axis) get a [depth, 1, ...] vector.
  """
  encoder = _flat(params[key])
  depth = len({m.group(1) for k in encoder if (m := _BLOCK.match(k))})
  scanned = [k for k in encoder if k.startswith("blocks/")]
  if scanned:
    depth = int(encoder[scanned[0]].shape[0])

  def scale(name, leaf):
    if name.startswith(("patch_embed/", "stem/", "cls_token", "pos_embed", "mask_token")):
      return np.float32(decay ** (depth + 1))
    if m := _BLOCK.match(name):
      return np.float32(decay ** (depth - int(m.group(1))))
    if name.startswith("blocks/"):
      s = decay ** (depth - np.arange(depth, dtype=np.float64))
      return s.astype(np.float32).reshape((depth,) + (1,) * (len(leaf.shape) - 1))
    return np.float32(1.0)  # the final norm

  out = {k: jax.tree.map(lambda _: np.float32(1.0), v) for k, v in params.items()}
  out[key] = _unflat({n: scale(n, leaf) for n, leaf in encoder.items()})
  return out


def _scale_by_tree(scales):
  """Multiplies each update by a constant of the same tree position."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_finetune_optimizer(config, total_steps, params, key=ENCODER):
  """AdamW + warmup/cosine with freeze_encoder and layer_decay (module docstring).

  Reads config.lr, config.optimizer (b1, b2, weight_decay), config.grad_clip_norm,
  config.freeze_encoder, config.layer_decay. `params` may be abstract (eval_shape).
  Returns (optimizer, schedule); schedule(step) is the base (head) learning rate.
  """
  schedule = common.learning_rate_schedule(config, total_steps)
  trainable = trainable_mask(params, config, key)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  decay_mask = jax.tree.map(lambda d, t: bool(d and t), common.weight_decay_mask(params), trainable)
  inner = []
  if config.get("grad_clip_norm"):  # the norm of the trainable gradients only
    inner.append(optax.clip_by_global_norm(config.grad_clip_norm))
  inner.append(optax.scale_by_adam(b1=config.optimizer.b1, b2=config.optimizer.b2))
  chain = [
    optax.multi_transform({"train": optax.chain(*inner), "frozen": optax.set_to_zero()}, labels),
    optax.add_decayed_weights(config.optimizer.weight_decay, mask=decay_mask),
    optax.scale_by_learning_rate(schedule),
  ]
  layer_decay = config.get("layer_decay", 1.0)
  if layer_decay is not None and layer_decay != 1.0:
    if not 0 < layer_decay <= 1:
      raise common.ConfigError(f"config.layer_decay={layer_decay} must be in (0, 1]")
    chain.append(_scale_by_tree(layer_lr_scales(params, layer_decay, key)))
  # Frozen tensors: set_to_zero, no decay, lr * 0 -> an update of (-)0: x + 0 == x.
  return optax.chain(*chain), schedule


def apply_updates(params, updates):
  """params + updates (frozen tensors come back bit-identical)."""
  return jax.tree.map(jnp.add, params, updates)


# ------------------------------------------------------------------------------------
# Evaluate-only pattern.
# ------------------------------------------------------------------------------------
def eval_checkpoint(config, workdir):
  """The checkpoint config.eval_only evaluates: config.eval_from, else this workdir."""
  return config.get("eval_from") or workdir


def load_for_eval(path, abstract_params):
  """(params, step) of the checkpoint at `path` (workdir or step directory).

  abstract_params: ShapeDtypeStructs with shardings (the full fine-tuning params,
  heads included); raises checkpoints.CheckpointError when they do not match.
  """
  step_dir = checkpoints.resolve_checkpoint(path, what="eval_from")
  params = checkpoints.load_params(step_dir, abstract_params, what="eval_from")
  try:
    step = int(pathlib.Path(step_dir).name)
  except ValueError:
    step = -1
  logging.info("eval_only: evaluating %s (step %d).", os.fspath(step_dir), step)
  return params, step
