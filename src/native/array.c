/* safeshm._native: SafeArray's element operations (see safeshm.h and _array.py).
 *
 * ``_native.Array`` is a SafeArray handle's core. Its methods are the handle's element
 * operations -- ``get`` (``a[i]``), ``set`` (``a[i] = v``), ``add``, ``compare_and_set`` --
 * on exactly the ctypes path's layout and protocol: element ``i`` lives at
 * ``data_offset + i * itemsize`` and is written under stripe ``i % stripes``, a robust mutex
 * of MUTEX_BLOCK bytes at ``stripes_offset + stripe * MUTEX_BLOCK``; reads take no lock (an
 * aligned load is atomic). A dead holder's stripe is recovered (counted, marked consistent)
 * by sn_mutex_acquire, and if that holder died in the middle of a bulk write (the control
 * line's flag is 1) the flag becomes 2 and a HolderDiedWarning is issued, as
 * SafeArray._recovered does.
 *
 * The fast path covers the calls that matter: an ``int`` index and ``int``/``float``
 * values (exactly those types, or bool) that are valid for the typecode. Everything else
 * -- slices, index-like objects (numpy integers), other value types (whose arithmetic and
 * comparisons are Python's), keyword arguments, wrong argument counts, and every error --
 * is handed to the ctypes implementation (the class's Python method) on the same handle,
 * so both implementations raise the same errors with the same messages by construction.
 * The Python method is called on a "shadow" of the handle: a SafeArray sharing the
 * handle's ctypes views but not its core, so that the core holds no reference cycle and a
 * bound method outliving its handle still works.
 */
#include "safeshm.h"

#include <float.h>
#include <limits.h>
#include <string.h>
#include <stddef.h>

typedef struct {
    sn_core head;
    char *data;
    char *stripes;   /* the first stripe's mutex */
    int64_t *dirty;  /* the control line's "bulk write in progress" flag */
    Py_ssize_t length;
    int nstripes;
    int itemsize;
    char typecode;
    char is_float;
    char is_unsigned;
    int64_t min;     /* the typecode's range (signed typecodes) */
    uint64_t max;    /* the typecode's maximum (both kinds) */
    PyObject *shadow; /* the handle's twin for the Python fallback */
    PyObject *py_getitem, *py_setitem, *py_add, *py_cas;
} Array;

static inline pthread_mutex_t *stripe_of(Array *a, Py_ssize_t i) {
    return (pthread_mutex_t *)(a->stripes + (i % a->nstripes) * SN_MUTEX_BLOCK);
}

/* -- element access ------------------------------------------------------------------ */
typedef union {
    int64_t i;
    uint64_t u;
    double d;
} value;

#define LOAD(type, p) __atomic_load_n((type *)(p), __ATOMIC_RELAXED)
#define STORE(type, p, v) __atomic_store_n((type *)(p), (type)(v), __ATOMIC_RELAXED)

static inline value load(const Array *a, Py_ssize_t i) {
    char *p = a->data + i * a->itemsize;
    value v;
    switch (a->typecode) {
    case 'b': v.i = LOAD(int8_t, p); break;
    case 'B': v.u = LOAD(uint8_t, p); break;
    case 'h': v.i = LOAD(int16_t, p); break;
    case 'H': v.u = LOAD(uint16_t, p); break;
    case 'i': v.i = LOAD(int32_t, p); break;
    case 'I': v.u = LOAD(uint32_t, p); break;
    case 'l': v.i = LOAD(long, p); break;
    case 'L': v.u = LOAD(unsigned long, p); break;
    case 'q': v.i = LOAD(int64_t, p); break;
    case 'Q': v.u = LOAD(uint64_t, p); break;
    case 'f': {
        uint32_t bits = LOAD(uint32_t, p);
        float f;
        memcpy(&f, &bits, sizeof f);
        v.d = f;
        break;
    }
    default: {
        uint64_t bits = LOAD(uint64_t, p);
        memcpy(&v.d, &bits, sizeof v.d);
        break;
    }
    }
    return v;
}

