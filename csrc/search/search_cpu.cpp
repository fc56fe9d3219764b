// CPU driver of the exact top-k search: work split, bounded heaps, merge.
//
// Work items are (query chunk, row part) pairs run by an OpenMP team:
//  * many queries: the rows are not split (one part); the queries are cut into chunks
//    that stay in L2 while the rows stream past, each thread owning whole queries;
//  * few queries (all fit in one chunk): the rows are split into one part per thread,
//    each part keeps its own heaps, and the parts are merged at the end.
// Inside an item, a group of C rows (in L1) is scored against every R-query tile of the
// chunk by the micro-kernel; each query keeps a bounded min-heap of its k best
// (score, id), whose root is the current threshold, so most scores cost one compare.
// Rows are visited in increasing id order inside an item, so a score equal to the
// threshold never displaces an entry (the earlier id wins a tie); the merge orders by
// (score desc, id asc) explicitly.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "checks.h"
#include "cpu_features.h"
#include "search/kernels.h"
#include "search/search.h"

namespace solar {
namespace search {

int best_simd_level() {
  const auto& f = cpu_features();
  if (f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vnni) return kAvx512;
  if (f.avx2 && f.fma && f.f16c) return kAvx2;
  return kScalar;
}

int effective_simd_level(int requested) {
  const int best = best_simd_level();
  if (requested < 0) return best;
  return std::min(requested, best);
}

Kernel select_kernel(DType dt, int simd_level, bool few) {
  switch (effective_simd_level(simd_level)) {
    case kAvx512:
      return avx512_kernel(dt, few);
    case kAvx2:
      return avx2_kernel(dt, few);
    default:
      return scalar_kernel(dt, few);
  }
}

namespace {

constexpr int64_t kSentinelId = std::numeric_limits<int64_t>::max();

// a is worse than b: lower score, or the same score and a higher id.
inline bool worse(float a, int64_t ia, float b, int64_t ib) { return a < b || (a == b && ia > ib); }

// Replace the root (the worst entry) of a k-entry heap by (v, vi) and restore the heap.
inline void replace_top(float* s, int64_t* id, int64_t k, float v, int64_t vi) {
  int64_t i = 0;
  for (;;) {
    const int64_t l = 2 * i + 1;
    if (l >= k) break;
    const int64_t r = l + 1;
    const int64_t w = (r < k && worse(s[r], id[r], s[l], id[l])) ? r : l;
    if (!worse(s[w], id[w], v, vi)) break;
    s[i] = s[w];
    id[i] = id[w];
    i = w;
  }
  s[i] = v;
  id[i] = vi;
}

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kChar:
      return DType::I8;
    default:
      TORCH_CHECK(false, "x (the database rows) must be float32, float16 or int8, got ", x.scalar_type());
  }
  return DType::F32;
}

int64_t bytes_per_query(DType dt, int64_t d) { return dt == DType::I8 ? 2 * d : 4 * d; }

struct Plan {
  int64_t parts = 1, chunk = 1, nchunks = 1;
  int threads = 1;
};

Plan make_plan(const Kernel& K, DType dt, int64_t m, int64_t n, int64_t d, int64_t strategy, int64_t num_threads) {
  Plan p;
  int T = num_threads > 0 ? (int)num_threads : at::get_num_threads();
  T = std::max(1, T);
  // Tiny problems are not worth waking a team (below ~0.3M multiply-adds; measured at d = 768:
  // m = 1 fp32 search over N = 1000 / 3000 rows takes 0.78x / 0.53x the one-thread time on two).
  if ((double)m * (double)n * (double)d < 3e5) T = 1;
  p.threads = T;
  // A query chunk of about 192 KiB stays in L2 while rows stream past.
  int64_t chunk = std::max<int64_t>(K.R, (192 * 1024 / bytes_per_query(dt, d)) / K.R * K.R);
  bool split_rows = strategy == 1 || (strategy < 0 && m <= chunk);
  if (strategy == 0) split_rows = false;
  if (split_rows) {
    // More parts than threads (dynamic schedule) so a thread that is descheduled on a busy
    // machine does not hold the whole search; each part keeps >= 2048 rows.
    p.parts = T == 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(4 * T, n / 2048));
    if (p.parts < T) p.parts = std::max<int64_t>(1, std::min<int64_t>(T, n));
    p.chunk = std::max<int64_t>(1, std::min(chunk, m));
    if (strategy == 1) p.chunk = m;  // forced: one chunk, all queries
  } else {
    const int64_t per_thread = (m + T - 1) / T;
    p.chunk = std::max<int64_t>(1, std::min(chunk, (per_thread + K.R - 1) / K.R * K.R));
  }
  p.nchunks = (m + p.chunk - 1) / p.chunk;
  return p;
}

