"""Throughput of the synthetic generator on one core.

Prints a markdown table of images/s for 'normal' and 'hard' difficulty, with
the system fonts (when installed) and with matplotlib's bundled fonts only.

  python benchmarks/bench_generator.py [--n 2000] [--warmup 2500] [--size 32,128]
"""

import argparse
import os
import time

from mms_jax.data import fonts as fonts_lib
from mms_jax.data import synthetic


def images_per_second(config: synthetic.SyntheticConfig, n: int, warmup: int) -> float:
  """Steady-state rate: warm-up samples fill the font cache first."""
  gen = synthetic.SyntheticGenerator(config)
  for i in range(warmup):
    gen.sample(i)
  start = time.perf_counter()
  for i in range(warmup, warmup + n):
    gen.sample(i)
  return n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2000)
  parser.add_argument("--warmup", type=int, default=2500)
  parser.add_argument("--size", default="32,128", help="H,W")
  args = parser.parse_args()
  size = tuple(int(v) for v in args.size.split(","))

  font_sets = []
  system = fonts_lib.list_font_files(fonts_lib.default_font_dirs())
  if system:
    font_sets.append((f"system ({len(fonts_lib.discover_fonts())} fonts)", None))
  mpl_only = ("/nonexistent-font-dir",)
  font_sets.append((f"matplotlib only ({len(fonts_lib.discover_fonts(mpl_only))} fonts)", mpl_only))

  print(
    f"Synthetic generator, {size[0]}x{size[1]}, one process "
    f"(cpu count {os.cpu_count()}), {args.n} samples after {args.warmup} "
    "warm-up samples.\n"
  )
  print("| fonts | difficulty | images/s |")
  print("|---|---|---:|")
  for name, font_dirs in font_sets:
    for difficulty in synthetic.DIFFICULTIES:
      config = synthetic.SyntheticConfig(
        image_size=size, font_dirs=font_dirs, difficulty=difficulty
      )
      rate = images_per_second(config, args.n, args.warmup)
      print(f"| {name} | {difficulty} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
