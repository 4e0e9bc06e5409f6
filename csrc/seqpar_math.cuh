// The arithmetic of seqpar's kernels, per row or per element, shared by the CUDA kernels
// (merge.cu, state.cu) and by the host harness of the tests (tests/csrc/host_harness.cpp),
// which runs exactly these functions on the CPU so that the index and stride logic and the
// -inf handling are exercised on machines without a GPU. Compiles as CUDA or plain C++.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "seqpar_kernels.h"

#if defined(__CUDACC__)
#define SEQPAR_HD __host__ __device__ __forceinline__
#else
#define SEQPAR_HD inline
#endif

namespace seqpar {

SEQPAR_HD float to_float(float x) { return x; }
SEQPAR_HD float to_float(__half x) { return __half2float(x); }
SEQPAR_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

SEQPAR_HD float exp_(float x) { return expf(x); }
SEQPAR_HD double exp_(double x) { return exp(x); }
SEQPAR_HD float log1p_(float x) { return log1pf(x); }
SEQPAR_HD double log1p_(double x) { return log1p(x); }
SEQPAR_HD float abs_(float x) { return fabsf(x); }
SEQPAR_HD double abs_(double x) { return fabs(x); }

// Rounded separately, as torch's `out.add_((part - out).mul_(w))` does: nvcc would
// otherwise contract the pair into one fma and the kernel would differ from merge.py
// by an ulp where the reference is exact.
SEQPAR_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SEQPAR_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// -- merge -----------------------------------------------------------------------------

struct MergeRow {
  int64_t b, i, h;
};

// Lanes per row: the power of two that covers D, at most a warp (1 for D = 0: the lse
// still merges).
SEQPAR_HD int merge_lanes_per_row(int64_t head_dim) {
  int g = 1;
  while (g < 32 && g < head_dim) g *= 2;
  return g;
}

// Whether consecutive rows differ in h (out's head stride is the smaller one, so a warp's
// rows are close in memory) rather than in i.
SEQPAR_HD bool merge_heads_inner(const seqpar_merge_args& a) { return a.out_stride[2] <= a.out_stride[1]; }

// Row r of the B*n*H rows, in the order `merge_heads_inner` chose.
SEQPAR_HD MergeRow merge_row(const seqpar_merge_args& a, int64_t r, bool heads_inner) {
  MergeRow row;
  if (heads_inner) {
    row.h = r % a.heads;
    r /= a.heads;
    row.i = r % a.rows;
    row.b = r / a.rows;
  } else {
    row.i = r % a.rows;
    r /= a.rows;
    row.h = r % a.heads;
    row.b = r / a.heads;
  }
  return row;
}

template <typename LseT>
struct MergeWeight {
  float w_part;  // sigmoid(part_lse - lse), the part's weight
  LseT lse;      // the merged log-sum-exp
};

// The weights of one row, in LseT (float64 when the accumulator is float64).
template <typename LseT>
SEQPAR_HD MergeWeight<LseT> merge_weight(LseT lse, LseT part_lse) {
  // equal lse (both -inf included: no key seen on either side, both outputs 0) weigh
  // equally; a NaN lse stays NaN and makes the row NaN (NaN in, NaN out)
  const LseT d = lse == part_lse ? LseT(0) : part_lse - lse;
  MergeWeight<LseT> w;
  w.w_part = float(LseT(1) / (LseT(1) + exp_(-d)));
  const LseT hi = lse > part_lse ? lse : part_lse;
  w.lse = hi + log1p_(exp_(-abs_(d)));
  return w;
}

template <typename LseT>
SEQPAR_HD MergeWeight<LseT> merge_row_weight(const seqpar_merge_args& a, const MergeRow& row) {
  const LseT* lse = static_cast<const LseT*>(a.lse);
  const LseT old = lse[row.b * a.lse_stride[0] + row.h * a.lse_stride[1] + row.i * a.lse_stride[2]];
  const LseT part = LseT(
      a.part_lse[row.b * a.part_lse_stride[0] + row.h * a.part_lse_stride[1] + row.i * a.part_lse_stride[2]]);
  return merge_weight<LseT>(old, part);
}

// Elements d = d0, d0 + step, ... of the row's output.
template <typename PartT>
SEQPAR_HD void merge_row_elements(const seqpar_merge_args& a, const MergeRow& row, float w_part, int64_t d0,
                                  int64_t step) {
  float* out = a.out + row.b * a.out_stride[0] + row.i * a.out_stride[1] + row.h * a.out_stride[2];
  const PartT* part = static_cast<const PartT*>(a.part_out) + row.b * a.part_stride[0] +
                      row.i * a.part_stride[1] + row.h * a.part_stride[2];
  for (int64_t d = d0; d < a.head_dim; d += step) {
    const float o = out[d * a.out_stride[3]];
    const float p = to_float(part[d * a.part_stride[3]]);
    out[d * a.out_stride[3]] = add_rn(o, mul_rn(p - o, w_part));
  }
}

template <typename LseT>
SEQPAR_HD void merge_row_store_lse(const seqpar_merge_args& a, const MergeRow& row, LseT value) {
  LseT* lse = static_cast<LseT*>(a.lse);
  lse[row.b * a.lse_stride[0] + row.h * a.lse_stride[1] + row.i * a.lse_stride[2]] = value;
}

// -- linear-attention states -----------------------------------------------------------

// Element e of the B*H*(row_end-row_start)*Dv elements that the combine writes.
SEQPAR_HD void state_combine_element(const seqpar_state_combine_args& a, int64_t e) {
  const int64_t nrows = a.row_end - a.row_start;
  const int64_t v = e % a.dv;
  e /= a.dv;
  const int64_t k = a.row_start + e % nrows;
  e /= nrows;
  const int64_t h = e % a.heads;
  const int64_t b = e / a.heads;
  const float decay = expf(a.log_decay[b * a.decay_stride[0] + h * a.decay_stride[1]]);
  const float s_in = a.s_in[b * a.in_stride[0] + h * a.in_stride[1] + k * a.in_stride[2] + v * a.in_stride[3]];
  const float s_local =
      a.s_local[b * a.local_stride[0] + h * a.local_stride[1] + k * a.local_stride[2] + v * a.local_stride[3]];
  // one rounding instead of two: the chain over many ranks stays as accurate as fp32 allows
  a.out[b * a.out_stride[0] + h * a.out_stride[1] + k * a.out_stride[2] + v * a.out_stride[3]] =
      fmaf(decay, s_in, s_local);
}

// Element e of the B*H*Dk*Dv state elements: the whole chain of C chunks, in order.
SEQPAR_HD void state_scan_element(const seqpar_state_scan_args& a, int64_t e) {
  const int64_t v = e % a.dv;
  e /= a.dv;
  const int64_t k = e % a.dk;
  e /= a.dk;
  const int64_t h = e % a.heads;
  const int64_t b = e / a.heads;
  const int64_t in0 = b * a.states_stride[1] + h * a.states_stride[2] + k * a.states_stride[3] + v * a.states_stride[4];
  const int64_t out0 = b * a.out_stride[1] + h * a.out_stride[2] + k * a.out_stride[3] + v * a.out_stride[4];
  const int64_t g0 = b * a.decay_stride[1] + h * a.decay_stride[2];
  float acc = a.states[in0];
  a.out[out0] = acc;
  for (int64_t c = 1; c < a.chunks; ++c) {
    const float decay = expf(a.log_decay[g0 + c * a.decay_stride[0]]);
    acc = fmaf(decay, acc, a.states[in0 + c * a.states_stride[0]]);
    a.out[out0 + c * a.out_stride[0]] = acc;
  }
}

}  // namespace seqpar
