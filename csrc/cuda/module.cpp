// An empty importable module: importing omnifuse_fast._C_cuda runs the CUDA kernels'
// TORCH_LIBRARY_IMPL(omnifuse_fast, CUDA, ...) registrations in csrc/cuda/*.cu. It is a separate
// extension from omnifuse_fast._C (schemas + CPU kernels) so that a failing CUDA build never
// costs the CPU kernels; omnifuse_fast/_ext.py imports it after _C.
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
