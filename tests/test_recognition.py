"""Recognition: decoding on hand-built logits, losses, encoder transfer from a real
pretraining checkpoint, the frozen probe, benchmark tables, the program end to end."""

import csv
import json
import logging

from conftest import load_config
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mms_jax import checkpoints
from mms_jax.data import fonts as fonts_lib
from mms_jax.data import formats
from mms_jax.data import pipeline
from mms_jax.data import tokenizer as tok_lib
from mms_jax.evaluate import str_benchmarks
from mms_jax.models import encoder_config
from mms_jax.models import recognition as rec
from mms_jax.train import common
from mms_jax.train import finetune
from mms_jax.train import pretrain
from mms_jax.train import recognition


def _one_hot_logits(ids, k):
  return jax.nn.one_hot(jnp.asarray(ids), k) * 10.0


# ------------------------------------------------------------------------------------
# Decoding and losses.
# ------------------------------------------------------------------------------------
def test_ctc_greedy_collapses_repeats_and_drops_blanks():
  tok = tok_lib.Tokenizer("abc", "ctc")  # blank 0, a 1, b 2, c 3
  frames = [
    [1, 1, 0, 1, 2, 2, 0, 0, 3, 3],  # a a _ a b b _ _ c c -> "aabc"
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # all blank -> ""
    [3, 0, 3, 3, 0, 3, 2, 1, 1, 1],
  ]  # -> "cccba"
  ids, lengths = jax.jit(rec.ctc_greedy)(_one_hot_logits(frames, 4))
  assert ids.shape == (3, 10)
  np.testing.assert_array_equal(lengths, [4, 0, 5])
  assert tok.decode(ids) == ["aabc", "", "cccba"]


def test_ar_greedy_feeds_back_and_stops_at_eos():
  tok = tok_lib.Tokenizer("abc", "ar")  # eos 0, a 1, b 2, c 3, bos 4
  fixed = np.array(
    [
      [1, 2, 3, 0, 1, 1],  # a b c EOS (then ignored)
      [3, 3, 3, 3, 3, 3],
    ]
  )  # never stops: all 6 positions

  def fixed_step(tokens):
    del tokens
    return jnp.broadcast_to(_one_hot_logits(fixed, 5), (2, 6, 5))

  ids, _ = jax.jit(lambda: rec.ar_greedy(fixed_step, 2, 6, tok.bos, 0))()
  np.testing.assert_array_equal(ids, [[1, 2, 3, 0, 0, 0], [3, 3, 3, 3, 3, 3]])
  assert tok.decode(ids) == ["abc", "cccccc"]

  # A step function that reads its input: next = previous token + 1 (mod 4) after BOS.
  def counting_step(tokens):
    nxt = jnp.where(tokens == tok.bos, 2, (tokens + 1) % 4)  # bos -> 'b'
    return _one_hot_logits(nxt, 5)

  ids, _ = jax.jit(lambda: rec.ar_greedy(counting_step, 1, 6, tok.bos, 0))()
  np.testing.assert_array_equal(ids, [[2, 3, 0, 0, 0, 0]])  # b c EOS
  assert tok.decode(ids) == ["bc"]


def test_ar_loss_ignores_padding_and_smooths():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
  targets = jnp.array([[1, 2, 0, 7], [3, 0, 7, 7]])  # pad id 7
  loss, _ = rec.ar_loss(logits, targets, pad_id=7)
  logp = jax.nn.log_softmax(logits)
  picks = [(0, 0, 1), (0, 1, 2), (0, 2, 0), (1, 0, 3), (1, 1, 0)]
  assert loss == pytest.approx(-np.mean([logp[b, t, c] for b, t, c in picks]), rel=1e-5)
  smooth, _ = rec.ar_loss(logits, targets, pad_id=7, label_smoothing=0.1)
  expected = np.mean(
    [-0.92 * logp[b, t, c] - 0.02 * (logp[b, t].sum() - logp[b, t, c]) for b, t, c in picks]
  )
  assert smooth == pytest.approx(expected, rel=1e-5)


