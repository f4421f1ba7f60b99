/* safeshm._native: lock (see safeshm.h).
 *
 * ``Lock``: the core of a SafeLock handle (src/safeshm/_lock.py). The same robust,
 * process-shared, error-checking pthread mutex as the ctypes path, in the same place
 * (the segment's payload), with the same recovery sequence (sn_mutex_acquire): processes
 * of either implementation share one lock.
 *
 * The handle binds (see SafeLock._bind):
 *  - ``enter(handle)`` as ``__enter__``, bound to the handle by a CLevel class attribute
 *    (below), so that ``with lock:`` makes one C call: no Python frame whose first
 *    instruction a signal handler's exception could land on after the mutex was taken.
 *    It returns the handle it was given. Not a reference the core keeps (a strong one would
 *    keep the handle alive until the cyclic GC; a weak one dies too early: ``with
 *    SafeLock.open(name):`` drops the handle's last reference before calling __enter__).
 *  - ``exit(*exc_info)`` as ``__exit__`` and ``release()`` as ``release``: never poisoned
 *    by close(), so the thread holding the lock can always release it.
 *  - ``acquire(blocking, timeout)`` behind a small Python wrapper (_lock._native_acquire):
 *    a C method called directly would return the lock held to a point where the
 *    interpreter checks for signals (after every call of a C function), outside any try
 *    block of the caller's; the wrapper's try covers that point and ``undo()`` releases.
 *
 * A core whose mutex is held by a live thread of this process when it is freed (its handle
 * dropped, or the interpreter tearing down) keeps its buffer export -- and with it the
 * mapping -- for the rest of the process: glibc links a held robust mutex into its thread's
 * robust list, and unmapping it would make that thread's next robust-mutex operation fault
 * and keep the kernel from marking the mutex owner-dead when the thread exits.
 */
#include "safeshm.h"

#include <errno.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FUTEX_TID_MASK 0x3FFFFFFF
#define FUTEX_OWNER_DIED 0x40000000

typedef struct {
    sn_core head;
    pthread_mutex_t *m;
    int *owner; /* the robust futex word: the holder's tid */
} LockCore;

static PyObject *minus_one; /* -1, for ``timeout == -1`` */

static inline long my_tid(void) { return syscall(SYS_gettid); }

/* Whether a live thread of this process holds the mutex (a snapshot). */
static int held_in_this_process(LockCore *self) {
    int word = __atomic_load_n(self->owner, __ATOMIC_RELAXED);
    int tid = word & FUTEX_TID_MASK;
    if (tid == 0 || (word & FUTEX_OWNER_DIED)) return 0;
    return syscall(SYS_tgkill, getpid(), tid, 0) == 0;
}

static PyObject *Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *mm, *what, *closed_msg;
    Py_ssize_t offset;
    int owner_word;
    static char *kwlist[] = {"mm", "offset", "what", "closed_msg", "owner_word", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnUUi:Lock", kwlist, &mm, &offset, &what,
                                     &closed_msg, &owner_word))
        return NULL;
    if (owner_word < 0 || owner_word >= (int)(sizeof(pthread_mutex_t) / sizeof(int))) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native: owner_word outside the mutex");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    LockCore *self = (LockCore *)alloc(type, 0);
    if (self == NULL) return NULL;
    if (sn_core_init(&self->head, mm, what, closed_msg) < 0 ||
        sn_map_check(&self->head.map, offset, SN_MUTEX_BLOCK) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (((uintptr_t)(self->head.map.base + offset)) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native: a misaligned mutex");
        Py_DECREF(self);
        return NULL;
    }
    self->m = (pthread_mutex_t *)(self->head.map.base + offset);
    self->owner = (int *)self->m + owner_word;
    return (PyObject *)self;
}

