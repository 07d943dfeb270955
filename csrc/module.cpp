// The Python module `hrnas_kernels._C` is deliberately empty: importing it loads this shared
// library, whose static initialisers (TORCH_LIBRARY_IMPL blocks in csrc/<op>/*) register the C++
// kernels with the dispatcher. No pybind11 keeps the build fast and lets one wheel serve every
// CPython >= 3.10 through the limited API. Schemas live in Python (hrnas_kernels/<op>/ops.py).
#include <Python.h>

#include "common/cpu_isa.h"

#ifndef HRNAS_WITH_CUDA
#define HRNAS_WITH_CUDA 0
#endif

static struct PyModuleDef hrnas_kernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                                  nullptr};

extern "C" PyObject* PyInit__C(void) {
  PyObject* module = PyModule_Create(&hrnas_kernels_module);
  if (module == nullptr) return nullptr;
  // cpu_isa: the level the CPU kernels were registered for (common/cpu_isa.h).
  if (PyModule_AddIntConstant(module, "with_cuda", HRNAS_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "cpu_isa",
                                 hrnas::cpu_isa_name(hrnas::selected_cpu_isa())) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
