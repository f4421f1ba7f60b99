/* safeshm._native: the compiled core. Shared declarations.
 *
 * Every structure's hot paths, in C, on exactly the segment layouts and protocols of the
 * ctypes implementation (src/safeshm/_*.py): the same robust pthread mutexes, the same
 * futex words, the same compare-and-swap on the same int64 words. A process using this
 * extension and one using ctypes share every structure at the same time.
 *
 * Built against the limited API of 3.11 (one abi3 wheel for 3.11+): measured, it costs
 * nothing on the hot paths (a counter add, 3.11 and 3.13, within noise).
 *
 * Rules every file follows:
 *  - A core object holds a buffer export of the segment's mmap for as long as it lives
 *    (sn_map): the mapping cannot be unmapped under a call in flight, even one blocked
 *    with the GIL released in another thread. close() on the Python side drops its
 *    references and the last one out releases the export.
 *  - Blocking waits release the GIL, sleep at most SN_WAIT_SLICE at a time and call
 *    PyErr_CheckSignals() between sleeps (with the GIL): Ctrl-C interrupts them promptly,
 *    and a wait that raises holds nothing.
 *  - A critical section runs entirely in C: lock, operate, unlock, with no Python code
 *    in between, so no signal handler's exception can land inside it.
 *  - Errors and their messages are the ctypes path's, word for word.
 */
#ifndef SAFESHM_NATIVE_H
#define SAFESHM_NATIVE_H

#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#include <Python.h>

/* CPython 3.12 and 3.13.0-3.13.4 headers define Py_RETURN_NONE/TRUE/FALSE as a bare
 * ``return Py_None`` (immortal there) whatever Py_LIMITED_API says (gh-134989): an abi3
 * module built with them would steal a reference to None/True/False on every call when
 * it runs on 3.11, until the interpreter aborts (none_dealloc). As 3.11's headers do: */
#if Py_LIMITED_API + 0 < 0x030C0000
#undef Py_RETURN_NONE
#define Py_RETURN_NONE return Py_NewRef(Py_None)
#undef Py_RETURN_TRUE
#define Py_RETURN_TRUE return Py_NewRef(Py_True)
#undef Py_RETURN_FALSE
#define Py_RETURN_FALSE return Py_NewRef(Py_False)
#endif

#include <pthread.h>
#include <stdint.h>

/* -- errors (imported from safeshm._errors and the stdlib at module init) ------------- */
extern PyObject *sn_SafeShmError;
extern PyObject *sn_SegmentClosedError;
extern PyObject *sn_SegmentCorruptedError;
extern PyObject *sn_LockReentryError;
extern PyObject *sn_LockNotHeldError;
extern PyObject *sn_LockTimeoutError;
extern PyObject *sn_HolderDiedWarning;
extern PyObject *sn_QueueShutDown;
extern PyObject *sn_Empty; /* queue.Empty */
extern PyObject *sn_Full;  /* queue.Full */

/* -- a buffer export of a mapping --------------------------------------------------- */
typedef struct {
    Py_buffer view;
    char *base; /* NULL: not (or no longer) exported */
    Py_ssize_t size;
} sn_map;

/* Export ``obj`` (an mmap) writable into ``map``; 0, or -1 with an exception. */
int sn_map_open(sn_map *map, PyObject *obj);
/* Check that [offset, offset + size) lies in the mapping; 0, or -1 with ValueError. */
int sn_map_check(const sn_map *map, Py_ssize_t offset, Py_ssize_t size);
void sn_map_release(sn_map *map);

/* -- the head of every core object ----------------------------------------------------
 * A core is what a handle's _bind() makes: the handle keeps it as ``_core`` and binds its
 * hot methods as instance attributes (listed in ``_MAPPED``, so close() poisons them).
 * ``close()`` on the core sets ``closed``: a call that starts later, or one blocked in
 * another thread (checked between sleeps), raises SegmentClosedError(closed_msg). The
 * buffer export is released only in dealloc, after the last call in flight returned. */
typedef struct {
    PyObject_HEAD
    sn_map map;
    int closed;
    PyObject *what;       /* e.g. "SafeLock 'x'": for lock messages */
    PyObject *closed_msg; /* e.g. "SafeLock 'x' is closed on this handle" */
} sn_core;

/* Fill the head from (mm, what, closed_msg); 0 or -1. */
int sn_core_init(sn_core *core, PyObject *mm, PyObject *what, PyObject *closed_msg);
/* Release the head's references (call from dealloc). */
void sn_core_clear(sn_core *core);
/* Raise SegmentClosedError if closed; 0 or -1. */
static inline int sn_check_open(sn_core *core) {
    if (core->closed) {
        PyErr_SetObject(sn_SegmentClosedError, core->closed_msg);
        return -1;
    }
    return 0;
}
/* A generic dealloc and the ``close()`` method for cores with no other references. */
void sn_core_dealloc(PyObject *self);
PyObject *sn_core_close(PyObject *self, PyObject *unused);
#define SN_CORE_CLOSE_METHOD                                                                   \
    {"close", (PyCFunction)sn_core_close, METH_NOARGS,                                         \
     "close()\n--\n\nMark closed: later calls and blocked ones raise SegmentClosedError."}

