// masked_pool CPU kernels: OpenMP over (batch row, D or L slice), inner loops over D written
// so that -O3 -march=native vectorises them (fixed-width partial sums instead of float
// reductions, which the compiler may not reorder without -ffast-math).
#include "pool/pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "checks.h"
#include "pool/pool_cpu_simd.h"

namespace solar {
namespace {
using namespace pool_simd;  // vfn, madd, block_accumulate_any, ... (pool/pool_cpu_simd.h)

// Work below this many elements (half of it for the x sweeps) runs on one thread: a
// parallel region's fork and join cost more than the work (and, on a busy machine, a
// descheduled worker stalls the whole region).
constexpr int64_t kParallelMin = int64_t(1) << 18;

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---- element conversion -------------------------------------------------------------
// Rows of reduced-precision x are widened into a float buffer once, then every mask reuses it.
template <typename T>
struct Row;

template <>
struct Row<float> {
  static const float* load(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }
  static void store(const float* src, float* dst, int64_t n) {
    if (src != dst) std::memcpy(dst, src, sizeof(float) * n);
  }
};

template <>
struct Row<c10::BFloat16> {
  static const float* load(const c10::BFloat16* src, float* buf, int64_t n) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = uint32_t(s[i]) << 16;
      std::memcpy(buf + i, &u, 4);
    }
    return buf;
  }
  static void store(const float* src, c10::BFloat16* dst, int64_t n) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, src + i, 4);
      const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
      const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
      d[i] = uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
    }
  }
};

template <>
struct Row<c10::Half> {
  static const float* load(const c10::Half* src, float* buf, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
    for (; i < n; ++i) buf[i] = float(src[i]);
    return buf;
  }
  static void store(const float* src, c10::Half* dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) dst[i] = c10::Half(src[i]);
  }
};

template <typename M>
inline float weight(const M* p) {
  return float(*p);
}
template <>
inline float weight<uint8_t>(const uint8_t* p) {
  return *p ? 1.f : 0.f;
}

// grad_x is as large as x and is written once, right after its allocation: with 4 KiB
// pages the kernel's page faults (one per 4 KiB, each zeroing it) cost several times the
// write itself.  Asking for transparent huge pages on the fresh range (before any touch)
// turns 512 faults into one.  No effect where THP is off; harmless on reused memory.
// (torch itself does the same for all large CPU tensors when THP_MEM_ALLOC_ENABLE=1.)
void advise_huge_pages(void* p, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (nbytes < 2 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + nbytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)nbytes;
#endif
}

// ---- recycled grad_x buffers ----------------------------------------------------------
// Even with huge pages, a fresh grad_x costs the kernel's zeroing of every page before our
// single write (torch's CPU allocator returns large blocks to the OS on free).  In a
// training loop grad_x of the same shape is freed every step, so its buffer is kept (up
// to a byte cap) and handed to the next backward instead: warm, already mapped pages.
// Cap: SOLAR_POOL_GRAD_CACHE_MB (default 256; 0 disables), or set_grad_cache_mb().
// Buffers below kCacheMin bytes use torch's allocator.
constexpr size_t kCacheMin = size_t(4) << 20;
constexpr size_t kHugePage = size_t(1) << 21;

struct BufferCache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> free_list;
  size_t cached = 0;
  size_t cap = 0;
  BufferCache() {
    const char* env = std::getenv("SOLAR_POOL_GRAD_CACHE_MB");
    cap = size_t(env ? std::max(0L, std::atol(env)) : 256L) << 20;
  }
};

BufferCache& buffer_cache() {
  static BufferCache* c = new BufferCache();  // never destroyed: tensors may outlive static destructors
  return *c;
}

void release_buffer(void* p, size_t n) {
  BufferCache& c = buffer_cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.cached + n <= c.cap) {
      c.free_list.emplace_back(p, n);
      c.cached += n;
      return;
    }
  }
  std::free(p);
}

