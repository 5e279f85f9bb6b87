"""Segmenter and SuperResolver: output shapes (any grid), parameter layout, and an
untrained residual super-resolver returning the bicubic image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax.models import dense_heads
from mms_jax.models import encoder_config
from mms_jax.models import mae
from mms_jax.models import vit

TINY = dict(
  head_width=32,
  head_depth=2,
  head_num_heads=2,
)


def tiny_encoder(patch=(4, 4)):
  """A 32-wide, 1-deep plain ViT encoder (linear patches, no attention bias)."""
  return encoder_config.EncoderConfig(
    width=32, depth=1, num_heads=2, patch=patch, stem="patch", attention_bias="none"
  )


@pytest.mark.parametrize(
  "image_hw,patch", [((32, 128), (4, 4)), ((24, 40), (8, 4)), ((16, 16), (2, 8))]
)
def test_segmenter_shapes(image_hw, patch):
  model = dense_heads.Segmenter(encoder=tiny_encoder(patch), **TINY)
  images = jax.ShapeDtypeStruct((2, *image_hw, 3), jnp.float32)
  (logits, aux), params = jax.eval_shape(model.init_with_output, jax.random.key(0), images)
  assert logits.shape == (2, *image_hw) and logits.dtype == jnp.float32
  gh, gw = vit.grid_shape(image_hw, patch)
  assert aux["encoded"].shape == (2, 1 + gh * gw, 32)
  assert set(params["params"]) == {"encoder", "head"}
  pred = params["params"]["head"]["pred"]["kernel"]
  assert pred.shape == (32, patch[0] * patch[1])
  assert "blocks_1" in params["params"]["head"]  # head_depth blocks


@pytest.mark.parametrize("lr_hw,patch", [((16, 64), (4, 4)), ((12, 20), (8, 4))])
@pytest.mark.parametrize("residual", [True, False])
def test_super_resolver_shapes(lr_hw, patch, residual):
  model = dense_heads.SuperResolver(encoder=tiny_encoder(patch), residual=residual, **TINY)
  lr = jax.ShapeDtypeStruct((2, *lr_hw, 3), jnp.float32)
  (sr, aux), params = jax.eval_shape(model.init_with_output, jax.random.key(0), lr)
  hr_hw = (2 * lr_hw[0], 2 * lr_hw[1])
  assert sr.shape == (2, *hr_hw, 3)
  assert aux["upsampled"].shape == (2, *hr_hw, 3)
  assert params["params"]["head"]["pred"]["kernel"].shape == (32, patch[0] * patch[1] * 3)


def test_untrained_residual_super_resolver_returns_bicubic():
  model = dense_heads.SuperResolver(encoder=tiny_encoder((4, 4)), residual=True, **TINY)
  lr = jax.random.uniform(jax.random.key(1), (2, 8, 16, 3), minval=-1, maxval=1)
  (sr, aux), _ = jax.jit(model.init_with_output)(jax.random.key(0), lr)
  np.testing.assert_array_equal(sr, aux["upsampled"])  # the zero-initialised output layer
  np.testing.assert_allclose(
    aux["upsampled"], jax.image.resize(lr, (2, 16, 32, 3), "bicubic"), atol=1e-6
  )


def test_encoder_params_have_the_pretraining_names():
  pre = mae.MAE(
    encoder=tiny_encoder(),
    decoder_width=32,
    decoder_depth=1,
    decoder_num_heads=2,
  )
  images = jnp.zeros((1, 32, 128, 3))
  mask = jnp.zeros((1, 256), bool).at[:, :192].set(True)
  pre_params = jax.eval_shape(
    lambda x, m: pre.init(jax.random.key(0), x, m, num_masked=192), images, mask
  )["params"]
  for model, x in (
    (dense_heads.Segmenter(encoder=tiny_encoder(), **TINY), images),
    (dense_heads.SuperResolver(encoder=tiny_encoder(), **TINY), images[:, :16, :64]),
  ):
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert vit.param_names(params["encoder"]) == vit.param_names(pre_params["encoder"])


def test_segmenter_logits_follow_the_patch_grid():
  """Token (i, j)'s prediction lands on pixels [i*ph, (i+1)*ph) x [j*pw, (j+1)*pw)."""
  model = dense_heads.Segmenter(encoder=tiny_encoder((4, 8)), **TINY)
  images = jnp.zeros((1, 8, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  # Output layer: zero kernel, bias = the index of the pixel inside its patch.
  params["head"]["pred"]["kernel"] = jnp.zeros_like(params["head"]["pred"]["kernel"])
  params["head"]["pred"]["bias"] = jnp.arange(32, dtype=jnp.float32)
  logits, _ = jax.jit(model.apply)({"params": params}, images)
  expected = np.tile(np.arange(32).reshape(4, 8), (2, 4))
  np.testing.assert_array_equal(logits[0], expected)


@pytest.mark.parametrize("model_class", [dense_heads.Segmenter, dense_heads.SuperResolver])
def test_pixel_shortcut_feeds_each_token_its_own_patch(model_class):
  """With the encoder's path into the head cut and no head blocks, a token's output
  depends on the pixels of its own patch only, through the shortcut."""
  patch = (8, 4)
  model = model_class(encoder=tiny_encoder(patch), pixel_shortcut=True, **{**TINY, "head_depth": 0})
  plain = model_class(encoder=tiny_encoder(patch), **TINY)
  hw = (16, 32) if model_class is dense_heads.Segmenter else (8, 16)
  x = jax.random.uniform(jax.random.key(1), (1, *hw, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  head = params["head"]
  assert head["pixel_embed"]["kernel"].shape == (8 * 4 * 3, 32)
  assert "pixel_embed" not in jax.jit(plain.init)(jax.random.key(0), x)["params"]["head"]
  head["embed"]["kernel"] = jnp.zeros_like(head["embed"]["kernel"])
  head["pred"]["kernel"] = jax.random.normal(jax.random.key(2), head["pred"]["kernel"].shape)

  def first_token_output(x):
    out, aux = model.apply({"params": params}, x)
    if model_class is dense_heads.SuperResolver:
      out = out - aux["upsampled"]
    return out[0, :8, :4].sum()  # the top-left token's patch

  grad = np.abs(np.asarray(jax.grad(first_token_output)(x)[0])).sum(-1)
  own = (slice(0, 8), slice(0, 4))
  reach = np.zeros(hw, bool)
  if model_class is dense_heads.SuperResolver:  # the head sees the 2x bicubic image
    own = (slice(0, 4), slice(0, 2))
    reach[:6, :4] = True  # the bicubic taps reach two LR pixels past the patch
  else:
    reach[own] = True
  assert grad[own].min() > 0  # every pixel of its patch reaches it
  np.testing.assert_array_equal(grad[~reach], 0)  # no other pixel does
