"""mms_jax: Multi-Masking Strategy (MMS) self-supervised pretraining for text images."""

__version__ = "0.1.0"