static void Lock_dealloc(PyObject *op) {
    LockCore *self = (LockCore *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (self->m != NULL && held_in_this_process(self)) {
        /* Keep the export (and the mapping) for good: see the top of this file. */
        self->head.map.base = NULL;
    }
    sn_core_clear(&self->head);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(op);
    Py_DECREF(tp);
}

/* Tell the caller that the previous holder died (HolderDiedWarning). The lock is held; if
 * the warning raises (warnings turned into errors, or a hook that failed), release it
 * first. 0 or -1. */
static int warn_recovered(LockCore *self, int stacklevel) {
    PyObject *msg = PyUnicode_FromFormat(
        "%U: the previous holder died while holding it; the lock was recovered and is now "
        "held by this thread (whatever the dead holder was changing under it may be "
        "incomplete)",
        self->head.what);
    const char *text = msg == NULL ? NULL : PyUnicode_AsUTF8AndSize(msg, NULL);
    int rc = text == NULL ? -1 : PyErr_WarnEx(sn_HolderDiedWarning, text, stacklevel);
    Py_XDECREF(msg);
    if (rc < 0) {
        sn_mutex_release(self->m);
        return -1;
    }
    return 0;
}

/* Acquire until ``deadline``; Py_True, Py_False (timed out) or NULL (holding nothing). */
static PyObject *lock_until(LockCore *self, double deadline, int stacklevel) {
    if (sn_check_open(&self->head) < 0) return NULL;
    int got = sn_mutex_acquire(&self->head, self->m, deadline);
    if (got < 0) return NULL;
    if (got == SN_TIMED_OUT) Py_RETURN_FALSE;
    if (got == SN_RECOVERED && warn_recovered(self, stacklevel) < 0) return NULL;
    Py_RETURN_TRUE;
}

/* acquire(blocking, timeout): SafeLock.acquire's checks, in its order. Called by the
 * Python wrapper (whose signature gives Python's own messages for wrong calls). */
static PyObject *Lock_acquire(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames) {
    static const char *const names[] = {"blocking", "timeout", NULL};
    PyObject *a[2];
    if (sn_parse("SafeLock.acquire", args, nargs, kwnames, names, 0, 2, a) < 0) return NULL;
    PyObject *blocking = a[0] == NULL ? Py_True : a[0];
    PyObject *timeout = a[1] == NULL ? minus_one : a[1];
    int forever;
    if (timeout == Py_None) {
        forever = 1;
    } else if (PyLong_CheckExact(timeout)) {
        int overflow;
        long v = PyLong_AsLongAndOverflow(timeout, &overflow);
        forever = !overflow && v == -1;
    } else if (PyFloat_CheckExact(timeout)) {
        forever = PyFloat_AsDouble(timeout) == -1.0;
    } else {
        forever = PyObject_RichCompareBool(timeout, minus_one, Py_EQ);
        if (forever < 0) return NULL;
    }
    int block = blocking == Py_True ? 1 : blocking == Py_False ? 0 : PyObject_IsTrue(blocking);
    if (block < 0) return NULL;
    double deadline;
    if (block) {
        if (forever) {
            deadline = SN_FOREVER;
        } else {
            double seconds;
            if (sn_lock_timeout(timeout, &seconds) < 0) return NULL;
            deadline = sn_deadline(seconds);
        }
    } else if (forever) {
        deadline = 0.0; /* past: try once */
    } else {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    /* stacklevel 2: the wrapper's caller */
    return lock_until((LockCore *)op, deadline, 2);
}

/* enter(handle): ``__enter__``: acquire, waiting as long as it takes; returns ``handle``. */
static PyObject *Lock_enter(PyObject *op, PyObject *handle) {
    /* stacklevel 1: the frame of the with statement */
    PyObject *got = lock_until((LockCore *)op, SN_FOREVER, 1);
    if (got == NULL) return NULL;
    Py_DECREF(got);
    Py_INCREF(handle);
    return handle;
}

/* release(): unlock; SegmentClosedError for a non-holder of a closed handle. */
static PyObject *Lock_release(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames) {
    static const char *const names[] = {NULL};
    PyObject *none[1];
    if ((nargs != 0 || kwnames != NULL) &&
        sn_parse("SafeLock.release", args, nargs, kwnames, names, 0, 0, none) < 0)
        return NULL; /* a Python def's messages */
    LockCore *self = (LockCore *)op;
    int rc = sn_mutex_release(self->m);
    if (rc == 0) Py_RETURN_NONE;
    if (rc == EPERM && self->head.closed) {
        PyErr_SetObject(sn_SegmentClosedError, self->head.closed_msg);
        return NULL;
    }
    return sn_release_failed(self->head.what, rc);
}

/* exit(*exc_info): ``__exit__``: unlock, ignoring its arguments; returns None (never
 * swallows the block's exception). */
static PyObject *Lock_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs) {
    (void)args;
    (void)nargs;
    LockCore *self = (LockCore *)op;
    int rc = sn_mutex_release(self->m);
    if (rc == 0) Py_RETURN_NONE;
    return sn_release_failed(self->head.what, rc);
}

/* undo(before): the wrapper's cleanup when an exception cut an acquire short: release the
 * mutex if this thread holds it now and did not when the acquire started (``before``: the
 * owner word read then). Never raises. */
static PyObject *Lock_undo(PyObject *op, PyObject *before) {
    LockCore *self = (LockCore *)op;
    long word = PyLong_AsLong(before);
    if (word == -1 && PyErr_Occurred()) return NULL;
    if ((word & FUTEX_TID_MASK) != my_tid()) sn_mutex_release(self->m); /* EPERM: not held */
    Py_RETURN_NONE;
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Lock_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1)\n--\n\nSafeLock.acquire's checks and lock; True, "
     "or False when the timeout expired."},
    {"enter", Lock_enter, METH_O,
     "enter(handle)\n--\n\n__enter__: acquire, waiting as long as it takes; returns handle."},
    {"release", (PyCFunction)(void (*)(void))Lock_release, METH_FASTCALL | METH_KEYWORDS,
     "release()\n--\n\nUnlock."},
    {"exit", (PyCFunction)(void (*)(void))Lock_exit, METH_FASTCALL,
     "exit(*exc_info)\n--\n\n__exit__: unlock; returns None."},
    {"undo", Lock_undo, METH_O,
     "undo(before)\n--\n\nRelease if held by this thread now but not when the owner word "
     "read ``before``."},
    SN_CORE_CLOSE_METHOD,
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Lock_slots[] = {
    {Py_tp_new, Lock_new},
    {Py_tp_dealloc, Lock_dealloc},
    {Py_tp_methods, Lock_methods},
    {Py_tp_doc, "Lock(mm, offset, what, closed_msg, owner_word)\n--\n\n"
                "The compiled core of a SafeLock handle (see safeshm._lock)."},
    {0, NULL},
};

