"""moefy runtime: run MoEfied ONNX models (SparseExpertFFN) with C++ or Numba CPU kernels."""
from .library import cpp_available, isa_paths, library_path
from .session import BACKENDS, InferenceSession, InvalidInputError, InvalidModelError

__all__ = ["BACKENDS", "InferenceSession", "InvalidInputError", "InvalidModelError", "cpp_available", "isa_paths",
           "library_path"]
