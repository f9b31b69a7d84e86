// Which instruction-set path runs: the CPU's features are read once (cpuid + xgetbv on x86, so a CPU or OS
// without AVX state support is not offered AVX; HWCAP on aarch64), MOEFY_ISA may force a path, and a path
// the CPU cannot run is refused with the features it lacks, before any of its instructions executes.
#include <cstdlib>
#include <string>

#include "sparse_ffn.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define MOEFY_X86 1
#elif defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace moefy {

// The tables of the paths CMake compiled in (MOEFY_HAVE_<PATH>, one isa_<path>.cc each).
#if MOEFY_HAVE_AVX512
namespace avx512 { extern const IsaKernels kKernels; }
#endif
#if MOEFY_HAVE_AVX2
namespace avx2 { extern const IsaKernels kKernels; }
#endif
#if MOEFY_HAVE_SSE41
namespace sse41 { extern const IsaKernels kKernels; }
#endif
#if MOEFY_HAVE_SSE2
namespace sse2 { extern const IsaKernels kKernels; }
#endif
#if MOEFY_HAVE_NEON
namespace neon { extern const IsaKernels kKernels; }
#endif
#if MOEFY_HAVE_GENERIC
namespace generic { extern const IsaKernels kKernels; }
#endif

namespace {

struct Feature {
  const char* name;
  bool present;
};

#if MOEFY_X86
struct X86Features {
  Feature sse2, sse3, ssse3, sse41, sse42, popcnt, cx16, lahf, avx, avx2, fma, f16c, bmi1, bmi2, lzcnt, movbe,
      avx512f, avx512bw, avx512cd, avx512dq, avx512vl, os_avx, os_avx512;
  X86Features() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    unsigned c1 = 0, d1 = 0, b7 = 0, c81 = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) c1 = c, d1 = d;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) b7 = b;
    if (__get_cpuid(0x80000001, &a, &b, &c, &d)) c81 = c;
    unsigned long long xcr0 = 0;
    if (c1 & (1u << 27)) {  // OSXSAVE: the OS reports which register states it saves
      unsigned lo = 0, hi = 0;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    auto bit = [](unsigned r, int i) { return ((r >> i) & 1u) != 0; };
    sse2 = {"sse2", bit(d1, 26)};
    sse3 = {"sse3", bit(c1, 0)};
    ssse3 = {"ssse3", bit(c1, 9)};
    sse41 = {"sse4.1", bit(c1, 19)};
    sse42 = {"sse4.2", bit(c1, 20)};
    popcnt = {"popcnt", bit(c1, 23)};
    cx16 = {"cx16", bit(c1, 13)};
    lahf = {"lahf_lm", bit(c81, 0)};
    avx = {"avx", bit(c1, 28)};
    fma = {"fma", bit(c1, 12)};
    f16c = {"f16c", bit(c1, 29)};
    movbe = {"movbe", bit(c1, 22)};
    avx2 = {"avx2", bit(b7, 5)};
    bmi1 = {"bmi1", bit(b7, 3)};
    bmi2 = {"bmi2", bit(b7, 8)};
    lzcnt = {"lzcnt", bit(c81, 5)};
    avx512f = {"avx512f", bit(b7, 16)};
    avx512dq = {"avx512dq", bit(b7, 17)};
    avx512cd = {"avx512cd", bit(b7, 28)};
    avx512bw = {"avx512bw", bit(b7, 30)};
    avx512vl = {"avx512vl", bit(b7, 31)};
    os_avx = {"OS support for AVX state", (xcr0 & 0x6) == 0x6};
    os_avx512 = {"OS support for AVX-512 state", (xcr0 & 0xe6) == 0xe6};
  }
};

const X86Features& x86() {
  static const X86Features f;
  return f;
}
#endif

