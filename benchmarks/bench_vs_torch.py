"""mms_jax's pretraining step side by side with transformers' ViTMAEForPreTraining.

  python -m benchmarks.bench_vs_torch                       # tiny and S, batch 16 and 64, f32/bf16
  python -m benchmarks.bench_vs_torch --quick               # tiny + S, batch 16, f32, 2 steps
  python -m benchmarks.bench_vs_torch --models=S --batches=16,64 --dtypes=float32 --steps=3

Both sides run the same model on the same machine with the same number of threads:
the mms_jax step of `mms_jax.train.pretrain.make_train_step` (masks sampled on device,
MAE loss with norm_pix, global-norm clipping, AdamW) and HF `ViTMAEForPreTraining`
(torch CPU, sdpa attention) loaded from the *same initial weights* (exported with
`mms_jax.convert.to_hf_vitmae`) with the same clipping and AdamW. Before timing, the
f32 losses of both models on one batch and one mask are compared (`--check`, once per
model, in f32 whatever dtype is timed).

On a GPU (`--torch_device=auto` picks CUDA when torch sees one) both sides run on it:
torch with sdpa attention (flash kernels under bf16 autocast), XLA with its GPU
attention; the peak is then the best 8192^3 bf16 matmul of either framework
(`--peak_size`, `--peak_dtype`), so "% of peak" reads as MFU.

PyTorch runs in a child process (its own thread pool, nothing shared with XLA); the two
steps alternate: one mms_jax step, one HF step, `--steps` times, after one warm-up step
each. Printed per configuration: s/step (min over the timed steps), img/s, the ratio
mms_jax / HF in img/s (from the minima, and from the medians), achieved GFLOP/s from the
analytic model-FLOP count (`bench_pretrain.analytic_flops_per_image`, fwd + bwd) and
its fraction of the f32 matmul peak. The peak is the best 2048x2048 f32 matmul rate
measured in this run (jax and torch, sampled before every configuration and between
the timed steps; the maximum is used). The load average is printed at the start and after every row, because other
jobs may share the machine.

torch and transformers are an optional extra (pip install -e .[torch]); without them
only the mms_jax side runs.
"""

import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_pretrain

from mms_jax import convert as cv
from mms_jax.models import mae as mae_lib
from mms_jax.models import vit
from mms_jax.train import pretrain

_MODELS = flags.DEFINE_list(
  "models", ["tiny", "S"], "tiny (the tests' model) and/or S (ViT-S/4 + 512x8 decoder)"
)
_BATCHES = flags.DEFINE_list("batches", ["16", "64"], "per-step batch sizes")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes (torch: autocast)")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per side and configuration")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads (XLA uses every core)")
_QUICK = flags.DEFINE_bool("quick", False, "tiny + S, batch 16, float32, 2 steps")
_TORCH = flags.DEFINE_bool("torch", True, "run the HF side (needs torch + transformers)")
_CHECK = flags.DEFINE_bool("check", True, "compare the f32 losses of both models first")
_HUGETLB = flags.DEFINE_bool(
  "malloc_hugetlb", True, "run both sides with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (re-executes)"
)
_SET = flags.DEFINE_list("set", [], "mms_jax config overrides, e.g. model.gelu=tanh")
_TORCH_DEVICE = flags.DEFINE_enum(
  "torch_device",
  "auto",
  ["auto", "cpu", "cuda"],
  "the HF side's device (auto: cuda if torch sees one)",
)
_PEAK_SIZE = flags.DEFINE_integer(
  "peak_size", 0, "matmul size of the peak (0: 2048 on CPU, 8192 on an accelerator)"
)
_PEAK_DTYPE = flags.DEFINE_enum(
  "peak_dtype",
  "auto",
  ["auto", "float32", "bfloat16"],
  "dtype of the peak matmul (auto: f32 on CPU, bf16 else)",
)


