// attenuate_ and zero_removed_ on CUDA: one launch over the whole model (more only past a table's
// capacity), whatever the mix of dtypes. No synchronisation.
//
// One warp per filter. Lane 0 applies the rule of filter_rule.h (attenuate_filter, or
// zero_removed_scale) and writes the filter's state; the warp then scales the filter's weight row
// and lanes 0..4 its bias, gamma, beta, running mean and running variance (by scale^2). A filter
// whose scale is exactly 1 is not touched (x * 1 == x), so a step costs the traffic of the scaled
// filters only.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attenuation/ops.h"
#include "common.cuh"

#include <array>
#include <utility>
#include <vector>

namespace attenuation {
namespace {

struct FilterVector {
  void* data;  // nullptr: absent
  int64_t stride;
};

struct ScaleLayer {
  void* weight;  // filter f: the dense block of row_len elements at weight + f * stride
  int64_t row_len;
  int64_t stride;
  FilterVector vectors[kVectorKinds];  // by VectorKind (ops.h)
  c10::ScalarType weight_dtype;
  c10::ScalarType vector_dtypes[kVectorKinds];
};
using ScaleTable = cuda::LayerTable<ScaleLayer, 16>;
static_assert(sizeof(ScaleTable) <= 2048, "the table is a kernel argument: keep it small");

// The flat per-filter tensors (any stride). zero_removed_ uses status only, and only reads it.
struct FilterState {
  uint8_t* status;
  int64_t status_stride;
  float* multiplier;
  int64_t multiplier_stride;
  const uint8_t* weak;
  int64_t weak_stride;
  bool* returned;       // fresh, contiguous
  bool* newly_removed;  // fresh, contiguous
};

template <bool kZeroOnly>
__global__ void scale_filters_kernel(const __grid_constant__ ScaleTable table, FilterState state,
                                     float factor, float eps, bool restore) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  for (int64_t filter = table.first[0] + cuda::warp_index(); filter < table.first[table.size];
       filter += cuda::warp_count()) {
    float scale = 1.0f;
    if (lane == 0) {  // one lane reads and writes the state: no read-after-write race in the warp
      const uint8_t status = state.status[filter * state.status_stride];
      if constexpr (kZeroOnly) {
        scale = zero_removed_scale(status);
      } else {
        const FilterUpdate u =
            attenuate_filter(state.weak[filter * state.weak_stride] != 0, status,
                             state.multiplier[filter * state.multiplier_stride], factor, eps, restore);
        state.status[filter * state.status_stride] = u.status;
        state.multiplier[filter * state.multiplier_stride] = u.multiplier;
        state.returned[filter] = u.returned;
        state.newly_removed[filter] = u.newly_removed;
        scale = u.scale;
      }
    }
    scale = __shfl_sync(cuda::kFullMask, scale, 0);
    if (scale == 1.0f) continue;

    const int l = cuda::layer_of(table, filter);
    const ScaleLayer& layer = table.layers[l];
    const int64_t f = filter - table.first[l];
    if (lane < kVectorKinds && layer.vectors[lane].data != nullptr) {
      const float s = lane == kRunningVar ? scale * scale : scale;  // square in float32, as the reference
      cuda::with_element_type(layer.vector_dtypes[lane], [&](auto tag) {
        using T = decltype(tag);
        T* x = static_cast<T*>(layer.vectors[lane].data) + f * layer.vectors[lane].stride;
        *x = cuda::scaled(*x, s);
      });
    }
    cuda::with_element_type(layer.weight_dtype, [&](auto tag) {
      using T = decltype(tag);
      T* row = static_cast<T*>(layer.weight) + f * layer.stride;
      for (int64_t k = lane; k < layer.row_len; k += cuda::kWarpSize) row[k] = cuda::scaled(row[k], scale);
    });
  }
}

// The host side of both ops, after their checks: the dtype and overlap checks the kernel needs (all
// before the first launch, so that an error leaves the model untouched), the tables, the launches,
// and the write-back of the weights that had to be copied.
template <bool kZeroOnly>
void scale_filters(const char* op, at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                   const FilterState& state, double factor, double eps, bool restore) {
  std::vector<at::Tensor> rows;  // what the kernel scales: the weight, or a dense copy of it
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (weight, its dense copy)
  std::vector<int64_t> counts;
  rows.reserve(weights.size());
  counts.reserve(weights.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(cuda::is_kernel_dtype(w.scalar_type()), op, ": weight ", l, " has dtype ", w.scalar_type(),
                "; supported are float, double, half and bfloat16");
    if (rows_dense(w)) {
      rows.push_back(w);
    } else {
      at::assert_no_internal_overlap(w);  // the write-back's copy_ would refuse it after the launch
      rows.push_back(w.contiguous());
      write_back.emplace_back(w, rows.back());
    }
    counts.push_back(w.size(0));
  }
  std::vector<std::array<const at::Tensor*, kVectorKinds>> layer_vectors(weights.size());  // nullptr: absent
  for (size_t j = 0; j < vectors.size(); ++j) {
    const at::Tensor& t = vectors[j];
    TORCH_CHECK(cuda::is_kernel_dtype(t.scalar_type()), op, ": vector ", j, " has dtype ", t.scalar_type(),
                "; supported are float, double, half and bfloat16");
    at::assert_no_internal_overlap(t);  // as mul_ does: an expanded vector would be scaled twice
    layer_vectors[slots[j] / kVectorKinds][slots[j] % kVectorKinds] = &t;
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float factor_f = static_cast<float>(factor), eps_f = static_cast<float>(eps);
  cuda::for_each_table<ScaleTable>(
      counts,
      [&](size_t l) {
        ScaleLayer layer{};
        layer.weight = rows[l].data_ptr();
        layer.row_len = rows[l].numel() / counts[l];
        layer.stride = rows[l].stride(0);
        layer.weight_dtype = rows[l].scalar_type();
        for (int v = 0; v < kVectorKinds; ++v) {
          if (const at::Tensor* t = layer_vectors[l][v]) {
            layer.vectors[v] = FilterVector{t->data_ptr(), t->stride(0)};
            layer.vector_dtypes[v] = t->scalar_type();
          }
        }
        return layer;
      },
      [&](const ScaleTable& table) {
        const int64_t filters = table.first[table.size] - table.first[0];
        scale_filters_kernel<kZeroOnly><<<cuda::blocks_for_warps(filters), cuda::kBlockSize, 0, stream>>>(
            table, state, factor_f, eps_f, restore);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  for (auto& [weight, copy] : write_back) weight.copy_(copy);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attenuate_cuda(at::TensorList weights, at::TensorList vectors,
                                                  at::IntArrayRef slots, const at::Tensor& weak,
                                                  const at::Tensor& status, const at::Tensor& multiplier,
                                                  double factor, double eps, bool restore) {
  const int64_t total = check_attenuate_args(weights, vectors, slots, weak, status, multiplier, factor, eps);
  const c10::cuda::CUDAGuard device_guard(weights[0].device());
  at::Tensor returned = at::empty({total}, weak.options());
  at::Tensor newly_removed = at::empty({total}, weak.options());
  const FilterState state{status.mutable_data_ptr<uint8_t>(), status.stride(0),
                          multiplier.mutable_data_ptr<float>(), multiplier.stride(0),
                          static_cast<const uint8_t*>(weak.const_data_ptr()), weak.stride(0),
                          returned.mutable_data_ptr<bool>(), newly_removed.mutable_data_ptr<bool>()};
  scale_filters<false>("attenuate_", weights, vectors, slots, state, factor, eps, restore);
  return {returned, newly_removed};
}

void zero_removed_cuda(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                       const at::Tensor& status) {
  check_zero_removed_args(weights, vectors, slots, status);
  const c10::cuda::CUDAGuard device_guard(weights[0].device());
  // The kernel only reads status here (the state struct serves both ops).
  const FilterState state{static_cast<uint8_t*>(status.data_ptr()), status.stride(0), nullptr, 0, nullptr, 0,
                          nullptr, nullptr};
  scale_filters<true>("zero_removed_", weights, vectors, slots, state, 1.0, 0.0, false);
}

TORCH_LIBRARY_IMPL(attenuation, CUDA, m) {
  m.impl("attenuate_", &attenuate_cuda);
  m.impl("zero_removed_", &zero_removed_cuda);
}

}  // namespace attenuation
