// Declarations of the native ops' implementations, per device. Schemas: csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "attenuation/filter_rule.h"

#include <tuple>
#include <vector>

namespace attenuation {

// The per-filter vectors of a layer, in the order of a slot (see the schemas in csrc/ops.cpp):
// vector j of a call belongs to layer slots[j] / kVectorKinds, as kind slots[j] % kVectorKinds.
enum VectorKind : int64_t { kBias = 0, kGamma = 1, kBeta = 2, kRunningMean = 3, kRunningVar = 4 };
constexpr int64_t kVectorKinds = 5;

// ---- host-side argument checks shared by both devices (csrc/checks.cpp) ----

// Checks a model's weights and per-filter vectors (one device, a floating weight per layer with a
// filter dimension, vectors of shape (filters,) in valid, distinct slots of kinds < max_kind) and
// returns the total filter count.
int64_t check_filter_lists(const char* op, at::TensorList weights, at::TensorList vectors,
                           at::IntArrayRef slots, int64_t max_kind);
// Checks a flat per-filter tensor: 1-D, `total` entries, dtype, device.
void check_flat(const char* op, const char* name, const at::Tensor& t, int64_t total,
                at::ScalarType dtype, const at::Device& device);
// Checks select_weak's arguments: flat float32 scores, bool removed, one int64 k per layer.
void check_select_args(const at::Tensor& scores, const at::Tensor& removed, at::IntArrayRef counts,
                       const at::Tensor& ks);
// All checks of attenuate_ / zero_removed_; return the total filter count.
int64_t check_attenuate_args(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                             const at::Tensor& weak, const at::Tensor& status, const at::Tensor& multiplier,
                             double factor, double eps);
int64_t check_zero_removed_args(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                                const at::Tensor& status);
// Does every filter (index along dim 0) of `t` fill one dense block of t[0].numel() elements
// with stride(0) >= that block (contiguous, channels-last, any inner permutation)?
bool rows_dense(const at::Tensor& t);
NormOrder parse_norm_order(c10::string_view ord);

// ---- CPU (csrc/cpu) ----
at::Tensor filter_norms_cpu(at::TensorList weights, c10::string_view ord);
at::Tensor select_weak_cpu(const at::Tensor& scores, const at::Tensor& removed, at::IntArrayRef counts,
                           const at::Tensor& ks);
std::tuple<at::Tensor, at::Tensor> attenuate_cpu(
    at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots, const at::Tensor& weak,
    const at::Tensor& status, const at::Tensor& multiplier, double factor, double eps, bool restore);
void zero_removed_cpu(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                      const at::Tensor& status);

// ---- CUDA (csrc/cuda), compiled when ATTENUATION_WITH_CUDA is defined ----
at::Tensor filter_norms_cuda(at::TensorList weights, c10::string_view ord);
at::Tensor select_weak_cuda(const at::Tensor& scores, const at::Tensor& removed, at::IntArrayRef counts,
                            const at::Tensor& ks);
std::tuple<at::Tensor, at::Tensor> attenuate_cuda(
    at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots, const at::Tensor& weak,
    const at::Tensor& status, const at::Tensor& multiplier, double factor, double eps, bool restore);
void zero_removed_cuda(at::TensorList weights, at::TensorList vectors, at::IntArrayRef slots,
                      const at::Tensor& status);

// ---- channel gathers of the masked convolution (csrc/cpu/channel_gather.cpp, csrc/cuda/...) ----
// 4-D tensors, contiguous or channels-last; results keep that memory format.
// gather_channels:  compact[:, j] = x[:, index[j]]
// scatter_channels: full[:, index[j]] = compact[:, j], zeros in every other of the n channels
// gather_weight:    w[o, i] = weight[out[o], in[i]] * scale[out[o]]   (no index = all, no scale = 1)
// scatter_weight:   full[out[o], in[i]] = g[o, i] * scale[out[o]], zeros elsewhere, full_sizes
at::Tensor gather_channels_cpu(const at::Tensor& x, const at::Tensor& index);
at::Tensor scatter_channels_cpu(const at::Tensor& compact, const at::Tensor& index, int64_t n);
at::Tensor gather_weight_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& out_index,
                             const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale);
at::Tensor scatter_weight_cpu(const at::Tensor& g, const c10::optional<at::Tensor>& out_index,
                              const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale,
                              at::IntArrayRef full_sizes);
at::Tensor gather_channels_cuda(const at::Tensor& x, const at::Tensor& index);
at::Tensor scatter_channels_cuda(const at::Tensor& compact, const at::Tensor& index, int64_t n);
at::Tensor gather_weight_cuda(const at::Tensor& weight, const c10::optional<at::Tensor>& out_index,
                              const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale);
at::Tensor scatter_weight_cuda(const at::Tensor& g, const c10::optional<at::Tensor>& out_index,
                               const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale,
                               at::IntArrayRef full_sizes);

}  // namespace attenuation
