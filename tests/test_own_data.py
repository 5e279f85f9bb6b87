"""A user's own data and a trained recognizer as the start: the default recipe on a folder
or LMDB tree, evaluation on the tree's own splits, init_from a recognizer (head and
charset), short schedules, resume_from across data streams."""

import json
import logging

from conftest import load_config
from conftest import main_process
from conftest import run_main
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax import errors
from mms_jax.data import formats
from mms_jax.data import pipeline
from mms_jax.data import tokenizer as tok_lib
from mms_jax.models import recognizer_weights
from mms_jax.train import common
from mms_jax.train import recognition

WORDS = ("hello", "world", "street", "b4ker", "mms", "jax", "crop", "text")


def _examples(n, seed):
  rng = np.random.default_rng(seed)
  return [
    {"image": rng.integers(0, 256, (24, 80, 3), np.uint8), "label": WORDS[i % len(WORDS)]}
    for i in range(n)
  ]


@pytest.fixture(scope="module")
def word_tree(tmp_path_factory):
  """A folder of labelled crops as docs/data.md lays it out: train/ and test/."""
  root = tmp_path_factory.mktemp("mywords")
  formats.write_folder(str(root / "train"), _examples(24, 0))
  formats.write_folder(str(root / "test"), _examples(10, 1))
  return root


def _metrics(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------
# The default recipe on a user's tree.
# ------------------------------------------------------------------------------------
def test_the_default_recipe_trains_and_evaluates_a_folder_tree(word_tree, tmp_path):
  log = run_main(
    "finetune_recognition.py",
    tmp_path,
    "--config.data.source=folder",
    f"--config.data.path={word_tree}",
    "--config.total_steps=2",
    "--config.batch_size=8",
  )
  assert "data.curriculum shapes generated images only" in log
  assert "warming up over 1 steps" in log  # the recipe's 300-step warmup, scaled
  assert "| test | 10 |" in (tmp_path / "eval_test.md").read_text()
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["eval"]["splits"] == ["test"]  # what was scored is recorded


def test_the_lmdb_command_of_the_data_docs_runs(tmp_path):
  tree = tmp_path / "str"
  formats.write_lmdb(str(tree / "train" / "real" / "ArT"), _examples(16, 2))
  formats.write_lmdb(str(tree / "evaluation" / "IIIT5k"), _examples(6, 3))
  formats.write_lmdb(str(tree / "evaluation" / "SVT"), _examples(4, 4))
  run_main(
    "finetune_recognition.py",
    tmp_path / "rec",
    "--config.data.source=str_lmdb",
    f"--config.data.path={tree}",
    "--config.data.splits.train=train/real",
    "--config.data.splits.test=evaluation",
    "--config.total_steps=2",
    "--config.batch_size=8",
  )
  table = (tmp_path / "rec" / "eval_test.md").read_text()
  assert "| evaluation/IIIT5k | 6 |" in table and "| average | 10 |" in table


def _folder_config(path, **eval_fields):
  config = load_config("finetune_recognition")
  config.data.update(source="folder", path=str(path))
  config.eval.update(eval_fields)
  return config


def test_a_missing_eval_split_is_named_before_anything_compiles(word_tree):
  config = _folder_config(word_tree, splits=("test", "benchmarks"))
  with pytest.raises(errors.ConfigError, match=r"config\.eval\.splits has 'benchmarks'.*Found"):
    recognition.check_config(config)
  config = load_config("finetune_recognition")
  config.eval.splits = ("test_heldout_font",)  # a typo on generated data
  with pytest.raises(errors.ConfigError, match="config.eval.splits has 'test_heldout_font'"):
    recognition.check_config(config)


def test_a_tree_without_a_test_split_trains_on_its_root_unscored(tmp_path, caplog):
  formats.write_folder(str(tmp_path), _examples(8, 5))  # one gt.txt at the root
  config = _folder_config(tmp_path)
  with caplog.at_level(logging.WARNING):
    recognition.check_config(config)
  assert config.eval.splits == ()
  assert "has no test or val split" in caplog.text
  assert len(pipeline.make_source(config.data, "train")) == 8


def test_a_warmup_longer_than_the_run_is_scaled(caplog):
  config = load_config("finetune_recognition")
  peak = config.lr.base * config.batch_size / 256
  with caplog.at_level(logging.WARNING):
    schedule = common.learning_rate_schedule(config, 100)
  assert "warming up over 10 steps" in caplog.text
  assert float(schedule(10)) == pytest.approx(peak)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)  # it decays to the end
  config.lr.warmup_steps = 50
  assert float(common.learning_rate_schedule(config, 100)(50)) == pytest.approx(peak)


# ------------------------------------------------------------------------------------
# init_from a trained recognizer.
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ctc", "ar"])
def test_head_transfer_keeps_the_rows_of_shared_characters(kind):
  old, new = tok_lib.Tokenizer("36", kind), tok_lib.Tokenizer("94", kind)
  index = recognizer_weights.class_map(old, new)
  assert index[0] == 0 and index[1 + new.charset.index("a")] == 1 + old.charset.index("a")
  assert index[1 + new.charset.index("A")] == -1  # upper case is new
  d, rng = 8, np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  head = lambda tok: {
    "logits": {"kernel": normal(d, tok.num_classes), "bias": normal(tok.num_classes)},
    **({"token_embed": {"embedding": normal(tok.vocab_size, d)}} if kind == "ar" else {}),
  }
  trained, fresh = head(old), head(new)
  out = recognizer_weights.transfer_head(fresh, trained, old, new)
  for c in "a0z9":
    i, j = 1 + new.charset.index(c), 1 + old.charset.index(c)
    np.testing.assert_array_equal(out["logits"]["kernel"][:, i], trained["logits"]["kernel"][:, j])
    assert out["logits"]["bias"][i] == trained["logits"]["bias"][j]
  i = 1 + new.charset.index("Q")
  np.testing.assert_array_equal(out["logits"]["kernel"][:, i], fresh["logits"]["kernel"][:, i])
  if kind == "ar":  # [B]os and [P]ad move with the charset size
    emb, old_emb = out["token_embed"]["embedding"], trained["token_embed"]["embedding"]
    np.testing.assert_array_equal(emb[new.bos], old_emb[old.bos])
    np.testing.assert_array_equal(emb[new.pad], old_emb[old.pad])


