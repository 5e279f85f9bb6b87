"""Scene-text benchmarks: per-benchmark scores, the sample-weighted average, tables.

A split of an LMDB tree (data.source='str_lmdb') may hold several benchmarks, one
LMDB folder each (see docs/recognition.md), e.g.

  <data.path>/test/IIIT5k/{data.mdb,lock.mdb}   3000 samples
  <data.path>/test/SVT/...                       647
  ...

pipeline.list_benchmarks(data_config, split) lists them; each is scored on its own
and the average weights every sample equally (sum of correct / sum of samples).
"""

import collections
from collections.abc import Callable
from collections.abc import Sequence
import csv
import json
import logging
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from mms_jax.data import pipeline
from mms_jax.evaluate import text_metrics

# The standard benchmarks, by their usual folder names, and their sizes after the
# usual filtering (36-character, case-insensitive protocol).
IIIT5K = "IIIT5k"
SVT = "SVT"
IC13_857 = "IC13_857"
IC13_1015 = "IC13_1015"
IC15_1811 = "IC15_1811"
IC15_2077 = "IC15_2077"
SVTP = "SVTP"
CUTE80 = "CUTE80"
BENCHMARK_SIZES = {
  IIIT5K: 3000,
  SVT: 647,
  IC13_857: 857,
  IC13_1015: 1015,
  IC15_1811: 1811,
  IC15_2077: 2077,
  SVTP: 645,
  CUTE80: 288,
}
# The six-benchmark average most papers report (7672 samples), and the larger one.
STANDARD_6 = (IIIT5K, SVT, IC13_857, IC15_1811, SVTP, CUTE80)
STANDARD_6_FULL = (IIIT5K, SVT, IC13_1015, IC15_2077, SVTP, CUTE80)
# Union14M-Benchmark subsets (sizes depend on the release; not checked).
UNION14M = (
  "curve",
  "multi_oriented",
  "artistic",
  "contextless",
  "salient",
  "multi_words",
  "general",
)

AVERAGE = "average"
COLUMNS = ("benchmark", "num", "word_accuracy", "one_minus_ned", "skipped")


def expected_size(name: str) -> int | None:
  """Known size of a benchmark given its (tree-relative) name, else None."""
  return BENCHMARK_SIZES.get(os.path.basename(os.path.normpath(name)))


def evaluate_dataset(
  predict: Callable[[np.ndarray], Sequence[str]],
  data_config,
  split: str,
  *,
  batch_size: int,
  image_size,
  charset: str = "36",
  case_sensitive: bool | None = None,
  max_batches: int | None = None,
  on_batch=None,
) -> dict:
  """Counts (text_metrics.counts) of one data set, summed over every process.

  Each process reads its own slice (pipeline.padded_eval_batches): predict(images
  float32[b, H, W, 3]) -> b strings gets this process's rows of one global batch, and
  every process calls it the same number of times (so it may run a model on the global
  batch); padding rows are not scored. on_batch(batch, predictions) is called with the
  scored rows of each batch (e.g. to keep a picture). The counts also hold `skipped`
  (records left out as unreadable or outside the label filter, when reading or when
  the TFDS data was built) and `skip_reasons` {reason: count}.
  """
  total = text_metrics.add_counts()
  source = pipeline.make_source(data_config, split)
  batches = pipeline.padded_eval_batches(
    data_config,
    split,
    batch_size,
    {"image": (*image_size, 3)},
    image_size=tuple(image_size),
    worker_count=0,
    with_labels=True,
    source=source,
  )
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    valid = batch["valid"]
    preds = [p for p, v in zip(predict(batch["image"]), valid) if v]
    gts = [str(t) for t, v in zip(batch["label"], valid) if v]
    total = text_metrics.add_counts(total, text_metrics.counts(gts, preds, charset, case_sensitive))
    if on_batch is not None and preds:
      on_batch({"image": batch["image"][valid], "label": batch["label"][valid]}, preds)
  skips = getattr(source, "skips", None)
  reasons = dict(skips.skipped) if skips is not None else {}
  total, reasons = _sum_over_processes(total, reasons)
  return {**total, "skipped": sum(reasons.values()), "skip_reasons": dict(sorted(reasons.items()))}


