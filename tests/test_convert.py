"""Tests for mms_jax.convert: layouts, errors, and agreement with real PyTorch libraries.

The layout tests need only numpy. The interop tests need torch (CPU) and
transformers (`pip install -e .[torch]`) and are skipped, with the reason, where
they are not importable; the timm test runs only where timm is importable.
"""

import argparse
import functools
import json
import logging
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax import convert as cv
from mms_jax.convert import torch_layouts as tl
from mms_jax.models import encoder_config
from mms_jax.models import mae
from mms_jax.models import vit

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The model fields as a config.json from before `model.encoder` wrote them (flat).
TINY = dict(
  encoder_variant=None,
  encoder_width=64,
  encoder_depth=2,
  encoder_num_heads=2,
  decoder_width=32,
  decoder_depth=1,
  decoder_num_heads=2,
)


@functools.cache
def make_model(image_size=(32, 128), patch=(4, 4), gelu="erf", scan_layers=False, seed=0):
  """(model, params, config) for a tiny MAE; params perturbed so biases/norms are non-trivial.

  Cached: callers must not modify the returned params in place.
  """
  model = mae.MAE(
    encoder=encoder_config.EncoderConfig(
      width=64, depth=2, num_heads=2, patch=patch, stem="patch", attention_bias="none"
    ),
    decoder_width=TINY["decoder_width"],
    decoder_depth=TINY["decoder_depth"],
    decoder_num_heads=TINY["decoder_num_heads"],
    gelu=gelu,
    scan_layers=scan_layers,
  )
  grid = vit.grid_shape(image_size, patch)
  length = grid[0] * grid[1]
  images = jnp.zeros((1, *image_size, 3))
  mask = jnp.arange(length)[None] < length * 3 // 4
  init = jax.jit(model.init, static_argnames="num_masked")
  params = init(jax.random.key(seed), images, mask, num_masked=length * 3 // 4)["params"]
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [
    np.asarray(x) + np.float32(0.05) * rng.standard_normal(x.shape, np.float32) for x in leaves
  ]
  params = jax.tree.unflatten(treedef, leaves)
  config = cv.ModelConfig(
    image_size=image_size, patch=patch, num_heads=2, decoder_num_heads=2, gelu=gelu
  )
  return model, params, config


def random_mask(rng, batch, length, num_masked):
  order = np.argsort(rng.random((batch, length)), axis=1)
  mask = np.zeros((batch, length), bool)
  np.put_along_axis(mask, order[:, :num_masked], True, axis=1)
  return mask


def assert_trees_equal(a, b):
  fa, fb = tl.flatten(a), tl.flatten(b)
  assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def rect():
  return make_model()


# ---------------------------------------------------------------------------
# numpy only.


@pytest.mark.parametrize("layout", ["hf", "timm", "mae"])
@pytest.mark.parametrize("patch", [(4, 4), (8, 4)])
def test_layout_round_trip_is_exact(layout, patch):
  _, params, config = make_model(patch=patch)
  sd = tl.to_state_dict(params, config, layout)
  assert all(v.dtype == np.float32 for v in sd.values())
  back = cv.from_torch_state_dict(sd, layout, image_size=config.image_size)
  want = {"encoder": params["encoder"]} if layout == "timm" else params
  assert_trees_equal(back, tl.normalize_params(want))
  assert tl.detect_layout(sd) == layout


def test_state_dict_shapes_follow_torch_conventions(rect):
  _, params, config = rect
  sd = cv.to_mae_state_dict(params, config)
  assert sd["patch_embed.proj.weight"].shape == (64, 3, 4, 4)  # [D, C, ph, pw]
  assert sd["blocks.0.attn.qkv.weight"].shape == (192, 64)  # [3D, D]
  assert sd["pos_embed"].shape == (1, 1 + 8 * 32, 64)
  assert sd["decoder_pos_embed"].shape == (1, 1 + 8 * 32, 32)
  np.testing.assert_array_equal(sd["pos_embed"], vit.sincos_pos_embed_2d(64, (8, 32), True))
  hf = tl.to_state_dict(params, config, "hf")
  q = hf["vit.encoder.layer.1.attention.attention.query.weight"]
  np.testing.assert_array_equal(q, sd["blocks.1.attn.qkv.weight"][:64])
  assert not any(k.startswith("decoder") for k in cv.to_timm_state_dict(params, config))


def test_scanned_params_are_accepted():
  _, params, config = make_model()
  scanned = jax.tree.map(np.asarray, vit.scan_params(params))  # same values, stacked
  sd = cv.to_mae_state_dict(scanned, config)
  ref = cv.to_mae_state_dict(params, config)
  assert sorted(sd) == sorted(ref)
  back = cv.from_torch_state_dict(sd, "mae", scan_layers=True)
  assert vit.param_names(back) == vit.param_names(scanned)


def test_missing_and_misshapen_tensors_are_named(rect):
  _, params, config = rect
  sd = cv.to_mae_state_dict(params, config)
  missing = dict(sd)
  del missing["blocks.1.mlp.fc2.bias"]
  with pytest.raises(cv.ConversionError, match=r"blocks\.1\.mlp\.fc2\.bias"):
    cv.from_torch_state_dict(missing, "mae")
  bad = dict(sd, **{"decoder_blocks.0.attn.proj.weight": np.zeros((32, 31), np.float32)})
  with pytest.raises(
    cv.ConversionError, match=r"decoder_blocks\.0\.attn\.proj\.weight.*\(32, 31\)"
  ):
    cv.from_torch_state_dict(bad, "mae")
  extra = dict(sd, **{"head.weight": np.zeros((10, 64), np.float32)})
  with pytest.raises(cv.ConversionError, match="head.weight"):
    cv.from_torch_state_dict(extra, "mae")
  with pytest.warns(UserWarning, match="not used"):
    cv.from_torch_state_dict(extra, "mae", strict=False)
  broken = jax.tree.map(lambda x: x, params)
  del broken["encoder"]["blocks_0"]["attn"]["qkv"]
  with pytest.raises(cv.ConversionError, match="encoder/blocks_0/attn/qkv"):
    cv.to_mae_state_dict(broken, config)
  with pytest.raises(cv.ConversionError, match="num_heads"):
    cv.to_hf_vitmae(params, cv.ModelConfig(image_size=(32, 128)), "/nonexistent/never")


def test_position_embedding_layouts_are_recognised(rect):
  _, params, config = rect
  sd = cv.to_mae_state_dict(params, config)
  # No image size given: the 8x32 grid is recovered from the stored embedding.
  _, found, notes = tl.from_state_dict(sd, "mae")
  assert found.image_size == (32, 128) and not notes
  # Square-grid layout (int(sqrt(256)) = 16 -> 16x16), as some PyTorch MAE code builds it.
  square = dict(
    sd,
    pos_embed=vit.sincos_pos_embed_2d(64, (16, 16), True),
    decoder_pos_embed=vit.sincos_pos_embed_2d(32, (16, 16), True),
  )
  assert tl.identify_pos_embed(square["pos_embed"], 64, (8, 32)) == ("square", (16, 16))
  with pytest.warns(UserWarning, match="square 16x16 grid"):
    back = cv.from_torch_state_dict(square, "mae", image_size=(32, 128))
  assert_trees_equal(back, params)
  with pytest.raises(cv.ConversionError, match="'pos_embed' is a square-grid"):
    cv.from_torch_state_dict(square, "mae", image_size=(32, 128), pos_embed="error")
  learned = dict(sd, pos_embed=sd["pos_embed"] + 0.01)
  with pytest.raises(cv.ConversionError, match="'pos_embed' is not a sin-cos"):
    cv.from_torch_state_dict(learned, "mae", image_size=(32, 128))
  with pytest.warns(UserWarning, match="dropped"):
    cv.from_torch_state_dict(learned, "mae", image_size=(32, 128), pos_embed="ignore")


def test_hf_export_refuses_a_decoder_with_non_square_patch(tmp_path):
  _, params, config = make_model(patch=(8, 4))
  with pytest.raises(cv.ConversionError, match="square patch"):
    cv.to_hf_vitmae(params, config, tmp_path / "x")
  cv.to_hf_vitmae({"encoder": params["encoder"]}, config, tmp_path / "enc")
  assert json.loads((tmp_path / "enc/config.json").read_text())["patch_size"] == [8, 4]


def test_constructor_kwargs_need_the_shapes(rect):
  _, params, config = rect
  with pytest.raises(cv.ConversionError, match="channels, width, depth"):
    tl.timm_kwargs(config)  # the config alone does not know the tensor shapes
  kw = tl.timm_kwargs(config, {"encoder": params["encoder"]})
  assert (
    kw["img_size"],
    kw["patch_size"],
    kw["embed_dim"],
    kw["depth"],
    kw["num_heads"],
    kw["mlp_ratio"],
    kw["act_layer"],
  ) == ([32, 128], [4, 4], 64, 2, 2, 4.0, "gelu")
  kw = tl.mae_kwargs(config, params)
  assert (kw["decoder_embed_dim"], kw["decoder_depth"], kw["decoder_num_heads"]) == (32, 1, 2)
  with pytest.raises(cv.ConversionError, match="decoder_num_heads"):
    tl.mae_kwargs(cv.ModelConfig(image_size=(32, 128), num_heads=2), params)


# ---------------------------------------------------------------------------
# Against torch / transformers.


def _torch():
  return pytest.importorskip("torch", reason="interop tests need torch (pip install -e .[torch])")


def _transformers():
  _torch()
  return pytest.importorskip(
    "transformers", reason="interop tests need transformers (pip install -e .[torch])"
  )


def nchw(images):
  torch = _torch()
  return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def encode(params, config, images, gelu="erf"):
  enc = vit.Encoder(variant=None, width=64, depth=2, num_heads=2, patch=config.patch, gelu=gelu)
  return np.asarray(jax.jit(enc.apply)({"params": params["encoder"]}, images)[0])


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_hf_encoder_features_match_rectangular_grid(tmp_path, gelu):
  transformers, torch = _transformers(), _torch()
  _, params, config = make_model(gelu=gelu)
  cv.to_hf_vitmae({"encoder": params["encoder"]}, config, tmp_path)
  model = transformers.ViTMAEModel.from_pretrained(tmp_path, mask_ratio=0.0).eval()
  assert model.config.layer_norm_eps == 1e-6
  images = jax.random.normal(jax.random.key(3), (2, 32, 128, 3))
  noise = torch.arange(256, dtype=torch.float32).repeat(2, 1)  # identity token order
  with torch.no_grad():
    theirs = model(nchw(images), noise=noise).last_hidden_state.numpy()
  np.testing.assert_allclose(theirs, encode(params, config, images, gelu), atol=1e-5, rtol=0)


def test_hf_encoder_non_square_patch(tmp_path):
  transformers, torch = _transformers(), _torch()
  _, params, config = make_model(patch=(8, 4))
  cv.to_hf_vitmae({"encoder": params["encoder"]}, config, tmp_path)
  model = transformers.ViTMAEModel.from_pretrained(tmp_path, mask_ratio=0.0).eval()
  images = jax.random.normal(jax.random.key(4), (2, 32, 128, 3))
  with torch.no_grad():
    theirs = model(nchw(images), noise=torch.arange(128.0).repeat(2, 1)).last_hidden_state
  np.testing.assert_allclose(theirs.numpy(), encode(params, config, images), atol=1e-5, rtol=0)


def _compare_pretraining(model, hf_model, params, image_size, num_masked):
  torch = _torch()
  length = hf_model.vit.embeddings.patch_embeddings.num_patches
  images = jax.random.normal(jax.random.key(5), (3, *image_size, 3))
  mask = random_mask(np.random.default_rng(0), 3, length, num_masked)
  apply = jax.jit(model.apply, static_argnames="num_masked")
  pred, _ = apply({"params": params}, images, jnp.asarray(mask), num_masked=num_masked)
  loss, _ = mae.mae_loss(images, pred, jnp.asarray(mask), model.encoder.patch)
  # HF keeps the tokens with the smallest noise: visible ones first, in index order.
  noise = torch.from_numpy(mask.astype(np.float32) + np.arange(length) / (2.0 * length))
  with torch.no_grad():
    out = hf_model(nchw(images), noise=noise.float())
  np.testing.assert_array_equal(out.mask.numpy().astype(bool), mask)
  np.testing.assert_allclose(out.logits.numpy(), np.asarray(pred), atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.loss.item(), float(loss), rtol=1e-5)


def test_hf_pretraining_forward_square_grid(tmp_path):
  transformers = _transformers()
  model, params, config = make_model(image_size=(32, 32))
  cv.to_hf_vitmae(params, config, tmp_path)
  hf_model, info = transformers.ViTMAEForPreTraining.from_pretrained(
    tmp_path, output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert hf_model.config.norm_pix_loss and hf_model.config.hidden_act == "gelu"
  _compare_pretraining(model, hf_model.eval(), params, (32, 32), num_masked=48)


def test_hf_pretraining_forward_rectangular_grid(tmp_path, rect):
  _transformers()
  model, params, config = rect
  cv.to_hf_vitmae(params, config, tmp_path)
  hf_model = cv.load_hf_vitmae(tmp_path)
  _compare_pretraining(model, hf_model, params, (32, 128), num_masked=192)
  # The stored real-grid position embeddings survive from_pretrained as they are.
  np.testing.assert_array_equal(
    hf_model.decoder.decoder_pos_embed.detach().numpy(), vit.sincos_pos_embed_2d(32, (8, 32), True)
  )
  # ... and stay fixed when the model is trained, as in mms_jax.
  assert not hf_model.vit.embeddings.position_embeddings.requires_grad
  assert not hf_model.decoder.decoder_pos_embed.requires_grad


def test_hf_pretraining_with_a_token_count_that_is_not_square(tmp_path, caplog):
  """32x100 with 4x4 patches: 8 x 25 = 200 tokens. transformers' decoder builds a
  14 x 14 table and cannot be constructed; load_hf_vitmae loads and matches ours."""
  transformers = _transformers()
  from transformers.models.vit_mae import modeling_vit_mae

  square_init = modeling_vit_mae.ViTMAEDecoder.initialize_weights
  model, params, config = make_model(image_size=(32, 100))
  with caplog.at_level(logging.WARNING):
    cv.to_hf_vitmae(params, config, tmp_path)
  assert "load_hf_vitmae" in caplog.text
  with pytest.raises(RuntimeError, match="size of tensor"):
    transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)
  hf_model = cv.load_hf_vitmae(tmp_path)
  np.testing.assert_array_equal(
    hf_model.decoder.decoder_pos_embed.detach().numpy(), vit.sincos_pos_embed_2d(32, (8, 25), True)
  )
  _compare_pretraining(model, hf_model, params, (32, 100), num_masked=150)
  # transformers' own constructor is put back once loading is done.
  assert modeling_vit_mae.ViTMAEDecoder.initialize_weights is square_init


def test_save_mms_checkpoint_keeps_the_decoder_fields(tmp_path, rect):
  _, params, config = rect
  bare = cv.ModelConfig(image_size=(32, 128), num_heads=2, decoder_num_heads=2)
  _, run_config = cv.load_mms_checkpoint(cv.save_mms_checkpoint(params, bare, tmp_path / "a"))
  model = run_config["model"]
  assert (model["decoder_width"], model["decoder_depth"], model["decoder_num_heads"]) == (32, 1, 2)
  with pytest.raises(cv.ConversionError, match="decoder_num_heads"):
    cv.save_mms_checkpoint(
      params, cv.ModelConfig(image_size=(32, 128), num_heads=2), tmp_path / "b"
    )


def test_flax_torch_flax_round_trip_is_exact(tmp_path, rect):
  transformers = _transformers()
  _, params, config = rect
  cv.to_hf_vitmae(params, config, tmp_path)
  hf_model = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path)
  # The live model's state dict uses the installed transformers' own names.
  back = cv.from_torch_state_dict(hf_model.state_dict(), "auto")
  assert_trees_equal(back, params)
  back, found = cv.read_torch_checkpoint(tmp_path)
  assert_trees_equal(back, params)
  assert (found.num_heads, found.decoder_num_heads, found.image_size) == (2, 2, (32, 128))


