// The op under spec::kNumbaHostDomain: checks and thread pool of the C++ op, work done by Numba
// callbacks (runtime/numba_host.py) that the Python runtime registers once per process.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/sparse_ffn.h"

namespace moefy::numba_host {

using Call = const int64_t*;  // spec::NumbaHostField values, then one address per spec input (0: absent)

// Laid out as runtime/numba_host.py's _Kernels.
struct Kernels {
  int64_t abi_version, call_len;
  int64_t (*scratch_bytes)(Call);
  void (*route)(Call, int64_t part, int64_t parts);  // top-k of a token range
  int64_t (*plan)(Call);                             // returns the number of workers with work
  void (*experts)(Call, int64_t worker);
  void (*reduce)(Call, int64_t part, int64_t parts);  // sums the workers' outputs over a token range
};

// Installs the callbacks (the table must outlive every session). Returns an error message, or null.
const char* set_kernels(const Kernels* kernels);
bool have_kernels();

// y = SparseExpertFFN(p), `inputs` holding spec::kNumInputs pointers (null: absent).
void run(const SparseFFNProblem& p, const void* const* inputs, const ParallelFor& pfor, std::size_t workers);

}  // namespace moefy::numba_host
