/* safeshm._native: SafeCounter (see safeshm.h and src/safeshm/_counter.py).
 *
 * The same segment, the same protocol as the ctypes path: the header flag chosen at
 * creation says which one every process uses.
 *  - IMPL_ATOMIC: lock-free sequentially consistent compare-and-swap on the int64 value
 *    word (the instruction libatomic's __atomic_compare_exchange runs for 8 aligned bytes).
 *  - IMPL_LOCKED: every update under the robust mutex at _COUNTER_MUTEX_OFFSET, the whole
 *    critical section in C; a dead holder's mutex is recovered silently (counted), as
 *    the ctypes path's Held() does for the counter.
 * Reads are one atomic 8-byte load in both, as the ctypes path's memoryview read.
 *
 * Errors are the ctypes path's, word for word: arguments an exact int in the int64 range
 * take the fast path; anything else goes through a slow path that does what the Python
 * code does (``old + delta``, then the memoryview store's index conversion), so even
 * int-like operands and their errors behave the same.
 */
#include "safeshm.h"

#define IMPL_ATOMIC 1
#define IMPL_LOCKED 2

typedef struct {
    sn_core head;
    int64_t *word;
    pthread_mutex_t *mutex;
    int locked;
} Counter;

#define SEQ __ATOMIC_SEQ_CST

static PyObject *closed(Counter *self) {
    PyErr_SetObject(sn_SegmentClosedError, self->head.closed_msg);
    return NULL;
}

/* -- the locked implementation's critical sections ------------------------------------ */
static int lock(Counter *self) {
    int rc = sn_mutex_acquire(&self->head, self->mutex, SN_FOREVER);
    return rc < 0 ? -1 : 0; /* SN_OK or SN_RECOVERED (counted; the counter is never torn) */
}

static int unlock(Counter *self) {
    int rc = sn_mutex_release(self->mutex);
    if (rc != 0) {
        sn_release_failed(self->head.what, rc);
        return -1;
    }
    return 0;
}

/* Store ``new`` if the value is still ``*expected``; 1 stored, 0 not (``*expected`` then
 * holds the current value), -1 with an exception. */
static int cas(Counter *self, int64_t *expected, int64_t new) {
    if (!self->locked)
        return __atomic_compare_exchange_n(self->word, expected, new, 0, SEQ, SEQ) ? 1 : 0;
    if (lock(self) < 0) return -1;
    int64_t cur = *self->word;
    int ok = cur == *expected;
    if (ok)
        *self->word = new;
    else
        *expected = cur;
    return unlock(self) < 0 ? -1 : ok;
}

/* -- the ctypes path's errors (SafeCounter._bad_operand) ------------------------------ */
static PyObject *type_error(const char *what, PyObject *operand) {
    PyObject *name = PyType_GetName(Py_TYPE(operand));
    if (name == NULL) return NULL;
    PyErr_Format(PyExc_TypeError, "%s must be an int, not %U", what, name);
    Py_DECREF(name);
    return NULL;
}

static PyObject *overflow_error(Counter *self, const char *what, PyObject *operand,
                                const int64_t *current) {
    if (current != NULL)
        PyErr_Format(PyExc_OverflowError,
                     "%U: %s %R would leave the int64 range (the counter is at %lld); nothing "
                     "was changed",
                     self->head.what, what, operand, (long long)*current);
    else
        PyErr_Format(PyExc_OverflowError,
                     "%U: %s %R would leave the int64 range; nothing was changed",
                     self->head.what, what, operand);
    return NULL;
}

/* What a memoryview 'q' store does with ``v`` (operator.index, then the int64 range), with
 * the errors _bad_operand makes of its TypeError/ValueError. 0, or -1 with an exception. */
static int store_value(Counter *self, const char *what, PyObject *operand, PyObject *v,
                       const int64_t *current, int64_t *out) {
    PyObject *i = PyNumber_Index(v);
    if (i == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            type_error(what, operand);
        }
        return -1;
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (overflow) {
        overflow_error(self, what, operand, current);
        return -1;
    }
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)x;
    return 0;
}

/* -- value ----------------------------------------------------------------------------- */
static PyObject *Counter_value(PyObject *op, void *unused) {
    (void)unused;
    Counter *self = (Counter *)op;
    if (self->head.closed) return closed(self);
    return PyLong_FromLongLong(__atomic_load_n(self->word, SEQ));
}

