// CUDA exact top-k inner-product search: fused scoring + per-query top-k, no score matrix.
//
// Kernel 1 (score_topk_kernel), grid (query blocks, row splits), 8 warps:
//   * QB queries are staged in shared memory (fp32, or int8 codes for int8 rows);
//   * a warp scores R consecutive rows at a time, the 32 lanes side by side along d: at each
//     step lane l loads 16 bytes of each of the R rows (4 floats / 8 halves / 16 int8 codes;
//     the warp reads 512 contiguous bytes of a row: coalesced, one LDG.128 per lane and row)
//     and the matching 16 bytes of each staged query from shared memory, and keeps QB x R
//     partial dots in registers (each query vector loaded from shared memory feeds R rows,
//     so fp32 does 4 R FMAs per 16-byte shared load instead of about one);
//   * a warp reduce-scatter (topk_merge.h) turns the lanes' QB x R partials into full dots,
//     one (query, row) score per lane, with QB R - 1 shuffles instead of 5 QB R;
//   * a score becomes a 64-bit key (topk_merge.h: score desc, then id asc); each query keeps
//     its k best keys sorted in shared memory, the k-th is the threshold; a key above it is
//     appended to the query's candidate buffer;
//   * after each round of kRoundRows rows the block sorts each query's few candidates (rank
//     sort, at most kRoundRows) and merges them into the running list by merge path (every
//     output slot found by a binary search): no sort of the whole list per tile.
//   Only k keys per (query, split) reach global memory.
// Kernel 2 (merge_kernel), one block per query: merges the splits' sorted k-lists pairwise
// (merge path again) and decodes the best k into scores and ids; a slot left empty (fewer
// than k admissible scores: NaN / -inf from overflowing inner products) sets a flag.
// k <= 1024 (kMaxK).  Includes only the CUDA runtime headers so that nvcc compiles this
// file without torch.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "search/search_cuda.h"
#include "search/topk_merge.h"

