"""The locality options of the encoder, the masked convolutional stem (model.stem='conv')
and the 2-D ALiBi bias (model.attention_bias='alibi_2d'): strides, no leak of hidden
pixels in either encoder mode, the bias against a direct computation, and both options
through pretraining, every fine-tuning program, layer decay and the PyTorch converter
(a clear refusal)."""

from conftest import load_config
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax import convert as cv
from mms_jax.masking import ids_from_mask
from mms_jax.models import encoder_config
from mms_jax.models import mae
from mms_jax.models import vit
from mms_jax.train import common
from mms_jax.train import finetune
from mms_jax.train import pretrain
from mms_jax.train import probe
from mms_jax.train import recognition
from mms_jax.train import segmentation
from mms_jax.train import super_resolution

IMAGE = (32, 128)


def exact_masks(seed, batch, length, num_masked):
  ranks = np.random.default_rng(seed).random((batch, length)).argsort(-1).argsort(-1)
  return jnp.asarray(ranks < num_masked)


def pixel_mask(mask, patch, grid):
  """bool[B, L] -> bool[B, H, W, 1] (True on the pixels of hidden patches)."""
  (ph, pw), (gh, gw) = patch, grid
  m = mask.reshape(-1, gh, 1, gw, 1)
  return jnp.broadcast_to(m, (m.shape[0], gh, ph, gw, pw)).reshape(-1, gh * ph, gw * pw, 1)


@pytest.mark.parametrize(
  "patch,strides",
  [
    ((4, 4), ((2, 2), (2, 2))),
    ((8, 4), ((2, 2), (2, 2), (2, 1))),
    ((4, 8), ((2, 2), (2, 2), (1, 2))),
    ((2, 1), ((2, 1),)),
  ],
)
def test_stem_strides_multiply_out_to_the_patch(patch, strides):
  assert vit.stem_strides(patch) == strides
  assert tuple(int(np.prod([s[i] for s in strides])) for i in (0, 1)) == patch


def test_stem_refuses_patches_it_cannot_tile():
  with pytest.raises(ValueError, match="power-of-two"):
    vit.stem_strides((6, 4))
  config = load_config("pretrain", "tiny")
  config.model.encoder.update(stem="conv", patch=(6, 4))
  with pytest.raises(common.ConfigError, match="config.model.encoder.patch"):
    pretrain.check_config(config)
  config.model.encoder.update(patch=(4, 4), stem_channels=(8, 8, 8))
  with pytest.raises(common.ConfigError, match="stem_channels.*2 stages"):
    pretrain.build_model(config)
  config.model.encoder.update(stem="convolution", stem_channels=())
  with pytest.raises(common.ConfigError, match="config.model.encoder.stem="):
    pretrain.build_model(config)


@pytest.mark.parametrize("patch", [(4, 4), (8, 4)])
def test_hidden_pixels_never_reach_the_encoder(patch):
  """Changing only hidden pixels leaves the MAE encoder output (token dropping) and the
  SimMIM encoder output (mask token) bit-identical; visible pixels do change them."""
  grid = vit.grid_shape(IMAGE, patch)
  length = grid[0] * grid[1]
  num_masked = length * 3 // 4
  images = jax.random.uniform(jax.random.key(0), (2, *IMAGE, 3), minval=-1, maxval=1)
  mask = exact_masks(1, 2, length, num_masked)
  hidden = pixel_mask(mask, patch, grid)
  noise = jax.random.normal(jax.random.key(2), images.shape) * 5.0
  changed = jnp.where(hidden, noise, images)
  changed_visible = jnp.where(hidden, images, noise)

  enc = vit.Encoder(
    variant=None,
    width=32,
    depth=2,
    num_heads=2,
    patch=patch,
    stem="conv",
    attention_bias="alibi_2d",
  )
  ids_keep = ids_from_mask(mask, num_masked)[0]
  params = enc.init(jax.random.key(3), images, ids_keep)
  apply = jax.jit(lambda x: enc.apply(params, x, ids_keep)[0])
  np.testing.assert_array_equal(apply(images), apply(changed))
  assert not np.allclose(apply(images), apply(changed_visible))

  token = jnp.full((32,), 0.5)
  simmim = jax.jit(lambda x: enc.apply(params, x, mask=mask, mask_token=token)[0])
  np.testing.assert_array_equal(simmim(images), simmim(changed))
  assert not np.allclose(simmim(images), simmim(changed_visible))

  # The whole MAE (encoder + decoder) in both modes.
  for mode in ("mae", "simmim"):
    model = mae.MAE(
      encoder=encoder_config.EncoderConfig(
        width=32, depth=1, num_heads=2, patch=patch, stem="conv", attention_bias="alibi_2d"
      ),
      decoder_width=32,
      decoder_depth=1,
      decoder_num_heads=2,
      encoder_mode=mode,
    )
    v = model.init(jax.random.key(4), images, mask, num_masked=num_masked)
    run = jax.jit(lambda x, v=v, model=model: model.apply(v, x, mask, num_masked=num_masked)[0])
    np.testing.assert_array_equal(run(images), run(changed))


