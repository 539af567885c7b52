// filter_norms on CUDA: the per-filter L1 / L2 / Linf norms of all weights of a model in one launch
// (more only past a table's capacity), whatever the mix of weight dtypes. No synchronisation.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attenuation/ops.h"
#include "common.cuh"

#include <vector>

namespace attenuation {
namespace {

struct NormLayer {
  const void* weight;  // filter f: the dense block of row_len elements at weight + f * stride
  int64_t row_len;
  int64_t stride;
  c10::ScalarType dtype;
};
using NormTable = cuda::LayerTable<NormLayer, 48>;
static_assert(sizeof(NormTable) <= 2048, "the table is a kernel argument: keep it small");

// One warp per filter: the lanes accumulate every 32nd element (coalesced reads), then combine by
// shuffles. Accumulation in float (double for double weights), the result rounded to float.
template <NormOrder kOrd>
__global__ void filter_norms_kernel(const __grid_constant__ NormTable table, float* __restrict__ out) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  for (int64_t filter = table.first[0] + cuda::warp_index(); filter < table.first[table.size];
       filter += cuda::warp_count()) {
    const int l = cuda::layer_of(table, filter);
    const NormLayer& layer = table.layers[l];
    float norm = 0.0f;
    cuda::with_element_type(layer.dtype, [&](auto tag) {
      using T = decltype(tag);
      using acc_t = at::acc_type<T, /*is_cuda=*/true>;
      const T* row = static_cast<const T*>(layer.weight) + (filter - table.first[l]) * layer.stride;
      acc_t acc = 0;
      for (int64_t k = lane; k < layer.row_len; k += cuda::kWarpSize) {
        acc = norm_accumulate(kOrd, acc, static_cast<acc_t>(row[k]));
      }
      for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
        acc = norm_combine(kOrd, acc, __shfl_xor_sync(cuda::kFullMask, acc, offset));
      }
      norm = static_cast<float>(norm_finish(kOrd, acc));
    });
    if (lane == 0) out[filter] = norm;
  }
}

template <NormOrder kOrd>
void launch(const NormTable& table, float* out, cudaStream_t stream) {
  const int64_t filters = table.first[table.size] - table.first[0];
  filter_norms_kernel<kOrd><<<cuda::blocks_for_warps(filters), cuda::kBlockSize, 0, stream>>>(table, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor filter_norms_cuda(at::TensorList weights, c10::string_view ord) {
  const NormOrder order = parse_norm_order(ord);
  const int64_t total = check_filter_lists("filter_norms", weights, {}, {}, 0);
  const c10::cuda::CUDAGuard device_guard(weights[0].device());
  at::Tensor out = at::empty({total}, weights[0].options().dtype(at::kFloat));

  // What the kernel reads: each weight, converted to float32 if its dtype is none of the kernel's
  // (the reference's .float()) and made contiguous if its filters are not dense blocks. The
  // temporaries live until the launches are enqueued; the caching allocator orders their reuse
  // after the launches on this stream.
  std::vector<at::Tensor> rows;
  std::vector<int64_t> counts;
  rows.reserve(weights.size());
  counts.reserve(weights.size());
  for (const at::Tensor& weight : weights) {
    at::Tensor w = cuda::is_kernel_dtype(weight.scalar_type()) ? weight : weight.to(at::kFloat);
    if (!rows_dense(w)) w = w.contiguous();
    counts.push_back(w.size(0));
    rows.push_back(std::move(w));
  }

  float* out_ptr = out.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::for_each_table<NormTable>(
      counts,
      [&](size_t l) {
        const at::Tensor& w = rows[l];
        return NormLayer{w.const_data_ptr(), w.numel() / counts[l], w.stride(0), w.scalar_type()};
      },
      [&](const NormTable& table) {
        switch (order) {
          case NormOrder::L1: launch<NormOrder::L1>(table, out_ptr, stream); break;
          case NormOrder::L2: launch<NormOrder::L2>(table, out_ptr, stream); break;
          case NormOrder::Linf: launch<NormOrder::Linf>(table, out_ptr, stream); break;
        }
      });
  return out;
}

TORCH_LIBRARY_IMPL(attenuation, CUDA, m) { m.impl("filter_norms", &filter_norms_cuda); }

}  // namespace attenuation
