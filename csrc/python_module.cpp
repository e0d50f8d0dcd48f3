// Makes the shared library importable as `danet_ext._C`. Importing it runs the
// static TORCH_LIBRARY registrations; the module itself holds nothing.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "danet_ext compiled kernels; use torch.ops.danet_ext",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
