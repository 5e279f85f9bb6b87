"""Vision Transformer encoder for text images (any image size, any patch shape).

Conventions (see docs/model.md for the parameter-name table):
  * images are NHWC: `images: [B, H, W, C]`.
  * the patch grid is `grid = (gh, gw) = (H // ph, W // pw)`; tokens are listed
    row-major over the grid (token index `i * gw + j` is grid row i, column j).
  * inside a patch, pixels are flattened in (ph, pw, C) order, the same order the
    MAE PyTorch code uses for its (p, q, c) patchify.
  * the position embedding is fixed 2-D sin-cos (not a parameter), recomputed
    for the actual grid at trace time.

Shapes in docstrings: B batch, L = gh * gw tokens, D width, P = ph * pw * C.
"""

from collections.abc import Sequence
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mms_jax.models import matmul

# name -> (width, depth, num_heads); MLP ratio 4 everywhere.
VARIANTS = {
  "tiny": (64, 2, 2),
  "Ti": (192, 12, 3),
  "S": (384, 12, 6),
  "B": (768, 12, 12),
}


def grid_shape(image_hw, patch):
  """(H, W), (ph, pw) -> (gh, gw); raises if the image is not tiled exactly."""
  (h, w), (ph, pw) = image_hw, patch
  if h % ph or w % pw:
    raise ValueError(f"image {h}x{w} is not divisible by patch {ph}x{pw}")
  return h // ph, w // pw


def patchify(images, patch):
  """images: [B, H, W, C] -> patches: [B, gh * gw, ph * pw * C].

  Tokens are row-major over the grid; each patch is flattened as (ph, pw, C).
  """
  b, h, w, c = images.shape
  ph, pw = patch
  gh, gw = grid_shape((h, w), patch)
  x = images.reshape(b, gh, ph, gw, pw, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, ph, pw, C]
  return x.reshape(b, gh * gw, ph * pw * c)


def unpatchify(patches, patch, grid, channels):
  """patches: [B, gh * gw, ph * pw * C] -> images: [B, gh * ph, gw * pw, C]."""
  (ph, pw), (gh, gw) = patch, grid
  b = patches.shape[0]
  x = patches.reshape(b, gh, gw, ph, pw, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, ph, gw, pw, C]
  return x.reshape(b, gh * ph, gw * pw, channels)


def _sincos_1d(dim, pos):
  """pos: [M] -> [M, dim] = [sin(pos * omega), cos(pos * omega)], omega: [dim/2]."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = pos.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(width, grid, cls_token=False):
  """Fixed 2-D sin-cos position embedding, MAE convention, rectangular grid.

  Token t = i * gw + j (grid row i, column j) gets
    emb[t, :D/2] = sincos_1d(D/2, j)    # column (w) coordinate first, as MAE does
    emb[t, D/2:] = sincos_1d(D/2, i)    # then the row (h) coordinate
  where sincos_1d(d, p) = [sin(p * w_k), cos(p * w_k)], w_k = 10000^(-k / (d/2)),
  k = 0 .. d/2 - 1. The cls entry (if any) is all zeros and comes first. For a
  square grid this equals MAE / HF ViTMAE `get_2d_sincos_pos_embed`.

  Returns: float32[1, (1 +) gh * gw, width] (a numpy array: a trace-time constant).
  """
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width % 4 == 0, got {width}")
  gh, gw = grid
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")  # [gh, gw]
  emb = np.concatenate([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, width)), emb], axis=0)
  return emb[None].astype(np.float32)


def dense(features, dtype, name):
  """nn.Dense with xavier/zero init, float32 parameters (bf16 on CPU: matmul.py)."""
  return matmul.Dense(features, dtype=dtype, name=name)


def layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


ATTENTION_IMPLS = ("auto", "chunked", "plain", "fused")
# f32 logits per chunk of the 'chunked' attention (docs/performance.md, 3.1 and 6.2)
ATTENTION_CHUNK_BYTES = 2**24


def plain_attention(q, k, v, bias=None):
  """softmax(q k^T + bias) v, q already scaled; q, k, v: [B, H, T, hd] -> [B, H, T, hd].

  bias: None or float32 broadcastable to [B, H, T, T] (a constant: no gradient flows
  into it). The straightforward formulation (autodiff through einsum + softmax,
  softmax in float32): the reference the other implementation is tested against.
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + jax.lax.stop_gradient(bias)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


