"""Masking samplers for masked image modeling on text images (placeholder: being written)."""
import jax.numpy as jnp


def ids_from_mask(mask, num_masked):
  """Token index bookkeeping for an encoder that drops hidden tokens, as in MAE.

  Args:
    mask: bool[B, L], True = hidden, exactly `num_masked` True entries per row.
    num_masked: static int.

  Returns:
    ids_keep: int32[B, L - num_masked], visible token indices in ascending order.
    ids_masked: int32[B, num_masked], hidden token indices in ascending order.
    ids_restore: int32[B, L], position of token i in concat(visible, hidden);
      gathering concat(visible, hidden) with it restores the original order.
  """
  mask = mask.astype(bool)
  batch, length = mask.shape
  num_keep = length - num_masked
  visible_rank = jnp.cumsum(~mask, axis=1) - 1
  hidden_rank = jnp.cumsum(mask, axis=1) - 1
  ids_restore = jnp.where(mask, num_keep + hidden_rank, visible_rank).astype(jnp.int32)
  tokens = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  ids_shuffle = jnp.zeros_like(tokens).at[jnp.arange(batch)[:, None], ids_restore].set(tokens)
  return ids_shuffle[:, :num_keep], ids_shuffle[:, num_keep:], ids_restore
