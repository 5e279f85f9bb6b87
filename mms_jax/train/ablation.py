"""The masking ablation (configs/ablation.py): pretrain per arm, run every stage, tabulate.

Workdir layout:
  seed_<s>/<arm>/pretrain/     the arm's pretraining run (none for arm 'none')
  seed_<s>/<arm>/<stage>/      each stage's own run, initialised from that encoder
  runs.jsonl                   one line per finished run with its final evaluation
  xla_cache/                   JAX's persistent compilation cache (config.compilation_cache):
                               the arms and seeds compile the same programs again
  ablation.md, ablation.csv    mean ± std over seeds per arm and reported metric, and
                               each arm's difference to config.compare_to, paired by seed
  ablation_raw.json            the settings and every run's numbers

A run already in runs.jsonl is skipped; an unfinished one resumes from its own
checkpoints, so the command can be interrupted (SIGTERM, Ctrl-C) and re-run.
config.report_only=True writes the tables from the finished runs and runs nothing.
"""

import copy
import csv
import importlib
import json
import os
import time

from absl import logging
import jax
import numpy as np

from mms_jax.models import encoder_config
from mms_jax.programs import PROGRAMS
from mms_jax.train import common

STAGE_PROGRAMS = {
  "probe": "probe",
  "finetune": "recognition",
  "segmentation": "segmentation",
  "super_resolution": "super_resolution",
}


class Interrupted(RuntimeError):
  """A run stopped before its last step (preemption); re-run the command to resume."""


def check_config(config):
  """Raises common.ConfigError naming the field, before any run starts."""
  arms = tuple(config.arms)
  known = set(config.arm_masking.keys()) | {"none"}
  unknown = [a for a in arms if a not in known]
  if not arms or unknown:
    raise common.ConfigError(
      f"config.arms={arms}: {unknown or 'empty'}; use some of {sorted(known)} (add "
      "an entry to config.arm_masking for a new masking arm)"
    )
  reference = config.get("compare_to") or ""
  if reference and reference not in known:
    raise common.ConfigError(
      f"config.compare_to={reference!r} is not an arm; use one of "
      f"{sorted(known)}, or '' for no paired table"
    )
  stages = tuple(config.stages)
  bad = [s for s in stages if s not in STAGE_PROGRAMS]
  if bad:
    raise common.ConfigError(f"config.stages has unknown {bad}; use some of {list(STAGE_PROGRAMS)}")
  seeds = tuple(config.seeds)
  if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
    raise common.ConfigError(
      f"config.seeds={seeds}: give non-negative integers, e.g. --config.seeds='(0, 1, 2)'"
    )
  for stage in stages:
    if config[stage].program != STAGE_PROGRAMS[stage]:
      raise common.ConfigError(
        f"config.{stage}.program={config[stage].program!r}; the "
        f"{stage} stage runs the {STAGE_PROGRAMS[stage]!r} program"
      )
  for name in ("pretrain", *stages):
    if not config[name].get("total_steps"):
      raise common.ConfigError(
        f"config.{name}.total_steps is not set: the ablation "
        "compares runs of a fixed number of steps"
      )
  if config.pretrain.program != "pretrain":
    raise common.ConfigError("config.pretrain must be a pretraining config")
  if jax.process_count() > 1:
    raise common.ConfigError(
      "the ablation runs in a single process; launch it without config.distributed"
    )


def pretrain_config(config, arm, seed):
  c = copy.deepcopy(config.pretrain)
  with c.unlocked():
    c.seed = seed
    c.masking.mode = config.arm_masking[arm].mode
    c.masking.strategies = tuple(config.arm_masking[arm].strategies)
  return c


def stage_config(config, stage, seed, init_from):
  c = copy.deepcopy(config[stage])
  with c.unlocked():
    c.seed = seed
    c.init_from = init_from
    if not init_from:  # the random-init arm: the pretrained arms' encoder, untrained
      c.model.encoder.update(encoder_config.check(config.pretrain.model.encoder))
  return c


