// masked_pool CPU kernels, the vector part: one hardware vector type per ISA, the explicit
// multiply-add, and the register-blocked forward accumulation.  Included by pool_cpu.cpp only
// (compiled with -march=native, or for the x86-64 baseline with SOLAR_NATIVE_ISA=0).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace solar {
namespace pool_simd {

// ---- small vector helpers -------------------------------------------------------------
inline void scale_to(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  constexpr int W = 16;
  float part[W] = {0};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int k = 0; k < W; ++k) part[k] += a[i + k] * b[i + k];
  float s = 0.f;
  for (int k = 0; k < W; ++k) s += part[k];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- register-blocked inner kernels ----------------------------------------------------
// GCC/Clang vector extension at exactly the target's vector width (one zmm with AVX-512, one
// ymm with AVX/AVX2, one xmm with SSE2 or NEON).  A type wider than the hardware vector (the
// former 16-float type on AVX2 / SSE2 machines) is lowered piecewise through the stack: every
// accumulator lived in memory and every store went through general registers.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kVecRegs = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kVecRegs = 16;
#else
constexpr int kLanes = 4;
constexpr int kVecRegs = 16;
#endif
typedef float vfn __attribute__((vector_size(4 * kLanes)));
// Partial sums of dot products keep 16 lanes (kGroup native vectors) on every ISA, so that
// grad_mask is bit-for-bit the same whatever width the machine has.
constexpr int kGroup = 16 / kLanes;

// acc + w * x, rounded once where the target has FMA (every AVX2 and AVX-512 x86 CPU), else
// twice; spelled out (not left to -ffp-contract) so that block bodies, vector tails and scalar
// tails round alike whatever the compiler's tuning (GCC's znver tuning splits FMAs in
// loop-carried chains), which keeps every element's bits independent of where the blocking
// (ISA width, D chunks per thread) puts it.
#if defined(__FMA__) || defined(__AVX512F__)
constexpr bool kFma = true;
#else
constexpr bool kFma = false;
#endif
inline vfn madd(vfn acc, float w, vfn x) {
#if defined(__AVX512F__)
  return vfn(_mm512_fmadd_ps(_mm512_set1_ps(w), __m512(x), __m512(acc)));
#elif defined(__FMA__)
  return vfn(_mm256_fmadd_ps(_mm256_set1_ps(w), __m256(x), __m256(acc)));
#else
  return acc + w * x;
#endif
}
inline vfn madd(vfn acc, vfn a, vfn b) {
#if defined(__AVX512F__)
  return vfn(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(acc)));
#elif defined(__FMA__)
  return vfn(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(acc)));
#else
  return acc + a * b;
#endif
}
inline float madd(float acc, float a, float b) { return kFma ? std::fma(a, b, acc) : acc + a * b; }

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = madd(y[i], a, x[i]);
}

inline vfn ld(const float* p) {
  vfn v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void st(float* p, vfn v) { std::memcpy(p, &v, sizeof v); }
// Lane k of the 16 partial sums is part[k / kLanes][k % kLanes]; summed in lane order.
inline float hsum16(const vfn* part) {
  float s = 0.f;
  for (int k = 0; k < 16; ++k) s += part[k / kLanes][k % kLanes];
  return s;
}

// True when every a[i] is finite: NaN or inf times 0 is NaN, a finite value gives 0 (no
// -ffast-math, so the multiply is kept); vector partial sums, so that the loop vectorises.
inline bool all_finite(const float* a, int64_t n) {
  vfn z = vfn{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) z += ld(a + i) * 0.f;
  float t = 0.f;
  for (int k = 0; k < kLanes; ++k) t += z[k];
  for (; i < n; ++i) t += a[i] * 0.f;
  return t == 0.f;
}

// Native vectors per register block for VB masks: VB x S accumulators, VB broadcast weights
// and up to 3 temporaries (a loaded x slice; without FMA a product) must fit the register
// file.  S is a power of two and a block at most 64 floats wide, so that blocks tile the
// 64-float D chunks of the threads (the acc slices stay in L1 anyway).
constexpr int pow2_floor(int n) { return n < 2 ? 1 : 2 * pow2_floor(n / 2); }
template <int VB>
constexpr int block_slices() {
  return pow2_floor(std::min(64 / kLanes, (kVecRegs - VB - 3) / VB));
}

// acc[v * dn + d] += sum_{r < nr} w[r * V + v] * rows[r][d] for v < VB, d < dn.
// The accumulators of an S-vector slice stay in registers across the nr rows.  Each sum is
// taken over r in order whatever the blocking, so results do not depend on the ISA's width.
// `next` (nn rows, or nullptr): the rows of the caller's next block, prefetched slice by slice
// while this block runs: the block reads its rows in short pieces a row stride apart, which
// the hardware prefetchers follow poorly (bench/RESULTS.md, "masked_pool CPU without AVX-512").
template <int VB>
void block_accumulate(float* acc, int64_t dn, const float* const* rows, const float* w, int64_t V, int nr,
                      const float* const* next, int nn) {
  constexpr int S = block_slices<VB>();
  constexpr int64_t kBlock = int64_t(S) * kLanes;
  int64_t d = 0;
  for (; d + kBlock <= dn; d += kBlock) {
    vfn a[VB][S];
    for (int v = 0; v < VB; ++v)
      for (int j = 0; j < S; ++j) a[v][j] = ld(acc + v * dn + d + kLanes * j);
    for (int r = 0; r < nn; ++r)
      for (int64_t c = 0; c < kBlock; c += 16) __builtin_prefetch(next[r] + d + c);
    for (int r = 0; r < nr; ++r) {
      const float* xr = rows[r] + d;
      float wv[VB];
      for (int v = 0; v < VB; ++v) wv[v] = w[r * V + v];
      for (int j = 0; j < S; ++j) {
        const vfn xj = ld(xr + kLanes * j);
        for (int v = 0; v < VB; ++v) a[v][j] = madd(a[v][j], wv[v], xj);
      }
    }
    for (int v = 0; v < VB; ++v)
      for (int j = 0; j < S; ++j) st(acc + v * dn + d + kLanes * j, a[v][j]);
  }
  for (; d + kLanes <= dn; d += kLanes) {
    vfn a[VB];
    for (int v = 0; v < VB; ++v) a[v] = ld(acc + v * dn + d);
    for (int r = 0; r < nr; ++r) {
      const vfn x0 = ld(rows[r] + d);
      for (int v = 0; v < VB; ++v) a[v] = madd(a[v], w[r * V + v], x0);
    }
    for (int v = 0; v < VB; ++v) st(acc + v * dn + d, a[v]);
  }
  for (; d < dn; ++d)
    for (int r = 0; r < nr; ++r)
      for (int v = 0; v < VB; ++v) acc[v * dn + d] = madd(acc[v * dn + d], w[r * V + v], rows[r][d]);
}

inline void block_accumulate_any(float* acc, int64_t dn, const float* const* rows, const float* w, int64_t V, int nr,
                                 int64_t nv, const float* const* next, int nn) {
  switch (nv) {
    case 1: block_accumulate<1>(acc, dn, rows, w, V, nr, next, nn); break;
    case 2: block_accumulate<2>(acc, dn, rows, w, V, nr, next, nn); break;
    case 3: block_accumulate<3>(acc, dn, rows, w, V, nr, next, nn); break;
    default: block_accumulate<4>(acc, dn, rows, w, V, nr, next, nn); break;
  }
}

}  // namespace pool_simd
}  // namespace solar
