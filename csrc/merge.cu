// Fused, in-place attention merge (one pass over out, lse, part_out, part_lse):
// the kernel form of seqpar/kernels/merge.py's merge_. Formula and layouts: seqpar_kernels.h.
//
// Work split: a group of G lanes of one warp per row (b, i, h); G = the power of two that
// covers D, at most 32, so a warp serves 32/G rows. Every lane of the group reads the old
// lse and computes the row's weight; after __syncwarp only the group's first lane writes
// the merged lse, so no lane reads a value another lane already replaced.
#include "seqpar_math.cuh"

namespace seqpar {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond that

template <typename PartT, typename LseT>
__global__ void __launch_bounds__(kThreads) merge_kernel(seqpar_merge_args a, int group, bool heads_inner) {
  const int lane = threadIdx.x & 31;
  const int rows_per_warp = 32 / group;
  const int64_t total = a.batch * a.rows * a.heads;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  // the loop bound depends on the warp only, so every lane reaches each __syncwarp
  for (int64_t base = warp * rows_per_warp; base < total; base += warps * rows_per_warp) {
    const int64_t r = base + lane / group;
    const bool active = r < total;
    MergeRow row{0, 0, 0};
    MergeWeight<LseT> w{0.0f, LseT(0)};
    if (active) {
      row = merge_row(a, r, heads_inner);
      w = merge_row_weight<LseT>(a, row);
      merge_row_elements<PartT>(a, row, w.w_part, lane % group, group);
    }
    __syncwarp();
    if (active && lane % group == 0) merge_row_store_lse<LseT>(a, row, w.lse);
  }
}

template <typename PartT, typename LseT>
cudaError_t launch(const seqpar_merge_args& a, cudaStream_t stream) {
  const int group = merge_lanes_per_row(a.head_dim);
  const int64_t total = a.batch * a.rows * a.heads;
  const int64_t rows_per_block = (kThreads / 32) * (32 / group);
  int64_t blocks = (total + rows_per_block - 1) / rows_per_block;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  merge_kernel<PartT, LseT><<<unsigned(blocks), kThreads, 0, stream>>>(a, group, merge_heads_inner(a));
  return cudaGetLastError();
}

template <typename LseT>
cudaError_t launch_part(const seqpar_merge_args& a, cudaStream_t stream) {
  switch (a.part_dtype) {
    case SEQPAR_FLOAT32: return launch<float, LseT>(a, stream);
    case SEQPAR_FLOAT16: return launch<__half, LseT>(a, stream);
    case SEQPAR_BFLOAT16: return launch<__nv_bfloat16, LseT>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace seqpar

extern "C" cudaError_t seqpar_merge(const seqpar_merge_args* args, cudaStream_t stream) {
  if (args == nullptr || args->batch < 0 || args->rows < 0 || args->heads < 0 || args->head_dim < 0) {
    return cudaErrorInvalidValue;
  }
  if (args->batch == 0 || args->rows == 0 || args->heads == 0) return cudaSuccess;
  switch (args->lse_dtype) {
    case SEQPAR_FLOAT32: return seqpar::launch_part<float>(*args, stream);
    case SEQPAR_FLOAT64: return seqpar::launch_part<double>(*args, stream);
    default: return cudaErrorInvalidValue;
  }
}
