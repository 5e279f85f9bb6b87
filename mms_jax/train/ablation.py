"""The masking ablation (configs/ablation.py): pretrain per arm, run every stage, tabulate.

Workdir layout:
  seed_<s>/<arm>/pretrain/     the arm's pretraining run (none for arm 'none')
  seed_<s>/<arm>/<stage>/      each stage's own run, initialised from that encoder
  seed_<s>/<arm>/<stage>_from_step_<n>/
                               the same stage from step n of that pretraining
                               (config.pretrain_lengths), in the table as '<arm>@<n>'
  seed_<s>/<arm>/pretrain_to_step_<n>/
                               the pretraining re-run to step n with its own config and
                               seed, only where pretrain/ no longer keeps that step
  runs.jsonl                   one line per finished run with its final evaluation
  xla_cache/                   JAX's persistent compilation cache (config.compilation_cache):
                               the arms and seeds compile the same programs again
  ablation.md, ablation.csv    mean ± std over seeds per arm and reported metric, and
                               each arm's difference to each config.compare_to arm, paired by
                               seed, with the 95 % t interval of the mean difference
  ablation_raw.json            the settings and every run's numbers

Pretraining length is an axis without new pretrainings: config.pretrain_lengths
names steps of each arm's pretraining (checkpoints along its one schedule, kept
through config.pretrain.checkpoint.keep_every) from which every stage also runs.

With config.pretrained_in (another ablation workdir) the pretrainings are read from
there, after checking that they are finished and were run with this config.pretrain;
the stages run here. One set of pretrainings then serves several fine-tune settings
(e.g. --config.finetune.data.size.train=1024 in a second workdir).

A run already in runs.jsonl is skipped; an unfinished one resumes from its own
checkpoints, so the command can be interrupted (SIGTERM, Ctrl-C) and re-run.
config.report_only=True writes the tables from the finished runs and runs nothing.
"""

import copy
import csv
import functools
import importlib
import json
import math
import os
import time

from absl import logging
import flax
import jax
import numpy as np
import scipy.stats

