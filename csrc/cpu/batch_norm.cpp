// Batch normalisation of channels-last activations on the CPU, for any channel count.
//
// Why: PyTorch's CPU kernels vectorise channels-last BatchNorm along the channels, so a count that
// is not a multiple of the vector width (what pruning leaves: 10, 21, 83, ...) runs a scalar tail
// per pixel: 3-6x slower than a multiple of 16, and slower than the unpruned layer (bench/
// RESULTS.md). Here a channels-last tensor is read as one flat array in which element i belongs to
// channel i % C: every pass walks it in chunks of L elements, L a multiple of both C and the vector
// width, with per-lane coefficient (or accumulator) arrays of length L that repeat the C channel
// values. The inner loops are then plain stride-1 loops that the compiler vectorises for any C.
// Semantics: attenuation/batch_norm.py (the reference is F.batch_norm).
//
// The loops are compiled for AVX-512, AVX2 and the baseline x86-64 and chosen at load time
// (GCC's target_clones); they run on one thread (the extension is built without OpenMP; the data
// of one layer is a few MB and the passes are memory-bound).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

#include "channels_last_loops.h"

namespace attenuation {
namespace {

// Element stores from the accumulation type; bfloat16 rounds to nearest even by bit operations.
ATTENUATION_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
ATTENUATION_INLINE void store(double* p, int64_t i, double v) { p[i] = v; }
ATTENUATION_INLINE void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
ATTENUATION_INLINE void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  // NaN stays NaN: its payload is nonzero in the top mantissa bits the rounding keeps or carries into
  const uint32_t rounded = (v != v) ? (bits | 0x00400000u) : bits + 0x7FFFu + ((bits >> 16) & 1u);
  const uint16_t half = static_cast<uint16_t>(rounded >> 16);
  std::memcpy(p + i, &half, sizeof(half));
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Chunks summed in the accumulation type before they are added to the double totals.
constexpr int64_t kBlock = 64;

// The flat period: a multiple of C and of 16 elements (a 512-bit vector of floats), at least 512.
int64_t period(int64_t C) {
  int64_t L = C * (16 / std::gcd(C, int64_t{16}));
  while (L < 512) L *= 2;
  return L;
}

// The C per-channel values repeated over the L lanes of the period.
template <typename A>
std::vector<A> lanes(const std::vector<A>& per_channel, int64_t L) {
  const int64_t C = static_cast<int64_t>(per_channel.size());
  std::vector<A> out(L);
  for (int64_t j = 0; j < L; ++j) out[j] = per_channel[j % C];
  return out;
}

// ---- the vectorised passes over the n elements, chunk by chunk of L (the last may be partial) ----

// s1[j] += sum (x - shift[j]), s2[j] += sum (x - shift[j])^2, lane by lane.
template <typename T, typename A = typename Acc<T>::type>
ATTENUATION_INLINE void shifted_sums(const T* x, int64_t n, int64_t L, const A* shift, double* s1, double* s2,
                                     A* b1, A* b2) {
  for (int64_t c0 = 0; c0 < n; c0 += kBlock * L) {
    std::fill(b1, b1 + L, A{0});
    std::fill(b2, b2 + L, A{0});
    for (int64_t c = c0; c < std::min(n, c0 + kBlock * L); c += L) {
      const T* p = x + c;
      const int64_t len = std::min(L, n - c);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const A d = load(p, j) - shift[j];
        b1[j] += d;
        b2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      s1[j] += b1[j];
      s2[j] += b2[j];
    }
  }
}

// y = x * a[j] + b[j]
template <typename T, typename A = typename Acc<T>::type>
ATTENUATION_INLINE void affine(const T* x, T* y, int64_t n, int64_t L, const A* a, const A* b) {
  for (int64_t c = 0; c < n; c += L) {
    const T* p = x + c;
    T* q = y + c;
    const int64_t len = std::min(L, n - c);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) store(q, j, load(p, j) * a[j] + b[j]);
  }
}

// s1[j] += sum dy, s2[j] += sum dy * (x - mean[j])
template <typename T, typename A = typename Acc<T>::type>
ATTENUATION_INLINE void grad_sums(const T* dy, const T* x, int64_t n, int64_t L, const A* mean, double* s1,
                                  double* s2, A* b1, A* b2) {
  for (int64_t c0 = 0; c0 < n; c0 += kBlock * L) {
    std::fill(b1, b1 + L, A{0});
    std::fill(b2, b2 + L, A{0});
    for (int64_t c = c0; c < std::min(n, c0 + kBlock * L); c += L) {
      const T* g = dy + c;
      const T* p = x + c;
      const int64_t len = std::min(L, n - c);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const A d = load(g, j);
        b1[j] += d;
        b2[j] += d * (load(p, j) - mean[j]);
      }
    }
    for (int64_t j = 0; j < L; ++j) {
      s1[j] += b1[j];
      s2[j] += b2[j];
    }
  }
}

