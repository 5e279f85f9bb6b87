"""Masking samplers for masked image modeling on text images.

Every sampler is a pure function of `(rng, batch, grid, num_masked, **params)` that
returns `mask: bool[batch, gh * gw]` (True = hidden, cells in row-major grid order) with
exactly `num_masked` hidden cells in every row. `batch`, `grid`, `num_masked` and the
params are static (Python values), so a sampler jits once per shape and runs on device.

Shape strategies work in two steps:
  1. draw their shapes (blocks, column spans, bands) as a `preferred` cell set of at
     most `num_masked` cells;
  2. `rank_to_count` completes it to exactly `num_masked`: preferred cells first, in
     random order, then the other cells, in random order.
Combination modes reuse step 1 of several strategies and run step 2 once.

The exact count comes from a k-th-largest selection by bisection over unique 32-bit
keys (priority | random bits | cell index) instead of a sort: sorting is slow on XLA:CPU,
and the bisection needs only ~log2(L) + a few compare-and-count passes.
"""

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder
import numpy as np

from mms_jax import errors

STRATEGIES = ("random_patch", "blockwise", "span", "horizontal_block")
MODES = ("single", "per_sample", "union", "multi_view")


# ------------------------------------------------------------------------------------
# Exact count by ranking.
# ------------------------------------------------------------------------------------
def _select_largest(keys, k):
  """Marks the k largest entries of each row. keys: uint32[B, L], unique per row."""
  if k == 0:
    return jnp.zeros(keys.shape, bool)

  def count_at_least(threshold):
    return jnp.sum(keys >= threshold[:, None], axis=1, dtype=jnp.int32)

  # Bisection over key values, per row, until exactly k keys lie at or above `low`.
  # Invariant: count_at_least(low) >= k and the k-th largest key is in [low, high].
  # Stops after ~log2(L) + a few passes instead of 32 (the gap below the k-th key
  # is ~2**32 / L wide).
  def step(carry):
    low, high, count_low = carry
    mid = low + (high - low) // 2 + 1
    count_mid = count_at_least(mid)
    up = count_mid >= k
    return (
      jnp.where(up, mid, low),
      jnp.where(up, high, mid - 1),
      jnp.where(up, count_mid, count_low),
    )

  low = jnp.zeros(keys.shape[:1], jnp.uint32)
  high = jnp.full(keys.shape[:1], 0xFFFFFFFF, jnp.uint32)
  low, _, _ = jax.lax.while_loop(
    lambda c: jnp.any(c[2] != k), step, (low, high, count_at_least(low))
  )
  return keys >= low[:, None]


def rank_to_count(rng, preferred, num_masked):
  """Exactly `num_masked` hidden cells per row, taking `preferred` cells first.

  Args:
    rng: PRNG key.
    preferred: bool[B, L], the cells a strategy chose.
    num_masked: static int in [0, L].

  Returns:
    mask: bool[B, L]. Among preferred (and among the other) cells the choice is
    uniformly random.
  """
  batch, length = preferred.shape
  index_bits = max(1, math.ceil(math.log2(length)))
  if index_bits > 24:
    raise ValueError(f"grid of {length} cells is too large (at most 2**24)")
  random_bits = jax.random.bits(rng, (batch, length), jnp.uint32)
  # Key layout: [1 bit preferred | 31 - index_bits random bits | index_bits cell index].
  # The index makes keys unique, so exactly k keys are >= the k-th largest.
  keys = (random_bits >> (index_bits + 1)) << index_bits
  keys = keys | jnp.arange(length, dtype=jnp.uint32)
  keys = keys | (preferred.astype(jnp.uint32) << 31)
  return _select_largest(keys, num_masked)


# ------------------------------------------------------------------------------------
# Preferred cell sets of each strategy (step 1). Each returns bool[B, L] with at most
# num_masked True cells per row, and, where useful for tests and docs, its shapes.
# ------------------------------------------------------------------------------------
def _columns_to_cells(columns, grid):
  """bool[B, gw] -> bool[B, gh * gw]: whole, full-height columns."""
  return jnp.tile(columns, (1, grid[0]))


