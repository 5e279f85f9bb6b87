"""bfloat16 matmuls that run on the CPU's bfloat16 units, forward and backward.

XLA:CPU (jaxlib 0.10) executes a dot whose operands *and* result are bfloat16 by
converting both operands to float32, running the float32 GEMM and rounding the
result: that is why bfloat16 compute used to be slower than float32 on CPU. A dot
with bfloat16 operands and a float32 result (`preferred_element_type`) runs on the
bfloat16 instructions instead (AMX / AVX512-BF16; 4.8x the float32 rate on the
Xeon of docs/performance.md). `linear` is that dot (plus bias) with a hand-written
backward whose dots are of the same kind; `Dense` is nn.Dense routed through it
for bfloat16 on CPU, and nn.Dense's own math everywhere else (GPU and TPU GEMMs
already accumulate bfloat16 in float32).

Numerics: the PyTorch autocast recipe — bfloat16 operands, float32 accumulation,
bfloat16 result and input gradient; the weight gradient is accumulated in float32
and rounded to the kernel's compute dtype as autodiff through nn.Dense's cast would.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _dot(a, b, contracting):
  return jax.lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def linear(x, w, b):
  """x [..., K] @ w [K, N] + b [N] -> [..., N] in x.dtype, accumulated in float32.

  x, w, b: one low-precision dtype (nn.Dense's promoted operands). The backward's
  two matmuls accumulate in float32 too; the bias gradient is a float32 sum over
  the rows of a 2-D view (XLA:CPU turns a bf16 sum over [B, N, features] into a
  slow windowed reduction).
  """
  return (_dot(x, w, ((x.ndim - 1,), (0,))) + b.astype(jnp.float32)).astype(x.dtype)


def _linear_fwd(x, w, b):
  return linear(x, w, b), (x, w)


def _linear_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = _dot(g, w, ((g.ndim - 1,), (1,))).astype(x.dtype)  # [..., N] . [K, N] -> [..., K]
  rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = _dot(rows_x, rows_g, ((0,), (0,))).astype(w.dtype)  # [M, K] . [M, N] -> [K, N]
  db = jnp.sum(rows_g.astype(jnp.float32), axis=0).astype(w.dtype)
  return dx, dw, db


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
  """nn.Dense (same parameters, initialisers and dtype promotion) whose bfloat16
  compute on CPU runs through `linear`; elsewhere it is exactly nn.Dense's math."""

  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return affine(*nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype))


def affine(x, kernel, bias):
  """x [..., K] @ kernel [K, N] + bias [N], all in one dtype: `linear` for bfloat16 on
  CPU, nn.Dense's `lax.dot_general` + bias everywhere else."""
  if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    return linear(x, kernel, bias)
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias
