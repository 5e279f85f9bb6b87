"""Properties of the masking samplers (docs/method.md §3)."""

import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mms_jax import masking

GRIDS = [(8, 32), (4, 32), (16, 256), (1, 32), (1, 7), (3, 5)]
SAMPLERS = {
  "random_patch": masking.random_patch,
  "blockwise": masking.blockwise,
  "span": masking.span,
  "horizontal_block": masking.horizontal_block,
}
# Hypothesis draws many shapes; each new static shape compiles once, so keep few examples.
settings = hypothesis.settings(max_examples=12, deadline=None, derandomize=True)


def _sample(name, seed, batch, grid, num_masked, **params):
  if name == "horizontal_block":
    params = {"band_columns": 1, "num_bands": 1, **params}
  return np.asarray(SAMPLERS[name](jax.random.key(seed), batch, grid, num_masked, **params))


@pytest.mark.parametrize("name", SAMPLERS)
@hypothesis.given(
  grid=st.sampled_from(GRIDS), ratio=st.floats(0.05, 0.95), seed=st.integers(0, 2**31 - 1)
)
@settings
def test_exact_count_in_every_row(name, grid, ratio, seed):
  num_cells = grid[0] * grid[1]
  num_masked = min(max(1, round(ratio * num_cells)), num_cells - 1)
  mask = _sample(name, seed, 16, grid, num_masked)
  assert mask.shape == (16, num_cells) and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(axis=1), num_masked)


@pytest.mark.parametrize("num_masked", [0, 1, 255, 256])
def test_extreme_counts(num_masked):
  mask = _sample("random_patch", 0, 4, (8, 32), num_masked)
  np.testing.assert_array_equal(mask.sum(axis=1), num_masked)


@pytest.mark.parametrize("name", SAMPLERS)
def test_deterministic_in_the_key(name):
  first = _sample(name, 7, 32, (8, 32), 192)
  again = _sample(name, 7, 32, (8, 32), 192)
  other = _sample(name, 8, 32, (8, 32), 192)
  np.testing.assert_array_equal(first, again)
  assert (first != other).any(axis=1).mean() > 0.9
  # Rows of one batch differ from each other too.
  assert len({row.tobytes() for row in first}) == len(first)


def test_random_patch_is_uniform_over_cells():
  mask = _sample("random_patch", 0, 4096, (8, 32), 64)
  frequency = mask.mean(axis=0)
  expected = 64 / 256
  # 4096 draws per cell: the standard deviation of a frequency is ~0.0068.
  assert np.abs(frequency - expected).max() < 0.035
  assert abs(frequency[:128].mean() - frequency[128:].mean()) < 0.01


def _fully_hidden_fraction(mask, grid):
  cells = mask.reshape(mask.shape[0], *grid)
  full_columns = cells.all(axis=1)
  return (full_columns.sum(axis=1) * grid[0]) / mask.sum(axis=1), full_columns


@hypothesis.given(
  grid=st.sampled_from([(8, 32), (4, 32), (2, 64), (1, 32)]),
  columns=st.integers(1, 24),
  seed=st.integers(0, 2**31 - 1),
)
@settings
def test_span_hides_whole_columns_when_count_is_a_multiple_of_height(grid, columns, seed):
  columns = min(columns, grid[1] - 1)
  mask = _sample("span", seed, 16, grid, columns * grid[0])
  fraction, full_columns = _fully_hidden_fraction(mask, grid)
  np.testing.assert_array_equal(fraction, 1.0)
  np.testing.assert_array_equal(full_columns.sum(axis=1), columns)