# ------------------------------------------------------------------------------------
# The PyTorch side, in a child process.
# ------------------------------------------------------------------------------------
def _torch_worker(conn, threads, device, peak_size, peak_dtype):
  """Serves ('peak'|'build'|'loss'|'step'|'stop', arg) requests over a pipe."""
  import warnings

  import torch

  warnings.filterwarnings("ignore", message=".*re-initialised a position embedding")
  torch.set_num_threads(threads)
  cuda = device == "cuda"

  def timed(fn):
    if cuda:
      torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
      torch.cuda.synchronize()
    return time.perf_counter() - start, out

  s = {}
  while True:
    cmd, arg = conn.recv()
    if cmd == "stop":
      return
    if cmd == "peak":
      a = torch.rand(peak_size, peak_size, device=device).to(getattr(torch, peak_dtype))
      timed(lambda: a @ a)
      best = min(timed(lambda: a @ a)[0] for _ in range(arg))
      conn.send(2 * peak_size**3 / best / 1e9)
    elif cmd == "build":
      model = cv.load_hf_vitmae(arg["dir"], attn_implementation="sdpa").train().to(device)
      decay = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and p.ndim > 1 and "token" not in n
      ]
      rest = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not (p.ndim > 1 and "token" not in n)
      ]
      opt = torch.optim.AdamW(
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}],
        lr=arg["lr"],
        betas=arg["betas"],
        weight_decay=arg["wd"],
      )
      gen = torch.Generator().manual_seed(0)
      images = (torch.rand((arg["batch"], 3, *arg["image_size"]), generator=gen) * 2 - 1).to(device)
      s = dict(
        model=model,
        opt=opt,
        images=images,
        clip=arg["clip"],
        dtype=dict(float32=None, bfloat16=torch.bfloat16)[arg["dtype"]],
      )
      conn.send(sum(p.numel() for p in model.parameters() if p.requires_grad))
    elif cmd == "loss":  # arg: (images NHWC, bool mask [B, L]); HF keeps the lowest noise
      images, mask = arg
      length = mask.shape[1]
      noise = torch.from_numpy(mask.astype(np.float32) + np.arange(length) / (2.0 * length))
      with torch.no_grad():
        out = s["model"](
          torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device),
          noise=noise.float().to(device),
        )
      conn.send((float(out.loss), bool((out.mask.cpu().numpy().astype(bool) == mask).all())))
    elif cmd == "step":
      model, opt = s["model"], s["opt"]

      def step():
        if s["dtype"] is None:
          loss = model(s["images"]).loss
        else:
          with torch.autocast(device, dtype=s["dtype"]):
            loss = model(s["images"]).loss
        loss.backward()
        if s["clip"]:
          torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

      seconds, loss = timed(step)
      conn.send((seconds, float(loss.detach())))


class TorchSide:
  """Handle on the child process."""

  def __init__(self, threads, device, peak_size, peak_dtype):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.device = device
    self.proc = ctx.Process(
      target=_torch_worker, args=(child, threads, device, peak_size, peak_dtype), daemon=True
    )
    self.proc.start()

  def call(self, cmd, arg=None):
    self.conn.send((cmd, arg))
    return self.conn.recv()

  def close(self):
    self.conn.send(("stop", None))
    self.proc.join(timeout=30)