// dx = dy * k1[j] + x * k2[j] + k3[j]
template <typename T, typename A = typename Acc<T>::type>
ATTENUATION_INLINE void grad_input(const T* dy, const T* x, T* dx, int64_t n, int64_t L, const A* k1,
                                   const A* k2, const A* k3) {
  for (int64_t c = 0; c < n; c += L) {
    const T* g = dy + c;
    const T* p = x + c;
    T* q = dx + c;
    const int64_t len = std::min(L, n - c);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) store(q, j, load(g, j) * k1[j] + load(p, j) * k2[j] + k3[j]);
  }
}

// One entry point per pass, compiled per instruction set, with the element type as an argument.
ATTENUATION_ISA_CLONES void shifted_sums_pass(at::ScalarType type, const void* x, int64_t n, int64_t L,
                                              const void* shift, double* s1, double* s2, void* b1, void* b2) {
  ATTENUATION_BY_FLOATING_TYPE(type, T, {
    using A = typename Acc<T>::type;
    shifted_sums(static_cast<const T*>(x), n, L, static_cast<const A*>(shift), s1, s2,
                 static_cast<A*>(b1), static_cast<A*>(b2));
  })
}

ATTENUATION_ISA_CLONES void affine_pass(at::ScalarType type, const void* x, void* y, int64_t n, int64_t L,
                                        const void* a, const void* b) {
  ATTENUATION_BY_FLOATING_TYPE(type, T, {
    using A = typename Acc<T>::type;
    affine(static_cast<const T*>(x), static_cast<T*>(y), n, L, static_cast<const A*>(a),
           static_cast<const A*>(b));
  })
}

ATTENUATION_ISA_CLONES void grad_sums_pass(at::ScalarType type, const void* dy, const void* x, int64_t n,
                                           int64_t L, const void* mean, double* s1, double* s2, void* b1,
                                           void* b2) {
  ATTENUATION_BY_FLOATING_TYPE(type, T, {
    using A = typename Acc<T>::type;
    grad_sums(static_cast<const T*>(dy), static_cast<const T*>(x), n, L, static_cast<const A*>(mean),
              s1, s2, static_cast<A*>(b1), static_cast<A*>(b2));
  })
}

ATTENUATION_ISA_CLONES void grad_input_pass(at::ScalarType type, const void* dy, const void* x, void* dx,
                                            int64_t n, int64_t L, const void* k1, const void* k2,
                                            const void* k3) {
  ATTENUATION_BY_FLOATING_TYPE(type, T, {
    using A = typename Acc<T>::type;
    grad_input(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), n, L,
               static_cast<const A*>(k1), static_cast<const A*>(k2), static_cast<const A*>(k3));
  })
}

