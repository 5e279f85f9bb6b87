"""mms_jax.models.matmul: nn.Dense whose bfloat16 matmuls run as bf16 x bf16 -> f32 on CPU."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax.models import matmul
from mms_jax.models import vit

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bf16 route is CPU-only")


def _inputs(dtype, shape=(3, 5, 24), features=16):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), dtype)
  g = jnp.asarray(rng.standard_normal((*shape[:-1], features)), jnp.float32)
  return x, g


def _value_and_grads(module, params, x, g):
  loss = lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * g)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def _max_rel_err(a, b):
  return max(
    float(jnp.max(jnp.abs(jnp.float32(u) - jnp.float32(v))) / jnp.max(jnp.abs(jnp.float32(v))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def test_float32_dense_is_flax_dense():
  """Same parameter tree and initial values as nn.Dense, same outputs and gradients."""
  x, g = _inputs(jnp.float32)
  ours = matmul.Dense(16)
  flax_dense = nn.Dense(
    16, kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros
  )
  params = ours.init(jax.random.key(3), x)
  flax_params = flax_dense.init(jax.random.key(3), x)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, flax_params))
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  ours_out = _value_and_grads(ours, params, x, g)
  flax_out = _value_and_grads(flax_dense, params, x, g)
  assert jax.tree.all(jax.tree.map(np.array_equal, ours_out, flax_out))


def test_bf16_dense_is_as_accurate_as_flax_bf16():
  """Value and gradients (input, kernel, bias) against float32 math on the same
  bf16-rounded numbers: at least as close as nn.Dense's own bf16 path."""
  x, g = _inputs(jnp.bfloat16)
  params = jax.tree.map(
    lambda p: p + 0.1, matmul.Dense(16, dtype=jnp.bfloat16).init(jax.random.key(3), x)
  )
  exact = _value_and_grads(matmul.Dense(16), params, x.astype(jnp.float32), g)
  ours = _value_and_grads(matmul.Dense(16, dtype=jnp.bfloat16), params, x, g)
  flax_bf16 = _value_and_grads(
    nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.float32), params, x, g
  )
  assert _max_rel_err(ours, exact) <= max(_max_rel_err(flax_bf16, exact), 1e-2)
  assert _max_rel_err(ours, exact) < 2e-2
  assert ours[1][1].dtype == jnp.bfloat16 and ours[1][0]["params"]["kernel"].dtype == jnp.float32


def _dot_types(fn, *args):
  """(lhs, rhs, result) element types of every dot_general in fn's StableHLO."""
  text = jax.jit(fn).lower(*args).as_text()
  types = re.findall(
    r"stablehlo\.dot_general .*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>",
    text,
  )
  assert types, text
  return set(types)


@on_cpu
def test_bf16_dense_forward_and_backward_dots_accumulate_in_f32():
  """The mechanism of docs/performance.md: no bf16 -> bf16 dot (XLA:CPU runs those
  in float32 with conversions); every dot takes bf16 operands and returns f32."""
  x, g = _inputs(jnp.bfloat16)
  dense = matmul.Dense(16, dtype=jnp.bfloat16)
  params = dense.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(dense.apply(p, x).astype(jnp.float32) * g)
  assert _dot_types(jax.grad(loss, argnums=(0, 1)), params, x) == {("bf16", "bf16", "f32")}


@on_cpu
def test_bf16_chunked_attention_dots_accumulate_in_f32():
  rng = np.random.default_rng(1)
  q, k, v = [jnp.asarray(rng.standard_normal((2, 3, 17, 8)), jnp.bfloat16) for _ in range(3)]
  for chunk_bytes in (1, 2**30):  # a loop per head, one call
    loss = lambda q, k, v: jnp.sum(
      vit.chunked_attention(q, k, v, chunk_bytes).astype(jnp.float32) ** 2
    )
    types = _dot_types(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert types == {("bf16", "bf16", "f32")}, types


@on_cpu
def test_bf16_encoder_has_no_bf16_to_bf16_dot():
  """The whole bf16 encoder, forward and backward, on its default CPU attention."""
  encoder = vit.Encoder(variant="tiny", dtype=jnp.bfloat16)
  images = jnp.zeros((2, 32, 128, 3))
  params = encoder.init(jax.random.key(0), images)
  loss = lambda p: jnp.sum(encoder.apply(p, images)[0].astype(jnp.float32))
  types = _dot_types(jax.grad(loss), params)
  assert ("bf16", "bf16", "bf16") not in types, types
