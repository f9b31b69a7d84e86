"""moefy exporter: MoEfy Hugging Face models and export them to ONNX."""
from .export import Converted, ExportReport, ValidationError, convert, export
from .recipe import ExportOptions, Recipe

__all__ = ["Converted", "ExportOptions", "ExportReport", "Recipe", "ValidationError", "convert", "export"]
