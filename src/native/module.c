/* safeshm._native: module initialisation and the pieces every structure shares
 * (see safeshm.h). */
#include "safeshm.h"

#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

PyObject *sn_SafeShmError, *sn_SegmentClosedError, *sn_SegmentCorruptedError,
    *sn_LockReentryError, *sn_LockNotHeldError, *sn_LockTimeoutError, *sn_HolderDiedWarning,
    *sn_QueueShutDown, *sn_Empty, *sn_Full;

static PyObject *numbers_Real;
static double timeout_max; /* threading.TIMEOUT_MAX */

/* -- mappings ------------------------------------------------------------------------ */
int sn_map_open(sn_map *map, PyObject *obj) {
    if (PyObject_GetBuffer(obj, &map->view, PyBUF_WRITABLE) < 0) {
        map->base = NULL;
        return -1;
    }
    map->base = (char *)map->view.buf;
    map->size = map->view.len;
    return 0;
}

int sn_map_check(const sn_map *map, Py_ssize_t offset, Py_ssize_t size) {
    if (map->base == NULL || offset < 0 || size < 0 || offset > map->size - size) {
        PyErr_Format(PyExc_ValueError, "safeshm._native: [%zd, %zd) is outside the mapping",
                     offset, offset + size);
        return -1;
    }
    return 0;
}

void sn_map_release(sn_map *map) {
    if (map->base != NULL) {
        map->base = NULL;
        PyBuffer_Release(&map->view);
    }
}

/* -- cores -------------------------------------------------------------------------- */
int sn_core_init(sn_core *core, PyObject *mm, PyObject *what, PyObject *closed_msg) {
    if (!PyUnicode_Check(what) || !PyUnicode_Check(closed_msg)) {
        PyErr_SetString(PyExc_TypeError, "safeshm._native: what and closed_msg must be str");
        return -1;
    }
    if (core->map.base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "safeshm._native: core initialised twice");
        return -1;
    }
    if (sn_map_open(&core->map, mm) < 0) return -1;
    core->closed = 0;
    Py_INCREF(what);
    core->what = what;
    Py_INCREF(closed_msg);
    core->closed_msg = closed_msg;
    return 0;
}

void sn_core_clear(sn_core *core) {
    sn_map_release(&core->map);
    Py_CLEAR(core->what);
    Py_CLEAR(core->closed_msg);
}

void sn_core_dealloc(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    sn_core_clear((sn_core *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

PyObject *sn_core_close(PyObject *self, PyObject *unused) {
    (void)unused;
    ((sn_core *)self)->closed = 1;
    Py_RETURN_NONE;
}

/* -- arguments ----------------------------------------------------------------------- */
/* The checks of check_timeout() on a timeout that is not None: its seconds in ``*s``. */
static int timeout_value(PyObject *timeout, double *out) {
    double s;
    if (PyFloat_CheckExact(timeout)) {
        s = PyFloat_AsDouble(timeout);
    } else {
        int real = 0;
        if (!PyLong_CheckExact(timeout) && !PyBool_Check(timeout)) {
            real = PyObject_IsInstance(timeout, numbers_Real);
            if (real < 0) return -1;
        }
        if (!PyLong_CheckExact(timeout) && !real) {
            PyObject *name = PyType_GetName(Py_TYPE(timeout));
            if (name == NULL) return -1;
            PyErr_Format(PyExc_TypeError,
                         "timeout must be a number of seconds or None, not %U", name);
            Py_DECREF(name);
            return -1;
        }
        s = PyFloat_AsDouble(timeout); /* float(timeout), as check_timeout does */
        if (s == -1.0 && PyErr_Occurred()) return -1;
    }
    if (!(s >= 0)) { /* also NaN */
        PyErr_Format(PyExc_ValueError,
                     "timeout must be a non-negative number of seconds or None, got %R",
                     timeout);
        return -1;
    }
    *out = s;
    return 0;
}


int sn_timeout(PyObject *timeout, double *seconds) {
    if (timeout == Py_None) {
        *seconds = SN_FOREVER;
        return 0;
    }
    double s;
    if (timeout_value(timeout, &s) < 0) return -1;
    *seconds = s < timeout_max ? s : SN_FOREVER;
    return 0;
}

/* sn_timeout() for the acquire() of a lock, as threading.Lock.acquire: a timeout beyond
 * threading.TIMEOUT_MAX is an OverflowError there (_timeout.check_lock_timeout). */
int sn_lock_timeout(PyObject *timeout, double *seconds) {
    if (timeout == Py_None) {
        *seconds = SN_FOREVER;
        return 0;
    }
    double s;
    if (timeout_value(timeout, &s) < 0) return -1;
    if (s > timeout_max) {
        PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
        return -1;
    }
    *seconds = s < timeout_max ? s : SN_FOREVER;
    return 0;
}

int sn_int64(const char *what, PyObject *v, int64_t *out) {
    long long x;
    int overflow = 0;
    if (PyLong_CheckExact(v)) {
        x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (!overflow) {
            if (x == -1 && PyErr_Occurred()) return -1;
            *out = (int64_t)x;
            return 0;
        }
    }
    PyObject *i = PyNumber_Index(v); /* int, bool, numpy integers; not float, not str */
    if (i == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) return -1;
        PyErr_Clear();
        PyObject *name = PyType_GetName(Py_TYPE(v));
        if (name == NULL) return -1;
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %U", what, name);
        Py_DECREF(name);
        return -1;
    }
    x = PyLong_AsLongLongAndOverflow(i, &overflow);
    if (overflow) {
        PyErr_Format(PyExc_OverflowError, "%s %S is outside the int64 range; nothing was changed",
                     what, i);
        Py_DECREF(i);
        return -1;
    }
    Py_DECREF(i);
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)x;
    return 0;
}

int sn_parse(const char *qualname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
             const char *const *names, int nrequired, int npositional, PyObject **out) {
    int n = 0;
    while (names[n] != NULL) n++;
    if (nargs > npositional) {
        if (nrequired == npositional)
            PyErr_Format(PyExc_TypeError, "%s() takes %d positional argument%s but %zd %s given",
                         qualname, npositional + 1, npositional ? "s" : "", nargs + 1,
                         nargs ? "were" : "was");
        else
            PyErr_Format(PyExc_TypeError,
                         "%s() takes from %d to %d positional arguments but %zd were given",
                         qualname, nrequired + 1, npositional + 1, nargs + 1);
        return -1;
    }
    for (int i = 0; i < n; i++) out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GetItem(kwnames, k);
        int found = -1;
        for (int i = 0; i < n; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                found = i;
                break;
            }
        }
        if (found < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         qualname, key);
            return -1;
        }
        if (out[found] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", qualname,
                         names[found]);
            return -1;
        }
        out[found] = args[nargs + k];
    }
    for (int i = 0; i < nrequired; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing 1 required %sargument: '%s'", qualname,
                         i < npositional ? "positional " : "keyword-only ", names[i]);
            return -1;
        }
    }
    return 0;
}

