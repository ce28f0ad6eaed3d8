// torch.ops.fastprune.*: operator schemas and their CPU kernels, and the Python module
// fastprune._C whose import registers them. The CUDA kernels of the merge operators live in a
// separate, optional module (merge_cuda.cu, fastprune._C_cuda). Fake (meta) kernels and autograd
// are registered in Python, in fastprune/_ext.py (set_python_module below points torch there).
#include <Python.h>
#include <torch/library.h>

#include "fastprune.h"

TORCH_LIBRARY(fastprune, m) {
  m.set_python_module("fastprune._ext");
  // MSTM merge (Bian et al., 2023): x [B, N, C]; scores [B, N] and size [B, N] in x's compute dtype
  // (float32, float64 for float64 x); metric [B, N, Cm]. Returns merged tokens [B, N - r, C],
  // sizes [B, N - r] and the index map [B, N] int64.
  m.def("mstm_merge(Tensor x, Tensor scores, Tensor? size, Tensor? metric, int r, "
        "int num_prefix_tokens, str weight) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Gradients of mstm_merge w.r.t. x, scores and size (size's gradient is returned even if size was
  // None). Selection and matching are read from the index map.
  m.def("mstm_merge_backward(Tensor grad_x, Tensor grad_size, Tensor x, Tensor scores, "
        "Tensor? size, Tensor index, str weight) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // The weighted merge of every method: x [B, N, C], weights w [B, N] and size [B, N] in x's compute
  // dtype, index [B, N] int64 in [0, n_out). Returns x' [B, n_out, C] (x'_d = sum_{i -> d} w_i x_i /
  // sum_{i -> d} w_i) and size' [B, n_out] (sizes add).
  m.def("weighted_merge(Tensor x, Tensor w, Tensor size, Tensor index, int n_out) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Gradients of weighted_merge w.r.t. x, w and size.
  m.def("weighted_merge_backward(Tensor grad_x, Tensor grad_size, Tensor x, Tensor w, Tensor index) "
        "-> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // ToMe's bipartite soft matching (Bolya et al., 2023) on metric [B, N, Cm]: the index map [B, N]
  // int64 of merging r tokens (0 <= r <= (N - num_prefix_tokens) // 2). CPU only.
  m.def("tome_match(Tensor metric, int r, int num_prefix_tokens) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // BAT's decoupling, attentive token matching and DPC-kNN clustering (Long et al., 2023): the index
  // map [B, N] int64 into p + K - r + c output tokens, from scores [B, N] (float32/float64) and
  // metric [B, N, Cm]. CPU only.
  m.def("bat_index(Tensor scores, Tensor metric, int K, int r, int c, int k, int num_prefix_tokens) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  fastprune::impl_merge_ops<fastprune::CpuKernels>(m);
  m.impl("tome_match", &fastprune::tome_match_cpu);
  m.impl("bat_index", &fastprune::bat_index_cpu);
}

// `import fastprune._C` runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
