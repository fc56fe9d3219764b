// x86 SIMD scoring tiles, compiled with per-function target attributes so the file builds
// without -march flags and each path runs only where cpu_features() says it can.
//
//   AVX2 + FMA   fp32: 8-lane FMA over d, register tile R x C of accumulators.
//   AVX2 + F16C  fp16: rows widened with vcvtph2ps, fp32 FMA accumulation.
//   AVX2         int8: sign trick. vpmaddubsw multiplies u8 x s8 and adds pairs in i16 with
//                saturation; with |q| (<= 127) as the unsigned operand and sign(q) moved
//                onto x (codes in [-127, 127]), each pair sum is at most 2 * 127 * 127 =
//                32258 < 32767, so it never saturates; vpmaddwd widens to i32.
//   AVX-512 VNNI int8: vpdpbusd (u8 x s8, 4-way dot into i32, no saturation) with the
//                query shifted to u8 (q + 128); the offset is removed exactly afterwards:
//                sum((q + 128) x) - 128 sum(x), with sum(x) stored per row.
// Dimension tails use zero-filled (masked) loads, so every pair runs the same sequence.
#include <cstring>
#include <type_traits>

#include "search/kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace solar {
namespace search {
namespace {

#define SOLAR_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SOLAR_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))

// Pin a loaded row chunk in a register: without this GCC folds the load into every FMA
// that uses it (R loads instead of one), which makes the tile load-bound.
#define SOLAR_KEEP_IN_REG(v) asm("" : "+v"(v))

// Tiles walk C rows in lock-step (C interleaved streams 1 row apart), a pattern the
// hardware prefetchers follow poorly once the rows come from DRAM; the driver scores row
// groups in increasing order, so fetch the same line of the rows two groups ahead.
#define SOLAR_PREFETCH_AHEAD(ptr, bytes_ahead) \
  _mm_prefetch(reinterpret_cast<const char*>(ptr) + (bytes_ahead), _MM_HINT_T0)

SOLAR_AVX2 inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

SOLAR_AVX2 inline int32_t hsum256i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

alignas(32) static const int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// ---- fp32 / fp16 storage, AVX2 + F16C + FMA (HALF: rows are IEEE half bits) ---------------
template <int R, int C, bool HALF>
SOLAR_AVX2 void tile_f_avx2(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  using Row = typename std::conditional<HALF, uint16_t, float>::type;
  const int64_t d = c.d;
  const float* qp[R];
  const Row* xp[C];
  for (int r = 0; r < R; ++r) qp[r] = static_cast<const float*>(c.q) + qi[r] * d;
  for (int j = 0; j < C; ++j) xp[j] = static_cast<const Row*>(c.x) + xi[j] * d;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= d; p += 8) {
    __m256 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(qp[r] + p);
    for (int j = 0; j < C; ++j) {
      SOLAR_PREFETCH_AHEAD(xp[j] + p, 2 * C * d * (int64_t)sizeof(Row));
      __m256 xv;
      if constexpr (HALF) xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xp[j] + p)));
      else xv = _mm256_loadu_ps(xp[j] + p);
      SOLAR_KEEP_IN_REG(xv);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(qv[r], xv, acc[r][j]);
    }
  }
  if (p < d) {
    const int64_t t = d - p;
    const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - t));
    __m256 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm256_maskload_ps(qp[r] + p, mask);
    for (int j = 0; j < C; ++j) {
      __m256 xv;
      if constexpr (HALF) {
        alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(buf, xp[j] + p, (size_t)t * sizeof(uint16_t));
        xv = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
      } else {
        xv = _mm256_maskload_ps(xp[j] + p, mask);
      }
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(qv[r], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) out[r * C + j] = hsum256(acc[r][j]);
}

