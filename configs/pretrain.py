r"""MMS pretraining of a ViT-MAE on text images.

Variants (`--config=configs/pretrain.py:VARIANT`):

  (default) small   A 4-layer, 128-wide ViT with 8x4 patches, the masked conv stem and
                    the 2-D ALiBi bias (docs/model.md) on generated 32x128 text images,
                    global batch 32, 600 steps: a few minutes on a 2-core CPU (see
                    docs/results.md). Its encoder is the recognition default's.
  plain             The same size with the paper's plain ViT (4x4 linear patches, no
                    attention bias); exports to PyTorch (docs/pytorch.md).
  tiny              Seconds-long smoke run, plain ViT (tests, notebooks).
  S4_union14m       Paper scale (docs/method.md §2): ViT-S/4 on Union14M-U-style LMDBs,
                    global batch 1024, 20 epochs (2 warmup), bf16 compute. About
                    50.7 GFLOP per image (fwd+bwd with the decoder, analytic;
                    docs/benchmarks.md), ~0.5 EFLOP per epoch of ~10M images, ~10 EFLOP
                    in all; time and cost per accelerator in docs/scaling.md.
                    Set --config.data.path=/path/to/Union14M-U.

  python -m mms_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain
  python -m mms_jax.main --config=configs/pretrain.py:S4_union14m \
      --config.data.path=/data/union14m_u --workdir=/mnt/shared/mms_s4
  (a workdir every host sees: NFS, Filestore or a gcsfuse mount; not a gs:// URL)
Any field can be overridden on the command line (--config.masking.mode=multi_view).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mms_jax import masking
from mms_jax.data import pipeline
from mms_jax.models import encoder_config


def get_config(variant="small"):
  variant = variant or "small"
  c = ml_collections.ConfigDict()
  c.program = "pretrain"
  c.seed = 0
  c.image_size = (32, 128)

  # 8x4 patches (a 4 x 32 grid), the masked conv stem and the 2-D ALiBi attention bias:
  # the encoder that learns to read on a CPU (docs/model.md, docs/results.md). The
  # `plain` variant is the paper's ViT (4x4 linear patches, no bias).
  c.model = dict(
    encoder=dict(
      variant=placeholder(str),
      width=128,
      depth=4,
      num_heads=4,
      patch=(8, 4),
      stem="conv",
      stem_channels=(),
      attention_bias="alibi_2d",
    ),
    decoder_width=128,
    decoder_depth=2,
    decoder_num_heads=4,
    encoder_mode="mae",
    gelu="erf",
    dtype="float32",
    scan_layers=False,
    attention="auto",
  )  # auto: chunked on CPU
  c.loss = dict(norm_pix=True, visible_weight=0.0)
  c.masking = masking.default_config()

  c.data = pipeline.default_config()
  c.data.reader = "direct"  # generate on the fly: no build step for the demo
  c.data.size = dict(train=50_000)
  c.data.worker_count = 0

  c.batch_size = 32
  c.total_steps = 600
  c.num_epochs = placeholder(float)
  c.grad_accum_steps = 1
  # CPU only: split each device's batch into micro-batches whose largest activation
  # fits this many bytes (None: 12 MiB; 0: off). See docs/performance.md.
  c.micro_batch_bytes = placeholder(int)
  c.fsdp = 1
  # The paper's base lr is 1.5e-4 at batch 1024 over millions of images; a short
  # CPU run at batch 32 needs a larger one to move at all.
  c.lr = dict(base=4e-3, warmup_steps=50, warmup_fraction=placeholder(float), end=0.0)
  c.optimizer = dict(b1=0.9, b2=0.95, weight_decay=0.05)
  c.grad_clip_norm = 1.0

  c.log_every = 25
  c.picture_every = 200
  c.num_picture_images = 4
  c.checkpoint = dict(every=200, keep=3, keep_every=placeholder(int))
  # > 0: stop with a checkpoint at this step of the total_steps schedule; re-run
  # without it to continue.
  c.stop_at_step = 0
  c.resume_from = ""
  c.init_from = ""
  c.distributed = dict(coordinator_address="", num_processes=1, process_id=0, auto=False)

  if variant == "small":
    pass
  elif variant == "plain":
    c.model.encoder.update(encoder_config.PAPER_VIT)
  elif variant == "tiny":
    c.model.encoder.update(width=32, depth=1, num_heads=2, **encoder_config.PAPER_VIT)
    c.model.update(
      decoder_width=32,
      decoder_depth=1,
      decoder_num_heads=2,
    )
    c.batch_size = 8
    c.total_steps = 6
    c.lr.warmup_steps = 2
    c.log_every = 2
    c.picture_every = 6
    c.checkpoint.every = 3
    c.data.size = dict(train=256)
  elif variant == "S4_union14m":
    c.model.encoder.update(
      variant="S",
      width=placeholder(int),
      depth=placeholder(int),
      num_heads=placeholder(int),
      **encoder_config.PAPER_VIT,
    )
    c.model.update(
      decoder_width=512,
      decoder_depth=8,
      decoder_num_heads=16,
      scan_layers=True,
      dtype="bfloat16",
    )
    c.data.source = "unlabeled"
    c.data.reader = "tfds"
    c.data.worker_count = 8
    c.batch_size = 1024
    c.total_steps = 0
    c.num_epochs = 20.0
    c.lr = dict(base=1.5e-4, warmup_steps=0, warmup_fraction=0.1, end=0.0)
    c.grad_clip_norm = placeholder(float)
    c.log_every = 100
    c.picture_every = 5000
    c.checkpoint = dict(every=2000, keep=3, keep_every=20000)
    c.distributed.auto = True
  else:
    raise ValueError(f"unknown variant {variant!r}: small, plain, tiny or S4_union14m")
  return c
