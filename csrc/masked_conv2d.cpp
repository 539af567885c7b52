// masked_conv2d and its backward, for both devices: gather the live input channels and the live
// block of the weight (with the per-output-channel scale folded into it: one fused pass over the
// small weight instead of an epilogue over the large output), run the library convolution (oneDNN
// on the CPU, cuDNN on the GPU) on the compact problem with the bias fused in, and scatter the
// live output channels into a tensor whose dead channels are zero. The backward runs the library's
// convolution backward on the same compact problem. The gathers are device-specific
// (csrc/cpu/channel_gather.cpp, csrc/cuda/channel_gather.cu); this file only composes them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "attenuation/ops.h"

namespace attenuation {
namespace {

at::Tensor gather_channels(const at::Tensor& x, const at::Tensor& index) {
#ifdef ATTENUATION_WITH_CUDA
  if (x.is_cuda()) return gather_channels_cuda(x, index);
#endif
  return gather_channels_cpu(x, index);
}

at::Tensor scatter_channels(const at::Tensor& compact, const at::Tensor& index, int64_t n) {
#ifdef ATTENUATION_WITH_CUDA
  if (compact.is_cuda()) return scatter_channels_cuda(compact, index, n);
#endif
  return scatter_channels_cpu(compact, index, n);
}

at::Tensor gather_weight(const at::Tensor& weight, const c10::optional<at::Tensor>& out_index,
                         const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale) {
  if (!out_index && !in_index && !scale) return weight;
#ifdef ATTENUATION_WITH_CUDA
  if (weight.is_cuda()) return gather_weight_cuda(weight, out_index, in_index, scale);
#endif
  return gather_weight_cpu(weight, out_index, in_index, scale);
}

at::Tensor scatter_weight(const at::Tensor& g, const c10::optional<at::Tensor>& out_index,
                          const c10::optional<at::Tensor>& in_index, const c10::optional<at::Tensor>& scale,
                          at::IntArrayRef full_sizes) {
  if (!out_index && !in_index && !scale) return g;
#ifdef ATTENUATION_WITH_CUDA
  if (g.is_cuda()) return scatter_weight_cuda(g, out_index, in_index, scale, full_sizes);
#endif
  return scatter_weight_cpu(g, out_index, in_index, scale, full_sizes);
}

// A channel index list, checked. On the CPU the values are checked too (strictly increasing, in
// range); on the GPU that would need a host read, so they must be as nonzero() of a mask gives them.
// A given list is always gathered, even a full one: the gathered input is an output of the forward,
// whose shape must not depend on the values (the Python backend passes None for full lists).
c10::optional<at::Tensor> live_index(const char* name, const c10::optional<at::Tensor>& index, int64_t n,
                                     const at::Tensor& x) {
  if (!index.has_value() || !index->defined()) return c10::nullopt;
  const at::Tensor& idx = *index;
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "masked_conv2d: ", name,
              " must be a 1-D int64 tensor, got ", idx.scalar_type(), " of shape ", idx.sizes());
  TORCH_CHECK(idx.device() == x.device(), "masked_conv2d: ", name, " is on ", idx.device(),
              ", the input on ", x.device());
  TORCH_CHECK(idx.numel() <= n, "masked_conv2d: ", name, " has ", idx.numel(), " entries for ", n,
              " channels");
  if (idx.is_cpu()) {
    const at::Tensor c = idx.contiguous();
    const int64_t* v = c.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < c.numel(); ++j) {
      TORCH_CHECK(v[j] >= 0 && v[j] < n, "masked_conv2d: ", name, " has channel ", v[j], " out of [0, ", n, ")");
      TORCH_CHECK(j == 0 || v[j] > v[j - 1], "masked_conv2d: ", name, " must be strictly increasing");
    }
    return c;
  }
  return idx.contiguous();
}

struct Problem {
  c10::optional<at::Tensor> out_index, in_index, scale;
  int64_t live_out, live_in;
};

// `x_is_live`: x holds the live input channels only (the backward's saved input).
Problem check_problem(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& out_index, const c10::optional<at::Tensor>& in_index,
                      const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, bool x_is_live) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "masked_conv2d: expected 4-D input and weight, got ",
              x.dim(), "-D and ", weight.dim(), "-D");
  TORCH_CHECK(x.is_floating_point() && x.scalar_type() == weight.scalar_type(),
              "masked_conv2d: input and weight must have the same floating dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "masked_conv2d: input is on ", x.device(), ", weight on ",
              weight.device());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "masked_conv2d: stride, padding and dilation must have 2 entries each");
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0,
                "masked_conv2d: stride and dilation must be positive and padding non-negative");
  }
  const int64_t n_out = weight.size(0);
  for (const auto& [name, t] : {std::pair{"bias", bias}, std::pair{"scale", scale}}) {
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n_out, "masked_conv2d: ", name, " must have shape (", n_out,
                ",), got ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), "masked_conv2d: ", name, " is on ", t->device(), ", the input on ",
                x.device());
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "masked_conv2d: bias must be ", x.scalar_type(),
                " like the input, got ", bias->scalar_type());
  }
  Problem p;
  p.out_index = live_index("out_index", out_index, n_out, x);
  p.in_index = live_index("in_index", in_index, weight.size(1), x);
  p.scale = scale.has_value() && scale->defined() ? scale : c10::nullopt;
  p.live_out = p.out_index ? p.out_index->numel() : n_out;
  p.live_in = p.in_index ? p.in_index->numel() : weight.size(1);
  const int64_t expected = x_is_live ? p.live_in : weight.size(1);
  TORCH_CHECK(x.size(1) == expected, "masked_conv2d", x_is_live ? "_backward: the live input has " : ": input has ",
              x.size(1), " channels, expected ", expected);
  return p;
}

