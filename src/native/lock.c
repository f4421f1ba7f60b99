/* safeshm._native: lock (see safeshm.h). */
#include "safeshm.h"

int sn_register_lock(PyObject *module) {
    (void)module;
    return 0;
}
