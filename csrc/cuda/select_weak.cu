// select_weak on CUDA: per layer, the ks[l] filters that rank first (ranks_before: removed first,
// then ascending score, NaN last, ties by lower index), in one launch over all layers (more only
// past a table's capacity). ks is read on the device: no synchronisation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attenuation/ops.h"
#include "common.cuh"

namespace attenuation {
namespace {

// A layer's entry is its index into ks (layers without filters are not entered).
using SelectTable = cuda::LayerTable<int64_t, 120>;
static_assert(sizeof(SelectTable) <= 2048, "the table is a kernel argument: keep it small");

// One warp per filter: its rank is the number of filters of its layer that rank before it, counted
// 32 at a time by ballot (every lane ends with the same rank). The order is strict and total, so
// the ranks of a layer are 0..n-1 and exactly clamp(k, 0, n) filters are selected.
__global__ void select_weak_kernel(const __grid_constant__ SelectTable table,
                                   const float* __restrict__ scores, int64_t scores_stride,
                                   const uint8_t* __restrict__ removed, int64_t removed_stride,
                                   const int64_t* __restrict__ ks, int64_t ks_stride,
                                   bool* __restrict__ weak) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  for (int64_t filter = table.first[0] + cuda::warp_index(); filter < table.first[table.size];
       filter += cuda::warp_count()) {
    const int l = cuda::layer_of(table, filter);
    const int64_t start = table.first[l], n = table.first[l + 1] - start, i = filter - start;
    const float score_i = scores[filter * scores_stride];
    const bool removed_i = removed[filter * removed_stride] != 0;
    int64_t rank = 0;
    for (int64_t j0 = 0; j0 < n; j0 += cuda::kWarpSize) {
      const int64_t j = j0 + lane;
      const bool before = j < n && ranks_before(removed[(start + j) * removed_stride] != 0,
                                                scores[(start + j) * scores_stride], j, removed_i,
                                                score_i, i);
      rank += __popc(__ballot_sync(cuda::kFullMask, before));
    }
    if (lane == 0) weak[filter] = rank < ks[table.layers[l] * ks_stride];
  }
}

}  // namespace

at::Tensor select_weak_cuda(const at::Tensor& scores, const at::Tensor& removed, at::IntArrayRef counts,
                            const at::Tensor& ks) {
  check_select_args(scores, removed, counts, ks);
  const int64_t total = scores.size(0);
  const c10::cuda::CUDAGuard device_guard(scores.device());
  at::Tensor weak = at::empty({total}, removed.options());

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::for_each_table<SelectTable>(
      counts, [](size_t l) { return static_cast<int64_t>(l); },
      [&](const SelectTable& table) {
        const int64_t filters = table.first[table.size] - table.first[0];
        select_weak_kernel<<<cuda::blocks_for_warps(filters), cuda::kBlockSize, 0, stream>>>(
            table, scores.const_data_ptr<float>(), scores.stride(0),
            static_cast<const uint8_t*>(removed.const_data_ptr()), removed.stride(0),
            ks.const_data_ptr<int64_t>(), ks.stride(0), weak.mutable_data_ptr<bool>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return weak;
}

TORCH_LIBRARY_IMPL(attenuation, CUDA, m) { m.impl("select_weak", &select_weak_cuda); }

}  // namespace attenuation
