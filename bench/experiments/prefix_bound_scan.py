"""Experiment (not part of the library): can an exact one-query int8 scan read fewer bytes?

The m = 1 int8 scan reads every code once, so it runs at the machine's read bandwidth
(bench_search's read_floor_int8 row).  This experiment tests the one exact way we found to
read less: split each code x into a prefix of `bits` high bits P = x & ~(2^(8-bits) - 1) and a
residual r = x - P in [0, 2^(8-bits) - 1].  Pass 1 reads only the prefix planes and bounds
the full dot product from above with Cauchy-Schwarz:

    q.x = q.P + (2^(8-bits) - 1)/2 * sum(q) + q.(r - c)  <=  q.P + c sum(q) + ||q|| ||r - c||

(||r - c|| stored per row).  Rows whose bound is below the running k-th best score are skipped;
the others are scored exactly (here from the full codes), so the result is the exact int8
top-k (checked against solar_kernels.Index below: same ids, same scores).

    python bench/experiments/prefix_bound_scan.py --bits 5      # N = 1M, d = 768 (AVX-512 VNNI)

Prefix planes: bits 4 = one nibble plane (d/2 bytes per row); bits 5 = the nibble plane plus
one bit plane (d/8 bytes per row).  Results are in bench/RESULTS.md ("m = 1 read floor").
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

CPP = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>

// H: u8 [n, d/2] high nibbles (block of 128 dims: byte i = nibble of dim i (high) | dim i+64 (low));
// M: u8 [n, d/8] bit 3 of each code (per block: 64-bit mask of dims 0..63, then 64..127), or empty
// for a 4-bit prefix; X: int8 [n, d] codes (the exact pass); psum / xsum: int32 [n] sums of the
// prefixes / codes; rho: fp32 [n] ||r - c|| rounded up; xs: fp32 [n] scales; qp = q + 128 (u8).
std::vector<at::Tensor> scan(at::Tensor H, at::Tensor M, at::Tensor X, at::Tensor psum_t, at::Tensor xsum_t,
                             at::Tensor rho_t, at::Tensor xs_t, at::Tensor qp_t, at::Tensor qc_t, double qscale,
                             int64_t k, int64_t parts, bool prune) {
  const int64_t n = H.size(0), d = X.size(1), nb = d / 128;
  const bool five = M.numel() > 0;
  const uint8_t *h = H.data_ptr<uint8_t>(), *mk = five ? M.data_ptr<uint8_t>() : nullptr, *q = qp_t.data_ptr<uint8_t>();
  const int8_t *x = X.data_ptr<int8_t>(), *qc = qc_t.data_ptr<int8_t>();
  const int32_t *psum = psum_t.data_ptr<int32_t>(), *xsum = xsum_t.data_ptr<int32_t>();
  const float *rho = rho_t.data_ptr<float>(), *xs = xs_t.data_ptr<float>();
  double sq = 0, qn = 0;
  for (int64_t p = 0; p < d; ++p) { sq += qc[p]; qn += (double)qc[p] * qc[p]; }
  const double c1 = (five ? 3.5 : 7.5) * sq, c2 = std::sqrt(qn) * (1 + 1e-12);
  const float qs = (float)qscale;
  std::vector<float> hs(parts * k, -INFINITY);
  std::vector<int64_t> hid(parts * k, -1);
  int64_t exact_rows = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : exact_rows)
  for (int64_t part = 0; part < parts; ++part) {
    float* S = hs.data() + part * k;  // ascending; S[0] is the threshold
    int64_t* I = hid.data() + part * k;
    float thr = -INFINITY;
    const __m512i mhi = _mm512_set1_epi8((char)0xF0), e8 = _mm512_set1_epi8(8);
    for (int64_t r = part * n / parts; r < (part + 1) * n / parts; ++r) {
      const float scale = xs[r] * qs;
      if (prune) {
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        for (int64_t b = 0; b < nb; ++b) {
          const __m512i v = _mm512_loadu_si512(h + r * (d / 2) + 64 * b);
          __m512i p0 = _mm512_and_si512(v, mhi), p1 = _mm512_and_si512(_mm512_slli_epi16(v, 4), mhi);
          if (five) {
            uint64_t m0, m1;
            std::memcpy(&m0, mk + r * (d / 8) + 16 * b, 8);
            std::memcpy(&m1, mk + r * (d / 8) + 16 * b + 8, 8);
            p0 = _mm512_mask_add_epi8(p0, (__mmask64)m0, p0, e8);
            p1 = _mm512_mask_add_epi8(p1, (__mmask64)m1, p1, e8);
          }
          a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(q + 128 * b), p0);
          a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(q + 128 * b + 64), p1);
        }
        const double A = (double)_mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1)) - 128.0 * psum[r];
        const double ub = (A + c1 + c2 * rho[r]) * (double)scale;
        if (ub + 1e-6 * std::fabs(ub) < thr) continue;
      }
      ++exact_rows;
      __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
      for (int64_t p = 0; p < d; p += 128) {
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(q + p), _mm512_loadu_si512(x + r * d + p));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(q + p + 64), _mm512_loadu_si512(x + r * d + p + 64));
      }
      const float v = (float)(_mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1)) - 128 * xsum[r]) * scale;
      if (v > thr) {
        int64_t i = 0;
        for (; i + 1 < k && S[i + 1] < v; ++i) { S[i] = S[i + 1]; I[i] = I[i + 1]; }
        S[i] = v; I[i] = r; thr = S[0];
      }
    }
  }
  std::vector<std::pair<float, int64_t>> all;
  for (int64_t i = 0; i < parts * k; ++i) all.emplace_back(hs[i], hid[i]);
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  at::Tensor s = at::empty({k}, at::kFloat), id = at::empty({k}, at::kLong);
  for (int64_t i = 0; i < k; ++i) { s[i] = all[i].first; id[i] = all[i].second; }
  return {s, id, at::scalar_tensor(exact_rows, at::kLong)};
}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=5, choices=[4, 5])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    import faiss
    from torch.utils.cpp_extension import load_inline

    from solar_kernels import Index
    from solar_kernels.search import quantize_int8

    ext = load_inline("prefix_bound_scan", CPP, functions=["scan"], verbose=False,
                      extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni"],
                      extra_ldflags=["-fopenmp"])
    n, d, k = args.n, 768, 10
    g = torch.Generator().manual_seed(0)
    x = torch.empty(n, d)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x[s:e] = torch.nn.functional.normalize(torch.randn(e - s, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(16, d, generator=g), dim=1)
    sq8 = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq8.train(x[:100_000].numpy())
    sq8.add(x.numpy())
    idx = Index(d, dtype="int8")
    idx.add(x)
    del x
    codes, scales = quantize_int8(idx.reconstruct())  # the index's own codes (re-quantising them is exact)
    cu = codes.view(torch.uint8)
    u = cu.reshape(n, d // 128, 2, 64)
    H = ((u[:, :, 0] & 0xF0) | (u[:, :, 1] >> 4)).reshape(n, d // 2).contiguous()
    keep = 0xF8 if args.bits == 5 else 0xF0
    if args.bits == 5:
        bit = ((u >> 3) & 1).reshape(n, d // 128, 2, 8, 8).to(torch.int32)
        M = (bit << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8).reshape(n, d // 8).contiguous()
    else:
        M = torch.empty(0, dtype=torch.uint8)
    psum = (cu & keep).view(torch.int8).to(torch.int32).sum(1).to(torch.int32)
    xsum = codes.to(torch.int32).sum(1).to(torch.int32)
    c = 3.5 if args.bits == 5 else 7.5
    rho = ((cu & (0xFF ^ keep)).double() - c).pow(2).sum(1).sqrt().float()
    rho = torch.nextafter(rho, torch.full_like(rho, float("inf")))
    qs = []
    for i in range(16):
        qc, qsc = quantize_int8(q[i : i + 1])
        qs.append(((qc.to(torch.int16) + 128).to(torch.uint8).reshape(-1), qc.reshape(-1), float(qsc[0])))
    parts = 4 * torch.get_num_threads()

    def run(i, prune=True):
        return ext.scan(H, M, codes, psum, xsum, rho, scales, *qs[i % 16], k, parts, prune)

    frac = []
    for i in range(16):
        s, ids, ex = run(i)
        s2, ids2 = idx.search(q[i : i + 1], k)
        assert torch.equal(ids, ids2[0]) and torch.equal(s, s2[0]), f"query {i}: not the exact int8 top-k"
        frac.append(int(ex) / n)

    def t(fn):
        fn(0)
        ts = []
        for i in range(args.reps):
            a = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - a)
        return float(np.median(ts))

    words = codes.reshape(-1).view(torch.int64)
    res = {
        "faiss QT_8bit": t(lambda i: sq8.search(q[i % 16 : i % 16 + 1].numpy(), k)),
        "solar int8 (today)": t(lambda i: idx.search(q[i % 16 : i % 16 + 1], k)),
        f"{args.bits}-bit prefix bound scan": t(lambda i: run(i)),
        "read floor (amax over the codes)": t(lambda i: words.amax()),
    }
    print(f"N={n} d={d} k={k}, {torch.get_num_threads()} threads; 16 queries: exact int8 top-k in all; "
          f"rows scored exactly after the bound: {100 * np.mean(frac):.1f}% (min {100 * min(frac):.1f}, "
          f"max {100 * max(frac):.1f})")
    base = res["faiss QT_8bit"]
    for name, sec in res.items():
        print(f"  {name:<34} {sec * 1e3:8.2f} ms   QT_8bit / this = {base / sec:5.2f}x")


if __name__ == "__main__":
    main()
