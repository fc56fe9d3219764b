// Argument checks shared by every op (one header, as in flash-attention's CHECK_* macros).
// Each failure names the argument, what came and what was expected.
#pragma once
#include <torch/extension.h>

#define SOLAR_CHECK_DEVICE(x, dev)                                                          \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got a tensor on ", (x).device())
#define SOLAR_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define SOLAR_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define SOLAR_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define SOLAR_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())
#define SOLAR_CHECK_SHAPE(x, ...)                                                           \
  TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}), #x " must have shape (",   \
              #__VA_ARGS__, "), got ", (x).sizes())
#define SOLAR_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
