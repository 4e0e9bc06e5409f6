// Linear-attention state kernels: the combine `exp(G) * S_in + S_local` (whole states or a
// range of Dk rows, the sub-blocks that ZeCO's all-scan pipelines) and the inclusive scan
// over a stack of states. Formulas and layouts: seqpar_kernels.h. Both are memory bound,
// one thread per state element; the scan walks its C chunks sequentially in registers,
// so each element of the stack is read and written once.
#include "seqpar_math.cuh"

namespace seqpar {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond that

unsigned blocks_for(int64_t elements) {
  int64_t blocks = (elements + kThreads - 1) / kThreads;
  return unsigned(blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

__global__ void __launch_bounds__(kThreads) state_combine_kernel(seqpar_state_combine_args a, int64_t elements) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < elements; e += stride) {
    state_combine_element(a, e);
  }
}

__global__ void __launch_bounds__(kThreads) state_scan_kernel(seqpar_state_scan_args a, int64_t elements) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < elements; e += stride) {
    state_scan_element(a, e);
  }
}

}  // namespace
}  // namespace seqpar

extern "C" cudaError_t seqpar_state_combine(const seqpar_state_combine_args* args, cudaStream_t stream) {
  if (args == nullptr || args->batch < 0 || args->heads < 0 || args->dk < 0 || args->dv < 0 ||
      args->row_start < 0 || args->row_end < args->row_start || args->row_end > args->dk) {
    return cudaErrorInvalidValue;
  }
  const int64_t elements = args->batch * args->heads * (args->row_end - args->row_start) * args->dv;
  if (elements == 0) return cudaSuccess;
  seqpar::state_combine_kernel<<<seqpar::blocks_for(elements), seqpar::kThreads, 0, stream>>>(*args, elements);
  return cudaGetLastError();
}

extern "C" cudaError_t seqpar_state_scan(const seqpar_state_scan_args* args, cudaStream_t stream) {
  if (args == nullptr || args->chunks < 0 || args->batch < 0 || args->heads < 0 || args->dk < 0 || args->dv < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t elements = args->batch * args->heads * args->dk * args->dv;
  if (elements == 0 || args->chunks == 0) return cudaSuccess;
  seqpar::state_scan_kernel<<<seqpar::blocks_for(elements), seqpar::kThreads, 0, stream>>>(*args, elements);
  return cudaGetLastError();
}
