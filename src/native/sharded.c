/* safeshm._native: sharded (see safeshm.h). */
#include "safeshm.h"

int sn_register_sharded(PyObject *module) {
    (void)module;
    return 0;
}
