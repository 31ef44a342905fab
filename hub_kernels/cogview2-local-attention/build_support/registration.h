// Stand-in for the registration.h that kernel-builder generates; used only by build_local.py.
#pragma once

#include <Python.h>

#define _LA_CONCAT(A, B) A##B
#define LA_CONCAT(A, B) _LA_CONCAT(A, B)
#define _LA_STRINGIFY(A) #A
#define LA_STRINGIFY(A) _LA_STRINGIFY(A)

// TORCH_LIBRARY needs the expanded extension name, hence the extra indirection.
#define TORCH_LIBRARY_EXPAND(NAME, MODULE) TORCH_LIBRARY(NAME, MODULE)

// An importable (empty) Python module, so that `from . import <name>` loads the library and its ops.
#define REGISTER_EXTENSION(NAME)                                                                  \
  PyMODINIT_FUNC LA_CONCAT(PyInit_, NAME)() {                                                     \
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, LA_STRINGIFY(NAME), nullptr, 0,    \
                                        nullptr};                                                 \
    return PyModule_Create(&module);                                                              \
  }