from mms_jax import checkpoints
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
  references = compare_to(config)
  if any(r not in known for r in references):
    raise common.ConfigError(
      f"config.compare_to={config.get('compare_to')!r} names an unknown arm; use some "
      f"of {sorted(known)}, or () for no paired table"
    )
  lengths = tuple(config.get("pretrain_lengths") or ())
  total = config.pretrain.get("total_steps") or 0
  bad = [n for n in lengths if not (isinstance(n, int) and 0 < n < total)]
  if bad or len(set(lengths)) != len(lengths):
    raise common.ConfigError(
      f"config.pretrain_lengths={lengths}: give distinct steps between 1 and "
      f"config.pretrain.total_steps - 1 = {total - 1}, e.g. --config.pretrain_lengths='(1000,)'"
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
  extra = [a for a in config.get("arm_pretrain", {}) if a not in config.arm_masking]
  if extra:
    raise common.ConfigError(
      f"config.arm_pretrain has settings for {extra}, which config.arm_masking does not "
      "define; add their masking there"
    )
  for arm in config.get("arm_pretrain", {}):
    pretrain_config(config, arm, 0)
  if config.get("pretrained_in") and not os.path.isdir(config.pretrained_in):
    raise common.ConfigError(
      f"config.pretrained_in={config.pretrained_in!r} is not a directory: give the "
      "workdir of a finished ablation whose pretrainings to reuse, or ''"
    )
  if jax.process_count() > 1:
    raise common.ConfigError(
      "the ablation runs in a single process; launch it without config.distributed"
    )


def compare_to(config):
  """The arms of the paired tables: config.compare_to, a tuple of arms (or one arm)."""
  references = config.get("compare_to") or ()
  return (references,) if isinstance(references, str) else tuple(references)


def label(arm, pretrain_step=None):
  """The table's name for an arm's runs: '<arm>', or '<arm>@<step>' for those started
  from step `pretrain_step` of its pretraining."""
  return f"{arm}@{pretrain_step}" if pretrain_step else arm


def run_label(row):
  """label() of a runs.jsonl row."""
  return label(row["arm"], row.get("pretrain_step"))


def table_arms(config):
  """Table rows in order: 'none', then each pretrained arm at each pretraining length
  (shortest first), the finished pretraining under the arm's own name last."""
  lengths = sorted(config.get("pretrain_lengths") or ())
  rows = [a for a in config.arms if a == "none"]
  for step in (*lengths, None):
    rows += [label(a, step) for a in config.arms if a != "none"]
  return rows


def runs_done(config, runs):
  """How many of this config's runs (its seeds, table rows and stages) are in `runs`,
  keyed (seed, label, stage); runs of other settings in the same workdir do not count."""
  rows = set(table_arms(config))
  return sum(
    1 for s, name, stage in runs if s in config.seeds and name in rows and stage in config.stages
  )


def pretrain_config(config, arm, seed):
  """config.pretrain with the arm's masking and its config.arm_pretrain settings."""
  c = copy.deepcopy(config.pretrain)
  c.lock()
  try:
    c.update(config.get("arm_pretrain", {}).get(arm, {}))
  except (KeyError, AttributeError, TypeError) as e:
    raise common.ConfigError(
      f"config.arm_pretrain.{arm} does not fit config.pretrain: {e}; give fields that "
      "configs/pretrain.py has, nested as there, e.g. dict(loss=dict(visible_weight=1.0))"
    ) from None
  with c.unlocked():
    c.seed = seed
    c.masking.mode = config.arm_masking[arm].mode
    c.masking.strategies = tuple(config.arm_masking[arm].strategies)
    lengths = config.get("pretrain_lengths") or ()
    if lengths and not c.checkpoint.get("keep_every"):
      c.checkpoint.keep_every = functools.reduce(math.gcd, lengths)
  return c


# Pretraining fields that change how a run is kept or laid out, not what it learns:
# reusing another workdir's pretraining (config.pretrained_in) ignores them.
RUN_ONLY_FIELDS = (
  "checkpoint",
  "distributed",
  "fsdp",
  "log_every",
  "micro_batch_bytes",
  "num_picture_images",
  "picture_every",
  "resume_from",
  "stop_at_step",
)


def reused_pretraining(config, arm, seed):
  """seed_<s>/<arm>/pretrain of config.pretrained_in, checked to be finished and to
  have been run with this ablation's pretraining config for that arm and seed."""
  other = os.path.join(config.pretrained_in, f"seed_{seed}", arm, "pretrain")
  wanted = json.loads(pretrain_config(config, arm, seed).to_json_best_effort())
  path = os.path.join(other, "config.json")
  if not os.path.exists(path):
    raise common.ConfigError(
      f"config.pretrained_in={config.pretrained_in!r} has no pretraining of {arm}, seed "
      f"{seed} ({path} does not exist): run the ablation there with this arm and seed "
      "first, or unset config.pretrained_in"
    )
  with open(path) as f:
    stored = flax.traverse_util.flatten_dict(json.load(f), sep=".")
  wanted = flax.traverse_util.flatten_dict(wanted, sep=".")
  differ = sorted(
    k
    for k in stored.keys() | wanted.keys()
    if k.split(".")[0] not in RUN_ONLY_FIELDS and stored.get(k) != wanted.get(k)
  )
  if differ:
    shown = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} here" for k in differ[:4])
    raise common.ConfigError(
      f"config.pretrained_in: {other} was pretrained with another config ({shown}"
      f"{', ...' if len(differ) > 4 else ''}); give this ablation the same "
      "config.pretrain, or unset config.pretrained_in"
    )
  last = checkpoints.resolve_checkpoint(other, what="config.pretrained_in")
  if int(last.name) != wanted["total_steps"]:
    raise common.ConfigError(
      f"config.pretrained_in: {other} stopped at step {last.name} of "
      f"{wanted['total_steps']}; finish the ablation there first (re-run its command)"
    )
  return other