bool use_panel(DType dt, int simd_level, int64_t m) {
  if (effective_simd_level(simd_level) != kAvx512 || m < 48) return false;
  if (dt == DType::I8) return avx512_panel_i8_kernel().fn != nullptr;
  return avx512_panel_kernel().fn != nullptr;
}

// The panel paths (see PanelKernel, PanelI8Kernel): items are (query chunk, row part) as in
// the generic path; inside an item each C-row panel is packed once and scored against every
// R-query tile of the chunk.  Fills the same heaps as the generic path.
//   pack(xi, buf): packs rows xi[0..C) into the item's buffer (buf_bytes);
//   score(t, buf, thr, out): scores query tile t against it into out[R][C], returns the mask
//   of the tile's queries with a score above their threshold thr[r].
// qtile_bytes: the size of one packed query tile (it sets the chunk size).
template <class Pack, class Score>
void drive_panels(int64_t m, int64_t n, int64_t k, int T, int64_t P, int64_t strategy, int64_t R, int64_t C,
                  int64_t qtile_bytes, size_t buf_bytes, const Pack& pack, const Score& score, float* hs,
                  int64_t* hi) {
  constexpr int64_t kMaxC = 64;
  TORCH_CHECK(C <= kMaxC && R <= 32, "panel kernel too wide");
  const int64_t tiles = (m + R - 1) / R;
  // Chunks: when the rows are split, as many queries as fit in 8 MiB of packed tiles (all
  // of them up to m = 2730 at d = 768, fp32), so each panel is packed once per chunk and the
  // packing is amortised over every query tile (packing once per query share of a thread cost
  // ~6% at m = 1024); else about two chunks per thread.
  int64_t chunk_tiles = tiles;
  if (P == 1 && strategy != 1) chunk_tiles = std::max<int64_t>(1, (tiles + 2 * T - 1) / (2 * T));
  else chunk_tiles = std::min<int64_t>(tiles, std::max<int64_t>(1, (int64_t)(8 << 20) / qtile_bytes));
  const int64_t nchunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  const int64_t items = nchunks * P;
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t c = item / P, part = item % P;
    const int64_t t0 = c * chunk_tiles, t1 = std::min(tiles, t0 + chunk_tiles);
    const int64_t x0 = part * n / P, x1 = (part + 1) * n / P;
    std::vector<float> thr((size_t)((t1 - t0) * R), -std::numeric_limits<float>::infinity());
    for (int64_t qq = std::min(m, t1 * R); qq < t1 * R; ++qq) thr[qq - t0 * R] = std::numeric_limits<float>::infinity();
    std::vector<uint8_t> buf(buf_bytes + 64);
    std::vector<float> out((size_t)(R * C));
    int64_t xi[kMaxC];
    for (int64_t xb = x0; xb < x1; xb += C) {
      const int64_t nx = std::min<int64_t>(C, x1 - xb);
      for (int64_t j = 0; j < C; ++j) xi[j] = xb + std::min<int64_t>(j, nx - 1);
      pack(xi, buf.data());
      for (int64_t t = t0; t < t1; ++t) {
        float* th = thr.data() + (t - t0) * R;
        uint32_t hit = score(t, buf.data(), th, out.data());
        while (hit) {
          const int r = __builtin_ctz(hit);
          hit &= hit - 1;
          const int64_t qq = t * R + r;
          float tt = th[r];
          const int64_t off = (part * m + qq) * k;
          for (int64_t j = 0; j < nx; ++j) {
            const float v = out[r * C + j];
            if (v > tt) {
              replace_top(hs + off, hi + off, k, v, xb + j);
              tt = hs[off];
            }
          }
          th[r] = tt;
        }
      }
    }
  }
}

