// AVX-512 path (x86-64-v4): 32 zmm registers; tile 8 tokens x 32 columns = 16 accumulators + 2 weight
// vectors + 1 broadcast. 8 x 48 (24 accumulators) was 5% faster at 128 tokens but streamed a single token's
// weights 25% slower (rows of three cache lines; benchmarks/README.md, item 12).
#define MOEFY_ISA_NS avx512
#define MOEFY_LANES 16
#define MOEFY_TILE_TOKENS 8
#define MOEFY_TILE_VECS 2
#define MOEFY_TILE_NAME "8x32"
#define MOEFY_VREGS 32
#define MOEFY_DOT_TOKENS 3
#define MOEFY_DOT_NEURONS 8
#define MOEFY_DOT_MAX_M 24
// Blocks of few tokens: on AMD Zen 4 the hardware prefetcher alone did better; on Intel Sapphire Rapids software
// prefetching did, by far (simd_impl.h).
#define MOEFY_PREFETCH_FEW_BYTES_AMD 0
#include "simd_impl.h"