std::vector<int64_t> output_size(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> size{x.size(0), weight.size(0)};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = dilation[d] * (weight.size(2 + d) - 1) + 1;
    const int64_t out = (x.size(2 + d) + 2 * padding[d] - extent) / stride[d] + 1;
    TORCH_CHECK(out > 0, "masked_conv2d: the kernel (extent ", extent, ") is larger than the padded input (",
                x.size(2 + d) + 2 * padding[d], ")");
    size.push_back(out);
  }
  return size;
}

// The memory format of the library convolution's output: channels-last if the input or the weight
// is (oneDNN and cuDNN both decide so); every output of the op follows it.
at::MemoryFormat output_format(const at::Tensor& x, const at::Tensor& weight) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  return x.suggest_memory_format() == cl || weight.suggest_memory_format() == cl ? cl
                                                                                 : at::MemoryFormat::Contiguous;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_conv2d(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& out_index, const c10::optional<at::Tensor>& in_index,
    const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Problem p = check_problem(x, weight, bias, out_index, in_index, scale, stride, padding, dilation, false);
  const auto full = output_size(x, weight, stride, padding, dilation);
  const auto format = output_format(x, weight);
  // The live input channels, returned for the backward (which then need not gather them again).
  const at::Tensor x_live = p.in_index ? gather_channels(x, *p.in_index) : x.new_empty({0});
  at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  if (b.defined() && p.out_index) b = b.index_select(0, *p.out_index);
  at::Tensor y;
  if (p.live_out == 0) {
    return {at::zeros(full, x.options().memory_format(format)), x_live};
  } else if (p.live_in == 0) {  // nothing to convolve: the live channels hold their bias
    y = at::zeros({full[0], p.live_out, full[2], full[3]}, x.options().memory_format(format));
    if (b.defined()) y.add_(b.view({1, -1, 1, 1}));
  } else {
    const at::Tensor wc = gather_weight(weight, p.out_index, p.in_index, p.scale);
    y = at::convolution(p.in_index ? x_live : x, wc, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt,
                        stride, padding, dilation, false, {0, 0}, 1);
  }
  return {p.out_index ? scatter_channels(y, *p.out_index, weight.size(0)) : y, x_live};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x_live, const at::Tensor& weight,
    const c10::optional<at::Tensor>& out_index, const c10::optional<at::Tensor>& in_index,
    const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, std::array<bool, 4> output_mask) {
  const at::Tensor& x = x_live;
  const Problem p = check_problem(x, weight, c10::nullopt, out_index, in_index, scale, stride, padding, dilation,
                                  true);
  const auto full = output_size(x, weight, stride, padding, dilation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(full), "masked_conv2d_backward: grad_out has shape ",
              grad_out.sizes(), ", the output ", at::IntArrayRef(full));
  // Gathered through its strides: an expanded gradient (of a sum, say) is never materialised.
  const at::Tensor gc = p.out_index ? gather_channels(grad_out, *p.out_index) : grad_out;
  const bool convolve = p.live_out > 0 && p.live_in > 0;
  at::Tensor gx, gw, gb, gs;
  if (convolve && (output_mask[0] || output_mask[1] || output_mask[3])) {
    const at::Tensor wc = gather_weight(weight, p.out_index, p.in_index, p.scale);
    std::tie(gx, gw, std::ignore) = at::convolution_backward(
        gc, x, wc, c10::nullopt, stride, padding, dilation, false, {0, 0}, 1,
        {output_mask[0], output_mask[1] || output_mask[3], false});
  }
  const auto empty = x.new_empty({0});
  at::Tensor grad_x = empty, grad_w = empty, grad_b = empty, grad_s = empty;
  if (output_mask[0]) {
    const std::vector<int64_t> x_size{x.size(0), weight.size(1), x.size(2), x.size(3)};
    if (!gx.defined()) grad_x = at::zeros(x_size, x.options());
    else grad_x = p.in_index ? scatter_channels(gx, *p.in_index, weight.size(1)) : gx;
    grad_x = grad_x.contiguous(output_format(x, weight));
  }
  if (output_mask[1]) {
    grad_w = gw.defined() ? scatter_weight(gw, p.out_index, p.in_index, p.scale, weight.sizes())
                          : at::zeros(weight.sizes(), weight.options());
    grad_w = grad_w.contiguous(weight.suggest_memory_format());
  }
  if (output_mask[2]) {
    const at::Tensor live = p.live_out ? gc.sum({0, 2, 3}) : gc.new_zeros({0});
    grad_b = p.out_index ? at::zeros({weight.size(0)}, live.options()).index_copy_(0, *p.out_index, live) : live;
  }
  if (output_mask[3]) {
    TORCH_CHECK(p.scale.has_value(), "masked_conv2d_backward: the gradient of a missing scale was asked for");
    // d(w * s)/ds = w: the gradient of the scale is <grad of the scaled weight, unscaled weight>.
    at::Tensor live = gw.defined()
        ? (gw.to(at::kFloat) * gather_weight(weight, p.out_index, p.in_index, c10::nullopt).to(at::kFloat)).sum({1, 2, 3})
        : at::zeros({p.live_out}, x.options().dtype(at::kFloat));
    live = live.to(p.scale->scalar_type());
    grad_s = p.out_index ? at::zeros({weight.size(0)}, live.options()).index_copy_(0, *p.out_index, live) : live;
  }
  return {grad_x, grad_w, grad_b, grad_s};
}

TORCH_LIBRARY_IMPL(attenuation, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward);
}

#ifdef ATTENUATION_WITH_CUDA
TORCH_LIBRARY_IMPL(attenuation, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward);
}
#endif

}  // namespace attenuation
