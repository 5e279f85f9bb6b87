"""Pretraining step throughput and model-FLOP utilisation on this machine.

  python benchmarks/bench_pretrain.py                      # tiny and ViT-S, f32 and bf16
  python benchmarks/bench_pretrain.py --models=S --batch=16,64 --dtypes=float32

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
from conftest import load_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mms_jax import masking  # pylint: disable=g-import-not-at-top,wrong-import-position
from mms_jax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position
from mms_jax.train import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from mms_jax.train import pretrain  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODELS = flags.DEFINE_list("models", ["tiny", "S"], "tiny (the tests' model) and/or S")
_BATCH = flags.DEFINE_list("batch", ["16"], "per-step batch sizes")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per configuration (after compile)")
_COMPILE = flags.DEFINE_bool("compile_scan", True, "also time ViT-S compile with/without scan")


def model_config(name, dtype, batch, scan=False):
  config = load_config("pretrain", "tiny")
  if name == "S":
    config.model.update(encoder_variant="S", encoder_width=None, encoder_depth=None,
                        encoder_num_heads=None, decoder_width=512, decoder_depth=8,
                        decoder_num_heads=16)
  config.model.dtype, config.model.scan_layers = dtype, scan
  config.batch_size = batch
  config.total_steps = 1000
  return config


def analytic_flops_per_image(config, spec):
  """Forward + backward model FLOPs of one image (3x forward; matmuls only)."""
  encoder = vit.Encoder(variant=config.model.encoder_variant,
                        width=config.model.get("encoder_width"),
                        depth=config.model.get("encoder_depth"),
                        num_heads=config.model.get("encoder_num_heads"))
  width, depth, _ = encoder.dims()
  patch_dim = int(np.prod(config.model.patch)) * 3
  num_cells, visible = spec.num_cells, spec.num_cells - spec.num_masked()

  def blocks(tokens, d, layers):  # qkv + proj + MLP (ratio 4) + two attention matmuls
    return layers * (2 * tokens * d * d * 12 + 4 * tokens * tokens * d)

  forward = (2 * visible * patch_dim * width + blocks(1 + visible, width, depth)
             + 2 * (1 + visible) * width * config.model.decoder_width
             + blocks(1 + num_cells, config.model.decoder_width, config.model.decoder_depth)
             + 2 * num_cells * config.model.decoder_width * patch_dim)
  return 3 * forward


def matmul_peak(size=2048, repeats=10):
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * size ** 3 / best / 1e9


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
    params = model.init({"params": rng}, jnp.zeros((1, height, width, 3)), mask,
                        num_masked=spec.num_masked())["params"]
    return common.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params),
                             rng=jax.random.key_data(jax.random.key(1)))

  shardings = common.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  step = pretrain.make_train_step(model, config, spec, optimizer, schedule, mesh, shardings)
  images = jax.random.uniform(jax.random.key(2), (config.batch_size, height, width, 3),
                              minval=-1, maxval=1)
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
  return dict(seconds=min(times), compile=compile_seconds, xla_flops=xla_flops,
              flops=analytic_flops_per_image(config, spec))


def main(argv):
  del argv
  peak = matmul_peak()
  print(f"jax {jax.__version__}, {jax.device_count()} CPU device(s); "
        f"f32 2048^2 matmul peak {peak:.1f} GFLOP/s\n")
  print("| model | dtype | batch | s/step | img/s | GFLOP/img (analytic / XLA) | GFLOP/s "
        "| % of matmul peak | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in _MODELS.value:
    for dtype in _DTYPES.value:
      for batch in map(int, _BATCH.value):
        r = measure(model_config(name, dtype, batch), _STEPS.value)
        achieved = r["flops"] * batch / r["seconds"] / 1e9
        print(f"| {name} | {dtype} | {batch} | {r['seconds']:.3f} | {batch / r['seconds']:.1f} "
              f"| {r['flops'] / 1e9:.2f} / {r['xla_flops'] / 1e9:.2f} | {achieved:.1f} "
              f"| {100 * achieved / peak:.0f}% | {r['compile']:.1f} |", flush=True)
  if _COMPILE.value:
    print("\n| ViT-S MAE step | compile s |\n|---|---|")
    for scan in (False, True):
      spec, step, state, images = build_step(model_config("S", "float32", 16, scan=scan))
      start = time.perf_counter()
      step.lower(state, images, spec.num_masked()).compile()
      print(f"| scan_layers={scan} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