static PyType_Spec Lock_spec = {
    .name = "safeshm._native.Lock",
    .basicsize = sizeof(LockCore),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Lock_slots,
};

/* -- CLevel: a class attribute that reads an instance attribute ------------------------
 * ``CLevel(name, doc, bind=False)`` on a class: ``instance.attr`` is ``getattr(instance,
 * name)`` -- with ``bind``, that bound to the instance (``types.MethodType``), so that the
 * call gets the instance as its argument and keeps it alive meanwhile. A data descriptor,
 * so it is found first, as special methods are looked up; ``Class.attr(instance, *args)``
 * calls it (as contextlib.ExitStack calls ``type(cm).__exit__(cm, ...)``).
 * _lock._CLevel does the same with a property and operator.attrgetter; this one costs one
 * attribute lookup, for ``with lock:``. */
typedef struct {
    PyObject_HEAD
    PyObject *name;
    PyObject *doc;
    int bind;
} CLevel;

static PyTypeObject *Lock_type;

/* What a ``bind`` CLevel's lookup returns: a builtin method whose self is the instance
 * (the limited API has no PyMethod_New), which calls ``getattr(instance,
 * bound_name).enter(instance)``: the Lock core's enter, given the handle (a poisoned
 * ``_core`` raises when called). One such CLevel exists: SafeLock.__enter__. */
static PyObject *bound_name;

static PyObject *bound_call(PyObject *instance, PyObject *unused) {
    (void)unused;
    PyObject *core = PyObject_GetAttr(instance, bound_name);
    if (core == NULL) return NULL;
    PyObject *result = Py_TYPE(core) == Lock_type ? Lock_enter(core, instance)
                                                  : PyObject_CallFunctionObjArgs(core, instance, NULL);
    Py_DECREF(core);
    return result;
}

static PyMethodDef bound_def = {"__enter__", bound_call, METH_NOARGS, NULL};