// ---- int8, AVX2 sign trick -------------------------------------------------------------
template <int R, int C>
SOLAR_AVX2 void tile_i8_avx2(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const int64_t d = c.d;
  const int8_t* qs[R];   // signed codes: the sign source
  const uint8_t* qa[R];  // |codes|: the unsigned maddubs operand
  const int8_t* xp[C];
  for (int r = 0; r < R; ++r) {
    qs[r] = static_cast<const int8_t*>(c.q) + qi[r] * d;
    qa[r] = c.q_prep + qi[r] * d;
  }
  for (int j = 0; j < C; ++j) xp[j] = static_cast<const int8_t*>(c.x) + xi[j] * d;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = _mm256_setzero_si256();
  auto step = [&](const __m256i* qav, const __m256i* qsv, const __m256i* xv) SOLAR_AVX2 {
    for (int j = 0; j < C; ++j)
      for (int r = 0; r < R; ++r) {
        const __m256i sx = _mm256_sign_epi8(xv[j], qsv[r]);
        const __m256i p16 = _mm256_maddubs_epi16(qav[r], sx);
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(p16, ones));
      }
  };
  int64_t p = 0;
  for (; p + 32 <= d; p += 32) {
    __m256i qav[R], qsv[R], xv[C];
    for (int r = 0; r < R; ++r) {
      qav[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa[r] + p));
      qsv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs[r] + p));
    }
    for (int j = 0; j < C; ++j) {
      SOLAR_PREFETCH_AHEAD(xp[j] + p, 2 * C * d);
      xv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp[j] + p));
    }
    step(qav, qsv, xv);
  }
  if (p < d) {
    const size_t t = (size_t)(d - p);
    alignas(32) uint8_t bq[R][32] = {}, bs[R][32] = {}, bx[C][32] = {};
    __m256i qav[R], qsv[R], xv[C];
    for (int r = 0; r < R; ++r) {
      std::memcpy(bq[r], qa[r] + p, t);
      std::memcpy(bs[r], qs[r] + p, t);
      qav[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bq[r]));
      qsv[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bs[r]));
    }
    for (int j = 0; j < C; ++j) {
      std::memcpy(bx[j], xp[j] + p, t);
      xv[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bx[j]));
    }
    step(qav, qsv, xv);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) {
      const float scale = c.x_scale[xi[j]] * c.q_scale[qi[r]];
      out[r * C + j] = (float)hsum256i(acc[r][j]) * scale;
    }
}

// ---- fp32 / fp16 storage, AVX-512F (32 registers: a 4 x 6 tile needs 24 accumulators) -----
template <int R, int C, bool HALF>
SOLAR_AVX512 void tile_f_avx512(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const int64_t d = c.d;
  const float* qp[R];
  const float* xf[C];
  const uint16_t* xh[C];
  for (int r = 0; r < R; ++r) qp[r] = static_cast<const float*>(c.q) + qi[r] * d;
  for (int j = 0; j < C; ++j) {
    xf[j] = static_cast<const float*>(c.x) + xi[j] * d;
    xh[j] = static_cast<const uint16_t*>(c.x) + xi[j] * d;
  }
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= d; p += 16) {
    __m512 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm512_loadu_ps(qp[r] + p);
    for (int j = 0; j < C; ++j) {
      if (HALF)
        SOLAR_PREFETCH_AHEAD(xh[j] + p, 2 * C * d * 2);
      else
        SOLAR_PREFETCH_AHEAD(xf[j] + p, 2 * C * d * 4);
      __m512 xv = HALF ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh[j] + p)))
                       : _mm512_loadu_ps(xf[j] + p);
      SOLAR_KEEP_IN_REG(xv);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(qv[r], xv, acc[r][j]);
    }
  }
  if (p < d) {
    const int64_t t = d - p;
    const __mmask16 m = (__mmask16)((1u << (unsigned)t) - 1u);  // t < 16
    __m512 qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm512_maskz_loadu_ps(m, qp[r] + p);
    for (int j = 0; j < C; ++j) {
      __m512 xv;
      if (HALF) {
        alignas(32) uint16_t buf[16] = {};
        std::memcpy(buf, xh[j] + p, (size_t)t * sizeof(uint16_t));
        xv = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
      } else {
        xv = _mm512_maskz_loadu_ps(m, xf[j] + p);
      }
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(qv[r], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) out[r * C + j] = _mm512_reduce_add_ps(acc[r][j]);
}

// ---- one query, rows one after another (AVX-512): a purely sequential memory stream -----
// For m < 3 the scan is bound by memory, and walking whole rows in order lets the hardware
// prefetchers run at full speed; two accumulators per row halve the FMA/VNNI chain.
template <int C, int KIND>  // KIND 0 fp32, 1 fp16, 2 int8 (VNNI)
SOLAR_AVX512 void tile_seq_avx512(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const int64_t d = c.d;
  for (int j = 0; j < C; ++j) {
    if (KIND == 2) {
      const uint8_t* qu = c.q_prep + qi[0] * d;
      const int8_t* xr = static_cast<const int8_t*>(c.x) + xi[j] * d;
      __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
      int64_t p = 0;
      for (; p + 128 <= d; p += 128) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(qu + p), _mm512_loadu_si512(xr + p));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(qu + p + 64), _mm512_loadu_si512(xr + p + 64));
      }
      for (; p < d; p += 64) {
        const int64_t t = d - p;
        const __mmask64 m = t >= 64 ? ~(__mmask64)0 : (__mmask64)((1ull << (unsigned)t) - 1ull);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(m, qu + p), _mm512_maskz_loadu_epi8(m, xr + p));
      }
      const int32_t dot = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1)) - 128 * c.x_sum[xi[j]];
      const float scale = c.x_scale[xi[j]] * c.q_scale[qi[0]];
      out[j] = (float)dot * scale;
    } else {
      const float* qf = static_cast<const float*>(c.q) + qi[0] * d;
      const float* xf = static_cast<const float*>(c.x) + xi[j] * d;
      const uint16_t* xh = static_cast<const uint16_t*>(c.x) + xi[j] * d;
      auto load_x = [&](int64_t p) SOLAR_AVX512 {
        return KIND == 1 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + p)))
                         : _mm512_loadu_ps(xf + p);
      };
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t p = 0;
      for (; p + 32 <= d; p += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + p), load_x(p), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + p + 16), load_x(p + 16), a1);
      }
      for (; p < d; p += 16) {
        const int64_t t = d - p;
        const __mmask16 m = t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (unsigned)t) - 1u);
        __m512 xv;
        if (KIND == 1) {
          alignas(32) uint16_t buf[16] = {};
          std::memcpy(buf, xh + p, (size_t)(t < 16 ? t : 16) * sizeof(uint16_t));
          xv = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
        } else {
          xv = _mm512_maskz_loadu_ps(m, xf + p);
        }
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qf + p), xv, a0);
      }
      out[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}

