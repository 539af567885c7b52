// The channel gathers of the masked convolution on CUDA (semantics: ops.h). 4-D tensors, contiguous
// or channels-last (others are made contiguous in the format they suggest); results keep the format.
//
// All four are one kernel over a 4-D tensor of dims (A, B, P = H * W), dims 0 and 1 looked up:
//   gather:  dst[a, b, p] = src[index0[a], index1[b], p] * scale[index0[a]]
//   scatter: dst[a, b, p] = src[pos0[a], pos1[b], p] * scale[a], or 0 where pos0[a] or pos1[b] is -1,
// no index meaning the identity, no scale an exact copy; gather_channels and scatter_channels look
// up dim 1 only. pos is the inverse of a scatter's index (a channel's position in the compact
// tensor), built by a one-block kernel first: a scatter writes each element of its output once,
// zeros included, in at most two launches. The launch is a grid of rows x columns of the output in
// memory order (contiguous: rows (a, b), columns p; channels-last: rows (a, p), columns b), so a
// row's index is split by division once per row, not per element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attenuation/ops.h"
#include "common.cuh"

#include <utility>

namespace attenuation {
namespace {

template <typename T>
struct GatherArgs {
  const T* src;
  T* dst;
  const int64_t* index0;  // per output a / b: gather, its source channel; scatter, pos (-1: zero)
  const int64_t* index1;  // nullptr: identity
  const T* scale;         // per channel of dim 0 of the full tensor; nullptr: no scaling
  int64_t src_a, src_b, dst_a, dst_b, p;
};

// The source channel of output channel i; a gather's index is checked on the device, as
// index_select does (a scatter's pos is built from an index checked in position_maps_kernel).
template <bool kScatter>
__device__ __forceinline__ int64_t source_of(const int64_t* index, int64_t i, int64_t size) {
  if (index == nullptr) return i;
  const int64_t s = index[i];
  if constexpr (!kScatter) CUDA_KERNEL_ASSERT(0 <= s && s < size && "channel index out of range");
  return s;
}

template <typename T, bool kChannelsLast, bool kScatter>
__global__ void gather_kernel(GatherArgs<T> g) {
  using op_t = at::opmath_type<T>;
  const int64_t cols = kChannelsLast ? g.dst_b : g.p;
  const int64_t rows = kChannelsLast ? g.dst_a * g.p : g.dst_a * g.dst_b;
  const int64_t row_split = kChannelsLast ? g.p : g.dst_b;  // row = a * row_split + rest
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t a = row / row_split, rest = row - a * row_split;
    const int64_t sa = source_of<kScatter>(g.index0, a, g.src_a);
    int64_t src_row;  // source offset of the row's column 0 (contiguous) or of its (a, p) (channels-last)
    bool zero_row = sa < 0;
    if constexpr (kChannelsLast) {
      src_row = (sa * g.p + rest) * g.src_b;
    } else {
      const int64_t sb = source_of<kScatter>(g.index1, rest, g.src_b);
      zero_row = zero_row || sb < 0;
      src_row = (sa * g.src_b + sb) * g.p;
    }
    const op_t s = g.scale == nullptr || zero_row ? op_t(1) : static_cast<op_t>(g.scale[kScatter ? a : sa]);
    for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < cols;
         col += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      bool zero = zero_row;
      int64_t src = src_row + col;
      if constexpr (kChannelsLast) {
        const int64_t sb = source_of<kScatter>(g.index1, col, g.src_b);
        zero = zero || sb < 0;
        src = src_row + sb;
      }
      T value = static_cast<T>(0.0f);
      if (!zero) value = g.scale == nullptr ? g.src[src] : static_cast<T>(static_cast<op_t>(g.src[src]) * s);
      g.dst[row * cols + col] = value;
    }
  }
}

// A scatter's index turned around: map[c] = j where index[j] = c, -1 for the channels not in it.
struct PositionMap {
  const int64_t* index;  // nullptr: no map to build
  int64_t count;         // index entries
  int64_t size;          // channels
  int64_t* map;
};