def pretrained_step(config, arm, seed, arm_dir, step, pretrained):
  """The step directory of `step` in the arm's pretraining `pretrained`: kept there,
  else a re-run of the same pretraining config that stops there, in
  <arm_dir>/pretrain_to_step_<step>/."""
  kept = os.path.join(pretrained, checkpoints.CHECKPOINTS_DIR, str(step))
  if os.path.isdir(kept) and checkpoints.verify_manifest(kept) is None:
    return kept
  replay = os.path.join(arm_dir, f"pretrain_to_step_{step}")
  c = pretrain_config(config, arm, seed)
  with c.unlocked():
    c.stop_at_step = step
  logging.info(
    "Ablation: %s does not keep step %d; re-running %s seed %d's pretraining to it in %s.",
    pretrained,
    step,
    arm,
    seed,
    replay,
  )
  _run_program("pretrain", c, replay)
  return os.path.join(replay, checkpoints.CHECKPOINTS_DIR, str(step))


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
  """Runs one program to its last step (config.stop_at_step, else the end); returns its
  final evaluation."""
  result = importlib.import_module(PROGRAMS[program]).train_and_evaluate(config, workdir)
  last = config.get("stop_at_step") or common.total_steps(config)
  if result.step != last:
    raise Interrupted(
      f"{workdir} stopped at step {result.step} of {last}; re-run the "
      "same command to resume the ablation"
    )
  return final_evaluation(workdir, last)


