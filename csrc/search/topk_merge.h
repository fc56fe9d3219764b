// Top-k bookkeeping of the CUDA search (search_cuda.cu), written once as __host__ __device__
// functions so that the same code is compiled by nvcc into the kernels and by g++ into
// tests/native/topk_merge_shim.cpp, where tests/test_search_cuda_logic.py checks it on CPU
// against a sorted reference.
//
// Keys: a (score, row id) pair becomes one 64-bit key, order-preserving float bits << 32 |
// (2^32 - 1 - id), so that one unsigned compare orders by score descending, then id ascending
// (the CPU path's tie rule: the lower id wins), and keys of distinct rows are distinct.
// Key 0 is "empty": every admissible key is larger.  Scores the CPU path never admits
// (NaN, -inf: its threshold starts at -inf and needs score > threshold) map to key 0, and
// -0.0 maps to the key of +0.0 (the CPU compares them equal, so they tie by id).
//
// Lists are sorted descending.  A merge of the running top-k list `a` and a sorted batch of
// candidates `b` computes each output slot independently (merge path: the co-rank of slot i
// by binary search), so a block merges with one pass over k slots and no sort of a + b.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SOLAR_HD __host__ __device__ __forceinline__
#else
#define SOLAR_HD inline
#endif

namespace solar {
namespace topk {

SOLAR_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}

SOLAR_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

// Larger key = better.  0 for a score that can never enter a top-k list (NaN, -inf).
SOLAR_HD uint64_t make_key(float s, uint32_t id) {
  uint32_t b = float_bits(s);
  if ((b & 0x7fffffffu) > 0x7f800000u || b == 0xff800000u) return 0;  // NaN, -inf
  if (b == 0x80000000u) b = 0;                                          // -0.0 ties with +0.0
  const uint32_t o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ((uint64_t)o << 32) | (uint64_t)(0xffffffffu - id);
}

SOLAR_HD float key_score(uint64_t key) {
  const uint32_t o = (uint32_t)(key >> 32);
  return bits_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

SOLAR_HD int64_t key_id(uint64_t key) { return key ? (int64_t)(0xffffffffu - (uint32_t)key) : (int64_t)-1; }

// Number of elements of a[0..n) (sorted descending) that are greater than `key`.
SOLAR_HD int count_greater(const uint64_t* a, int n, uint64_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Position of b[t] in b[0..n) sorted descending, for keys that are distinct except the
// empty key 0 (equal keys are ordered by their index: the positions are a permutation).
SOLAR_HD int rank_in_batch(const uint64_t* b, int n, int t) {
  const uint64_t key = b[t];
  int r = 0;
  for (int u = 0; u < n; ++u) r += (b[u] > key) || (b[u] == key && u < t);
  return r;
}

// Of the first i slots of the descending merge of a[0..na) and b[0..nb) (a's element first
// on equal keys), how many come from a.  0 <= i <= na + nb.
SOLAR_HD int merge_corank(const uint64_t* a, int na, const uint64_t* b, int nb, int i) {
  int lo = i > nb ? i - nb : 0;
  int hi = i < na ? i : na;
  // smallest x in [lo, hi] with: x == na, or i - x == 0, or a[x] < b[i - x - 1]
  while (lo < hi) {
    const int x = (lo + hi) >> 1;
    if (a[x] < b[i - x - 1]) hi = x;
    else lo = x + 1;
  }
  return lo;
}

// Slot i (0 <= i < na + nb) of the descending merge of a and b.
SOLAR_HD uint64_t merge_at(const uint64_t* a, int na, const uint64_t* b, int nb, int i) {
  const int x = merge_corank(a, na, b, nb, i);
  const int y = i - x;
  if (x >= na) return b[y];
  if (y >= nb) return a[x];
  return a[x] >= b[y] ? a[x] : b[y];
}

// Warp reduce-scatter of P = 2^LOG2P partial sums per lane (32 lanes): at each stage a lane
// keeps one half of its values and sends the other half to the lane `off` apart, which keeps
// the opposite half; after LOG2P stages (off = 16, 8, ...) each lane holds one value, summed
// over 2^LOG2P lanes, and the remaining 5 - LOG2P xor-stages sum it over all 32.  With
// P > 32 the five stages leave P / 32 values per lane.  Lane l then holds the full sums of
// value indices rs_first(l, LOG2P) + [0, max(1, P / 32)).  These are the per-stage pieces; the
// shuffle itself is in the kernel (and simulated lane by lane in the CPU test).
SOLAR_HD bool rs_upper(int lane, int off) { return (lane & off) != 0; }
// lo = v[i], hi = v[i + half] of a stage that halves the values; values, not a pointer, so
// that the kernel's unrolled loop selects registers (a selected address would put the
// accumulators in local memory).
template <class T>
SOLAR_HD T rs_send(T lo, T hi, bool upper) { return upper ? lo : hi; }
template <class T>
SOLAR_HD T rs_keep(T lo, T hi, bool upper) { return upper ? hi : lo; }
SOLAR_HD int rs_first(int lane, int log2p) { return log2p <= 5 ? lane >> (5 - log2p) : lane << (log2p - 5); }

}  // namespace topk
}  // namespace solar
