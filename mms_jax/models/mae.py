"""Masked autoencoder for text images: ViT encoder + light transformer decoder.

Two encoder modes:
  * 'mae' (default): hidden tokens are dropped before the encoder (every sample
    hides exactly `num_masked` patches, so shapes are static); the decoder gets
    the visible tokens back in place, learned mask tokens elsewhere, and predicts
    the pixels of every patch.
  * 'simmim': no token dropping; hidden patch embeddings are replaced by a
    learned mask token and a linear head predicts every patch from the encoder
    output. Any number of hidden patches per sample.

The loss is a pure function (`mae_loss`) outside the module.
Shapes: B batch, V views, L = gh * gw tokens, D width, P = ph * pw * C.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mms_jax.masking import ids_from_mask
from mms_jax.models import encoder_config
from mms_jax.models import vit


class Decoder(nn.Module):
  """MAE decoder: embed, un-shuffle with mask tokens, blocks, norm, pixel head."""

  width: int = 512
  depth: int = 8
  num_heads: int = 16
  patch_dim: int = 48  # P = ph * pw * C
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  scan_layers: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, ids_restore, grid):
    """x: [B, 1 + n_keep, D_enc] encoder output; ids_restore: int[B, L] -> [B, L, P]."""
    b, length = ids_restore.shape
    x = vit.dense(self.width, self.dtype, "embed")(x)  # [B, 1 + n_keep, Dd]
    mask_token = self.param(
      "mask_token", nn.initializers.normal(0.02), (1, 1, self.width), jnp.float32
    )
    n_hidden = length - (x.shape[1] - 1)
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n_hidden, self.width))
    tokens = jnp.concatenate([x[:, 1:], fill], axis=1)  # [visible..., hidden...]
    tokens = jnp.take_along_axis(tokens, ids_restore[..., None].astype(jnp.int32), axis=1)
    x = jnp.concatenate([x[:, :1], tokens], axis=1)  # [B, 1 + L, Dd], grid order
    x = x + vit.sincos_pos_embed_2d(self.width, grid, cls_token=True).astype(x.dtype)

    x, _ = vit.block_stack(
      x,
      depth=self.depth,
      num_heads=self.num_heads,
      name="blocks",
      scan=self.scan_layers,
      mlp_ratio=self.mlp_ratio,
      gelu=self.gelu,
      dtype=self.dtype,
      attention=self.attention,
    )
    x = vit.layer_norm(self.dtype, "norm")(x)
    # Every patch is predicted; if only hidden ones are needed (visible_weight 0),
    # gathering x[:, 1:] with ids_masked before this head is the place to do it.
    return vit.dense(self.patch_dim, self.dtype, "pred")(x[:, 1:])


class MAE(nn.Module):
  """Encoder + pretraining head.

  Attributes:
    encoder: the encoder's architecture (encoder_config.EncoderConfig; its default is
      configs/pretrain.py's encoder). channels: C of the input images (sets P).
    decoder_width/depth/num_heads: the MAE decoder (unused in 'simmim' mode).
    encoder_mode: 'mae' (token dropping) or 'simmim' (mask token in the encoder).
    gelu, dtype, scan_layers, attention: passed to every block (see vit.Encoder); a
      'conv' stem masks hidden patches inside the stem in both encoder modes; the
      decoder has no attention bias.
  """

  encoder: encoder_config.EncoderConfig = encoder_config.EncoderConfig()
  channels: int = 3
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  encoder_mode: str = "mae"
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  scan_layers: bool = False
  attention: str = "auto"

  def setup(self):
    self.vit = encoder_config.build(
      self.encoder,
      mlp_ratio=self.mlp_ratio,
      gelu=self.gelu,
      dtype=self.dtype,
      scan_layers=self.scan_layers,
      attention=self.attention,
      name="encoder",
    )
    patch = self.encoder.patch
    patch_dim = patch[0] * patch[1] * self.channels
    if self.encoder_mode == "mae":
      self.decoder = Decoder(
        self.decoder_width,
        self.decoder_depth,
        self.decoder_num_heads,
        patch_dim,
        self.mlp_ratio,
        self.gelu,
        self.dtype,
        self.scan_layers,
        self.attention,
      )
    elif self.encoder_mode == "simmim":
      width = self.encoder.dims()[0]
      self.simmim_mask_token = self.param(
        "simmim_mask_token", nn.initializers.normal(0.02), (1, 1, width), jnp.float32
      )
      self.simmim_pred = vit.dense(patch_dim, self.dtype, "simmim_pred")
    else:
      raise ValueError(f"encoder_mode must be 'mae' or 'simmim', got {self.encoder_mode!r}")

  def __call__(self, images, mask, *, num_masked=None, train=False):
    """Predicts the pixels of every patch.

    Args:
      images: [B, H, W, C].
      mask: bool[B, L] (True = hidden), or bool[B, V, L] for V masked views of
        each image (run as a batch of B * V).
      num_masked: static int, hidden patches per row ('mae' mode; ignored by 'simmim').
      train: passed to the encoder.

    Returns:
      pred: [B, L, P] (or [B, V, L, P]), patches in patchify order.
      aux: {'encoded': encoder output [B(*V), 1 + n, D], 'mask': mask as given}.
    """
    multi_view = mask.ndim == 3
    if multi_view:
      b, v, length = mask.shape
      images = jnp.repeat(images, v, axis=0)  # row b * V + j = view j of image b
      mask = mask.reshape(b * v, length)
    grid = vit.grid_shape(images.shape[1:3], self.encoder.patch)

    if self.encoder_mode == "mae":
      if num_masked is None:
        raise ValueError("encoder_mode 'mae' needs a static num_masked")
      ids_keep, _, ids_restore = ids_from_mask(mask, num_masked)
      encoded, _ = self.vit(images, ids_keep, train=train)
      pred = self.decoder(encoded, ids_restore, grid)
    else:
      encoded, _ = self.vit(
        images, mask=mask.astype(bool), mask_token=self.simmim_mask_token, train=train
      )
      pred = self.simmim_pred(encoded[:, 1:])

    if multi_view:
      pred = pred.reshape(b, v, *pred.shape[1:])
    return pred, {"encoded": encoded}


def mae_loss(images, pred, mask, patch, *, norm_pix=True, visible_weight=0.0, eps=1e-6):
  """Pixel-reconstruction loss of MAE, optionally also on visible patches.

    t = patchify(images); with norm_pix, t = (t - mean) / sqrt(var + eps) per patch
        (mean and unbiased variance over the P values of that patch);
    e[l] = mean over P of (pred[l] - t[l])^2;
    loss = sum(e * m) / sum(m) + visible_weight * sum(e * (1 - m)) / sum(1 - m),
  sums over batch and tokens (MAE's weighting). With views, this is computed per
  view and averaged over views.

  Args:
    images: [B, H, W, C].
    pred: [B, L, P] or [B, V, L, P].
    mask: bool/float [B, L] or [B, V, L], 1 = hidden.
    patch: (ph, pw).

  Returns:
    loss: float32 scalar.
    aux: {'per_sample': [B] the same formula per sample (mean over views),
          'hidden': scalar, 'visible': scalar (the two unweighted terms),
          'per_view': [B, V] if views were given}.
  """
  target = vit.patchify(images.astype(jnp.float32), patch)  # [B, L, P]
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + eps)
  multi_view = pred.ndim == 4
  if not multi_view:
    pred, mask = pred[:, None], mask[:, None]
  m = mask.astype(jnp.float32)  # [B, V, L]
  err = jnp.mean((pred.astype(jnp.float32) - target[:, None]) ** 2, axis=-1)  # [B, V, L]

  def term(weights, axes):
    return jnp.sum(err * weights, axis=axes) / jnp.maximum(jnp.sum(weights, axis=axes), 1.0)

  hidden_v, visible_v = term(m, (0, 2)), term(1.0 - m, (0, 2))  # [V]
  loss = jnp.mean(hidden_v + visible_weight * visible_v)
  per_view = term(m, 2) + visible_weight * term(1.0 - m, 2)  # [B, V]
  aux = {
    "per_sample": per_view.mean(axis=1),
    "hidden": hidden_v.mean(),
    "visible": visible_v.mean(),
  }
  if multi_view:
    aux["per_view"] = per_view
  return loss, aux