static inline void store(Array *a, Py_ssize_t i, value v) {
    char *p = a->data + i * a->itemsize;
    switch (a->typecode) {
    case 'b': STORE(int8_t, p, v.i); break;
    case 'B': STORE(uint8_t, p, v.u); break;
    case 'h': STORE(int16_t, p, v.i); break;
    case 'H': STORE(uint16_t, p, v.u); break;
    case 'i': STORE(int32_t, p, v.i); break;
    case 'I': STORE(uint32_t, p, v.u); break;
    case 'l': STORE(long, p, v.i); break;
    case 'L': STORE(unsigned long, p, v.u); break;
    case 'q': STORE(int64_t, p, v.i); break;
    case 'Q': STORE(uint64_t, p, v.u); break;
    case 'f': {
        float f = (float)v.d; /* as memoryview and array.array store it: inf beyond range */
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        STORE(uint32_t, p, bits);
        break;
    }
    default: {
        uint64_t bits;
        memcpy(&bits, &v.d, sizeof bits);
        STORE(uint64_t, p, bits);
        break;
    }
    }
}

static inline PyObject *to_python(const Array *a, value v) {
    if (a->is_float) return PyFloat_FromDouble(v.d);
    if (a->is_unsigned) return PyLong_FromUnsignedLongLong((unsigned long long)v.u);
    return PyLong_FromLongLong((long long)v.i);
}

/* Whether the 128-bit integer ``x`` fits the typecode; stores it into ``*out`` if so. */
static inline int fits(const Array *a, __int128 x, value *out) {
    if (a->is_unsigned) {
        if (x < 0 || x > (__int128)a->max) return 0;
        out->u = (uint64_t)x;
    } else {
        if (x < (__int128)a->min || x > (__int128)a->max) return 0;
        out->i = (int64_t)x;
    }
    return 1;
}

/* An exact int (or bool) as a 128-bit integer: 1, or 0 (not one, or beyond 64 bits; no
 * exception set either way). */
static inline int exact_int(PyObject *o, __int128 *out) {
    if (!PyLong_CheckExact(o) && !PyBool_Check(o)) return 0;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0) {
        if (x == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        *out = x;
        return 1;
    }
    if (overflow < 0) return 0;
    unsigned long long u = PyLong_AsUnsignedLongLong(o);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = (__int128)u;
    return 1;
}

/* An exact float, or an exact int/bool that converts without error: 1, or 0. */
static inline int exact_real(PyObject *o, double *out) {
    if (PyFloat_CheckExact(o)) {
        *out = PyFloat_AsDouble(o);
        return 1;
    }
    if (!PyLong_CheckExact(o) && !PyBool_Check(o)) return 0;
    double d = PyLong_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = d;
    return 1;
}

/* A value to store, as the ctypes path's memoryview assignment would convert it: 1 (fast
 * path), 0 (anything else: the Python method decides, and raises if it is invalid). */
static inline int convert(const Array *a, PyObject *o, value *out) {
    if (a->is_float) {
        if (!exact_real(o, &out->d)) return 0;
        if (a->typecode == 'f') out->d = (float)out->d;
        return 1;
    }
    __int128 x;
    return exact_int(o, &x) && fits(a, x, out);
}

