// Exact top-k inner-product search over fp32 / fp16 / int8 rows (solar_kernels.search).
//
// CPU: C++/OpenMP driver (search_cpu.cpp) over SIMD micro-kernels chosen at run time
// (kernels_x86.cpp, scalar fallback in kernels_scalar.cpp).
// CUDA: fused scoring + per-query top-k kernel (search_cuda.cu), bound through
// search_cuda_bind.cpp only when the extension is built with SOLAR_WITH_CUDA.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace solar {

// Top-k of q . x over all rows of x, best first, ties broken by the lower row id.
//   q        fp32 [m, d] for fp32/fp16 rows; int8 codes [m, d] for int8 rows
//   q_scale  int8 only: fp32 [m] query scales (score = dot * (x_scale * q_scale))
//   x        fp32 / fp16 / int8 [n, d], contiguous
//   x_scale  int8 only: fp32 [n];  x_sum: int8 only, int32 [n] row sums of the codes
//   simd     -1 best available, 0 scalar, 1 AVX2, 2 AVX-512 (clamped to the CPU)
//   strategy -1 auto, 0 split the queries across threads, 1 split the rows and merge
//   num_threads <= 0: torch's intra-op thread count
// Returns {scores fp32 [m, k], ids int64 [m, k]}.
std::vector<at::Tensor> search_topk_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& q_scale,
                                        const at::Tensor& x, const c10::optional<at::Tensor>& x_scale,
                                        const c10::optional<at::Tensor>& x_sum, int64_t k, int64_t simd,
                                        int64_t strategy, int64_t num_threads);

// Per-row symmetric int8 quantisation of fp32 rows [n, d]: scale = max|x| / 127 (fp32),
// codes = round-half-even(x / scale) clamped to [-127, 127]; an all-zero row gets scale 0
// and zero codes; a row with a NaN gets scale NaN and zero codes.  Bit-identical to the
// torch expression in solar_kernels.reference (true division, not a reciprocal).
// Returns {codes int8 [n, d], scales fp32 [n]}.
std::vector<at::Tensor> quantize_int8_cpu(const at::Tensor& x);

// Which SIMD level and micro-kernel a search would use (for tests and `info`).
int64_t search_simd_level(int64_t requested);
std::string search_kernel_name(int64_t dtype, int64_t simd, int64_t m);

#ifdef SOLAR_WITH_CUDA
// Same contract on CUDA tensors (search_cuda_bind.cpp); k <= 1024.
std::vector<at::Tensor> search_topk_cuda(const at::Tensor& q, const c10::optional<at::Tensor>& q_scale,
                                         const at::Tensor& x, const c10::optional<at::Tensor>& x_scale,
                                         int64_t k);
#endif

}  // namespace solar
