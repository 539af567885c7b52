// attenuate_ and zero_removed_ on the CPU: one parallel pass over every filter of the model that
// decides each filter's update (attenuate_filter, shared with CUDA) and applies it to its weight
// row and per-filter vectors. Rows whose scale is 1 are not touched.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "attenuation/ops.h"
#include "cpu/filter_rows.h"

namespace attenuation {
namespace {

// One per-filter vector of a layer (bias, gamma, beta, running mean, running var), or none.
struct VectorRef {
  void* data = nullptr;
  int64_t stride = 0;
  at::ScalarType dtype = at::kFloat;
};

using LayerVectors = std::array<VectorRef, kVectorKinds>;

std::vector<LayerVectors> vector_refs(int64_t n_layers, at::TensorList vectors, at::IntArrayRef slots) {
  std::vector<LayerVectors> refs(n_layers);
  for (size_t j = 0; j < vectors.size(); ++j) {
    const at::Tensor& t = vectors[j];
    if (t.numel()) refs[slots[j] / kVectorKinds][slots[j] % kVectorKinds] = {t.data_ptr(), t.stride(0), t.scalar_type()};
  }
  return refs;
}

// t[f] = t[f] * cast<T>(s), in T's arithmetic, as `t.mul_(scale.to(t.dtype))` computes it.
void scale_entry(const VectorRef& v, int64_t f, float s) {
  if (v.data == nullptr) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.dtype, "scale_entry", [&] {
    scalar_t* p = static_cast<scalar_t*>(v.data) + f * v.stride;
    *p = *p * static_cast<scalar_t>(s);
  });
}

template <typename scalar_t>
void scale_row(scalar_t* row, int64_t k, float s) {
  const auto factor = static_cast<scalar_t>(s);
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) row[j] = row[j] * factor;
}

// Every dtype is checked before anything is scaled, so that an error leaves the model untouched.
void check_dtypes(const char* op, at::TensorList weights, at::TensorList vectors) {
  const auto supported = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
  };
  for (size_t l = 0; l < weights.size(); ++l) {
    TORCH_CHECK(supported(weights[l].scalar_type()), op, ": weight ", l, " has dtype ", weights[l].scalar_type(),
                "; supported are float, double, half and bfloat16");
  }
  for (size_t j = 0; j < vectors.size(); ++j) {
    TORCH_CHECK(supported(vectors[j].scalar_type()), op, ": vector ", j, " has dtype ", vectors[j].scalar_type(),
                "; supported are float, double, half and bfloat16");
  }
}

// The pass shared by both ops: `update(global filter index)` returns the filter's scale.
template <typename Update>
void scale_filters(const FilterRows& rows, const std::vector<LayerVectors>& vectors, const Update& update) {
  rows.parallel_for([&](int64_t layer, int64_t begin, int64_t end) {
    const at::Tensor& w = rows.weight(layer);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "scale_filters", [&] {
      scalar_t* base = w.data_ptr<scalar_t>();
      for (int64_t f = begin; f < end; ++f) {
        const float s = update(rows.offset(layer) + f);
        if (s == 1.0f) continue;
        scale_row(base + f * rows.row_stride(layer), rows.row_length(layer), s);
        for (int v = 0; v < kVectorKinds; ++v) scale_entry(vectors[layer][v], f, v == kRunningVar ? s * s : s);
      }
    });
  });
  rows.write_back();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attenuate_cpu(
    at::TensorList weights, at::TensorList vector_list, at::IntArrayRef slots, const at::Tensor& weak,
    const at::Tensor& status, const at::Tensor& multiplier, double factor, double eps, bool restore) {
  const int64_t total = check_attenuate_args(weights, vector_list, slots, weak, status, multiplier, factor, eps);
  check_dtypes("attenuate_", weights, vector_list);
  const FilterRows rows(weights);
  const auto vectors = vector_refs(static_cast<int64_t>(weights.size()), vector_list, slots);
  at::Tensor returned = at::empty({total}, weak.options());
  at::Tensor newly_removed = at::empty({total}, weak.options());
  const bool* weak_p = weak.const_data_ptr<bool>();
  uint8_t* status_p = status.data_ptr<uint8_t>();
  float* mult_p = multiplier.data_ptr<float>();
  bool* returned_p = returned.data_ptr<bool>();
  bool* newly_p = newly_removed.data_ptr<bool>();
  const int64_t sw = weak.stride(0), ss = status.stride(0), sm = multiplier.stride(0);
  const auto f32_factor = static_cast<float>(factor), f32_eps = static_cast<float>(eps);
  scale_filters(rows, vectors, [&](int64_t g) {
    const FilterUpdate u = attenuate_filter(weak_p[g * sw], status_p[g * ss], mult_p[g * sm], f32_factor,
                                            f32_eps, restore);
    status_p[g * ss] = u.status;
    mult_p[g * sm] = u.multiplier;
    returned_p[g] = u.returned;
    newly_p[g] = u.newly_removed;
    return u.scale;
  });
  return {returned, newly_removed};
}

void zero_removed_cpu(at::TensorList weights, at::TensorList vector_list, at::IntArrayRef slots,
                      const at::Tensor& status) {
  check_zero_removed_args(weights, vector_list, slots, status);
  check_dtypes("zero_removed_", weights, vector_list);
  const FilterRows rows(weights);
  const auto vectors = vector_refs(static_cast<int64_t>(weights.size()), vector_list, slots);
  const uint8_t* status_p = status.const_data_ptr<uint8_t>();
  const int64_t ss = status.stride(0);
  scale_filters(rows, vectors, [&](int64_t g) { return zero_removed_scale(status_p[g * ss]); });
}

TORCH_LIBRARY_IMPL(attenuation, CPU, m) {
  m.impl("attenuate_", &attenuate_cpu);
  m.impl("zero_removed_", &zero_removed_cpu);
}

}  // namespace attenuation
