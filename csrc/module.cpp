// Python module entry for the ahead-of-time build (`import padfree._C`). The ops themselves are
// registered with TORCH_LIBRARY_FRAGMENT in the other files of csrc/; importing loads them.
#include <Python.h>

static struct PyModuleDef padfree_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&padfree_c_module); }
