"""moefy exporter: MoEfy Hugging Face models and export them to ONNX."""
from .export import ExportReport, ValidationError, export

__all__ = ["ExportReport", "ValidationError", "export"]
