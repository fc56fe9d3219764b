// CUDA exact top-k inner-product search: fused scoring + per-query top-k, no score matrix.
//
// Kernel 1 (score_topk_kernel), grid (query blocks, row splits), 256 threads:
//   * QB queries are staged in shared memory (fp32, or int8 codes for int8 rows);
//   * each 256-row tile is scored one row per thread (fp32 FMA; fp16 rows widened with
//     fp32 accumulation; int8 with __dp4a integer dots and score = dot * (s_x * s_q));
//   * a score becomes a 64-bit key (order-preserving float bits << 32 | ~id), so one
//     unsigned compare orders by (score desc, id asc) and all keys are distinct;
//   * each query keeps its k best keys sorted in shared memory; the k-th key is the
//     threshold; a row that beats it is appended to a candidate buffer (atomicAdd), and
//     when a tile produced candidates the list and the candidates are merged by a
//     block-wide bitonic sort.  Only k keys per (query, split) reach global memory.
// Kernel 2 (merge_kernel), one block per query: sorts the splits' k-lists together and
// decodes the best k into scores and ids.
// k <= 1024 (kMaxK).  Includes only the CUDA runtime headers so that nvcc compiles this
// file without torch.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "search/search_cuda.h"

namespace solar {
namespace cuda_search {
namespace {

constexpr int kThreads = 256;  // rows per tile: one per thread
constexpr size_t kMaxShared = 200 * 1024;
constexpr int kMergeKeys = 4096;  // splits * k kept at most this, sorted in 32 KiB of shared memory

__host__ __device__ inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

__device__ __forceinline__ uint32_t order_float(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float unorder_float(uint32_t o) {
  const uint32_t b = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  return __uint_as_float(b);
}

// Larger key = better: higher score, then lower id.  Key 0 marks an empty slot (every
// real key has order_float(score) >= order_float(-inf) > 0 in its high word).
__device__ __forceinline__ uint64_t make_key(float s, uint32_t id) {
  return ((uint64_t)order_float(s) << 32) | (uint64_t)(0xffffffffu - id);
}

// Block-wide bitonic sort of `len` (a power of two) keys in shared memory, descending.
__device__ void bitonic_sort_desc(uint64_t* a, int len) {
  for (int size = 2; size <= len; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < (len >> 1); i += blockDim.x) {
        const int lo = 2 * stride * (i / stride) + (i % stride);
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t x = a[lo], y = a[hi];
        if ((x < y) == desc) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Scores of one row against the QB staged queries.
template <int DT, int QB>
__device__ __forceinline__ void score_row(const void* __restrict__ x, const float* __restrict__ x_scale,
                                          const unsigned char* qtile, const float* qscale, int64_t row, int64_t d,
                                          int64_t dq, float* s) {
  if (DT == 0) {
    const float* xr = static_cast<const float*>(x) + row * d;
    const float* qf = reinterpret_cast<const float*>(qtile);
    float acc[QB];
#pragma unroll
    for (int j = 0; j < QB; ++j) acc[j] = 0.f;
    if ((d & 3) == 0) {
      const float4* xv = reinterpret_cast<const float4*>(xr);
      for (int64_t p4 = 0; p4 < d / 4; ++p4) {
        const float4 v = __ldg(xv + p4);
#pragma unroll
        for (int j = 0; j < QB; ++j) {
          const float* qq = qf + j * dq + 4 * p4;
          acc[j] = fmaf(qq[0], v.x, acc[j]);
          acc[j] = fmaf(qq[1], v.y, acc[j]);
          acc[j] = fmaf(qq[2], v.z, acc[j]);
          acc[j] = fmaf(qq[3], v.w, acc[j]);
        }
      }
    } else {
      for (int64_t p = 0; p < d; ++p) {
        const float v = __ldg(xr + p);
#pragma unroll
        for (int j = 0; j < QB; ++j) acc[j] = fmaf(qf[j * dq + p], v, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < QB; ++j) s[j] = acc[j];
  } else if (DT == 1) {
    const __half* xr = static_cast<const __half*>(x) + row * d;
    const float* qf = reinterpret_cast<const float*>(qtile);
    float acc[QB];
#pragma unroll
    for (int j = 0; j < QB; ++j) acc[j] = 0.f;
    if ((d & 1) == 0) {
      const __half2* xv = reinterpret_cast<const __half2*>(xr);
      for (int64_t p2 = 0; p2 < d / 2; ++p2) {
        const float2 v = __half22float2(xv[p2]);
#pragma unroll
        for (int j = 0; j < QB; ++j) {
          const float* qq = qf + j * dq + 2 * p2;
          acc[j] = fmaf(qq[0], v.x, acc[j]);
          acc[j] = fmaf(qq[1], v.y, acc[j]);
        }
      }
    } else {
      for (int64_t p = 0; p < d; ++p) {
        const float v = __half2float(xr[p]);
#pragma unroll
        for (int j = 0; j < QB; ++j) acc[j] = fmaf(qf[j * dq + p], v, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < QB; ++j) s[j] = acc[j];
  } else {
    const int8_t* xr = static_cast<const int8_t*>(x) + row * d;
    const int8_t* qc = reinterpret_cast<const int8_t*>(qtile);
    int acc[QB];
#pragma unroll
    for (int j = 0; j < QB; ++j) acc[j] = 0;
    if ((d & 3) == 0) {
      const int* xw = reinterpret_cast<const int*>(xr);
      for (int64_t p4 = 0; p4 < d / 4; ++p4) {
        const int v = __ldg(xw + p4);
#pragma unroll
        for (int j = 0; j < QB; ++j) acc[j] = __dp4a(v, reinterpret_cast<const int*>(qc + j * dq)[p4], acc[j]);
      }
    } else {
      for (int64_t p = 0; p < d; ++p) {
        const int v = xr[p];
#pragma unroll
        for (int j = 0; j < QB; ++j) acc[j] += v * (int)qc[j * dq + p];
      }
    }
    const float sx = x_scale[row];
#pragma unroll
    for (int j = 0; j < QB; ++j) s[j] = (float)acc[j] * (sx * qscale[j]);
  }
}

template <int DT, int QB>
__global__ void __launch_bounds__(kThreads)
    score_topk_kernel(const void* __restrict__ q, const float* __restrict__ q_scale, const void* __restrict__ x,
                      const float* __restrict__ x_scale, int64_t m, int64_t n, int64_t d, int64_t dq, int k,
                      int sort_len, int64_t rows_per_split, uint64_t* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* lists = reinterpret_cast<uint64_t*>(smem);  // [QB][k], sorted descending
  uint64_t* sortbuf = lists + QB * k;                    // [sort_len]
  uint64_t* cand = sortbuf + sort_len;                   // [QB][kThreads]
  int* counts = reinterpret_cast<int*>(cand + QB * kThreads);  // [8]
  float* qscale = reinterpret_cast<float*>(counts + 8);        // [8]
  unsigned char* qtile = reinterpret_cast<unsigned char*>(qscale + 8);  // [QB][dq] f32 or i8

  const int tid = threadIdx.x;
  const int64_t q0 = (int64_t)blockIdx.x * QB;
  const int nq = (int)((m - q0) < QB ? (m - q0) : QB);
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = (r0 + rows_per_split) < n ? (r0 + rows_per_split) : n;

  for (int64_t i = tid; i < (int64_t)QB * dq; i += kThreads) {
    const int j = (int)(i / dq);
    const int64_t p = i % dq;
    const bool live = j < nq && p < d;
    if (DT == 2) {
      reinterpret_cast<int8_t*>(qtile)[i] = live ? static_cast<const int8_t*>(q)[(q0 + j) * d + p] : (int8_t)0;
    } else {
      reinterpret_cast<float*>(qtile)[i] = live ? static_cast<const float*>(q)[(q0 + j) * d + p] : 0.f;
    }
  }
  for (int i = tid; i < QB * k; i += kThreads) lists[i] = 0;
  if (tid < 8) {
    counts[tid] = 0;
    qscale[tid] = (DT == 2 && tid < nq) ? q_scale[q0 + tid] : 0.f;
  }
  __syncthreads();

  for (int64_t base = r0; base < r1; base += kThreads) {
    const int64_t row = base + tid;
    if (row < r1) {
      float s[QB];
      score_row<DT, QB>(x, x_scale, qtile, qscale, row, d, dq, s);
#pragma unroll
      for (int j = 0; j < QB; ++j) {
        if (j < nq) {
          const uint64_t key = make_key(s[j], (uint32_t)row);
          if (key > lists[j * k + k - 1]) {
            const int pos = atomicAdd(&counts[j], 1);
            cand[j * kThreads + pos] = key;
          }
        }
      }
    }
    __syncthreads();
    for (int j = 0; j < nq; ++j) {
      const int c = counts[j];
      if (c == 0) continue;  // uniform: every thread read the same shared value
      for (int i = tid; i < sort_len; i += kThreads)
        sortbuf[i] = i < k ? lists[j * k + i] : (i < k + c ? cand[j * kThreads + (i - k)] : 0ull);
      __syncthreads();
      bitonic_sort_desc(sortbuf, sort_len);
      for (int i = tid; i < k; i += kThreads) lists[j * k + i] = sortbuf[i];
      __syncthreads();
      if (tid == 0) counts[j] = 0;
    }
    __syncthreads();
  }

  for (int j = 0; j < nq; ++j)
    for (int i = tid; i < k; i += kThreads) partial[(split * m + q0 + j) * k + i] = lists[j * k + i];
}

__global__ void __launch_bounds__(kThreads)
    merge_kernel(const uint64_t* __restrict__ partial, int64_t m, int k, int splits, int len,
                 float* __restrict__ out_scores, int64_t* __restrict__ out_ids) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* buf = reinterpret_cast<uint64_t*>(smem);
  const int64_t qi = blockIdx.x;
  const int total = splits * k;
  for (int i = threadIdx.x; i < len; i += kThreads)
    buf[i] = i < total ? partial[((int64_t)(i / k) * m + qi) * k + (i % k)] : 0ull;
  __syncthreads();
  bitonic_sort_desc(buf, len);
  for (int i = threadIdx.x; i < k; i += kThreads) {
    const uint64_t key = buf[i];
    out_scores[qi * k + i] = key ? unorder_float((uint32_t)(key >> 32)) : -__int_as_float(0x7f800000);
    out_ids[qi * k + i] = key ? (int64_t)(0xffffffffu - (uint32_t)(key & 0xffffffffu)) : (int64_t)-1;
  }
}

size_t score_shared_bytes(int dtype, int qb, int64_t dq, int k, int sort_len) {
  const size_t elem = dtype == 2 ? 1 : 4;
  return (size_t)qb * k * 8 + (size_t)sort_len * 8 + (size_t)qb * kThreads * 8 + 64 + (size_t)qb * dq * elem;
}

template <int DT, int QB>
cudaError_t launch_score(const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                         int64_t n, int64_t d, int64_t dq, int k, int sort_len, const Plan& plan, uint64_t* partial,
                         cudaStream_t stream) {
  auto kern = score_topk_kernel<DT, QB>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.shared_bytes);
  if (e != cudaSuccess) return e;
  const int64_t rows_per_split = ((n + plan.splits - 1) / plan.splits + kThreads - 1) / kThreads * kThreads;
  dim3 grid((unsigned)((m + QB - 1) / QB), (unsigned)plan.splits);
  kern<<<grid, kThreads, plan.shared_bytes, stream>>>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len,
                                                       rows_per_split, partial);
  return cudaGetLastError();
}

template <int DT>
cudaError_t launch_score_qb(const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                            int64_t n, int64_t d, int64_t dq, int k, int sort_len, const Plan& plan,
                            uint64_t* partial, cudaStream_t stream) {
  switch (plan.queries_per_block) {
    case 8:
      return launch_score<DT, 8>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
    case 4:
      return launch_score<DT, 4>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
    case 2:
      return launch_score<DT, 2>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
    default:
      return launch_score<DT, 1>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
  }
}

}  // namespace

Plan plan_search(int dtype, int64_t m, int64_t n, int64_t d, int k, int num_sms) {
  Plan p;
  if (k < 1 || k > kMaxK || m < 1 || n < 1 || d < 1) {
    p.queries_per_block = 0;
    return p;
  }
  const int64_t dq = (d + 3) / 4 * 4;
  const int sort_len = next_pow2(k + kThreads);
  int qb = 8;
  while (qb > 1 && (qb / 2 >= m || score_shared_bytes(dtype, qb, dq, k, sort_len) > kMaxShared)) qb /= 2;
  if (score_shared_bytes(dtype, qb, dq, k, sort_len) > kMaxShared) {
    p.queries_per_block = 0;  // the dimension is too large for one staged query
    return p;
  }
  p.queries_per_block = qb;
  p.shared_bytes = score_shared_bytes(dtype, qb, dq, k, sort_len);
  const int64_t qblocks = (m + qb - 1) / qb;
  const int64_t want = (2 * (int64_t)(num_sms > 0 ? num_sms : 1) + qblocks - 1) / qblocks;
  const int64_t max_by_merge = kMergeKeys / k > 0 ? kMergeKeys / k : 1;
  const int64_t max_by_rows = (n + kThreads - 1) / kThreads;
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
                  int64_t* out_ids, CUstream_st* stream) {
  if (plan.queries_per_block < 1 || dtype < 0 || dtype > 2) return (int)cudaErrorInvalidValue;
  const int64_t dq = (d + 3) / 4 * 4;
  const int sort_len = next_pow2(k + kThreads);
  uint64_t* partial = static_cast<uint64_t*>(workspace);
  cudaError_t e;
  if (dtype == 0)
    e = launch_score_qb<0>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
  else if (dtype == 1)
    e = launch_score_qb<1>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
  else
    e = launch_score_qb<2>(q, q_scale, x, x_scale, m, n, d, dq, k, sort_len, plan, partial, stream);
  if (e != cudaSuccess) return (int)e;
  const int len = next_pow2(plan.splits * k);
  const size_t shared = (size_t)len * sizeof(uint64_t);
  e = cudaFuncSetAttribute(merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
  if (e != cudaSuccess) return (int)e;
  merge_kernel<<<(unsigned)m, kThreads, shared, stream>>>(partial, m, k, plan.splits, len, out_scores, out_ids);
  return (int)cudaGetLastError();
}

}  // namespace cuda_search
}  // namespace solar