// ---- the ops ---------------------------------------------------------------------------------

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  check_channels_last(op, name, t);
  TORCH_CHECK(t.size(1) > 0, op, ": ", name, " has no channels");
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A per-channel vector (weight, bias, mean, var, scale, shift) as a host vector of the accumulation
// type; `fill` where the tensor is absent.
template <typename A>
std::vector<A> channel_values(const char* op, const char* name, const c10::optional<at::Tensor>& t, int64_t C,
                              A fill) {
  if (!t.has_value() || !t->defined()) return std::vector<A>(C, fill);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape (", C, ",), got ", t->sizes());
  TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be floating, got ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t->device());
  const at::Tensor values = t->detach().to(at::kDouble).contiguous();
  const double* v = values.const_data_ptr<double>();
  return std::vector<A>(v, v + C);
}

at::Tensor as_tensor(const std::vector<double>& v, const at::Tensor& like, at::ScalarType type) {
  return at::tensor(v, like.options().dtype(at::kDouble)).to(type);
}

// Per channel, the L lanes' totals folded: out[c] = sum of s[j] over the lanes j of channel c.
std::vector<double> fold(const std::vector<double>& s, int64_t C) {
  std::vector<double> out(C, 0.0);
  for (size_t j = 0; j < s.size(); ++j) out[j % C] += s[j];
  return out;
}

// Runs `fn` with a zero of the accumulation type of x's dtype.
template <typename Fn>
void with_acc(const at::Tensor& x, const Fn& fn) {
  if (x.scalar_type() == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

}  // namespace

// (out, mean, var): the batch statistics over N, H, W (var biased) and the normalised, scaled and
// shifted output. The sums are taken about the first pixel's values (shifted data: no cancellation
// when the mean is large against the spread), in the accumulation type per block of chunks and in
// double across blocks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps) {
  constexpr const char* op = "batch_norm_train";
  check_activation(op, "x", x);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
  const int64_t C = x.size(1), n = x.numel(), M = n / C, L = period(C);
  TORCH_CHECK(M > 1, op, ": expected more than 1 value per channel when training, got input of size ", x.sizes());
  at::Tensor out = at::empty_like(x), mean_t, var_t;
  with_acc(x, [&](auto zero) {
    using A = decltype(zero);
    const std::vector<A> w = channel_values<A>(op, "weight", weight, C, A{1});
    const std::vector<A> b = channel_values<A>(op, "bias", bias, C, A{0});
    const at::Tensor first_t = x.permute({0, 2, 3, 1}).reshape({-1}).narrow(0, 0, C).to(acc_type(x)).contiguous();
    const A* first_p = static_cast<const A*>(first_t.const_data_ptr());
    const std::vector<A> first(first_p, first_p + C), shift = lanes(first, L);
    std::vector<double> s1(L, 0.0), s2(L, 0.0);
    std::vector<A> b1(L), b2(L);
    shifted_sums_pass(x.scalar_type(), x.const_data_ptr(), n, L, shift.data(), s1.data(), s2.data(), b1.data(),
                      b2.data());
    const std::vector<double> t1 = fold(s1, C), t2 = fold(s2, C);
    std::vector<double> mean(C), var(C);
    std::vector<A> scale(C), offset(C);
    for (int64_t c = 0; c < C; ++c) {
      const double m1 = t1[c] / double(M);
      mean[c] = double(first[c]) + m1;
      var[c] = std::max(0.0, t2[c] / double(M) - m1 * m1);
      const double invstd = 1.0 / std::sqrt(var[c] + eps);
      scale[c] = static_cast<A>(double(w[c]) * invstd);
      offset[c] = static_cast<A>(double(b[c]) - mean[c] * double(w[c]) * invstd);
    }
    const std::vector<A> a = lanes(scale, L), o = lanes(offset, L);
    affine_pass(x.scalar_type(), x.const_data_ptr(), out.data_ptr(), n, L, a.data(), o.data());
    mean_t = as_tensor(mean, x, acc_type(x));
    var_t = as_tensor(var, x, acc_type(x));
  });
  return {out, mean_t, var_t};
}

