/* safeshm._native: array (see safeshm.h). */
#include "safeshm.h"

int sn_register_array(PyObject *module) {
    (void)module;
    return 0;
}
