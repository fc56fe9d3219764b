// masked_pool on CPU: weighted mean of token rows under V masks, one pass over x.
//
//   out[v, b] = sum_l w[v, b, l] x[b, l] / sum_l w[v, b, l]   (0 when the sum is 0)
//   normalize: out[v, b] /= max(||out[v, b]||, eps)
//
// Shapes: x [B, L, D] float32/float16/bfloat16 (any strides for B and L; a non-unit D
// stride is made contiguous), mask [V, B, L] bool or float (any strides),
// out [V, B, D] float32, aux [2, V, B] float32 (mask sums, norms of the mean rows).
// The Python side (solar_kernels/ops/masked_pool.py) documents the backward formulas.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace solar {

// Returns {out [V, B, D] float32, aux [2, V, B] float32}.
std::vector<at::Tensor> masked_pool_forward_cpu(const at::Tensor& x, const at::Tensor& mask, bool normalize,
                                                double eps);

// Returns {grad_x [B, L, D] in x's dtype, grad_mask [V, B, L] float32 (empty when not needed)}.
std::vector<at::Tensor> masked_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& mask, const at::Tensor& out,
                                                 const at::Tensor& aux, bool normalize, double eps,
                                                 bool need_mask_grad);

// Byte cap (MiB) of the recycled grad_x buffers (see pool_cpu.cpp); returns the previous cap.
// max_mb < 0 only reads it.
int64_t masked_pool_grad_cache_mb(int64_t max_mb);

}  // namespace solar