// An uninitialised contiguous tensor, from the cache when a buffer of at least `nbytes`
// (and at most twice that) is free; every element must be written by the caller.
at::Tensor recycled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts, size_t nbytes) {
  BufferCache& c = buffer_cache();
  void* p = nullptr;
  size_t n = 0;
  bool use_cache = nbytes >= kCacheMin;
  if (use_cache) {
    std::lock_guard<std::mutex> lock(c.mu);
    use_cache = c.cap > 0;
    size_t best = c.free_list.size();
    for (size_t i = 0; use_cache && i < c.free_list.size(); ++i) {
      const size_t sz = c.free_list[i].second;
      if (sz >= nbytes && sz <= 2 * nbytes && (best == c.free_list.size() || sz < c.free_list[best].second)) best = i;
    }
    if (use_cache && best < c.free_list.size()) {
      p = c.free_list[best].first;
      n = c.free_list[best].second;
      c.free_list.erase(c.free_list.begin() + best);
      c.cached -= n;
    }
  }
  if (!use_cache) {
    at::Tensor t = at::empty(sizes, opts);
    advise_huge_pages(t.data_ptr(), t.nbytes());
    return t;
  }
  if (p == nullptr) {
    n = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, n);
    TORCH_CHECK(p != nullptr, "masked_pool: out of memory allocating ", n, " bytes for grad_x");
    advise_huge_pages(p, n);
  }
  return at::from_blob(p, sizes, [n](void* q) { release_buffer(q, n); }, opts);
}

// Sets the cache's byte cap (frees what no longer fits); returns the previous cap in MiB.
int64_t set_grad_cache_mb(int64_t mb) {
  BufferCache& c = buffer_cache();
  std::vector<std::pair<void*, size_t>> drop;
  int64_t prev;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    prev = int64_t(c.cap >> 20);
    c.cap = size_t(std::max<int64_t>(0, mb)) << 20;
    while (c.cached > c.cap && !c.free_list.empty()) {
      drop.push_back(c.free_list.back());
      c.cached -= c.free_list.back().second;
      c.free_list.pop_back();
    }
  }
  for (auto& b : drop) std::free(b.first);
  return prev;
}

// Mask weights as either raw bytes (bool) or float32 with their strides.
struct MaskView {
  const void* data;
  int64_t sv, sb, sl;
};

