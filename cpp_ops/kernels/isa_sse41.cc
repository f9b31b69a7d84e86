// x86-64-v2 path (SSE4.2: every x86-64 CPU since 2008, e.g. Atom/Celeron/Pentium Silver without AVX): the sse2
// path's 2 x 16 tile, with SSE4.1's sign-extending byte loads for int8 weights (one instruction instead of
// three shuffles and a shift).
#define MOEFY_ISA_NS sse41
#define MOEFY_LANES 4
#define MOEFY_TILE_TOKENS 2
#define MOEFY_TILE_VECS 4
#define MOEFY_TILE_NAME "2x16"
#include "simd_impl.h"
