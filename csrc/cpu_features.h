// Run-time CPU feature detection, so that SIMD paths are chosen by what the CPU has,
// not only by what the compiler was told.
#pragma once
#include <string>
#include <vector>

namespace solar {
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vnni = false;
};
const CpuFeatures& cpu_features();
std::vector<std::string> cpu_feature_names();
}  // namespace solar