def _einsum_f32(spec, a, b):
  """einsum accumulated in and returned as float32: for bf16 operands the one form of
  dot that XLA:CPU runs on bf16 units (models/matmul.py)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(q, k, bias):
  s = _einsum_f32("...qd,...kd->...qk", q, k)
  return s if bias is None else s + bias


def _attention_chunk(q, k, v, bias=None):
  """One chunk of chunked_attention's forward: ([..., T, hd] out, [..., T, 1] lse)."""
  s = _scores(q, k, bias)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  out = _einsum_f32("...qk,...kd->...qd", (e / denom).astype(v.dtype), v).astype(v.dtype)
  return out, m + jnp.log(denom)


def _attention_chunk_grads(q, k, v, out, lse, dout, bias=None):
  """One chunk of the backward pass (probabilities recomputed from lse)."""
  p = jnp.exp(_scores(q, k, bias) - lse)
  dv = _einsum_f32("...qk,...qd->...kd", p.astype(dout.dtype), dout).astype(v.dtype)
  dp = _einsum_f32("...qd,...kd->...qk", dout, v)
  # rowsum(p * dp) = rowsum(dout * out): a [T, hd] product instead of [T, T].
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p * (dp - delta)).astype(q.dtype)
  dq = _einsum_f32("...qk,...kd->...qd", ds, k).astype(q.dtype)
  dk = _einsum_f32("...qk,...qd->...kd", ds, q).astype(k.dtype)
  return dq, dk, dv


def _heads_per_chunk(shape, chunk_bytes):
  """Largest divisor g of H with g * B * T * T * 4 bytes <= chunk_bytes (at least 1)."""
  h, b, t, _ = shape
  fits = [g for g in range(1, h + 1) if h % g == 0 and g * b * t * t * 4 <= chunk_bytes]
  return max(fits, default=1)