/* An exact int index in range (negative ones count from the end): 1, or 0. */
static inline int element(const Array *a, PyObject *index, Py_ssize_t *out) {
    if (!PyLong_CheckExact(index)) return 0;
    Py_ssize_t i = PyLong_AsSsize_t(index);
    if (i == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (i < 0) i += a->length;
    if (i < 0 || i >= a->length) return 0;
    *out = i;
    return 1;
}

/* -- locking ------------------------------------------------------------------------- */
/* Lock element i's stripe; 0, or -1 with an exception (nothing held). A recovered stripe
 * whose dead holder was in the middle of a bulk write is reported as _recovered does. */
static int lock_stripe(Array *a, pthread_mutex_t *m) {
    int rc = sn_mutex_acquire(&a->head, m, SN_FOREVER); /* a trylock first, no GIL release */
    if (rc <= 0) return rc;
    if (rc == SN_RECOVERED && *a->dirty == 1) {
        *a->dirty = 2; /* _REPORTED: told once per such death */
        if (PyErr_WarnFormat(sn_HolderDiedWarning, 1,
                             "%U: a process died in the middle of a bulk update (locked(), "
                             "fill() or a slice assignment); the array may hold a partial "
                             "update until the next bulk write completes",
                             a->head.what) < 0) {
            sn_mutex_release(m);
            return -1;
        }
    }
    return 0;
}

/* -- the Python fallback ------------------------------------------------------------- */
static PyObject *fallback(Array *a, PyObject *func, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames) {
    /* The limited API of 3.11 has no PyObject_Vectorcall: a tuple and a dict (slow path). */
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    PyObject *kwargs = NULL, *result = NULL;
    PyObject *posargs = PyTuple_New(nargs + 1);
    if (posargs == NULL) return NULL;
    Py_INCREF(a->shadow);
    PyTuple_SetItem(posargs, 0, a->shadow);
    for (Py_ssize_t k = 0; k < nargs; k++) {
        Py_INCREF(args[k]);
        PyTuple_SetItem(posargs, k + 1, args[k]);
    }
    if (nkw) {
        kwargs = PyDict_New();
        if (kwargs == NULL) goto done;
        for (Py_ssize_t k = 0; k < nkw; k++)
            if (PyDict_SetItem(kwargs, PyTuple_GetItem(kwnames, k), args[nargs + k]) < 0)
                goto done;
    }
    result = PyObject_Call(func, posargs, kwargs);
done:
    Py_DECREF(posargs);
    Py_XDECREF(kwargs);
    return result;
}

/* -- methods ------------------------------------------------------------------------- */
/* Closed (SegmentClosedError), or never initialised (ValueError): -1; else 0. */
static inline int usable(Array *a) {
    if (a->shadow == NULL) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native.Array: not initialised");
        return -1;
    }
    return sn_check_open(&a->head);
}

static PyObject *Array_get(PyObject *self, PyObject *index) {
    Array *a = (Array *)self;
    if (usable(a) < 0) return NULL;
    Py_ssize_t i;
    if (!element(a, index, &i)) return PyObject_CallFunctionObjArgs(a->py_getitem, a->shadow, index, NULL);
    return to_python(a, load(a, i));
}

static PyObject *Array_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    Array *a = (Array *)self;
    if (usable(a) < 0) return NULL;
    Py_ssize_t i;
    value v;
    if (nargs != 2 || kwnames != NULL || !element(a, args[0], &i) || !convert(a, args[1], &v))
        return fallback(a, a->py_setitem, args, nargs, kwnames);
    pthread_mutex_t *m = stripe_of(a, i);
    if (lock_stripe(a, m) < 0) return NULL;
    store(a, i, v);
    sn_mutex_release(m);
    Py_RETURN_NONE;
}

static PyObject *Array_add(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    Array *a = (Array *)self;
    if (usable(a) < 0) return NULL;
    Py_ssize_t i;
    __int128 delta = 0;
    double fdelta = 0.0;
    if (nargs != 2 || kwnames != NULL || !element(a, args[0], &i) ||
        !(a->is_float ? exact_real(args[1], &fdelta) : exact_int(args[1], &delta)))
        return fallback(a, a->py_add, args, nargs, kwnames);
    pthread_mutex_t *m = stripe_of(a, i);
    if (lock_stripe(a, m) < 0) return NULL;
    value cur = load(a, i), out;
    if (a->is_float) {
        out.d = cur.d + fdelta;
        store(a, i, out);
        out = load(a, i); /* as stored: a float32 element rounds */
    } else if (!fits(a, (a->is_unsigned ? (__int128)cur.u : (__int128)cur.i) + delta, &out)) {
        /* Out of range: nothing changed; the Python method raises the ctypes path's
         * OverflowError (or, if another writer got in between, succeeds: as if called
         * a moment later). */
        sn_mutex_release(m);
        return fallback(a, a->py_add, args, nargs, kwnames);
    } else {
        store(a, i, out);
    }
    sn_mutex_release(m);
    return to_python(a, out);
}

