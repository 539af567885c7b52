// What the CPU passes over channels-last activations share (csrc/cpu/batch_norm.cpp, max_pool.cpp):
// loops compiled for AVX-512, AVX2 and baseline x86-64 and chosen at load time, element loads that
// vectorise for every floating dtype, the dispatch over those dtypes, and the input check.
#pragma once

#include <ATen/ATen.h>

#include <cstring>

namespace attenuation {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ATTENUATION_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTENUATION_ISA_CLONES
#endif
#define ATTENUATION_INLINE inline __attribute__((always_inline))

// An element as float (double for double tensors); bfloat16 by bit operations, so that loops vectorise.
ATTENUATION_INLINE float load(const float* p, int64_t i) { return p[i]; }
ATTENUATION_INLINE double load(const double* p, int64_t i) { return p[i]; }
ATTENUATION_INLINE float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
ATTENUATION_INLINE float load(const c10::BFloat16* p, int64_t i) {
  uint16_t half;
  std::memcpy(&half, p + i, sizeof(half));
  const uint32_t bits = uint32_t{half} << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Runs the statement with T the element type of `type` (one of the four floating dtypes).
#define ATTENUATION_BY_FLOATING_TYPE(type, T, ...)                                             \
  switch (type) {                                                                              \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                                  \
    case at::kDouble: { using T = double; __VA_ARGS__; break; }                                \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__; break; }                               \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__; break; }                       \
    default: break;                                                                            \
  }

// A 4-D channels-last contiguous tensor of one of the four floating dtypes, or a TORCH_CHECK error
// that names it.
inline void check_channels_last(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), " dimensions");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
              " must be channels-last contiguous (x.contiguous(memory_format=torch.channels_last))");
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", type);
}

}  // namespace attenuation
