// Test-only: the per-row and per-element functions of csrc/seqpar_math.cuh (the very code
// the CUDA kernels run) driven by plain loops on the CPU, exported with C linkage for
// ctypes. Visits rows, lanes and elements in the order and split the kernels use, so a
// stride, index or -inf mistake in the shared arithmetic shows on a machine without a GPU.
// Built by tests/csrc/test_csrc.py with g++ (CUDA headers for the fp16/bf16 types).
#include "seqpar_math.cuh"

namespace {

template <typename PartT, typename LseT>
void merge_rows(const seqpar_merge_args& a) {
  const int group = seqpar::merge_lanes_per_row(a.head_dim);
  const bool heads_inner = seqpar::merge_heads_inner(a);
  for (int64_t r = 0; r < a.batch * a.rows * a.heads; ++r) {
    const seqpar::MergeRow row = seqpar::merge_row(a, r, heads_inner);
    // every lane computes the weight before any lane stores the lse, as in the kernel
    const seqpar::MergeWeight<LseT> w = seqpar::merge_row_weight<LseT>(a, row);
    for (int lane = 0; lane < group; ++lane) seqpar::merge_row_elements<PartT>(a, row, w.w_part, lane, group);
    seqpar::merge_row_store_lse<LseT>(a, row, w.lse);
  }
}

template <typename LseT>
int merge_part(const seqpar_merge_args& a) {
  switch (a.part_dtype) {
    case SEQPAR_FLOAT32: merge_rows<float, LseT>(a); return 0;
    case SEQPAR_FLOAT16: merge_rows<__half, LseT>(a); return 0;
    case SEQPAR_BFLOAT16: merge_rows<__nv_bfloat16, LseT>(a); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

int64_t seqpar_host_sizeof_merge_args(void) { return sizeof(seqpar_merge_args); }
int64_t seqpar_host_sizeof_state_combine_args(void) { return sizeof(seqpar_state_combine_args); }
int64_t seqpar_host_sizeof_state_scan_args(void) { return sizeof(seqpar_state_scan_args); }

int seqpar_host_merge(const seqpar_merge_args* a) {
  switch (a->lse_dtype) {
    case SEQPAR_FLOAT32: return merge_part<float>(*a);
    case SEQPAR_FLOAT64: return merge_part<double>(*a);
    default: return 1;
  }
}

int seqpar_host_state_combine(const seqpar_state_combine_args* a) {
  const int64_t elements = a->batch * a->heads * (a->row_end - a->row_start) * a->dv;
  for (int64_t e = 0; e < elements; ++e) seqpar::state_combine_element(*a, e);
  return 0;
}

int seqpar_host_state_scan(const seqpar_state_scan_args* a) {
  if (a->chunks == 0) return 0;
  const int64_t elements = a->batch * a->heads * a->dk * a->dv;
  for (int64_t e = 0; e < elements; ++e) seqpar::state_scan_element(*a, e);
  return 0;
}

}  // extern "C"
