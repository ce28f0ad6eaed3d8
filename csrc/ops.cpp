// torch.ops.fastprune.*: operator schemas and their CPU kernels, and the Python module
// fastprune._C whose import registers them. The CUDA kernels of the same operators live in a
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
}

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("mstm_merge", &fastprune::mstm_merge_cpu);
  m.impl("mstm_merge_backward", &fastprune::mstm_merge_backward_cpu);
}

// `import fastprune._C` runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