// What the CPU lacks to run `name` (", "-separated; empty: it runs).
std::string missing_features(const std::string& name) {
  std::string missing;
  auto need = [&](const Feature& f) {
    if (!f.present) missing += (missing.empty() ? "" : ", ") + std::string(f.name);
  };
#if MOEFY_X86
  const X86Features& f = x86();
  need(f.sse2);
  if (name == "sse41" || name == "avx2" || name == "avx512")  // x86-64-v2, which v3 and v4 include
    for (const Feature& g : {f.sse3, f.ssse3, f.sse41, f.sse42, f.popcnt, f.cx16, f.lahf}) need(g);
  if (name == "avx2" || name == "avx512")  // x86-64-v3, which the avx512 path's -march=x86-64-v4 includes
    for (const Feature& g : {f.avx, f.avx2, f.fma, f.f16c, f.bmi1, f.bmi2, f.lzcnt, f.movbe, f.os_avx}) need(g);
  if (name == "avx512")
    for (const Feature& g : {f.avx512f, f.avx512bw, f.avx512cd, f.avx512dq, f.avx512vl, f.os_avx512}) need(g);
#elif defined(__aarch64__) && defined(__linux__)
  if (name == "neon") need(Feature{"asimd", (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0});
#endif
  return missing;
}

// Compiled paths, widest first: the default is the first this CPU runs.
const IsaKernels* const kPaths[] = {
#if MOEFY_HAVE_AVX512
    &avx512::kKernels,
#endif
#if MOEFY_HAVE_AVX2
    &avx2::kKernels,
#endif
#if MOEFY_HAVE_SSE41
    &sse41::kKernels,
#endif
#if MOEFY_HAVE_SSE2
    &sse2::kKernels,
#endif
#if MOEFY_HAVE_NEON
    &neon::kKernels,
#endif
#if MOEFY_HAVE_GENERIC
    &generic::kKernels,
#endif
};

// Every path name any build knows, so a request for a path of another build gets a precise answer.
const char* const kKnown[] = {"avx512", "avx2", "sse41", "sse2", "neon", "generic"};

std::string runnable_list() {
  std::string s;
  for (const IsaKernels* k : kPaths)
    if (missing_features(k->name).empty()) s += (s.empty() ? "" : ", ") + std::string(k->name);
  return s.empty() ? "none" : s;
}

}  // namespace

bool cpu_is_amd() {
#if MOEFY_X86
  static const bool amd = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "Auth" "enti" "cAMD"
  }();
  return amd;
#else
  return false;
#endif
}

IsaChoice choose_isa(const char* request) {
  IsaChoice c;
  const std::string want = request ? request : "";
  if (want.empty() || want == "auto") {
    for (const IsaKernels* k : kPaths)
      if (missing_features(k->name).empty()) {
        c.kernels = k;
        return c;
      }
    c.error = "moefy: no compiled instruction-set path runs on this CPU";
    return c;
  }
  for (const IsaKernels* k : kPaths)
    if (want == k->name) {
      const std::string missing = missing_features(want);
      if (missing.empty()) {
        c.kernels = k;
      } else {
        c.error = "moefy: this CPU cannot run the " + want + " path (it lacks " + missing +
                  "); paths it runs: " + runnable_list();
      }
      return c;
    }
  bool known = false;
  for (const char* k : kKnown) known = known || want == k;
  std::string compiled;
  for (const IsaKernels* k : kPaths) compiled += (compiled.empty() ? "" : ", ") + std::string(k->name);
  c.error = "moefy: " + (known ? "the " + want + " path is not in this build (it is for another CPU architecture)"
                               : "unknown instruction-set path '" + want + "'") +
            "; paths of this build: auto, " + compiled + "; this CPU runs: " + runnable_list();
  return c;
}

const IsaChoice& default_isa() {
  static const IsaChoice c = [] {
    const char* env = std::getenv("MOEFY_ISA");
    IsaChoice r = choose_isa(env);
    if (!r.kernels && env && *env) r.error = "MOEFY_ISA=" + std::string(env) + ": " + r.error.substr(7);
    return r;
  }();
  return c;
}

std::string describe_isas() {
  const IsaChoice best = choose_isa(nullptr);
  std::string json = std::string("{\"best\":\"") + (best.kernels ? best.kernels->name : "") + "\",\"paths\":[";
  bool first = true;
  for (const IsaKernels* k : kPaths) {
    const std::string missing = missing_features(k->name);
    json += std::string(first ? "" : ",") + "{\"name\":\"" + k->name + "\",\"tile\":\"" + k->tile +
            "\",\"lanes\":" + std::to_string(k->lanes) + ",\"runs\":" + (missing.empty() ? "true" : "false") +
            ",\"missing\":\"" + missing + "\"}";
    first = false;
  }
  return json + "]}";
}

}  // namespace moefy
