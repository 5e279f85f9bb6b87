"""Tests for mms_jax.models (vit encoder, MAE / SimMIM heads, loss)."""

import dataclasses
import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax.models import encoder_config
from mms_jax.models import mae
from mms_jax.models import vit

PATCH = (4, 4)
IMAGE = (32, 128)  # 8 x 32 grid
L = 256
NUM_MASKED = 192
TINY_DECODER = dict(decoder_width=32, decoder_depth=1, decoder_num_heads=2)
TINY_ENCODER = encoder_config.EncoderConfig(variant="tiny", **encoder_config.PAPER_VIT)


def exact_masks(seed, shape, num_masked):
  """bool[..., L] with exactly num_masked True per row (independent of mms_jax.masking)."""
  rng = np.random.default_rng(seed)
  ranks = rng.random(shape).argsort(-1).argsort(-1)
  return jnp.asarray(ranks < num_masked)


def random_images(seed, batch, hw=IMAGE, channels=3):
  return jax.random.uniform(jax.random.key(seed), (batch, *hw, channels), minval=-1, maxval=1)


class Model:
  """An initialised module plus a jitted apply with static keyword arguments."""

  def __init__(self, module, images, mask, **kw):
    self.module = module
    self.params = jax.jit(functools.partial(module.init, **kw))(jax.random.key(0), images, mask)[
      "params"
    ]
    self.apply = jax.jit(self._apply, static_argnames=("num_masked",))

  def _apply(self, params, images, mask, num_masked=None):
    return self.module.apply({"params": params}, images, mask, num_masked=num_masked)


@pytest.fixture(scope="module")
def tiny_mae():
  module = mae.MAE(encoder=TINY_ENCODER, **TINY_DECODER)
  return Model(
    module, random_images(0, 1), exact_masks(0, (1, L), NUM_MASKED), num_masked=NUM_MASKED
  )


@pytest.fixture(scope="module")
def tiny_encoder():
  enc = vit.Encoder(variant="tiny", patch=PATCH)
  params = enc.init(jax.random.key(1), random_images(0, 1))["params"]
  apply = jax.jit(lambda p, x, ids: enc.apply({"params": p}, x, ids))
  return enc, params, apply


# ----------------------------------------------------------------------------- patchify


@settings(max_examples=40, deadline=None)
@given(
  b=st.integers(1, 3),
  gh=st.integers(1, 4),
  gw=st.integers(1, 5),
  ph=st.integers(1, 5),
  pw=st.integers(1, 5),
  c=st.integers(1, 3),
)
def test_patchify_unpatchify_inverse(b, gh, gw, ph, pw, c):
  images = np.random.default_rng(0).normal(size=(b, gh * ph, gw * pw, c))
  patches = vit.patchify(images, (ph, pw))
  assert patches.shape == (b, gh * gw, ph * pw * c)
  np.testing.assert_array_equal(vit.unpatchify(patches, (ph, pw), (gh, gw), c), images)
  # Token i * gw + j is grid cell (i, j), flattened in (ph, pw, C) order.
  i, j = gh - 1, gw // 2
  cell = images[:, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw, :]
  np.testing.assert_array_equal(patches[:, i * gw + j], cell.reshape(b, -1))


def test_patchify_rejects_ragged_image():
  with pytest.raises(ValueError):
    vit.patchify(np.zeros((1, 30, 128, 3)), (4, 4))


# ------------------------------------------------------------------------ sin-cos embed


