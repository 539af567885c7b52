// The per-filter logic of the ops, shared by the CPU and CUDA implementations.
//
// Everything here is `__host__ __device__` (plain inline functions in a C++ build), so the CPU
// tests exercise the very code the CUDA kernels run. The rule is the one of
// attenuation/ops/reference.py: keep the two in step.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATTENUATION_HD __host__ __device__ __forceinline__
#else
#define ATTENUATION_HD inline
#endif

namespace attenuation {

// Per-filter status codes (attenuation.ops.ACTIVE / WEAK / REMOVED).
constexpr uint8_t kActive = 0;
constexpr uint8_t kWeak = 1;
constexpr uint8_t kRemoved = 2;

// Norm orders of filter_norms (attenuation.ops.NORMS, same order).
enum class NormOrder : int64_t { L1 = 0, L2 = 1, Linf = 2 };

// Running per-filter norm: accumulate |v| (L1), v^2 (L2) or max |v| (Linf) in float32 (float64
// for float64 weights), combine partial accumulators, finish (sqrt for L2).
template <typename acc_t>
ATTENUATION_HD acc_t norm_accumulate(NormOrder ord, acc_t acc, acc_t v) {
  const acc_t a = v < acc_t(0) ? -v : v;
  switch (ord) {
    case NormOrder::L1: return acc + a;
    case NormOrder::L2: return acc + v * v;
    default: return (a > acc || a != a) ? a : acc;  // max that propagates NaN, like torch.amax
  }
}

template <typename acc_t>
ATTENUATION_HD acc_t norm_combine(NormOrder ord, acc_t a, acc_t b) {
  if (ord == NormOrder::Linf) return (b > a || b != b) ? b : a;
  return a + b;
}

template <typename acc_t>
ATTENUATION_HD acc_t norm_finish(NormOrder ord, acc_t acc) {
  return ord == NormOrder::L2 ? sqrt(acc) : acc;
}

// The selection order of select_weak: removed filters first, then ascending score (NaN after
// every number, as torch.sort puts it), ties by lower index. True when filter a ranks before b.
ATTENUATION_HD bool ranks_before(bool removed_a, float score_a, int64_t index_a,
                                 bool removed_b, float score_b, int64_t index_b) {
  if (removed_a != removed_b) return removed_a;
  const bool nan_a = score_a != score_a, nan_b = score_b != score_b;
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && score_a != score_b) return score_a < score_b;
  return index_a < index_b;
}

// What one attenuation step does to one filter.
struct FilterUpdate {
  float scale;          // factor for weight row, bias, gamma, beta, running mean (var: scale^2)
  float multiplier;     // new multiplier
  uint8_t status;       // new status
  bool returned;        // was weak, is not any more
  bool newly_removed;   // crossed the removal threshold in this step
};

// One attenuation step for one filter (reference.attenuate_): a weak, not removed filter is scaled
// by `factor` and so is its multiplier; below `eps` it is removed (scale 0). A filter that was weak
// and is not returns (multiplier 1; with `restore`, scaled back by 1 / old multiplier). Removed
// filters are re-zeroed. All arithmetic in float32, as the reference does it.
ATTENUATION_HD FilterUpdate attenuate_filter(bool weak, uint8_t status, float multiplier,
                                             float factor, float eps, bool restore) {
  const bool was_removed = status == kRemoved;
  const bool hit = weak && !was_removed;
  const float new_mult = hit ? multiplier * factor : 1.0f;
  FilterUpdate u;
  u.newly_removed = hit && (new_mult < eps);
  u.returned = status == kWeak && !weak;
  const bool removed = was_removed || u.newly_removed;
  float kept = hit ? factor : 1.0f;
  if (restore && u.returned && multiplier > 0.0f) {
    kept = 1.0f / (multiplier < 1e-30f ? 1e-30f : multiplier);
  }
  u.scale = removed ? 0.0f : kept;
  u.multiplier = removed ? 0.0f : new_mult;
  u.status = removed ? kRemoved : (weak ? kWeak : kActive);
  return u;
}

// zero_removed_: removed filters are multiplied by 0, every other one is left as it is.
ATTENUATION_HD float zero_removed_scale(uint8_t status) { return status == kRemoved ? 0.0f : 1.0f; }

}  // namespace attenuation