double sn_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double sn_deadline(double seconds) {
    return isinf(seconds) ? SN_FOREVER : sn_monotonic() + seconds;
}

static double spin_checked_at = -1.0;
static int spin_ok = 1;

int sn_spinning_helps(void) {
    double now = sn_monotonic();
    if (now - spin_checked_at > 0.05) {
        cpu_set_t set;
        spin_checked_at = now;
        if (sched_getaffinity(0, sizeof set, &set) == 0)
            spin_ok = CPU_COUNT(&set) > 1;
        else
            spin_ok = sysconf(_SC_NPROCESSORS_ONLN) > 1;
    }
    return spin_ok;
}

static struct timespec to_timespec(double t) {
    struct timespec ts;
    double whole = floor(t);
    ts.tv_sec = (time_t)whole;
    ts.tv_nsec = (long)((t - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) ts.tv_nsec = 999999999L;
    return ts;
}

/* -- robust mutexes ------------------------------------------------------------------ */
#define SN_SPINS 60 /* trylock attempts before a contended acquire sleeps (as _lock._SPINS) */

static int recover(pthread_mutex_t *m) {
    /* The one recovery sequence (_lock.RobustMutex._recover): this thread holds the mutex
     * whose holder died. Count it first, then mark it consistent. EINVAL: an interrupted
     * acquire's cleanup in another thread already did (glibc lets any thread). */
    int64_t *recoveries = (int64_t *)((char *)m + SN_RECOVERIES_OFFSET);
    *recoveries += 1;
    int rc = pthread_mutex_consistent(m);
    if (rc != 0 && rc != EINVAL) {
        pthread_mutex_unlock(m);
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return SN_RECOVERED;
}

static int acquire_failed(PyObject *what, int rc) {
    if (rc == EDEADLK)
        PyErr_Format(sn_LockReentryError,
                     "%U is already held by this thread; it is not reentrant, so acquiring it "
                     "again would deadlock",
                     what);
    else if (rc == ENOTRECOVERABLE)
        PyErr_Format(sn_SafeShmError, "%U is unrecoverable (ENOTRECOVERABLE)", what);
    else if (rc == EINVAL)
        PyErr_Format(sn_SegmentCorruptedError,
                     "%U is damaged: locking its mutex failed with EINVAL", what);
    else
        PyErr_Format(PyExc_OSError, "locking %U failed: %s", what, strerror(rc));
    return -1;
}

int sn_mutex_acquire(sn_core *core, pthread_mutex_t *m, double deadline) {
    PyObject *what = core->what;
    int rc = pthread_mutex_trylock(m);
    if (rc == EBUSY) {
        if (!isinf(deadline) && deadline <= sn_monotonic()) return SN_TIMED_OUT;
        if (sn_spinning_helps()) {
            for (int i = 0; i < SN_SPINS && rc == EBUSY; i++) rc = pthread_mutex_trylock(m);
        }
        while (rc == EBUSY || rc == ETIMEDOUT) {
            double now = sn_monotonic();
            if (now >= deadline) return SN_TIMED_OUT;
            double wake = deadline < now + SN_WAIT_SLICE ? deadline : now + SN_WAIT_SLICE;
            struct timespec ts = to_timespec(wake);
            Py_BEGIN_ALLOW_THREADS
            rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
            Py_END_ALLOW_THREADS
            if (rc == ETIMEDOUT && (PyErr_CheckSignals() < 0 || sn_check_open(core) < 0))
                return -1; /* holds nothing */
        }
    }
    if (rc == 0) return SN_OK;
    if (rc == EOWNERDEAD) return recover(m);
    return acquire_failed(what, rc);
}

PyObject *sn_release_failed(PyObject *what, int rc) {
    if (rc == EPERM)
        PyErr_Format(sn_LockNotHeldError, "%U is not held by this thread", what);
    else
        PyErr_Format(PyExc_OSError, "unlocking %U failed: %s", what, strerror(rc));
    return NULL;
}

/* -- futexes ------------------------------------------------------------------------- */
int sn_futex_wait(sn_core *core, uint32_t *addr, uint32_t expected, double deadline) {
    for (;;) {
        if (__atomic_load_n(addr, __ATOMIC_SEQ_CST) != expected) return 0;
        double now = sn_monotonic();
        if (now >= deadline) return 0;
        double left = deadline - now < SN_WAIT_SLICE ? deadline - now : SN_WAIT_SLICE;
        struct timespec rel = to_timespec(left);
        long rc;
        Py_BEGIN_ALLOW_THREADS
        /* shared (not FUTEX_PRIVATE): keyed by file and offset, across processes */
        rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, &rel, NULL, 0);
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0 || sn_check_open(core) < 0) return -1;
        if (rc == 0) return 0; /* woken (possibly spuriously: the caller re-checks) */
        /* ETIMEDOUT: next slice; EAGAIN: the value changed; EINTR: re-check */
        if (rc == -1 && errno == EAGAIN) return 0;
    }
}

