// All Python bindings of solar_kernels._C live here; each op's folder exposes a header.
#include <torch/extension.h>

#include "cpu_features.h"

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
}
