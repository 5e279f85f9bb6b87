"""Putting pretrained weights into a model: the one merge every program uses.

  merge(fresh_params, loaded_params, *, strict=True, source="") -> params
      `fresh_params` (a model's initialised params, {'encoder': ..., <head>: ...}) with
      the checkpoint's tensors put in place, each with the fresh tensor's dtype and
      sharding. The encoder always comes from the checkpoint's encoder: scanned and
      unscanned block layouts convert, a learned `pos_embed` is resampled to the new
      grid (or dropped when the model computes sin-cos embeddings).
      strict=True  (fine-tuning, the probe): only the encoder is loaded, every other
                   part (heads) stays fresh; a shape mismatch raises ValueError naming
                   the tensor and the config fields to check.
      strict=False (continued pretraining): every tensor whose path and shape match is
                   loaded, the MAE decoder included; the rest stays fresh.
      The log lists what was loaded, what is new and what was dropped.
  extract_encoder(loaded_params, abstract_encoder_params, source="") -> encoder tensors
      The checkpoint's encoder in the layout of the model's encoder (numpy).

Position embeddings: vit.Encoder uses fixed 2-D sin-cos embeddings computed at trace
time for the actual patch grid, so an encoder pretrained on one image size fine-tunes
on another without any resampling. Only checkpoints that carry a learned `pos_embed`
(e.g. converted from another code base) need it: when the model has one too, it is
resized bilinearly to the new grid (resample_pos_embed); otherwise it is dropped.
"""

import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mms_jax.models import vit

ENCODER = "encoder"


def flatten(tree):
  """{'a/b': leaf} of a nested params tree."""
  return flax.traverse_util.flatten_dict(vit._to_dict(tree), sep="/")


def unflatten(flat):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


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


def _checkpoint_encoder(loaded, source):
  """(the checkpoint's encoder tree, its other top-level names)."""
  if ENCODER in loaded:
    return loaded[ENCODER], sorted(k for k in loaded if k != ENCODER)
  if "patch_embed" in loaded or "stem" in loaded:  # a bare encoder tree
    return loaded, []
  raise ValueError(
    f"init_from={source!r}: no '{ENCODER}' params in the checkpoint "
    f"(top-level keys: {sorted(loaded)})"
  )


def extract_encoder(loaded_params, abstract_encoder_params, source=""):
  """The checkpoint's encoder tensors that the model's encoder has, in its layout.

  Args:
    loaded_params: params of a checkpoint: {'encoder': ..., 'decoder' | head: ...}
      or a bare encoder tree.
    abstract_encoder_params: the model's encoder params (arrays or ShapeDtypeStructs);
      decides the layout (scanned or not).
    source: checkpoint path, for messages.

  Returns:
    {flat name: numpy array} of every tensor of the checkpoint's encoder, named as in
    the model's layout (shapes are checked by merge).
  """
  encoder, _ = _checkpoint_encoder(vit._to_dict(loaded_params), source)
  target = flatten(abstract_encoder_params)
  # Scanned <-> unscanned block layouts convert losslessly.
  scanned = any(k.startswith("blocks/") for k in target)
  if scanned and "blocks" not in encoder and "blocks_0" in encoder:
    encoder = vit.scan_params(encoder)
  elif not scanned and "blocks" in encoder and "blocks_0" not in encoder:
    encoder = vit.unscan_params(encoder)
  flat = {k: np.asarray(v) for k, v in flatten(encoder).items()}
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
  return flat


def put(value, target):
  """`value` with the dtype and sharding of the fresh tensor `target`."""
  value = jnp.asarray(value, target.dtype)
  sharding = getattr(target, "sharding", None)
  return jax.device_put(value, sharding) if sharding is not None else value


def merge(fresh_params, loaded_params, *, strict=True, source=""):
  """`fresh_params` with the pretrained tensors of `loaded_params` (module docstring)."""
  if ENCODER not in fresh_params:
    raise ValueError(f"the model params have no {ENCODER!r} entry (keys: {sorted(fresh_params)})")
  loaded = vit._to_dict(loaded_params)
  _, other_parts = _checkpoint_encoder(loaded, source)
  fresh = {f"{ENCODER}/{k}": v for k, v in flatten(fresh_params[ENCODER]).items()}
  candidates = {
    f"{ENCODER}/{k}": v for k, v in extract_encoder(loaded, fresh_params[ENCODER], source).items()
  }
  if not strict:
    fresh.update(
      {k: v for k, v in flatten(fresh_params).items() if not k.startswith(ENCODER + "/")}
    )
    candidates.update({k: v for k, v in flatten(loaded).items() if not k.startswith(ENCODER + "/")})
  merged, mismatched, taken = dict(fresh), [], []
  for name, value in candidates.items():
    if name not in fresh:
      continue
    if tuple(np.shape(value)) != tuple(fresh[name].shape):
      if strict:
        raise ValueError(
          f"init_from={source!r}: shape mismatch for {name}: checkpoint "
          f"{tuple(np.shape(value))} vs model {tuple(fresh[name].shape)}. Check that "
          "config.model matches the pretraining encoder (width, depth, heads, patch)."
        )
      mismatched.append(name)
    else:
      merged[name] = put(value, fresh[name])
      taken.append(name)
  logging.info(
    "init_from %s (%s): loaded %d of %d tensors; new (fresh init): %s; shape differs "
    "(kept fresh): %s; dropped from the checkpoint: %s.",
    source,
    "strict: the encoder only" if strict else "every tensor whose path and shape match",
    len(taken),
    len(fresh),
    sorted(set(fresh) - set(taken)) or "none",
    mismatched or "none",
    sorted(k for k in candidates if k not in fresh) + (other_parts if strict else []) or "none",
  )
  unflat = unflatten(merged)
  return {**fresh_params, ENCODER: unflat[ENCODER]} if strict else unflat