static PyObject *CLevel_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *name, *doc = Py_None;
    int bind = 0;
    static char *kwlist[] = {"name", "doc", "bind", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|Op:CLevel", kwlist, &name, &doc, &bind))
        return NULL;
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    CLevel *self = (CLevel *)alloc(type, 0);
    if (self == NULL) return NULL;
    Py_INCREF(name);
    self->name = name;
    Py_INCREF(doc);
    self->doc = doc;
    self->bind = bind;
    if (bind) {
        if (bound_name != NULL && PyUnicode_Compare(bound_name, name) != 0) {
            Py_DECREF(self);
            PyErr_SetString(PyExc_ValueError, "safeshm._native: one bound attribute name only");
            return NULL;
        }
        Py_INCREF(name);
        Py_XDECREF(bound_name);
        bound_name = name;
    }
    return (PyObject *)self;
}

static void CLevel_dealloc(PyObject *op) {
    CLevel *self = (CLevel *)op;
    PyTypeObject *tp = Py_TYPE(op);
    Py_CLEAR(self->name);
    Py_CLEAR(self->doc);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(op);
    Py_DECREF(tp);
}

static PyObject *CLevel_get(PyObject *op, PyObject *obj, PyObject *type) {
    (void)type;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(op);
        return op;
    }
    if (((CLevel *)op)->bind) return PyCFunction_NewEx(&bound_def, obj, NULL);
    /* A name that leads back to a CLevel (itself, or a cycle of them) would recurse in C
     * until the stack overflowed: a RecursionError instead, as a property would give. */
    if (Py_EnterRecursiveCall(" while reading a CLevel attribute")) return NULL;
    PyObject *result = PyObject_GetAttr(obj, ((CLevel *)op)->name);
    Py_LeaveRecursiveCall();
    return result;
}

static int CLevel_set(PyObject *op, PyObject *obj, PyObject *value) {
    (void)obj;
    (void)value;
    PyErr_Format(PyExc_AttributeError, "attribute is read-only (it reads %R)",
                 ((CLevel *)op)->name);
    return -1;
}

static PyObject *CLevel_call(PyObject *op, PyObject *args, PyObject *kwargs) {
    Py_ssize_t n = PyTuple_Size(args);
    if (n < 1) {
        PyErr_SetString(PyExc_TypeError, "expected the instance as the first argument");
        return NULL;
    }
    if (((CLevel *)op)->bind) {
        if (n != 1 || (kwargs != NULL && PyDict_Size(kwargs) != 0)) {
            PyErr_SetString(PyExc_TypeError, "__enter__() takes no arguments");
            return NULL;
        }
        return bound_call(PyTuple_GetItem(args, 0), NULL);
    }
    PyObject *bound = PyObject_GetAttr(PyTuple_GetItem(args, 0), ((CLevel *)op)->name);
    if (bound == NULL) return NULL;
    PyObject *rest = PyTuple_GetSlice(args, 1, n);
    PyObject *result = rest == NULL ? NULL : PyObject_Call(bound, rest, kwargs);
    Py_XDECREF(rest);
    Py_DECREF(bound);
    return result;
}

static PyObject *CLevel_doc(PyObject *op, void *closure) {
    (void)closure;
    PyObject *doc = ((CLevel *)op)->doc;
    Py_INCREF(doc);
    return doc;
}

static PyGetSetDef CLevel_getset[] = {
    {"__doc__", CLevel_doc, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot CLevel_slots[] = {
    {Py_tp_new, CLevel_new},
    {Py_tp_dealloc, CLevel_dealloc},
    {Py_tp_descr_get, CLevel_get},
    {Py_tp_descr_set, CLevel_set},
    {Py_tp_call, CLevel_call},
    {Py_tp_getset, CLevel_getset},
    {0, NULL},
};

static PyType_Spec CLevel_spec = {
    .name = "safeshm._native.CLevel",
    .basicsize = sizeof(CLevel),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = CLevel_slots,
};

int sn_register_lock(PyObject *module) {
    minus_one = PyLong_FromLong(-1);
    if (minus_one == NULL) return -1;
    if (sn_add_type(module, &CLevel_spec, NULL) < 0) return -1;
    PyObject *type;
    if (sn_add_type(module, &Lock_spec, &type) < 0) return -1;
    Lock_type = (PyTypeObject *)type; /* the module keeps it */
    Py_DECREF(type);
    return 0;
}
