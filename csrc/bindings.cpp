// All Python bindings of solar_kernels._C live here; each op's folder exposes a header.
#include <torch/extension.h>

#include "cpu_features.h"
#include "search/search.h"
#include "pool/pool.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "solar_kernels native ops (C++/OpenMP, optional CUDA)";
#ifdef SOLAR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_features", &solar::cpu_feature_names, "CPU SIMD features detected at run time");
  m.def("omp_max_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });

  // --- ops: each helper adds its section below ------------------------------------------

  // masked_pool (csrc/pool): {out [V,B,D] f32, aux [2,V,B] f32} and {grad_x, grad_mask}
  m.def("masked_pool_forward_cpu", &solar::masked_pool_forward_cpu, "masked_pool forward (CPU)", py::arg("x"),
        py::arg("mask"), py::arg("normalize"), py::arg("eps"));
  m.def("masked_pool_backward_cpu", &solar::masked_pool_backward_cpu, "masked_pool backward (CPU)",
        py::arg("grad_out"), py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("aux"), py::arg("normalize"),
        py::arg("eps"), py::arg("need_mask_grad"));
  m.def("masked_pool_grad_cache_mb", &solar::masked_pool_grad_cache_mb,
        "cap (MiB) of recycled masked_pool grad_x buffers; returns the previous cap (negative: only read)",
        py::arg("max_mb"));

  // search (csrc/search): exact top-k inner-product search, {scores [m,k] f32, ids [m,k] i64}
  m.def("search_topk_cpu", &solar::search_topk_cpu, "exact top-k search (CPU)", py::arg("q"), py::arg("q_scale"),
        py::arg("x"), py::arg("x_scale"), py::arg("x_sum"), py::arg("k"), py::arg("simd") = -1,
        py::arg("strategy") = -1, py::arg("num_threads") = 0);
  m.def("quantize_int8_cpu", &solar::quantize_int8_cpu, "per-row symmetric int8 quantisation (CPU)", py::arg("x"));
  m.def("search_simd_level", &solar::search_simd_level, "SIMD level a search would use", py::arg("requested") = -1);
  m.def("search_kernel_name", &solar::search_kernel_name, "micro-kernel a search would use", py::arg("dtype"),
        py::arg("simd"), py::arg("m"));
#ifdef SOLAR_WITH_CUDA
  m.def("search_topk_cuda", &solar::search_topk_cuda, "exact top-k search (CUDA)", py::arg("q"), py::arg("q_scale"),
        py::arg("x"), py::arg("x_scale"), py::arg("k"));
#endif
}