// fp32 / fp16 rows: query tiles packed dimension-major, zero-padded: qpack[tile][d][R].
void run_panel(const float* q, const void* x, bool half, int64_t m, int64_t n, int64_t d, int64_t k, int T,
               int64_t P, int64_t strategy, float* hs, int64_t* hi) {
  const PanelKernel PK = avx512_panel_kernel();
  const int64_t R = PK.R, C = PK.C;
  const int64_t tiles = (m + R - 1) / R;
  std::vector<float> qpack((size_t)(tiles * d * R), 0.f);
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t r = 0; r < R && t * R + r < m; ++r) {
      const float* src = q + (t * R + r) * d;
      float* dst = qpack.data() + t * d * R + r;
      for (int64_t p = 0; p < d; ++p) dst[p * R] = src[p];
    }
  drive_panels(
      m, n, k, T, P, strategy, R, C, d * R * 4, (size_t)(d * C + 16) * sizeof(float),
      [&](const int64_t* xi, uint8_t* buf) { PK.pack(x, half, d, xi, reinterpret_cast<float*>(buf)); },
      [&](int64_t t, const uint8_t* buf, const float* th, float* out) {
        return PK.fn(qpack.data() + t * d * R, reinterpret_cast<const float*>(buf), d, th, out);
      },
      hs, hi);
}

// int8 rows (VNNI): query tiles as q + 128 bytes, 4 dimensions per dword: qpack[tile][d4][R][4]
// (zero past d and for the padding queries of the last tile).
void run_panel_i8(const Ctx& c, int64_t m, int64_t n, int64_t d, int64_t k, int T, int64_t P, int64_t strategy,
                  float* hs, int64_t* hi) {
  const PanelI8Kernel PK = avx512_panel_i8_kernel();
  const int64_t R = PK.R, C = PK.C, d4 = (d + 3) / 4;
  const int64_t tiles = (m + R - 1) / R;
  std::vector<uint8_t> qpack((size_t)(tiles * d4 * R * 4), 0);
  std::vector<float> qscale((size_t)(tiles * R), 0.f);
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t r = 0; r < R && t * R + r < m; ++r) {
      const uint8_t* src = c.q_prep + (t * R + r) * d;
      uint8_t* dst = qpack.data() + (t * d4 * R + r) * 4;
      for (int64_t p = 0; p < d; ++p) dst[(p / 4) * R * 4 + p % 4] = src[p];
      qscale[t * R + r] = c.q_scale[t * R + r];
    }
  const size_t panel_bytes = (size_t)(d4 * C * 4);
  drive_panels(
      m, n, k, T, P, strategy, R, C, d4 * R * 4, panel_bytes + (size_t)C * 8,
      [&](const int64_t* xi, uint8_t* buf) {
        PK.pack(static_cast<const int8_t*>(c.x), c.x_sum, c.x_scale, d, xi, reinterpret_cast<int8_t*>(buf),
                reinterpret_cast<int32_t*>(buf + panel_bytes), reinterpret_cast<float*>(buf + panel_bytes + C * 4));
      },
      [&](int64_t t, const uint8_t* buf, const float* th, float* out) {
        return PK.fn(qpack.data() + t * d4 * R * 4, reinterpret_cast<const int8_t*>(buf), d4,
                     reinterpret_cast<const int32_t*>(buf + panel_bytes),
                     reinterpret_cast<const float*>(buf + panel_bytes + C * 4), qscale.data() + t * R, th, out);
      },
      hs, hi);
}

}  // namespace
}  // namespace search

using namespace search;