def _sum_over_processes(counts, reasons):
  """(counts, skip reasons) summed over every process (unchanged with one)."""
  if jax.process_count() == 1:
    return counts, reasons
  keys = sorted(counts)
  gathered = multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.float32))
  summed = dict(zip(keys, np.asarray(gathered).reshape(-1, len(keys)).sum(0).tolist()))
  summed.update({k: int(round(summed[k])) for k in ("num", "correct")})
  # Skip reasons differ between processes: exchange them as fixed-size JSON bytes.
  text = json.dumps(reasons).encode()[:_REASONS_BYTES].ljust(_REASONS_BYTES)
  every = multihost_utils.process_allgather(np.frombuffer(text, np.uint8))
  total_reasons = collections.Counter()
  for row in np.asarray(every).reshape(-1, _REASONS_BYTES):
    total_reasons.update(json.loads(row.tobytes().decode().strip() or "{}"))
  return summed, dict(total_reasons)


_REASONS_BYTES = 4096


def display_name(data_config, name: str) -> str:
  """A benchmark's row name: its tree-relative path, or the folder's own name when
  data.path is the benchmark itself (the path '.')."""
  if os.path.normpath(name) == ".":
    return (
      os.path.basename(os.path.normpath(os.path.expanduser(data_config.get("path") or "."))) or name
    )
  return name


def evaluate(
  predict,
  data_config,
  split: str,
  *,
  batch_size: int,
  image_size,
  charset: str = "36",
  case_sensitive: bool | None = None,
  max_batches: int | None = None,
  on_batch=None,
) -> list[dict]:
  """Rows {benchmark, num, word_accuracy, one_minus_ned} per benchmark of `split`,
  then the sample-weighted average (when there are several)."""
  rows, all_counts, skipped = [], [], 0
  for name in pipeline.list_benchmarks(data_config, split):
    c = evaluate_dataset(
      predict,
      data_config,
      name,
      batch_size=batch_size,
      image_size=image_size,
      charset=charset,
      case_sensitive=case_sensitive,
      max_batches=max_batches,
      on_batch=on_batch,
    )
    shown = display_name(data_config, name)
    if c["skipped"]:
      reasons = ", ".join(f"{k}={v}" for k, v in c["skip_reasons"].items())
      logging.warning(
        "Benchmark %s: %d record(s) skipped and not scored (%s).", shown, c["skipped"], reasons
      )
    expected = expected_size(shown)
    if expected is not None and max_batches is None and c["num"] != expected:
      logging.warning(
        "Benchmark %s has %d samples, the protocol expects %d (check the "
        "charset / max_label_length filtering).",
        shown,
        c["num"],
        expected,
      )
    rows.append({"benchmark": shown, **text_metrics.summarize(c), "skipped": c["skipped"]})
    all_counts.append({k: c[k] for k in text_metrics.add_counts()})
    skipped += c["skipped"]
  if len(rows) > 1:
    rows.append(
      {
        "benchmark": AVERAGE,
        **text_metrics.summarize(text_metrics.add_counts(*all_counts)),
        "skipped": skipped,
      }
    )
  return rows


def format_table(rows: Sequence[dict], title: str = "") -> str:
  """A markdown table; accuracies in percent with two decimals."""
  lines = [f"### {title}", ""] if title else []
  lines += [
    "| benchmark | num | word acc (%) | 1 - NED (%) | skipped |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['benchmark']} | {r['num']} | {100 * r['word_accuracy']:.2f} | "
      f"{100 * r['one_minus_ned']:.2f} | {r.get('skipped', 0)} |"
    )
  return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict], workdir: str, stem: str, title: str = "") -> tuple:
  """Writes `<workdir>/<stem>.md` and `<stem>.csv`; returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  md, csv_path = os.path.join(workdir, f"{stem}.md"), os.path.join(workdir, f"{stem}.csv")
  with open(md, "w") as f:
    f.write(format_table(rows, title))
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
      writer.writerow(
        {
          **r,
          "word_accuracy": f"{r['word_accuracy']:.6f}",
          "one_minus_ned": f"{r['one_minus_ned']:.6f}",
        }
      )
  return md, csv_path