PositionMap position_map(const at::Tensor& index, int64_t channels, int64_t* map) {
  if (!index.defined()) return PositionMap{nullptr, 0, 0, nullptr};
  return PositionMap{index.const_data_ptr<int64_t>(), index.numel(), channels, map};
}

// One block builds both maps: all -1, then the positions, ordered by the barrier.
__global__ void position_maps_kernel(PositionMap m0, PositionMap m1) {
  for (const PositionMap& m : {m0, m1}) {
    if (m.index == nullptr) continue;
    for (int64_t c = threadIdx.x; c < m.size; c += blockDim.x) m.map[c] = -1;
  }
  __syncthreads();
  for (const PositionMap& m : {m0, m1}) {
    if (m.index == nullptr) continue;
    for (int64_t j = threadIdx.x; j < m.count; j += blockDim.x) {
      const int64_t c = m.index[j];
      CUDA_KERNEL_ASSERT(0 <= c && c < m.size && "channel index out of range");
      m.map[c] = j;
    }
  }
}

void check_4d(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": expected a 4-D tensor, got ", t.dim(), " dimensions");
}

// An index argument: 1-D int64 on the tensor's device, made contiguous; undefined when absent.
at::Tensor index_arg(const char* op, const char* name, const c10::optional<at::Tensor>& index,
                     const at::Tensor& like) {
  if (!index.has_value() || !index->defined()) return {};
  TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong && index->device() == like.device(), op,
              ": ", name, " must be a 1-D int64 tensor on ", like.device(), ", got ", index->scalar_type(),
              " of shape ", index->sizes(), " on ", index->device());
  return index->contiguous();
}

// The scale argument: one per channel of dim 0 of the full tensor, rounded to the tensor's dtype
// (as the reference's scale.to(y.dtype)), contiguous; undefined when absent.
at::Tensor scale_arg(const char* op, const c10::optional<at::Tensor>& scale, int64_t channels,
                     const at::Tensor& like) {
  if (!scale.has_value() || !scale->defined()) return {};
  TORCH_CHECK(scale->dim() == 1 && scale->numel() == channels && scale->device() == like.device(), op,
              ": scale must be a 1-D tensor of ", channels, " entries on ", like.device(), ", got shape ",
              scale->sizes(), " on ", scale->device());
  return scale->to(like.scalar_type()).contiguous();
}

