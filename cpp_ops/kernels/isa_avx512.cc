// AVX-512 path (x86-64-v4): 32 zmm registers; tile 8 tokens x 48 columns = 24 accumulators + 3 weight
// vectors + 1 broadcast.
#define MOEFY_ISA_NS avx512
#define MOEFY_LANES 16
#define MOEFY_TILE_TOKENS 8
#define MOEFY_TILE_VECS 3
#define MOEFY_TILE_NAME "8x48"
#include "simd_impl.h"
