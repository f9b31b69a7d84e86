"""The export's first stage: resolve what the user gave (a Hugging Face directory, a ``.gguf`` file, or a
directory written by ``--save-moefied``) into a loaded model, its tokenizer, its family's adapter and task.
Every check that needs no weights comes first, so a bad input fails in seconds."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from safetensors.numpy import load_file

from .arch import FFNAdapter, UnsupportedModelError, adapter_for, supported
from .config import CONFIG_FILE, ROUTERS_FILE, MoEConfig
from .tasks import task_for


class ModelLoadError(ValueError):
    pass


def gguf_model_type(path: Path) -> str:
    """The Hugging Face model type of a GGUF file, from its metadata (no tensors read)."""
    stat = path.stat()
    return _gguf_model_type(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _gguf_model_type(path: str, mtime: int, size: int) -> str:
    """(Parsing a GGUF's metadata takes seconds: the tokenizer's vocabulary is in it. Keyed by the file's
    modification time and size, so a changed file is read again.)"""
    path = Path(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint
    try:
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except ValueError as e:
        if "is not supported yet" in str(e):  # transformers cannot convert this architecture
            arch = str(e).split("architecture ")[-1].split(" is not")[0]
            raise UnsupportedModelError(f"{path}: GGUF architecture '{arch}' is not supported; moefy converts "
                                        f"{', '.join(supported())} (GGUF: those transformers reads: "
                                        f"{', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a in supported())})"
                                        ) from None
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    except ImportError as e:
        raise ModelLoadError(f"reading GGUF files needs the gguf package: {e}") from None
    except Exception as e:  # a truncated or corrupt file: numpy / struct / KeyError from the reader
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None
    if "model_type" not in config:
        raise ModelLoadError(f"{path}: its GGUF metadata names no architecture")
    return config["model_type"]


def model_type_of(source: Path) -> tuple[str, dict]:
    """(model type, load arguments) of a model directory or GGUF file, or a clear error."""
    if not source.exists():
        raise ModelLoadError(f"model {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{source} is a file but not a .gguf file; pass a Hugging Face model directory "
                                 "(config.json + weights + tokenizer) or a GGUF file")
        return gguf_model_type(source), {"pretrained_model_name_or_path": source.parent, "gguf_file": source.name}
    cfg = source / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{source} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {cfg}: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg} must hold a JSON object, got {type(config).__name__}")
    if "model_type" not in config:
        raise ModelLoadError(f"{cfg} has no model_type")
    if not isinstance(config["model_type"], str):
        raise ModelLoadError(f"{cfg}: model_type must be a string, got {config['model_type']!r}")
    return config["model_type"], {"pretrained_model_name_or_path": source}


def check_source(source) -> FFNAdapter:
    """The family's adapter, or a clear error: without loading weights."""
    model_type, _ = model_type_of(Path(source))
    return adapter_for(model_type)


def load_model(source):
    """(model, tokenizer, adapter, moe_config or None, routers or None) for a Hugging Face directory, a
    ``.gguf`` file (dequantized to float32) or a ``--save-moefied`` directory (with its MoE config and
    routers). The model class follows the family's task (``AutoModel`` for encoders,
    ``AutoModelForCausalLM`` for decoders). Fails before loading weights if the architecture is unsupported."""
    import torch
    from transformers import AutoTokenizer

    source = Path(source)
    model_type, where = model_type_of(source)
    adapter = adapter_for(model_type)
    task = task_for(adapter)
    try:
        model = task.model_class().from_pretrained(**where, local_files_only=True, dtype=torch.float32).eval()
    except Exception as e:  # transformers raises OSError, ValueError, safetensors errors ...
        raise ModelLoadError(f"cannot load the model in {source}: {type(e).__name__}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {source} ({type(e).__name__}: {e}); moefy needs the "
                             "model's tokenizer files (tokenizer.json or the vocabulary) beside the weights") from None
    task.prepare_tokenizer(tokenizer)
    if source.is_dir() and (source / CONFIG_FILE).is_file():
        return model, tokenizer, adapter, MoEConfig.load(source), load_file(source / ROUTERS_FILE)
    return model, tokenizer, adapter, None, None