def final_evaluation(workdir, step):
  """The 'eval/...' scalars written at `step` in workdir/metrics.jsonl ({} if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  found = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if row.get("step") == step:
          found.update({k: v for k, v in row.items() if k.startswith("eval/")})
  return found


def _run_program(program, config, workdir):
  """Runs one program to its last step; returns its final evaluation."""
  result = importlib.import_module(PROGRAMS[program]).train_and_evaluate(config, workdir)
  last = common.total_steps(config)
  if result.step != last:
    raise Interrupted(
      f"{workdir} stopped at step {result.step} of {last}; re-run the "
      "same command to resume the ablation"
    )
  return final_evaluation(workdir, last)


def load_runs(workdir):
  runs = {}
  path = os.path.join(workdir, "runs.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        runs[(row["seed"], row["arm"], row["stage"])] = row
  return runs


def summarize(config, runs, reference=None):
  """Rows [arm, (title, mean, std, n) per report column] over the seeds run.

  With `reference` (an arm), each value is the arm's minus the reference's at the same
  seed (same initialisation and data), over the seeds both have; the reference's own
  row is left out.
  """

  def value(seed, arm, stage, key):
    run = runs.get((seed, arm, stage))
    return None if run is None else run["metrics"].get(key)

  table = []
  for arm in config.arms:
    if arm == reference:
      continue
    cells = []
    for stage, key, title in config.report:
      if stage not in config.stages:
        continue
      values = []
      for seed in config.seeds:
        v = value(seed, arm, stage, key)
        base = value(seed, reference, stage, key) if reference else 0.0
        if v is not None and base is not None:
          values.append(v - base)
      values = np.array(values, np.float64)
      std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
      cells.append((title, float(values.mean()) if len(values) else float("nan"), std, len(values)))
    table.append((arm, cells))
  return table


def format_markdown(table, title, signed=False):
  header = [title for title, *_ in table[0][1]]
  number = "{:+.3g}" if signed else "{:.4g}"
  lines = ["| arm | seeds | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
  for arm, cells in table:
    shown = []
    for _, mean, std, n in cells:
      if n == 0:
        shown.append("—")
      else:
        shown.append(number.format(mean) + (f" ± {std:.2g}" if n > 1 else ""))
    seeds_run = max((n for *_, n in cells), default=0)
    lines.append(f"| {arm} | {seeds_run} | " + " | ".join(shown) + " |")
  return "\n".join(lines)


def write_reports(config, workdir, runs):
  table = summarize(config, runs)
  title = (
    f"Masking ablation, seeds {tuple(config.seeds)} (mean ± std over seeds; std needs 2 or more)"
  )
  sections = [(title, format_markdown(table, title))]
  tables = [("", table)]
  reference = config.get("compare_to") or ""
  if reference and reference in config.arms and len(config.arms) > 1:
    paired = summarize(config, runs, reference)
    paired_title = (
      f"Difference to {reference} at the same seed (same initialisation "
      "and data): mean ± std over the seeds both arms have"
    )
    sections.append((paired_title, format_markdown(paired, paired_title, signed=True)))
    tables.append((reference, paired))
  text = "\n\n".join(f"{t}\n\n{m}" for t, m in sections)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(workdir, "ablation.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["arm", "minus_arm", "metric", "mean", "std", "n"])
    for minus, rows in tables:
      for arm, cells in rows:
        for name, mean, std, n in cells:
          out.writerow([arm, minus, name, mean, std, n])
  with open(os.path.join(workdir, "ablation_raw.json"), "w") as f:
    json.dump(
      {"config": json.loads(config.to_json_best_effort()), "runs": list(runs.values())},
      f,
      indent=1,
      sort_keys=True,
    )
  print(f"\n{text}\n", flush=True)
  return table


def use_compilation_cache(workdir):
  """Points JAX's persistent compilation cache at workdir/xla_cache, unless the user set one."""
  if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))


def train_and_evaluate(config, workdir):
  """Runs every (seed, arm, stage) not yet in runs.jsonl; returns a common.RunResult
  whose metrics are the summary table."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  if config.get("compilation_cache", True):
    use_compilation_cache(workdir)
  common.write_config(config, workdir)
  runs = load_runs(workdir)
  if config.get("report_only"):
    return common.RunResult(len(runs), metrics=write_reports(config, workdir, runs))
  todo = [
    (s, a, st)
    for s in config.seeds
    for a in config.arms
    for st in config.stages
    if (s, a, st) not in runs
  ]
  logging.info(
    "Ablation: %d arms x %d stages x %d seeds; %d runs to do.",
    len(config.arms),
    len(config.stages),
    len(config.seeds),
    len(todo),
  )
  started = time.time()
  for seed in config.seeds:
    for arm in config.arms:
      arm_dir = os.path.join(workdir, f"seed_{seed}", arm)
      stages = [st for st in config.stages if (seed, arm, st) not in runs]
      if not stages:
        continue
      init_from, pretrain_seconds = "", None
      if arm != "none":
        init_from = os.path.join(arm_dir, "pretrain")
        logging.info("Ablation: pretraining %s, seed %d.", arm, seed)
        t0 = time.time()
        _run_program("pretrain", pretrain_config(config, arm, seed), init_from)
        pretrain_seconds = round(time.time() - t0, 1)
      for stage in stages:
        logging.info("Ablation: %s from %s, seed %d.", stage, arm, seed)
        t0 = time.time()
        stage_dir = os.path.join(arm_dir, stage)
        metrics = _run_program(
          STAGE_PROGRAMS[stage], stage_config(config, stage, seed, init_from), stage_dir
        )
        row = {
          "seed": seed,
          "arm": arm,
          "stage": stage,
          "metrics": metrics,
          "seconds": round(time.time() - t0, 1),
          # Time of the arm's pretraining in this invocation (a finished one is only
          # restored; the first stage after it carries it, the others None).
          "pretrain_seconds": pretrain_seconds,
          "workdir": stage_dir,
        }
        pretrain_seconds = None
        runs[(seed, arm, stage)] = row
        with open(os.path.join(workdir, "runs.jsonl"), "a") as f:
          f.write(json.dumps(row, sort_keys=True) + "\n")
        done = sum(1 for k in runs if k[0] in config.seeds)
        logging.info(
          "Ablation: %d/%d runs done, %.1f min so far.",
          done,
          len(config.seeds) * len(config.arms) * len(config.stages),
          (time.time() - started) / 60,
        )
  return common.RunResult(len(runs), metrics=write_reports(config, workdir, runs))