def _time(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _load():
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------
# The mms_jax side.
# ------------------------------------------------------------------------------------
def _config(name, dtype, batch):
  config = bench_pretrain.model_config(name, dtype, batch)
  for item in _SET.value:
    key, value = item.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for p in path:
      node = node[p]
    old = node.get(leaf)
    if old is None:  # a field the config does not list (e.g. model.attention)
      try:
        value = int(value)
      except ValueError:
        pass
      with node.unlocked():
        node[leaf] = value
    else:
      node[leaf] = type(old)(value) if not isinstance(old, bool) else value.lower() == "true"
  return config


def _model_config(config, params):
  m = config.model
  _, _, heads = vit.Encoder(**m.encoder).dims()
  return cv.ModelConfig(
    image_size=tuple(config.image_size),
    num_heads=heads,
    decoder_num_heads=m.decoder_num_heads,
    gelu=m.gelu,
    norm_pix_loss=config.loss.norm_pix,
  ).with_shapes_of(params)


def _check_losses(config, params, spec, torch_side):
  """f32 loss of both models on the same images, mask and weights."""
  model = pretrain.build_model(config)
  num_masked = spec.num_masked()
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (4, *config.image_size, 3)).astype(np.float32)
  mask = rng.random((4, spec.num_cells)).argsort(-1).argsort(-1) < num_masked
  pred, _ = jax.jit(model.apply, static_argnames="num_masked")(
    {"params": params}, images, jnp.asarray(mask), num_masked=num_masked
  )
  ours, _ = mae_lib.mae_loss(
    images,
    pred,
    jnp.asarray(mask),
    tuple(config.model.encoder.patch),
    norm_pix=config.loss.norm_pix,
  )
  theirs, same_mask = torch_side.call("loss", (images, mask))
  return float(ours), theirs, same_mask


def _peak_setting():
  """(size, dtype name) of the peak matmul: f32 2048 on CPU, bf16 8192 elsewhere."""
  cpu = jax.default_backend() == "cpu"
  size = _PEAK_SIZE.value or (2048 if cpu else 8192)
  dtype = _PEAK_DTYPE.value if _PEAK_DTYPE.value != "auto" else ("float32" if cpu else "bfloat16")
  return size, dtype


def _jax_peak(repeats):
  size, dtype = _peak_setting()
  return bench_pretrain.matmul_peak(size, repeats=repeats, dtype=getattr(jnp, dtype))


def run_configuration(name, dtype, batch, steps, torch_side, peaks, checked=()):
  """Times one configuration; the f32 loss check runs for models not in `checked`."""
  config = _config(name, dtype, batch)
  spec, step, state, images = bench_pretrain.build_step(config)
  num_masked = spec.num_masked()
  flops = bench_pretrain.analytic_flops_per_image(config, spec)
  peaks.append(_jax_peak(repeats=5))
  check = ""
  if torch_side is not None:
    peaks.append(torch_side.call("peak", 5))
    with tempfile.TemporaryDirectory() as tmp:
      params = jax.device_get(state.params)
      cv.to_hf_vitmae(params, _model_config(config, params), tmp)
      if _CHECK.value and name not in checked:  # in f32, whatever the timed dtype
        torch_side.call(
          "build",
          dict(
            dir=tmp,
            batch=4,
            image_size=tuple(config.image_size),
            dtype="float32",
            lr=1e-4,
            betas=(0.9, 0.95),
            wd=0.05,
            clip=None,
          ),
        )
        ours, theirs, same_mask = _check_losses(
          _config(name, "float32", 4), params, spec, torch_side
        )
        check = (
          f"loss check (same weights, mask, f32): mms_jax {ours:.7f}, HF "
          f"{theirs:.7f}, rel. diff {abs(ours - theirs) / abs(theirs):.1e}, same "
          f"mask {same_mask}"
        )
      torch_side.call(
        "build",
        dict(
          dir=tmp,
          batch=batch,
          image_size=tuple(config.image_size),
          dtype=dtype,
          lr=float(config.lr.base * batch / 256),
          betas=(config.optimizer.b1, config.optimizer.b2),
          wd=config.optimizer.weight_decay,
          clip=config.get("grad_clip_norm"),
        ),
      )

  compile_s = _time(lambda: step.lower(state, images, num_masked).compile())

  def jax_step():
    nonlocal state
    start = time.perf_counter()
    state, metrics = step(state, images, num_masked)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  jax_step()  # warm-up (compiles again from the cache)
  if torch_side is not None:
    torch_side.call("step")
  ours, theirs = [], []
  for _ in range(steps):  # the peak is sampled between steps too: the load varies
    peaks.append(_jax_peak(repeats=3))
    ours.append(jax_step())
    if torch_side is not None:
      peaks.append(torch_side.call("peak", 3))
      theirs.append(torch_side.call("step")[0])
  return dict(config=config, flops=flops, ours=ours, theirs=theirs, compile=compile_s, check=check)


