// The Python module fastprune._C_cuda: importing it loads the CUDA kernels of merge_cuda.cu, which
// register themselves for the CUDA dispatch key of torch.ops.fastprune.* (the schemas come from
// fastprune._C, which fastprune/_ext.py imports first). The module itself is empty.
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
