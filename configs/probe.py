r"""Frozen-encoder linear probes for recognition, segmentation and SR on cached features.

The encoder runs once over the images; linear heads train on its features
(mms_jax/train/probe.py). The cheapest honest measure of what pretraining learned.

Variants (`--config=configs/probe.py:VARIANT`):

  (default) small   The configs/pretrain.py small encoder (128 wide, 4 blocks, 4x4
                    patches); 2,048 training images (dictionary words up to 12 letters),
                    scored on 500 held-out-font and 500 hard images. ~4 min on a
                    2-core CPU, almost all of it the encoder pass.
  tiny              Seconds (tests).

  python -m mms_jax.main --config=configs/probe.py --workdir=workdirs/probe \
      --config.init_from=workdirs/pretrain
  --config.tasks="('segmentation',)"                 # a subset of the three tasks
  --config.read_depth=2                              # features after block 2 of 4
"""

import ml_collections
from ml_collections.config_dict import placeholder

from mms_jax.data import pipeline
from mms_jax.models import encoder_config


def get_config(variant="small"):
  variant = variant or "small"
  c = ml_collections.ConfigDict()
  c.program = "probe"
  c.seed = 0
  c.image_size = (32, 128)
  c.charset = "36"  # the CTC head's output characters
  c.tasks = ("recognition", "segmentation", "super_resolution")

  # The encoder (models/encoder_config.py): unset fields come from init_from's config.json,
  # else configs/pretrain.py's default (128 wide, 4 deep, 4 heads, 8x4 patches, the masked
  # conv stem, the 2-D ALiBi bias); a field set here (tiny and paper variants, the
  # command line) wins and must match init_from's encoder.
  c.model = dict(
    encoder=encoder_config.unset(),
    gelu="erf",
    dtype="float32",
    scan_layers=False,
  )

  c.data = pipeline.default_config()
  c.data.reader = "direct"
  c.data.charset = c.charset
  c.data.max_label_length = 25
  c.data.size = dict(train=2048, test_heldout_fonts=500, test_hard=500)
  c.data.synthetic_train = dict(fraction_random_strings=0.0, max_label_length=12)
  c.data.worker_count = 0
  c.train_split = "train"
  # Scored splits; charset: the scoring protocol (case-insensitive 0-9a-z).
  c.eval = dict(splits=("test_heldout_fonts", "test_hard"), charset="36")

  c.encode_batch_size = 64
  # Recognition: CTC head, AdamW on minibatches (warmup 5%, cosine decay).
  c.total_steps = 2000
  c.batch_size = 128
  c.recognition = dict(lr=3e-3, weight_decay=1e-4)
  # Segmentation: logistic regression, full-batch L-BFGS; SR: ridge regression.
  c.segmentation = dict(iterations=200, l2=1e-4)
  c.super_resolution = dict(ridge=1e-4)
  c.threshold = 0.5
  c.log_every = 500
  c.init_from = ""  # a pretraining workdir or step directory; '' = random encoder
  # Probe the features after this many blocks (through the final LayerNorm); 0 reads
  # the patch embeddings plus position. Unset: the whole encoder.
  c.read_depth = placeholder(int)

  if variant == "small":
    pass
  elif variant == "tiny":
    c.model.encoder.update(width=32, depth=1, num_heads=2, **encoder_config.PAPER_VIT)
    c.data.size = dict(train=64, test_heldout_fonts=16, test_hard=16)
    c.encode_batch_size = 16
    c.batch_size = 16
    c.total_steps = 20
    c.segmentation.iterations = 5
    c.log_every = 10
  else:
    raise ValueError(f"unknown variant {variant!r}: small or tiny")
  return c
