/* safeshm._native: ShardedCounter.add (see safeshm.h and src/safeshm/_sharded.py).
 *
 * One slot protocol for both implementations: slots are claimed, released and reclaimed
 * by the Python code (_sharded.py: _claim, _Lease, the at-fork hook), which keeps the
 * calling thread's lease in the handle's threading.local. What C adds is a cache of the
 * slot each thread owns, so the hot path is a table lookup and one store:
 *
 *  - keyed by the Python thread state's unique id: a thread state lives exactly as long
 *    as the threading.local data that holds the lease (a new thread, or a foreign thread
 *    that gets a new thread state, has a new id and asks Python again);
 *  - and by a fork generation, bumped in every forked child (pthread_atfork): a child
 *    forgets its parent's slots (the Python hook gives it a new threading.local), and
 *    its cache entries, inherited with the memory, no longer match;
 *  - per core: a closed handle's core is closed, and a new handle has its own core.
 *
 * On a miss, the handle's _native_slot() runs (claims a slot if this thread has none)
 * and returns its offset, or None when every slot is owned. Anything but an exact int
 * delta whose sum fits the slot goes to the handle's _add_slow(), the ctypes path's own
 * slow path (the shared word under the lock, typed errors).
 *
 * The core holds its handle, as a bound method of the ctypes path holds its instance: a
 * handle's add kept after the handle itself was dropped keeps the handle -- and with it
 * the thread-locals that own the cached slots -- alive. (The cycle handle -> core ->
 * handle is the collector's: close() breaks it at once.)
 */
#include "safeshm.h"

#include <errno.h>
#include <pthread.h>

#define CACHE_SIZE 64 /* a power of two */

typedef struct {
    uint64_t tid;       /* PyThreadState_GetID; 0: empty */
    unsigned long gen;  /* fork_gen when cached */
    int64_t *slot;
} cache_entry;

typedef struct {
    sn_core head;
    PyObject *handle; /* the ShardedCounter */
    cache_entry cache[CACHE_SIZE];
} Sharded;

static volatile unsigned long fork_gen = 1;

static void after_fork_in_child(void) { fork_gen++; }

static PyObject *closed(Sharded *self) {
    PyErr_SetObject(sn_SegmentClosedError, self->head.closed_msg);
    return NULL;
}

/* A new reference to the handle, or NULL with SegmentClosedError once it was cleared. */
static PyObject *get_handle(Sharded *self) {
    if (self->handle == NULL) return closed(self);
    Py_INCREF(self->handle);
    return self->handle;
}

/* Ask Python for this thread's slot (claiming one if needed) and cache it. NULL with no
 * exception: no slot (every slot is owned). */
