"""Library pieces every fine-tuning program shares (recognition, segmentation, SR).

API (all trainers keep their params as {'encoder': vit.Encoder params, <head>: ...}):

  load_encoder_params(init_from, abstract_encoder_params) -> encoder params (numpy)
      Reads params['encoder'] of a pretraining or fine-tuning checkpoint (a workdir or
      a step directory), drops everything else (the MAE decoder, another head) and logs
      which encoder tensors were loaded, which are new and which were dropped.
  extract_encoder(loaded_params, abstract_encoder_params, source="") -> encoder params
      The same, on an already loaded params tree.
  merge_encoder(fresh_params, loaded_encoder, key="encoder") -> params
      `fresh_params` with every loaded encoder tensor put in place (dtype and sharding
      of the fresh tensor); a shape mismatch raises ValueError naming the tensor.
  init_from_merger(make_fresh_state, key="encoder", source="") -> merge_params
      The `merge_params` argument of checkpoints.restore_or_initialize: fresh state
      (heads new) with the encoder from the init_from checkpoint.
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

Position embeddings: vit.Encoder uses fixed 2-D sin-cos embeddings computed at trace
time for the actual patch grid, so an encoder pretrained on one image size fine-tunes
on another without any resampling. Only checkpoints that carry a learned
`pos_embed` parameter (e.g. converted from another code base) need it: when the fresh
model has one too, it is resized bilinearly to the new grid (resample_pos_embed);
otherwise it is dropped, and the log says so.
"""

import logging
import os
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mms_jax.models import vit
from mms_jax.train import checkpoints
from mms_jax.train import common

ENCODER = "encoder"


def _flat(tree):
  return flax.traverse_util.flatten_dict(vit._to_dict(tree), sep="/")


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------------------------
# Loading the pretrained encoder.
# ------------------------------------------------------------------------------------
def resample_pos_embed(pos, old_grid, new_grid, num_prefix=1):
  """Bilinear resize of a learned position embedding.

  pos: [1, num_prefix + gh * gw, D] -> [1, num_prefix + gh' * gw', D]; the prefix
  (cls) entries are kept as they are.
  """
  pos = np.asarray(pos, np.float32)
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  d = pos.shape[-1]
  grid = grid.reshape(old_grid[0], old_grid[1], d)
  grid = jax.image.resize(jnp.asarray(grid), (new_grid[0], new_grid[1], d), "bilinear")
  grid = np.asarray(grid).reshape(1, new_grid[0] * new_grid[1], d)
  return np.concatenate([prefix, grid], axis=1)


def _guess_grid(num_tokens, like):
  """The (gh, gw) factorisation of num_tokens whose aspect is closest to `like`."""
  target = like[1] / like[0]
  pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
  return min(pairs, key=lambda p: abs(np.log(p[1] / p[0]) - np.log(target)))


