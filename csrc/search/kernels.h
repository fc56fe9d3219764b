// Exact top-k search: the scoring micro-kernels shared by the CPU driver (search_cpu.cpp).
//
// A micro-kernel scores an R x C tile: R queries against C database rows, the whole
// dimension at once, and writes R*C fp32 scores.  The driver clamps the index arrays at
// the edges (repeating the last valid query / row), so every (query, row) pair is always
// computed by the same instruction sequence: two identical rows get bit-identical scores
// and ties are broken by id alone, whatever their position in a tile.
//
// Kernels exist per storage dtype and per SIMD level; which one runs is chosen at run
// time from solar::cpu_features() (see select_kernel).
#pragma once
#include <cstdint>

namespace solar {
namespace search {

enum class DType : int { F32 = 0, F16 = 1, I8 = 2 };

// SIMD levels (what SOLAR_SEARCH_SIMD / the `simd` argument select).
enum SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Ctx {
  int64_t d = 0;
  // Queries.  fp32/fp16 indexes: fp32 [m, d].  int8 indexes: the int8 codes [m, d] (q),
  // plus a prepared byte copy (q_prep): |q| for the AVX2 sign trick, q + 128 for VNNI.
  const void* q = nullptr;
  const uint8_t* q_prep = nullptr;
  const float* q_scale = nullptr;
  // Database rows [n, d] (float, IEEE half bits, or int8 codes) and, for int8, the
  // per-row scale and the per-row sum of codes (the VNNI offset correction).
  const void* x = nullptr;
  const float* x_scale = nullptr;
  const int32_t* x_sum = nullptr;
};

using TileFn = void (*)(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out);

struct Kernel {
  int R = 1, C = 1;
  TileFn fn = nullptr;
  const char* name = "";
  // How query bytes must be prepared for int8 (0: none, 1: |q|, 2: q + 128).
  int q_prep = 0;
};

// The best available SIMD level of this CPU (kScalar when nothing fits).
int best_simd_level();
// Clamp a requested level (-1: best) to what the CPU supports.
int effective_simd_level(int requested);
// few_queries: pick the one-query wide tile (memory-bound scans) instead of the block tile.
Kernel select_kernel(DType dt, int simd_level, bool few_queries);

// Per-level kernel tables (defined in kernels_scalar.cpp and kernels_x86.cpp).
Kernel scalar_kernel(DType dt, bool few_queries);
Kernel avx2_kernel(DType dt, bool few_queries);
Kernel avx512_kernel(DType dt, bool few_queries);  // int8 VNNI; fp32/fp16 use the AVX2 tile

// GEMM-style panel path for many queries over fp32/fp16 rows (AVX-512): C rows are packed
// dimension-major into a panel [d][C] (fp16 widened to fp32 once per panel), R queries
// into [d][R]; the micro-kernel broadcasts one query value and FMAs it with C row values,
// so each accumulator lane holds one (query, row) score and no horizontal sums are needed.
// Every pair is still summed in the same order (p = 0..d-1), whatever its tile position.
struct PanelKernel {
  int R = 0, C = 0;
  // Scores R queries x C rows into out[R][C]; returns a bit mask of the queries that have
  // at least one score > thr[r] (so the caller only walks those).
  uint32_t (*fn)(const float* qpack, const float* panel, int64_t d, const float* thr, float* out) = nullptr;
  // Packs rows xi[0..C) of x (fp32 or fp16 bits, [n, d]) into panel [d][C] fp32.
  void (*pack)(const void* x, bool half, int64_t d, const int64_t* xi, float* panel) = nullptr;
  const char* name = "";
};
// Available when the CPU (and build) has AVX-512F; fn == nullptr otherwise.
PanelKernel avx512_panel_kernel();

// The int8 (VNNI) counterpart: R queries (packed as q + 128 bytes, [d4][R][4]) x C rows
// (packed [d4][C][4] codes, zero past d) -> out[R][C] scores, hit mask as above.
struct PanelI8Kernel {
  int R = 0, C = 0;
  uint32_t (*fn)(const uint8_t* qpack, const int8_t* panel, int64_t d4, const int32_t* corr, const float* xscale,
                 const float* qscale, const float* thr, float* out) = nullptr;
  void (*pack)(const int8_t* x, const int32_t* x_sum, const float* x_scale, int64_t d, const int64_t* xi,
               int8_t* panel, int32_t* corr, float* xscale) = nullptr;
  const char* name = "";
};
PanelI8Kernel avx512_panel_i8_kernel();

// IEEE half bits -> float without F16C (the scalar path).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace search
}  // namespace solar