std::vector<at::Tensor> quantize_int8_cpu(const at::Tensor& x) {
  SOLAR_CHECK_CPU(x);
  SOLAR_CHECK_DIM(x, 2);
  SOLAR_CHECK_CONTIGUOUS(x);
  SOLAR_CHECK_DTYPE(x, at::kFloat);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor codes = at::empty({n, d}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({n}, x.options().dtype(at::kFloat));
  const float* src = x.data_ptr<float>();
  int8_t* dst = codes.data_ptr<int8_t>();
  float* sc = scales.data_ptr<float>();
  // One pass for the maximum, one for the codes, row by row (each row stays in L1).
  at::parallel_for(0, n, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, d)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = src + r * d;
      int8_t* out = dst + r * d;
      float amax = 0.f;
      bool nan = false;
      for (int64_t p = 0; p < d; ++p) {
        const float a = std::fabs(row[p]);
        nan |= a != a;
        amax = a > amax ? a : amax;
      }
      const float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
      sc[r] = s;
      if (!(s > 0.f)) {
        std::fill(out, out + d, (int8_t)0);
        continue;
      }
      for (int64_t p = 0; p < d; ++p) {
        const float c = std::nearbyint(row[p] / s);  // default rounding: half to even, as torch.round
        out[p] = (int8_t)std::min(127.f, std::max(-127.f, c));
      }
    }
  });
  return {codes, scales};
}

int64_t search_simd_level(int64_t requested) { return effective_simd_level((int)requested); }

std::string search_kernel_name(int64_t dtype, int64_t simd, int64_t m) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype code must be 0 (fp32), 1 (fp16) or 2 (int8), got ", dtype);
  if (use_panel((DType)dtype, (int)simd, m))
    return dtype == 2 ? avx512_panel_i8_kernel().name : avx512_panel_kernel().name;
  return select_kernel((DType)dtype, (int)simd, m < 3).name;
}

