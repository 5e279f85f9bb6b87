"""Input pipeline throughput: images/s delivered as batches (batch 64, 32x128).

Compares the synthetic generator alone with grain pipelines (0 and 2 worker
processes) over (a) the TFDS array_record build of the synthetic set and (b) the
generator run on the fly (reader='direct'). Prints a markdown table.

  python benchmarks/bench_pipeline.py [--num_images 2048] [--data_dir /tmp/...]
"""

import argparse
import gc
import tempfile
import time

from mms_jax.data import pipeline
from mms_jax.data import synthetic


def _rate(batches, num_images: int, batch_size: int) -> float:
  next(batches)  # start-up (workers, first reads) is not throughput
  steps = num_images // batch_size
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch_size / (time.perf_counter() - start)


def bench_generator(num_images: int) -> float:
  gen = synthetic.SyntheticGenerator(synthetic.SyntheticConfig(image_size=(32, 128)))
  gen.sample(0)
  start = time.perf_counter()
  for i in range(1, num_images + 1):
    gen.sample(i)
  return num_images / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_images", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--workers", default="0,2")
  args = parser.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_pipeline_")
  n, bs = args.num_images, args.batch_size

  rows = [("generator alone (1 process)", "-", bench_generator(min(n, 512)))]
  base = pipeline.default_config()
  base.data_dir = data_dir
  base.size = {"train": n + 2 * bs}
  start = time.perf_counter()
  pipeline.make_source(base, "train")  # builds the array_record files once
  print(f"TFDS build of {n + 2 * bs} images: {time.perf_counter() - start:.1f} s")
  for reader in ("tfds", "direct"):
    config = base.copy_and_resolve_references()
    config.reader = reader
    for workers in (int(w) for w in args.workers.split(",")):
      it = pipeline.make_pipeline(
        config,
        "train",
        bs,
        train=True,
        seed=0,
        image_size=(32, 128),
        worker_count=workers,
        shard_index=0,
        shard_count=1,
      )
      rows.append((f"grain over {reader}", str(workers), _rate(it, n, bs)))
      del it
      gc.collect()

  print(f"\n| source | workers | images/s (batch {bs}, 32x128) |")
  print("| --- | --- | --- |")
  for name, workers, rate in rows:
    print(f"| {name} | {workers} | {rate:,.0f} |")


if __name__ == "__main__":
  main()