def mae_reference_pos_embed(embed_dim, gh, gw):
  """The MAE formula written out independently: meshgrid(w, h), w coordinate first."""

  def one_axis(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)))
  grid = grid.reshape(2, 1, gh, gw)
  emb = np.concatenate([one_axis(embed_dim // 2, grid[0]), one_axis(embed_dim // 2, grid[1])], 1)
  return np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)


@pytest.mark.parametrize("width,grid", [(64, (8, 32)), (32, (1, 32)), (16, (4, 4)), (48, (4, 64))])
def test_sincos_matches_mae_formula(width, grid):
  emb = vit.sincos_pos_embed_2d(width, grid, cls_token=True)
  assert emb.shape == (1, 1 + grid[0] * grid[1], width) and emb.dtype == np.float32
  np.testing.assert_allclose(emb[0], mae_reference_pos_embed(width, *grid), atol=1e-6)
  assert vit.sincos_pos_embed_2d(width, grid).shape == (1, grid[0] * grid[1], width)


def test_sincos_properties():
  width, (gh, gw) = 32, (3, 5)
  emb = vit.sincos_pos_embed_2d(width, (gh, gw), cls_token=True)[0]
  np.testing.assert_array_equal(emb[0], 0)  # cls entry
  grid = emb[1:].reshape(gh, gw, width)
  q = width // 4
  # First half depends only on the column, second half only on the row.
  np.testing.assert_allclose(
    grid[:, :, : 2 * q], np.broadcast_to(grid[:1, :, : 2 * q], grid[:, :, : 2 * q].shape)
  )
  np.testing.assert_allclose(
    grid[:, :, 2 * q :], np.broadcast_to(grid[:, :1, 2 * q :], grid[:, :, 2 * q :].shape)
  )
  # sin^2 + cos^2 = 1 for each frequency of each half; position 0 is sin 0, cos 1.
  for half in (grid[..., : 2 * q], grid[..., 2 * q :]):
    np.testing.assert_allclose(half[..., :q] ** 2 + half[..., q:] ** 2, 1.0, atol=1e-6)
  np.testing.assert_allclose(grid[0, 0], np.tile(np.r_[np.zeros(q), np.ones(q)], 2))
  assert len({tuple(np.round(r, 5)) for r in emb[1:]}) == gh * gw  # all positions distinct
  with pytest.raises(ValueError):
    vit.sincos_pos_embed_2d(30, (2, 2))


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
  "hw,patch,grid",
  [
    ((32, 128), (4, 4), (8, 32)),
    ((32, 128), (32, 4), (1, 32)),
    ((16, 256), (4, 4), (4, 64)),
    ((32, 128), (8, 2), (4, 64)),
  ],
)
def test_mae_shapes(hw, patch, grid):
  length = grid[0] * grid[1]
  n = (3 * length) // 4
  module = mae.MAE(encoder=dataclasses.replace(TINY_ENCODER, patch=patch), **TINY_DECODER)
  images, mask = random_images(0, 2, hw), exact_masks(0, (2, length), n)
  model = Model(module, images, mask, num_masked=n)
  pred, aux = model.apply(model.params, images, mask, num_masked=n)
  assert pred.shape == (2, length, patch[0] * patch[1] * 3)
  assert aux["encoded"].shape == (2, 1 + length - n, 64)
  assert np.isfinite(np.asarray(pred)).all()
  assert model.params["encoder"]["patch_embed"]["kernel"].shape == (*patch, 3, 64)


def test_encoder_all_tokens_and_intermediates():
  enc = vit.Encoder(variant="tiny", patch=(32, 4), return_blocks=True)
  images = random_images(0, 2)
  out, aux = jax.eval_shape(lambda x: enc.init_with_output(jax.random.key(0), x)[0], images)
  assert out.shape == (2, 33, 64) and aux["pre_norm"].shape == (2, 33, 64)
  assert aux["blocks"].shape == (2, 2, 33, 64)


def test_variants_dims():
  assert vit.VARIANTS["S"] == (384, 12, 6) and vit.VARIANTS["B"] == (768, 12, 12)
  assert vit.VARIANTS["Ti"] == (192, 12, 3)
  assert vit.Encoder(variant="S", depth=2).dims() == (384, 2, 6)


def test_bf16_compute_f32_params():
  enc = vit.Encoder(variant="tiny", dtype=jnp.bfloat16)
  (out, _), variables = jax.eval_shape(
    lambda x: enc.init_with_output(jax.random.key(0), x), random_images(0, 1)
  )
  assert out.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}


# -------------------------------------------------------------------- masking behaviour