// out = x * scale + shift per channel: an evaluation-mode BatchNorm with its statistics folded in.
at::Tensor channel_affine_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  constexpr const char* op = "channel_affine";
  check_activation(op, "x", x);
  const int64_t C = x.size(1), L = period(C);
  at::Tensor out = at::empty_like(x);
  with_acc(x, [&](auto zero) {
    using A = decltype(zero);
    const std::vector<A> a = lanes(channel_values<A>(op, "scale", scale, C, A{1}), L);
    const std::vector<A> o = lanes(channel_values<A>(op, "shift", shift, C, A{0}), L);
    affine_pass(x.scalar_type(), x.const_data_ptr(), out.data_ptr(), x.numel(), L, a.data(), o.data());
  });
  return out;
}

// Gradients of batch_norm_train's output with respect to (x, weight, bias), from the statistics it
// returned; an entry of output_mask that is false gets an empty tensor of shape (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean_t, const at::Tensor& var_t, double eps, std::array<bool, 3> output_mask) {
  constexpr const char* op = "batch_norm_backward";
  check_activation(op, "x", x);
  TORCH_CHECK(grad_out_in.sizes() == x.sizes() && grad_out_in.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x (", x.scalar_type(), " ", x.sizes(), "), got ", grad_out_in.scalar_type(),
              " ", grad_out_in.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
  const at::Tensor grad_out = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1), n = x.numel(), M = n / C, L = period(C);
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type() : acc_type(x);
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : x.new_empty({0});
  at::Tensor grad_w = x.new_empty({0}), grad_b = x.new_empty({0});
  with_acc(x, [&](auto zero) {
    using A = decltype(zero);
    const std::vector<A> mean = channel_values<A>(op, "mean", mean_t, C, A{0});
    const std::vector<A> var = channel_values<A>(op, "var", var_t, C, A{1});
    const std::vector<A> w = channel_values<A>(op, "weight", weight, C, A{1});
    const std::vector<A> mean_lanes = lanes(mean, L);
    std::vector<double> s1(L, 0.0), s2(L, 0.0);
    std::vector<A> b1(L), b2(L);
    grad_sums_pass(x.scalar_type(), grad_out.const_data_ptr(), x.const_data_ptr(), n, L, mean_lanes.data(),
                   s1.data(), s2.data(), b1.data(), b2.data());
    const std::vector<double> sum_dy = fold(s1, C), sum_dy_xmu = fold(s2, C);
    std::vector<double> invstd(C), gw(C);
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = 1.0 / std::sqrt(double(var[c]) + eps);
      gw[c] = sum_dy_xmu[c] * invstd[c];
    }
    if (output_mask[1]) grad_w = as_tensor(gw, x, param_type);
    if (output_mask[2]) grad_b = as_tensor(sum_dy, x, param_type);
    if (output_mask[0]) {
      // dx = w invstd (dy - mean(dy) - (x - mean) invstd^2 mean(dy (x - mean))): per channel an
      // affine function of dy and x
      std::vector<A> k1(C), k2(C), k3(C);
      for (int64_t c = 0; c < C; ++c) {
        const double a = double(w[c]) * invstd[c];
        const double b = -a * invstd[c] * invstd[c] * sum_dy_xmu[c] / double(M);
        k1[c] = static_cast<A>(a);
        k2[c] = static_cast<A>(b);
        k3[c] = static_cast<A>(-a * sum_dy[c] / double(M) - double(mean[c]) * b);
      }
      const std::vector<A> l1 = lanes(k1, L), l2 = lanes(k2, L), l3 = lanes(k3, L);
      grad_input_pass(x.scalar_type(), grad_out.const_data_ptr(), x.const_data_ptr(), grad_x.data_ptr(), n, L,
                      l1.data(), l2.data(), l3.data());
    }
  });
  return {grad_x, grad_w, grad_b};
}

TORCH_LIBRARY_IMPL(attenuation, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("channel_affine", &channel_affine_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace attenuation
