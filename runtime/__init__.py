"""moefy runtime: run MoEfied ONNX models (SparseExpertFFN) with C++ or Numba CPU kernels."""
from .generate import DecoderSession, Generator
from .library import cpp_available, isa_paths, library_path
from .options import session_options
from .session import BACKENDS, InferenceSession, InvalidInputError, InvalidModelError

__all__ = ["BACKENDS", "DecoderSession", "Generator", "InferenceSession", "InvalidInputError", "InvalidModelError",
           "cpp_available", "isa_paths", "library_path", "session_options"]