std::vector<at::Tensor> search_topk_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& q_scale,
                                        const at::Tensor& x, const c10::optional<at::Tensor>& x_scale,
                                        const c10::optional<at::Tensor>& x_sum, int64_t k, int64_t simd,
                                        int64_t strategy, int64_t num_threads) {
  SOLAR_CHECK_CPU(q);
  SOLAR_CHECK_CPU(x);
  SOLAR_CHECK_DIM(q, 2);
  SOLAR_CHECK_DIM(x, 2);
  SOLAR_CHECK_CONTIGUOUS(q);
  SOLAR_CHECK_CONTIGUOUS(x);
  const DType dt = dtype_of(x);
  const int64_t m = q.size(0), d = q.size(1), n = x.size(0);
  TORCH_CHECK(x.size(1) == d, "q has dimension ", d, " but x has dimension ", x.size(1));
  TORCH_CHECK(n >= 1, "x (the database) is empty");
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, ", n, "] (the number of rows), got ", k);
  TORCH_CHECK(strategy >= -1 && strategy <= 1, "strategy must be -1 (auto), 0 or 1, got ", strategy);

  Ctx ctx;
  ctx.d = d;
  std::vector<uint8_t> prep;
  const bool few = m < 3;
  const Kernel K = select_kernel(dt, (int)simd, few);
  if (dt == DType::I8) {
    SOLAR_CHECK_DTYPE(q, at::kChar);
    TORCH_CHECK(q_scale.has_value() && x_scale.has_value() && x_sum.has_value(),
                "int8 search needs q_scale, x_scale and x_sum");
    const at::Tensor &qs = *q_scale, &xs = *x_scale, &xsum = *x_sum;
    SOLAR_CHECK_DTYPE(qs, at::kFloat);
    SOLAR_CHECK_DTYPE(xs, at::kFloat);
    SOLAR_CHECK_DTYPE(xsum, at::kInt);
    SOLAR_CHECK_CONTIGUOUS(qs);
    SOLAR_CHECK_CONTIGUOUS(xs);
    SOLAR_CHECK_CONTIGUOUS(xsum);
    SOLAR_CHECK_SHAPE(qs, m);
    SOLAR_CHECK_SHAPE(xs, n);
    SOLAR_CHECK_SHAPE(xsum, n);
    ctx.q_scale = qs.data_ptr<float>();
    ctx.x_scale = xs.data_ptr<float>();
    ctx.x_sum = xsum.data_ptr<int32_t>();
    if (K.q_prep != 0) {
      // 1: |q| (codes are in [-127, 127], so it fits u8); 2: q + 128 (the VNNI u8 operand).
      const int8_t* qc = q.data_ptr<int8_t>();
      prep.resize((size_t)(m * d));
      const bool absolute = K.q_prep == 1;
      for (int64_t i = 0; i < m * d; ++i) prep[i] = absolute ? (uint8_t)std::abs((int)qc[i]) : (uint8_t)(qc[i] + 128);
      ctx.q_prep = prep.data();
    }
  } else {
    SOLAR_CHECK_DTYPE(q, at::kFloat);
  }
  ctx.q = q.data_ptr();
  ctx.x = x.data_ptr();

  // The packed-panel paths split the rows in auto mode (see drive_panels: one packing per panel).
  const bool panel = use_panel(dt, (int)simd, m);
  const int64_t split = (panel && strategy < 0) ? 1 : strategy;
  const Plan plan = make_plan(K, dt, m, n, d, split, num_threads);
  const int64_t P = plan.parts;
  std::vector<float> hs((size_t)(P * m * k), -std::numeric_limits<float>::infinity());
  std::vector<int64_t> hi((size_t)(P * m * k), kSentinelId);
  const int64_t items = plan.nchunks * P;

  if (panel && dt == DType::I8) {
    run_panel_i8(ctx, m, n, d, k, plan.threads, P, split, hs.data(), hi.data());
  } else if (panel) {
    run_panel(q.data_ptr<float>(), x.data_ptr(), dt == DType::F16, m, n, d, k, plan.threads, P, split, hs.data(),
              hi.data());
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(plan.threads)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t c = item / P, part = item % P;
      const int64_t q0 = c * plan.chunk, q1 = std::min(m, q0 + plan.chunk);
      const int64_t x0 = part * n / P, x1 = (part + 1) * n / P;
      std::vector<float> thr((size_t)(q1 - q0), -std::numeric_limits<float>::infinity());
      int64_t qi[16], xi[16];
      float tile[256];
      for (int64_t xb = x0; xb < x1; xb += K.C) {
        const int64_t nx = std::min<int64_t>(K.C, x1 - xb);
        for (int j = 0; j < K.C; ++j) xi[j] = xb + std::min<int64_t>(j, nx - 1);
        for (int64_t qb = q0; qb < q1; qb += K.R) {
          const int64_t nq = std::min<int64_t>(K.R, q1 - qb);
          for (int r = 0; r < K.R; ++r) qi[r] = qb + std::min<int64_t>(r, nq - 1);
          K.fn(ctx, qi, xi, tile);
          for (int64_t r = 0; r < nq; ++r) {
            float t = thr[qb - q0 + r];
            const float* row = tile + r * K.C;
            for (int64_t j = 0; j < nx; ++j) {
              if (row[j] > t) {
                const int64_t off = (part * m + qb + r) * k;
                replace_top(hs.data() + off, hi.data() + off, k, row[j], xb + j);
                t = hs[off];
              }
            }
            thr[qb - q0 + r] = t;
          }
        }
      }
    }
  }

  at::Tensor scores = at::empty({m, k}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor ids = at::empty({m, k}, at::TensorOptions().dtype(at::kLong));
  float* so = scores.data_ptr<float>();
  int64_t* io = ids.data_ptr<int64_t>();
  std::atomic<bool> unfilled{false};
#pragma omp parallel for schedule(static) num_threads(plan.threads)
  for (int64_t qq = 0; qq < m; ++qq) {
    std::vector<std::pair<float, int64_t>> all;
    all.reserve((size_t)(P * k));
    for (int64_t part = 0; part < P; ++part) {
      const int64_t off = (part * m + qq) * k;
      for (int64_t e = 0; e < k; ++e) all.emplace_back(hs[off + e], hi[off + e]);
    }
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return worse(b.first, b.second, a.first, a.second);
    };
    std::partial_sort(all.begin(), all.begin() + k, all.end(), better);
    for (int64_t e = 0; e < k; ++e) {
      so[qq * k + e] = all[e].first;
      io[qq * k + e] = all[e].second;
      if (all[e].second == kSentinelId) unfilled = true;
    }
  }
  TORCH_CHECK(!unfilled, "search produced fewer than k finite scores: the inner products overflowed float32 "
              "(NaN or -inf scores); rescale the vectors");
  return {scores, ids};
}

}  // namespace solar