namespace solar {
namespace cuda_search {
namespace {

using topk::make_key;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRoundRows = 128;  // rows scored by a block between two merges (the candidate capacity)
constexpr int kMaxQB = 16;
constexpr int kMaxSlots = kMaxK / kThreads;  // list slots one thread merges
constexpr size_t kMaxShared = 200 * 1024;
constexpr int kMergeKeys = 4096;  // splits * k kept at most this (32 KiB per merge buffer)

// Rows per warp step: enough that each shared-memory query vector feeds several rows, few
// enough that QB x R accumulators and R row vectors stay in registers.
__host__ __device__ constexpr int rows_per_warp(int qb) { return qb >= 16 ? 4 : 8; }
__host__ __device__ constexpr int ilog2(int v) { return v <= 1 ? 0 : 1 + ilog2(v / 2); }

// Elements of one 16-byte row vector: fp32 4, fp16 8, int8 16.
__host__ __device__ constexpr int vec_elems(int dt) { return dt == 0 ? 4 : (dt == 1 ? 8 : 16); }

__device__ __forceinline__ void fma4(float (&a), const float4& q, float x0, float x1, float x2, float x3) {
  a = fmaf(q.x, x0, a);
  a = fmaf(q.y, x1, a);
  a = fmaf(q.z, x2, a);
  a = fmaf(q.w, x3, a);
}

// acc[j][r] += partial dot of lane's slice of query j and row r, over the whole d.
// VEC: 16-byte vectors (d a multiple of vec_elems, rows 16-byte aligned); else one element
// per lane and step (still coalesced across the warp).
template <int DT, int QB, int R, bool VEC, class Acc>
__device__ __forceinline__ void dot_rows(const void* __restrict__ x, const unsigned char* qtile, int64_t row0,
                                         int64_t last, int64_t d, int lane, Acc (&acc)[QB * R]) {
  int64_t rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = (row0 + r) < last ? row0 + r : last;  // clamp: read, then discard
  if constexpr (VEC) {
    constexpr int V = vec_elems(DT);
    for (int64_t p = (int64_t)lane * V; p < d; p += 32 * V) {
      uint4 xv[R];
#pragma unroll
      for (int r = 0; r < R; ++r)
        xv[r] = __ldg(reinterpret_cast<const uint4*>(static_cast<const unsigned char*>(x) +
                                                     (rows[r] * d + p) * (DT == 0 ? 4 : (DT == 1 ? 2 : 1))));
      if constexpr (DT == 0) {
        const float* qf = reinterpret_cast<const float*>(qtile);
#pragma unroll
        for (int j = 0; j < QB; ++j) {
          const float4 q = *reinterpret_cast<const float4*>(qf + j * d + p);
#pragma unroll
          for (int r = 0; r < R; ++r)
            fma4(acc[j * R + r], q, __uint_as_float(xv[r].x), __uint_as_float(xv[r].y), __uint_as_float(xv[r].z),
                 __uint_as_float(xv[r].w));
        }
      } else if constexpr (DT == 1) {
        const float* qf = reinterpret_cast<const float*>(qtile);
#pragma unroll
        for (int j = 0; j < QB; ++j) {
          const float4 q0 = *reinterpret_cast<const float4*>(qf + j * d + p);
          const float4 q1 = *reinterpret_cast<const float4*>(qf + j * d + p + 4);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&xv[r].x));
            const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&xv[r].y));
            const float2 c = __half22float2(*reinterpret_cast<const __half2*>(&xv[r].z));
            const float2 e = __half22float2(*reinterpret_cast<const __half2*>(&xv[r].w));
            fma4(acc[j * R + r], q0, a.x, a.y, b.x, b.y);
            fma4(acc[j * R + r], q1, c.x, c.y, e.x, e.y);
          }
        }
      } else {
        const int8_t* qc = reinterpret_cast<const int8_t*>(qtile);
#pragma unroll
        for (int j = 0; j < QB; ++j) {
          const int4 q = *reinterpret_cast<const int4*>(qc + j * d + p);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            int s = acc[j * R + r];
            s = __dp4a((int)xv[r].x, q.x, s);
            s = __dp4a((int)xv[r].y, q.y, s);
            s = __dp4a((int)xv[r].z, q.z, s);
            s = __dp4a((int)xv[r].w, q.w, s);
            acc[j * R + r] = s;
          }
        }
      }
    }
  } else {
    for (int64_t p = lane; p < d; p += 32) {
      Acc xs[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (DT == 0) xs[r] = __ldg(static_cast<const float*>(x) + rows[r] * d + p);
        else if constexpr (DT == 1) xs[r] = __half2float(static_cast<const __half*>(x)[rows[r] * d + p]);
        else xs[r] = (Acc) static_cast<const int8_t*>(x)[rows[r] * d + p];
      }
#pragma unroll
      for (int j = 0; j < QB; ++j) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (DT == 2) acc[j * R + r] += (int)reinterpret_cast<const int8_t*>(qtile)[j * d + p] * xs[r];
          else acc[j * R + r] = fmaf(reinterpret_cast<const float*>(qtile)[j * d + p], xs[r], acc[j * R + r]);
        }
      }
    }
  }
}

// Reduce-scatter of P = 2^LOG2P partials per lane over the warp (topk_merge.h): on return
// v[0 .. max(1, P / 32)) hold full sums of value indices topk::rs_first(lane, LOG2P) + i.
// One template instance per halving stage, so that every index is a compile-time constant
// (a runtime-bounded inner loop left the accumulators in local memory).
template <int STAGE, int LOG2P, class T>
__device__ __forceinline__ void rs_halving(T (&v)[1 << LOG2P], int lane) {
  if constexpr (STAGE < (LOG2P < 5 ? LOG2P : 5)) {
    constexpr int off = 16 >> STAGE;
    constexpr int half = (1 << LOG2P) >> (STAGE + 1);
    const bool upper = topk::rs_upper(lane, off);
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const T send = topk::rs_send(v[i], v[i + half], upper);
      const T keep = topk::rs_keep(v[i], v[i + half], upper);
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
    rs_halving<STAGE + 1, LOG2P>(v, lane);
  }
}

