// The deterministic, platform-independent random numbers of the kernel's test and benchmark programs.
#pragma once

#include <cstddef>
#include <cstdint>
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

}  // namespace moefy_test