int sn_futex_wake(uint32_t *addr, int n) {
    long rc = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    return rc < 0 ? 0 : (int)rc;
}

/* -- module -------------------------------------------------------------------------- */
int sn_add_type(PyObject *module, PyType_Spec *spec, PyObject **out) {
    PyObject *type = PyType_FromModuleAndSpec(module, spec, NULL);
    if (type == NULL) return -1;
    const char *dot = strrchr(spec->name, '.');
    if (PyModule_AddObjectRef(module, dot ? dot + 1 : spec->name, type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    if (out != NULL)
        *out = type; /* the module holds a reference too */
    else
        Py_DECREF(type);
    return 0;
}

static int import_attr(const char *module, const char *name, PyObject **out) {
    PyObject *mod = PyImport_ImportModule(module);
    if (mod == NULL) return -1;
    *out = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    return *out == NULL ? -1 : 0;
}

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "safeshm._native",
    .m_doc = "safeshm's compiled core: the hot paths of every structure (see safeshm.implementation()).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *tmax = NULL;
    if (import_attr("safeshm._errors", "SafeShmError", &sn_SafeShmError) < 0 ||
        import_attr("safeshm._errors", "SegmentClosedError", &sn_SegmentClosedError) < 0 ||
        import_attr("safeshm._errors", "SegmentCorruptedError", &sn_SegmentCorruptedError) < 0 ||
        import_attr("safeshm._errors", "LockReentryError", &sn_LockReentryError) < 0 ||
        import_attr("safeshm._errors", "LockNotHeldError", &sn_LockNotHeldError) < 0 ||
        import_attr("safeshm._errors", "LockTimeoutError", &sn_LockTimeoutError) < 0 ||
        import_attr("safeshm._errors", "HolderDiedWarning", &sn_HolderDiedWarning) < 0 ||
        import_attr("safeshm._errors", "QueueShutDown", &sn_QueueShutDown) < 0 ||
        import_attr("queue", "Empty", &sn_Empty) < 0 || import_attr("queue", "Full", &sn_Full) < 0 ||
        import_attr("numbers", "Real", &numbers_Real) < 0 ||
        import_attr("threading", "TIMEOUT_MAX", &tmax) < 0)
        return NULL;
    timeout_max = PyFloat_AsDouble(tmax);
    Py_DECREF(tmax);
    if (timeout_max == -1.0 && PyErr_Occurred()) return NULL;

    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL) return NULL;
    if (sn_register_counter(m) < 0 || sn_register_sharded(m) < 0 || sn_register_array(m) < 0 ||
        sn_register_lock(m) < 0 || sn_register_queue(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