template <int LOG2P, class T>
__device__ __forceinline__ void warp_reduce_scatter(T (&v)[1 << LOG2P], int lane) {
  constexpr int S = LOG2P < 5 ? LOG2P : 5;
  rs_halving<0, LOG2P>(v, lane);
#pragma unroll
  for (int off = 16 >> S; off > 0; off >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
}

// Shared-memory layout of the scoring kernel: the staged queries first (16-byte aligned for
// the vector loads, padded to 16 bytes), then the 8-byte keys, then the small arrays.
struct Smem {
  unsigned char* qtile;  // [QB][d] fp32 or int8
  uint64_t* lists;       // [QB][k], sorted descending
  uint64_t* cand;        // [QB][kRoundRows], the round's candidates
  uint64_t* sorted;      // [QB][kRoundRows], the same sorted descending
  int* counts;           // [kMaxQB]
  float* qscale;         // [kMaxQB]
};

__host__ __device__ inline size_t qtile_bytes(int dtype, int qb, int64_t d) {
  return ((size_t)qb * d * (dtype == 2 ? 1 : 4) + 15) / 16 * 16;
}

__host__ __device__ inline size_t score_shared_bytes(int dtype, int qb, int64_t d, int k) {
  return qtile_bytes(dtype, qb, d) + (size_t)qb * k * 8 + 2 * (size_t)qb * kRoundRows * 8 + 2 * kMaxQB * 4;
}

template <int DT, int QB>
__device__ __forceinline__ Smem carve(unsigned char* smem, int64_t d, int k) {
  Smem s;
  s.qtile = smem;
  s.lists = reinterpret_cast<uint64_t*>(smem + qtile_bytes(DT, QB, d));
  s.cand = s.lists + QB * k;
  s.sorted = s.cand + QB * kRoundRows;
  s.counts = reinterpret_cast<int*>(s.sorted + QB * kRoundRows);
  s.qscale = reinterpret_cast<float*>(s.counts + kMaxQB);
  return s;
}

// Merge each query's round candidates into its list (block-wide; every thread calls it).
template <int QB>
__device__ void merge_round(const Smem& s, int nq, int k) {
  const int tid = threadIdx.x;
  for (int idx = tid; idx < nq * kRoundRows; idx += kThreads) {
    const int j = idx / kRoundRows, t = idx % kRoundRows;
    const int c = s.counts[j];
    if (t < c) {
      const uint64_t* cj = s.cand + j * kRoundRows;
      s.sorted[j * kRoundRows + topk::rank_in_batch(cj, c, t)] = cj[t];
    }
  }
  __syncthreads();
  for (int j = 0; j < nq; ++j) {
    const int c = s.counts[j];
    if (c == 0) continue;  // uniform: every thread read the same shared value
    uint64_t* lj = s.lists + j * k;
    const uint64_t* sj = s.sorted + j * kRoundRows;
    uint64_t out[kMaxSlots];
#pragma unroll
    for (int u = 0; u < kMaxSlots; ++u) {
      const int i = tid + u * kThreads;
      if (i < k) out[u] = topk::merge_at(lj, k, sj, c, i);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kMaxSlots; ++u) {
      const int i = tid + u * kThreads;
      if (i < k) lj[i] = out[u];
    }
  }
  __syncthreads();
  if (tid < kMaxQB) s.counts[tid] = 0;
  __syncthreads();
}

// (kThreads, 1): ptxas may use up to 255 registers; with its default heuristics the scalar
// QB = 2 instances capped themselves at 80 and spilled.
template <int DT, int QB, bool VEC>
__global__ void __launch_bounds__(kThreads, 1)
    score_topk_kernel(const void* __restrict__ q, const float* __restrict__ q_scale, const void* __restrict__ x,
                      const float* __restrict__ x_scale, int64_t m, int64_t n, int64_t d, int k,
                      int64_t rows_per_split, uint64_t* __restrict__ partial) {
  constexpr int R = rows_per_warp(QB);
  constexpr int LOG2P = ilog2(QB * R);
  constexpr int PER_LANE = (QB * R) > 32 ? (QB * R) / 32 : 1;
  constexpr int REPL = (QB * R) >= 32 ? 1 : 32 / (QB * R);  // lanes holding the same sums
  constexpr int G = kRoundRows / (kWarps * R);             // row groups per warp and round
  static_assert(G * kWarps * R == kRoundRows, "a round is whole row groups");
  using Acc = typename std::conditional<DT == 2, int, float>::type;

  extern __shared__ __align__(16) unsigned char smem[];
  const Smem s = carve<DT, QB>(smem, d, k);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t q0 = (int64_t)blockIdx.x * QB;
  const int nq = (int)((m - q0) < QB ? (m - q0) : QB);
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_split;
  const int64_t r1 = (r0 + rows_per_split) < n ? (r0 + rows_per_split) : n;

  for (int64_t i = tid; i < (int64_t)QB * d; i += kThreads) {
    const int j = (int)(i / d);
    const int64_t p = i % d;
    if (DT == 2)
      reinterpret_cast<int8_t*>(s.qtile)[i] = j < nq ? static_cast<const int8_t*>(q)[(q0 + j) * d + p] : (int8_t)0;
    else
      reinterpret_cast<float*>(s.qtile)[i] = j < nq ? static_cast<const float*>(q)[(q0 + j) * d + p] : 0.f;
  }
  for (int i = tid; i < QB * k; i += kThreads) s.lists[i] = 0;
  if (tid < kMaxQB) {
    s.counts[tid] = 0;
    s.qscale[tid] = (DT == 2 && tid < nq) ? q_scale[q0 + tid] : 0.f;
  }
  __syncthreads();

  for (int64_t base = r0; base < r1; base += kRoundRows) {
#pragma unroll 1
    for (int g = 0; g < G; ++g) {
      const int64_t row0 = base + (int64_t)(g * kWarps + warp) * R;
      if (row0 >= r1) break;  // uniform in the warp
      Acc acc[QB * R];
#pragma unroll
      for (int i = 0; i < QB * R; ++i) acc[i] = 0;
      dot_rows<DT, QB, R, VEC>(x, s.qtile, row0, r1 - 1, d, lane, acc);
      warp_reduce_scatter<LOG2P>(acc, lane);
      if (lane % REPL == 0) {
#pragma unroll
        for (int u = 0; u < PER_LANE; ++u) {
          const int idx = topk::rs_first(lane, LOG2P) + u;
          const int j = idx / R;
          const int64_t row = row0 + idx % R;
          if (j < nq && row < r1) {
            float sc;
            if constexpr (DT == 2) sc = (float)acc[u] * (x_scale[row] * s.qscale[j]);
            else sc = acc[u];
            const uint64_t key = make_key(sc, (uint32_t)row);
            if (key > s.lists[j * k + k - 1]) s.cand[j * kRoundRows + atomicAdd(&s.counts[j], 1)] = key;
          }
        }
      }
    }
    __syncthreads();
    merge_round<QB>(s, nq, k);
  }

  for (int j = 0; j < nq; ++j)
    for (int i = tid; i < k; i += kThreads) partial[((int64_t)blockIdx.y * m + q0 + j) * k + i] = s.lists[j * k + i];
}

// Pairwise merge of the splits' sorted lists, then decode.  *unfilled is set when a query
// has fewer than k admissible keys.
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const uint64_t* __restrict__ partial, int64_t m, int k, int splits, float* __restrict__ out_scores,
                 int64_t* __restrict__ out_ids, int* __restrict__ unfilled) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* a = reinterpret_cast<uint64_t*>(smem);
  uint64_t* b = a + (size_t)splits * k;
  const int64_t qi = blockIdx.x;
  for (int i = threadIdx.x; i < splits * k; i += kThreads) a[i] = partial[((int64_t)(i / k) * m + qi) * k + (i % k)];
  __syncthreads();
  for (int lists = splits; lists > 1; lists = (lists + 1) / 2) {
    const int pairs = (lists + 1) / 2;
    for (int idx = threadIdx.x; idx < pairs * k; idx += kThreads) {
      const int p = idx / k, i = idx % k;
      const uint64_t* x = a + (size_t)(2 * p) * k;
      b[idx] = (2 * p + 1 < lists) ? topk::merge_at(x, k, x + k, k, i) : x[i];
    }
    __syncthreads();
    uint64_t* t = a;
    a = b;
    b = t;
  }
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const uint64_t key = a[i];
    out_scores[qi * k + i] = key ? topk::key_score(key) : -__int_as_float(0x7f800000);
    out_ids[qi * k + i] = topk::key_id(key);
    if (!key) atomicOr(unfilled, 1);
  }
}