def test_full_image_pass_matches_all_visible_tokens():
  """Fine-tuning (no mask) equals the masked path with every patch visible."""
  enc = vit.Encoder(
    variant=None,
    width=32,
    depth=1,
    num_heads=2,
    patch=(8, 4),
    stem="conv",
    attention_bias="alibi_2d",
  )
  images = jax.random.uniform(jax.random.key(0), (1, *IMAGE, 3), minval=-1, maxval=1)
  params = enc.init(jax.random.key(1), images)
  all_ids = jnp.arange(128)[None]
  np.testing.assert_allclose(
    enc.apply(params, images)[0], enc.apply(params, images, all_ids)[0], atol=1e-6
  )


@pytest.fixture(scope="module")
def conv_pretrain_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("conv_pretrain")
  config = load_config("pretrain", "tiny")
  config.model.encoder.update(stem="conv", patch=(8, 4), attention_bias="alibi_2d")
  config.total_steps, config.picture_every, config.checkpoint.every = 2, 0, 2
  pretrain.train_and_evaluate(config, str(workdir))
  return workdir


def _encoder_leaves(path):
  return jax.tree.map(np.asarray, checkpoints.load_params(path))["encoder"]


@pytest.mark.parametrize("program", ["recognition", "segmentation", "super_resolution", "probe"])
def test_every_program_fine_tunes_a_conv_stem_encoder(conv_pretrain_dir, tmp_path, program):
  module, name = {
    "recognition": (recognition, "finetune_recognition"),
    "segmentation": (segmentation, "finetune_segmentation"),
    "super_resolution": (super_resolution, "finetune_sr"),
    "probe": (probe, "probe"),
  }[program]
  config = load_config(name, "tiny")
  config.model.encoder.update(stem="conv", patch=(8, 4), attention_bias="alibi_2d")
  config.data.size = dict(train=32, val=8, test_heldout_fonts=8, test_hard=8)
  config.total_steps = 1
  config.init_from = str(conv_pretrain_dir)
  if program == "recognition":
    config.model.head = "ctc"
    config.eval.splits = ("test_hard",)
  result = module.train_and_evaluate(config, str(tmp_path))
  pretrained = _encoder_leaves(conv_pretrain_dir)
  assert "stem" in pretrained
  if program == "probe":  # the probe keeps no checkpoint: its encoder is the loaded one
    assert result.metrics
    return
  tuned = _encoder_leaves(tmp_path)
  assert jax.tree.structure(tuned) == jax.tree.structure(pretrained)


def test_layer_decay_puts_the_stem_with_the_patch_embedding():
  enc = vit.Encoder(variant=None, width=32, depth=2, num_heads=2, patch=(4, 4), stem="conv")
  params = {"encoder": enc.init(jax.random.key(0), jnp.zeros((1, *IMAGE, 3)))["params"]}
  scales = finetune.layer_lr_scales(params, 0.5)
  flat = flax.traverse_util.flatten_dict(scales["encoder"], sep="/")
  stem = [v for k, v in flat.items() if k.startswith("stem/")]
  assert len(stem) == 10  # 2 stages x (conv, norm) x 2 + proj x 2
  assert all(float(np.max(v)) == pytest.approx(0.5**3) for v in stem)


def test_converter_refuses_a_conv_stem_with_the_reason(tmp_path):
  model = mae.MAE(
    encoder=encoder_config.EncoderConfig(
      width=32, depth=1, num_heads=2, patch=(4, 4), stem="conv", attention_bias="none"
    ),
    decoder_width=32,
    decoder_depth=1,
    decoder_num_heads=2,
  )
  mask = exact_masks(0, 1, 256, 192)
  params = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE, 3)), mask, num_masked=192)["params"]
  config = cv.ModelConfig(image_size=IMAGE, num_heads=2, decoder_num_heads=2)
  for export in (cv.to_timm_state_dict, cv.to_mae_state_dict):
    with pytest.raises(cv.ConversionError, match="convolutional stem.*stem='patch'"):
      export(params, config)
  with pytest.raises(cv.ConversionError, match="convolutional stem"):
    cv.to_hf_vitmae(params, config, tmp_path / "hf")
  # The bias has no params: the run config is what says it is there.
  # (A run config of today, and a flat one of 2026-12-05 and before.)
  encoder = {"attention_bias": "alibi_2d", "patch": (4, 4)}
  for model in ({"encoder": dict(encoder_config.DEFAULT, **encoder)}, encoder):
    with pytest.raises(cv.ConversionError, match="attention_bias='alibi_2d'.*no attention bias"):
      cv.ModelConfig.from_run_config({"image_size": IMAGE, "model": model})