// Columns per block: a power of two covering a row (at most kBlockSize); the rest of the block
// takes further rows.
std::pair<dim3, dim3> rows_cols_launch(int64_t rows, int64_t cols) {
  int64_t bx = 1;
  while (bx < cols && bx < cuda::kBlockSize) bx *= 2;
  const int64_t by = cuda::kBlockSize / bx;
  const dim3 grid(static_cast<unsigned>(std::min(cuda::kMaxBlocks, (cols + bx - 1) / bx)),
                  static_cast<unsigned>(std::min(cuda::kMaxBlocks, (rows + by - 1) / by)));
  return {grid, dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

template <bool kScatter>
void launch_gather(const at::Tensor& src, const at::Tensor& dst, const int64_t* index0, const int64_t* index1,
                   const at::Tensor& scale, at::MemoryFormat format) {
  if (dst.numel() == 0) return;
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t p = dst.size(2) * dst.size(3);
  const int64_t rows = channels_last ? dst.size(0) * p : dst.size(0) * dst.size(1);
  const auto [grid, block] = rows_cols_launch(rows, channels_last ? dst.size(1) : p);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "attenuation_channel_gather", [&] {
    const GatherArgs<scalar_t> args{src.const_data_ptr<scalar_t>(),
                                    dst.mutable_data_ptr<scalar_t>(),
                                    index0,
                                    index1,
                                    scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr,
                                    src.size(0),
                                    src.size(1),
                                    dst.size(0),
                                    dst.size(1),
                                    p};
    if (channels_last) {
      gather_kernel<scalar_t, true, kScatter><<<grid, block, 0, stream>>>(args);
    } else {
      gather_kernel<scalar_t, false, kScatter><<<grid, block, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const int64_t* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

// What gather and scatter both start with: the checks, the device guard, the input in its memory
// format and the two optional index lists (members initialised in this order).
struct Operands {
  Operands(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& out_index,
           const c10::optional<at::Tensor>& in_index)
      : device_guard((check_4d(op, input), input.device())),
        format(input.suggest_memory_format()),
        src(input.contiguous(format)),
        index0(index_arg(op, "out_index", out_index, src)),
        index1(index_arg(op, "in_index", in_index, src)) {}
  const c10::cuda::CUDAGuard device_guard;
  const at::MemoryFormat format;
  const at::Tensor src, index0, index1;
};

at::Tensor gather(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& out_index,
                  const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale) {
  const Operands operands(op, input, out_index, in_index);
  const auto& [device_guard, format, src, index0, index1] = operands;
  const at::Tensor s = scale_arg(op, scale, src.size(0), src);
  at::Tensor dst = at::empty({index0.defined() ? index0.numel() : src.size(0),
                              index1.defined() ? index1.numel() : src.size(1), src.size(2), src.size(3)},
                             src.options().memory_format(format));
  launch_gather<false>(src, dst, ptr_or_null(index0), ptr_or_null(index1), s, format);
  return dst;
}

at::Tensor scatter(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& out_index,
                   const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale,
                   at::IntArrayRef full_sizes) {
  const Operands operands(op, input, out_index, in_index);
  const auto& [device_guard, format, src, index0, index1] = operands;
  TORCH_CHECK(full_sizes.size() == 4 && full_sizes[0] >= 0 && full_sizes[1] >= 0 &&
                  full_sizes[2] == src.size(2) && full_sizes[3] == src.size(3) &&
                  src.size(0) == (index0.defined() ? index0.numel() : full_sizes[0]) &&
                  src.size(1) == (index1.defined() ? index1.numel() : full_sizes[1]),
              op, ": a tensor of shape ", src.sizes(), " with ", index0.defined() ? "an" : "no", " output index and ",
              index1.defined() ? "an" : "no", " input index does not scatter into shape ", full_sizes);
  const at::Tensor s = scale_arg(op, scale, full_sizes[0], src);
  at::Tensor dst = at::empty(full_sizes, src.options().memory_format(format));

  // The position maps: the channels of dim 0, then those of dim 1 (of the dims with an index).
  const int64_t n0 = index0.defined() ? full_sizes[0] : 0, n1 = index1.defined() ? full_sizes[1] : 0;
  const int64_t* map0 = nullptr;
  const int64_t* map1 = nullptr;
  at::Tensor maps;
  if (n0 + n1 > 0) {
    maps = at::empty({n0 + n1}, src.options().dtype(at::kLong));
    int64_t* map = maps.mutable_data_ptr<int64_t>();
    position_maps_kernel<<<1, cuda::kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(
        position_map(index0, n0, map), position_map(index1, n1, map + n0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map0 = index0.defined() ? map : nullptr;
    map1 = index1.defined() ? map + n0 : nullptr;
  }
  launch_gather<true>(src, dst, map0, map1, s, format);
  return dst;
}

}  // namespace

at::Tensor gather_channels_cuda(const at::Tensor& x, const at::Tensor& index) {
  return gather("gather_channels", x, c10::nullopt, index, c10::nullopt);
}

at::Tensor scatter_channels_cuda(const at::Tensor& compact, const at::Tensor& index, int64_t n) {
  check_4d("scatter_channels", compact);
  return scatter("scatter_channels", compact, c10::nullopt, index, c10::nullopt,
                 {compact.size(0), n, compact.size(2), compact.size(3)});
}

at::Tensor gather_weight_cuda(const at::Tensor& weight, const c10::optional<at::Tensor>& out_index,
                              const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale) {
  return gather("gather_weight", weight, out_index, in_index, scale);
}

at::Tensor scatter_weight_cuda(const at::Tensor& g, const c10::optional<at::Tensor>& out_index,
                               const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale,
                               at::IntArrayRef full_sizes) {
  return scatter("scatter_weight", g, out_index, in_index, scale, full_sizes);
}

}  // namespace attenuation