// ---- fp32 panel micro-kernel, AVX-512F: 12 queries x 32 rows, 24 accumulators --------
constexpr int kPanelR = 12, kPanelC = 32;

SOLAR_AVX512 uint32_t panel_12x32(const float* qpack, const float* panel, int64_t d, const float* thr, float* out) {
  __m512 acc[kPanelR][2];
  for (int r = 0; r < kPanelR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d; ++p) {
    __m512 x0 = _mm512_loadu_ps(panel + p * kPanelC);
    __m512 x1 = _mm512_loadu_ps(panel + p * kPanelC + 16);
    SOLAR_KEEP_IN_REG(x0);
    SOLAR_KEEP_IN_REG(x1);
    const float* qp = qpack + p * kPanelR;
    for (int r = 0; r < kPanelR; ++r) {
      const __m512 qb = _mm512_set1_ps(qp[r]);
      acc[r][0] = _mm512_fmadd_ps(qb, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qb, x1, acc[r][1]);
    }
  }
  uint32_t hit = 0;
  for (int r = 0; r < kPanelR; ++r) {
    _mm512_storeu_ps(out + r * kPanelC, acc[r][0]);
    _mm512_storeu_ps(out + r * kPanelC + 16, acc[r][1]);
    const __m512 t = _mm512_set1_ps(thr[r]);
    const __mmask16 m0 = _mm512_cmp_ps_mask(acc[r][0], t, _CMP_GT_OQ);
    const __mmask16 m1 = _mm512_cmp_ps_mask(acc[r][1], t, _CMP_GT_OQ);
    if ((m0 | m1) != 0) hit |= 1u << r;
  }
  return hit;
}

SOLAR_AVX512 void pack_panel_32(const void* x, bool half, int64_t d, const int64_t* xi, float* panel) {
  alignas(64) float tmp[16];
  for (int j = 0; j < kPanelC; ++j) {
    if (half) {
      const uint16_t* row = static_cast<const uint16_t*>(x) + xi[j] * d;
      int64_t p = 0;
      for (; p + 16 <= d; p += 16) {
        _mm512_store_ps(tmp, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p))));
        for (int t = 0; t < 16; ++t) panel[(p + t) * kPanelC + j] = tmp[t];
      }
      for (; p < d; ++p) panel[p * kPanelC + j] = _cvtsh_ss(row[p]);
    } else {
      const float* row = static_cast<const float*>(x) + xi[j] * d;
      for (int64_t p = 0; p < d; ++p) panel[p * kPanelC + j] = row[p];
    }
  }
}

// ---- int8 panel micro-kernel, AVX-512 VNNI: 12 queries x 32 rows, 24 accumulators ------
// The GEMM layout of the int8 codes: a panel holds 32 rows as [d4][32 rows][4 bytes], so one
// 64-byte load is 4 consecutive dimensions of 16 rows and vpdpbusd against a broadcast dword
// of one query (4 of its dimensions, as q + 128 bytes) adds those 4 products into each row's
// lane.  No horizontal sums: the 4x6 dot-product tile spent ~1/3 of its time in them at
// d = 768.  Scores are formed exactly as in the other int8 paths: float(dot - 128 sum(x))
// times (s_x * s_q).
constexpr int kPanelI8R = 12, kPanelI8C = 32;

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