def test_hf_fine_tune_steps_then_import_back(tmp_path):
  """docs/pytorch.md section 4: a few AdamW steps on one batch, then back to mms_jax."""
  transformers, torch = _transformers(), _torch()
  from safetensors.torch import save_file

  _, params, config = make_model()
  cv.to_hf_vitmae({"encoder": params["encoder"]}, config, tmp_path / "hf")
  torch.manual_seed(0)
  encoder = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", mask_ratio=0.0)
  encoder.embeddings.position_embeddings.requires_grad_(False)
  head = torch.nn.Linear(encoder.config.hidden_size, 5)
  noise = torch.arange(256.0)
  x, y = torch.rand(4, 3, 32, 128) * 2 - 1, torch.tensor([0, 1, 2, 3])

  def forward(x):
    return head(encoder(x, noise=noise.repeat(len(x), 1)).last_hidden_state[:, 0])

  trainable = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-3)
  encoder.train()
  losses = []
  for _ in range(5):
    loss = torch.nn.functional.cross_entropy(forward(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
  assert losses[-1] < 0.9 * losses[0], losses
  save_file(encoder.state_dict(), tmp_path / "tuned.safetensors")
  tuned = cv.from_torch_state_dict(cv.load_torch_file(tmp_path / "tuned.safetensors"))
  before = np.asarray(params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
  assert np.abs(tuned["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"] - before).max() > 1e-4
  # ... the weights were trained, and the imported encoder computes the tuned features.
  encoder.eval()
  with torch.no_grad():
    theirs = encoder(x, noise=noise.repeat(4, 1)).last_hidden_state.numpy()
  images = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(theirs, encode(tuned, config, images), atol=1e-5, rtol=0)


def torch_reference_encoder(sd, images, patch, heads, gelu="none"):
  """An independent torch.nn.functional ViT forward over the MAE / timm key names."""
  torch = _torch()
  fn = torch.nn.functional
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  x = fn.conv2d(images, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=patch)
  x = x.flatten(2).transpose(1, 2) + t["pos_embed"][:, 1:]
  cls = (t["cls_token"] + t["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
  x = torch.cat([cls, x], dim=1)
  b, n, d = x.shape
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

  def ln(v, name):
    return fn.layer_norm(v, (d,), t[name + ".weight"], t[name + ".bias"], eps=1e-6)

  for i in range(depth):
    p = f"blocks.{i}."
    qkv = fn.linear(ln(x, p + "norm1"), t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = fn.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + fn.linear(a, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
    h = fn.linear(ln(x, p + "norm2"), t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])
    x = x + fn.linear(fn.gelu(h, approximate=gelu), t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
  return ln(x, "norm")


@pytest.mark.parametrize("file_format", ["safetensors", "pth"])
def test_mae_layout_matches_torch_reference(tmp_path, file_format):
  torch = _torch()
  _, params, config = make_model(patch=(8, 4))
  path = cv.save_state_dict(cv.to_mae_state_dict(params, config), tmp_path / f"model.{file_format}")
  sd = cv.load_torch_file(path)
  images = jax.random.normal(jax.random.key(6), (2, 32, 128, 3))
  with torch.no_grad():
    theirs = torch_reference_encoder(sd, nchw(images), (8, 4), heads=2).numpy()
  np.testing.assert_allclose(theirs, encode(params, config, images), atol=1e-5, rtol=0)
  assert_trees_equal(cv.from_torch_state_dict(sd, "mae"), params)


def _timm():
  _torch()
  return pytest.importorskip(
    "timm",
    reason="timm is not installed: it needs torchvision, whose only wheels here "
    "come with torch 2.14.1 (5.6 GB); see docs/pytorch.md, section 6",
  )


# Models shared with other tests (make_model is cached): each GELU, each patch shape.
@pytest.mark.parametrize("patch,gelu", [((4, 4), "tanh"), ((8, 4), "erf")])
def test_timm_features_match(patch, gelu):
  torch = _torch()
  _timm()
  from timm.models.vision_transformer import VisionTransformer

  _, params, config = make_model(patch=patch, gelu=gelu)
  model = VisionTransformer(**tl.timm_kwargs(config, {"encoder": params["encoder"]})).eval()
  # The model really is the rectangular one: 32x128 image, (ph, pw) conv, grid 8x32 / 4x32.
  assert model.patch_embed.grid_size == config.grid and config.grid[0] != config.grid[1]
  assert tuple(model.patch_embed.proj.kernel_size) == patch
  assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
  probe = torch.linspace(-4, 4, 101)
  np.testing.assert_array_equal(  # timm's activation is the GELU flavour asked for
    model.blocks[0].mlp.act(probe).numpy(),
    torch.nn.functional.gelu(probe, approximate="none" if gelu == "erf" else "tanh").numpy(),
  )
  sd = cv.to_timm_state_dict(params, config)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  images = jax.random.normal(jax.random.key(7), (2, 32, 128, 3))
  with torch.no_grad():
    theirs = model.forward_features(nchw(images)).numpy()
    pooled = model(nchw(images)).numpy()  # global_pool='token', num_classes=0: the cls feature
  ours = encode(params, config, images, gelu)
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  np.testing.assert_allclose(pooled, ours[:, 0], atol=1e-5, rtol=0)
  back = cv.from_torch_state_dict(model.state_dict(), "timm")
  assert_trees_equal(back, {"encoder": params["encoder"]})


def timm_mae(kwargs):
  """A model with the module names of MAE's MaskedAutoencoderViT, built from timm's
  PatchEmbed and Block and the constructor arguments that `mae_kwargs` lists."""
  torch = _torch()
  _timm()
  from timm.layers import PatchEmbed
  from timm.models.vision_transformer import Block

  nn = torch.nn
  norm = functools.partial(nn.LayerNorm, eps=kwargs["layer_norm_eps"])
  act = functools.partial(nn.GELU, approximate={"exact": "none", "tanh": "tanh"}[kwargs["gelu"]])

  def blocks(width, depth, heads):
    return nn.ModuleList(
      Block(width, heads, kwargs["mlp_ratio"], qkv_bias=True, norm_layer=norm, act_layer=act)
      for _ in range(depth)
    )

  class TimmMAE(nn.Module):
    """forward(images [B, C, H, W], mask bool[B, L]) -> pixel predictions [B, L, P]."""

    def __init__(self):
      super().__init__()
      d, dd, c = kwargs["embed_dim"], kwargs["decoder_embed_dim"], kwargs["in_chans"]
      self.patch_embed = PatchEmbed(kwargs["img_size"], kwargs["patch_size"], c, d)
      n = self.patch_embed.num_patches
      self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
      self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, d), requires_grad=False)
      self.blocks = blocks(d, kwargs["depth"], kwargs["num_heads"])
      self.norm = norm(d)
      self.decoder_embed = nn.Linear(d, dd)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
      self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + n, dd), requires_grad=False)
      self.decoder_blocks = blocks(dd, kwargs["decoder_depth"], kwargs["decoder_num_heads"])
      self.decoder_norm = norm(dd)
      ph, pw = self.patch_embed.patch_size
      self.decoder_pred = nn.Linear(dd, ph * pw * c)

    def forward(self, images, mask):
      x = self.patch_embed(images) + self.pos_embed[:, 1:]
      b, n, d = x.shape
      keep = n - int(mask[0].sum())
      # Visible tokens first, each group in index order (as mms_jax's ids_from_mask).
      ids_shuffle = torch.argsort(mask.float() + torch.arange(n) / (2.0 * n), dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
      x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      x = self.decoder_embed(self.norm(x))
      tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - keep, -1)], dim=1)
      tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
      x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
      for block in self.decoder_blocks:
        x = block(x)
      return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  return TimmMAE()


@pytest.mark.parametrize("patch,gelu", [((4, 4), "erf"), ((8, 4), "tanh")])
def test_mae_layout_runs_in_timm_blocks(patch, gelu):
  torch = _torch()
  model, params, config = make_model(patch=patch, gelu=gelu)
  kwargs = tl.mae_kwargs(config, params)
  torch_model = timm_mae(kwargs).eval()
  sd = cv.to_mae_state_dict(params, config)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  length = config.grid[0] * config.grid[1]
  num_masked = length * 3 // 4
  images = jax.random.normal(jax.random.key(8), (2, 32, 128, 3))
  mask = random_mask(np.random.default_rng(1), 2, length, num_masked)
  pred, _ = jax.jit(model.apply, static_argnames="num_masked")(
    {"params": params}, images, jnp.asarray(mask), num_masked=num_masked
  )
  loss, _ = mae.mae_loss(images, pred, jnp.asarray(mask), patch)
  with torch.no_grad():
    theirs = torch_model(nchw(images), torch.from_numpy(mask))
  np.testing.assert_allclose(theirs.numpy(), np.asarray(pred), atol=1e-5, rtol=0)
  # MAE's loss: per-patch normalised target (unbiased variance), mean over hidden patches.
  (ph, pw), (gh, gw) = patch, config.grid
  target = nchw(images).reshape(2, 3, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
  target = target.reshape(2, length, ph * pw * 3)
  target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
  m = torch.from_numpy(mask).float()
  their_loss = (((theirs - target) ** 2).mean(-1) * m).sum() / m.sum()
  np.testing.assert_allclose(their_loss.item(), float(loss), rtol=1e-5)


class NotWeights:
  """Anything that is not a tensor: must never be unpickled by the converter."""


def test_pth_with_pickled_objects_is_refused(tmp_path, rect):
  torch = _torch()
  _, params, config = rect
  sd = {k: torch.from_numpy(v) for k, v in cv.to_mae_state_dict(params, config).items()}
  torch.save({"model": sd, "epoch": 3}, tmp_path / "ok.pth")
  assert_trees_equal(cv.from_torch_state_dict(cv.load_torch_file(tmp_path / "ok.pth")), params)
  for name, obj in [
    ("args.pth", {"model": sd, "args": argparse.Namespace(lr=1.0)}),
    ("object.pth", NotWeights()),
  ]:
    torch.save(obj, tmp_path / name)
    with pytest.raises(cv.ConversionError, match="refusing to load"):
      cv.load_torch_file(tmp_path / name)


def write_run(workdir, params):
  """An mms_jax pretraining checkpoint (step 10) of the tiny rect model, with its run config."""
  from mms_jax import checkpoints

  run_config = {
    "image_size": [32, 128],
    "model": dict(TINY, patch=[4, 4], encoder_mode="mae", gelu="erf"),
    "loss": {"norm_pix": True},
    "masking": {"ratio": 0.75},
  }
  with checkpoints.Checkpointer(workdir, async_save=False, program="pretrain") as ckpt:
    ckpt.save(10, {"params": params, "step": np.int32(10)}, config=run_config)


def test_timm_loads_the_export_as_documented(tmp_path, rect):
  """docs/pytorch.md section 3, timm: config.json kwargs + model.safetensors."""
  torch = _torch()
  _timm()
  from safetensors.torch import load_file
  from timm.models.vision_transformer import VisionTransformer

  _, params, config = rect
  write_run(tmp_path / "run", params)
  path = cv.convert(tmp_path / "run", tmp_path / "timm", "timm")
  kwargs = json.loads((tmp_path / "timm/config.json").read_text())["kwargs"]
  model = VisionTransformer(**kwargs).eval()
  model.load_state_dict(load_file(path))
  images = jax.random.normal(jax.random.key(9), (2, 32, 128, 3))
  with torch.no_grad():
    theirs = model.forward_features(nchw(images)).numpy()
  np.testing.assert_allclose(theirs, encode(params, config, images), atol=1e-5, rtol=0)
  # A classifier as in section 4: only the new head is missing.
  tuned = VisionTransformer(**{**kwargs, "num_classes": 5})
  result = tuned.load_state_dict(load_file(path), strict=False)
  assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
  assert not result.unexpected_keys


def test_cli_and_orbax_checkpoints(tmp_path, rect):
  transformers = _transformers()
  from mms_jax import checkpoints

  _, params, _ = rect
  write_run(tmp_path / "run", params)
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  cmd = [
    sys.executable,
    "-m",
    "mms_jax.convert",
    f"--src={tmp_path / 'run'}",
    "--format=hf",
    f"--dst={tmp_path / 'hf'}",
  ]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  hf_model = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf")
  assert hf_model.config.num_attention_heads == 2 and hf_model.config.image_size == [32, 128]
  # ... and back into an orbax checkpoint that init_from accepts.
  step_dir = cv.convert(tmp_path / "hf", tmp_path / "back", "mms")
  with pytest.raises(cv.ConversionError, match="already holds a checkpoint"):
    cv.convert(tmp_path / "hf", tmp_path / "back", "mms")  # never overwritten
  assert_trees_equal(checkpoints.load_params(tmp_path / "back"), params)
  back_params, back_config = cv.load_mms_checkpoint(step_dir)
  config = cv.ModelConfig.from_run_config(back_config)
  assert (config.num_heads, config.decoder_width, config.image_size) == (2, 32, (32, 128))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    path = cv.convert(tmp_path / "run", tmp_path / "timm", "timm")
  side = json.loads((path.parent / "config.json").read_text())
  assert side["kwargs"]["img_size"] == [32, 128] and side["layout"] == "timm"
  back, _ = cv.read_torch_checkpoint(path)
  assert_trees_equal(back, {"encoder": params["encoder"]})