def load_runs(workdir):
  """{(seed, label, stage): row} of runs.jsonl."""
  runs = {}
  path = os.path.join(workdir, "runs.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        runs[(row["seed"], run_label(row), row["stage"])] = row
  return runs


def summarize(config, runs, reference=None):
  """Rows [label, (title, mean, std, n) per report column] over the seeds run.

  With `reference` (an arm), each value is the row's minus the reference's at the same
  seed (same initialisation and data) and pretraining length, over the seeds both
  have; the reference's own rows are left out.
  """

  def value(seed, arm, stage, key):
    run = runs.get((seed, arm, stage))
    return None if run is None else run["metrics"].get(key)

  table = []
  for arm in table_arms(config):
    name, _, step = arm.partition("@")
    if name == reference:
      continue
    base_arm = label(reference, step if reference != "none" else None)
    cells = []
    for stage, key, title in config.report:
      if stage not in config.stages:
        continue
      values = []
      for seed in config.seeds:
        v = value(seed, arm, stage, key)
        base = value(seed, base_arm, stage, key) if reference else 0.0
        if v is not None and base is not None:
          values.append(v - base)
      values = np.array(values, np.float64)
      std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
      cells.append((title, float(values.mean()) if len(values) else float("nan"), std, len(values)))
    table.append((arm, cells))
  return table


def confidence_interval(mean, std, n, level=0.95):
  """Student-t interval of a mean of n values with sample std `std` ((nan, nan) for n < 2)."""
  if n < 2:
    return float("nan"), float("nan")
  half = scipy.stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
  return mean - half, mean + half


def format_markdown(table, title, signed=False):
  """Cells 'mean ± std'; signed (paired) tables add the 95 % interval of the mean."""
  header = [title for title, *_ in table[0][1]]
  number = "{:+.3g}" if signed else "{:.4g}"
  lines = ["| arm | seeds | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
  for arm, cells in table:
    shown = []
    for _, mean, std, n in cells:
      if n == 0:
        shown.append("—")
        continue
      cell = number.format(mean) + (f" ± {std:.2g}" if n > 1 else "")
      if signed and n > 1:
        low, high = confidence_interval(mean, std, n)
        cell += f" [{number.format(low)}, {number.format(high)}]"
      shown.append(cell)
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
  for reference in compare_to(config):
    if reference not in config.arms or len(config.arms) < 2:
      continue
    paired = summarize(config, runs, reference)
    paired_title = (
      f"Difference to {reference} at the same seed (same initialisation and data)"
      + (
        " and pretraining length" if reference != "none" and config.get("pretrain_lengths") else ""
      )
      + ": mean ± std over the seeds both arms have [95 % t interval of the mean]"
    )
    sections.append((paired_title, format_markdown(paired, paired_title, signed=True)))
    tables.append((reference, paired))
  text = "\n\n".join(f"{t}\n\n{m}" for t, m in sections)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(workdir, "ablation.csv"), "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["arm", "minus_arm", "metric", "mean", "std", "n", "ci95_low", "ci95_high"])
    for minus, rows in tables:
      for arm, cells in rows:
        for name, mean, std, n in cells:
          out.writerow([arm, minus, name, mean, std, n, *confidence_interval(mean, std, n)])
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
  """Runs every (seed, arm, pretraining length, stage) not yet in runs.jsonl; returns a
  common.RunResult whose metrics are the summary table."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  if config.get("compilation_cache", True):
    use_compilation_cache(workdir)
  common.write_config(config, workdir)
  runs = load_runs(workdir)
  if config.get("report_only"):
    return common.RunResult(len(runs), metrics=write_reports(config, workdir, runs))
  lengths = sorted(config.get("pretrain_lengths") or ())

  def wanted(seed, arm):
    """(label, pretraining step or None, stage) of the arm's runs not yet done."""
    steps = (*lengths, None) if arm != "none" else (None,)
    return [
      (label(arm, step), step, stage)
      for step in steps
      for stage in config.stages
      if (seed, label(arm, step), stage) not in runs
    ]

  total_runs = len(config.seeds) * len(table_arms(config)) * len(config.stages)
  todo = sum(len(wanted(seed, arm)) for seed in config.seeds for arm in config.arms)
  logging.info(
    "Ablation: %d arms x %d pretraining lengths x %d stages x %d seeds; %d runs to do.",
    len(config.arms),
    len(lengths) + 1,
    len(config.stages),
    len(config.seeds),
    todo,
  )
  started = time.time()
  for seed in config.seeds:
    for arm in config.arms:
      arm_dir = os.path.join(workdir, f"seed_{seed}", arm)
      todo = wanted(seed, arm)
      if not todo:
        continue
      pretrained, pretrain_seconds = "", None
      if arm != "none" and config.get("pretrained_in"):
        pretrained = reused_pretraining(config, arm, seed)
        logging.info("Ablation: %s, seed %d: reusing the pretraining in %s.", arm, seed, pretrained)
      elif arm != "none":
        pretrained = os.path.join(arm_dir, "pretrain")
        logging.info("Ablation: pretraining %s, seed %d.", arm, seed)
        t0 = time.time()
        _run_program("pretrain", pretrain_config(config, arm, seed), pretrained)
        pretrain_seconds = round(time.time() - t0, 1)
      for name, step, stage in todo:
        init_from = pretrained
        if step:
          init_from = pretrained_step(config, arm, seed, arm_dir, step, pretrained)
        logging.info("Ablation: %s from %s, seed %d.", stage, name, seed)
        t0 = time.time()
        stage_dir = os.path.join(arm_dir, f"{stage}_from_step_{step}" if step else stage)
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
        if step:
          row["pretrain_step"] = step
        pretrain_seconds = None
        runs[(seed, name, stage)] = row
        with open(os.path.join(workdir, "runs.jsonl"), "a") as f:
          f.write(json.dumps(row, sort_keys=True) + "\n")
        logging.info(
          "Ablation: %d/%d runs done, %.1f min so far.",
          runs_done(config, runs),
          total_runs,
          (time.time() - started) / 60,
        )
  return common.RunResult(len(runs), metrics=write_reports(config, workdir, runs))
