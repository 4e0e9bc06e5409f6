// Torch bindings of the CUDA kernels: the ops `torch.ops.seqpar_cuda.*`, registered with
// TORCH_LIBRARY when the extension `seqpar._C` is imported. Host C++ only: the kernels are
// reached through the C launchers of seqpar_kernels.h. Fake (meta) implementations for
// torch.compile are registered in Python (seqpar/kernels/cuda_ext.py).
#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "seqpar_kernels.h"

namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& first) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == first.device(), name, ": expected device ", first.device(), " (that of the first tensor), got ",
              t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, ": expected shape ", expected, ", got ", shape_of(t));
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, name, ": expected dtype ", expected, ", got ", t.scalar_type());
}

template <size_t N>
void strides_of(const at::Tensor& t, int64_t (&out)[N]) {
  for (size_t i = 0; i < N; ++i) out[i] = t.stride(static_cast<int64_t>(i));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void merge_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& part_out, const at::Tensor& part_lse) {
  TORCH_CHECK(out.dim() == 4, "out: expected 4 dims [B, n, H, D], got shape ", shape_of(out));
  const int64_t B = out.size(0), n = out.size(1), H = out.size(2), D = out.size(3);
  check_shape(lse, "lse", {B, H, n});
  check_shape(part_out, "part_out", out.sizes());
  check_shape(part_lse, "part_lse", {B, H, n});
  for (auto [t, name] : {std::pair{&lse, "lse"}, {&part_out, "part_out"}, {&part_lse, "part_lse"}}) {
    check_cuda(*t, name, out);
  }
  check_cuda(out, "out", out);
  check_dtype(out, "out", at::kFloat);
  check_dtype(part_lse, "part_lse", at::kFloat);
  TORCH_CHECK(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble,
              "lse: expected dtype float32 or float64, got ", lse.scalar_type());
  const auto part_type = part_out.scalar_type();
  TORCH_CHECK(part_type == at::kFloat || part_type == at::kHalf || part_type == at::kBFloat16,
              "part_out: expected dtype float32, float16 or bfloat16, got ", part_type);
  // the kernel writes every row once: an output that overlaps itself or an input is a race
  at::assert_no_internal_overlap(out);
  at::assert_no_internal_overlap(lse);
  at::assert_no_overlap(out, part_out);
  at::assert_no_overlap(lse, part_lse);

  seqpar_merge_args a{};
  a.batch = B;
  a.rows = n;
  a.heads = H;
  a.head_dim = D;
  a.out = out.data_ptr<float>();
  strides_of(out, a.out_stride);
  a.lse = lse.data_ptr();
  a.lse_dtype = lse.scalar_type() == at::kDouble ? SEQPAR_FLOAT64 : SEQPAR_FLOAT32;
  strides_of(lse, a.lse_stride);
  a.part_out = part_out.data_ptr();
  a.part_dtype = part_type == at::kHalf ? SEQPAR_FLOAT16 : part_type == at::kBFloat16 ? SEQPAR_BFLOAT16 : SEQPAR_FLOAT32;
  strides_of(part_out, a.part_stride);
  a.part_lse = part_lse.data_ptr<float>();
  strides_of(part_lse, a.part_lse_stride);
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(seqpar_merge(&a, stream_of(out)));
}

void check_state(const at::Tensor& t, const char* name, const at::Tensor& out) {
  check_cuda(t, name, out);
  check_dtype(t, name, at::kFloat);
  check_shape(t, name, out.sizes());
}

void state_combine_(const at::Tensor& out, const at::Tensor& s_in, const at::Tensor& s_local,
                    const at::Tensor& log_decay, int64_t row_start, int64_t row_end) {
  TORCH_CHECK(out.dim() == 4, "out: expected 4 dims [B, H, Dk, Dv], got shape ", shape_of(out));
  check_cuda(out, "out", out);
  check_dtype(out, "out", at::kFloat);
  check_state(s_in, "s_in", out);
  check_state(s_local, "s_local", out);
  check_cuda(log_decay, "log_decay", out);
  check_dtype(log_decay, "log_decay", at::kFloat);
  check_shape(log_decay, "log_decay", {out.size(0), out.size(1)});
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= out.size(2),
              "row_start, row_end: expected 0 <= row_start <= row_end <= Dk = ", out.size(2), ", got ", row_start,
              ", ", row_end);
  at::assert_no_internal_overlap(out);
  // out may be s_in or s_local exactly (element-wise), but not a shifted view of them
  for (auto [t, name] : {std::pair{&s_in, "s_in"}, {&s_local, "s_local"}}) {
    const auto status = at::get_overlap_status(out, *t);
    TORCH_CHECK(status != at::MemOverlapStatus::Partial, name, ": expected to be out itself or not to overlap it, got a partial overlap");
  }

  seqpar_state_combine_args a{};
  a.batch = out.size(0);
  a.heads = out.size(1);
  a.dk = out.size(2);
  a.dv = out.size(3);
  a.row_start = row_start;
  a.row_end = row_end;
  a.out = out.data_ptr<float>();
  strides_of(out, a.out_stride);
  a.s_in = s_in.data_ptr<float>();
  strides_of(s_in, a.in_stride);
  a.s_local = s_local.data_ptr<float>();
  strides_of(s_local, a.local_stride);
  a.log_decay = log_decay.data_ptr<float>();
  strides_of(log_decay, a.decay_stride);
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(seqpar_state_combine(&a, stream_of(out)));
}

void state_scan_(const at::Tensor& out, const at::Tensor& states, const at::Tensor& log_decay) {
  TORCH_CHECK(out.dim() == 5, "out: expected 5 dims [C, B, H, Dk, Dv], got shape ", shape_of(out));
  check_cuda(out, "out", out);
  check_dtype(out, "out", at::kFloat);
  check_state(states, "states", out);
  check_cuda(log_decay, "log_decay", out);
  check_dtype(log_decay, "log_decay", at::kFloat);
  check_shape(log_decay, "log_decay", {out.size(0), out.size(1), out.size(2)});
  at::assert_no_internal_overlap(out);
  TORCH_CHECK(at::get_overlap_status(out, states) != at::MemOverlapStatus::Partial,
              "states: expected to be out itself or not to overlap it, got a partial overlap");

  seqpar_state_scan_args a{};
  a.chunks = out.size(0);
  a.batch = out.size(1);
  a.heads = out.size(2);
  a.dk = out.size(3);
  a.dv = out.size(4);
  a.out = out.data_ptr<float>();
  strides_of(out, a.out_stride);
  a.states = states.data_ptr<float>();
  strides_of(states, a.states_stride);
  a.log_decay = log_decay.data_ptr<float>();
  strides_of(log_decay, a.decay_stride);
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(seqpar_state_scan(&a, stream_of(out)));
}

}  // namespace

TORCH_LIBRARY(seqpar_cuda, m) {
  m.def("merge_(Tensor(a!) out, Tensor(b!) lse, Tensor part_out, Tensor part_lse) -> ()");
  m.def("state_combine_(Tensor(a!) out, Tensor s_in, Tensor s_local, Tensor log_decay, int row_start, int row_end) -> ()");
  m.def("state_scan_(Tensor(a!) out, Tensor states, Tensor log_decay) -> ()");
}

TORCH_LIBRARY_IMPL(seqpar_cuda, CUDA, m) {
  m.impl("merge_", &merge_);
  m.impl("state_combine_", &state_combine_);
  m.impl("state_scan_", &state_scan_);
}

// `import seqpar._C` runs the registrations above; the module itself holds nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "seqpar CUDA kernels (torch.ops.seqpar_cuda)", -1,
                                      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