/* -- add --------------------------------------------------------------------------------- */
/* Any delta but an exact int whose sum fits: ``old + delta`` computed as Python does it (it
 * may run the operand's own code, so never under the mutex), then committed only if the
 * value is still ``old`` -- a compare-and-swap in both implementations. */
static PyObject *add_slow(Counter *self, PyObject *delta) {
    int64_t old = __atomic_load_n(self->word, SEQ);
    for (;;) {
        PyObject *o = PyLong_FromLongLong(old);
        if (o == NULL) return NULL;
        PyObject *sum = PyNumber_Add(o, delta);
        Py_DECREF(o);
        if (sum == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                return type_error("delta", delta);
            }
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                return overflow_error(self, "delta", delta, &old);
            }
            return NULL;
        }
        int64_t new;
        int rc = store_value(self, "delta", delta, sum, &old, &new);
        Py_DECREF(sum);
        if (rc < 0) return NULL;
        if (self->head.closed) return closed(self);
        rc = cas(self, &old, new);
        if (rc < 0) return NULL;
        if (rc) return PyLong_FromLongLong(new);
    }
}

static PyObject *add_overflow(Counter *self, PyObject *arg, int64_t old) {
    if (arg != NULL) return overflow_error(self, "delta", arg, &old);
    PyObject *one = PyLong_FromLong(1); /* the default delta */
    if (one == NULL) return NULL;
    overflow_error(self, "delta", one, &old);
    Py_DECREF(one);
    return NULL;
}

static const char *const add_names[] = {"delta", NULL};

static PyObject *Counter_add(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    Counter *self = (Counter *)op;
    PyObject *arg = NULL;
    if (kwnames == NULL && nargs <= 1) {
        if (nargs) arg = args[0];
    } else if (sn_parse("SafeCounter.add", args, nargs, kwnames, add_names, 0, 1, &arg) < 0) {
        return NULL;
    }
    if (self->head.closed) return closed(self);
    int64_t delta = 1;
    if (arg != NULL) {
        if (!PyLong_CheckExact(arg)) return add_slow(self, arg);
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(arg, &overflow);
        if (overflow) return add_slow(self, arg);
        delta = (int64_t)x;
    }
    int64_t old, new;
    if (!self->locked) {
        old = __atomic_load_n(self->word, SEQ);
        do {
            if (__builtin_add_overflow(old, delta, &new)) return add_overflow(self, arg, old);
        } while (!__atomic_compare_exchange_n(self->word, &old, new, 0, SEQ, SEQ));
        return PyLong_FromLongLong(new);
    }
    if (lock(self) < 0) return NULL;
    old = *self->word;
    int over = __builtin_add_overflow(old, delta, &new);
    if (!over) *self->word = new;
    if (unlock(self) < 0) return NULL;
    if (over) return add_overflow(self, arg, old);
    return PyLong_FromLongLong(new);
}

/* -- set, exchange, compare_and_set ----------------------------------------------------- */
static int fast_int64(PyObject *v, int64_t *out) {
    if (!PyLong_CheckExact(v)) return 0;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) return 0;
    *out = (int64_t)x;
    return 1;
}

static const char *const set_names[] = {"value", NULL};

