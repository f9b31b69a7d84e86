"""What a model is used for decides its inputs and outputs, the ONNX graph's signature (optimum's ONNX
config for the task) and what validation compares. One class per task; a family names its task
(``FFNAdapter.task``)."""
from __future__ import annotations

import abc
import dataclasses

import numpy as np
import torch
from ..progress import tqdm

TASKS: dict[str, type["Task"]] = {}


class ValidationError(RuntimeError):
    pass


def register(cls):
    TASKS[cls.name] = cls
    return cls


def task_for(adapter) -> "Task":
    return TASKS[adapter.task]()


@dataclasses.dataclass
class Validation:
    """The exported graph against the PyTorch MoEfied model, and the MoE against the dense model."""
    backend: str
    max_abs_diff: float  # over real (unpadded) tokens of the texts compared
    max_rel_diff: float  # max_abs_diff / max |PyTorch output|
    validated_on: int  # texts compared
    tied: int  # texts left out: a near-tied routing decision (float32 rounding may pick either expert)
    metrics: dict  # task metrics against the dense model, e.g. {"cosine": ...}
    lines: list[str] = dataclasses.field(default_factory=list)  # what the summary says about them


TIE_MARGIN = 1e-5  # routing margins below this (relative to the largest score) count as ties


def clear_texts(margins: list[list[torch.Tensor]], mask: np.ndarray) -> np.ndarray:
    """Bool [texts]: texts with no near-tied routing decision on a real token in any layer (``margins``:
    per layer, the calls' margins, the first call over the whole batch)."""
    per_layer = [calls[0].reshape(mask.shape) for calls in margins]
    margin = torch.stack(per_layer).amin(0).numpy()
    return np.where(mask, margin, np.inf).min(1) >= TIE_MARGIN


def clear_prefix(margins: list[list[torch.Tensor]], mask: np.ndarray) -> np.ndarray:
    """Bool [texts, tokens]: the real tokens before each text's first near-tied routing decision in any layer. In a
    causal model nothing before that position depends on the decision, so a decoder compares those (a long text
    through many layers almost always meets a tie somewhere, which would leave nothing to compare)."""
    per_layer = [calls[0].reshape(mask.shape) for calls in margins]
    tied = (torch.stack(per_layer).amin(0).numpy() < TIE_MARGIN) & mask
    return mask & (np.cumsum(tied, axis=1) == 0)


def relative_difference(got: np.ndarray, want: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(max abs diff, max abs diff / max |want|) over the rows ``keep`` selects."""
    max_abs = float(np.abs(got - want)[keep].max())
    return max_abs, max_abs / float(np.abs(want[keep]).max())


def length_batches(tokenizer, texts: list[str], input_names, max_length: int, batch_size: int, *, desc: str = "",
                   progress: bool = False):
    """(indices, NumPy feed) over ``texts`` in batches of similar length (less padding), int64 inputs: how held-out
    text is batched everywhere (``moe-export``'s summary and ``moe-eval``), so both see the same numbers."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[i:i + batch_size]
        b = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        yield idx, {k: b[k].astype(np.int64) for k in input_names if k in b}


class Task(abc.ABC):
    name: str = ""  # moefy's name, also the family's FFNAdapter.task
    optimum_task: str = ""  # the task of optimum's ONNX config
    auto_class: str = ""  # the transformers class that loads the model for it
    onnx_config_kwargs: dict = {}  # for optimum's ONNX config of the task

    def model_class(self):
        import transformers
        return getattr(transformers, self.auto_class)

    def prepare_tokenizer(self, tokenizer) -> None:
        """Make batches possible (decoders often have no padding token)."""

    def onnx_config(self, model):
        """optimum's ONNX config of this model for the task: the graph's inputs, outputs and dynamic axes."""
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers optimum's ONNX configs)
        from optimum.exporters.tasks import TasksManager
        ctor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=model, task=self.optimum_task,
                                                            library_name="transformers")
        return ctor(model.config, **self.onnx_config_kwargs)

    @abc.abstractmethod
    def model_inputs(self, model) -> tuple[str, ...]:
        """The model's inputs in a tokenized batch (calibration, validation)."""

    def default_calibration(self, tokenizer, texts: list[str]) -> tuple[list[str], str]:
        """The default corpus's ``texts`` as this task calibrates on them, and what changed (\"\": nothing)."""
        return texts, ""

    def distillation_texts(self, texts: list[str], seed: int) -> tuple[list[str], str]:
        """What the recovery distillation trains on, given its ``texts`` (after them: calibration keeps
        their first ones), and what was added ("": nothing)."""
        return texts, ""

    def batch(self, tokenizer, texts, model, max_length: int) -> dict[str, torch.Tensor]:
        b = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: b[k] for k in self.model_inputs(model) if k in b}

    @abc.abstractmethod
    def outputs(self, model, batch) -> np.ndarray:
        """What validation compares, for a batch (the model as it is: dense or MoEfied)."""

    @abc.abstractmethod
    def validate(self, model, moes, onnx_path, batch, dense: np.ndarray, *, tokenizer, backend: str, rtol: float,
                 log) -> Validation:
        """The ONNX model at ``onnx_path`` against the PyTorch MoEfied ``model`` (its MoE FFNs ``moes``) and the
        dense outputs ``dense`` on ``batch``; raises ValidationError when it does not match."""

    heldout_batch = 32  # texts per batch of held-out fidelity

    @abc.abstractmethod
    def heldout_reference(self, model, tokenizer, texts, max_length: int, *, progress: bool = False):
        """The dense model's side of :meth:`heldout_fidelity` on ``texts`` (computed once, reused per MoE)."""

    @abc.abstractmethod
    def heldout_fidelity(self, reference, onnx_path, tokenizer, texts, max_length: int, *, backend: str,
                         progress: bool = False) -> tuple[dict, str]:
        """(metrics, one summary line): the exported MoE against the dense model on held-out ``texts``, the
        figures ``moe-eval`` reports (its quality columns), computed the same way."""

    def save_extras(self, model, directory) -> None:
        """Files beside model.onnx and config.json that loaders expect (e.g. generation_config.json)."""
