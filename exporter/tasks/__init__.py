"""Tasks, one file each: what a model family is used for (see base.py). Importing this package registers them."""
from . import decoder, encoder  # noqa: F401  (registration)
from .base import TASKS, TIE_MARGIN, Task, Validation, ValidationError, task_for

__all__ = ["TASKS", "TIE_MARGIN", "Task", "Validation", "ValidationError", "task_for"]