// ---- forward ---------------------------------------------------------------------------
template <typename T, typename M>
void forward_impl(const T* x, int64_t sxb, int64_t sxl, const MaskView& mv, float* out, float* wsum_out,
                  int64_t V, int64_t B, int64_t L, int64_t D) {
  const M* mask = static_cast<const M*>(mv.data);
  constexpr bool kFloat = std::is_same<T, float>::value;
  constexpr int kRows = 8;  // x rows per register block
  // Enough independent tasks for every thread: split D when there are few batch rows.
  const int threads = max_threads();
  int64_t dchunk = D;
  if (B < 4 * threads) {
    const int64_t want = (4 * threads + B - 1) / B;
    dchunk = std::max<int64_t>(64, ((D + want - 1) / want + 63) / 64 * 64);
  }
  const int64_t nd = (D + dchunk - 1) / dchunk;
  const int64_t tasks = B * nd;

#pragma omp parallel if (B * L * D * std::max<int64_t>(V, 1) >= kParallelMin / 2)
  {
    std::vector<float> acc(V * dchunk), rowbuf(kFloat ? 0 : kRows * dchunk), wt(L * V), wsum(V);
    std::vector<int64_t> active(L);
    const float* rows[kRows];
    const float* next[kRows];  // float x only: the next block's rows, to prefetch
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / nd, d0 = (t % nd) * dchunk, dn = std::min(dchunk, D - d0);
      // weights of this batch row, and the rows that any mask keeps (padding is never read)
      std::fill(wsum.begin(), wsum.end(), 0.f);
      int64_t na = 0;
      for (int64_t l = 0; l < L; ++l) {
        bool any = false;
        for (int64_t v = 0; v < V; ++v) {
          const float wv = weight<M>(mask + v * mv.sv + b * mv.sb + l * mv.sl);
          wt[na * V + v] = wv;
          wsum[v] += wv;
          any |= wv != 0.f;
        }
        if (any) active[na++] = l;
      }
      std::fill(acc.begin(), acc.begin() + V * dn, 0.f);
      const T* xb = x + b * sxb + d0;
      for (int64_t i0 = 0; i0 < na; i0 += kRows) {
        const int nr = int(std::min<int64_t>(kRows, na - i0));
        for (int r = 0; r < nr; ++r)
          rows[r] = Row<T>::load(xb + active[i0 + r] * sxl, kFloat ? nullptr : rowbuf.data() + r * dn, dn);
        // (reduced-precision rows are read whole, in order, by Row::load: nothing to prefetch)
        const int nn = kFloat ? int(std::max<int64_t>(0, std::min<int64_t>(kRows, na - i0 - kRows))) : 0;
        for (int r = 0; r < nn; ++r) next[r] = reinterpret_cast<const float*>(xb + active[i0 + kRows + r] * sxl);
        for (int64_t v0 = 0; v0 < V; v0 += 4)  // the first mask group prefetches for all
          block_accumulate_any(acc.data() + v0 * dn, dn, rows, wt.data() + i0 * V + v0, V, nr,
                               std::min<int64_t>(4, V - v0), next, v0 == 0 ? nn : 0);
      }
      for (int64_t v = 0; v < V; ++v) {
        // a sum below the smallest normal float is an empty row (1 / s would overflow)
        const float s = wsum[v] >= std::numeric_limits<float>::min() ? wsum[v] : 0.f;
        float* a = acc.data() + v * dn;
        // With V > 1 a kept row can have weight 0 under this mask, and 0 * NaN / inf = NaN:
        // a non-finite sum is redone with those terms skipped (rare: x holds non-finite
        // values; the check is one pass over V * dn sums, not over x).
        if (V > 1 && s > 0.f && !all_finite(a, dn)) {
          std::fill(a, a + dn, 0.f);
          for (int64_t i = 0; i < na; ++i) {
            const float wv = wt[i * V + v];
            if (wv == 0.f) continue;
            axpy(a, wv, Row<T>::load(xb + active[i] * sxl, kFloat ? nullptr : rowbuf.data(), dn), dn);
          }
        }
        float* o = out + (v * B + b) * D + d0;
        if (s > 0.f)
          scale_to(o, 1.f / s, a, dn);
        else  // not 0 * a: a may hold 0 * NaN from rows that only other masks keep
          std::fill(o, o + dn, 0.f);
        if (d0 == 0) wsum_out[v * B + b] = s;
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------
// dp = dy / s and c = y . dp for every (v, b) row (formulas in ops/masked_pool.py).
void backward_prep(const float* g, const float* out, const float* s, const float* n, float* dp, float* c,
                   int64_t rows, int64_t D, bool normalize, float eps) {
#pragma omp parallel for schedule(static) if (rows * D >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * D;
    const float* o = out + r * D;
    float* d = dp + r * D;
    const float inv_s = s[r] > 0.f ? 1.f / s[r] : 0.f;
    if (normalize) {
      const float denom = std::max(n[r], eps);
      const float proj = n[r] > eps ? dot(o, gr, D) : 0.f;
      const float k = inv_s / denom;
      for (int64_t i = 0; i < D; ++i) d[i] = (gr[i] - o[i] * proj) * k;
      c[r] = denom * dot(o, d, D);
    } else {
      scale_to(d, inv_s, gr, D);
      c[r] = dot(o, d, D);
    }
  }
}

// One row of the backward for VB <= 4 masks, in a single sweep over D:
//   gx[d] = sum_v w[v] dps[v][d];   MG: dots[v] = xr . dps[v]
template <int VB, bool MG>
void backward_row(const float* const* dps, const float* w, float* __restrict gx, const float* xr, float* dots,
                  int64_t D) {
  vfn part[VB][kGroup];
  for (int v = 0; v < VB; ++v)
    for (int p = 0; p < kGroup; ++p) part[v][p] = vfn{};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    for (int p = 0; p < kGroup; ++p) {
      const int64_t e = d + kLanes * p;
      vfn g = w[0] * ld(dps[0] + e);
      for (int v = 1; v < VB; ++v) g = madd(g, w[v], ld(dps[v] + e));
      st(gx + e, g);
      if (MG) {
        const vfn xv = ld(xr + e);
        for (int v = 0; v < VB; ++v) part[v][p] = madd(part[v][p], xv, ld(dps[v] + e));
      }
    }
  }
  float tail[VB] = {};
  for (; d < D; ++d) {
    float g = w[0] * dps[0][d];
    for (int v = 1; v < VB; ++v) g = madd(g, w[v], dps[v][d]);
    gx[d] = g;
    if (MG)
      for (int v = 0; v < VB; ++v) tail[v] = madd(tail[v], xr[d], dps[v][d]);
  }
  if (MG)
    for (int v = 0; v < VB; ++v) dots[v] = hsum16(part[v]) + tail[v];
}

template <bool MG>
void backward_row_any(int64_t nv, const float* const* dps, const float* w, float* gx, const float* xr, float* dots,
                      int64_t D) {
  switch (nv) {
    case 1: backward_row<1, MG>(dps, w, gx, xr, dots, D); break;
    case 2: backward_row<2, MG>(dps, w, gx, xr, dots, D); break;
    case 3: backward_row<3, MG>(dps, w, gx, xr, dots, D); break;
    default: backward_row<4, MG>(dps, w, gx, xr, dots, D); break;
  }
}

template <typename T, typename M>
void backward_impl(const T* x, int64_t sxb, int64_t sxl, const MaskView& mv, const float* dp, const float* c,
                   const float* s, T* gx, float* gm, int64_t V, int64_t B, int64_t L, int64_t D) {
  const M* mask = static_cast<const M*>(mv.data);
  const int64_t lchunk = 8;
  const int64_t nl = (L + lchunk - 1) / lchunk;
  const int64_t tasks = B * nl;
  constexpr bool kFloat = std::is_same<T, float>::value;
#pragma omp parallel if (B * L * D * std::max<int64_t>(V, 1) >= kParallelMin / 2)
  {
    std::vector<float> buf(kFloat ? 0 : D), xbuf(kFloat ? 0 : D), w(V), dots(V);
    std::vector<const float*> dps(V);
#pragma omp for schedule(dynamic, 2)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / nl, l0 = (t % nl) * lchunk, l1 = std::min(L, l0 + lchunk);
      for (int64_t v = 0; v < V; ++v) dps[v] = dp + (v * B + b) * D;
      for (int64_t l = l0; l < l1; ++l) {
        bool any = false;
        for (int64_t v = 0; v < V; ++v) {
          w[v] = weight<M>(mask + v * mv.sv + b * mv.sb + l * mv.sl);
          any |= w[v] != 0.f;
        }
        T* gxr = gx + (b * L + l) * D;
        float* dst = kFloat ? reinterpret_cast<float*>(gxr) : buf.data();
        const float* xr = gm != nullptr ? Row<T>::load(x + b * sxb + l * sxl, kFloat ? nullptr : xbuf.data(), D)
                                        : nullptr;
        if (V <= 4 && (any || xr != nullptr)) {  // fused single sweep
          if (xr != nullptr)
            backward_row_any<true>(V, dps.data(), w.data(), dst, xr, dots.data(), D);
          else
            backward_row_any<false>(V, dps.data(), w.data(), dst, nullptr, nullptr, D);
          if (!kFloat) Row<T>::store(dst, gxr, D);
        } else if (!any) {
          std::memset(static_cast<void*>(gxr), 0, sizeof(T) * D);
        } else {  // many masks: accumulate the row in L1, one mask at a time
          scale_to(dst, w[0], dps[0], D);
          for (int64_t v = 1; v < V; ++v)
            if (w[v] != 0.f) axpy(dst, w[v], dps[v], D);
          if (!kFloat) Row<T>::store(dst, gxr, D);
        }
        if (xr != nullptr) {
          for (int64_t v = 0; v < V; ++v) {
            const int64_t r = v * B + b;
            const float t_v = V <= 4 ? dots[v] : dot(xr, dps[v], D);
            gm[r * L + l] = s[r] > 0.f ? t_v - c[r] : 0.f;
          }
        }
      }
    }
  }
}

