// Torch wrapper of the CUDA top-k search (search_cuda.cu); compiled only into a CUDA build.
#ifdef SOLAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "checks.h"
#include "search/search.h"
#include "search/search_cuda.h"

namespace solar {

std::vector<at::Tensor> search_topk_cuda(const at::Tensor& q, const c10::optional<at::Tensor>& q_scale,
                                         const at::Tensor& x, const c10::optional<at::Tensor>& x_scale,
                                         int64_t k) {
  SOLAR_CHECK_CUDA(q);
  SOLAR_CHECK_DEVICE(x, q.device());
  SOLAR_CHECK_DIM(q, 2);
  SOLAR_CHECK_DIM(x, 2);
  SOLAR_CHECK_CONTIGUOUS(q);
  SOLAR_CHECK_CONTIGUOUS(x);
  const int64_t m = q.size(0), d = q.size(1), n = x.size(0);
  TORCH_CHECK(x.size(1) == d, "q has dimension ", d, " but x has dimension ", x.size(1));
  TORCH_CHECK(n >= 1, "x (the database) is empty");
  TORCH_CHECK(n < (int64_t)0xffffffffLL, "the CUDA search handles fewer than 2^32 rows, got ", n);
  TORCH_CHECK(k >= 1 && k <= n && k <= cuda_search::kMaxK, "k must be in [1, min(", n, ", ",
              cuda_search::kMaxK, ")] on CUDA, got ", k);
  int dtype = 0;
  const float* qs = nullptr;
  const float* xs = nullptr;
  // Owners of the contiguous scale copies: they must outlive the launch (a pointer taken from
  // a temporary `contiguous()` result dangles as soon as the statement ends).
  at::Tensor q_scale_c, x_scale_c;
  switch (x.scalar_type()) {
    case at::kFloat:
      dtype = 0;
      break;
    case at::kHalf:
      dtype = 1;
      break;
    case at::kChar:
      dtype = 2;
      break;
    default:
      TORCH_CHECK(false, "x must be float32, float16 or int8, got ", x.scalar_type());
  }
  if (dtype == 2) {
    SOLAR_CHECK_DTYPE(q, at::kChar);
    TORCH_CHECK(q_scale.has_value() && x_scale.has_value(), "int8 search needs q_scale and x_scale");
    SOLAR_CHECK_DEVICE(*q_scale, q.device());
    SOLAR_CHECK_DEVICE(*x_scale, q.device());
    SOLAR_CHECK_DTYPE(*q_scale, at::kFloat);
    SOLAR_CHECK_DTYPE(*x_scale, at::kFloat);
    SOLAR_CHECK_SHAPE(*q_scale, m);
    SOLAR_CHECK_SHAPE(*x_scale, n);
    q_scale_c = q_scale->contiguous();
    x_scale_c = x_scale->contiguous();
    qs = q_scale_c.data_ptr<float>();
    xs = x_scale_c.data_ptr<float>();
  } else {
    SOLAR_CHECK_DTYPE(q, at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  int sms = 1;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()) == cudaSuccess,
              "cudaDeviceGetAttribute failed");
  const cuda_search::Plan plan = cuda_search::plan_search(dtype, m, n, d, (int)k, sms);
  TORCH_CHECK(plan.queries_per_block > 0, "the CUDA search cannot stage one query of dimension ", d,
              " in shared memory");
  at::Tensor ws = at::empty({(int64_t)plan.workspace_bytes}, q.options().dtype(at::kByte));
  at::Tensor scores = at::empty({m, k}, q.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({m, k}, q.options().dtype(at::kLong));
  at::Tensor unfilled = at::empty({1}, q.options().dtype(at::kInt));
  const int err = cuda_search::launch_search(dtype, q.data_ptr(), qs, x.data_ptr(), xs, m, n, d, (int)k, plan,
                                             ws.data_ptr(), scores.data_ptr<float>(), ids.data_ptr<int64_t>(),
                                             unfilled.data_ptr<int>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "CUDA search failed: ", cudaGetErrorString((cudaError_t)err));
  // The CPU path's contract (search_cpu.cpp): an error, not -inf / -1 slots.  One host sync.
  TORCH_CHECK(unfilled.item<int>() == 0, "search produced fewer than k finite scores: the inner products "
              "overflowed float32 (NaN or -inf scores); rescale the vectors");
  return {scores, ids};
}

}  // namespace solar
#endif  // SOLAR_WITH_CUDA
