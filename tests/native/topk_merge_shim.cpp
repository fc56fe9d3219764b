// CPU build of the CUDA search's top-k logic (csrc/search/topk_merge.h) for
// tests/test_search_cuda_logic.py: the same header the kernels include, compiled by g++ into a
// small shared library and called through ctypes.  The block and merge kernels' thread loops
// are replayed sequentially here (one "thread" after another, barriers between phases), in the
// order search_cuda.cu runs them, so that the composition is checked too, not only the pieces.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "search/topk_merge.h"

using namespace solar::topk;

extern "C" {

uint64_t shim_make_key(float s, uint32_t id) { return make_key(s, id); }
float shim_key_score(uint64_t key) { return key_score(key); }
int64_t shim_key_id(uint64_t key) { return key_id(key); }

// out[i] = slot i of the descending merge of a and b, for i < k (k <= na + nb).
void shim_merge(const uint64_t* a, int na, const uint64_t* b, int nb, uint64_t* out, int k) {
  for (int i = 0; i < k; ++i) out[i] = merge_at(a, na, b, nb, i);
}

// One query's pass of score_topk_kernel over the rows [0, n) of one split: rounds of
// round_rows scores; a key above the list's last slot is appended to the candidate buffer
// in a shuffled order (the kernel's atomicAdd order is arbitrary); after the round the
// candidates are rank-sorted and merged into the list by merge path.  out: the k-list.
void shim_block_topk(const float* scores, int64_t n, int k, int round_rows, uint64_t seed, uint64_t* out) {
  std::vector<uint64_t> list(k, 0), cand, sorted, next(k);
  std::mt19937_64 rng(seed);
  for (int64_t base = 0; base < n; base += round_rows) {
    cand.clear();
    const int64_t end = std::min<int64_t>(n, base + round_rows);
    for (int64_t row = base; row < end; ++row) {
      const uint64_t key = make_key(scores[row], (uint32_t)row);
      if (key > list[k - 1]) cand.push_back(key);
    }
    std::shuffle(cand.begin(), cand.end(), rng);
    const int c = (int)cand.size();
    sorted.assign(c, ~0ull);
    for (int t = 0; t < c; ++t) sorted[rank_in_batch(cand.data(), c, t)] = cand[t];
    if (c == 0) continue;
    for (int i = 0; i < k; ++i) next[i] = merge_at(list.data(), k, sorted.data(), c, i);
    list.swap(next);
  }
  std::copy(list.begin(), list.end(), out);
}

// merge_kernel's pairwise merge of `splits` sorted k-lists (lists [splits][k]) into out [k].
void shim_merge_splits(const uint64_t* lists, int splits, int k, uint64_t* out) {
  std::vector<uint64_t> a(lists, lists + (size_t)splits * k), b(a.size());
  for (int n = splits; n > 1; n = (n + 1) / 2) {
    const int pairs = (n + 1) / 2;
    for (int idx = 0; idx < pairs * k; ++idx) {
      const int p = idx / k, i = idx % k;
      const uint64_t* x = a.data() + (size_t)(2 * p) * k;
      b[idx] = (2 * p + 1 < n) ? merge_at(x, k, x + k, k, i) : x[i];
    }
    a.swap(b);
  }
  std::copy(a.begin(), a.begin() + k, out);
}

// The warp reduce-scatter of search_cuda.cu (warp_reduce_scatter) on 32 simulated lanes:
// v [32][P] partials (P = 2^log2p, int64 so that sums are exact); out [32][max(1, P / 32)]
// each lane's results, first [32] the value index its first result belongs to.
void shim_reduce_scatter(const int64_t* v, int log2p, int64_t* out, int* first) {
  const int P = 1 << log2p, S = log2p < 5 ? log2p : 5;
  std::vector<std::vector<int64_t>> lane(32, std::vector<int64_t>(P));
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < P; ++i) lane[l][i] = v[l * P + i];
  for (int s = 0; s < S; ++s) {
    const int off = 16 >> s, half = P >> (s + 1);
    std::vector<std::vector<int64_t>> send(32, std::vector<int64_t>(half));
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < half; ++i) send[l][i] = rs_send(lane[l][i], lane[l][i + half], rs_upper(l, off));
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < half; ++i) lane[l][i] = rs_keep(lane[l][i], lane[l][i + half], rs_upper(l, off)) + send[l ^ off][i];
  }
  for (int off = 16 >> S; off > 0; off >>= 1) {
    std::vector<int64_t> snap(32);
    for (int l = 0; l < 32; ++l) snap[l] = lane[l][0];
    for (int l = 0; l < 32; ++l) lane[l][0] = snap[l] + snap[l ^ off];
  }
  const int per = P > 32 ? P / 32 : 1;
  for (int l = 0; l < 32; ++l) {
    first[l] = rs_first(l, log2p);
    for (int u = 0; u < per; ++u) out[l * per + u] = lane[l][u];
  }
}

}  // extern "C"