def extract_encoder(loaded_params, abstract_encoder_params, source=""):
  """Takes the encoder out of a loaded params tree; logs loaded / new / dropped.

  Args:
    loaded_params: params of a checkpoint: {'encoder': ..., 'decoder' | head: ...}
      or a bare encoder tree (has 'patch_embed').
    abstract_encoder_params: the fine-tuning model's encoder params (arrays or
      ShapeDtypeStructs); decides the layout (scanned or not) and what is "new".
    source: checkpoint path, for the log.

  Returns:
    Encoder params (numpy) holding only tensors the fine-tuning encoder has; tensors
    it has but the checkpoint lacks are left out (merge_encoder keeps them fresh).
  """
  loaded = vit._to_dict(loaded_params)
  if ENCODER in loaded:
    dropped_top = sorted(k for k in loaded if k != ENCODER)
    encoder = loaded[ENCODER]
  elif "patch_embed" in loaded:
    dropped_top, encoder = [], loaded
  else:
    raise ValueError(
      f"init_from={source!r}: no '{ENCODER}' params in the checkpoint "
      f"(top-level keys: {sorted(loaded)})"
    )
  target = _flat(abstract_encoder_params)
  # Scanned <-> unscanned block layouts convert losslessly.
  scanned = any(k.startswith("blocks/") for k in target)
  if scanned and "blocks" not in encoder and "blocks_0" in encoder:
    encoder = vit.scan_params(encoder)
  elif not scanned and "blocks" in encoder and "blocks_0" not in encoder:
    encoder = vit.unscan_params(encoder)
  flat = {k: np.asarray(v) for k, v in _flat(encoder).items()}

  if "pos_embed" in flat:
    if "pos_embed" not in target:
      logging.info(
        "init_from: dropping the checkpoint's learned pos_embed %s: this encoder "
        "uses fixed 2-D sin-cos embeddings computed for its own grid.",
        flat["pos_embed"].shape,
      )
    elif flat["pos_embed"].shape != tuple(target["pos_embed"].shape):
      old, new = flat["pos_embed"].shape[1] - 1, target["pos_embed"].shape[1] - 1
      new_grid = _guess_grid(new, (1, 4))
      old_grid = _guess_grid(old, new_grid)
      logging.info("init_from: resampling pos_embed bilinearly, grid %s -> %s.", old_grid, new_grid)
      flat["pos_embed"] = resample_pos_embed(flat["pos_embed"], old_grid, new_grid)

  taken = {k: v for k, v in flat.items() if k in target}
  new = sorted(set(target) - set(taken))
  unused = sorted(set(flat) - set(target))
  logging.info(
    "init_from %s: loaded %d of %d encoder tensors; new (fresh init): %s; "
    "dropped from the checkpoint: %s (+ unused encoder tensors %s).%s",
    source,
    len(taken),
    len(target),
    new or "none",
    dropped_top or "none",
    unused or "none",
    ""
    if "pos_embed" in target
    else " Position embeddings are fixed 2-D sin-cos computed for this grid: "
    "a different image size needs no resampling.",
  )
  return _unflat(taken) if taken else {}


def load_encoder_params(init_from, abstract_encoder_params):
  """params['encoder'] of the checkpoint at `init_from` (workdir or step dir), numpy."""
  return extract_encoder(
    checkpoints.load_params(init_from, what="init_from"),
    abstract_encoder_params,
    source=str(init_from),
  )


def merge_encoder(fresh_params, loaded_encoder, key=ENCODER):
  """`fresh_params` with fresh_params[key] tensors replaced by the loaded ones.

  Loaded tensors take the fresh tensor's dtype and sharding. Tensors absent from
  `loaded_encoder` stay fresh; loaded tensors the model lacks raise ValueError (call
  extract_encoder first), as does any shape mismatch (named).
  """
  if key not in fresh_params:
    raise ValueError(
      f"merge_encoder: the model params have no {key!r} entry (keys: {sorted(fresh_params)})"
    )
  fresh = _flat(fresh_params[key])
  merged = dict(fresh)
  for name, value in _flat(loaded_encoder).items():
    if name not in fresh:
      raise ValueError(
        f"merge_encoder: loaded tensor {key}/{name} {np.shape(value)} does not exist in the model"
      )
    target = fresh[name]
    if tuple(np.shape(value)) != tuple(target.shape):
      raise ValueError(
        f"merge_encoder: shape mismatch for {key}/{name}: checkpoint "
        f"{tuple(np.shape(value))} vs model {tuple(target.shape)}. Check that "
        "config.model matches the pretraining encoder (width, depth, heads, patch)."
      )
    value = jnp.asarray(value, target.dtype)
    sharding = getattr(target, "sharding", None)
    merged[name] = jax.device_put(value, sharding) if sharding is not None else value
  out = dict(fresh_params)
  out[key] = _unflat(merged)
  return out


def init_from_merger(make_fresh_state, key=ENCODER, source=""):
  """`merge_params` for checkpoints.restore_or_initialize: a fresh state whose
  params[key] comes from the init_from checkpoint (heads stay new); `source` (the
  init_from path) is only logged."""

  def merge(loaded_params):
    state = make_fresh_state()
    encoder = extract_encoder(loaded_params, state.params[key], source=source)
    return state.replace(params=merge_encoder(state.params, encoder, key))

  return merge


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
