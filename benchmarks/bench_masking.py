"""Masking samplers: jitted JAX vs per-sample numpy references (batch 256, 8x32 grid).

Prints two markdown tables:
  1. ms per batch of every sampler (mode 'single' per strategy, then per_sample, union,
     multi_view), the numpy reference, the speed-up, whether every row has exactly the
     count, and the shortfall of the plain BEiT-style generator;
  2. how much of the count the shapes cover before the top-up (blockwise rectangles,
     span runs) on several grids, for JAX and the reference (a statistical
     cross-check that both implement the same algorithm).

Times are min and median over --repeats calls after a warm-up call, with
block_until_ready; the minimum is the least noisy on a shared machine.

  python benchmarks/bench_masking.py [--batch 256] [--grid 8,32] [--ratio 0.75]
      [--repeats 50] [--ref_repeats 5] [--coverage_grids 8x32,4x32,1x64,16x256]
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

from mms_jax import masking

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_masking as ref

# (label, masking config overrides). Configs are validated with an image of grid * 4.
SAMPLERS = [
  ("random_patch", dict(mode="single", strategies=("random_patch",))),
  ("blockwise", dict(mode="single", strategies=("blockwise",))),
  ("span", dict(mode="single", strategies=("span",))),
  ("horizontal_block", dict(mode="single", strategies=("horizontal_block",))),
  ("per_sample (patch, block, span)", dict(mode="per_sample")),
  ("union (h. block + patch)", dict(mode="union", strategies=("horizontal_block", "random_patch"))),
  ("multi_view (patch, block, span), 3 views", dict(mode="multi_view")),
]
PATCH = (4, 4)


def _spec(overrides, grid, ratio):
  config = masking.default_config()
  config.update(overrides)
  config.ratio = ratio
  return masking.build_spec(config, (grid[0] * PATCH[0], grid[1] * PATCH[1]), PATCH)


def _reference(spec):
  """The numpy reference of a spec: (rng, batch, num_masked) -> mask."""
  params = [dict(p) for p in spec.params]
  names = spec.strategies
  if spec.mode == "single":
    return lambda rng, b, n: ref.SAMPLERS[names[0]](rng, b, spec.grid, n, **params[0])
  if spec.mode == "per_sample":
    return lambda rng, b, n: ref.per_sample(
      rng, b, spec.grid, n, strategies=names, probabilities=spec.probabilities, params=params
    )[0]
  if spec.mode == "union":
    return lambda rng, b, n: ref.union(
      rng, b, spec.grid, n, strategies=names, shares=spec.shares, params=params
    )
  return lambda rng, b, n: ref.multi_view(rng, b, spec.grid, n, strategies=names, params=params)


def _times(fn, repeats):
  fn(0)  # warm-up: compilation
  times = []
  for i in range(1, repeats + 1):
    start = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - start)
  return 1e3 * np.min(times), 1e3 * np.median(times)


def _exact(mask, num_masked):
  return bool((np.asarray(mask).sum(axis=-1) == num_masked).all())


def speed_table(batch, grid, ratio, repeats, ref_repeats):
  rows = []
  for label, overrides in SAMPLERS:
    spec = _spec(overrides, grid, ratio)
    count = spec.num_masked()
    sampler = masking.make_sampler(spec)
    reference = _reference(spec)
    keys = jax.random.split(jax.random.key(0), repeats + 1)
    jax_min, jax_med = _times(
      lambda i: jax.block_until_ready(sampler(keys[i], batch, count)), repeats
    )
    ref_min, ref_med = _times(
      lambda i: reference(np.random.default_rng(i), batch, count), ref_repeats
    )
    exact = _exact(sampler(keys[0], batch, count)[0], count) and _exact(
      reference(np.random.default_rng(0), batch, count), count
    )
    rows.append((label, jax_min, jax_med, ref_min, ref_med, exact))

  spec = _spec(SAMPLERS[1][1], grid, ratio)
  count = spec.num_masked()
  beit = {}
  for min_area in (4, 16):  # 4: our default; 16: BEiT's
    fn = lambda i, a=min_area: ref.beit_blockwise(
      np.random.default_rng(i), batch, grid, count, min_area=a
    )
    times = _times(fn, ref_repeats)
    masks = np.concatenate([fn(i) for i in range(4)])
    counts = masks.sum(axis=1)
    beit[min_area] = (times, np.mean(counts < count), counts.min())

  print(
    f"\nbatch {batch}, grid {grid[0]}x{grid[1]}, ratio {ratio} ({count} hidden of "
    f"{grid[0] * grid[1]} cells); ms per batch, min / median over {repeats} (JAX) "
    f"and {ref_repeats} (numpy) calls\n"
  )
  print("| sampler | jax ms/batch | numpy reference ms/batch | speed-up (min) | exact count? |")
  print("| --- | --- | --- | --- | --- |")
  for label, jax_min, jax_med, ref_min, ref_med, exact in rows:
    print(
      f"| {label} | {jax_min:.3f} / {jax_med:.3f} | {ref_min:.1f} / {ref_med:.1f} | "
      f"{ref_min / jax_min:,.0f}x | {'yes' if exact else 'NO'} |"
    )
  for min_area, ((ref_min, ref_med), short, lowest) in beit.items():
    print(
      f"| plain BEiT-style blockwise, min_area {min_area}, no top-up | - | "
      f"{ref_min:.1f} / {ref_med:.1f} | - | no: {100 * short:.0f}% of samples short "
      f"(lowest {lowest}) |"
    )
  return rows


def _span_runs(rng, batch, grid, num_masked, params):
  """The span runs before the random column fill (rank_to_count bypassed)."""
  original = masking.rank_to_count
  masking.rank_to_count = lambda rng, preferred, count: preferred
  try:
    return np.asarray(masking.span_columns(rng, batch, grid, num_masked, **params))
  finally:
    masking.rank_to_count = original


def coverage_table(grids, batch, ratio):
  config = masking.default_config()
  block_params, span_params = dict(config.blockwise), dict(config.span)
  print(
    f"\nshape coverage before the top-up, ratio {ratio}: mean fraction of the "
    f"count (blockwise) or of the floor(count / gh) columns (span), and % of samples "
    f"fully covered; JAX over {batch} samples | numpy reference over {batch}\n"
  )
  print(
    "| grid | count | blockwise (jax) | blockwise (reference) | span runs (jax) | "
    "span runs (reference) |"
  )
  print("| --- | --- | --- | --- | --- | --- |")
  rows = []
  for grid in grids:
    count = masking.count_for_ratio(ratio, grid[0] * grid[1])
    target = count // grid[0]
    rng = np.random.default_rng(0)
    hidden, _ = masking.blockwise_shapes(jax.random.key(0), batch, grid, count, **block_params)
    block_jax = np.asarray(hidden).sum(axis=1) / count
    block_ref = (
      np.array(
        [ref.blockwise_shapes_one(rng, grid, count, **block_params).sum() for _ in range(batch)]
      )
      / count
    )
    span_jax = _span_runs(jax.random.key(1), batch, grid, count, span_params).sum(1) / target
    span_ref = (
      np.array([ref.span_runs_one(rng, grid, count, **span_params).sum() for _ in range(batch)])
      / target
    )
    cells = [
      f"{c.mean():.3f} ({100 * np.mean(c == 1):.0f}%)"
      for c in (block_jax, block_ref, span_jax, span_ref)
    ]
    print(f"| {grid[0]}x{grid[1]} | {count} | " + " | ".join(cells) + " |")
    rows.append((grid, block_jax, block_ref, span_jax, span_ref))
  return rows


def _grid(text, sep):
  return tuple(int(v) for v in text.split(sep))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--grid", default="8,32", help="gh,gw in patches (patch 4x4)")
  parser.add_argument("--ratio", type=float, default=0.75)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--ref_repeats", type=int, default=5)
  parser.add_argument("--coverage_grids", default="8x32,4x32,1x64,16x256")
  parser.add_argument("--coverage_batch", type=int, default=256)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
  speed_table(args.batch, _grid(args.grid, ","), args.ratio, args.repeats, args.ref_repeats)
  if args.coverage_grids:
    coverage_table(
      [_grid(g, "x") for g in args.coverage_grids.split(",")], args.coverage_batch, args.ratio
    )


if __name__ == "__main__":
  main()
