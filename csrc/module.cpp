// The sgkernels._C Python module. Importing it runs the static TORCH_LIBRARY registrations of every
// op (csrc/schema.cpp, csrc/cpu/, and csrc/cuda/ when built with CUDA). Its own contents: build
// facts, the status bits (common/status_bits.h) and cpu_isa(), the ISA the CPU kernels run with.
#include <Python.h>

#include <c10/util/Exception.h>

#include "common/build_info.h"
#include "common/isa.h"
#include "common/status_bits.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sgk::isa_name(sgk::cpu_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "cpu_isa() -> str: the ISA the C++ CPU kernels run with now: 'avx512', 'avx2' or 'generic' (the widest "
     "this CPU supports, capped by SGKERNELS_CPU_ISA)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef sgkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
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
#define SGK_EXPORT_BIT(name, value) PyModule_AddIntConstant(m, #name, value);
  SGK_STATUS_BITS(SGK_EXPORT_BIT)
#undef SGK_EXPORT_BIT
  return m;
}
