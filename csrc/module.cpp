// The sgkernels._C Python module. It has no Python functions of its own: importing it runs the
// static TORCH_LIBRARY registrations of every op in csrc/ (and csrc/cuda/ when built with CUDA).
#include <Python.h>

#include "build_info.h"

extern "C" {
static PyModuleDef sgkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&sgkernels_module);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "WITH_CUDA", SGK_WITH_CUDA);
  PyModule_AddStringConstant(m, "CUDA_ARCHS", SGK_CUDA_ARCHS);
  PyModule_AddIntConstant(m, "WITH_OPENMP",
#ifdef _OPENMP
                          1
#else
                          0
#endif
  );
  return m;
}
}
