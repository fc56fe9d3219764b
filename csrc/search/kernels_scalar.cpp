// Scalar (portable C++) scoring tiles: the fallback when the CPU lacks AVX2, and the
// path the tests force (SOLAR_SEARCH_SIMD=0 / simd=0) to check the SIMD ones against.
#include <cstring>

#include "search/kernels.h"

namespace solar {
namespace search {
namespace {

template <int R, int C>
void tile_f32(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const float* Q = static_cast<const float*>(c.q);
  const float* X = static_cast<const float*>(c.x);
  for (int r = 0; r < R; ++r) {
    const float* q = Q + qi[r] * c.d;
    for (int j = 0; j < C; ++j) {
      const float* x = X + xi[j] * c.d;
      float acc = 0.f;
      for (int64_t p = 0; p < c.d; ++p) acc += q[p] * x[p];
      out[r * C + j] = acc;
    }
  }
}

template <int R, int C>
void tile_f16(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const float* Q = static_cast<const float*>(c.q);
  const uint16_t* X = static_cast<const uint16_t*>(c.x);
  for (int r = 0; r < R; ++r) {
    const float* q = Q + qi[r] * c.d;
    for (int j = 0; j < C; ++j) {
      const uint16_t* x = X + xi[j] * c.d;
      float acc = 0.f;
      for (int64_t p = 0; p < c.d; ++p) acc += q[p] * half_bits_to_float(x[p]);
      out[r * C + j] = acc;
    }
  }
}

template <int R, int C>
void tile_i8(const Ctx& c, const int64_t* qi, const int64_t* xi, float* out) {
  const int8_t* Q = static_cast<const int8_t*>(c.q);
  const int8_t* X = static_cast<const int8_t*>(c.x);
  for (int r = 0; r < R; ++r) {
    const int8_t* q = Q + qi[r] * c.d;
    for (int j = 0; j < C; ++j) {
      const int8_t* x = X + xi[j] * c.d;
      int32_t acc = 0;
      for (int64_t p = 0; p < c.d; ++p) acc += (int32_t)q[p] * (int32_t)x[p];
      // Same two roundings as the reference: (s_x * s_q) then times the exact dot.
      const float scale = c.x_scale[xi[j]] * c.q_scale[qi[r]];
      out[r * C + j] = (float)acc * scale;
    }
  }
}

}  // namespace

Kernel scalar_kernel(DType dt, bool few) {
  switch (dt) {
    case DType::F32:
      return few ? Kernel{1, 4, &tile_f32<1, 4>, "scalar-f32-1x4", 0} : Kernel{2, 4, &tile_f32<2, 4>, "scalar-f32-2x4", 0};
    case DType::F16:
      return few ? Kernel{1, 4, &tile_f16<1, 4>, "scalar-f16-1x4", 0} : Kernel{2, 4, &tile_f16<2, 4>, "scalar-f16-2x4", 0};
    case DType::I8:
      return few ? Kernel{1, 4, &tile_i8<1, 4>, "scalar-i8-1x4", 0} : Kernel{2, 4, &tile_i8<2, 4>, "scalar-i8-2x4", 0};
  }
  return Kernel{};
}

}  // namespace search
}  // namespace solar
