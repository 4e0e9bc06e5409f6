/* The C interface of seqpar's CUDA kernels: raw pointers, sizes, strides (in elements)
 * and a stream. Nothing here depends on torch, so the .cu files compile with nvcc alone
 * and the torch binding (bindings.cpp) is an ordinary host C++ file.
 *
 * Every launcher checks its arguments' dtype codes, launches on `stream` and returns
 * cudaErrorInvalidValue for an unsupported combination, else the launch status
 * (cudaGetLastError). Sizes of zero launch nothing and return cudaSuccess.
 */
#ifndef SEQPAR_KERNELS_H
#define SEQPAR_KERNELS_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum seqpar_dtype {
  SEQPAR_FLOAT32 = 0,
  SEQPAR_FLOAT16 = 1,
  SEQPAR_BFLOAT16 = 2,
  SEQPAR_FLOAT64 = 3
} seqpar_dtype;

/* Fused attention merge, in place: for every row (b, i, h)
 *     d   = part_lse - lse          (0 where both are -inf)
 *     out = out + sigmoid(d) * (part_out - out)
 *     lse = max(lse, part_lse) + log1p(exp(-|d|))
 * out [B, n, H, D] float32; lse [B, H, n] float32 or float64 (the arithmetic of the
 * weights runs in lse's dtype); part_out [B, n, H, D] float32, float16 or bfloat16;
 * part_lse [B, H, n] float32. Any strides; out/lse must not overlap themselves or
 * part_out/part_lse. */
typedef struct seqpar_merge_args {
  int64_t batch, rows, heads, head_dim; /* B, n, H, D */
  float* out;
  int64_t out_stride[4];
  void* lse;
  seqpar_dtype lse_dtype;
  int64_t lse_stride[3];
  const void* part_out;
  seqpar_dtype part_dtype;
  int64_t part_stride[4];
  const float* part_lse;
  int64_t part_lse_stride[3];
} seqpar_merge_args;

cudaError_t seqpar_merge(const seqpar_merge_args* args, cudaStream_t stream);

/* Linear-attention state combine, rows [row_start, row_end) of Dk only:
 *     out[b, h, k, :] = exp(log_decay[b, h]) * s_in[b, h, k, :] + s_local[b, h, k, :]
 * All states [B, H, Dk, Dv] float32, log_decay [B, H] float32, any strides. out may be
 * s_in or s_local themselves (each element reads and writes only its own position);
 * rows outside the range are not touched. */
typedef struct seqpar_state_combine_args {
  int64_t batch, heads, dk, dv, row_start, row_end;
  float* out;
  int64_t out_stride[4];
  const float* s_in;
  int64_t in_stride[4];
  const float* s_local;
  int64_t local_stride[4];
  const float* log_decay;
  int64_t decay_stride[2];
} seqpar_state_combine_args;

cudaError_t seqpar_state_combine(const seqpar_state_combine_args* args, cudaStream_t stream);

/* Inclusive prefix combine over a stack of C states (chunks or ranks in order):
 *     out[0] = states[0];  out[c] = exp(log_decay[c]) * out[c-1] + states[c]
 * states/out [C, B, H, Dk, Dv] float32, log_decay [C, B, H] float32 (log_decay[0] is
 * not used: nothing precedes chunk 0), any strides; out may be states itself. */
typedef struct seqpar_state_scan_args {
  int64_t chunks, batch, heads, dk, dv;
  float* out;
  int64_t out_stride[5];
  const float* states;
  int64_t states_stride[5];
  const float* log_decay;
  int64_t decay_stride[3];
} seqpar_state_scan_args;

cudaError_t seqpar_state_scan(const seqpar_state_scan_args* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* SEQPAR_KERNELS_H */