def blockwise_min_aspect(grid, min_aspect):
  """The aspect bound blockwise uses on `grid`: `min_aspect`, except on a grid where
  blocks can be only one cell high or wide (a side of 1 or 2 cells), where no
  rectangle above 1/min_aspect cells would fit the bound; there blocks are runs along
  the long side, up to its length (aspect down to 1 / (long side - 1))."""
  max_h, max_w = max(1, grid[0] - 1), max(1, grid[1] - 1)
  if min(max_h, max_w) == 1:
    return min(min_aspect, 1 / max(max_h, max_w))
  return min_aspect


def blockwise_shapes(
  rng, batch, grid, num_masked, *, min_area=4, max_area=None, min_aspect=0.3, attempts=32
):
  """BEiT-style rectangles, drawn as `attempts` sequential proposals per image.

  Each proposal has an area uniform in [min_area, min(max_area, still to hide)] and an
  aspect ratio (height / width) log-uniform in [min_aspect, 1 / min_aspect]; its rounded
  height and width must keep the aspect in range and be strictly smaller than the grid
  (a grid dimension of 1 allows 1). On grids with a side of 1 or 2 cells the aspect
  range widens so that blocks are runs (`blockwise_min_aspect`). A proposal is accepted
  if it hides something new without exceeding `num_masked`. All images are processed at
  once; only the proposals are sequential.

  Returns:
    preferred: bool[B, L], the union of accepted rectangles (<= num_masked cells).
    blocks: dict of int32[B, attempts] `top`, `left`, `height`, `width` and
      bool[B, attempts] `accepted`.
  """
  gh, gw = grid
  max_area = num_masked if max_area is None else max_area
  max_h = max(1, gh - 1)
  max_w = max(1, gw - 1)
  min_aspect = blockwise_min_aspect(grid, min_aspect)
  log_aspect = math.log(min_aspect)

  # The largest rectangle that fits the grid with its aspect in range caps the area,
  # and the aspect is drawn from the part of its range where the rectangle fits: the
  # same distribution as drawing from the whole range and rejecting what does not fit.
  max_fit_area = max(h * min(max_w, int(h / min_aspect)) for h in range(1, max_h + 1))

  # Each grid row is held as ceil(gw / 32) 32-bit words (bit c of word w = column
  # 32 w + c): a proposal touches 32x fewer elements than a bool mask would.
  num_words = -(-gw // 32)
  row_index = jnp.arange(gh)
  word_start = 32 * jnp.arange(num_words)

  def row_bits(left, width):
    """uint32[B, num_words]: the bits of columns [left, left + width)."""
    low = jnp.clip(left[:, None] - word_start, 0, 32).astype(jnp.uint32)
    high = jnp.clip((left + width)[:, None] - word_start, 0, 32).astype(jnp.uint32)
    ones_below = lambda n: jnp.where(
      n >= 32, jnp.uint32(0xFFFFFFFF), (jnp.uint32(1) << jnp.minimum(n, 31)) - 1
    )
    return ones_below(high) & ~ones_below(low)

  def propose(carry, u):
    hidden, count = carry  # uint32[B, gh, num_words], int32[B]
    upper = jnp.minimum(jnp.minimum(max_area, max_fit_area), num_masked - count)
    upper = jnp.maximum(upper, min_area)
    area = min_area + u[0] * (upper + 1e-6 - min_area)
    low_aspect = jnp.maximum(log_aspect, jnp.log(area / (max_w + 0.5) ** 2))
    high_aspect = jnp.maximum(
      jnp.minimum(-log_aspect, jnp.log((max_h + 0.5) ** 2 / area)), low_aspect
    )
    aspect = jnp.exp(low_aspect + u[1] * (high_aspect - low_aspect))
    height = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    width = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    ratio = height / jnp.maximum(width, 1)
    fits = (
      (height >= 1)
      & (width >= 1)
      & (height <= max_h)
      & (width <= max_w)
      & (ratio >= min_aspect - 1e-6)
      & (ratio <= 1 / min_aspect + 1e-6)
    )
    top = jnp.floor(u[2] * (gh - height + 1)).astype(jnp.int32)
    left = jnp.floor(u[3] * (gw - width + 1)).astype(jnp.int32)
    in_rows = (row_index >= top[:, None]) & (row_index < (top + height)[:, None])
    rect = jnp.where(in_rows[:, :, None], row_bits(left, width)[:, None, :], jnp.uint32(0))
    new_hidden = hidden | rect
    new_count = jnp.sum(jax.lax.population_count(new_hidden), axis=(1, 2), dtype=jnp.int32)
    accepted = fits & (new_count <= num_masked) & (new_count > count)
    hidden = jnp.where(accepted[:, None, None], new_hidden, hidden)
    count = jnp.where(accepted, new_count, count)
    return (hidden, count), dict(top=top, left=left, height=height, width=width, accepted=accepted)

  # All random numbers are drawn at once; the short proposal loop is unrolled, which
  # XLA:CPU runs much faster than a loop of small kernels.
  uniforms = jax.random.uniform(rng, (attempts, 4, batch))
  init = (jnp.zeros((batch, gh, num_words), jnp.uint32), jnp.zeros((batch,), jnp.int32))
  (words, _), blocks = jax.lax.scan(propose, init, uniforms, unroll=True)
  col = jnp.arange(gw)
  hidden = (words[:, :, col // 32] >> (col % 32).astype(jnp.uint32)) & 1
  hidden = hidden.astype(bool).reshape(batch, gh * gw)
  return hidden, jax.tree.map(lambda x: x.T, blocks)


def span_columns(rng, batch, grid, num_masked, *, min_columns=2, max_columns=6, attempts=None):
  """Runs of whole columns covering exactly floor(num_masked / gh) columns.

  Runs of length uniform in [min_columns, max_columns] (shortened to what is still
  to hide) are proposed sequentially and accepted when they add columns without
  exceeding the target; columns still missing after `attempts` are drawn at random.
  attempts=None scales with the target: four proposals per run of average length
  needed (at least 32), so wide grids (e.g. 16x256) keep their span character.

  Returns:
    columns: bool[B, gw] with exactly floor(num_masked / gh) True entries per row.
  """
  gh, gw = grid
  target = num_masked // gh
  if attempts is None:
    attempts = max(32, math.ceil(4 * target / ((min_columns + max_columns) / 2)))
  col_index = jnp.arange(gw)
  k_runs, k_fill = jax.random.split(rng)

  def propose(carry, u):
    hidden, count = carry
    remaining = target - count
    length = jnp.floor(min_columns + u[0] * (max_columns - min_columns + 1))
    length = jnp.clip(length.astype(jnp.int32), 0, remaining)
    start = jnp.floor(u[1] * (gw - length + 1)).astype(jnp.int32)
    run = (col_index >= start[:, None]) & (col_index < (start + length)[:, None])
    new_hidden = hidden | run
    new_count = jnp.sum(new_hidden, axis=1, dtype=jnp.int32)
    accepted = (new_count <= target) & (new_count > count)
    hidden = jnp.where(accepted[:, None], new_hidden, hidden)
    return (hidden, jnp.where(accepted, new_count, count)), None

  uniforms = jax.random.uniform(k_runs, (attempts, 2, batch))
  init = (jnp.zeros((batch, gw), bool), jnp.zeros((batch,), jnp.int32))
  (runs, _), _ = jax.lax.scan(propose, init, uniforms, unroll=True)
  return rank_to_count(k_fill, runs, target)


def horizontal_block_columns(rng, batch, grid, *, band_columns=4, num_bands=1):
  """`num_bands` non-overlapping bands of `band_columns` whole columns (paper 003).

  Returns:
    columns: bool[B, gw] with exactly num_bands * band_columns True entries per row.
  """
  gh, gw = grid
  slack = gw - num_bands * band_columns
  offsets = jax.random.randint(rng, (batch, num_bands), 0, slack + 1)
  starts = jnp.sort(offsets, axis=1) + band_columns * jnp.arange(num_bands)
  col_index = jnp.arange(gw)[None, None, :]
  bands = (col_index >= starts[..., None]) & (col_index < starts[..., None] + band_columns)
  return jnp.any(bands, axis=1)


def _preferred(strategy, rng, batch, grid, num_masked, params):
  """bool[B, L]: the cells `strategy` chooses, at most num_masked per row."""
  if strategy == "random_patch":
    return jnp.zeros((batch, grid[0] * grid[1]), bool)
  if strategy == "blockwise":
    return blockwise_shapes(rng, batch, grid, num_masked, **params)[0]
  if strategy == "span":
    return _columns_to_cells(span_columns(rng, batch, grid, num_masked, **params), grid)
  if strategy == "horizontal_block":
    return _columns_to_cells(horizontal_block_columns(rng, batch, grid, **params), grid)
  raise ValueError(f"unknown masking strategy {strategy!r}; allowed: {STRATEGIES}")


# ------------------------------------------------------------------------------------
# Public samplers (step 1 + step 2).
# ------------------------------------------------------------------------------------
def _sampler(strategy):
  def sample(rng, batch, grid, num_masked, **params):
    k_shape, k_rank = jax.random.split(rng)
    preferred = _preferred(strategy, k_shape, batch, grid, num_masked, params)
    return rank_to_count(k_rank, preferred, num_masked)

  sample.__name__ = strategy
  sample.__doc__ = (
    f"`{strategy}` mask: bool[batch, gh * gw], exactly num_masked True "
    "per row. See the module docstring."
  )
  return sample


random_patch = _sampler("random_patch")
blockwise = _sampler("blockwise")
span = _sampler("span")
horizontal_block = _sampler("horizontal_block")


def per_sample(rng, batch, grid, num_masked, *, strategies, probabilities, params):
  """Each sample draws one strategy with the given probabilities.

  Returns:
    mask: bool[B, L]; strategy_ids: int32[B], index into `strategies`.
  """
  k_choice, k_shapes, k_rank = jax.random.split(rng, 3)
  strategy_ids = jax.random.choice(
    k_choice, len(strategies), (batch,), p=jnp.asarray(probabilities)
  )
  shape_keys = jax.random.split(k_shapes, len(strategies))
  preferred = jnp.stack(
    [
      _preferred(name, key, batch, grid, num_masked, p)
      for name, key, p in zip(strategies, shape_keys, params)
    ]
  )
  chosen = jnp.take_along_axis(preferred, strategy_ids[None, :, None], axis=0)[0]
  return rank_to_count(k_rank, chosen, num_masked), strategy_ids.astype(jnp.int32)


def union(rng, batch, grid, num_masked, *, strategies, shares, params):
  """Superimposes strategies, strategy i drawing round(share_i * num_masked) cells.

  Returns:
    mask: bool[B, L].
  """
  k_shapes, k_rank = jax.random.split(rng)
  counts = _split_count(num_masked, shares)
  preferred = jnp.zeros((batch, grid[0] * grid[1]), bool)
  for name, key, count, p in zip(
    strategies, jax.random.split(k_shapes, len(strategies)), counts, params
  ):
    preferred = preferred | _preferred(name, key, batch, grid, count, p)
  return rank_to_count(k_rank, preferred, num_masked)


def multi_view(rng, batch, grid, num_masked, *, strategies, params):
  """One view per strategy of every image.

  Returns:
    mask: bool[B, V, L] with V = len(strategies).
  """
  keys = jax.random.split(rng, len(strategies))
  views = [
    _sampler(name)(key, batch, grid, num_masked, **p)
    for name, key, p in zip(strategies, keys, params)
  ]
  return jnp.stack(views, axis=1)


def _split_count(num_masked, shares):
  """Integer counts proportional to shares that add up to num_masked."""
  cumulative = np.round(np.cumsum(shares) / np.sum(shares) * num_masked).astype(int)
  return tuple(int(c) for c in np.diff(np.concatenate([[0], cumulative])))


# ------------------------------------------------------------------------------------
# MAE index bookkeeping.
# ------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------
# Ratio schedule.
# ------------------------------------------------------------------------------------
def ratio_at(step, total_steps, *, ratio, ratio_start=None, ratio_stages=4):
  """Mask ratio at `step`: constant, or rising from ratio_start to ratio (paper 002).

  The rise is quantised to `ratio_stages` equal stages over training, because every
  distinct count is a new compiled shape.
  """
  if ratio_start is None or ratio_stages <= 1:
    return ratio
  stage = min(int(step * ratio_stages // max(total_steps, 1)), ratio_stages - 1)
  return ratio_start + (ratio - ratio_start) * stage / (ratio_stages - 1)


def count_for_ratio(ratio, num_cells):
  return int(round(ratio * num_cells))


# ------------------------------------------------------------------------------------
# Configuration.
# ------------------------------------------------------------------------------------
def default_config():
  """The masking sub-config of every pretraining config (docs/method.md §3)."""
  return ml_collections.ConfigDict(
    dict(
      mode="per_sample",  # single | per_sample | union | multi_view
      strategies=("random_patch", "blockwise", "span"),
      probabilities=(),  # per_sample; empty = equal
      shares=(),  # union: fraction of the count each strategy draws; empty = equal
      ratio=0.75,
      ratio_start=placeholder(float),  # set (e.g. 0.5) for a progressive ratio rising to `ratio`
      ratio_stages=4,
      blockwise=dict(min_area=4, max_area=placeholder(int), min_aspect=0.3, attempts=32),
      span=dict(min_columns=2, max_columns=6, attempts=placeholder(int)),  # None: scales with gw
      horizontal_block=dict(band_pixels=16, num_bands=1),
    )
  )


class MaskingConfigError(errors.ConfigError):
  """A masking config field is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Validated, hashable masking settings for one grid (static under jit)."""

  mode: str
  strategies: tuple[str, ...]
  probabilities: tuple[float, ...]
  shares: tuple[float, ...]
  params: tuple[tuple[tuple[str, Any], ...], ...]  # per strategy, sorted items
  grid: tuple[int, int]
  ratio: float
  ratio_start: float | None
  ratio_stages: int

  @property
  def num_cells(self):
    return self.grid[0] * self.grid[1]

  @property
  def num_views(self):
    return len(self.strategies) if self.mode == "multi_view" else 1

  def num_masked(self, step=0, total_steps=1):
    ratio = ratio_at(
      step,
      total_steps,
      ratio=self.ratio,
      ratio_start=self.ratio_start,
      ratio_stages=self.ratio_stages,
    )
    return count_for_ratio(ratio, self.num_cells)

  def counts(self):
    """Every count the schedule uses (each is one compiled shape)."""
    return sorted({self.num_masked(s, self.ratio_stages) for s in range(self.ratio_stages)})


def _fail(field, value, allowed):
  raise MaskingConfigError(f"masking.{field}={value!r} is invalid: {allowed}")


def build_spec(config, image_size, patch_size):
  """Validates the masking sub-config for an image and patch size.

  Args:
    config: the `masking` ConfigDict (see `default_config`).
    image_size: (H, W) in pixels.
    patch_size: (ph, pw) in pixels.

  Returns:
    A MaskSpec. Raises MaskingConfigError naming the field and what is allowed.
  """
  (height, width), (ph, pw) = tuple(image_size), tuple(patch_size)
  if height % ph or width % pw:
    raise MaskingConfigError(
      f"image size {height}x{width} is not divisible by the patch size {ph}x{pw}: "
      "choose a patch size that tiles the image"
    )
  grid = (height // ph, width // pw)
  num_cells = grid[0] * grid[1]
  mode = config.mode
  if mode not in MODES:
    _fail("mode", mode, f"allowed: {MODES}")
  strategies = tuple(config.strategies)
  if not strategies:
    _fail("strategies", strategies, f"name at least one of {STRATEGIES}")
  for i, name in enumerate(strategies):
    if name not in STRATEGIES:
      _fail(f"strategies[{i}]", name, f"unknown strategy; allowed: {STRATEGIES}")
  if mode == "single" and len(strategies) != 1:
    _fail("strategies", strategies, "mode 'single' takes exactly one strategy")
  if len(set(strategies)) != len(strategies):
    _fail("strategies", strategies, "each strategy may appear once")

  for field in ("ratio", "ratio_start"):
    value = config.get(field)
    if value is None and field == "ratio_start":
      continue
    if not (isinstance(value, (int, float)) and 0 < value < 1):
      _fail(field, value, "a ratio must lie strictly between 0 and 1")
  if config.ratio_start is not None and config.ratio_stages < 1:
    _fail("ratio_stages", config.ratio_stages, "use at least 1 stage")

  probabilities = _weights(
    config.get("probabilities", ()), strategies, "probabilities", must_sum_to_one=True
  )
  shares = _weights(config.get("shares", ()), strategies, "shares", must_sum_to_one=True)

  params = []
  for name in strategies:
    p = dict(config.get(name, {}) or {})
    if name == "horizontal_block":
      band_pixels = p.pop("band_pixels")
      if band_pixels <= 0 or band_pixels % pw:
        _fail(
          "horizontal_block.band_pixels",
          band_pixels,
          f"must be a positive multiple of the patch width {pw}",
        )
      p["band_columns"] = band_pixels // pw
      if p["num_bands"] < 1 or p["num_bands"] * p["band_columns"] > grid[1]:
        _fail(
          "horizontal_block.num_bands",
          p["num_bands"],
          f"{p['num_bands']} bands of {p['band_columns']} columns must fit in {grid[1]} columns",
        )
    if name == "blockwise":
      if not 0 < p["min_aspect"] <= 1:
        _fail("blockwise.min_aspect", p["min_aspect"], "must lie in (0, 1]")
      if p["min_area"] < 1:
        _fail("blockwise.min_area", p["min_area"], "must be >= 1 cell")
      if p["attempts"] < 1:
        _fail("blockwise.attempts", p["attempts"], "must be >= 1")
    if name == "span":
      if not 1 <= p["min_columns"] <= p["max_columns"]:
        _fail(
          "span.min_columns",
          (p["min_columns"], p["max_columns"]),
          "need 1 <= min_columns <= max_columns",
        )
      if p["attempts"] is not None and p["attempts"] < 1:
        _fail("span.attempts", p["attempts"], "must be >= 1, or None to scale with the grid")
    params.append(tuple(sorted(p.items())))

  spec = MaskSpec(
    mode=mode,
    strategies=strategies,
    probabilities=probabilities,
    shares=shares,
    params=tuple(params),
    grid=grid,
    ratio=float(config.ratio),
    ratio_start=config.ratio_start,
    ratio_stages=int(config.ratio_stages),
  )
  for count in spec.counts():
    if not 0 < count < num_cells:
      _fail(
        "ratio",
        config.ratio,
        f"gives {count} hidden of {num_cells} cells; the grid {grid[0]}x{grid[1]} "
        "needs at least one hidden and one visible cell",
      )
    if "horizontal_block" in strategies:
      p = dict(params[strategies.index("horizontal_block")])
      band_cells = p["num_bands"] * p["band_columns"] * grid[0]
      available = (
        count
        if mode != "union"
        else _split_count(count, shares)[strategies.index("horizontal_block")]
      )
      if band_cells > available:
        _fail(
          "horizontal_block.num_bands",
          p["num_bands"],
          f"the bands hide {band_cells} cells but only {available} may be hidden: "
          "use fewer or narrower bands, or a higher ratio",
        )
  return spec


def _weights(values, strategies, field, must_sum_to_one):
  values = tuple(float(v) for v in (values or ()))
  if not values:
    return tuple(1.0 / len(strategies) for _ in strategies)
  if len(values) != len(strategies):
    _fail(field, values, f"give one value per strategy ({len(strategies)})")
  if any(v < 0 for v in values):
    _fail(field, values, "values must be >= 0")
  if must_sum_to_one and abs(sum(values) - 1) > 1e-6:
    _fail(field, values, f"values must sum to 1 (they sum to {sum(values):g})")
  return values


def make_sampler(spec: MaskSpec) -> Callable:
  """The jitted sampler of a spec: `(rng, batch, num_masked) -> (mask, strategy_ids)`.

  mask: bool[B, L] (bool[B, V, L] for multi_view). strategy_ids: int32[B], the strategy
  of each sample (per_sample), or of each view (multi_view: int32[V]); for union, -1.
  """
  params = tuple(dict(p) for p in spec.params)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def sample(rng, batch, num_masked):
    if spec.mode == "single":
      mask = _sampler(spec.strategies[0])(rng, batch, spec.grid, num_masked, **params[0])
      return mask, jnp.zeros((batch,), jnp.int32)
    if spec.mode == "per_sample":
      return per_sample(
        rng,
        batch,
        spec.grid,
        num_masked,
        strategies=spec.strategies,
        probabilities=spec.probabilities,
        params=params,
      )
    if spec.mode == "union":
      mask = union(
        rng,
        batch,
        spec.grid,
        num_masked,
        strategies=spec.strategies,
        shares=spec.shares,
        params=params,
      )
      return mask, jnp.full((batch,), -1, jnp.int32)
    mask = multi_view(rng, batch, spec.grid, num_masked, strategies=spec.strategies, params=params)
    return mask, jnp.arange(len(spec.strategies), dtype=jnp.int32)

  return sample


def strategy_names(spec: MaskSpec) -> Sequence[str]:
  """Names for the ids `make_sampler` returns."""
  return ("union",) if spec.mode == "union" else spec.strategies