def _tiny(head, charset="36", **fields):
  config = load_config("finetune_recognition", "tiny")
  config.data.size = dict(train=64, val=8, test_heldout_fonts=16, test_hard=8)
  config.model.head = head
  config.charset = config.data.charset = charset
  config.total_steps = 3
  config.eval.splits = ("test_heldout_fonts",)
  config.update(fields)
  return config


@pytest.fixture(scope="module", params=["ctc", "ar"])
def trained_recognizer(request, tmp_path_factory):
  workdir = tmp_path_factory.mktemp(f"rec_{request.param}")
  config = _tiny(request.param)
  config.lr.base = 0.5  # a few big steps, so the head is far from its initialisation
  recognition.train_and_evaluate(config, str(workdir))
  return request.param, workdir


def _logits(config, params, images):
  tokenizer = recognition.check_config(config)
  model = recognition.build_model(config, tokenizer)
  ids, _ = tokenizer.encode(["hello"] * len(images), config.model.max_length)
  args = (images, jnp.asarray(ids[:, :-1])) if config.model.head == "ar" else (images,)
  return np.asarray(model.apply({"params": params}, *args))


def test_init_from_a_recognizer_starts_where_it_ended(trained_recognizer, tmp_path):
  head, source = trained_recognizer
  config = _tiny(head, init_from=str(source), total_steps=1)
  recognition.train_and_evaluate(config, str(tmp_path))
  # The run scores the recognizer before its first step: the source's final scores.
  key = "eval/test_heldout_fonts/test_heldout_fonts/one_minus_ned"
  after = {r["step"]: r[key] for r in _metrics(tmp_path) if key in r}
  before = {r["step"]: r[key] for r in _metrics(source) if key in r}
  assert before[3] > 0 and after[0] == before[3]


def test_a_new_charset_keeps_the_shared_characters_at_step_0(trained_recognizer):
  head, source = trained_recognizer
  trained = jax.tree.map(np.asarray, checkpoints.load_params(source))
  config = _tiny(head, charset="94", init_from=str(source))
  tokenizer = recognition.check_config(config)
  model = recognition.build_model(config, tokenizer)
  images = jnp.asarray(
    np.random.default_rng(0).uniform(-1, 1, (2, *config.image_size, 3)), jnp.float32
  )
  fresh = jax.jit(model.init)(
    jax.random.key(1), images, *((jnp.zeros((1, 26), jnp.int32),) if head == "ar" else ())
  )["params"]
  params = recognition.init_from_recognizer(
    fresh, config, tokenizer, recognition.source_recognizer(config)
  )
  old_config = _tiny(head)
  old = _logits(old_config, trained, images)
  new = _logits(config, params, images)
  index = recognizer_weights.class_map(tok_lib.Tokenizer("36", head), tokenizer)
  shared = index >= 0
  np.testing.assert_allclose(new[..., shared], old[..., index[shared]], rtol=1e-5, atol=1e-5)


def test_a_head_of_another_kind_is_a_clear_message(trained_recognizer):
  head, source = trained_recognizer
  other = "ar" if head == "ctc" else "ctc"
  config = _tiny(other, init_from=str(source))
  with pytest.raises(errors.ConfigError, match=f"--config.model.head={head} to keep its head"):
    recognition.check_config(config)
  config.init_head = False  # its encoder only
  recognition.check_config(config)
  if head == "ar":
    config = _tiny("ar", init_from=str(source))
    config.model.decoder_width = 64
    with pytest.raises(errors.ConfigError, match="config.model.decoder_width=64 vs 32"):
      recognition.check_config(config)


def test_resume_from_another_data_stream_is_one_line(trained_recognizer, word_tree, tmp_path):
  head, source = trained_recognizer
  result = main_process(
    "finetune_recognition.py:tiny",
    tmp_path / "w",
    f"--config.resume_from={source}",
    f"--config.model.head={head}",
    "--config.data.source=folder",
    f"--config.data.path={word_tree}",
    "--config.total_steps=5",
  )
  assert result.returncode == 1, result.stderr[-3000:]
  error = [line for line in result.stderr.splitlines() if "error:" in line]
  assert len(error) == 1 and "another data stream" in error[0]
  assert f"--config.init_from='{source}' instead" in error[0]
  assert "Traceback" not in result.stderr


def test_a_cased_recognizer_is_scored_with_both_protocols(trained_recognizer, tmp_path):
  head, source = trained_recognizer
  config = _tiny(head, charset="94", init_from=str(source), total_steps=1)
  config.eval.charset = "36,94"
  tables = recognition.train_and_evaluate(config, str(tmp_path)).metrics
  assert set(tables) == {"test_heldout_fonts", "test_heldout_fonts_94"}
  (row36,), (row94,) = tables["test_heldout_fonts"], tables["test_heldout_fonts_94"]
  assert row94["word_accuracy"] <= row36["word_accuracy"]  # case counts in the 94 protocol
  assert "(charset 94)" in (tmp_path / "eval_test_heldout_fonts_94.md").read_text()