def test_hidden_patches_never_reach_encoder(tiny_mae, tiny_encoder):
  from mms_jax.masking import ids_from_mask

  images = random_images(3, 2)
  mask = exact_masks(3, (2, L), NUM_MASKED)
  pixel_mask = vit.unpatchify(jnp.repeat(mask[..., None], 48, -1), PATCH, (8, 32), 3)
  changed = jnp.where(pixel_mask, random_images(4, 2) * 7.0, images)
  assert not np.array_equal(changed, images)

  enc, params, apply = tiny_encoder
  ids_keep = ids_from_mask(mask, NUM_MASKED)[0]
  a, _ = apply(params, images, ids_keep)
  b, _ = apply(params, changed, ids_keep)
  np.testing.assert_array_equal(a, b)

  pa, _ = tiny_mae.apply(tiny_mae.params, images, mask, num_masked=NUM_MASKED)
  pb, _ = tiny_mae.apply(tiny_mae.params, changed, mask, num_masked=NUM_MASKED)
  np.testing.assert_array_equal(pa, pb)
  # Visible pixels do matter.
  pc, _ = tiny_mae.apply(
    tiny_mae.params, jnp.where(pixel_mask, images, 0.0), mask, num_masked=NUM_MASKED
  )
  assert not np.allclose(pa, pc)


def test_encoder_tokens_are_the_visible_ones(tiny_encoder):
  """ids_keep selects tokens with their own positions: keeping every token in a
  permuted order gives the full pass's tokens, permuted (attention is permutation-equivariant)."""
  enc, params, apply = tiny_encoder
  images = random_images(5, 1)
  perm = jnp.asarray(np.random.default_rng(0).permutation(L))[None].astype(jnp.int32)
  full, _ = apply(params, images, None)
  permuted, _ = apply(params, images, perm)
  np.testing.assert_allclose(permuted[:, 1:], full[:, 1:][:, perm[0]], atol=1e-5)
  np.testing.assert_allclose(permuted[:, 0], full[:, 0], atol=1e-5)


# --------------------------------------------------------------------------------- loss


