// Baseline x86-64 path (SSE2, every x86-64 CPU): 16 xmm registers and no FMA, so each multiply-add needs a
// temporary; tile 4 tokens x 8 columns = 8 accumulators.
#define MOEFY_ISA_NS sse2
#define MOEFY_LANES 4
#define MOEFY_TILE_TOKENS 4
#define MOEFY_TILE_VECS 2
#define MOEFY_TILE_NAME "4x8"
#include "simd_impl.h"