@hypothesis.given(
  grid=st.sampled_from([(8, 32), (4, 32), (16, 64)]),
  ratio=st.floats(0.3, 0.9),
  seed=st.integers(0, 2**31 - 1),
)
@settings
def test_span_is_mostly_whole_columns_for_any_count(grid, ratio, seed):
  num_masked = round(ratio * grid[0] * grid[1])
  mask = _sample("span", seed, 16, grid, num_masked)
  fraction, full_columns = _fully_hidden_fraction(mask, grid)
  assert fraction.min() >= 0.9
  np.testing.assert_array_equal(full_columns.sum(axis=1), num_masked // grid[0])


@pytest.mark.parametrize("grid, target", [((8, 32), 12), ((16, 256), 150)])
def test_span_forms_runs_within_the_length_range(grid, target):
  columns = np.asarray(
    masking.span_columns(
      jax.random.key(0), 64, grid, grid[0] * target, min_columns=3, max_columns=5
    )
  )
  np.testing.assert_array_equal(columns.sum(axis=1), target)
  run_lengths = []
  for row in columns:
    padded = np.concatenate([[0], row.astype(int), [0]])
    edges = np.flatnonzero(np.diff(padded))
    run_lengths += list(edges[1::2] - edges[::2])
  run_lengths = np.array(run_lengths)
  # Runs may merge (longer) or be trimmed to fill the last columns (shorter), but a
  # span mask is mostly runs in the configured range, unlike scattered columns.
  assert np.mean(run_lengths >= 3) > 0.8
  assert np.mean(run_lengths == 1) < 0.2  # scattered columns: ~0.6


@pytest.mark.parametrize("band_pixels, patch_width", [(16, 4), (8, 4), (12, 4), (32, 8)])
def test_horizontal_block_band_width_is_pixels_over_patch_width(band_pixels, patch_width):
  config = masking.default_config()
  config.mode, config.strategies = "single", ("horizontal_block",)
  config.horizontal_block.band_pixels = band_pixels
  spec = masking.build_spec(config, (32, 128), (4, patch_width))
  params = dict(spec.params[0])
  assert params["band_columns"] == band_pixels // patch_width
  columns = np.asarray(
    masking.horizontal_block_columns(jax.random.key(3), 512, spec.grid, **params)
  )
  for row in columns:
    hidden = np.flatnonzero(row)
    assert len(hidden) == band_pixels // patch_width
    np.testing.assert_array_equal(np.diff(hidden), 1)  # one contiguous band
  # Every band position is used (uniform start over the grid).
  starts = columns.argmax(axis=1)
  assert set(starts) == set(range(spec.grid[1] - band_pixels // patch_width + 1))
  mask = np.asarray(masking.make_sampler(spec)(jax.random.key(3), 512, spec.num_masked())[0])
  cells = mask.reshape(512, *spec.grid)
  assert (cells.all(axis=1).sum(axis=1) >= band_pixels // patch_width).all()


def test_horizontal_bands_do_not_overlap():
  columns = np.asarray(
    masking.horizontal_block_columns(jax.random.key(0), 256, (8, 32), band_columns=4, num_bands=3)
  )
  np.testing.assert_array_equal(columns.sum(axis=1), 12)


@pytest.mark.parametrize(
  "grid, num_masked", [((8, 32), 192), ((4, 32), 96), ((16, 64), 600), ((1, 64), 40)]
)
def test_blockwise_draws_rectangles_within_the_aspect_range(grid, num_masked):
  hidden, blocks = masking.blockwise_shapes(
    jax.random.key(1), 64, grid, num_masked, min_area=4, min_aspect=0.3, attempts=32
  )
  hidden = np.asarray(hidden).reshape(64, *grid)
  blocks = jax.tree.map(np.asarray, blocks)
  accepted = blocks["accepted"]
  assert accepted.any(axis=1).all()
  h, w = blocks["height"][accepted], blocks["width"][accepted]
  low = masking.blockwise_min_aspect(grid, 0.3)
  assert low == (1 / 63 if grid[0] == 1 else 0.3)
  assert ((h / w >= low - 1e-6) & (h / w <= 1 / low + 1e-6)).all()
  assert (h <= max(1, grid[0] - 1)).all() and (w <= grid[1] - 1).all()
  rebuilt = np.zeros_like(hidden)
  for b, a in zip(*np.nonzero(accepted)):
    top, left = blocks["top"][b, a], blocks["left"][b, a]
    assert top + blocks["height"][b, a] <= grid[0] and left + blocks["width"][b, a] <= grid[1]
    rebuilt[b, top : top + blocks["height"][b, a], left : left + blocks["width"][b, a]] = True
  # The shape set is exactly the union of accepted rectangles, never over the count,
  # and covers most of the count before the top-up.
  np.testing.assert_array_equal(rebuilt, hidden)
  assert (hidden.reshape(64, -1).sum(axis=1) <= num_masked).all()
  assert hidden.reshape(64, -1).sum(axis=1).mean() > 0.85 * num_masked


@pytest.mark.parametrize("grid, num_masked", [((1, 256), 154), ((2, 64), 77)])
def test_blockwise_stays_contiguous_on_thin_grids(grid, num_masked):
  """On one- or two-row grids blocks are runs; a 0.3 aspect bound alone would allow
  only runs of 1-3 cells there, and the mask would be nearly random."""

  def runs_per_row(mask):
    rows = mask.reshape(-1, grid[1]).astype(int)
    return (np.diff(np.pad(rows, ((0, 0), (1, 0))), axis=1) == 1).sum(axis=1).mean()

  shapes, _ = masking.blockwise_shapes(jax.random.key(0), 128, grid, num_masked)
  assert np.asarray(shapes).sum(axis=1).mean() > 0.95 * num_masked  # before the top-up
  block = _sample("blockwise", 0, 128, grid, num_masked)
  patch = _sample("random_patch", 0, 128, grid, num_masked)
  assert runs_per_row(block) < 0.2 * runs_per_row(patch)


def test_blockwise_is_spatially_coherent_unlike_random_patch():
  def neighbours_hidden(mask):
    cells = mask.reshape(-1, 8, 32)
    right = cells[:, :, 1:] & cells[:, :, :-1]
    return right.sum() / cells[:, :, 1:].sum()

  block = _sample("blockwise", 0, 256, (8, 32), 96)
  patch = _sample("random_patch", 0, 256, (8, 32), 96)
  assert neighbours_hidden(block) > neighbours_hidden(patch) + 0.3


def test_rank_to_count_takes_preferred_cells_first():
  preferred = np.zeros((64, 100), bool)
  preferred[:, 10:40] = True
  mask = np.asarray(masking.rank_to_count(jax.random.key(0), jnp.asarray(preferred), 50))
  assert mask[:, 10:40].all()
  np.testing.assert_array_equal(mask.sum(axis=1), 50)
  trimmed = np.asarray(masking.rank_to_count(jax.random.key(0), jnp.asarray(preferred), 20))
  assert not trimmed[:, :10].any() and not trimmed[:, 40:].any()
  # Random order among preferred cells: every preferred cell is sometimes dropped.
  assert trimmed[:, 10:40].mean(axis=0).min() > 0.2


def _spec(**overrides):
  config = masking.default_config()
  config.update(overrides)
  return masking.build_spec(config, (32, 128), (4, 4))


def test_per_sample_strategy_frequencies_match_probabilities():
  spec = _spec(
    mode="per_sample",
    strategies=("random_patch", "blockwise", "span"),
    probabilities=(0.5, 0.3, 0.2),
  )
  mask, ids = masking.make_sampler(spec)(jax.random.key(0), 4096, 192)
  counts = np.bincount(np.asarray(ids), minlength=3)
  _, p_value = stats.chisquare(counts, np.array([0.5, 0.3, 0.2]) * 4096)
  assert p_value > 1e-3, counts
  np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), 192)
  # Each sample's mask has its strategy's character.
  fraction, _ = _fully_hidden_fraction(np.asarray(mask), (8, 32))
  ids = np.asarray(ids)
  assert (fraction[ids == 2] == 1).all()
  assert fraction[ids == 0].mean() < 0.3  # ~0.75**8 * 256 / 192 by chance


def test_union_superimposes_then_ranks_to_the_exact_count():
  spec = _spec(
    mode="union", strategies=("horizontal_block", "random_patch"), shares=(0.25, 0.75), ratio=0.5
  )
  mask, ids = masking.make_sampler(spec)(jax.random.key(0), 64, spec.num_masked())
  mask = np.asarray(mask)
  np.testing.assert_array_equal(mask.sum(axis=1), 128)
  _, full_columns = _fully_hidden_fraction(mask, (8, 32))
  assert (full_columns.sum(axis=1) >= 4).all()  # the 16-pixel band survives
  assert (np.asarray(ids) == -1).all()


def test_multi_view_gives_one_view_per_strategy():
  spec = _spec(mode="multi_view", strategies=("random_patch", "span"))
  mask, ids = masking.make_sampler(spec)(jax.random.key(0), 8, 192)
  mask = np.asarray(mask)
  assert mask.shape == (8, 2, 256)
  np.testing.assert_array_equal(mask.sum(axis=-1), 192)
  np.testing.assert_array_equal(ids, [0, 1])
  assert (_fully_hidden_fraction(mask[:, 1], (8, 32))[0] == 1).all()
  assert (mask[:, 0] != mask[:, 1]).any(axis=1).all()


def test_ids_restore_inverts_the_shuffle():
  mask = jnp.asarray(_sample("blockwise", 0, 32, (8, 32), 150))
  ids_keep, ids_masked, ids_restore = masking.ids_from_mask(mask, 150)
  tokens = jax.random.normal(jax.random.key(1), (32, 256, 3))
  visible = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
  hidden = jnp.take_along_axis(tokens, ids_masked[..., None], axis=1)
  restored = jnp.take_along_axis(
    jnp.concatenate([visible, hidden], axis=1), ids_restore[..., None], axis=1
  )
  np.testing.assert_array_equal(restored, tokens)
  assert not np.asarray(jnp.take_along_axis(mask, ids_keep, axis=1)).any()
  assert np.asarray(jnp.take_along_axis(mask, ids_masked, axis=1)).all()
  assert (np.diff(np.asarray(ids_keep), axis=1) > 0).all()


def test_a_large_batch_is_one_traced_computation():
  spec = _spec()
  sampler = masking.make_sampler(spec)
  traces = []
  original = masking._preferred

  def counting(*args, **kwargs):
    traces.append(args[0])
    return original(*args, **kwargs)

  masking._preferred = counting
  try:
    jaxpr = jax.make_jaxpr(sampler, static_argnums=(1, 2))(jax.random.key(0), 4096, 192)
  finally:
    masking._preferred = original
  # One trace per strategy, independent of the batch size: no Python loop over samples.
  assert sorted(traces) == sorted(spec.strategies)
  assert len(str(jaxpr)) < 200_000
  mask, _ = sampler(jax.random.key(0), 4096, 192)
  np.testing.assert_array_equal(np.asarray(mask).sum(axis=1), 192)
  assert sampler._cache_size() == 1


def test_samplers_compose_with_vmap():
  keys = jax.random.split(jax.random.key(0), 3)
  masks = jax.vmap(lambda k: masking.span(k, 4, (8, 32), 64))(keys)
  assert masks.shape == (3, 4, 256)
  np.testing.assert_array_equal(np.asarray(masks).sum(axis=-1), 64)


def test_progressive_ratio_is_quantised_into_stages():
  spec = _spec(ratio=0.75, ratio_start=0.5, ratio_stages=3)
  counts = [spec.num_masked(step, 300) for step in range(300)]
  assert counts[0] == 128 and counts[-1] == 192
  assert sorted(set(counts)) == spec.counts() == [128, 160, 192]
  assert counts == sorted(counts)
  assert masking.ratio_at(10, 100, ratio=0.75) == 0.75


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(strategies=("random_patch", "bogus")), "strategies[1]"),
    (dict(mode="mixture"), "mode"),
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=0.0), "ratio"),
    (dict(ratio_start=1.5), "ratio_start"),
    (dict(probabilities=(0.5, 0.2, 0.2)), "probabilities"),
    (dict(probabilities=(0.5, 0.5)), "probabilities"),
    (dict(ratio=0.001), "ratio"),
    (dict(mode="single"), "strategies"),
  ],
)
def test_invalid_configs_name_the_field(overrides, field):
  config = masking.default_config()
  config.update(overrides)
  with pytest.raises(masking.MaskingConfigError, match=re.escape(f"masking.{field}=")):
    masking.build_spec(config, (32, 128), (4, 4))


def test_invalid_horizontal_block_and_image_size():
  config = masking.default_config()
  config.strategies = ("horizontal_block",)
  config.mode = "single"
  config.horizontal_block.band_pixels = 10
  with pytest.raises(masking.MaskingConfigError, match="band_pixels.*multiple of the patch"):
    masking.build_spec(config, (32, 128), (4, 4))
  config.horizontal_block.band_pixels = 16
  config.horizontal_block.num_bands = 7
  config.ratio = 0.3
  with pytest.raises(masking.MaskingConfigError, match="num_bands"):
    masking.build_spec(config, (32, 128), (4, 4))
  with pytest.raises(masking.MaskingConfigError, match="not divisible"):
    masking.build_spec(masking.default_config(), (30, 128), (4, 4))
