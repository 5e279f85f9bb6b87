"""Pretraining step throughput and model-FLOP utilisation on this machine.

  python benchmarks/bench_pretrain.py                      # tiny and ViT-S, f32 and bf16
  python benchmarks/bench_pretrain.py --models=S --batch=16,64 --dtypes=float32
  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/bench_pretrain.py \
      --models=S --dtypes=float32 --profile_dir=/tmp/mms_profile   # per-op table

Prints one markdown table: images/s of the jitted pretraining step (masks sampled on
device, AdamW update), achieved GFLOP/s from the analytic model-FLOP count, its
fraction of the f32 matmul peak measured in the same run (2048x2048 jnp.dot), XLA's own
FLOP count, and the first-call compile time; then compile times with and without
`scan_layers`.
"""

import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from conftest import load_config

from mms_jax import masking
from mms_jax.models import vit
from mms_jax.train import common
from mms_jax.train import pretrain

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program: other benchmarks import this module
  flags.DEFINE_list("models", ["tiny", "S"], "tiny (the tests' model) and/or S")
  flags.DEFINE_list("batch", ["16"], "per-step batch sizes")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
  flags.DEFINE_integer("steps", 3, "timed steps per configuration (after compile)")
  flags.DEFINE_bool("compile_scan", True, "also time ViT-S compile with/without scan")
  flags.DEFINE_string(
    "profile_dir",
    "",
    "trace one step of each configuration there and "
    "print a per-op-category time table (set XLA_FLAGS="
    "--xla_cpu_enable_xprof_traceme=true for per-op events)",
  )


def model_config(name, dtype, batch, scan=False):
  config = load_config("pretrain", "tiny")
  if name == "S":
    config.model.encoder.update(variant="S", width=None, depth=None, num_heads=None)
    config.model.update(decoder_width=512, decoder_depth=8, decoder_num_heads=16)
  config.model.dtype, config.model.scan_layers = dtype, scan
  config.batch_size = batch
  config.total_steps = 1000
  return config


def analytic_flops_per_image(config, spec):
  """Forward + backward model FLOPs of one image (3x forward; matmuls only)."""
  encoder = vit.Encoder(**config.model.encoder)
  width, depth, _ = encoder.dims()
  patch_dim = int(np.prod(config.model.encoder.patch)) * 3
  num_cells, visible = spec.num_cells, spec.num_cells - spec.num_masked()

  def blocks(tokens, d, layers):  # qkv + proj + MLP (ratio 4) + two attention matmuls
    return layers * (2 * tokens * d * d * 12 + 4 * tokens * tokens * d)

  forward = (
    2 * visible * patch_dim * width
    + blocks(1 + visible, width, depth)
    + 2 * (1 + visible) * width * config.model.decoder_width
    + blocks(1 + num_cells, config.model.decoder_width, config.model.decoder_depth)
    + 2 * num_cells * config.model.decoder_width * patch_dim
  )
  return 3 * forward


def matmul_peak(size=2048, repeats=10, dtype=jnp.float32):
  """Best GFLOP/s of a size^3 matmul in `dtype` on the default device."""
  a = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (size, size)), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * size**3 / best / 1e9


def _time(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def build_step(config):
  spec = pretrain.check_config(config)
  mesh = common.make_mesh(config)
  model = pretrain.build_model(config)
  optimizer, schedule = common.make_optimizer(config, config.total_steps)
  height, width = config.image_size

  def init(rng):
    mask = masking.random_patch(jax.random.key(0), 1, spec.grid, spec.num_masked())
    params = model.init(
      {"params": rng}, jnp.zeros((1, height, width, 3)), mask, num_masked=spec.num_masked()
    )["params"]
    return common.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(jax.random.key(1)),
    )

  shardings = common.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  step = pretrain.make_train_step(model, config, spec, optimizer, schedule, mesh, shardings)
  images = jax.random.uniform(
    jax.random.key(2), (config.batch_size, height, width, 3), minval=-1, maxval=1
  )
  images = common.global_batch(np.asarray(images), mesh)
  return spec, step, state, images


def measure(config, steps):
  spec, step, state, images = build_step(config)
  num_masked = spec.num_masked()
  start = time.perf_counter()
  compiled = step.lower(state, images, num_masked).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) / config.batch_size
  state, metrics = step(state, images, num_masked)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, images, num_masked)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return dict(
    seconds=min(times),
    compile=compile_seconds,
    xla_flops=xla_flops,
    flops=analytic_flops_per_image(config, spec),
  )


