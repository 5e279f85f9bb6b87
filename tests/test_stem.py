"""The convolutional stem (model.stem='conv'): strides, no leak of hidden pixels in
either encoder mode, and the option through pretraining, every fine-tuning program,
layer decay and the PyTorch converter (a clear refusal)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mms_jax import convert as cv
from mms_jax.masking import ids_from_mask
from mms_jax.models import mae
from mms_jax.models import vit
from mms_jax.train import checkpoints
from mms_jax.train import common
from mms_jax.train import finetune
from mms_jax.train import pretrain
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


@pytest.mark.parametrize("patch,strides", [((4, 4), ((2, 2), (2, 2))),
                                           ((8, 4), ((2, 2), (2, 2), (2, 1))),
                                           ((4, 8), ((2, 2), (2, 2), (1, 2))),
                                           ((2, 1), ((2, 1),))])
def test_stem_strides_multiply_out_to_the_patch(patch, strides):
  assert vit.stem_strides(patch) == strides
  assert tuple(int(np.prod([s[i] for s in strides])) for i in (0, 1)) == patch


def test_stem_refuses_patches_it_cannot_tile():
  with pytest.raises(ValueError, match="power-of-two"):
    vit.stem_strides((6, 4))
  config = load_config("pretrain", "tiny")
  config.model.update(stem="conv", patch=(6, 4))
  with pytest.raises(common.ConfigError, match="config.model.patch"):
    pretrain.check_config(config)
  config.model.update(patch=(4, 4), stem_channels=(8, 8, 8))
  with pytest.raises(common.ConfigError, match="stem_channels.*2 stages"):
    pretrain.build_model(config)
  config.model.update(stem="convolution", stem_channels=())
  with pytest.raises(common.ConfigError, match="config.model.stem="):
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

  enc = vit.Encoder(variant=None, width=32, depth=1, num_heads=2, patch=patch, stem="conv")
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
    model = mae.MAE(encoder_variant=None, encoder_width=32, encoder_depth=1,
                    encoder_num_heads=2, patch=patch, decoder_width=32, decoder_depth=1,
                    decoder_num_heads=2, encoder_mode=mode, stem="conv")
    v = model.init(jax.random.key(4), images, mask, num_masked=num_masked)
    run = jax.jit(lambda x, v=v, model=model: model.apply(v, x, mask,
                                                          num_masked=num_masked)[0])
    np.testing.assert_array_equal(run(images), run(changed))


def test_full_image_pass_matches_all_visible_tokens():
  """Fine-tuning (no mask) equals the masked path with every patch visible."""
  enc = vit.Encoder(variant=None, width=32, depth=1, num_heads=2, patch=(8, 4), stem="conv")
  images = jax.random.uniform(jax.random.key(0), (1, *IMAGE, 3), minval=-1, maxval=1)
  params = enc.init(jax.random.key(1), images)
  all_ids = jnp.arange(128)[None]
  np.testing.assert_allclose(enc.apply(params, images)[0],
                             enc.apply(params, images, all_ids)[0], atol=1e-6)


@pytest.fixture(scope="module")
def conv_pretrain_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("conv_pretrain")
  config = load_config("pretrain", "tiny")
  config.model.update(stem="conv", patch=(8, 4))
  config.total_steps, config.picture_every, config.checkpoint.every = 2, 0, 2
  pretrain.train_and_evaluate(config, str(workdir))
  return workdir


def _encoder_leaves(path):
  return jax.tree.map(np.asarray, checkpoints.load_params(path))["encoder"]


@pytest.mark.parametrize("program", ["recognition", "segmentation", "super_resolution"])
def test_every_program_fine_tunes_a_conv_stem_encoder(conv_pretrain_dir, tmp_path, program):
  module, name = {"recognition": (recognition, "finetune_recognition"),
                  "segmentation": (segmentation, "finetune_segmentation"),
                  "super_resolution": (super_resolution, "finetune_sr")}[program]
  config = load_config(name, "tiny")
  config.model.update(stem="conv", patch=(8, 4))
  config.data.size = dict(train=32, val=8, test_heldout_fonts=8, test_hard=8)
  config.total_steps = 1
  config.init_from = str(conv_pretrain_dir)
  if program == "recognition":
    config.model.head = "ctc"
    config.eval.splits = ("test_hard",)
  module.train_and_evaluate(config, str(tmp_path))
  pretrained = _encoder_leaves(conv_pretrain_dir)
  assert "stem" in pretrained
  tuned = _encoder_leaves(tmp_path)
  assert jax.tree.structure(tuned) == jax.tree.structure(pretrained)


def test_layer_decay_puts_the_stem_with_the_patch_embedding():
  enc = vit.Encoder(variant=None, width=32, depth=2, num_heads=2, patch=(4, 4), stem="conv")
  params = {"encoder": enc.init(jax.random.key(0), jnp.zeros((1, *IMAGE, 3)))["params"]}
  scales = finetune.layer_lr_scales(params, 0.5)
  flat = flax.traverse_util.flatten_dict(scales["encoder"], sep="/")
  stem = [v for k, v in flat.items() if k.startswith("stem/")]
  assert len(stem) == 10  # 2 stages x (conv, norm) x 2 + proj x 2
  assert all(float(np.max(v)) == pytest.approx(0.5 ** 3) for v in stem)


def test_converter_refuses_a_conv_stem_with_the_reason(tmp_path):
  model = mae.MAE(encoder_variant=None, encoder_width=32, encoder_depth=1,
                  encoder_num_heads=2, decoder_width=32, decoder_depth=1,
                  decoder_num_heads=2, stem="conv")
  mask = exact_masks(0, 1, 256, 192)
  params = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE, 3)), mask,
                      num_masked=192)["params"]
  config = cv.ModelConfig(image_size=IMAGE, num_heads=2, decoder_num_heads=2)
  for export in (cv.to_timm_state_dict, cv.to_mae_state_dict):
    with pytest.raises(cv.ConversionError, match="convolutional stem.*stem='patch'"):
      export(params, config)
  with pytest.raises(cv.ConversionError, match="convolutional stem"):
    cv.to_hf_vitmae(params, config, tmp_path / "hf")