SOLAR_AVX512 uint32_t panel_i8_12x32(const uint8_t* qpack, const int8_t* panel, int64_t d4, const int32_t* corr,
                                     const float* xscale, const float* qscale, const float* thr, float* out) {
  __m512i acc[kPanelI8R][2];
  for (int r = 0; r < kPanelI8R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t p = 0; p < d4; ++p) {
    __m512i x0 = _mm512_loadu_si512(panel + p * 4 * kPanelI8C);
    __m512i x1 = _mm512_loadu_si512(panel + p * 4 * kPanelI8C + 64);
    SOLAR_KEEP_IN_REG(x0);
    SOLAR_KEEP_IN_REG(x1);
    const uint8_t* qp = qpack + p * 4 * kPanelI8R;
    for (int r = 0; r < kPanelI8R; ++r) {
      const __m512i qb = _mm512_set1_epi32(load_u32(qp + 4 * r));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], qb, x0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], qb, x1);
    }
  }
  const __m512i c0 = _mm512_loadu_si512(corr), c1 = _mm512_loadu_si512(corr + 16);
  const __m512 s0 = _mm512_loadu_ps(xscale), s1 = _mm512_loadu_ps(xscale + 16);
  uint32_t hit = 0;
  for (int r = 0; r < kPanelI8R; ++r) {
    const __m512 qs = _mm512_set1_ps(qscale[r]);
    const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], c0)), _mm512_mul_ps(s0, qs));
    const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], c1)), _mm512_mul_ps(s1, qs));
    _mm512_storeu_ps(out + r * kPanelI8C, v0);
    _mm512_storeu_ps(out + r * kPanelI8C + 16, v1);
    const __m512 t = _mm512_set1_ps(thr[r]);
    if ((_mm512_cmp_ps_mask(v0, t, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v1, t, _CMP_GT_OQ)) != 0) hit |= 1u << r;
  }
  return hit;
}

// Packs rows xi[0..32) of the int8 codes x [n, d] into panel [d4][32][4] (zero past d), and
// their offset corrections (128 * sum of codes) and scales.
void pack_panel_i8_32(const int8_t* x, const int32_t* x_sum, const float* x_scale, int64_t d, const int64_t* xi,
                      int8_t* panel, int32_t* corr, float* xscale) {
  const int64_t full = d / 4;
  for (int j = 0; j < kPanelI8C; ++j) {
    const int8_t* row = x + xi[j] * d;
    for (int64_t p = 0; p < full; ++p) std::memcpy(panel + (p * kPanelI8C + j) * 4, row + 4 * p, 4);
    if (d % 4) {
      int8_t tail[4] = {0, 0, 0, 0};
      std::memcpy(tail, row + 4 * full, (size_t)(d % 4));
      std::memcpy(panel + (full * kPanelI8C + j) * 4, tail, 4);
    }
    corr[j] = 128 * x_sum[xi[j]];
    xscale[j] = x_scale[xi[j]];
  }
}

