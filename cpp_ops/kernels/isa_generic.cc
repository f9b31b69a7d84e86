// Portable path for other architectures: GCC/Clang vector extensions of 4 floats, lowered to whatever the
// target has.
#define MOEFY_ISA_NS generic
#define MOEFY_LANES 4
#define MOEFY_TILE_TOKENS 2
#define MOEFY_TILE_VECS 4
#define MOEFY_TILE_NAME "2x16"
#include "simd_impl.h"
