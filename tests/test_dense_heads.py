"""Segmenter and SuperResolver: output shapes (any grid), parameter layout, and an
untrained residual super-resolver returning the bicubic image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax.models import dense_heads
from mms_jax.models import mae
from mms_jax.models import vit

TINY = dict(
  encoder_variant=None,
  encoder_width=32,
  encoder_depth=1,
  encoder_num_heads=2,
  head_width=32,
  head_depth=2,
  head_num_heads=2,
)


@pytest.mark.parametrize(
  "image_hw,patch", [((32, 128), (4, 4)), ((24, 40), (8, 4)), ((16, 16), (2, 8))]
)
def test_segmenter_shapes(image_hw, patch):
  model = dense_heads.Segmenter(patch=patch, **TINY)
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
  model = dense_heads.SuperResolver(patch=patch, residual=residual, **TINY)
  lr = jax.ShapeDtypeStruct((2, *lr_hw, 3), jnp.float32)
  (sr, aux), params = jax.eval_shape(model.init_with_output, jax.random.key(0), lr)
  hr_hw = (2 * lr_hw[0], 2 * lr_hw[1])
  assert sr.shape == (2, *hr_hw, 3)
  assert aux["upsampled"].shape == (2, *hr_hw, 3)
  assert params["params"]["head"]["pred"]["kernel"].shape == (32, patch[0] * patch[1] * 3)


def test_untrained_residual_super_resolver_returns_bicubic():
  model = dense_heads.SuperResolver(patch=(4, 4), residual=True, **TINY)
  lr = jax.random.uniform(jax.random.key(1), (2, 8, 16, 3), minval=-1, maxval=1)
  (sr, aux), _ = jax.jit(model.init_with_output)(jax.random.key(0), lr)
  np.testing.assert_array_equal(sr, aux["upsampled"])  # the zero-initialised output layer
  np.testing.assert_allclose(
    aux["upsampled"], jax.image.resize(lr, (2, 16, 32, 3), "bicubic"), atol=1e-6
  )


def test_encoder_params_have_the_pretraining_names():
  pre = mae.MAE(
    encoder_variant=None,
    encoder_width=32,
    encoder_depth=1,
    encoder_num_heads=2,
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
    (dense_heads.Segmenter(**TINY), images),
    (dense_heads.SuperResolver(**TINY), images[:, :16, :64]),
  ):
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert vit.param_names(params["encoder"]) == vit.param_names(pre_params["encoder"])


def test_segmenter_logits_follow_the_patch_grid():
  """Token (i, j)'s prediction lands on pixels [i*ph, (i+1)*ph) x [j*pw, (j+1)*pw)."""
  model = dense_heads.Segmenter(patch=(4, 8), **TINY)
  images = jnp.zeros((1, 8, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  # Output layer: zero kernel, bias = the index of the pixel inside its patch.
  params["head"]["pred"]["kernel"] = jnp.zeros_like(params["head"]["pred"]["kernel"])
  params["head"]["pred"]["bias"] = jnp.arange(32, dtype=jnp.float32)
  logits, _ = jax.jit(model.apply)({"params": params}, images)
  expected = np.tile(np.arange(32).reshape(4, 8), (2, 4))
  np.testing.assert_array_equal(logits[0], expected)
