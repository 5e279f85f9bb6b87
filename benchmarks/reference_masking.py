"""Per-sample numpy references of the samplers in mms_jax/masking.py.

Written the way host-side MIM maskers usually are (BEiT's generator, MAE's noise
argsort): a Python loop over samples and, inside it, over proposals. They implement
the same algorithms and distributions as masking.py (not the same random streams) and
serve as the speed baseline and a statistical cross-check in bench_masking.py.

`beit_blockwise` is the plain BEiT-style generator with no top-up: it stops when a
round of proposals adds nothing, so some samples end short of the count.
"""

import math

import numpy as np


def rank_to_count(rng, preferred, num_masked):
  """bool[L] with exactly num_masked True: preferred cells first, random order."""
  order = rng.permutation(preferred.size)
  order = order[np.argsort(~preferred[order], kind="stable")]
  mask = np.zeros(preferred.size, bool)
  mask[order[:num_masked]] = True
  return mask


def random_patch(rng, batch, grid, num_masked):
  length = grid[0] * grid[1]
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    mask[b, rng.permutation(length)[:num_masked]] = True
  return mask


def _max_fit_area(grid, min_aspect):
  max_h, max_w = max(1, grid[0] - 1), max(1, grid[1] - 1)
  return max(h * min(max_w, int(h / min_aspect)) for h in range(1, max_h + 1))


def blockwise_shapes_one(
  rng, grid, num_masked, *, min_area=4, max_area=None, min_aspect=0.3, attempts=32
):
  """The union of accepted rectangles of one image, bool[gh, gw]."""
  gh, gw = grid
  max_area = num_masked if max_area is None else max_area
  max_h, max_w = max(1, gh - 1), max(1, gw - 1)
  if min(max_h, max_w) == 1:  # blocks one cell high or wide: runs along the long side
    min_aspect = min(min_aspect, 1 / max(max_h, max_w))
  area_cap = min(max_area, _max_fit_area(grid, min_aspect))
  hidden = np.zeros(grid, bool)
  count = 0
  for _ in range(attempts):
    upper = max(min(area_cap, num_masked - count), min_area)
    area = rng.uniform(min_area, upper)
    # Only aspects for which the rounded rectangle can fit the grid.
    low = max(math.log(min_aspect), math.log(area / (max_w + 0.5) ** 2))
    high = min(-math.log(min_aspect), math.log((max_h + 0.5) ** 2 / area))
    aspect = math.exp(rng.uniform(low, max(low, high)))
    h = int(np.round(math.sqrt(area * aspect)))
    w = int(np.round(math.sqrt(area / aspect)))
    if not (
      1 <= h <= max_h and 1 <= w <= max_w and min_aspect - 1e-6 <= h / w <= 1 / min_aspect + 1e-6
    ):
      continue
    top = int(rng.integers(0, gh - h + 1))
    left = int(rng.integers(0, gw - w + 1))
    new = h * w - int(hidden[top : top + h, left : left + w].sum())
    if 0 < new and count + new <= num_masked:
      hidden[top : top + h, left : left + w] = True
      count += new
  return hidden


def blockwise(rng, batch, grid, num_masked, **params):
  mask = np.zeros((batch, grid[0] * grid[1]), bool)
  for b in range(batch):
    shapes = blockwise_shapes_one(rng, grid, num_masked, **params).reshape(-1)
    mask[b] = rank_to_count(rng, shapes, num_masked)
  return mask


def beit_blockwise(rng, batch, grid, num_masked, *, min_area=4, min_aspect=0.3, tries_per_block=10):
  """The plain BEiT-style generator: no aspect restriction to what fits, no top-up.

  Blocks are added while a round of `tries_per_block` proposals adds something; a
  proposal that does not fit the grid is simply wasted.
  """
  gh, gw = grid
  log_low, log_high = math.log(min_aspect), -math.log(min_aspect)
  mask = np.zeros((batch, gh, gw), bool)
  for b in range(batch):
    count = 0
    while count < num_masked:
      budget = num_masked - count
      added = 0
      for _ in range(tries_per_block):
        area = min_area + (budget - min_area) * rng.random()  # budget may be < min_area
        aspect = math.exp(rng.uniform(log_low, log_high))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < gw and h < gh:
          top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
          window = mask[b, top : top + h, left : left + w]
          new = h * w - int(window.sum())
          if 0 < new <= budget:
            window[...] = True
            added = new
            break
      if not added:
        break
      count += added
  return mask.reshape(batch, -1)


