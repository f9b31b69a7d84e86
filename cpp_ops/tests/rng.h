// The deterministic, platform-independent random numbers of the kernel's test and benchmark programs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moefy_test {

struct Rng {
  uint64_t s;
  float uniform() {  // [-1, 1)
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(static_cast<int64_t>(s >> 40) - (int64_t{1} << 23)) / static_cast<float>(1 << 23);
  }
  std::vector<float> vec(std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform() * scale;
    return v;
  }
};

// The IEEE binary16 bits of f, rounded to nearest even (subnormals included): float16 test weights.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, man = x & 0x7fffffu;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xffu) - 127 + 15;
  if (((x >> 23) & 0xffu) == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0u));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  const bool subnormal = exp <= 0;
  if (subnormal && exp < -10) return static_cast<uint16_t>(sign);
  const uint32_t shift = subnormal ? static_cast<uint32_t>(14 - exp) : 13u;
  const uint32_t full = subnormal ? man | 0x800000u : man;
  uint32_t h = (subnormal ? 0u : static_cast<uint32_t>(exp) << 10) | full >> shift;
  const uint32_t rem = full & ((1u << shift) - 1), half = 1u << (shift - 1);
  h += rem > half || (rem == half && (h & 1u));  // a carry into the exponent is the right rounding
  return static_cast<uint16_t>(sign | h);
}

}  // namespace moefy_test
