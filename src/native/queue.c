/* safeshm._native: queue (see safeshm.h). */
#include "safeshm.h"

int sn_register_queue(PyObject *module) {
    (void)module;
    return 0;
}