// ---- argument handling -------------------------------------------------------------------
void check_inputs(const at::Tensor& x, const at::Tensor& mask) {
  SOLAR_CHECK_CPU(x);
  SOLAR_CHECK_CPU(mask);
  SOLAR_CHECK_DIM(x, 3);
  SOLAR_CHECK_DIM(mask, 3);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()),
              "mask must be bool or floating, got ", mask.scalar_type());
  TORCH_CHECK(mask.size(1) == x.size(0) && mask.size(2) == x.size(1), "mask must have shape [V, ", x.size(0), ", ",
              x.size(1), "] to match x ", x.sizes(), ", got ", mask.sizes());
}

// x with a unit D stride (copied only when it has none) and the mask as bytes or float32.
at::Tensor unit_d_stride(const at::Tensor& x) { return x.stride(2) == 1 ? x : x.contiguous(); }

at::Tensor mask_operand(const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat) return mask;
  return mask.to(at::kFloat);
}

MaskView view_of(const at::Tensor& m) { return MaskView{m.data_ptr(), m.stride(0), m.stride(1), m.stride(2)}; }

template <typename F>
void dispatch_x(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "x must be float32, float16 or bfloat16, got ", t);
  }
}

}  // namespace

int64_t masked_pool_grad_cache_mb(int64_t max_mb) {
  if (max_mb < 0) {
    BufferCache& c = buffer_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    return int64_t(c.cap >> 20);
  }
  return set_grad_cache_mb(max_mb);
}