def _reexec_with_malloc_hugetlb():
  """Restarts this program with glibc's malloc asking for transparent huge pages.

  XLA:CPU allocates its temporary buffers (GBs for ViT-S) afresh in every step; with
  4 KiB pages that is ~700k page faults per step (docs/performance.md). glibc reads
  GLIBC_TUNABLES only at start-up, hence the re-exec. The torch child inherits it.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))
  program = ["-m", __spec__.name] if __spec__ else [sys.argv[0]]
  os.execv(sys.executable, [sys.executable, *program, *sys.argv[1:]])


def main(argv):
  del argv
  if _HUGETLB.value:
    _reexec_with_malloc_hugetlb()
  models, batches, dtypes, steps = (
    _MODELS.value,
    [int(b) for b in _BATCHES.value],
    _DTYPES.value,
    _STEPS.value,
  )
  if _QUICK.value:
    models, batches, dtypes, steps = ["tiny", "S"], [16], ["float32"], 2
  torch_side = None
  if _TORCH.value:
    try:
      import torch
      import transformers

      device = _TORCH_DEVICE.value
      if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
      torch_side = TorchSide(_THREADS.value, device, *_peak_setting())
    except ImportError as e:
      print(f"(no PyTorch side: {e})")
  versions = f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
  if torch_side is not None:
    import torch
    import transformers

    versions += (
      f", torch {torch.__version__} on {torch_side.device}, transformers {transformers.__version__}"
    )
  print(
    f"{versions}; {os.cpu_count()} CPUs; load average {_load()} (1/5/15 min); "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
  )
  if _SET.value:
    print(f"mms_jax overrides: {_SET.value}")
  print(
    "\n| model | dtype | batch | mms_jax s/step | HF s/step | mms_jax img/s | HF img/s "
    "| ratio (min / median) | mms_jax GFLOP/s | HF GFLOP/s | mms_jax % of peak "
    "| HF % of peak | peak GFLOP/s | load |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  peaks, notes, checked = [], [], set()
  for name in models:
    for dtype in dtypes:
      for batch in batches:
        r = run_configuration(name, dtype, batch, steps, torch_side, peaks, checked)
        checked.add(name)
        peak = max(peaks)
        ours, theirs = min(r["ours"]), (min(r["theirs"]) if r["theirs"] else float("nan"))
        g_ours, g_theirs = r["flops"] * batch / ours / 1e9, r["flops"] * batch / theirs / 1e9
        med = (
          statistics.median(r["theirs"]) / statistics.median(r["ours"])
          if r["theirs"]
          else float("nan")
        )
        print(
          f"| {name} | {dtype} | {batch} | {ours:.3f} | {theirs:.3f} | {batch / ours:.2f} "
          f"| {batch / theirs:.2f} | {theirs / ours:.2f} / {med:.2f} | {g_ours:.1f} "
          f"| {g_theirs:.1f} | {100 * g_ours / peak:.0f}% | {100 * g_theirs / peak:.0f}% "
          f"| {peak:.0f} | {_load()} |",
          flush=True,
        )
        notes.append(
          f"{name} {dtype} b{batch}: mms_jax steps "
          f"{[round(t, 3) for t in r['ours']]}, HF steps "
          f"{[round(t, 3) for t in r['theirs']]}, compile {r['compile']:.1f} s, "
          f"{r['flops'] / 1e9:.2f} GFLOP/img. {r['check']}"
        )
  size, peak_dtype = _peak_setting()
  print(
    f"\n{size}^3 {peak_dtype} matmul rates sampled (GFLOP/s, jax/torch alternating): "
    + ", ".join(f"{p:.0f}" for p in peaks)
  )
  for note in notes:
    print("- " + note)
  if torch_side is not None:
    torch_side.close()


if __name__ == "__main__":
  app.run(main)
