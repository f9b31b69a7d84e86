// AVX2 + FMA path (x86-64-v3: Intel since Haswell, AMD since Zen): 16 ymm registers; tile 4 tokens x 24
// columns = 12 accumulators + 3 weight vectors + 1 broadcast (the AVX-512 tile would spill).
#define MOEFY_ISA_NS avx2
#define MOEFY_LANES 8
#define MOEFY_TILE_TOKENS 4
#define MOEFY_TILE_VECS 3
#define MOEFY_TILE_NAME "4x24"
#define MOEFY_DOT_TOKENS 3
#define MOEFY_DOT_NEURONS 4
#define MOEFY_DOT_MAX_M 16
#include "simd_impl.h"
