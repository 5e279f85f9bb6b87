"""Before/after: pretraining steps of several code trees, alternating in one run.

  git worktree add /tmp/before <commit>
  python -m benchmarks.ab_trees before=/tmp/before:float32 after=.:float32 \
      before_bf16=/tmp/before:bfloat16 after_bf16=.:bfloat16 [--batch=16 --steps=5]

Each NAME=TREE:DTYPE[:MICRO_BATCH_BYTES] runs in its own process that imports
`benchmarks.bench_pretrain` and `mms_jax` from TREE (so two commits can be compared
without reinstalling) and builds the ViT-S/4 pretraining step there; the parent then
asks each process for one step in turn, `--steps` rounds, so every tree sees the same
load. Prints one markdown row per tree: min / median s/step, img/s, the loss of the
first and the last step (equal losses = equal numerics).
"""

import multiprocessing as mp
import os
import sys
import time

from absl import app
from absl import flags

_BATCH = flags.DEFINE_integer("batch", 16, "per-step batch size")
_STEPS = flags.DEFINE_integer("steps", 5, "alternating rounds after the warm-up step")
_MODEL = flags.DEFINE_string("model", "S", "bench_pretrain.model_config name (tiny or S)")


def _worker(tree, model, dtype, batch, micro_batch_bytes, conn):
  sys.path.insert(0, tree)
  import jax

  from benchmarks import bench_pretrain

  config = bench_pretrain.model_config(model, dtype, batch)
  if micro_batch_bytes:
    config.micro_batch_bytes = int(micro_batch_bytes)
  spec, step, state, images = bench_pretrain.build_step(config)
  compiled = step.lower(state, images, spec.num_masked()).compile()
  state, metrics = compiled(state, images)
  conn.send(float(jax.block_until_ready(metrics)["loss"]))
  while conn.recv() == "step":
    start = time.perf_counter()
    state, metrics = compiled(state, images)
    loss = float(jax.block_until_ready(metrics)["loss"])
    conn.send((time.perf_counter() - start, loss))


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give NAME=TREE:DTYPE[:MICRO_BATCH_BYTES] for each tree")
  mp.set_start_method("spawn")
  runs = {}
  for arg in argv[1:]:
    name, _, spec = arg.partition("=")
    tree, dtype, micro = (spec.split(":") + [""])[:3]
    if not name or not os.path.isdir(os.path.join(tree, "mms_jax")):
      raise app.UsageError(f"{arg!r}: expected NAME=TREE:DTYPE with TREE a checkout")
    parent, child = mp.Pipe()
    args = (os.path.abspath(tree), _MODEL.value, dtype, _BATCH.value, micro, child)
    proc = mp.Process(target=_worker, args=args)
    proc.start()
    runs[name] = dict(conn=parent, proc=proc, times=[], losses=[])
  for run in runs.values():
    run["first"] = run["conn"].recv()
  for _ in range(_STEPS.value):
    for run in runs.values():
      run["conn"].send("step")
      seconds, loss = run["conn"].recv()
      run["times"].append(seconds)
      run["losses"].append(loss)
  print(
    f"\n{_MODEL.value}, batch {_BATCH.value}, {_STEPS.value} alternating steps each; "
    f"load average {os.getloadavg()[0]:.1f}\n"
  )
  print("| tree | s/step min | median | img/s | first loss | last loss |")
  print("|---|---|---|---|---|---|")
  for name, run in runs.items():
    run["conn"].send("stop")
    run["proc"].join()
    times = sorted(run["times"])
    print(
      f"| {name} | {times[0]:.3f} | {times[len(times) // 2]:.3f} | "
      f"{_BATCH.value / times[0]:.2f} | {run['first']:.5f} | {run['losses'][-1]:.5f} |"
    )


if __name__ == "__main__":
  app.run(main)
