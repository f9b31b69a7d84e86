// Portable path for other architectures: GCC/Clang vector extensions of 4 floats, lowered to whatever the
// target has; no intrinsics (MOEFY_PORTABLE), so the check build on x86 or ARM tests exactly this code.
#define MOEFY_ISA_NS generic
#define MOEFY_PORTABLE 1
#define MOEFY_LANES 4
#define MOEFY_TILE_TOKENS 2
#define MOEFY_TILE_VECS 4
#define MOEFY_TILE_NAME "2x16"
#include "simd_impl.h"