static int64_t *lookup_slow(Sharded *self, uint64_t tid) {
    PyObject *h = get_handle(self);
    if (h == NULL) return NULL;
    PyObject *r = PyObject_CallMethod(h, "_native_slot", NULL);
    Py_DECREF(h);
    if (r == NULL || r == Py_None) {
        Py_XDECREF(r);
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    if (sn_map_check(&self->head.map, offset, 8) < 0) return NULL;
    if (offset % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native.Sharded: misaligned slot");
        return NULL;
    }
    int64_t *slot = (int64_t *)(self->head.map.base + offset);
    cache_entry *e = &self->cache[tid & (CACHE_SIZE - 1)];
    if (e->tid != 0 && e->gen == fork_gen && e->tid != tid) {
        /* taken by another live-looking thread: use the next one if it is free */
        cache_entry *e2 = &self->cache[(tid + 1) & (CACHE_SIZE - 1)];
        if (e2->tid == 0 || e2->gen != fork_gen || e2->tid == tid) e = e2;
    }
    e->tid = tid;
    e->gen = fork_gen;
    e->slot = slot;
    return slot;
}

static PyObject *add_slow(Sharded *self, PyObject *delta) {
    PyObject *h = get_handle(self);
    if (h == NULL) return NULL;
    PyObject *r;
    if (delta != NULL) {
        r = PyObject_CallMethod(h, "_add_slow", "O", delta);
    } else {
        PyObject *one = PyLong_FromLong(1);
        r = one == NULL ? NULL : PyObject_CallMethod(h, "_add_slow", "O", one);
        Py_XDECREF(one);
    }
    Py_DECREF(h);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

/* Any delta but an exact int in the int64 range, into this thread's slot: what the ctypes
 * path's ``slot[0] += delta`` does (``old + delta``, then the memoryview store's index
 * conversion), and where that raises TypeError or ValueError, its _add_slow(). */
static PyObject *add_emulated(Sharded *self, int64_t *slot, PyObject *delta) {
    PyObject *o = PyLong_FromLongLong(__atomic_load_n(slot, __ATOMIC_RELAXED));
    if (o == NULL) return NULL;
    PyObject *sum = PyNumber_Add(o, delta);
    Py_DECREF(o);
    if (sum == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Clear();
        return add_slow(self, delta);
    }
    PyObject *i = PyNumber_Index(sum);
    Py_DECREF(sum);
    if (i == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) return NULL;
        PyErr_Clear();
        return add_slow(self, delta);
    }
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (overflow) return add_slow(self, delta);
    if (x == -1 && PyErr_Occurred()) return NULL;
    /* the operand's code may have run other threads: never this thread's slot, though */
    if (self->head.closed) return closed(self);
    __atomic_store_n(slot, (int64_t)x, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static const char *const add_names[] = {"delta", NULL};

static PyObject *Sharded_add(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames) {
    Sharded *self = (Sharded *)op;
    PyObject *arg = NULL;
    if (kwnames == NULL && nargs <= 1) {
        if (nargs) arg = args[0];
    } else if (sn_parse("ShardedCounter.add", args, nargs, kwnames, add_names, 0, 1, &arg) < 0) {
        return NULL;
    }
    if (self->head.closed) return closed(self);
    /* as the ctypes path: the thread gets its slot first, then the delta is looked at */
    uint64_t tid = PyThreadState_GetID(PyThreadState_Get());
    unsigned long gen = fork_gen;
    int64_t *slot;
    cache_entry *e = &self->cache[tid & (CACHE_SIZE - 1)];
    if (e->tid == tid && e->gen == gen) {
        slot = e->slot;
    } else {
        e = &self->cache[(tid + 1) & (CACHE_SIZE - 1)];
        if (e->tid == tid && e->gen == gen) {
            slot = e->slot;
        } else {
            slot = lookup_slow(self, tid);
            if (slot == NULL) {
                if (PyErr_Occurred()) return NULL;
                return add_slow(self, arg); /* no slot: the shared word */
            }
            if (self->head.closed) return closed(self);
        }
    }
    int64_t delta = 1;
    if (arg != NULL) {
        if (!PyLong_CheckExact(arg)) return add_emulated(self, slot, arg);
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(arg, &overflow);
        if (overflow) return add_emulated(self, slot, arg);
        delta = (int64_t)x;
    }
    /* Only this thread writes its slot: a plain read-modify-write, and an atomic 8-byte
     * store for concurrent readers (value, exchange). */
    int64_t new;
    if (__builtin_add_overflow(__atomic_load_n(slot, __ATOMIC_RELAXED), delta, &new))
        return add_slow(self, arg);
    __atomic_store_n(slot, new, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *Sharded_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *mm, *what, *closed_msg, *handle;
    static char *kwlist[] = {"mm", "what", "closed_msg", "handle", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OUUO:Sharded", kwlist, &mm, &what,
                                     &closed_msg, &handle))
        return NULL;
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Sharded *self = (Sharded *)alloc(type, 0);
    if (self == NULL) return NULL;
    if (sn_core_init(&self->head, mm, what, closed_msg) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(handle);
    self->handle = handle;
    return (PyObject *)self;
}

static int Sharded_traverse(PyObject *op, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((Sharded *)op)->handle);
    return 0;
}

static int Sharded_clear(PyObject *op) {
    Py_CLEAR(((Sharded *)op)->handle);
    return 0;
}

static void Sharded_dealloc(PyObject *op) {
    PyObject_GC_UnTrack(op);
    Sharded_clear(op);
    sn_core_dealloc(op);
}

static PyMethodDef Sharded_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Sharded_add, METH_FASTCALL | METH_KEYWORDS,
     "add($self, /, delta=1)\n--\n\nShardedCounter.add in C."},
    SN_CORE_CLOSE_METHOD,
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Sharded_slots[] = {
    {Py_tp_new, Sharded_new},
    {Py_tp_dealloc, Sharded_dealloc},
    {Py_tp_traverse, Sharded_traverse},
    {Py_tp_clear, Sharded_clear},
    {Py_tp_methods, Sharded_methods},
    {Py_tp_doc, "Sharded(mm, what, closed_msg, handle)\n--\n\n"
                "The compiled core of a ShardedCounter handle (see safeshm._sharded)."},
    {0, NULL},
};

static PyType_Spec Sharded_spec = {
    .name = "safeshm._native.Sharded",
    .basicsize = sizeof(Sharded),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Sharded_slots,
};

int sn_register_sharded(PyObject *module) {
    static int registered = 0;
    if (!registered) {
        int rc = pthread_atfork(NULL, NULL, after_fork_in_child);
        if (rc != 0) {
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        registered = 1;
    }
    return sn_add_type(module, &Sharded_spec, NULL);
}
