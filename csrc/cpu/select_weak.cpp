// select_weak on the CPU: per layer, a linear-time selection of the k first filters in the order
// of ranks_before (removed first, then score, then index), layers in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "attenuation/ops.h"

namespace attenuation {

at::Tensor select_weak_cpu(const at::Tensor& scores_in, const at::Tensor& removed_in,
                           at::IntArrayRef counts, const at::Tensor& ks_in) {
  check_select_args(scores_in, removed_in, counts, ks_in);
  const at::Tensor scores = scores_in.contiguous(), removed = removed_in.contiguous(), ks = ks_in.contiguous();
  at::Tensor weak = at::empty_like(removed);
  const float* s = scores.const_data_ptr<float>();
  const bool* r = removed.const_data_ptr<bool>();
  const int64_t* k_of = ks.const_data_ptr<int64_t>();
  bool* out = weak.data_ptr<bool>();
  std::vector<int64_t> starts(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), starts.begin() + 1);
  const auto n_layers = static_cast<int64_t>(counts.size());
  const int64_t grain = std::max<int64_t>(1, n_layers * 4096 / std::max<int64_t>(starts.back(), 1));
  at::parallel_for(0, n_layers, grain, [&](int64_t first, int64_t last) {
    std::vector<int64_t> order;
    for (int64_t l = first; l < last; ++l) {
      const int64_t start = starts[l], n = counts[l];
      const int64_t k = std::clamp<int64_t>(k_of[l], 0, n);
      order.resize(n);
      std::iota(order.begin(), order.end(), start);
      const auto before = [&](int64_t a, int64_t b) { return ranks_before(r[a], s[a], a, r[b], s[b], b); };
      if (k > 0 && k < n) std::nth_element(order.begin(), order.begin() + k, order.end(), before);
      for (int64_t j = 0; j < n; ++j) out[order[j]] = j < k;
    }
  });
  return weak;
}

TORCH_LIBRARY_IMPL(attenuation, CPU, m) { m.impl("select_weak", &select_weak_cpu); }

}  // namespace attenuation
