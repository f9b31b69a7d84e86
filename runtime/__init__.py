"""moefy runtime: run MoEfied ONNX models (SparseExpertFFN) with C++ or Numba CPU kernels."""
from .generate import DecoderSession, Generator
from .library import cpp_available, library_path
from .options import session_options
from .session import BACKENDS, InferenceSession, InvalidInputError

__all__ = ["BACKENDS", "DecoderSession", "Generator", "InferenceSession", "InvalidInputError", "cpp_available",
           "library_path", "session_options"]