std::vector<at::Tensor> masked_pool_forward_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, bool normalize,
                                                double eps) {
  check_inputs(x_in, mask_in);
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  const at::Tensor x = unit_d_stride(x_in);
  const at::Tensor mask = mask_operand(mask_in);
  const int64_t V = mask.size(0), B = x.size(0), L = x.size(1), D = x.size(2);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty({V, B, D}, f32);
  at::Tensor aux = at::zeros({2, V, B}, f32);
  if (V * B == 0 || D == 0) return {out, aux};
  if (L == 0) {
    out.zero_();
    return {out, aux};
  }
  const MaskView mv = view_of(mask);
  float* o = out.data_ptr<float>();
  float* a = aux.data_ptr<float>();
  dispatch_x(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    if (mask.scalar_type() == at::kBool)
      forward_impl<T, uint8_t>(xp, x.stride(0), x.stride(1), mv, o, a, V, B, L, D);
    else
      forward_impl<T, float>(xp, x.stride(0), x.stride(1), mv, o, a, V, B, L, D);
  });
  // Norms of the mean rows (always kept: the backward of normalize needs them).
  float* n = a + V * B;
  const float feps = float(eps);
#pragma omp parallel for schedule(static) if (V * B * D >= kParallelMin)
  for (int64_t r = 0; r < V * B; ++r) {
    float* row = o + r * D;
    n[r] = std::sqrt(dot(row, row, D));
    if (normalize) {
      const float inv = 1.f / std::max(n[r], feps);
      for (int64_t i = 0; i < D; ++i) row[i] *= inv;
    }
  }
  return {out, aux};
}

std::vector<at::Tensor> masked_pool_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                 const at::Tensor& mask_in, const at::Tensor& out_in,
                                                 const at::Tensor& aux_in, bool normalize, double eps,
                                                 bool need_mask_grad) {
  check_inputs(x_in, mask_in);
  const at::Tensor x = unit_d_stride(x_in);
  const at::Tensor mask = mask_operand(mask_in);
  const int64_t V = mask.size(0), B = x.size(0), L = x.size(1), D = x.size(2);
  const at::Tensor g = grad_out_in.to(at::kFloat).contiguous();
  const at::Tensor out = out_in.to(at::kFloat).contiguous();
  const at::Tensor aux = aux_in.to(at::kFloat).contiguous();
  SOLAR_CHECK_SHAPE(g, V, B, D);
  SOLAR_CHECK_SHAPE(out, V, B, D);
  SOLAR_CHECK_SHAPE(aux, 2, V, B);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor grad_x = recycled_empty({B, L, D}, x.options(), size_t(B * L * D) * x.element_size());
  at::Tensor grad_mask = need_mask_grad ? at::zeros({V, B, L}, f32) : at::empty({0}, f32);
  if (B * L * D == 0) return {grad_x, grad_mask};
  if (V == 0) {
    grad_x.zero_();
    return {grad_x, grad_mask};
  }
  at::Tensor dp = at::empty({V, B, D}, f32);
  at::Tensor c = at::empty({V, B}, f32);
  const float* s = aux.data_ptr<float>();
  backward_prep(g.data_ptr<float>(), out.data_ptr<float>(), s, s + V * B, dp.data_ptr<float>(),
                c.data_ptr<float>(), V * B, D, normalize, float(eps));
  const MaskView mv = view_of(mask);
  float* gm = need_mask_grad ? grad_mask.data_ptr<float>() : nullptr;
  dispatch_x(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* gxp = static_cast<T*>(grad_x.data_ptr());
    if (mask.scalar_type() == at::kBool)
      backward_impl<T, uint8_t>(xp, x.stride(0), x.stride(1), mv, dp.data_ptr<float>(), c.data_ptr<float>(), s, gxp,
                                gm, V, B, L, D);
    else
      backward_impl<T, float>(xp, x.stride(0), x.stride(1), mv, dp.data_ptr<float>(), c.data_ptr<float>(), s, gxp,
                              gm, V, B, L, D);
  });
  return {grad_x, grad_mask};
}

}  // namespace solar