def span_runs_one(rng, grid, num_masked, *, min_columns=2, max_columns=6, attempts=None):
  """Columns hidden by accepted runs of one image, bool[gw] (<= num_masked // gh)."""
  gh, gw = grid
  target = num_masked // gh
  if attempts is None:  # as masking.span_columns
    attempts = max(32, math.ceil(4 * target / ((min_columns + max_columns) / 2)))
  columns = np.zeros(gw, bool)
  count = 0
  for _ in range(attempts):
    length = min(int(rng.integers(min_columns, max_columns + 1)), target - count)
    start = int(rng.integers(0, gw - length + 1))
    new = length - int(columns[start : start + length].sum())
    if new > 0:  # runs never exceed the target: length <= target - count
      columns[start : start + length] = True
      count += new
  return columns


def span(rng, batch, grid, num_masked, **params):
  gh, gw = grid
  mask = np.zeros((batch, gh * gw), bool)
  for b in range(batch):
    runs = span_runs_one(rng, grid, num_masked, **params)
    columns = rank_to_count(rng, runs, num_masked // gh)
    mask[b] = rank_to_count(rng, np.tile(columns, gh), num_masked)
  return mask


def horizontal_block_columns_one(rng, grid, *, band_columns=4, num_bands=1):
  slack = grid[1] - num_bands * band_columns
  starts = np.sort(rng.integers(0, slack + 1, num_bands)) + band_columns * np.arange(num_bands)
  columns = np.zeros(grid[1], bool)
  for start in starts:
    columns[start : start + band_columns] = True
  return columns


def horizontal_block(rng, batch, grid, num_masked, **params):
  mask = np.zeros((batch, grid[0] * grid[1]), bool)
  for b in range(batch):
    columns = horizontal_block_columns_one(rng, grid, **params)
    mask[b] = rank_to_count(rng, np.tile(columns, grid[0]), num_masked)
  return mask


SAMPLERS = dict(
  random_patch=random_patch, blockwise=blockwise, span=span, horizontal_block=horizontal_block
)


def _preferred_one(name, rng, grid, num_masked, params):
  if name == "random_patch":
    return np.zeros(grid[0] * grid[1], bool)
  if name == "blockwise":
    return blockwise_shapes_one(rng, grid, num_masked, **params).reshape(-1)
  if name == "span":
    runs = span_runs_one(rng, grid, num_masked, **params)
    return np.tile(rank_to_count(rng, runs, num_masked // grid[0]), grid[0])
  return np.tile(horizontal_block_columns_one(rng, grid, **params), grid[0])


def per_sample(rng, batch, grid, num_masked, *, strategies, probabilities, params):
  mask = np.zeros((batch, grid[0] * grid[1]), bool)
  ids = rng.choice(len(strategies), batch, p=probabilities)
  for b, i in enumerate(ids):
    preferred = _preferred_one(strategies[i], rng, grid, num_masked, params[i])
    mask[b] = rank_to_count(rng, preferred, num_masked)
  return mask, ids


def union(rng, batch, grid, num_masked, *, strategies, shares, params):
  cumulative = np.round(np.cumsum(shares) / np.sum(shares) * num_masked).astype(int)
  counts = np.diff(np.concatenate([[0], cumulative]))
  mask = np.zeros((batch, grid[0] * grid[1]), bool)
  for b in range(batch):
    preferred = np.zeros(grid[0] * grid[1], bool)
    for name, count, p in zip(strategies, counts, params):
      preferred |= _preferred_one(name, rng, grid, int(count), p)
    mask[b] = rank_to_count(rng, preferred, num_masked)
  return mask


def multi_view(rng, batch, grid, num_masked, *, strategies, params):
  return np.stack(
    [SAMPLERS[name](rng, batch, grid, num_masked, **p) for name, p in zip(strategies, params)],
    axis=1,
  )