static PyObject *Counter_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    Counter *self = (Counter *)op;
    PyObject *arg;
    if (kwnames == NULL && nargs == 1)
        arg = args[0];
    else if (sn_parse("SafeCounter.set", args, nargs, kwnames, set_names, 1, 1, &arg) < 0)
        return NULL;
    if (self->head.closed) return closed(self);
    int64_t v;
    if (!fast_int64(arg, &v)) {
        /* the ctypes path: a memoryview store (atomic) or check_int64 (locked) */
        if (self->locked ? sn_int64("value", arg, &v) < 0
                         : store_value(self, "value", arg, arg, NULL, &v) < 0)
            return NULL;
    }
    if (!self->locked) {
        __atomic_store_n(self->word, v, SEQ);
        Py_RETURN_NONE;
    }
    if (lock(self) < 0) return NULL;
    *self->word = v;
    if (unlock(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Counter_exchange(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    Counter *self = (Counter *)op;
    PyObject *arg;
    if (kwnames == NULL && nargs == 1)
        arg = args[0];
    else if (sn_parse("SafeCounter.exchange", args, nargs, kwnames, set_names, 1, 1, &arg) < 0)
        return NULL;
    int64_t v, old;
    /* the ctypes path checks the operand before it touches the segment */
    if (!fast_int64(arg, &v) && sn_int64("value", arg, &v) < 0) return NULL;
    if (self->head.closed) return closed(self);
    if (!self->locked) {
        old = __atomic_exchange_n(self->word, v, SEQ);
        return PyLong_FromLongLong(old);
    }
    if (lock(self) < 0) return NULL;
    old = *self->word;
    *self->word = v;
    if (unlock(self) < 0) return NULL;
    return PyLong_FromLongLong(old);
}

static const char *const cas_names[] = {"expected", "new", NULL};

static PyObject *Counter_compare_and_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                         PyObject *kwnames) {
    Counter *self = (Counter *)op;
    PyObject *argv[2];
    if (kwnames == NULL && nargs == 2) {
        argv[0] = args[0];
        argv[1] = args[1];
    } else if (sn_parse("SafeCounter.compare_and_set", args, nargs, kwnames, cas_names, 2, 2,
                        argv) < 0) {
        return NULL;
    }
    if (self->head.closed) return closed(self);
    int64_t expected, new;
    if (!fast_int64(argv[0], &expected) && sn_int64("expected", argv[0], &expected) < 0)
        return NULL;
    if (!fast_int64(argv[1], &new) && sn_int64("new", argv[1], &new) < 0) return NULL;
    int rc = cas(self, &expected, new);
    if (rc < 0) return NULL;
    return PyBool_FromLong(rc);
}

/* -- the type ------------------------------------------------------------------------- */
static PyObject *Counter_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *mm, *what, *closed_msg;
    Py_ssize_t value_offset, mutex_offset;
    int impl;
    static char *kwlist[] = {"mm",           "what", "closed_msg", "value_offset",
                             "mutex_offset", "impl", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OUUnni:Counter", kwlist, &mm, &what,
                                     &closed_msg, &value_offset, &mutex_offset, &impl))
        return NULL;
    if (impl != IMPL_ATOMIC && impl != IMPL_LOCKED) {
        PyErr_Format(PyExc_ValueError, "safeshm._native.Counter: unknown implementation %d",
                     impl);
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Counter *self = (Counter *)alloc(type, 0);
    if (self == NULL) return NULL;
    if (sn_core_init(&self->head, mm, what, closed_msg) < 0 ||
        sn_map_check(&self->head.map, value_offset, 8) < 0 ||
        sn_map_check(&self->head.map, mutex_offset, SN_MUTEX_BLOCK) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->word = (int64_t *)(self->head.map.base + value_offset);
    self->mutex = (pthread_mutex_t *)(self->head.map.base + mutex_offset);
    if (((uintptr_t)self->word & 7) != 0 || ((uintptr_t)self->mutex & 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native.Counter: misaligned offsets");
        Py_DECREF(self);
        return NULL;
    }
    self->locked = impl == IMPL_LOCKED;
    return (PyObject *)self;
}

static PyMethodDef Counter_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Counter_add, METH_FASTCALL | METH_KEYWORDS,
     "add($self, /, delta=1)\n--\n\nSafeCounter.add in C."},
    {"set", (PyCFunction)(void (*)(void))Counter_set, METH_FASTCALL | METH_KEYWORDS,
     "set($self, /, value)\n--\n\nSafeCounter.set in C."},
    {"exchange", (PyCFunction)(void (*)(void))Counter_exchange, METH_FASTCALL | METH_KEYWORDS,
     "exchange($self, /, value)\n--\n\nSafeCounter.exchange in C."},
    {"compare_and_set", (PyCFunction)(void (*)(void))Counter_compare_and_set,
     METH_FASTCALL | METH_KEYWORDS,
     "compare_and_set($self, /, expected, new)\n--\n\nSafeCounter.compare_and_set in C."},
    SN_CORE_CLOSE_METHOD,
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Counter_getset[] = {
    {"value", Counter_value, NULL, "The current value (an atomic read).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Counter_slots[] = {
    {Py_tp_new, Counter_new},
    {Py_tp_dealloc, sn_core_dealloc},
    {Py_tp_methods, Counter_methods},
    {Py_tp_getset, Counter_getset},
    {Py_tp_doc, "Counter(mm, what, closed_msg, value_offset, mutex_offset, impl)\n--\n\n"
                "The compiled core of a SafeCounter handle (see safeshm._counter)."},
    {0, NULL},
};

static PyType_Spec Counter_spec = {
    .name = "safeshm._native.Counter",
    .basicsize = sizeof(Counter),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Counter_slots,
};

int sn_register_counter(PyObject *module) { return sn_add_type(module, &Counter_spec, NULL); }
