// Baseline x86-64 path (SSE2, every x86-64 CPU): 16 xmm registers and no FMA, so each multiply-add needs a
// temporary, and a broadcast is two instructions; tile 2 tokens x 16 columns = 8 accumulators + 4 weight
// vectors + broadcast + temporary. Wider panels than 4 x 8 measured 1.4x faster at one token, equal at 128.
#define MOEFY_ISA_NS sse2
#define MOEFY_LANES 4
#define MOEFY_TILE_TOKENS 2
#define MOEFY_TILE_VECS 4
#define MOEFY_TILE_NAME "2x16"
#include "simd_impl.h"