def test_ctc_loss_prefers_the_right_alignment():
  labels, lengths = jnp.array([[1, 2, 0]]), jnp.array([2])
  good = _one_hot_logits([[1, 1, 0, 2, 0]], 3)
  bad = _one_hot_logits([[2, 2, 0, 1, 0]], 3)
  assert rec.ctc_loss(good, labels, lengths) < 0.1 < rec.ctc_loss(bad, labels, lengths)


def test_ar_decoder_is_causal():
  m = rec.Recognizer(
    num_classes=5,
    head="ar",
    vocab_size=7,
    bos=5,
    max_length=5,
    encoder=encoder_config.EncoderConfig(
      width=32, depth=1, num_heads=2, **encoder_config.PAPER_VIT
    ),
    decoder_width=32,
    decoder_depth=1,
    decoder_num_heads=2,
  )
  images = jax.random.normal(jax.random.key(0), (1, 8, 32, 3))
  tokens = jnp.array([[5, 1, 2, 3, 4, 0]])
  v = jax.jit(m.init)(jax.random.key(1), images, tokens)
  apply = jax.jit(m.apply)
  a, b = apply(v, images, tokens), apply(v, images, tokens.at[:, 3].set(0))
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert not np.allclose(a[:, 3:], b[:, 3:])


def test_layer_decay_scales():
  params = {
    "encoder": {
      "patch_embed": {"kernel": np.zeros(2)},
      "cls_token": np.zeros(2),
      "blocks_0": {"w": np.zeros(2)},
      "blocks_1": {"w": np.zeros(2)},
      "norm": {"scale": np.zeros(2)},
    },
    "head": {"w": np.zeros(2)},
  }
  s = finetune.layer_lr_scales(params, 0.5)
  assert s["encoder"]["patch_embed"]["kernel"] == s["encoder"]["cls_token"] == 0.125
  assert (s["encoder"]["blocks_0"]["w"], s["encoder"]["blocks_1"]["w"]) == (0.25, 0.5)
  assert s["encoder"]["norm"]["scale"] == s["head"]["w"] == 1.0
  scanned = {"encoder": {"blocks": {"w": np.zeros((3, 4, 4))}}, "head": {}}
  np.testing.assert_allclose(
    finetune.layer_lr_scales(scanned, 0.5)["encoder"]["blocks"]["w"].ravel(), [0.125, 0.25, 0.5]
  )


# ------------------------------------------------------------------------------------
# Encoder transfer from a real pretraining checkpoint.
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  config = load_config("pretrain", "tiny")
  config.total_steps, config.picture_every, config.checkpoint.every = 2, 0, 2
  pretrain.train_and_evaluate(config, str(workdir))
  return workdir


def _tiny_config(**eval_overrides):
  config = load_config("finetune_recognition", "tiny")
  config.data.size = dict(train=64, val=8, test_heldout_fonts=8, test_hard=8)
  config.total_steps = 2
  config.eval.update(eval_overrides)
  return config


def _model_params(config, seed=0):
  tok = recognition.check_config(config)
  model = recognition.build_model(config, tok)
  images = jnp.zeros((1, *config.image_size, 3))
  args = (images, jnp.zeros((1, 26), jnp.int32)) if config.model.head == "ar" else (images,)
  return jax.jit(model.init)(jax.random.key(seed), *args)["params"]


