"""Model families, one file each (see base.py). Importing this package registers them all."""
from . import bert, distilbert, gpt2, llama, opt, roberta  # noqa: F401  (registration)
from .base import (ADAPTERS, HF_ACTIVATIONS, DenseFFN, FFNAdapter, UnsupportedModelError, adapter_for, ffn_hidden,
                   patched, register, supported)

__all__ = ["ADAPTERS", "HF_ACTIVATIONS", "DenseFFN", "FFNAdapter", "UnsupportedModelError", "adapter_for",
           "ffn_hidden", "patched", "register", "supported"]
