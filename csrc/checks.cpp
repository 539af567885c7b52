// Host-side argument checks shared by the CPU and CUDA implementations: a bad argument is a
// TORCH_CHECK error that names it, never a crash inside a kernel.
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>

#include "attenuation/ops.h"

namespace attenuation {

int64_t check_filter_lists(const char* op, at::TensorList weights, at::TensorList vectors,
                           at::IntArrayRef slots, int64_t max_kind) {
  TORCH_CHECK(!weights.empty(), op, ": no weights given");
  const auto n_layers = static_cast<int64_t>(weights.size());
  const at::Device device = weights[0].device();
  int64_t total = 0;
  for (int64_t i = 0; i < n_layers; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() >= 1 && w.is_floating_point(), op, ": weight ", i,
                " must be a floating tensor with a filter dimension, got ", w.scalar_type(), " of ",
                w.dim(), " dimensions");
    TORCH_CHECK(w.device() == device, op, ": weight ", i, " is on ", w.device(), ", weight 0 on ",
                device);
    total += w.size(0);
  }
  static const char* kinds[] = {"bias", "gamma", "beta", "running mean", "running var"};
  TORCH_CHECK(vectors.size() == slots.size(), op, ": ", vectors.size(), " vectors for ", slots.size(), " slots");
  std::vector<bool> taken(n_layers * kVectorKinds, false);
  for (size_t j = 0; j < vectors.size(); ++j) {
    const int64_t slot = slots[j], layer = slot / kVectorKinds, kind = slot % kVectorKinds;
    TORCH_CHECK(slot >= 0 && layer < n_layers && kind < max_kind, op, ": vector ", j, " has slot ", slot,
                ", outside the ", n_layers, " layers x ", max_kind, " kinds");
    TORCH_CHECK(!taken[slot], op, ": two vectors for layer ", layer, "'s ", kinds[kind]);
    taken[slot] = true;
    const at::Tensor& t = vectors[j];
    const int64_t n = weights[layer].size(0);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": layer ", layer, " ", kinds[kind], " has shape ",
                t.sizes(), ", expected (", n, ",)");
    TORCH_CHECK(t.is_floating_point(), op, ": layer ", layer, " ", kinds[kind], " must be floating, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == device, op, ": layer ", layer, " ", kinds[kind], " is on ", t.device(),
                ", the weights on ", device);
  }
  return total;
}

void check_flat(const char* op, const char* name, const at::Tensor& t, int64_t total,
                at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == total, op, ": ", name, " must be flat with ", total,
              " entries (one per filter), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", the weights on ", device);
}

void check_select_args(const at::Tensor& scores, const at::Tensor& removed, at::IntArrayRef counts,
                       const at::Tensor& ks) {
  int64_t total = 0;
  for (size_t l = 0; l < counts.size(); ++l) {
    TORCH_CHECK(counts[l] >= 0, "select_weak: layer ", l, " has a negative filter count ", counts[l]);
    total += counts[l];
  }
  check_flat("select_weak", "scores", scores, total, at::kFloat, scores.device());
  check_flat("select_weak", "removed", removed, total, at::kBool, scores.device());
  check_flat("select_weak", "ks", ks, static_cast<int64_t>(counts.size()), at::kLong, scores.device());
}

bool rows_dense(const at::Tensor& t) {
  if (t.dim() == 0 || t.size(0) == 0) return true;
  const int64_t row = t.numel() / t.size(0);
  if (row == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the inner dims
  for (int64_t d = 1; d < t.dim(); ++d) {
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return t.size(0) == 1 || t.stride(0) >= row;
}

NormOrder parse_norm_order(c10::string_view ord) {
  if (ord == "l1") return NormOrder::L1;
  if (ord == "l2") return NormOrder::L2;
  if (ord == "linf") return NormOrder::Linf;
  TORCH_CHECK(false, "filter_norms: unknown norm '", std::string(ord), "': expected 'l1', 'l2' or 'linf'");
}

}  // namespace attenuation

namespace attenuation {

int64_t check_attenuate_args(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                             const at::Tensor& weak, const at::Tensor& status, const at::Tensor& multiplier,
                             double factor, double eps) {
  TORCH_CHECK(factor >= 0.0 && factor <= 1.0, "attenuate_: attenuation factor must be in [0, 1], got ", factor);
  TORCH_CHECK(eps >= 0.0, "attenuate_: removal threshold eps must be >= 0, got ", eps);
  const int64_t total = check_filter_lists("attenuate_", weights, vectors, slots, kVectorKinds);
  const at::Device device = weights[0].device();
  check_flat("attenuate_", "weak", weak, total, at::kBool, device);
  check_flat("attenuate_", "status", status, total, at::kByte, device);
  check_flat("attenuate_", "multiplier", multiplier, total, at::kFloat, device);
  return total;
}

int64_t check_zero_removed_args(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                                const at::Tensor& status) {
  const int64_t total = check_filter_lists("zero_removed_", weights, vectors, slots, kRunningMean);
  check_flat("zero_removed_", "status", status, total, at::kByte, weights[0].device());
  return total;
}

}  // namespace attenuation
