"""Dense-prediction models: text segmentation and text-image super-resolution.

Both are a ViT encoder over all tokens (no masking) plus a light transformer head that
predicts one patch of output per token (docs/method.md §4):

  Segmenter:      images [B, H, W, 3]      -> foreground logits [B, H, W]
  SuperResolver:  lr_images [B, h, w, 3]   -> HR images [B, h * s, w * s, 3]

Parameters: {'encoder': vit.Encoder params (same names as in pretraining, so a
pretraining checkpoint's encoder loads as is), 'head': DenseHead params}.
Shapes: B batch, L = gh * gw tokens, D encoder width, Dh head width.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mms_jax.models import encoder_config
from mms_jax.models import vit


class DenseHead(nn.Module):
  """Linear embed, fixed 2-D sin-cos positions, `depth` blocks, norm, per-token linear.

  Attributes:
    out_dim: values predicted per token (ph * pw * channels).
    width, depth, num_heads: the head transformer (paper: 384, 3, 2).
    zero_init: start the output layer at zero (used when the prediction is a
      residual, so training starts from the identity).
  """

  out_dim: int
  width: int = 384
  depth: int = 3
  num_heads: int = 2
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x, grid, pixels=None):
    """x: [B, 1 + L, D] encoder output (cls first); grid: (gh, gw); pixels: optional
    [B, L, P], each token's input patch, embedded and added to its token (the pixel
    shortcut) -> [B, L, out_dim]."""
    x = vit.dense(self.width, self.dtype, "embed")(x)
    if pixels is not None:
      shortcut = vit.dense(self.width, self.dtype, "pixel_embed")(pixels.astype(self.dtype))
      x = x.at[:, 1:].add(shortcut)
    x = x + vit.sincos_pos_embed_2d(self.width, grid, cls_token=True).astype(x.dtype)
    x, _ = vit.block_stack(
      x,
      depth=self.depth,
      num_heads=self.num_heads,
      name="blocks",
      scan=False,
      mlp_ratio=self.mlp_ratio,
      gelu=self.gelu,
      dtype=self.dtype,
    )
    x = vit.layer_norm(self.dtype, "norm")(x[:, 1:])  # the cls token only gave context
    if self.zero_init:
      pred = nn.Dense(
        self.out_dim,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros,
        name="pred",
      )
    else:
      pred = vit.dense(self.out_dim, self.dtype, "pred")
    return pred(x).astype(jnp.float32)


class _DenseModel(nn.Module):
  """Fields shared by both models: the encoder (encoder_config.EncoderConfig; its default
  is configs/pretrain.py's) and the head."""

  encoder: encoder_config.EncoderConfig = encoder_config.EncoderConfig()
  head_width: int = 384
  head_depth: int = 3
  head_num_heads: int = 2
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  scan_layers: bool = False
  # The head also sees each token's input pixels (a skip past the encoder): the pixel
  # detail a conv stem does not pass on (docs/segmentation.md).
  pixel_shortcut: bool = False

  @property
  def patch(self):
    return self.encoder.patch

  @nn.nowrap
  def _encoder(self):
    return encoder_config.build(
      self.encoder,
      mlp_ratio=self.mlp_ratio,
      gelu=self.gelu,
      dtype=self.dtype,
      scan_layers=self.scan_layers,
      name="encoder",
    )

  @nn.nowrap
  def _head(self, channels, zero_init=False):
    return DenseHead(
      self.patch[0] * self.patch[1] * channels,
      self.head_width,
      self.head_depth,
      self.head_num_heads,
      self.mlp_ratio,
      self.gelu,
      self.dtype,
      zero_init,
      name="head",
    )


class Segmenter(_DenseModel):
  """Text foreground segmentation: one ph x pw patch of logits per token."""

  @nn.compact
  def __call__(self, images, *, train=False):
    """images: [B, H, W, 3] in [-1, 1].

    Returns:
      logits: float32[B, H, W] (sigmoid -> foreground probability).
      aux: {'encoded': [B, 1 + L, D]}.
    """
    grid = vit.grid_shape(images.shape[1:3], self.patch)
    encoded, _ = self._encoder()(images, train=train)
    pixels = vit.patchify(images, self.patch) if self.pixel_shortcut else None
    patches = self._head(1)(encoded, grid, pixels)  # [B, L, ph * pw]
    logits = vit.unpatchify(patches, self.patch, grid, 1)[..., 0]
    return logits, {"encoded": encoded}


def upsample(lr_images, hr_size, method="bicubic"):
  """lr_images: [B, h, w, C] -> [B, H, W, C] (jax.image.resize, antialiased)."""
  b, _, _, c = lr_images.shape
  return jax.image.resize(lr_images.astype(jnp.float32), (b, *hr_size, c), method)


class SuperResolver(_DenseModel):
  """Text-image super-resolution: LR -> bicubic to H x W -> encoder -> HR patches.

  Attributes (besides the shared ones):
    scale: HR size = scale x LR size (TextZoom: 2).
    residual: the head predicts HR - bicubic(LR) (its output layer starts at zero,
      so an untrained model returns the bicubic image); False predicts HR pixels.
  """

  scale: int = 2
  residual: bool = True

  @nn.compact
  def __call__(self, lr_images, *, train=False):
    """lr_images: [B, h, w, 3] in [-1, 1].

    Returns:
      sr: float32[B, h * scale, w * scale, 3], unclipped ([-1, 1] is the image range).
      aux: {'upsampled': the bicubic input [B, H, W, 3], 'encoded': [B, 1 + L, D]}.
    """
    hr_size = (lr_images.shape[1] * self.scale, lr_images.shape[2] * self.scale)
    up = upsample(lr_images, hr_size)
    grid = vit.grid_shape(hr_size, self.patch)
    encoded, _ = self._encoder()(up, train=train)
    pixels = vit.patchify(up, self.patch) if self.pixel_shortcut else None
    patches = self._head(up.shape[-1], zero_init=self.residual)(encoded, grid, pixels)
    sr = vit.unpatchify(patches, self.patch, grid, up.shape[-1])
    if self.residual:
      sr = sr + up
    return sr, {"upsampled": up, "encoded": encoded}


def from_config(program, m):
  """The Segmenter or SuperResolver of a dense run's `model` config (ConfigDict or the
  dict of its config.json): program 'segmentation' or 'super_resolution'."""
  classes = {"segmentation": Segmenter, "super_resolution": SuperResolver}
  if program not in classes:
    raise ValueError(f"program {program!r} is not a dense program: {sorted(classes)}")
  options = (
    {"scale": 2, "residual": m.get("residual", True)} if program == "super_resolution" else {}
  )
  return classes[program](
    encoder=encoder_config.EncoderConfig.of(encoder_config.of_model(m)),
    head_width=m["head_width"],
    head_depth=m["head_depth"],
    head_num_heads=m["head_num_heads"],
    pixel_shortcut=m.get("pixel_shortcut", False),
    gelu=m.get("gelu", "erf"),
    dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.get("dtype", "float32")],
    scan_layers=m.get("scan_layers", False),
    **options,
  )