/* -- arguments --------------------------------------------------------------------- */
#define SN_FOREVER (1.0 / 0.0)

/* ``timeout`` as _timeout.check_timeout does it: None -> SN_FOREVER; a real number >= 0
 * (bool refused) -> seconds (anything from threading.TIMEOUT_MAX up -> SN_FOREVER).
 * 0, or -1 with TypeError/ValueError and the ctypes path's messages. */
int sn_timeout(PyObject *timeout, double *seconds);
int sn_lock_timeout(PyObject *timeout, double *seconds);

/* Parse a METH_FASTCALL|METH_KEYWORDS call against ``names`` (NULL-terminated), of which
 * the first ``nrequired`` are required; the first ``npositional`` may be passed by
 * position. Fills ``out`` (NULL for an absent optional one, borrowed). ``qualname``
 * ("SafeCounter.add") is for the messages, which are Python's own for a def with the same
 * parameters. 0, or -1 with TypeError. */
int sn_parse(const char *qualname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
             const char *const *names, int nrequired, int npositional, PyObject **out);
/* ``v`` as _int64.check_int64(what, v) does it; 0, or -1 with TypeError/OverflowError. */
int sn_int64(const char *what, PyObject *v, int64_t *out);
/* CLOCK_MONOTONIC in seconds: the clock of time.monotonic(). */
double sn_monotonic(void);
/* A deadline on that clock for ``seconds`` (SN_FOREVER stays SN_FOREVER). */
double sn_deadline(double seconds);

/* Whether this process may use more than one CPU (_compat.spinning_helps, re-read every
 * 50 ms at most): only then is spinning before a sleep worth it. */
int sn_spinning_helps(void);

/* -- robust mutexes (_lock.RobustMutex's protocol) -------------------------------------- */
#define SN_MUTEX_BLOCK 128       /* bytes: the pthread mutex (64), recoveries (int64), padding */
#define SN_RECOVERIES_OFFSET 64
#define SN_WAIT_SLICE 0.1        /* longest sleep between checks for signals, seconds */

enum { SN_OK = 0, SN_RECOVERED = 1, SN_TIMED_OUT = 2 };

/* Acquire the robust mutex at ``m`` (core->what names it in messages), waiting
 * until the monotonic ``deadline`` (SN_FOREVER: forever; one already past: try once).
 * Spins briefly first when another CPU can release it; then sleeps in the kernel with the
 * GIL released. Returns SN_OK, SN_RECOVERED (the previous holder died: the recovery was
 * counted and the mutex marked consistent; the caller tells its user) or SN_TIMED_OUT;
 * or -1 with an exception set (LockReentryError, a signal handler's exception,
 * SegmentClosedError when the core was closed meanwhile, SegmentCorruptedError, OSError),
 * the mutex then NOT held by this thread. */
int sn_mutex_acquire(sn_core *core, pthread_mutex_t *m, double deadline);
/* Release; 0 or the errno (EPERM: not held by this thread). Never blocks, never raises. */
static inline int sn_mutex_release(pthread_mutex_t *m) { return pthread_mutex_unlock(m); }
/* Raise what an unlock's nonzero ``rc`` means (LockNotHeldError for EPERM, else OSError);
 * returns NULL for convenience. */
PyObject *sn_release_failed(PyObject *what, int rc);

/* -- futexes ------------------------------------------------------------------------- */
/* Sleep while *addr == expected, until woken or the monotonic ``deadline``, with the GIL
 * released, in slices of SN_WAIT_SLICE with signal checks between them. Returns 0 (woken,
 * or the value changed, or the deadline passed: the caller re-checks), -1 with an
 * exception (a signal handler raised, or the core was closed meanwhile). */
int sn_futex_wait(sn_core *core, uint32_t *addr, uint32_t expected, double deadline);
/* Wake up to ``n`` waiters; returns how many were woken. Never blocks. */
int sn_futex_wake(uint32_t *addr, int n);

/* -- per-structure registration (each file adds its types to the module) ---------------- */
int sn_register_counter(PyObject *module);
int sn_register_sharded(PyObject *module);
int sn_register_array(PyObject *module);
int sn_register_lock(PyObject *module);
int sn_register_queue(PyObject *module);

/* Add a type made from ``spec`` to ``module`` under its short name; 0 or -1. */
int sn_add_type(PyObject *module, PyType_Spec *spec, PyObject **out);

#endif
