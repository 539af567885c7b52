// The channel gathers of the masked convolution on the CPU (semantics in attenuation/ops.h).
// Activations move as raw elements (dtype-agnostic copies): whole H*W planes in NCHW, runs of
// channels per pixel in channels-last. Weights are small and go through their strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "attenuation/ops.h"

namespace attenuation {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk, at least

template <typename Fn>
void with_element_type(int64_t size, const Fn& fn) {
  switch (size) {
    case 1: return fn(uint8_t{});
    case 2: return fn(uint16_t{});
    case 4: return fn(uint32_t{});
    case 8: return fn(uint64_t{});
    default: TORCH_CHECK(false, "masked_conv2d: unsupported element size ", size);
  }
}

// Position of each of the n channels in the compact tensor, -1 for dead ones.
std::vector<int64_t> compact_positions(const at::Tensor& index, int64_t n) {
  std::vector<int64_t> pos(n, -1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) pos[idx[j]] = j;
  return pos;
}

}  // namespace

at::Tensor gather_channels_cpu(const at::Tensor& x, const at::Tensor& index_in) {
  // Reads x through its strides (an expanded gradient is never materialised); writes the compact
  // tensor in x's suggested memory format.
  const auto format = x.suggest_memory_format();
  const at::Tensor index = index_in.contiguous();
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), P = H * W, m = index.numel();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  at::Tensor out = at::empty({N, m, H, W}, x.options().memory_format(format));
  const int64_t* idx = index.const_data_ptr<int64_t>();
  with_element_type(x.element_size(), [&](auto zero) {
    using T = decltype(zero);
    const T* src = static_cast<const T*>(x.const_data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    if (format == at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, N * P, std::max<int64_t>(1, kGrain / std::max<int64_t>(m, 1)), [&](int64_t b, int64_t e) {
        for (int64_t q = b; q < e; ++q) {
          const int64_t n = q / P, h = (q % P) / W, w = q % W;
          const T* s = src + n * sN + h * sH + w * sW;
          T* d = dst + q * m;
          for (int64_t j = 0; j < m; ++j) d[j] = s[idx[j] * sC];
        }
      });
    } else {
      const bool dense_planes = sW == 1 && sH == W;
      at::parallel_for(0, N * m, std::max<int64_t>(1, kGrain / std::max<int64_t>(P, 1)), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const T* s = src + (r / m) * sN + idx[r % m] * sC;
          T* d = dst + r * P;
          if (dense_planes) {
            std::memcpy(d, s, P * sizeof(T));
          } else {
            for (int64_t h = 0; h < H; ++h) {
              for (int64_t w = 0; w < W; ++w) d[h * W + w] = s[h * sH + w * sW];
            }
          }
        }
      });
    }
  });
  return out;
}

at::Tensor scatter_channels_cpu(const at::Tensor& compact_in, const at::Tensor& index_in, int64_t n) {
  const auto format = compact_in.suggest_memory_format();
  const at::Tensor compact = compact_in.contiguous(format), index = index_in.contiguous();
  const int64_t N = compact.size(0), m = compact.size(1), P = compact.size(2) * compact.size(3);
  at::Tensor out = at::empty({N, n, compact.size(2), compact.size(3)}, compact.options().memory_format(format));
  const int64_t* idx = index.const_data_ptr<int64_t>();
  with_element_type(compact.element_size(), [&](auto zero) {
    using T = decltype(zero);
    const T* src = static_cast<const T*>(compact.const_data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    // All-zero bits are 0.0 in every floating type: dead channels are memset.
    if (format == at::MemoryFormat::ChannelsLast) {
      at::parallel_for(0, N * P, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
        for (int64_t q = b; q < e; ++q) {
          const T* s = src + q * m;
          T* d = dst + q * n;
          std::memset(d, 0, n * sizeof(T));
          for (int64_t j = 0; j < m; ++j) d[idx[j]] = s[j];
        }
      });
    } else {
      const std::vector<int64_t> pos = compact_positions(index, n);
      at::parallel_for(0, N * n, std::max<int64_t>(1, kGrain / std::max<int64_t>(P, 1)), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int64_t j = pos[r % n];
          if (j >= 0) {
            std::memcpy(dst + r * P, src + ((r / n) * m + j) * P, P * sizeof(T));
          } else {
            std::memset(dst + r * P, 0, P * sizeof(T));
          }
        }
      });
    }
  });
  return out;
}

namespace {

// Moves the live block of a weight between its full and its compact form, times the scale of each
// full output channel: gathering reads full[out[o], in[i]] into compact[o, i], scattering writes
// compact[o, i] there. Weights are small: plain loops through the strides.
void move_weight_block(const at::Tensor& full, const at::Tensor& compact, const at::Tensor& out_idx,
                       const at::Tensor& in_idx, const c10::optional<at::Tensor>& scale, bool scatter) {
  // The scale in the weight's dtype, as the reference multiplies the output by scale.to(dtype).
  const at::Tensor s = scale.has_value() ? scale->to(full.scalar_type()).contiguous() : at::Tensor();
  const int64_t* oi = out_idx.defined() ? out_idx.const_data_ptr<int64_t>() : nullptr;
  const int64_t* ii = in_idx.defined() ? in_idx.const_data_ptr<int64_t>() : nullptr;
  const int64_t O = compact.size(0), I = compact.size(1), KH = compact.size(2), KW = compact.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "move_weight_block", [&] {
    const scalar_t* sp = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* f = static_cast<scalar_t*>(full.data_ptr());
    scalar_t* c = static_cast<scalar_t*>(compact.data_ptr());
    const auto fs = full.strides();
    const auto cs = compact.strides();
    at::parallel_for(0, O, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const int64_t full_o = oi ? oi[o] : o;
        const scalar_t factor = sp ? sp[full_o] : scalar_t(1);
        for (int64_t i = 0; i < I; ++i) {
          const int64_t full_i = ii ? ii[i] : i;
          for (int64_t kh = 0; kh < KH; ++kh) {
            for (int64_t kw = 0; kw < KW; ++kw) {
              scalar_t& fv = f[full_o * fs[0] + full_i * fs[1] + kh * fs[2] + kw * fs[3]];
              scalar_t& cv = c[o * cs[0] + i * cs[1] + kh * cs[2] + kw * cs[3]];
              if (scatter) {
                fv = sp ? cv * factor : cv;
              } else {
                cv = sp ? fv * factor : fv;
              }
            }
          }
        }
      }
    });
  });
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& index) {
  return index.has_value() ? index->contiguous() : at::Tensor();
}

}  // namespace

at::Tensor gather_weight_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& out_index,
                             const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale) {
  const at::Tensor out_idx = contiguous_or_undefined(out_index), in_idx = contiguous_or_undefined(in_index);
  const int64_t O = out_idx.defined() ? out_idx.numel() : weight.size(0);
  const int64_t I = in_idx.defined() ? in_idx.numel() : weight.size(1);
  at::Tensor compact = at::empty({O, I, weight.size(2), weight.size(3)},
                                 weight.options().memory_format(weight.suggest_memory_format()));
  move_weight_block(weight, compact, out_idx, in_idx, scale, false);
  return compact;
}

at::Tensor scatter_weight_cpu(const at::Tensor& g, const c10::optional<at::Tensor>& out_index,
                              const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale,
                              at::IntArrayRef full_sizes) {
  at::Tensor full = at::zeros(full_sizes, g.options().memory_format(g.suggest_memory_format()));
  move_weight_block(full, g, contiguous_or_undefined(out_index), contiguous_or_undefined(in_index), scale, true);
  return full;
}

}  // namespace attenuation
