#include "cpu_features.h"

namespace solar {

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2");
    r.fma = __builtin_cpu_supports("fma");
    r.f16c = __builtin_cpu_supports("f16c");
    r.avx512f = __builtin_cpu_supports("avx512f");
    r.avx512bw = __builtin_cpu_supports("avx512bw");
    r.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
    return r;
  }();
  return f;
}

std::vector<std::string> cpu_feature_names() {
  const auto& f = cpu_features();
  std::vector<std::string> out;
  if (f.avx2) out.push_back("avx2");
  if (f.fma) out.push_back("fma");
  if (f.f16c) out.push_back("f16c");
  if (f.avx512f) out.push_back("avx512f");
  if (f.avx512bw) out.push_back("avx512bw");
  if (f.avx512vnni) out.push_back("avx512vnni");
  return out;
}

}  // namespace solar
