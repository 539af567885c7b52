// The CPU view of a model's weights as one flat list of filters, split into parallel work.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attenuation/ops.h"

namespace attenuation {

// Each weight whose filters are not one dense block each (rows_dense) is replaced by a contiguous
// copy; `write_back()` copies such copies back into the originals after an in-place update.
class FilterRows {
 public:
  explicit FilterRows(at::TensorList weights) {
    int64_t offset = 0;
    for (const at::Tensor& w : weights) {
      at::Tensor data = rows_dense(w) ? w : w.contiguous();
      if (!data.is_same(w)) copies_.emplace_back(w, data);
      weights_.push_back(data);
      offsets_.push_back(offset);
      lengths_.push_back(w.size(0) ? w.numel() / w.size(0) : 0);
      strides_.push_back(w.dim() ? data.stride(0) : 0);
      element_offsets_.push_back(total_elements_);
      total_elements_ += w.size(0) * std::max<int64_t>(lengths_.back(), 1);
      offset += w.size(0);
    }
    total_ = offset;
  }

  int64_t total() const { return total_; }
  const at::Tensor& weight(int64_t layer) const { return weights_[layer]; }
  int64_t offset(int64_t layer) const { return offsets_[layer]; }
  int64_t row_length(int64_t layer) const { return lengths_[layer]; }
  int64_t row_stride(int64_t layer) const { return strides_[layer]; }

  // Calls fn(layer, first filter, end filter) over all filters of all layers, in parallel. The
  // work is split by elements, not filters (later layers have longer rows), in chunks of at least
  // `grain` elements, so that a small model runs on the calling thread.
  template <typename Fn>
  void parallel_for(const Fn& fn, int64_t grain = 1 << 16) const {
    at::parallel_for(0, total_elements_, grain, [&](int64_t begin, int64_t end) {
      // A filter belongs to the chunk that holds its first element.
      for (size_t layer = 0; layer < weights_.size(); ++layer) {
        const int64_t n = weights_[layer].size(0), k = std::max<int64_t>(lengths_[layer], 1);
        const int64_t start = element_offsets_[layer];
        const int64_t lo = std::clamp<int64_t>((begin - start + k - 1) / k, 0, n);
        const int64_t hi = std::clamp<int64_t>((end - start + k - 1) / k, 0, n);
        if (lo < hi) fn(static_cast<int64_t>(layer), lo, hi);
      }
    });
  }

  void write_back() const {
    for (const auto& [original, copy] : copies_) original.copy_(copy);
  }

 private:
  std::vector<at::Tensor> weights_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
  std::vector<int64_t> offsets_, lengths_, strides_, element_offsets_;
  int64_t total_ = 0, total_elements_ = 0;
};

}  // namespace attenuation