static PyObject *Array_compare_and_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                       PyObject *kwnames) {
    Array *a = (Array *)self;
    if (usable(a) < 0) return NULL;
    Py_ssize_t i;
    value new;
    __int128 iexpected = 0;
    double fexpected = 0.0;
    /* Python compares an int element with an int, a float one with a float: other mixes
     * (and their exactness rules) are left to Python. */
    if (nargs != 3 || kwnames != NULL || !element(a, args[0], &i) ||
        !(a->is_float ? PyFloat_CheckExact(args[1]) : exact_int(args[1], &iexpected)) ||
        !convert(a, args[2], &new))
        return fallback(a, a->py_cas, args, nargs, kwnames);
    if (a->is_float) fexpected = PyFloat_AsDouble(args[1]);
    pthread_mutex_t *m = stripe_of(a, i);
    if (lock_stripe(a, m) < 0) return NULL;
    value cur = load(a, i);
    int equal = a->is_float ? cur.d == fexpected /* a NaN never matches */
                : a->is_unsigned ? (__int128)cur.u == iexpected
                                 : (__int128)cur.i == iexpected;
    if (equal) store(a, i, new);
    sn_mutex_release(m);
    return PyBool_FromLong(equal);
}

/* -- the type ------------------------------------------------------------------------ */
static int Array_init(PyObject *self, PyObject *args, PyObject *kwargs) {
    Array *a = (Array *)self;
    PyObject *mm, *what, *closed_msg, *shadow, *getitem, *setitem, *add, *cas;
    int typecode;
    Py_ssize_t ctl_offset, stripes_offset, data_offset, length;
    int nstripes;
    static char *names[] = {"mm",         "what",       "closed_msg", "typecode",
                            "ctl_offset", "stripes_offset", "nstripes", "data_offset",
                            "length",     "shadow",     "getitem",    "setitem",
                            "add",        "compare_and_set", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OUUCnninnOOOOO:Array", names, &mm, &what,
                                     &closed_msg, &typecode, &ctl_offset, &stripes_offset,
                                     &nstripes, &data_offset, &length, &shadow, &getitem,
                                     &setitem, &add, &cas))
        return -1;
    if (a->head.map.base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "safeshm._native: core initialised twice");
        return -1;
    }
    /* A failed earlier __init__ may have set some of these: start from nothing. */
    a->itemsize = 0;
    a->is_float = a->is_unsigned = 0;
    a->min = 0;
    a->max = 0;
    switch (typecode) {
    case 'b': a->itemsize = 1; a->min = INT8_MIN; a->max = INT8_MAX; break;
    case 'B': a->itemsize = 1; a->max = UINT8_MAX; a->is_unsigned = 1; break;
    case 'h': a->itemsize = 2; a->min = INT16_MIN; a->max = INT16_MAX; break;
    case 'H': a->itemsize = 2; a->max = UINT16_MAX; a->is_unsigned = 1; break;
    case 'i': a->itemsize = 4; a->min = INT32_MIN; a->max = INT32_MAX; break;
    case 'I': a->itemsize = 4; a->max = UINT32_MAX; a->is_unsigned = 1; break;
    case 'l': a->itemsize = sizeof(long); a->min = LONG_MIN; a->max = LONG_MAX; break;
    case 'L': a->itemsize = sizeof(long); a->max = ULONG_MAX; a->is_unsigned = 1; break;
    case 'q': a->itemsize = 8; a->min = INT64_MIN; a->max = INT64_MAX; break;
    case 'Q': a->itemsize = 8; a->max = UINT64_MAX; a->is_unsigned = 1; break;
    case 'f': a->itemsize = 4; a->is_float = 1; break;
    case 'd': a->itemsize = 8; a->is_float = 1; break;
    default:
        PyErr_Format(PyExc_ValueError, "safeshm._native: bad typecode %c", typecode);
        return -1;
    }
    a->typecode = (char)typecode;
    if (nstripes < 1 || length < 0 || length > PY_SSIZE_T_MAX / a->itemsize) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native: bad array geometry");
        return -1;
    }
    if (sn_core_init(&a->head, mm, what, closed_msg) < 0) return -1;
    if (sn_map_check(&a->head.map, ctl_offset, 8) < 0 ||
        sn_map_check(&a->head.map, stripes_offset, (Py_ssize_t)nstripes * SN_MUTEX_BLOCK) < 0 ||
        sn_map_check(&a->head.map, data_offset, length * a->itemsize) < 0 ||
        data_offset % a->itemsize != 0 || ctl_offset % 8 != 0 ||
        stripes_offset % 8 != 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "safeshm._native: misaligned array layout");
        sn_core_clear(&a->head);
        return -1;
    }
    char *base = a->head.map.base;
    a->dirty = (int64_t *)(base + ctl_offset);
    a->stripes = base + stripes_offset;
    a->data = base + data_offset;
    a->nstripes = nstripes;
    a->length = length;
    Py_INCREF(shadow);
    a->shadow = shadow;
    Py_INCREF(getitem);
    a->py_getitem = getitem;
    Py_INCREF(setitem);
    a->py_setitem = setitem;
    Py_INCREF(add);
    a->py_add = add;
    Py_INCREF(cas);
    a->py_cas = cas;
    return 0;
}

