// 2x2 max pooling with stride 2 of channels-last activations on the CPU, for any channel count.
//
// Why: PyTorch's channels-last max pool vectorises along the channels and runs the remainder of a
// count that is not a multiple of the vector width as scalar code per pixel (10 channels at 32x32
// take longer than 16). Here every pixel's C channels are handled in whole 16-lane blocks: a block
// that runs past the pixel's channels reads the next pixel's values and writes garbage into the
// next output pixel's slots, which the next pixel's own (later) store overwrites. The last pixels
// of the tensor, whose blocks would run past its end, take a scalar loop. Even H and W only (each
// input pixel in exactly one window); odd sizes stay with PyTorch. Semantics: F.max_pool2d(x, 2)
// (a NaN wins, ties go to the first of the window in row-major order); the backward routes each
// gradient to its window's maximum, recorded as a code 0-3 per output element.
// Semantics and the module: attenuation/max_pool.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "channels_last_loops.h"

namespace attenuation {
namespace {

constexpr int64_t kLanes = 16;

// Stores a value read by `load` back exactly (for bfloat16 its top 16 bits: the value was one).
ATTENUATION_INLINE void store_exact(float* p, int64_t i, float v) { p[i] = v; }
ATTENUATION_INLINE void store_exact(double* p, int64_t i, double v) { p[i] = v; }
ATTENUATION_INLINE void store_exact(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
ATTENUATION_INLINE void store_exact(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint16_t half = static_cast<uint16_t>(bits >> 16);
  std::memcpy(p + i, &half, sizeof(half));
}

// One output element: the maximum of the window's four values in row-major order, as F.max_pool2d
// takes it (a later value wins when greater or NaN), and its code (0: top left, 1: top right,
// 2: bottom left, 3: bottom right).
template <typename T>
ATTENUATION_INLINE void window(const T* top, const T* bottom, int64_t C, int64_t k, T* out, uint8_t* code) {
  const auto a = load(top, k), b = load(top, k + C), c = load(bottom, k), d = load(bottom, k + C);
  auto best = a;
  uint8_t at = 0;
  const bool take_b = b > best || b != b;
  best = take_b ? b : best;
  at = take_b ? 1 : at;
  const bool take_c = c > best || c != c;
  best = take_c ? c : best;
  at = take_c ? 2 : at;
  const bool take_d = d > best || d != d;
  best = take_d ? d : best;
  at = take_d ? 3 : at;
  store_exact(out, 0, best);
  *code = at;
}

// Output pixels [p0, p1) of an (N * Ho) x Wo grid; `safe` pixels (all but the last few) are done in
// whole blocks of kLanes channels.
template <typename T>
ATTENUATION_INLINE void pool_pixels(const T* x, T* y, uint8_t* codes, int64_t rows, int64_t Wo, int64_t C,
                                         int64_t safe) {
  const int64_t W = 2 * Wo, blocks = (C + kLanes - 1) / kLanes;
  const int64_t total = rows * Wo;
  for (int64_t p = 0; p < total; ++p) {
    const int64_t r = p / Wo, j = p % Wo;
    const T* top = x + (2 * r * W + 2 * j) * C;
    const T* bottom = top + W * C;
    T* out = y + p * C;
    uint8_t* code = codes + p * C;
    if (p < safe) {
      for (int64_t b = 0; b < blocks; ++b) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) window(top, bottom, C, b * kLanes + l, out + b * kLanes + l, code + b * kLanes + l);
      }
    } else {
      for (int64_t k = 0; k < C; ++k) window(top, bottom, C, k, out + k, code + k);
    }
  }
}

// grad_x from grad_out and the codes, moving raw elements (a float zero is all zero bits); the
// same blocks (a block's spill into the next pixel is overwritten by that pixel's own later
// store: within an output row the top input row is written first, each window's left pixel
// before its right one).
// All ones where the gradient goes to this position, else zero: a mask, not a branch (the codes
// are as random as the data, and a branch per element mispredicts half the time).
template <typename U>
ATTENUATION_INLINE U routed(uint8_t code, uint8_t position) {
  return static_cast<U>(U{0} - static_cast<U>(code == position));
}

template <typename U>
ATTENUATION_INLINE void unpool_pixels(const U* g, const uint8_t* codes, U* dx, int64_t rows, int64_t Wo,
                                           int64_t C, int64_t safe) {
  const int64_t W = 2 * Wo, blocks = (C + kLanes - 1) / kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t half = 0; half < 2; ++half) {  // the windows' top row, then their bottom row
      const uint8_t code_left = static_cast<uint8_t>(2 * half), code_right = static_cast<uint8_t>(2 * half + 1);
      for (int64_t j = 0; j < Wo; ++j) {
        const int64_t p = r * Wo + j;
        const U* grad = g + p * C;
        const uint8_t* code = codes + p * C;
        U* left = dx + ((2 * r + half) * W + 2 * j) * C;
        U* right = left + C;
        if (p < safe) {
          // the left pixel's last block spills into the right pixel: all of the left one first
          for (int64_t k0 = 0; k0 < blocks * kLanes; k0 += kLanes) {
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) left[k0 + l] = grad[k0 + l] & routed<U>(code[k0 + l], code_left);
          }
          for (int64_t k0 = 0; k0 < blocks * kLanes; k0 += kLanes) {
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) right[k0 + l] = grad[k0 + l] & routed<U>(code[k0 + l], code_right);
          }
        } else {
          for (int64_t k = 0; k < C; ++k) {
            left[k] = grad[k] & routed<U>(code[k], code_left);
            right[k] = grad[k] & routed<U>(code[k], code_right);
          }
        }
      }
    }
  }
}