def numpy_loss(images, pred, mask, patch, norm_pix, visible_weight, eps=1e-6):
  images, pred, mask = (np.asarray(a, np.float64) for a in (images, pred, mask))
  b, h, w, c = images.shape
  ph, pw = patch
  hidden_sum = hidden_n = vis_sum = vis_n = 0.0
  per_sample = []
  for s in range(b):
    hs = hn = vs = vn = 0.0
    for i in range(h // ph):
      for j in range(w // pw):
        t = images[s, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw, :].reshape(-1)
        if norm_pix:
          t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + eps)
        e = np.mean((pred[s, i * (w // pw) + j] - t) ** 2)
        if mask[s, i * (w // pw) + j]:
          hs, hn = hs + e, hn + 1
        else:
          vs, vn = vs + e, vn + 1
    per_sample.append(hs / max(hn, 1) + visible_weight * vs / max(vn, 1))
    hidden_sum, hidden_n, vis_sum, vis_n = hidden_sum + hs, hidden_n + hn, vis_sum + vs, vis_n + vn
  loss = hidden_sum / max(hidden_n, 1) + visible_weight * vis_sum / max(vis_n, 1)
  return loss, np.array(per_sample)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("visible_weight", [0.0, 0.3])
def test_loss_matches_numpy(norm_pix, visible_weight):
  rng = np.random.default_rng(7)
  patch = (2, 3)
  images = rng.normal(size=(3, 4, 6, 2)).astype(np.float32)  # grid 2 x 2, P = 12
  pred = rng.normal(size=(3, 4, 12)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]], bool)  # uneven counts too
  loss, aux = mae.mae_loss(
    images, pred, mask, patch, norm_pix=norm_pix, visible_weight=visible_weight
  )
  ref, ref_per_sample = numpy_loss(images, pred, mask, patch, norm_pix, visible_weight)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(aux["per_sample"], ref_per_sample, rtol=1e-5)
  assert loss.shape == () and aux["per_sample"].shape == (3,)


def test_loss_zero_for_perfect_prediction():
  images = random_images(0, 2, (8, 8))
  target = vit.patchify(images, PATCH)
  mean, var = target.mean(-1, keepdims=True), target.var(-1, keepdims=True, ddof=1)
  pred = (target - mean) / jnp.sqrt(var + 1e-6)
  loss, _ = mae.mae_loss(images, pred, jnp.ones((2, 4), bool), PATCH, visible_weight=1.0)
  assert float(loss) < 1e-10


def test_multi_view_loss_is_mean_of_view_losses(tiny_mae):
  b, v = 2, 3
  images = random_images(8, b)
  masks = exact_masks(8, (b, v, L), NUM_MASKED)
  pred, aux = tiny_mae.apply(tiny_mae.params, images, masks, num_masked=NUM_MASKED)
  assert pred.shape == (b, v, L, 48) and aux["encoded"].shape == (b * v, 65, 64)
  loss, laux = mae.mae_loss(images, pred, masks, PATCH, visible_weight=0.1)
  view_losses, view_samples = [], []
  for j in range(v):
    pj, _ = tiny_mae.apply(tiny_mae.params, images, masks[:, j], num_masked=NUM_MASKED)
    np.testing.assert_allclose(pj, pred[:, j], atol=1e-5)
    lj, aj = mae.mae_loss(images, pj, masks[:, j], PATCH, visible_weight=0.1)
    view_losses.append(lj)
    view_samples.append(aj["per_sample"])
  np.testing.assert_allclose(loss, np.mean(view_losses), rtol=1e-5)
  np.testing.assert_allclose(laux["per_view"], np.stack(view_samples, 1), rtol=1e-5)
  np.testing.assert_allclose(laux["per_sample"], np.mean(view_samples, 0), rtol=1e-5)


# ------------------------------------------------------------------------------- simmim


def test_simmim_uses_mask_token():
  module = mae.MAE(encoder=TINY_ENCODER, encoder_mode="simmim")
  images = random_images(9, 2)
  mask = jnp.asarray(np.random.default_rng(9).random((2, L)) < np.array([[0.3], [0.8]]))
  model = Model(module, images, mask)
  assert "decoder" not in model.params
  assert model.params["simmim_mask_token"].shape == (1, 1, 64)
  pred, aux = model.apply(model.params, images, mask)
  assert pred.shape == (2, L, 48) and aux["encoded"].shape == (2, 1 + L, 64)
  # Hidden pixels are replaced, so they cannot matter; the mask token does.
  pixel_mask = vit.unpatchify(jnp.repeat(mask[..., None], 48, -1), PATCH, (8, 32), 3)
  pred2, _ = model.apply(model.params, jnp.where(pixel_mask, 5.0, images), mask)
  np.testing.assert_array_equal(pred, pred2)
  params = dict(model.params, simmim_mask_token=model.params["simmim_mask_token"] + 1.0)
  pred3, _ = model.apply(params, images, mask)
  assert not np.allclose(pred, pred3)
  loss, _ = mae.mae_loss(images, pred, mask, PATCH)
  assert np.isfinite(loss)


# --------------------------------------------------------------------- scan / params


def test_scan_matches_unscanned(tiny_mae):
  module = mae.MAE(encoder=TINY_ENCODER, scan_layers=True, **TINY_DECODER)
  scanned = vit.scan_params(tiny_mae.params)
  assert scanned["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 64, 192)
  images, mask = random_images(10, 2), exact_masks(10, (2, L), NUM_MASKED)
  ref, _ = tiny_mae.apply(tiny_mae.params, images, mask, num_masked=NUM_MASKED)
  out, _ = jax.jit(lambda p: module.apply({"params": p}, images, mask, num_masked=NUM_MASKED))(
    scanned
  )
  np.testing.assert_allclose(out, ref, atol=1e-5)
  back = vit.unscan_params(scanned)
  assert vit.param_names(back) == vit.param_names(tiny_mae.params)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tiny_mae.params)):
    np.testing.assert_array_equal(x, y)
  # A scanned model's own init has the same layout as the conversion.
  init_shapes = jax.eval_shape(
    lambda: module.init(jax.random.key(0), images, mask, num_masked=NUM_MASKED)
  )["params"]
  assert vit.param_names(init_shapes) == vit.param_names(scanned)


BLOCK = [
  ("attn/proj/bias", (64,)),
  ("attn/proj/kernel", (64, 64)),
  ("attn/qkv/bias", (192,)),
  ("attn/qkv/kernel", (64, 192)),
  ("mlp/fc1/bias", (256,)),
  ("mlp/fc1/kernel", (64, 256)),
  ("mlp/fc2/bias", (64,)),
  ("mlp/fc2/kernel", (256, 64)),
  ("norm1/bias", (64,)),
  ("norm1/scale", (64,)),
  ("norm2/bias", (64,)),
  ("norm2/scale", (64,)),
]
DECODER_BLOCK = [(k, tuple(32 if s == 64 else s // 2 for s in shape)) for k, shape in BLOCK]

TINY_MAE_PARAM_NAMES = sorted(
  [("decoder/blocks_0/" + k, s) for k, s in DECODER_BLOCK]
  + [
    ("decoder/embed/bias", (32,)),
    ("decoder/embed/kernel", (64, 32)),
    ("decoder/mask_token", (1, 1, 32)),
    ("decoder/norm/bias", (32,)),
    ("decoder/norm/scale", (32,)),
    ("decoder/pred/bias", (48,)),
    ("decoder/pred/kernel", (32, 48)),
  ]
  + [(f"encoder/blocks_{i}/" + k, s) for i in range(2) for k, s in BLOCK]
  + [
    ("encoder/cls_token", (1, 1, 64)),
    ("encoder/norm/bias", (64,)),
    ("encoder/norm/scale", (64,)),
    ("encoder/patch_embed/bias", (64,)),
    ("encoder/patch_embed/kernel", (4, 4, 3, 64)),
  ]
)


def test_param_names_snapshot(tiny_mae):
  assert vit.param_names(tiny_mae.params) == TINY_MAE_PARAM_NAMES
  # The encoder alone has exactly the MAE's encoder subtree (fine-tuning loads it).
  enc_shapes = jax.eval_shape(
    lambda x: vit.Encoder(variant="tiny").init(jax.random.key(0), x), random_images(0, 1)
  )["params"]
  assert vit.param_names(enc_shapes) == vit.param_names(tiny_mae.params["encoder"])


def test_tanh_gelu_option_is_close(tiny_mae):
  images, mask = random_images(11, 1), exact_masks(11, (1, L), NUM_MASKED)
  module = mae.MAE(encoder=TINY_ENCODER, gelu="tanh", **TINY_DECODER)
  out, _ = jax.jit(lambda p: module.apply({"params": p}, images, mask, num_masked=NUM_MASKED))(
    tiny_mae.params
  )
  ref, _ = tiny_mae.apply(tiny_mae.params, images, mask, num_masked=NUM_MASKED)
  assert not np.array_equal(out, ref)
  np.testing.assert_allclose(out, ref, atol=1e-2)


# ------------------------------------------------------- attention formulations (perf)
# The chunked attention (default on CPU, docs/performance.md) must compute the same
# function and the same gradients as the straightforward einsum + softmax.


def _attention_grads(fn, q, k, v, g):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _chunked_bhtd(chunk_bytes):
  """chunked_attention with the plain [B, H, T, hd] layout of plain_attention."""

  def fn(q, k, v):
    swap = lambda x: x.transpose(1, 0, 2, 3)
    return swap(vit.chunked_attention(swap(q), swap(k), swap(v), chunk_bytes))

  return fn


def _max_rel_err(a, b):
  return max(
    float(jnp.max(jnp.abs(jnp.float32(x) - jnp.float32(y))) / jnp.max(jnp.abs(jnp.float32(y))))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


@pytest.mark.parametrize("shape", [(2, 4, 17, 8), (3, 6, 65, 16), (1, 2, 257, 32)])
@pytest.mark.parametrize("chunk_bytes", [1, 2**14, 2**30])  # a loop per head ... one call
def test_chunked_attention_matches_plain(shape, chunk_bytes):
  rng = np.random.default_rng(0)
  q, k, v, g = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]
  ref = _attention_grads(vit.plain_attention, q, k, v, g)
  out = _attention_grads(_chunked_bhtd(chunk_bytes), q, k, v, g)
  assert _max_rel_err(out, ref) < 2e-6  # value and dq, dk, dv


def test_chunked_attention_chunks():
  assert vit._heads_per_chunk((16, 16, 257, 32), 2**21) == 1  # MAE decoder: a loop per head
  assert vit._heads_per_chunk((6, 16, 65, 64), 2**21) == 6  # ViT-S encoder: one call
  assert vit._heads_per_chunk((6, 64, 65, 64), 2**21) == 1
  assert vit._heads_per_chunk((6, 32, 65, 64), 2**21) == 3
  # The default, with the CPU micro-batches of 4: the ViT-S/4 decoder in two calls of 8 heads.
  assert vit._heads_per_chunk((16, 4, 257, 32), vit.ATTENTION_CHUNK_BYTES) == 8
  assert vit.resolve_attention("auto") == {"cpu": "chunked", "gpu": "fused"}.get(
    jax.default_backend(), "plain"
  )
  assert vit.resolve_attention("plain") == "plain"
  with pytest.raises(ValueError, match="attention must be one of"):
    vit.resolve_attention("flash")


def test_chunked_attention_bf16_is_as_accurate_as_plain():
  rng = np.random.default_rng(1)
  q, k, v, g = [jnp.asarray(rng.standard_normal((3, 6, 65, 16)), jnp.bfloat16) for _ in range(4)]
  exact = _attention_grads(vit.plain_attention, *[x.astype(jnp.float32) for x in (q, k, v)], g)
  plain = _max_rel_err(_attention_grads(vit.plain_attention, q, k, v, g), exact)
  for chunk_bytes in (1, 2**30):
    chunked = _max_rel_err(_attention_grads(_chunked_bhtd(chunk_bytes), q, k, v, g), exact)
    assert chunked < max(2 * plain, 1e-2), (chunked, plain)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mae_attention_impls_agree(tiny_mae, monkeypatch, scan_layers):
  """Whole model, loss and parameter gradients: 'chunked' (one call, and a loop per
  head) equals 'plain'."""
  images, mask = random_images(12, 3), exact_masks(12, (3, L), NUM_MASKED)
  params = vit.scan_params(tiny_mae.params) if scan_layers else tiny_mae.params

  def loss_and_grads(attention):
    module = mae.MAE(
      encoder=TINY_ENCODER, attention=attention, scan_layers=scan_layers, **TINY_DECODER
    )

    def loss(p):
      pred, _ = module.apply({"params": p}, images, mask, num_masked=NUM_MASKED)
      return mae.mae_loss(images, pred, mask, PATCH)[0]

    return jax.jit(jax.value_and_grad(loss))(params)

  ref = loss_and_grads("plain")
  assert _max_rel_err(loss_and_grads("chunked"), ref) < 1e-5
  assert _max_rel_err(loss_and_grads("fused"), ref) < 1e-5
  monkeypatch.setattr(vit, "ATTENTION_CHUNK_BYTES", 1)  # force the per-head loop
  assert _max_rel_err(loss_and_grads("chunked"), ref) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_with_the_alibi_bias_matches_plain(dtype):
  """The encoder with 'fused' attention (jax.nn.dot_product_attention, the GPU default)
  and the 2-D ALiBi bias: outputs and parameter gradients as with 'plain'."""
  images = random_images(3, 2)

  def out_and_grads(attention):
    encoder = vit.Encoder(
      variant=None,
      width=32,
      depth=2,
      num_heads=4,
      patch=(8, 4),
      attention_bias="alibi_2d",
      attention=attention,
      dtype=dtype,
    )
    params = encoder.init(jax.random.key(0), images)
    keep = jnp.asarray(np.random.default_rng(0).permutation(64)[:40].reshape(2, 20))

    def loss(p):
      return jnp.sum(jnp.sin(encoder.apply(p, images, keep)[0].astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss))(params)

  tolerance = 1e-5 if dtype == "float32" else 3e-2
  assert _max_rel_err(out_and_grads("fused"), out_and_grads("plain")) < tolerance
