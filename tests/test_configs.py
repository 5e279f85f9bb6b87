"""Every config variant loads, and every field can be overridden from the command line."""

import functools
import json

from conftest import load_config
import ml_collections
import numpy as np
import pytest

from mms_jax.data import labels
from mms_jax.data import tokenizer as tok_lib
from mms_jax.models import encoder_config
from mms_jax.models import recognition as rec
from mms_jax.models import vit
from mms_jax.train import common
from mms_jax.train import recognition

VARIANTS = (
  [("pretrain", v) for v in ("small", "plain", "tiny", "S4_union14m")]
  + [
    ("finetune_recognition", v)
    for v in ("small", "quick", "robust", "cased", "plain", "tiny", "S_union14m")
  ]
  + [("finetune_segmentation", v) for v in ("small", "tiny", "paper")]
  + [("finetune_sr", v) for v in ("small", "tiny", "paper")]
  + [("probe", v) for v in ("small", "tiny")]
  + [("ablation", v) for v in ("small", "quick", "probe", "tiny")]
)


def _leaf_types(config, prefix=""):
  for name, field in config._fields.items():
    if isinstance(field, ml_collections.ConfigDict):
      yield from _leaf_types(field, f"{prefix}{name}.")
    elif isinstance(field, ml_collections.FieldReference):
      yield f"{prefix}{name}", field.get_type()
    else:
      yield f"{prefix}{name}", type(field)


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_no_field_is_an_untyped_none(name, variant):
  # config_flags cannot override a field whose value is a bare None
  # (`--config.eval.max_batches=4` fails); optional fields must be placeholders.
  untyped = [k for k, t in _leaf_types(load_config(name, variant)) if t is type(None)]
  assert not untyped, f"use ml_collections.config_dict.placeholder(type) for {untyped}"


@pytest.mark.parametrize("name,variant", [v for v in VARIANTS if v[0] != "ablation"])
def test_the_data_seed_can_be_set_from_the_command_line(name, variant):
  # The docs tell users to set data.synthetic.seed; a field missing from the defaults
  # cannot be overridden by config_flags.
  data = load_config(name, variant).data
  assert isinstance(data.synthetic.seed, int)


@pytest.mark.parametrize(
  "name", ["finetune_recognition", "finetune_segmentation", "finetune_sr", "probe"]
)
@pytest.mark.parametrize("variant", ["small", "tiny"])
def test_fine_tuning_defaults_have_the_pretraining_encoder(name, variant):
  # `--config.init_from=<a pretraining workdir of the same variant>` must load as it is,
  # and without init_from a fine-tune builds the pretraining encoder of its variant.
  pretrained = encoder_config.check(load_config("pretrain", variant).model.encoder)
  assert common.encoder_of(load_config(name, variant)) == pretrained
  if variant == "small":
    assert pretrained == encoder_config.check(encoder_config.DEFAULT)


def _run_config(tmp_path, model):
  """A finished-looking pretraining workdir whose config.json has this model field."""
  from mms_jax import checkpoints

  workdir = tmp_path / "pretrained"
  with checkpoints.Checkpointer(workdir) as ckpt:
    ckpt.save(1, {"params": {"w": np.zeros(2, np.float32)}, "step": np.int32(1)})
  (workdir / "config.json").write_text(json.dumps({"program": "pretrain", "model": model}))
  return workdir


def test_fine_tuning_takes_the_encoder_of_init_from(tmp_path):
  encoder = dict(encoder_config.DEFAULT, width=64, depth=2, num_heads=2, patch=[4, 4])
  workdir = _run_config(tmp_path, {"encoder": encoder, "gelu": "erf"})
  config = load_config("finetune_recognition", "small")
  config.init_from = str(workdir)
  assert common.encoder_of(config) == encoder_config.check(encoder)
  # An explicit field that agrees is fine; one that differs is named before any compile.
  config.model.encoder.width = 64
  assert common.encoder_of(config)["width"] == 64
  config.model.encoder.update(width=128, stem="patch")
  with pytest.raises(common.ConfigError, match=r"width=128 vs 64, stem='patch' vs 'conv'"):
    recognition.check_config(config)


def test_a_variant_brings_its_own_size(tmp_path):
  """`--config.model.encoder.variant=S` on a config whose size fields are unset is ViT-S,
  not the variant with the default's 128 width; given size fields still override it."""
  for name, variant in [
    ("pretrain", "S4_union14m"),
    ("finetune_recognition", "S_union14m"),
    ("finetune_segmentation", "paper"),
    ("finetune_sr", "paper"),
  ]:  # the paper's configs: variant S, size fields unset
    paper = load_config(name, variant)
    assert vit.Encoder(**common.encoder_of(paper, from_init=False)).dims() == (384, 12, 6)
  config = load_config("finetune_recognition", "small")
  config.model.encoder.variant = "S"
  assert vit.Encoder(**common.encoder_of(config)).dims() == (384, 12, 6)
  config.model.encoder.width = 192
  assert vit.Encoder(**common.encoder_of(config)).dims() == (192, 12, 6)
  # Against a pretrained 128-wide encoder the variant is a clash, not silently ignored.
  config.model.encoder.width = None
  config.init_from = str(_run_config(tmp_path, {"encoder": encoder_config.DEFAULT}))
  with pytest.raises(common.ConfigError, match=r"variant='S' vs None"):
    common.encoder_of(config)


def test_configs_from_before_the_encoder_section_still_load(tmp_path):
  flat = dict(
    encoder_variant=None,
    encoder_width=64,
    encoder_depth=2,
    encoder_num_heads=2,
    patch=[4, 4],
    gelu="erf",
  )  # a config.json of 2026-12-05 and before: flat fields, the plain ViT by default
  expected = dict(encoder_config.DEFAULT, width=64, depth=2, num_heads=2, patch=(4, 4))
  expected.update(stem="patch", attention_bias="none")
  assert encoder_config.of_model(flat) == expected
  config = load_config("finetune_segmentation", "small")
  config.init_from = str(_run_config(tmp_path, flat))
  assert common.encoder_of(config) == expected
  recognizer = rec.from_config(
    dict(flat, head="ctc", max_length=25, decoder_width=32, decoder_depth=1, decoder_num_heads=2),
    tok_lib.Tokenizer(labels.get_charset("36"), "ctc"),
  )
  assert recognizer.encoder == encoder_config.EncoderConfig(**expected)


@functools.cache
def _names_the_code_reads():
  """Every name mms_jax/ can read a config field by: attribute accesses, string
  constants (`config.get("x")`, `config["x"]`), keyword arguments, parameters and
  dataclass fields (fields handed on as `**config.x` or through `from_dict`)."""
  import ast
  import pathlib

  names = set()
  for path in (pathlib.Path(__file__).parents[1] / "mms_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute):
        names.add(node.attr)
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        names.add(node.value)
      elif isinstance(node, ast.keyword) and node.arg:
        names.add(node.arg)
      elif isinstance(node, ast.arg):
        names.add(node.arg)
      elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        names.add(node.target.id)
  return names


def test_the_read_check_sees_real_fields_and_not_made_up_ones():
  read = _names_the_code_reads()
  assert {"clean_until_step", "benchmarks_path", "num_picture_images"} <= read
  assert "on_resume_finished" not in read


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_every_field_is_read(name, variant):
  # A field no code can read does nothing: setting it from the command line would
  # silently change nothing. Implement it or remove it.
  read = _names_the_code_reads()
  unread = [k for k, _ in _leaf_types(load_config(name, variant)) if k.split(".")[-1] not in read]
  assert not unread, f"configs/{name}.py:{variant} fields never read by mms_jax/: {unread}"