// ---- int8, AVX-512 VNNI ----------------------------------------------------------------
template <int R, int C>
SOLAR_AVX512 void tile_i8_vnni(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const int64_t d = c.d;
  const uint8_t* qu[R];  // q + 128
  const int8_t* xp[C];
  for (int r = 0; r < R; ++r) qu[r] = c.q_prep + qi[r] * d;
  for (int j = 0; j < C; ++j) xp[j] = static_cast<const int8_t*>(c.x) + xi[j] * d;
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_si512();
  int64_t p = 0;
  for (; p + 64 <= d; p += 64) {
    __m512i qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm512_loadu_si512(qu[r] + p);
    for (int j = 0; j < C; ++j) {
      SOLAR_PREFETCH_AHEAD(xp[j] + p, 2 * C * d);
      __m512i xv = _mm512_loadu_si512(xp[j] + p);
      SOLAR_KEEP_IN_REG(xv);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], qv[r], xv);
    }
  }
  if (p < d) {
    const __mmask64 m = (__mmask64)((1ull << (unsigned)(d - p)) - 1ull);  // d - p < 64
    __m512i qv[R];
    for (int r = 0; r < R; ++r) qv[r] = _mm512_maskz_loadu_epi8(m, qu[r] + p);
    for (int j = 0; j < C; ++j) {
      const __m512i xv = _mm512_maskz_loadu_epi8(m, xp[j] + p);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], qv[r], xv);
    }
  }
  if (R == 4) {
    // Four queries of one row at a time: 4 horizontal sums in 13 instructions instead of
    // 4 x ~10, then the offset correction and the scale as 4-lane vector ops (the same
    // fp32 roundings as the scalar epilogue: float(dot) * (s_x * s_q)).
    const __m128 qsc = _mm_setr_ps(c.q_scale[qi[0]], c.q_scale[qi[R > 1 ? 1 : 0]], c.q_scale[qi[R > 2 ? 2 : 0]],
                                   c.q_scale[qi[R > 3 ? 3 : 0]]);
    for (int j = 0; j < C; ++j) {
      __m256i h[4];
      for (int r = 0; r < 4; ++r)
        h[r] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r][j]), _mm512_extracti64x4_epi64(acc[r][j], 1));
      const __m256i h01 = _mm256_hadd_epi32(h[0], h[1]);
      const __m256i h23 = _mm256_hadd_epi32(h[2], h[3]);
      const __m256i hh = _mm256_hadd_epi32(h01, h23);
      __m128i dots = _mm_add_epi32(_mm256_castsi256_si128(hh), _mm256_extracti128_si256(hh, 1));
      dots = _mm_sub_epi32(dots, _mm_set1_epi32(128 * c.x_sum[xi[j]]));
      const __m128 scale = _mm_mul_ps(_mm_set1_ps(c.x_scale[xi[j]]), qsc);
      alignas(16) float v[4];
      _mm_store_ps(v, _mm_mul_ps(_mm_cvtepi32_ps(dots), scale));
      for (int r = 0; r < 4; ++r) out[r * C + j] = v[r];
    }
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[r][j]) - 128 * c.x_sum[xi[j]];
      const float scale = c.x_scale[xi[j]] * c.q_scale[qi[r]];
      out[r * C + j] = (float)dot * scale;
    }
}

}  // namespace

PanelI8Kernel avx512_panel_i8_kernel() {
  return PanelI8Kernel{kPanelI8R, kPanelI8C, &panel_i8_12x32, &pack_panel_i8_32, "avx512vnni-i8-panel-12x32"};
}

PanelKernel avx512_panel_kernel() { return PanelKernel{kPanelR, kPanelC, &panel_12x32, &pack_panel_32, "avx512-f32-panel-12x32"}; }

Kernel avx2_kernel(DType dt, bool few) {
  switch (dt) {
    case DType::F32:
      return few ? Kernel{1, 8, &tile_f_avx2<1, 8, false>, "avx2-f32-1x8", 0} : Kernel{2, 6, &tile_f_avx2<2, 6, false>, "avx2-f32-2x6", 0};
    case DType::F16:
      return few ? Kernel{1, 8, &tile_f_avx2<1, 8, true>, "avx2-f16-1x8", 0} : Kernel{2, 6, &tile_f_avx2<2, 6, true>, "avx2-f16-2x6", 0};
    case DType::I8:
      return few ? Kernel{1, 8, &tile_i8_avx2<1, 8>, "avx2-i8-1x8", 1} : Kernel{2, 4, &tile_i8_avx2<2, 4>, "avx2-i8-2x4", 1};
  }
  return Kernel{};
}

Kernel avx512_kernel(DType dt, bool few) {
  if (dt == DType::F32)
    return few ? Kernel{1, 8, &tile_seq_avx512<8, 0>, "avx512-f32-seq-1x8", 0}
               : Kernel{4, 6, &tile_f_avx512<4, 6, false>, "avx512-f32-4x6", 0};
  if (dt == DType::F16)
    return few ? Kernel{1, 8, &tile_seq_avx512<8, 1>, "avx512-f16-seq-1x8", 0}
               : Kernel{4, 6, &tile_f_avx512<4, 6, true>, "avx512-f16-4x6", 0};
  return few ? Kernel{1, 8, &tile_seq_avx512<8, 2>, "avx512vnni-i8-seq-1x8", 2} : Kernel{4, 6, &tile_i8_vnni<4, 6>, "avx512vnni-i8-4x6", 2};
}

}  // namespace search
}  // namespace solar

#else  // not x86: only the scalar tiles exist (best_simd_level() reports kScalar)

namespace solar {
namespace search {
Kernel avx2_kernel(DType dt, bool few) { return scalar_kernel(dt, few); }
PanelKernel avx512_panel_kernel() { return PanelKernel{}; }
PanelI8Kernel avx512_panel_i8_kernel() { return PanelI8Kernel{}; }
Kernel avx512_kernel(DType dt, bool few) { return scalar_kernel(dt, few); }
}  // namespace search
}  // namespace solar

#endif