ATTENUATION_ISA_CLONES void pool_pass(at::ScalarType type, const void* x, void* y, uint8_t* codes, int64_t rows,
                                       int64_t Wo, int64_t C, int64_t safe) {
  ATTENUATION_BY_FLOATING_TYPE(type, T, pool_pixels(static_cast<const T*>(x), static_cast<T*>(y), codes, rows, Wo, C, safe))
}

ATTENUATION_ISA_CLONES void unpool_pass(int64_t element_size, const void* g, const uint8_t* codes, void* dx,
                                         int64_t rows, int64_t Wo, int64_t C, int64_t safe) {
  switch (element_size) {
    case 2: return unpool_pixels(static_cast<const uint16_t*>(g), codes, static_cast<uint16_t*>(dx), rows, Wo, C, safe);
    case 4: return unpool_pixels(static_cast<const uint32_t*>(g), codes, static_cast<uint32_t*>(dx), rows, Wo, C, safe);
    case 8: return unpool_pixels(static_cast<const uint64_t*>(g), codes, static_cast<uint64_t*>(dx), rows, Wo, C, safe);
    default: break;
  }
}

// Output pixels whose blocks stay inside every buffer: a block of pixel p reaches kLanes * blocks
// elements from the pixel's start in the output, the codes and (twice as far apart) the input.
int64_t safe_pixels(int64_t total, int64_t C) {
  const int64_t reach = (C + kLanes - 1) / kLanes * kLanes;  // elements a pixel's blocks touch
  const int64_t over = reach - C;                             // past its own C
  if (over == 0) return total;
  const int64_t spill_pixels = (over + C - 1) / C;             // pixels at the end that would run past it
  return std::max<int64_t>(0, total - spill_pixels);
}

}  // namespace

// (out, codes): out = F.max_pool2d(x, 2); codes (uint8, channels-last like out) name each
// output's window position (0-3), for the backward.
std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x) {
  constexpr const char* op = "max_pool2x2";
  check_channels_last(op, "x", x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0 && H > 0 && W > 0, op, ": H and W must be even and positive, got ", H,
              "x", W);
  const auto layout = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, layout);
  at::Tensor codes = at::empty({N, C, H / 2, W / 2}, layout.dtype(at::kByte));
  const int64_t rows = N * (H / 2), Wo = W / 2;
  if (out.numel() > 0) {
    pool_pass(x.scalar_type(), x.const_data_ptr(), out.data_ptr(), codes.data_ptr<uint8_t>(), rows, Wo, C,
              safe_pixels(rows * Wo, C));
  }
  return {out, codes};
}

// grad_x of max_pool2x2 from grad_out and the codes it returned (x's sizes given).
at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& codes_in, at::IntArrayRef x_size) {
  constexpr const char* op = "max_pool2x2_backward";
  TORCH_CHECK(x_size.size() == 4 && x_size[2] % 2 == 0 && x_size[3] % 2 == 0, op,
              ": x_size must be 4 sizes (N, C, H, W) with H and W even, got ", x_size);
  const int64_t N = x_size[0], C = x_size[1], H = x_size[2], W = x_size[3];
  const std::vector<int64_t> out_size = {N, C, H / 2, W / 2};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_size) && codes_in.sizes() == at::IntArrayRef(out_size), op,
              ": grad_out and codes must have size ", at::IntArrayRef(out_size), ", got ", grad_out_in.sizes(), " and ",
              codes_in.sizes());
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes_in.scalar_type());
  const at::Tensor grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor codes = codes_in.contiguous(at::MemoryFormat::ChannelsLast);
  check_channels_last(op, "grad_out", grad_out);
  at::Tensor grad_x = at::empty(x_size, grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t rows = N * (H / 2), Wo = W / 2;
  if (grad_x.numel() > 0) {
    unpool_pass(grad_out.element_size(), grad_out.const_data_ptr(), codes.const_data_ptr<uint8_t>(), grad_x.data_ptr(),
                rows, Wo, C, safe_pixels(rows * Wo, C));
  }
  return grad_x;
}

TORCH_LIBRARY_IMPL(attenuation, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace attenuation