template <int DT, int QB, bool VEC>
cudaError_t launch_score(const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                         int64_t n, int64_t d, int k, const Plan& plan, uint64_t* partial, cudaStream_t stream) {
  auto kern = score_topk_kernel<DT, QB, VEC>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.shared_bytes);
  if (e != cudaSuccess) return e;
  const int64_t rows_per_split = ((n + plan.splits - 1) / plan.splits + kRoundRows - 1) / kRoundRows * kRoundRows;
  dim3 grid((unsigned)((m + QB - 1) / QB), (unsigned)plan.splits);
  kern<<<grid, kThreads, plan.shared_bytes, stream>>>(q, q_scale, x, x_scale, m, n, d, k, rows_per_split, partial);
  return cudaGetLastError();
}

template <int DT, bool VEC>
cudaError_t launch_score_qb(const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                            int64_t n, int64_t d, int k, const Plan& plan, uint64_t* partial, cudaStream_t stream) {
  switch (plan.queries_per_block) {
    case 16:
      return launch_score<DT, 16, VEC>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
    case 8:
      return launch_score<DT, 8, VEC>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
    case 4:
      return launch_score<DT, 4, VEC>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
    case 2:
      return launch_score<DT, 2, VEC>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
    default:
      return launch_score<DT, 1, VEC>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
  }
}