def test_loading_transfers_the_encoder_and_keeps_the_head_new(pretrain_dir):
  config = _tiny_config()
  fresh = _model_params(config)
  saved = jax.tree.map(np.asarray, checkpoints.load_params(pretrain_dir))
  merged = common.load_pretrained(fresh, pretrain_dir)
  leaves = jax.tree.leaves_with_path(merged["encoder"])
  assert leaves and len(leaves) == len(jax.tree.leaves(saved["encoder"]))
  for (path, a), b in zip(leaves, jax.tree.leaves(saved["encoder"])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # The pretraining decoder is dropped; the head is the fresh one.
  assert set(merged) == {"encoder", "head"}
  for a, b in zip(jax.tree.leaves(merged["head"]), jax.tree.leaves(fresh["head"])):
    np.testing.assert_array_equal(a, b)
  # A different encoder shape fails, naming the tensor; the lenient merge of continued
  # pretraining keeps such tensors fresh instead.
  config.model.encoder.width = 64
  wider = _model_params(config)
  with pytest.raises(ValueError, match=r"encoder/.*checkpoint \(.*32.*\) vs model"):
    common.load_pretrained(wider, pretrain_dir)
  lenient = common.load_pretrained(wider, pretrain_dir, strict=False)
  for a, b in zip(jax.tree.leaves(lenient), jax.tree.leaves(wider)):
    np.testing.assert_array_equal(a, b)


def test_frozen_probe_leaves_the_encoder_bit_identical(pretrain_dir, tmp_path):
  config = _tiny_config(splits=("test_hard",))
  config.freeze_encoder = True
  config.model.head = "ctc"
  config.init_from = str(pretrain_dir)
  state = recognition.train_and_evaluate(config, str(tmp_path)).state
  assert int(state.step) == 2
  trained = jax.tree.map(np.asarray, checkpoints.load_params(tmp_path))
  saved = jax.tree.map(np.asarray, checkpoints.load_params(pretrain_dir))
  for a, b in zip(jax.tree.leaves(trained["encoder"]), jax.tree.leaves(saved["encoder"])):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  fresh = _model_params(config)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(trained["head"]), jax.tree.leaves(fresh["head"]))
  )


# ------------------------------------------------------------------------------------
# Benchmarks and the program.
# ------------------------------------------------------------------------------------
def test_benchmark_tree_tables(tmp_path):
  rng = np.random.default_rng(0)
  image = lambda: rng.integers(0, 255, (16, 48, 3), np.uint8)
  formats.write_lmdb(
    str(tmp_path / "test" / "IIIT5k"),
    [{"image": image(), "label": t} for t in ("Hello", "world", "abc")],
  )
  formats.write_lmdb(
    str(tmp_path / "test" / "SVT"), [{"image": image(), "label": t} for t in ("one", "two")]
  )
  data = pipeline.default_config()
  data.update(source="str_lmdb", path=str(tmp_path), reader="direct", charset="36")
  # Batches of 2 are padded to size (the padding row is predicted but not scored).
  answers = iter(["hello", "word", "abc", "(padding)", "one", "too"])
  rows = str_benchmarks.evaluate(
    lambda x: [next(answers) for _ in x], data, "test", batch_size=2, image_size=(32, 128)
  )
  names = [r["benchmark"] for r in rows]
  assert names == ["test/IIIT5k", "test/SVT", "average"]
  assert [r["num"] for r in rows] == [3, 2, 5]
  assert rows[0]["word_accuracy"] == pytest.approx(2 / 3)
  assert rows[1]["one_minus_ned"] == pytest.approx((1 + 2 / 3) / 2)
  assert rows[2]["word_accuracy"] == pytest.approx(3 / 5)  # weighted, not (2/3 + 1/2) / 2
  md, path = str_benchmarks.write_tables(rows, str(tmp_path / "out"), "eval_test")
  assert "| average | 5 | 60.00 |" in open(md).read()
  with open(path) as f:
    assert [r["benchmark"] for r in csv.DictReader(f)] == names


