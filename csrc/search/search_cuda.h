// Raw-pointer interface of the CUDA top-k search kernels (search_cuda.cu).  Nothing here
// needs torch, so the .cu file compiles with nvcc alone; search_cuda_bind.cpp wraps it
// for torch tensors when the extension is built with SOLAR_WITH_CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

struct CUstream_st;

namespace solar {
namespace cuda_search {

constexpr int kMaxK = 1024;

// Launch plan: how many row splits, queries per block, and the workspace they need.
struct Plan {
  int splits = 1;           // row ranges scored by separate blocks, merged by the second kernel
  int queries_per_block = 1;  // 1, 2, 4, 8 or 16
  size_t shared_bytes = 0;  // dynamic shared memory of the scoring kernel
  size_t workspace_bytes = 0;
};

// dtype: 0 fp32 rows, 1 fp16 rows (IEEE bits), 2 int8 codes (then q is int8 codes and
// q_scale / x_scale are the per-vector scales).  Queries q are fp32 [m, d] for dtypes 0/1.
Plan plan_search(int dtype, int64_t m, int64_t n, int64_t d, int k, int num_sms);

// Scores every row against every query and writes the top-k of each query, best first
// (score desc, id asc; NaN and -inf scores are never returned, as on the CPU), into
// out_scores [m, k] fp32 and out_ids [m, k] int64.  *unfilled (device memory) is set to 1
// when some query had fewer than k admissible scores (its last slots hold -inf / id -1), else 0.
// `workspace` must hold plan.workspace_bytes.  Returns 0 or a cudaError_t value.
int launch_search(int dtype, const void* q, const float* q_scale, const void* x, const float* x_scale, int64_t m,
                  int64_t n, int64_t d, int k, const Plan& plan, void* workspace, float* out_scores,
                  int64_t* out_ids, int* unfilled, CUstream_st* stream);

}  // namespace cuda_search
}  // namespace solar
