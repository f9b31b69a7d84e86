// NEON path (every aarch64 CPU): 32 q registers with fused multiply-add; tile 6 tokens x 16 columns = 24
// accumulators + 4 weight vectors + 1 broadcast.
#define MOEFY_ISA_NS neon
#define MOEFY_LANES 4
#define MOEFY_TILE_TOKENS 6
#define MOEFY_TILE_VECS 4
#define MOEFY_TILE_NAME "6x16"
#include "simd_impl.h"