static void Array_dealloc(PyObject *self) {
    Array *a = (Array *)self;
    Py_CLEAR(a->shadow);
    Py_CLEAR(a->py_getitem);
    Py_CLEAR(a->py_setitem);
    Py_CLEAR(a->py_add);
    Py_CLEAR(a->py_cas);
    sn_core_dealloc(self);
}

static PyMethodDef Array_methods[] = {
    {"get", (PyCFunction)Array_get, METH_O, "get(index)\n--\n\nSafeArray.__getitem__."},
    {"set", (PyCFunction)(void (*)(void))Array_set, METH_FASTCALL | METH_KEYWORDS,
     "set(index, value)\n--\n\nSafeArray.__setitem__."},
    {"add", (PyCFunction)(void (*)(void))Array_add, METH_FASTCALL | METH_KEYWORDS,
     "add(index, delta)\n--\n\nSafeArray.add."},
    {"compare_and_set", (PyCFunction)(void (*)(void))Array_compare_and_set,
     METH_FASTCALL | METH_KEYWORDS,
     "compare_and_set(index, expected, new)\n--\n\nSafeArray.compare_and_set."},
    SN_CORE_CLOSE_METHOD,
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Array_slots[] = {
    {Py_tp_doc, "Array(mm, what, closed_msg, typecode, ctl_offset, stripes_offset, nstripes, "
                "data_offset, length, shadow, getitem, setitem, add, compare_and_set)\n--\n\n"
                "A SafeArray handle's compiled core (see safeshm._array)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Array_init},
    {Py_tp_dealloc, Array_dealloc},
    {Py_tp_methods, Array_methods},
    {0, NULL},
};

static PyType_Spec Array_spec = {
    .name = "safeshm._native.Array",
    .basicsize = sizeof(Array),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Array_slots,
};

int sn_register_array(PyObject *module) { return sn_add_type(module, &Array_spec, NULL); }
