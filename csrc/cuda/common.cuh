// Pieces shared by the CUDA kernels: multi-tensor layer tables passed by value, one warp per filter,
// the element-type switch on the device and the reference's in-place scaling of one element.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace attenuation {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kBlockSize = kWarpSize * kWarpsPerBlock;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

// The layers of one launch, a by-value kernel argument (like PyTorch's multi_tensor_apply metadata):
// no device table to upload, no synchronisation. Only layers with filters are entered, consecutive
// ones of the model, so a table's filters are the flat filter indices [first[0], first[size]).
template <typename Layer, int Capacity>
struct LayerTable {
  static constexpr int kCapacity = Capacity;
  int64_t first[Capacity + 1];  // flat index of each layer's first filter, then the end of the range
  Layer layers[Capacity];
  int size;
};

// Enters the layers with filters (counts[l] of them; make(l) gives the entry) into tables and
// calls launch(table) for each full table and for the rest: a model whose layers fit in one table
// takes one launch.
template <typename Table, typename Make, typename Launch>
void for_each_table(c10::ArrayRef<int64_t> counts, Make&& make, Launch&& launch) {
  Table table{};
  int64_t start = 0;
  for (size_t l = 0; l < counts.size(); start += counts[l++]) {
    if (counts[l] == 0) continue;
    if (table.size == Table::kCapacity) {
      launch(table);
      table.size = 0;
    }
    table.first[table.size] = start;
    table.layers[table.size++] = make(l);
    table.first[table.size] = start + counts[l];
  }
  if (table.size > 0) launch(table);
}

// Blocks of kBlockSize threads for one warp per item.
inline unsigned blocks_for_warps(int64_t items) {
  return static_cast<unsigned>(std::min(kMaxBlocks, (items + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

// The kernels' loop over filters: warp w takes filters first[0] + w, + w + warp count, ...
__device__ __forceinline__ int64_t warp_index() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
}
__device__ __forceinline__ int64_t warp_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
}

// The table entry of a filter: the last layer whose first filter is <= filter (binary search;
// the whole warp asks for the same filter, so the parameter reads are broadcasts).
template <typename Table>
__device__ __forceinline__ int layer_of(const Table& table, int64_t filter) {
  int lo = 0, hi = table.size - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first[mid] <= filter) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The element types the kernels take.
inline bool is_kernel_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}

// Calls f(T{}) with T the element type of `dtype`, one of is_kernel_dtype's (checked on the host).
// Within a launch, layers may differ in dtype: the branch is uniform across a warp.
template <typename F>
__device__ __forceinline__ void with_element_type(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;
  }
}

// x * s the way the reference's t.mul_(scale.to(t.dtype)) computes it: s (float32) rounded to T
// first, the product taken in T's op math type (float for the 16-bit types, where the product of
// two of them is exact) and rounded to T once. NaN or inf times 0 stays NaN.
template <typename T>
__device__ __forceinline__ T scaled(T x, float s) {
  using op_t = at::opmath_type<T>;
  return static_cast<T>(static_cast<op_t>(x) * static_cast<op_t>(static_cast<T>(s)));
}

}  // namespace cuda
}  // namespace attenuation