def _category(op, meta, shape):
  """A coarse name for one HLO op of the step, from its kind and op_name metadata."""
  for key in ("qkv", "proj", "fc1", "fc2", "embed", "pred", "patch_embed"):
    if f"/{key}/" in meta:
      return key + (" (dot)" if "ynn" in op or op.startswith("dot") else " (other)")
  if "gelu" in meta or "erf" in meta:
    return "gelu"
  if "norm" in meta:
    return "layernorm"
  if (
    "/while" in meta
    or "bhq" in meta
    or "softmax" in meta
    or "reduce_max" in meta
    or ",257,257]" in shape
    or (not meta and op.startswith(("dot", "fusion")))
  ):
    return "attention core (QK^T, softmax, PV and their gradients)"
  if "/attn/" in meta:
    return "attention layout (qkv split / head merge and their gradients)"
  if "mae_loss" in meta or "patchify" in meta or "take_along" in meta or "gather" in op:
    return "loss, masking, token gathers"
  if "add" in meta:
    return "residual adds, gradient sums"
  return "other (optimizer, copies, ...)"


def profile(config, directory):
  """Traces one step; returns [(category, seconds)] summed over the op events."""
  import collections
  import gzip
  import json
  import re

  spec, step, state, images = build_step(config)
  num_masked = spec.num_masked()
  hlo = step.lower(state, images, num_masked).compile().as_text()
  info = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) (\w[\w-]*)\(", line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      kind = re.search(r'"kind":"(\w+)"', line)
      info[m.group(1)] = (
        m.group(3) + (kind.group(1) if kind else ""),
        m.group(2),
        meta.group(1) if meta else "",
      )
  for _ in range(2):
    state, metrics = step(state, images, num_masked)
  jax.block_until_ready(metrics)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    state, metrics = step(state, images, num_masked)
    jax.block_until_ready(metrics)
  trace = sorted(pathlib.Path(directory).glob("**/perfetto_trace.json.gz"))[-1]
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in info:
      op, shape, meta = info[e["name"]]
      if not op.startswith(("while", "call")):  # containers: their bodies are counted
        totals[_category(op, meta, shape)] += e["dur"] / 1e6
  return totals.most_common()


def main(argv):
  del argv
  if FLAGS.profile_dir:
    for name in FLAGS.models:
      for dtype in FLAGS.dtypes:
        for batch in map(int, FLAGS.batch):
          rows = profile(
            model_config(name, dtype, batch), f"{FLAGS.profile_dir}/{name}_{dtype}_{batch}"
          )
          total = sum(t for _, t in rows)
          print(
            f"\n{name} {dtype} batch {batch}: {total:.2f} s of op events in one step\n"
            "| ops | s | share |\n|---|---|---|"
          )
          for category, seconds in rows:
            print(f"| {category} | {seconds:.3f} | {100 * seconds / total:.0f}% |")
    return
  peak = matmul_peak()
  print(
    f"jax {jax.__version__}, {jax.device_count()} CPU device(s); "
    f"f32 2048^2 matmul peak {peak:.1f} GFLOP/s\n"
  )
  print(
    "| model | dtype | batch | s/step | img/s | GFLOP/img (analytic / XLA) | GFLOP/s "
    "| % of matmul peak | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name in FLAGS.models:
    for dtype in FLAGS.dtypes:
      for batch in map(int, FLAGS.batch):
        r = measure(model_config(name, dtype, batch), FLAGS.steps)
        achieved = r["flops"] * batch / r["seconds"] / 1e9
        print(
          f"| {name} | {dtype} | {batch} | {r['seconds']:.3f} | {batch / r['seconds']:.1f} "
          f"| {r['flops'] / 1e9:.2f} / {r['xla_flops'] / 1e9:.2f} | {achieved:.1f} "
          f"| {100 * achieved / peak:.0f}% | {r['compile']:.1f} |",
          flush=True,
        )
  if FLAGS.compile_scan:
    print("\n| ViT-S MAE step | compile s |\n|---|---|")
    for scan in (False, True):
      spec, step, state, images = build_step(model_config("S", "float32", 16, scan=scan))
      start = time.perf_counter()
      step.lower(state, images, spec.num_masked()).compile()
      print(f"| scan_layers={scan} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