def test_program_runs_writes_tables_and_eval_only_matches(pretrain_dir, tmp_path):
  config = _tiny_config(splits=("test_heldout_fonts",))
  config.init_from = str(pretrain_dir)
  state = recognition.train_and_evaluate(config, str(tmp_path)).state
  assert int(state.step) == 2
  table = (tmp_path / "eval_test_heldout_fonts.md").read_text()
  assert "| test_heldout_fonts | 8 |" in table
  assert (tmp_path / "eval_test_heldout_fonts.csv").exists()
  assert (tmp_path / "predictions_0000002.png").stat().st_size > 1000
  with open(tmp_path / "eval_test_heldout_fonts.csv") as f:
    trained_row = next(csv.DictReader(f))

  # Evaluate-only: the same checkpoint scored from another workdir gives the same table.
  config = _tiny_config(splits=("test_heldout_fonts",))
  config.eval_only, config.eval_from = True, str(tmp_path)
  results = recognition.train_and_evaluate(config, str(tmp_path / "eval")).metrics
  (row,) = results["test_heldout_fonts"]
  assert row["num"] == 8
  assert f"{row['word_accuracy']:.6f}" == trained_row["word_accuracy"]
  assert f"{row['one_minus_ned']:.6f}" == trained_row["one_minus_ned"]
  assert (tmp_path / "eval" / "eval_test_heldout_fonts.md").exists()
  assert not (tmp_path / "eval" / "checkpoints").exists()


@pytest.mark.parametrize("head", ["ctc", "ar"])
def test_gradient_accumulation_matches_the_full_batch(head):
  """grad_accum_steps=4 gives the one-batch update (CTC: exactly the batch mean; AR: the
  mean of micro-batch token means, equal here because every label has the same length)."""

  def one_step(accumulation):
    config = _tiny_config()
    config.model.head, config.grad_accum_steps = head, accumulation
    tok = recognition.check_config(config)
    model = recognition.build_model(config, tok)
    mesh = common.make_mesh(config)
    params = _model_params(config)
    optimizer, schedule = finetune.make_finetune_optimizer(config, 10, params)
    state = common.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(jax.random.key(1)),
    )
    shardings = common.state_shardings(state, mesh)
    step = recognition.make_train_step(model, config, tok, optimizer, schedule, mesh, shardings)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, *config.image_size, 3)).astype(np.float32)
    labels = ["".join(rng.choice(list("abcdef0123"), 5)) for _ in range(8)]
    batch = recognition.host_batch(
      {"image": images, "label": np.array(labels)}, tok, config.model.max_length
    )
    h, w = config.image_size
    micro = f"tensor<{8 // accumulation}x{h}x{w}x3xf32>"  # the model's input
    runs_on_micro_batches = micro in step.lower(state, batch).as_text()
    state, metrics = step(state, batch)
    return jax.device_get((state.params, metrics["loss"])), runs_on_micro_batches

  ((params_1, loss_1), _), ((params_4, loss_4), micro_4) = one_step(1), one_step(4)
  assert micro_4  # the model sees micro-batches of 2
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_4), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_the_program_records_the_fonts_of_its_generated_splits(tmp_path):
  config = _tiny_config(splits=("test_heldout_fonts",))
  report = recognition.record_synthetic_fonts(config, str(tmp_path))
  saved = json.loads((tmp_path / "synthetic_fonts.json").read_text())
  assert saved == report and set(saved) == {"train", "test_heldout_fonts"}
  train, heldout = set(saved["train"]["fonts"]), set(saved["test_heldout_fonts"]["fonts"])
  assert train and heldout and not train & heldout  # held-out fonts are never trained on
  assert saved["train"]["count"] == len(train)
  assert saved["train"]["fingerprint"] != saved["test_heldout_fonts"]["fingerprint"]


def test_fonts_unlike_the_documented_ones_are_warned_about(tmp_path, monkeypatch, caplog):
  config = _tiny_config(splits=("test_heldout_fonts",))
  report = recognition.record_synthetic_fonts(config, str(tmp_path))
  assert report["train"]["reference_fingerprint"] == fonts_lib.REFERENCE_FINGERPRINTS["train"]
  monkeypatch.setitem(fonts_lib.REFERENCE_FINGERPRINTS, "heldout", "000000000000")
  with caplog.at_level(logging.WARNING):
    recognition.record_synthetic_fonts(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("test_heldout_fonts differ" in m and "launch/install.sh" in m for m in warnings)
