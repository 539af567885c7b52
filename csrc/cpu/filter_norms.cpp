// filter_norms on the CPU: one parallel pass over every filter of every layer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attenuation/ops.h"
#include "cpu/filter_rows.h"

namespace attenuation {
namespace {

template <typename scalar_t>
float row_norm(const scalar_t* row, int64_t k, NormOrder ord) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  acc_t acc = 0;
  if (ord == NormOrder::L1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < k; ++j) acc += std::abs(static_cast<acc_t>(row[j]));
  } else if (ord == NormOrder::L2) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < k; ++j) acc += static_cast<acc_t>(row[j]) * static_cast<acc_t>(row[j]);
  } else {
    bool nan = false;
#pragma omp simd reduction(max : acc) reduction(| : nan)
    for (int64_t j = 0; j < k; ++j) {
      const acc_t a = std::abs(static_cast<acc_t>(row[j]));
      nan |= a != a;
      acc = std::max(acc, a);
    }
    if (nan) acc = std::numeric_limits<acc_t>::quiet_NaN();
  }
  return static_cast<float>(norm_finish(ord, acc));
}

}  // namespace

at::Tensor filter_norms_cpu(at::TensorList weights, c10::string_view ord_name) {
  const NormOrder ord = parse_norm_order(ord_name);
  check_filter_lists("filter_norms", weights, {}, {}, 0);
  // Other floating types (float8, say) are read as float32, the reference's own conversion.
  std::vector<at::Tensor> readable;
  for (const at::Tensor& w : weights) {
    const auto t = w.scalar_type();
    const bool kernel_type = t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
    readable.push_back(kernel_type ? w : w.to(at::kFloat));
  }
  FilterRows rows(readable);
  at::Tensor out = at::empty({rows.total()}, weights[0].options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  rows.parallel_for([&](int64_t layer, int64_t begin, int64_t end) {
    const at::Tensor& w = rows.weight(layer);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "filter_norms", [&] {
      const scalar_t* base = w.const_data_ptr<scalar_t>();
      for (int64_t f = begin; f < end; ++f) {
        out_ptr[rows.offset(layer) + f] = row_norm(base + f * rows.row_stride(layer), rows.row_length(layer), ord);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(attenuation, CPU, m) { m.impl("filter_norms", &filter_norms_cpu); }

}  // namespace attenuation