def _map_chunks(fn, g, *xs):
  """fn over groups of g heads ([H, ...] -> [H // g, g, ...]); one call if g == H."""
  h = xs[0].shape[0]
  if g == h:
    return fn(*xs)
  split = [x.reshape(h // g, g, *x.shape[1:]) for x in xs]
  outs = jax.lax.map(lambda args: fn(*args), split)
  return jax.tree.map(lambda y: y.reshape(h, *y.shape[2:]), outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q, k, v, chunk_bytes=ATTENTION_CHUNK_BYTES, bias=None):
  """softmax(q k^T + bias) v, q already scaled; q, k, v: [H, B, T, hd] -> [H, B, T, hd].

  The same function as plain_attention (heads-first layout; bias None or float32
  [H, B or 1, T, T], a constant with a zero cotangent), computed a few heads
  at a time (`lax.map` over groups of heads whose [B, T, T] logits fit in
  `chunk_bytes`), with a hand-written backward pass that keeps only out and the
  log-sum-exp and recomputes the probabilities chunk by chunk. On CPU this keeps
  the [T, T] matrices in cache instead of writing several [B, H, T, T] arrays to
  memory (docs/performance.md). The loop runs over heads, never over the batch,
  so a batch split over devices stays split.
  """
  return _chunked_forward(q, k, v, chunk_bytes, bias)[0]


def _chunked_forward(q, k, v, chunk_bytes, bias=None):
  g = _heads_per_chunk(q.shape, chunk_bytes)
  extra = () if bias is None else (bias,)
  out, lse = _map_chunks(_attention_chunk, g, q, k, v, *extra)
  return out, (q, k, v, out, lse, bias)


def _chunked_backward(chunk_bytes, residuals, dout):
  *residuals, bias = residuals
  g = _heads_per_chunk(residuals[0].shape, chunk_bytes)
  extra = () if bias is None else (bias,)
  dq, dk, dv = _map_chunks(_attention_chunk_grads, g, *residuals, dout, *extra)
  return dq, dk, dv, (None if bias is None else jnp.zeros_like(bias))


chunked_attention.defvjp(_chunked_forward, _chunked_backward)


ATTENTION_BIASES = ("none", "alibi_2d")


def alibi_slopes(num_heads):
  """ALiBi's geometric head slopes 2^(-8 (h + 1) / H), h = 0 .. H - 1."""
  return 2.0 ** (-8.0 * (np.arange(num_heads) + 1) / num_heads)


def alibi_2d_bias(grid, patch, num_heads, ids_keep=None):
  """2-D ALiBi distance bias: float32 [H, B or 1, 1 + n, 1 + n] (cls token first).

  bias[h, b, i, j] = -slope_h * |pos_i - pos_j|, with pos the patch centre in units of
  the patch's smaller side (so 8x4 patches are two units apart vertically) and
  slope_h = alibi_slopes(H); the cls row and column are 0. With ids_keep [B, n] only
  the kept tokens' coordinates are used: the bias depends on where the visible
  patches are, never on what hidden patches contain.
  """
  (gh, gw), (ph, pw) = grid, patch
  unit = float(min(ph, pw))
  rows, cols = np.meshgrid(np.arange(gh) * ph / unit, np.arange(gw) * pw / unit, indexing="ij")
  coords = jnp.asarray(np.stack([rows.ravel(), cols.ravel()], -1), jnp.float32)  # [L, 2]
  coords = coords[None] if ids_keep is None else coords[ids_keep]  # [B or 1, n, 2]
  dist = jnp.sqrt(jnp.sum((coords[:, :, None] - coords[:, None, :]) ** 2, -1))
  dist = jnp.pad(dist, ((0, 0), (1, 0), (1, 0)))  # cls: no bias
  slopes = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
  return -slopes[:, None, None, None] * dist[None]


def resolve_attention(impl):
  """'auto' -> 'chunked' on CPU, 'fused' on GPU (jax.nn.dot_product_attention: cuDNN's
  flash kernel where it applies), 'plain' elsewhere (XLA fuses attention on TPU)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl == "auto":
    return {"cpu": "chunked", "gpu": "fused"}.get(jax.default_backend(), "plain")
  return impl


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm / MAE layout).

  qkv/kernel: [D, 3D]; its output features split as (3, heads, head_dim).
  attention: 'auto' | 'chunked' | 'plain' (see resolve_attention); the same
  function and parameters either way.
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, bias=None):
    """x: [B, N, D] -> [B, N, D]; bias: None or float32 [heads, B or 1, N, N] added to
    the attention logits (e.g. alibi_2d_bias)."""
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")
    hd = d // self.num_heads
    qkv = dense(3 * d, self.dtype, "qkv")(x)
    # Split before any transpose: the backward then concatenates dq, dk, dv once
    # instead of padding each to the full [B, N, 3, heads, hd] (docs/performance.md).
    q, k, v = (t.reshape(b, n, self.num_heads, hd) for t in jnp.split(qkv, 3, axis=-1))
    impl = resolve_attention(self.attention)
    if impl == "plain":
      q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, N, hd]
      plain_bias = None if bias is None else bias.transpose(1, 0, 2, 3)
      out = plain_attention(q * (hd**-0.5), k, v, plain_bias).transpose(0, 2, 1, 3)
    elif impl == "fused":  # [B, N, heads, hd] in and out: no transposes
      fused_bias = (
        None
        if bias is None
        else jax.lax.stop_gradient(bias.transpose(1, 0, 2, 3).astype(qkv.dtype))
      )
      out = jax.nn.dot_product_attention(q, k, v, bias=fused_bias, scale=hd**-0.5)
    else:
      q, k, v = (t.transpose(2, 0, 1, 3) for t in (q, k, v))  # [heads, B, N, hd]: loop over heads
      out = chunked_attention(q * (hd**-0.5), k, v, ATTENTION_CHUNK_BYTES, bias).transpose(
        1, 2, 0, 3
      )
    return dense(d, self.dtype, "proj")(out.reshape(b, n, d))


class Mlp(nn.Module):
  """fc1 (D -> ratio * D), GELU, fc2 (-> D)."""

  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.gelu not in ("erf", "tanh"):
      raise ValueError(f"gelu must be 'erf' or 'tanh', got {self.gelu!r}")
    d = x.shape[-1]
    x = dense(self.mlp_ratio * d, self.dtype, "fc1")(x)
    x = nn.gelu(x, approximate=(self.gelu == "tanh"))  # 'erf' = exact, as PyTorch default
    return dense(d, self.dtype, "fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  attention: str = "auto"

  def setup(self):
    self.norm1 = layer_norm(self.dtype, "norm1")
    self.attn = Attention(self.num_heads, self.dtype, self.attention, name="attn")
    self.norm2 = layer_norm(self.dtype, "norm2")
    self.mlp = Mlp(self.mlp_ratio, self.gelu, self.dtype, name="mlp")

  def forward(self, x, bias=None):
    x = x + self.attn(self.norm1(x), bias)
    return x + self.mlp(self.norm2(x))

  def __call__(self, x, bias=None):
    """x: [B, N, D] -> [B, N, D]; bias: optional attention-logit bias (Attention)."""
    return self.forward(x, bias)


class _ScanBlock(Block):
  """Block with the (carry, xs) -> (carry, ys) signature nn.scan wants; the carry is
  (x, attention bias), the bias passed through unchanged."""

  keep: bool = False

  def __call__(self, carry, _):
    x, bias = carry
    x = self.forward(x, bias)
    return (x, bias), (x if self.keep else None)


def block_stack(x, *, depth, num_heads, name, scan, keep=False, bias=None, **block_kw):
  """Applies `depth` Blocks; call from inside a compact method.

  Params live at `{name}_{i}/...` (unscanned) or `{name}/...` with a leading
  [depth] axis (scanned). bias: an attention-logit bias every block adds (or None).
  Returns (x: [B, N, D], per-block outputs [depth, B, N, D] if keep else None).
  """
  if scan:
    stack = nn.scan(
      _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth
    )
    (x, _), per_block = stack(num_heads=num_heads, keep=keep, name=name, **block_kw)(
      (x, bias), None
    )
    return x, per_block
  outs = []
  for i in range(depth):
    x = Block(num_heads=num_heads, name=f"{name}_{i}", **block_kw)(x, bias)
    outs.append(x)
  return x, (jnp.stack(outs) if keep else None)


class _PatchEmbed(nn.Module):
  """images: [B, H, W, C] -> [B, L, D]; params kernel [ph, pw, C, D], bias [D]."""

  width: int
  patch: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    ph, pw = self.patch
    c = images.shape[-1]

    def init(key, shape, dtype=jnp.float32):  # xavier over the flattened [P, D] view, like MAE
      return nn.initializers.xavier_uniform()(key, (ph * pw * c, self.width), dtype).reshape(shape)

    kernel = self.param("kernel", init, (ph, pw, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    x = patchify(images.astype(self.dtype), self.patch)
    kernel = kernel.reshape(ph * pw * c, self.width).astype(self.dtype)
    return matmul.affine(x, kernel, bias.astype(self.dtype))


STEMS = ("patch", "conv")


def stem_strides(patch):
  """(ph, pw) -> the per-stage (sh, sw) strides of the conv stem: halve each side per
  stage until it is 1, so the stages multiply out to the patch. Both sides must be
  powers of two."""
  ph, pw = patch
  for side in (ph, pw):
    if side < 1 or side & (side - 1):
      raise ValueError(f"stem='conv' needs power-of-two patch sides, got {ph}x{pw}")
  strides = []
  while ph > 1 or pw > 1:
    strides.append((2 if ph > 1 else 1, 2 if pw > 1 else 1))
    ph, pw = max(ph // 2, 1), max(pw // 2, 1)
  return tuple(strides)


def default_stem_channels(width, num_stages):
  """Channels of each conv stage: doubling towards width / 2 (e.g. 32, 64 for 128)."""
  return tuple(max(width // 2 ** (num_stages - i), 8) for i in range(num_stages))


class ConvStem(nn.Module):
  """Masked convolutional stem: images [B, H, W, C] -> patch tokens [B, L, D].

  One 3x3 conv + LayerNorm + GELU per stage, each stage halving the sides of the
  patch that are still > 1 (stem_strides), then a linear projection of each grid cell
  to D. A stage's output pixels lie inside one patch (the strides tile the patch), so
  `visible` [B, L] (True = visible patch) is applied at every stage, the input
  included: a hidden patch's pixels and features are zero before every conv, and no
  visible token can depend on a hidden pixel (ConvMAE's masked convolution). With
  visible=None every patch is visible (fine-tuning).
  Params: stage_{i}_conv, stage_{i}_norm, proj.
  """

  width: int
  patch: tuple[int, int]
  channels: tuple[int, ...] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, visible=None):
    strides = stem_strides(self.patch)
    channels = tuple(self.channels) or default_stem_channels(self.width, len(strides))
    if len(channels) != len(strides):
      raise ValueError(
        f"stem_channels={channels} has {len(channels)} stages; patch "
        f"{self.patch} needs {len(strides)} (one per halving)"
      )
    gh, gw = grid_shape(images.shape[1:3], self.patch)
    x = images.astype(self.dtype)

    def apply_mask(x):
      if visible is None:
        return x
      b, h, w, _ = x.shape
      cells = visible.reshape(b, gh, 1, gw, 1).astype(x.dtype)
      cells = jnp.broadcast_to(cells, (b, gh, h // gh, gw, w // gw))
      return x * cells.reshape(b, h, w, 1)

    x = apply_mask(x)
    for i, (stride, features) in enumerate(zip(strides, channels)):
      x = nn.Conv(
        features,
        (3, 3),
        strides=stride,
        padding="SAME",
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f"stage_{i}_conv",
      )(x)
      x = nn.gelu(layer_norm(self.dtype, f"stage_{i}_norm")(x), approximate=False)
      x = apply_mask(x)
    x = x.reshape(x.shape[0], gh * gw, x.shape[-1])  # [B, L, C_last], row-major
    return dense(self.width, self.dtype, "proj")(x)


class Encoder(nn.Module):
  """ViT encoder with a cls token and fixed 2-D sin-cos position embedding.

  Attributes:
    variant: key of VARIANTS; `width`, `depth`, `num_heads` override it if set.
    patch: (ph, pw), may be non-square (e.g. (32, 4) column patches).
    mlp_ratio: MLP hidden size / width.
    gelu: 'erf' (exact, matches PyTorch) or 'tanh' (approximate, faster on CPU).
    dtype: compute dtype (e.g. jnp.bfloat16); params are always float32.
    scan_layers: nn.scan over blocks (params stacked under `blocks`); see
      scan_params / unscan_params to convert checkpoints.
    return_blocks: put every block's output in aux['blocks'].
    attention: 'auto' | 'chunked' | 'plain' attention formulation (Attention).
    stem: 'patch' (the paper's ViT: a linear map of each patch) or 'conv' (ConvStem:
      stride-2 3x3 convs onto the same grid, hidden patches masked at every stage).
    stem_channels: ConvStem stage widths (() = default_stem_channels).
    attention_bias: 'none' (the paper's ViT) or 'alibi_2d' (alibi_2d_bias: a fixed
      per-head penalty on the distance between patches, from the kept tokens'
      coordinates only, so it works with token dropping).
  """

  variant: str | None = "S"
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  patch: tuple[int, int] = (4, 4)
  mlp_ratio: int = 4
  gelu: str = "erf"
  dtype: Any = jnp.float32
  scan_layers: bool = False
  return_blocks: bool = False
  attention: str = "auto"
  stem: str = "patch"
  stem_channels: tuple[int, ...] = ()
  attention_bias: str = "none"

  def dims(self):
    """(width, depth, num_heads) after applying overrides to the variant."""
    base = VARIANTS[self.variant] if self.variant else (None, None, None)
    dims = tuple(
      o if o is not None else v for o, v in zip((self.width, self.depth, self.num_heads), base)
    )
    if None in dims:
      raise ValueError(f"incomplete encoder dims {dims}: set variant or width/depth/num_heads")
    return dims

  @nn.compact
  def __call__(self, images, ids_keep=None, *, mask=None, mask_token=None, train=False):
    """Encodes the visible patches of `images`.

    Args:
      images: [B, H, W, C].
      ids_keep: int[B, n_keep] visible token indices (from masking.ids_from_mask);
        None = all L tokens (fine-tuning, SimMIM).
      mask: bool[B, L], SimMIM only: True tokens have their patch embedding
        replaced by `mask_token` ([1, 1, D] or [D]) before the position embedding.
      train: unused (no dropout); kept for a uniform module API.

    Returns:
      x: [B, 1 + n_keep, D], final-LayerNorm output, cls token first.
      aux: {'pre_norm': [B, 1 + n_keep, D],
            'blocks': [depth, B, 1 + n_keep, D] if return_blocks}.
    """
    del train
    width, depth, num_heads = self.dims()
    grid = grid_shape(images.shape[1:3], self.patch)
    if self.stem == "patch":
      x = _PatchEmbed(width, self.patch, self.dtype, name="patch_embed")(images)  # [B, L, D]
    elif self.stem == "conv":
      visible = None
      if mask is not None:
        visible = ~mask.astype(bool)
      elif ids_keep is not None:
        visible = jnp.zeros((images.shape[0], grid[0] * grid[1]), bool)
        visible = visible.at[jnp.arange(images.shape[0])[:, None], ids_keep].set(True)
      x = ConvStem(width, self.patch, tuple(self.stem_channels), self.dtype, name="stem")(
        images, visible
      )
    else:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")

    if mask is not None:
      token = jnp.reshape(mask_token, (1, 1, width)).astype(x.dtype)
      x = jnp.where(mask[..., None], token, x)
    pos = sincos_pos_embed_2d(width, grid, cls_token=True)
    x = x + pos[:, 1:].astype(x.dtype)
    if ids_keep is not None:
      x = jnp.take_along_axis(x, ids_keep[..., None].astype(jnp.int32), axis=1)

    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, width), jnp.float32)
    cls = (cls + pos[:, :1]).astype(x.dtype)  # the cls position entry is zero
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, width)), x], axis=1)

    if self.attention_bias == "alibi_2d":
      bias = alibi_2d_bias(grid, self.patch, num_heads, ids_keep)
    elif self.attention_bias == "none":
      bias = None
    else:
      raise ValueError(
        f"attention_bias must be one of {ATTENTION_BIASES}, got {self.attention_bias!r}"
      )
    x, per_block = block_stack(
      x,
      depth=depth,
      num_heads=num_heads,
      name="blocks",
      scan=self.scan_layers,
      keep=self.return_blocks,
      bias=bias,
      mlp_ratio=self.mlp_ratio,
      gelu=self.gelu,
      dtype=self.dtype,
      attention=self.attention,
    )
    aux = {"pre_norm": x}
    if self.return_blocks:
      aux["blocks"] = per_block
    return layer_norm(self.dtype, "norm")(x), aux


# ---------------------------------------------------------------------------
# Checkpoint layout conversion: scanned (`blocks/...` with a leading layer axis)
# <-> unscanned (`blocks_0/...`, `blocks_1/...`). Works on any nesting (encoder
# and decoder both use a `blocks` stack).

_UNSCANNED = re.compile(r"^(.*)_(\d+)$")


def unscan_params(params, names=("blocks",)):
  """Splits every `{name}` subtree (leaves [depth, ...]) into `{name}_{i}`."""
  if not hasattr(params, "items"):
    return params
  out = {}
  for k, v in params.items():
    if k in names and hasattr(v, "items"):
      depth = jax.tree_util.tree_leaves(v)[0].shape[0]
      for i in range(depth):
        out[f"{k}_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], _to_dict(v))
    else:
      out[k] = unscan_params(v, names)
  return out


def scan_params(params, names=("blocks",)):
  """Stacks `{name}_0 .. {name}_{n-1}` subtrees into one `{name}` subtree."""
  if not hasattr(params, "items"):
    return params
  out, groups = {}, {}
  for k, v in params.items():
    m = _UNSCANNED.match(k)
    if m and m.group(1) in names:
      groups.setdefault(m.group(1), {})[int(m.group(2))] = _to_dict(v)
    else:
      out[k] = scan_params(v, names)
  for name, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"{name}: non-contiguous layer indices {sorted(layers)}")
    out[name] = jax.tree_util.tree_map(
      lambda *a: jnp.stack(a), *[layers[i] for i in range(len(layers))]
    )
  return out


def _to_dict(tree):
  return {k: _to_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def param_names(params) -> Sequence[tuple[str, tuple[int, ...]]]:
  """Sorted ('a/b/c', shape) pairs for a param tree: the stable-name snapshot."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  rows = [
    ("/".join(str(getattr(p, "key", p)) for p in path), tuple(leaf.shape)) for path, leaf in flat
  ]
  return sorted(rows)