def test_alibi_bias_is_the_distance_penalty_of_the_kept_tokens():
  grid, patch, heads = (4, 32), (8, 4), 4
  ids_keep = jnp.asarray([[0, 5, 37, 127], [3, 64, 65, 100]])
  bias = np.asarray(vit.alibi_2d_bias(grid, patch, heads, ids_keep))
  assert bias.shape == (heads, 2, 5, 5)
  assert np.all(bias[:, :, 0] == 0) and np.all(bias[:, :, :, 0] == 0)  # cls
  slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)
  for b in range(2):
    for i, ti in enumerate(np.asarray(ids_keep[b])):
      for j, tj in enumerate(np.asarray(ids_keep[b])):
        (ri, ci), (rj, cj) = divmod(int(ti), 32), divmod(int(tj), 32)
        distance = np.hypot(2 * (ri - rj), ci - cj)  # 8x4 patches: rows 2 units apart
        np.testing.assert_allclose(bias[:, b, i + 1, j + 1], -slopes * distance, rtol=1e-6)
  full = np.asarray(vit.alibi_2d_bias(grid, patch, heads))
  np.testing.assert_allclose(
    full[:, 0][:, 1:, 1:][:, [0, 5]][:, :, [0, 5]], bias[:, 0, 1:3, 1:3], rtol=1e-6
  )


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_attention_with_bias_matches_a_direct_softmax(impl):
  rng = np.random.default_rng(0)
  h, b, t, hd = 2, 2, 9, 4
  q, k, v = (rng.normal(size=(h, b, t, hd)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(h, b, t, t)).astype(np.float32)
  logits = np.einsum("hbqd,hbkd->hbqk", q, k) + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("hbqk,hbkd->hbqd", p / p.sum(-1, keepdims=True), v)
  if impl == "plain":
    got = vit.plain_attention(
      *(jnp.asarray(x).transpose(1, 0, 2, 3) for x in (q, k, v)),
      jnp.asarray(bias).transpose(1, 0, 2, 3),
    ).transpose(1, 0, 2, 3)
  else:
    got = vit.chunked_attention(q, k, v, 4 * t * t * b, bias)  # one head per chunk
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Gradients agree between the two formulations (the chunked one is hand-written).
  g = rng.normal(size=(h, b, t, hd)).astype(np.float32)
  swap = lambda x: x.transpose(1, 0, 2, 3)
  plain = jax.grad(
    lambda *a: jnp.sum(swap(vit.plain_attention(*map(swap, a), swap(bias))) * g), (0, 1, 2)
  )(q, k, v)
  chunked = jax.grad(
    lambda *a: jnp.sum(vit.chunked_attention(*a, 4 * t * t * b, bias) * g), (0, 1, 2)
  )(q, k, v)
  for x, y in zip(plain, chunked):
    np.testing.assert_allclose(x, y, atol=1e-4)


def test_scanned_layers_and_attention_formulations_agree_with_both_options():
  """The exactness checks of the plain ViT (scan vs unscanned, chunked vs plain attention)
  hold with the conv stem and the ALiBi bias, with and without token dropping."""
  kw = dict(
    variant=None,
    width=32,
    depth=2,
    num_heads=4,
    patch=(8, 4),
    stem="conv",
    attention_bias="alibi_2d",
  )
  images = jax.random.uniform(jax.random.key(0), (2, *IMAGE, 3), minval=-1, maxval=1)
  ids_keep = ids_from_mask(exact_masks(1, 2, 128, 96), 96)[0]
  base = vit.Encoder(attention="chunked", **kw)
  params = base.init(jax.random.key(1), images)["params"]
  for ids in (None, ids_keep):
    want = base.apply({"params": params}, images, ids)[0]
    plain = vit.Encoder(attention="plain", **kw).apply({"params": params}, images, ids)[0]
    scanned = vit.Encoder(attention="chunked", scan_layers=True, **kw).apply(
      {"params": vit.scan_params(params)}, images, ids
    )[0]
    np.testing.assert_allclose(plain, want, atol=2e-5)
    np.testing.assert_allclose(scanned, want, atol=2e-5)
  full = base.apply({"params": params}, images)[0]
  bf16 = vit.Encoder(attention="chunked", dtype=jnp.bfloat16, **kw).apply(
    {"params": params}, images
  )[0]
  np.testing.assert_allclose(bf16.astype(jnp.float32), full, atol=0.1)


def test_the_converter_names_every_blocker_at_once(caplog):
  params = {"encoder": {"stem": {}, "cls_token": np.zeros((1, 1, 8))}}
  run_config = {"program": "recognition", "model": {"encoder": dict(encoder_config.DEFAULT)}}
  with pytest.raises(cv.ConversionError) as e:
    cv.check_torch_exportable(params, run_config)
  message = str(e.value)
  assert "(1) a convolutional patch stem" in message and "(2) an attention bias" in message
  assert "configs/pretrain.py:plain" in message and "--format=onnx" in message
  # A plain encoder of a recognizer exports, with a warning that the head stays behind.
  plain = dict(encoder_config.DEFAULT, **encoder_config.PAPER_VIT)
  with caplog.at_level("WARNING"):
    cv.check_torch_exportable(
      {"encoder": {"patch_embed": {}}}, {"program": "recognition", "model": {"encoder": plain}}
    )
  assert "its encoder only, not its head and charset" in caplog.text