template <int DT>
cudaError_t launch_score_dt(const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                            int64_t n, int64_t d, int k, const Plan& plan, uint64_t* partial, cudaStream_t stream) {
  const bool vec = d % vec_elems(DT) == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (vec) return launch_score_qb<DT, true>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
  return launch_score_qb<DT, false>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
}

}  // namespace

Plan plan_search(int dtype, int64_t m, int64_t n, int64_t d, int k, int num_sms) {
  Plan p;
  if (k < 1 || k > kMaxK || m < 1 || n < 1 || d < 1) {
    p.queries_per_block = 0;
    return p;
  }
  int qb = kMaxQB;
  while (qb > 1 && (qb / 2 >= m || score_shared_bytes(dtype, qb, d, k) > kMaxShared)) qb /= 2;
  if (score_shared_bytes(dtype, qb, d, k) > kMaxShared) {
    p.queries_per_block = 0;  // the dimension is too large for one staged query
    return p;
  }
  p.queries_per_block = qb;
  p.shared_bytes = score_shared_bytes(dtype, qb, d, k);
  const int64_t qblocks = (m + qb - 1) / qb;
  const int64_t want = (2 * (int64_t)(num_sms > 0 ? num_sms : 1) + qblocks - 1) / qblocks;
  const int64_t max_by_merge = kMergeKeys / k > 0 ? kMergeKeys / k : 1;
  const int64_t max_by_rows = (n + kRoundRows - 1) / kRoundRows;
  int64_t splits = want;
  if (splits > max_by_merge) splits = max_by_merge;
  if (splits > max_by_rows) splits = max_by_rows;
  if (splits < 1) splits = 1;
  p.splits = (int)splits;
  p.workspace_bytes = (size_t)p.splits * (size_t)m * (size_t)k * sizeof(uint64_t);
  return p;
}

int launch_search(int dtype, const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                  int64_t n, int64_t d, int k, const Plan& plan, void* workspace, float* out_scores,
                  int64_t* out_ids, int* unfilled, CUstream_st* stream) {
  if (plan.queries_per_block < 1 || dtype < 0 || dtype > 2) return (int)cudaErrorInvalidValue;
  uint64_t* partial = static_cast<uint64_t*>(workspace);
  cudaError_t e = cudaMemsetAsync(unfilled, 0, sizeof(int), stream);
  if (e != cudaSuccess) return (int)e;
  if (dtype == 0)
    e = launch_score_dt<0>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
  else if (dtype == 1)
    e = launch_score_dt<1>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
  else
    e = launch_score_dt<2>(q, q_scale, x, x_scale, m, n, d, k, plan, partial, stream);
  if (e != cudaSuccess) return (int)e;
  const size_t shared = 2 * (size_t)plan.splits * k * sizeof(uint64_t);
  e = cudaFuncSetAttribute(merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
  if (e != cudaSuccess) return (int)e;
  merge_kernel<<<(unsigned)m, kThreads, shared, stream>>>(partial, m, k, plan.splits, out_scores, out_ids, unfilled);
  return (int)cudaGetLastError();
}

}  // namespace cuda_search
}  // namespace solar
