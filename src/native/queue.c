/* safeshm._native: queue (see safeshm.h).
 *
 * SafeQueue's ring operations -- put, put_nowait, put_many, get, get_nowait, get_many --
 * on exactly the layout (3) and the protocol of src/safeshm/_queue.py, so that processes
 * of both kinds share one queue at the same time:
 *
 *  - the state line (head, tail, puts, gets, shutdown) changes only under the robust
 *    mutex; an item becomes visible with ONE store to tail (taken: one store to head),
 *    the totals are updated after it (a dead holder's successor recounts: repair());
 *  - records are an 8-byte header (length | (length ^ MARK_KEY) << 32) and the payload,
 *    padded to 8 bytes; the header never wraps, the payload may;
 *  - waiting: a waiter sets its direction's sleepers token (the sequence word it saw,
 *    plus one), releases the mutex and sleeps on the sequence word (one slice at most,
 *    then retakes the mutex and re-checks, as _queue.SafeQueue._sleep does); a waker bumps
 *    the sequence word under the mutex, notes the token, and FUTEX_WAKEs after releasing
 *    the mutex if the token was set. A wake that finds nobody asleep lowers the token
 *    unless a new sleeper set a new one: the ctypes code compares and stores under the
 *    mutex, this one with one compare-and-swap (sleepers store their token under the
 *    mutex with a single store, and a new token always differs from the one the waker
 *    noted -- it is a later sequence value plus one -- so both ways lower exactly the
 *    same tokens);
 *  - a consumer that finds the ring empty watches tail for a few microseconds before it
 *    sleeps (only when another CPU may run the producer); producers never spin;
 *  - non-blocking calls wait at most NOWAIT_GRACE for the mutex (then Full/Empty);
 *  - task tracking (layout 3): a get adds the items it takes to this process's consumer
 *    record count and to the held word, in the critical section that moves head. The
 *    record is claimed by the Python side (_queue.SafeQueue._claim, called through a weak
 *    reference before the mutex is taken, with the get's deadline); its index is cached per core and forgotten in
 *    a forked child (a pthread_atfork generation). repair() recomputes held from the
 *    records and lowers the credit as _queue._rederive_tasks does. Reaping dead
 *    consumers, task_done and join are Python's (not hot).
 *
 * Pickling stays Python's (pickle.dumps/loads, called from here, outside the mutex).
 * Every critical section is C only: no Python code runs while the mutex is held (the
 * one allocation under it, a bytes object for get's item, is not GC-tracked, so it
 * cannot run a collection and with it a finaliser); exceptions are built after the
 * unlock.
 */
#include "safeshm.h"

#include <errno.h>
#include <linux/futex.h>
#include <math.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* -- layout (see _queue.py) ---------------------------------------------------------- */
#define STATE_OFFSET 128
#define FUTEX_OFFSET 192
#define MUTEX_OFFSET 256
#define RING_OFFSET (MUTEX_OFFSET + SN_MUTEX_BLOCK)
enum { HEAD, TAIL, PUTS, GETS, SHUT, HELD, CREDIT };
enum { NE_SEQ, NE_SLEEP, NF_SEQ, NF_SLEEP, JOIN_SEQ, JOIN_SLEEP };
enum { R_PID, R_START, R_NS, R_COUNT, REC_WORDS };
#define MARK_KEY 0x51ED51EDu
#define LEN_MASK 0xFFFFFFFFu
#define SEQ_MASK 0x7FFFFFFFu
#define NOWAIT_GRACE 0.1
#define SHUTDOWN_NOW 2
#define SPIN_SECONDS 12e-6 /* about what _queue._SPINS (300 checks of ~40 ns) watches */

/* How long one sleep lasts at most before the waiter retakes the mutex and re-checks
 * (_queue._WAIT_SLICE). Tests lengthen it (queue_wait_slice()) so that a wake-up they
 * measure cannot be the end of a slice. */
static double wait_slice = SN_WAIT_SLICE;

static PyObject *pickle_dumps, *pickle_loads, *pickle_protocol;

/* Bumped in every forked child: a core's cached record index is this process's only if
 * it was found in the same generation. */
static long fork_generation;
static void after_fork_in_child(void) { fork_generation++; }

typedef struct {
    sn_core head;
    int64_t *state;
    uint32_t *fw;
    pthread_mutex_t *mutex;
    unsigned char *ring;
    int64_t cap;
    int64_t maxsize;
    int raw;
    PyObject *name;       /* the segment's name, for messages */
    PyObject *encode_raw; /* _queue._encode_raw: a raw item that is not exactly bytes */
    int64_t *recs;        /* the consumer records (layout 3) */
    int64_t nrec;
    PyObject *claim;      /* weakref.WeakMethod of the handle's _claim */
    long rec_generation;  /* fork_generation when rec_count was found; -1: never */
    int64_t rec_count;    /* word index (in recs) of this process's count */
} Queue;

/* -- small helpers --------------------------------------------------------------------- */
static inline int64_t ld(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint32_t ld32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Python's ``counter % cap`` (a floor modulo: never negative, whatever damage says). */
static inline int64_t pos_of(int64_t counter, int64_t cap) {
    int64_t r = counter % cap;
    return r < 0 ? r + cap : r;
}

/* Whether 0 <= tail - head <= cap (no overflow, whatever damage says). */
static inline int span_ok(int64_t head, int64_t tail, int64_t cap) {
    int64_t used;
    if (__builtin_sub_overflow(tail, head, &used)) return 0;
    return used >= 0 && used <= cap;
}

/* a + b wrapping (damaged words must not make C's signed overflow undefined) */
static inline int64_t add64(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

static inline int64_t record_bytes(uint64_t n) { return (int64_t)((n + 15) & ~(uint64_t)7); }

static inline uint64_t header_word(uint64_t n) { return n | ((n ^ MARK_KEY) << 32); }

static inline uint64_t ring_word(Queue *q, int64_t at) {
    uint64_t w;
    memcpy(&w, q->ring + (pos_of(at, q->cap) & ~(int64_t)7), 8);
    return w;
}

static inline int wrapping_count_over(Queue *q, int64_t k) {
    /* maxsize and puts - gets + k > maxsize (as Python's ints, for any sane counts) */
    if (!q->maxsize) return 0;
    uint64_t items = (uint64_t)ld(&q->state[PUTS]) - (uint64_t)ld(&q->state[GETS]);
    return (int64_t)(items + (uint64_t)k) > q->maxsize;
}

/* Copy ``n`` bytes out of the ring from position ``pos`` (wrapping), or into it. */
static void ring_read(Queue *q, int64_t pos, char *out, int64_t n) {
    int64_t first = q->cap - pos < n ? q->cap - pos : n;
    memcpy(out, q->ring + pos, (size_t)first);
    if (first < n) memcpy(out + first, q->ring, (size_t)(n - first));
}

static void ring_write(Queue *q, int64_t pos, const char *in, int64_t n) {
    int64_t first = q->cap - pos < n ? q->cap - pos : n;
    memcpy(q->ring + pos, in, (size_t)first);
    if (first < n) memcpy(q->ring, in + first, (size_t)(n - first));
}

/* -- errors (built after the unlock) -------------------------------------------------- */
static PyObject *damaged(Queue *q, int64_t at, int64_t head, int64_t tail) {
    PyErr_Format(sn_SegmentCorruptedError,
                 "SafeQueue %R is damaged: no valid record at byte %lld of the ring (read "
                 "position %lld, write position %lld, capacity %lld); nothing was taken or put",
                 q->name, (long long)at, (long long)head, (long long)tail, (long long)q->cap);
    return NULL;
}

static PyObject *too_big(Queue *q, Py_ssize_t n) {
    PyErr_Format(PyExc_ValueError,
                 "SafeQueue %R: an item of %zd bytes%s can never fit a %lld-byte ring (the "
                 "largest is %lld bytes); nothing was put",
                 q->name, n, q->raw ? "" : " (pickled)", (long long)q->cap,
                 (long long)(q->cap - 8));
    return NULL;
}

static PyObject *shut_down(Queue *q, int empty) {
    PyErr_Format(sn_QueueShutDown, empty ? "SafeQueue %R is shut down and empty"
                                         : "SafeQueue %R is shut down",
                 q->name);
    return NULL;
}

/* -- the futex words ------------------------------------------------------------------ */
static void wake(Queue *q, int which, int64_t n, uint32_t token) {
    int count = n > 0x7FFFFFFF ? 0x7FFFFFFF : (int)n;
    long rc = syscall(SYS_futex, &q->fw[which], FUTEX_WAKE, count, NULL, NULL, 0);
    if (rc == 0) {
        /* Nobody was asleep: lower the token unless a new sleeper set a new one. */
        uint32_t expected = token;
        __atomic_compare_exchange_n(&q->fw[which + 1], &expected, 0, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST);
    }
}

static void bump(Queue *q, int which) {
    st32(&q->fw[which], (ld32(&q->fw[which]) + 1) & SEQ_MASK);
}

typedef struct {
    int wait;        /* 0: a non-blocking call */
    double deadline; /* with wait: monotonic, SN_FOREVER for none */
} Wait;

/* -- the mutex ------------------------------------------------------------------------ */
enum { LOCK_HELD = 0, LOCK_FAILED = -1 };

/* After a holder died: recount the items (the totals may be one commit behind head and
 * tail) and wake every sleeper (_queue.SafeQueue._repair). Called holding the mutex; on
 * damage returns -1 with *bad_at set, still holding it. */
static int repair(Queue *q, int64_t *bad_at) {
    int64_t head = ld(&q->state[HEAD]), tail = ld(&q->state[TAIL]);
    int64_t count = 0, at = head;
    if ((head & 7) || !span_ok(head, tail, q->cap)) {
        *bad_at = head;
        return -1;
    }
    while (at != tail) {
        uint64_t word = ring_word(q, at);
        uint64_t n = word & LEN_MASK;
        if (((word >> 32) ^ n) != MARK_KEY || record_bytes(n) > tail - at) {
            *bad_at = at;
            return -1;
        }
        at += record_bytes(n);
        count++;
    }
    st(&q->state[GETS], (int64_t)((uint64_t)ld(&q->state[PUTS]) - (uint64_t)count));
    /* _queue._rederive_tasks */
    int64_t held = 0;
    for (int64_t k = 0; k < q->nrec; k++) {
        int64_t *r = q->recs + k * REC_WORDS;
        if (ld(&r[R_PID])) held = add64(held, ld(&r[R_COUNT]));
    }
    st(&q->state[HELD], held);
    int64_t base = add64((int64_t)((uint64_t)ld(&q->state[PUTS]) - (uint64_t)ld(&q->state[GETS])),
                         held);
    if (ld(&q->state[CREDIT]) > base) st(&q->state[CREDIT], base > 0 ? base : 0);
    bump(q, JOIN_SEQ);
    syscall(SYS_futex, &q->fw[JOIN_SEQ], FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0);
    bump(q, NE_SEQ);
    syscall(SYS_futex, &q->fw[NE_SEQ], FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0);
    bump(q, NF_SEQ);
    syscall(SYS_futex, &q->fw[NF_SEQ], FUTEX_WAKE, 0x7FFFFFFF, NULL, NULL, 0);
    return 0;
}

/* Take the mutex by ``deadline`` (see sn_mutex_acquire), repairing after a dead holder.
 * LOCK_HELD, or LOCK_FAILED with an exception and the mutex not held (``timed_out`` is
 * raised when the deadline passed). */
static int lock(Queue *q, double deadline, PyObject *timed_out) {
    int rc = sn_mutex_acquire(&q->head, q->mutex, deadline);
    if (rc == SN_OK) return LOCK_HELD;
    if (rc == SN_TIMED_OUT) {
        PyErr_SetNone(timed_out);
        return LOCK_FAILED;
    }
    if (rc == SN_RECOVERED) {
        int64_t bad_at;
        if (repair(q, &bad_at) == 0) return LOCK_HELD;
        int64_t head = ld(&q->state[HEAD]), tail = ld(&q->state[TAIL]);
        sn_mutex_release(q->mutex);
        damaged(q, bad_at, head, tail);
    }
    return LOCK_FAILED;
}

/* Take the mutex for a call whose wait is ``w``: the uncontended case inline, anything
 * else through lock() (LOCK_HELD or LOCK_FAILED, as lock()). */
static int lock_for(Queue *q, const Wait *w, PyObject *timed_out) {
    int rc = pthread_mutex_trylock(q->mutex);
    if (rc == 0) return LOCK_HELD;
    if (rc == EOWNERDEAD) {
        /* Held, from a dead holder: the one recovery sequence (count, then mark it
         * consistent; EINVAL: another thread's interrupted acquire already did), then
         * repair what it may have left. */
        int64_t *recoveries = (int64_t *)((char *)q->mutex + SN_RECOVERIES_OFFSET);
        *recoveries += 1;
        int c = pthread_mutex_consistent(q->mutex);
        if (c != 0 && c != EINVAL) {
            sn_mutex_release(q->mutex);
            errno = c;
            PyErr_SetFromErrno(PyExc_OSError);
            return LOCK_FAILED;
        }
        int64_t bad_at;
        if (repair(q, &bad_at) == 0) return LOCK_HELD;
        int64_t head = ld(&q->state[HEAD]), tail = ld(&q->state[TAIL]);
        sn_mutex_release(q->mutex);
        damaged(q, bad_at, head, tail);
        return LOCK_FAILED;
    }
    /* EBUSY, EDEADLK (LockReentryError), damage: sn_mutex_acquire says which */
    return lock(q, w->wait ? w->deadline : sn_monotonic() + NOWAIT_GRACE, timed_out);
}

/* -- waiting -------------------------------------------------------------------------- */
enum { SLEPT = 1, PASSED = 0, WAIT_FAILED = -1 };

static struct timespec relative(double seconds) {
    struct timespec ts;
    double whole = floor(seconds);
    ts.tv_sec = (time_t)whole;
    ts.tv_nsec = (long)((seconds - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) ts.tv_nsec = 999999999L;
    return ts;
}

/* Sleep on sequence word ``which`` until woken, one slice, or ``deadline`` (as
 * _queue.SafeQueue._sleep). Called holding the mutex. SLEPT: slept and retook the mutex
 * (the caller re-checks); PASSED: the deadline had passed, nothing done (still held);
 * WAIT_FAILED: an exception, the mutex not held. */
static int sleep_on(Queue *q, int which, double deadline, PyObject *timed_out) {
    double left = wait_slice;
    if (!isinf(deadline)) {
        left = deadline - sn_monotonic();
        if (left <= 0) return PASSED;
        if (left > wait_slice) left = wait_slice;
    }
    uint32_t seen = ld32(&q->fw[which]);
    if (seen > SEQ_MASK) {
        sn_mutex_release(q->mutex);
        PyErr_Format(sn_SegmentCorruptedError,
                     "SafeQueue %R is damaged: a wake-up sequence word holds 0x%x, above 0x%x",
                     q->name, (unsigned)seen, (unsigned)SEQ_MASK);
        return WAIT_FAILED;
    }
    st32(&q->fw[which + 1], seen + 1); /* the sleepers token: never 0 */
    sn_mutex_release(q->mutex);
    struct timespec ts = relative(left);
    Py_BEGIN_ALLOW_THREADS
    /* shared (not FUTEX_PRIVATE): keyed by file and offset, across processes */
    syscall(SYS_futex, &q->fw[which], FUTEX_WAIT, seen, &ts, NULL, 0);
    Py_END_ALLOW_THREADS
    if (PyErr_CheckSignals() < 0 || sn_check_open(&q->head) < 0) return WAIT_FAILED;
    return lock(q, deadline, timed_out) == LOCK_HELD ? SLEPT : WAIT_FAILED;
}

/* Watch tail without the mutex for a few microseconds (_queue.SafeQueue._spin), with the
 * GIL released (another thread of this process may be the producer). Called holding the
 * mutex; returns LOCK_HELD (retaken) or LOCK_FAILED (exception, not held). */
static int spin(Queue *q, int64_t seen, double deadline) {
    sn_mutex_release(q->mutex);
    Py_BEGIN_ALLOW_THREADS
    double until = sn_monotonic() + SPIN_SECONDS;
    for (int i = 1;; i++) {
        if (ld(&q->state[TAIL]) != seen || ld(&q->state[SHUT])) break;
        cpu_relax();
        if ((i & 63) == 0 && sn_monotonic() > until) break;
    }
    Py_END_ALLOW_THREADS
    return lock(q, deadline, sn_Empty);
}

/* Outcomes of a critical section, turned into exceptions after the unlock. */
enum { GO = 0, RAISE_FULL, RAISE_EMPTY, RAISE_SHUT, RAISE_DAMAGED, RAISED };

/* With the mutex held: wait until ``need`` bytes and ``k`` items fit (_wait_for_room).
 * GO (held, *tail_out set), RAISED (exception set, not held), or another outcome (held).
 * ``wait``: 0 for a non-blocking call. */
static int wait_for_room(Queue *q, int64_t need, int64_t k, int wait, double deadline,
                         int64_t *tail_out, int64_t *bad_at) {
    for (;;) {
        if (ld(&q->state[SHUT])) return RAISE_SHUT;
        int64_t head = ld(&q->state[HEAD]), tail = ld(&q->state[TAIL]);
        if ((tail & 7) || !span_ok(head, tail, q->cap)) {
            *bad_at = head;
            return RAISE_DAMAGED;
        }
        if (q->cap - (tail - head) >= need && !wrapping_count_over(q, k)) {
            *tail_out = tail;
            return GO;
        }
        if (!wait) return RAISE_FULL;
        int r = sleep_on(q, NF_SEQ, deadline, sn_Full);
        if (r == PASSED) return RAISE_FULL;
        if (r == WAIT_FAILED) return RAISED;
    }
}

/* With the mutex held: wait until the ring holds an item (_wait_for_item). GO (held,
 * *head_out set), RAISED (not held), or another outcome (held). */
static int wait_for_item(Queue *q, int wait, double deadline, int64_t *head_out) {
    int spun = 0;
    for (;;) {
        int64_t head = ld(&q->state[HEAD]), tail = ld(&q->state[TAIL]);
        if (head != tail) {
            *head_out = head;
            return GO;
        }
        if (ld(&q->state[SHUT])) return RAISE_SHUT;
        if (!wait) return RAISE_EMPTY;
        if (!spun && sn_spinning_helps()) {
            spun = 1;
            if (spin(q, tail, deadline) != LOCK_HELD) return RAISED;
            continue;
        }
        int r = sleep_on(q, NE_SEQ, deadline, sn_Empty);
        if (r == PASSED) return RAISE_EMPTY;
        if (r == WAIT_FAILED) return RAISED;
    }
}

/* Turn an outcome into its exception; returns NULL. The mutex is not held. */
static PyObject *raise_outcome(Queue *q, int outcome, int getting, int64_t bad_at, int64_t head,
                               int64_t tail) {
    switch (outcome) {
    case RAISE_FULL:
        PyErr_SetNone(sn_Full);
        return NULL;
    case RAISE_EMPTY:
        PyErr_SetNone(sn_Empty);
        return NULL;
    case RAISE_SHUT:
        return shut_down(q, getting);
    case RAISE_DAMAGED:
        return damaged(q, bad_at, head, tail);
    default:
        return NULL; /* RAISED: already set */
    }
}

/* -- arguments ------------------------------------------------------------------------ */

/* ``deadline = _NEVER if timeout is None and block else _deadline(block, timeout)``:
 * the timeout is checked even when block is false. */
static int parse_wait(PyObject *block, PyObject *timeout, Wait *w) {
    double seconds = SN_FOREVER;
    if (timeout != NULL && timeout != Py_None && sn_timeout(timeout, &seconds) < 0) return -1;
    int b = block == NULL ? 1 : PyObject_IsTrue(block);
    if (b < 0) return -1;
    w->wait = b;
    w->deadline = b ? sn_deadline(seconds) : 0;
    return 0;
}


/* An item's bytes: pickled, or (raw) the bytes themselves / a C-contiguous buffer. */
typedef struct {
    PyObject *obj;
    Py_buffer view;
    int has_view;
    const char *buf;
    Py_ssize_t len;
} Encoded;

static int encode(Queue *q, PyObject *item, Encoded *e) {
    e->has_view = 0;
    if (!q->raw) {
        e->obj = PyObject_CallFunctionObjArgs(pickle_dumps, item, pickle_protocol, NULL);
        if (e->obj == NULL) return -1;
    } else if (PyBytes_CheckExact(item)) {
        Py_INCREF(item);
        e->obj = item;
    } else {
        e->obj = PyObject_CallFunctionObjArgs(q->encode_raw, item, NULL);
        if (e->obj == NULL) return -1;
    }
    if (PyBytes_CheckExact(e->obj)) {
        char *buf;
        if (PyBytes_AsStringAndSize(e->obj, &buf, &e->len) < 0) goto fail;
        e->buf = buf;
        return 0;
    }
    if (PyObject_GetBuffer(e->obj, &e->view, PyBUF_SIMPLE) < 0) goto fail;
    e->has_view = 1;
    e->buf = e->view.buf;
    e->len = e->view.len;
    return 0;
fail:
    Py_CLEAR(e->obj);
    return -1;
}

static void encoded_release(Encoded *e) {
    if (e->has_view) PyBuffer_Release(&e->view);
    e->has_view = 0;
    Py_CLEAR(e->obj);
}

/* -- put ------------------------------------------------------------------------------ */
static PyObject *do_put(Queue *q, PyObject *item, PyObject *block, PyObject *timeout) {
    if (sn_check_open(&q->head) < 0) return NULL;
    Encoded e;
    if (encode(q, item, &e) < 0) return NULL;
    Wait w;
    if (parse_wait(block, timeout, &w) < 0) {
        encoded_release(&e);
        return NULL;
    }
    Py_ssize_t n = e.len;
    int64_t need = record_bytes((uint64_t)n);
    if (need > q->cap || (uint64_t)n > LEN_MASK) {
        encoded_release(&e);
        return too_big(q, n);
    }
    if (lock_for(q, &w, sn_Full) != LOCK_HELD) {
        encoded_release(&e);
        return NULL;
    }
    int64_t *state = q->state;
    int64_t head = ld(&state[HEAD]), tail = ld(&state[TAIL]);
    int outcome = GO;
    int64_t bad_at = 0;
    if (!span_ok(head, tail, q->cap) || q->cap - (tail - head) < need || (tail & 7) || ld(&state[SHUT]) ||
        wrapping_count_over(q, 1))
        outcome = wait_for_room(q, need, 1, w.wait, w.deadline, &tail, &bad_at);
    uint32_t sleepers = 0;
    if (outcome == GO) {
        int64_t pos = pos_of(tail, q->cap);
        uint64_t header = header_word((uint64_t)n);
        memcpy(q->ring + pos, &header, 8);
        int64_t start = pos + 8;
        if (start == q->cap) start = 0;
        ring_write(q, start, e.buf, n);
        st(&state[TAIL], add64(tail, need)); /* the commit */
        st(&state[PUTS], add64(ld(&state[PUTS]), 1));
        bump(q, NE_SEQ);
        sleepers = ld32(&q->fw[NE_SLEEP]);
    }
    if (outcome != RAISED) {
        head = ld(&state[HEAD]);
        tail = ld(&state[TAIL]);
        sn_mutex_release(q->mutex);
    }
    encoded_release(&e);
    if (outcome != GO) return raise_outcome(q, outcome, 0, bad_at, head, tail);
    if (sleepers) wake(q, NE_SEQ, 1, sleepers);
    Py_RETURN_NONE;
}

static const char *const put_names[] = {"item", "block", "timeout", NULL};
static const char *const put_nowait_names[] = {"item", NULL};
static const char *const put_many_names[] = {"items", "block", "timeout", NULL};
static const char *const get_names[] = {"block", "timeout", NULL};
static const char *const get_many_names[] = {"max_items", "block", "timeout", NULL};

static PyObject *Queue_put(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    PyObject *a[3];
    if (kwnames == NULL && nargs == 1) return do_put((Queue *)self, args[0], NULL, NULL);
    if (sn_parse("SafeQueue.put", args, nargs, kwnames, put_names, 1, 3, a) < 0) return NULL;
    return do_put((Queue *)self, a[0], a[1], a[2]);
}

static PyObject *Queue_put_nowait(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    PyObject *a[1];
    if (sn_parse("SafeQueue.put_nowait", args, nargs, kwnames, put_nowait_names, 1, 1, a) < 0)
        return NULL;
    return do_put((Queue *)self, a[0], Py_False, NULL);
}

/* A growable byte buffer: put_many lays its whole batch out here before locking. */
typedef struct {
    char *buf;
    int64_t len, size;
} Blob;

static int blob_reserve(Blob *b, int64_t more) {
    if (b->len + more <= b->size) return 0;
    int64_t size = b->size ? b->size : 256;
    while (size < b->len + more) {
        if (size > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        size *= 2;
    }
    char *buf = PyMem_Realloc(b->buf, (size_t)size);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->buf = buf;
    b->size = size;
    return 0;
}

static PyObject *do_put_many(Queue *q, PyObject *items, PyObject *block, PyObject *timeout) {
    if (sn_check_open(&q->head) < 0) return NULL;
    Blob blob = {NULL, 0, 0};
    int64_t k = 0;
    PyObject *it = PyObject_GetIter(items);
    if (it == NULL) return NULL;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        Encoded e;
        int bad = encode(q, item, &e);
        Py_DECREF(item);
        if (bad < 0) goto fail;
        uint64_t n = (uint64_t)e.len;
        if (n > LEN_MASK) { /* can never fit: the size check below says so */
            n = LEN_MASK;
        }
        int64_t rec = record_bytes(n);
        if (blob_reserve(&blob, rec) < 0) {
            encoded_release(&e);
            goto fail;
        }
        uint64_t header = header_word(n);
        memcpy(blob.buf + blob.len, &header, 8);
        memcpy(blob.buf + blob.len + 8, e.buf, (size_t)n);
        memset(blob.buf + blob.len + 8 + n, 0, (size_t)(rec - 8 - (int64_t)n));
        blob.len += rec;
        k++;
        encoded_release(&e);
    }
    if (PyErr_Occurred()) goto fail;
    Py_CLEAR(it);
    /* the iteration ran Python code, which may have closed this handle */
    if (k && sn_check_open(&q->head) < 0) goto fail;
    if (!k) {
        PyMem_Free(blob.buf);
        Py_RETURN_NONE;
    }
    Wait w;
    if (parse_wait(block, timeout, &w) < 0) goto fail;
    int64_t total = blob.len;
    if (total > q->cap) {
        PyErr_Format(PyExc_ValueError,
                     "SafeQueue %R: a batch of %lld items needs %lld bytes, which can never "
                     "fit the %lld-byte ring; nothing was put",
                     q->name, (long long)k, (long long)total, (long long)q->cap);
        goto fail;
    }
    if (q->maxsize && k > q->maxsize) {
        PyErr_Format(PyExc_ValueError,
                     "SafeQueue %R: a batch of %lld items exceeds maxsize %lld; nothing was put",
                     q->name, (long long)k, (long long)q->maxsize);
        goto fail;
    }
    if (lock_for(q, &w, sn_Full) != LOCK_HELD) goto fail;
    int64_t *state = q->state;
    int64_t head = ld(&state[HEAD]), tail = ld(&state[TAIL]);
    int outcome = GO;
    int64_t bad_at = 0;
    if (!span_ok(head, tail, q->cap) || q->cap - (tail - head) < total || (tail & 7) ||
        ld(&state[SHUT]) || wrapping_count_over(q, k))
        outcome = wait_for_room(q, total, k, w.wait, w.deadline, &tail, &bad_at);
    uint32_t sleepers = 0;
    if (outcome == GO) {
        /* records are 8-aligned and so is the split: no header is cut in two */
        ring_write(q, pos_of(tail, q->cap), blob.buf, total);
        st(&state[TAIL], add64(tail, total)); /* the commit */
        st(&state[PUTS], add64(ld(&state[PUTS]), k));
        bump(q, NE_SEQ);
        sleepers = ld32(&q->fw[NE_SLEEP]);
    }
    if (outcome != RAISED) {
        head = ld(&state[HEAD]);
        tail = ld(&state[TAIL]);
        sn_mutex_release(q->mutex);
    }
    PyMem_Free(blob.buf);
    if (outcome != GO) return raise_outcome(q, outcome, 0, bad_at, head, tail);
    if (sleepers) wake(q, NE_SEQ, k, sleepers);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(it);
    PyMem_Free(blob.buf);
    return NULL;
}

static PyObject *Queue_put_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    PyObject *a[3];
    if (sn_parse("SafeQueue.put_many", args, nargs, kwnames, put_many_names, 1, 3, a) < 0)
        return NULL;
    return do_put_many((Queue *)self, a[0], a[1], a[2]);
}

/* -- get ------------------------------------------------------------------------------ */
/* ItemDecodeError for what did not unpickle, raised from ``first`` (the first failure);
 * built by _queue._undecodable_error, the one place its message is written. */
static PyObject *undecodable(Queue *q, PyObject *items, PyObject *failed, PyObject *first,
                             PyObject *failed_at) {
    PyObject *mod = PyImport_ImportModule("safeshm._queue");
    if (mod == NULL) return NULL;
    PyObject *exc = PyObject_CallMethod(mod, "_undecodable_error", "OOOOO", q->name, items,
                                        failed, first, failed_at);
    Py_DECREF(mod);
    if (exc == NULL) return NULL;
    Py_INCREF(first);
    PyException_SetCause(exc, first); /* steals */
    Py_INCREF(first);
    PyException_SetContext(exc, first); /* steals */
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

/* The exception now set, normalised, as a new reference (and cleared); NULL if it is not
 * an Exception (KeyboardInterrupt, SystemExit...: the caller lets it propagate). */
static PyObject *fetch_exception(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

static PyObject *loads(PyObject *data) {
    return PyObject_CallFunctionObjArgs(pickle_loads, data, NULL);
}

/* This process's count word in the consumer records (claimed through the handle's
 * _claim when not cached); -1 with an exception. Called without the mutex. */
static int64_t my_count(Queue *q, const Wait *w) {
    if (q->rec_generation == fork_generation) return q->rec_count;
    PyObject *method = PyObject_CallNoArgs(q->claim);
    if (method == NULL) return -1;
    if (method == Py_None) {
        Py_DECREF(method);
        PyErr_SetObject(sn_SegmentClosedError, q->head.closed_msg); /* handle is gone */
        return -1;
    }
    PyObject *d = PyFloat_FromDouble(w->wait ? w->deadline : -1.0);
    if (d == NULL) {
        Py_DECREF(method);
        return -1;
    }
    PyObject *r = PyObject_CallFunctionObjArgs(method, d, NULL);
    Py_DECREF(d);
    Py_DECREF(method);
    if (r == NULL) return -1;
    long long index = PyLong_AsLongLong(r);
    Py_DECREF(r);
    if (index == -1 && PyErr_Occurred()) return -1;
    if (index < 0 || index >= q->nrec * REC_WORDS || index % REC_WORDS != R_COUNT) {
        PyErr_SetString(PyExc_SystemError, "SafeQueue: bad consumer record index");
        return -1;
    }
    q->rec_count = index;
    q->rec_generation = fork_generation;
    return index;
}

static PyObject *do_get(Queue *q, PyObject *block, PyObject *timeout) {
    if (sn_check_open(&q->head) < 0) return NULL;
    Wait w;
    if (parse_wait(block, timeout, &w) < 0) return NULL;
    int64_t ci = my_count(q, &w);
    if (ci < 0) return NULL;
    if (lock_for(q, &w, sn_Empty) != LOCK_HELD) return NULL;
    int64_t *state = q->state;
    int64_t head = ld(&state[HEAD]), tail = ld(&state[TAIL]);
    int outcome = GO;
    int64_t bad_at = 0;
    PyObject *data = NULL;
    uint32_t sleepers = 0;
    if (head == tail) {
        outcome = wait_for_item(q, w.wait, w.deadline, &head);
        tail = ld(&state[TAIL]);
    }
    if (outcome == GO) {
        int64_t pos = pos_of(head, q->cap);
        uint64_t word = ring_word(q, head);
        uint64_t n = word & LEN_MASK;
        int64_t need = record_bytes(n);
        if (((word >> 32) ^ n) != MARK_KEY || (head & 7) || !span_ok(head, tail, q->cap) ||
            need > tail - head) {
            outcome = RAISE_DAMAGED;
            bad_at = head;
        } else {
            /* A bytes object is not GC-tracked: allocating it runs no Python code. */
            data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
            if (data == NULL) {
                outcome = RAISED + 1; /* MemoryError set; unlock below */
            } else {
                int64_t start = pos + 8;
                if (start == q->cap) start = 0;
                ring_read(q, start, PyBytes_AsString(data), (int64_t)n);
                st(&state[HEAD], add64(head, need)); /* the commit: the item is taken */
                st(&q->recs[ci], add64(ld(&q->recs[ci]), 1)); /* one more unfinished task */
                st(&state[HELD], add64(ld(&state[HELD]), 1));
                st(&state[GETS], add64(ld(&state[GETS]), 1));
                bump(q, NF_SEQ);
                sleepers = ld32(&q->fw[NF_SLEEP]);
            }
        }
    }
    if (outcome != RAISED) {
        head = ld(&state[HEAD]);
        tail = ld(&state[TAIL]);
        sn_mutex_release(q->mutex);
    }
    if (outcome == RAISED + 1) return NULL;
    if (outcome != GO) return raise_outcome(q, outcome, 1, bad_at, head, tail);
    if (sleepers) wake(q, NF_SEQ, 1, sleepers);
    if (q->raw) return data;
    PyObject *item = loads(data);
    if (item != NULL) {
        Py_DECREF(data);
        return item;
    }
    PyObject *first = fetch_exception();
    if (first == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *items = PyList_New(0), *failed = PyList_New(1), *failed_at = NULL;
    if (items != NULL && failed != NULL) {
        PyList_SetItem(failed, 0, data); /* steals */
        data = NULL;
        failed_at = Py_BuildValue("[i]", 0);
        if (failed_at != NULL) undecodable(q, items, failed, first, failed_at);
    }
    Py_XDECREF(data);
    Py_XDECREF(items);
    Py_XDECREF(failed);
    Py_XDECREF(failed_at);
    Py_DECREF(first);
    return NULL;
}

static PyObject *Queue_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    PyObject *a[2];
    if (kwnames == NULL && nargs == 0) return do_get((Queue *)self, NULL, NULL);
    if (sn_parse("SafeQueue.get", args, nargs, kwnames, get_names, 0, 2, a) < 0) return NULL;
    return do_get((Queue *)self, a[0], a[1]);
}

static PyObject *Queue_get_nowait(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    static const char *const none[] = {NULL};
    PyObject *a[1];
    if ((nargs || kwnames) && sn_parse("SafeQueue.get_nowait", args, nargs, kwnames, none, 0, 0,
                                       a) < 0)
        return NULL;
    return do_get((Queue *)self, Py_False, NULL);
}

/* Where the first ``max_items`` records from ``head`` end and how many there are
 * (_queue._span_end); -1 and *end at the bad position on damage. */
static int64_t span_end(Queue *q, int64_t head, int64_t tail, long long max_items,
                        int64_t *end_out) {
    int64_t end = head, taken = 0;
    if ((head & 7) || !span_ok(head, tail, q->cap)) {
        *end_out = head;
        return -1;
    }
    while (end != tail && taken < max_items) {
        uint64_t word = ring_word(q, end);
        uint64_t n = word & LEN_MASK;
        if (((word >> 32) ^ n) != MARK_KEY || record_bytes(n) > tail - end) {
            *end_out = end;
            return -1;
        }
        end += record_bytes(n);
        taken++;
    }
    *end_out = end;
    return taken;
}

/* The ``taken`` items of a span get_many copied out (SafeQueue._decode). */
static PyObject *decode(Queue *q, const char *span, int64_t taken) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    PyObject *failed = NULL, *failed_at = NULL, *first = NULL;
    int64_t at = 0;
    for (int64_t k = 0; k < taken; k++) {
        uint64_t word;
        memcpy(&word, span + at, 8);
        uint64_t n = word & LEN_MASK;
        PyObject *payload = PyBytes_FromStringAndSize(span + at + 8, (Py_ssize_t)n);
        at += record_bytes(n);
        if (payload == NULL) goto fail;
        if (q->raw) {
            int r = PyList_Append(out, payload);
            Py_DECREF(payload);
            if (r < 0) goto fail;
            continue;
        }
        PyObject *item = loads(payload);
        if (item != NULL) {
            Py_DECREF(payload);
            int r = PyList_Append(out, item);
            Py_DECREF(item);
            if (r < 0) goto fail;
            continue;
        }
        PyObject *e = fetch_exception();
        if (e == NULL) {
            Py_DECREF(payload);
            goto fail;
        }
        if (failed == NULL) {
            failed = PyList_New(0);
            failed_at = PyList_New(0);
        }
        PyObject *index = PyLong_FromLongLong(k);
        int bad = failed == NULL || failed_at == NULL || index == NULL ||
                  PyList_Append(failed, payload) < 0 || PyList_Append(failed_at, index) < 0;
        Py_DECREF(payload);
        Py_XDECREF(index);
        if (first == NULL)
            first = e;
        else
            Py_DECREF(e);
        if (bad) goto fail;
    }
    if (first != NULL) {
        undecodable(q, out, failed, first, failed_at);
        goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    Py_XDECREF(failed);
    Py_XDECREF(failed_at);
    Py_XDECREF(first);
    return NULL;
}

static PyObject *do_get_many(Queue *q, PyObject *max_obj, PyObject *block, PyObject *timeout) {
    if (sn_check_open(&q->head) < 0) return NULL;
    if (PyBool_Check(max_obj) || !PyLong_Check(max_obj)) {
        PyObject *tname = PyType_GetName(Py_TYPE(max_obj));
        if (tname == NULL) return NULL;
        PyErr_Format(PyExc_TypeError, "max_items must be an int, not %U", tname);
        Py_DECREF(tname);
        return NULL;
    }
    int overflow = 0;
    long long max_items = PyLong_AsLongLongAndOverflow(max_obj, &overflow);
    if (max_items == -1 && PyErr_Occurred()) return NULL;
    if (overflow > 0) max_items = INT64_MAX;
    if (overflow < 0 || max_items < 1) {
        PyErr_Format(PyExc_ValueError, "max_items must be at least 1, got %S", max_obj);
        return NULL;
    }
    Wait w;
    if (parse_wait(block, timeout, &w) < 0) return NULL;
    int64_t ci = my_count(q, &w);
    if (ci < 0) return NULL;
    if (lock_for(q, &w, sn_Empty) != LOCK_HELD) return NULL;
    int64_t *state = q->state;
    int64_t head = ld(&state[HEAD]), tail = ld(&state[TAIL]);
    int outcome = GO;
    int64_t bad_at = 0, taken = 0;
    char *span = NULL;
    uint32_t sleepers = 0;
    if (head == tail) {
        outcome = wait_for_item(q, w.wait, w.deadline, &head);
        tail = ld(&state[TAIL]);
    }
    if (outcome == GO) {
        int64_t end;
        taken = span_end(q, head, tail, max_items, &end);
        if (taken < 0) {
            outcome = RAISE_DAMAGED;
            bad_at = end;
        } else {
            span = PyMem_Malloc((size_t)(end - head) + 1);
            if (span == NULL) {
                outcome = RAISED + 1;
            } else {
                ring_read(q, pos_of(head, q->cap), span, end - head);
                st(&state[HEAD], end); /* the commit: all of them are taken at once */
                st(&q->recs[ci], add64(ld(&q->recs[ci]), taken));
                st(&state[HELD], add64(ld(&state[HELD]), taken));
                st(&state[GETS], add64(ld(&state[GETS]), taken));
                bump(q, NF_SEQ);
                sleepers = ld32(&q->fw[NF_SLEEP]);
            }
        }
    }
    if (outcome != RAISED) {
        head = ld(&state[HEAD]);
        tail = ld(&state[TAIL]);
        sn_mutex_release(q->mutex);
    }
    if (outcome == RAISED + 1) return PyErr_NoMemory();
    if (outcome != GO) return raise_outcome(q, outcome, 1, bad_at, head, tail);
    if (sleepers) wake(q, NF_SEQ, taken, sleepers);
    PyObject *out = decode(q, span, taken);
    PyMem_Free(span);
    return out;
}

static PyObject *Queue_get_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames) {
    PyObject *a[3];
    if (sn_parse("SafeQueue.get_many", args, nargs, kwnames, get_many_names, 1, 3, a) < 0)
        return NULL;
    return do_get_many((Queue *)self, a[0], a[1], a[2]);
}

/* -- the type ------------------------------------------------------------------------- */
static PyObject *Queue_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *mm, *what, *closed_msg, *name, *encode_raw, *claim;
    long long capacity, maxsize, nrec;
    int raw;
    static char *kwlist[] = {"mm",      "what", "closed_msg", "name",  "capacity",
                             "maxsize", "raw",  "encode_raw", "processes", "claim", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OUUULLpOLO:Queue", kwlist, &mm, &what,
                                     &closed_msg, &name, &capacity, &maxsize, &raw,
                                     &encode_raw, &nrec, &claim))
        return NULL;
    if (capacity < 16 || capacity % 8 || maxsize < 0 || nrec < 1 || nrec > (1 << 16)) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native.Queue: bad capacity or maxsize");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Queue *self = (Queue *)alloc(type, 0);
    if (self == NULL) return NULL;
    if (sn_core_init(&self->head, mm, what, closed_msg) < 0 ||
        sn_map_check(&self->head.map, 0,
                     RING_OFFSET + (Py_ssize_t)capacity + (Py_ssize_t)nrec * 8 * REC_WORDS) <
            0) {
        Py_DECREF(self);
        return NULL;
    }
    char *base = self->head.map.base;
    if (((uintptr_t)base & 63) != 0) {
        PyErr_SetString(PyExc_ValueError, "safeshm._native.Queue: misaligned mapping");
        Py_DECREF(self);
        return NULL;
    }
    self->state = (int64_t *)(base + STATE_OFFSET);
    self->fw = (uint32_t *)(base + FUTEX_OFFSET);
    self->mutex = (pthread_mutex_t *)(base + MUTEX_OFFSET);
    self->ring = (unsigned char *)(base + RING_OFFSET);
    self->cap = capacity;
    self->maxsize = maxsize;
    self->raw = raw;
    Py_INCREF(name);
    self->name = name;
    Py_INCREF(encode_raw);
    self->encode_raw = encode_raw;
    self->recs = (int64_t *)(base + RING_OFFSET + capacity);
    self->nrec = nrec;
    Py_INCREF(claim);
    self->claim = claim;
    self->rec_generation = -1;
    self->rec_count = -1;
    return (PyObject *)self;
}

static void Queue_dealloc(PyObject *self) {
    Queue *q = (Queue *)self;
    Py_CLEAR(q->name);
    Py_CLEAR(q->encode_raw);
    Py_CLEAR(q->claim);
    sn_core_dealloc(self);
}

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL | METH_KEYWORDS

static PyMethodDef Queue_methods[] = {
    {"put", FASTCALL(Queue_put),
     "put($self, /, item, block=True, timeout=None)\n--\n\nSafeQueue.put in C."},
    {"put_nowait", FASTCALL(Queue_put_nowait),
     "put_nowait($self, /, item)\n--\n\nSafeQueue.put_nowait in C."},
    {"put_many", FASTCALL(Queue_put_many),
     "put_many($self, /, items, block=True, timeout=None)\n--\n\nSafeQueue.put_many in C."},
    {"get", FASTCALL(Queue_get),
     "get($self, /, block=True, timeout=None)\n--\n\nSafeQueue.get in C."},
    {"get_nowait", FASTCALL(Queue_get_nowait),
     "get_nowait($self, /)\n--\n\nSafeQueue.get_nowait in C."},
    {"get_many", FASTCALL(Queue_get_many),
     "get_many($self, /, max_items, block=True, timeout=None)\n--\n\nSafeQueue.get_many in C."},
    SN_CORE_CLOSE_METHOD,
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Queue_slots[] = {
    {Py_tp_new, Queue_new},
    {Py_tp_dealloc, Queue_dealloc},
    {Py_tp_methods, Queue_methods},
    {Py_tp_doc, "Queue(mm, what, closed_msg, name, capacity, maxsize, raw, encode_raw, "
                "processes, claim)\n--\n\n"
                "The compiled core of a SafeQueue handle (see safeshm._queue)."},
    {0, NULL},
};

static PyType_Spec Queue_spec = {
    .name = "safeshm._native.Queue",
    .basicsize = sizeof(Queue),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = Queue_slots,
};

/* queue_wait_slice(seconds=None): the longest single sleep of a waiting put or get (for
 * tests); returns the previous value. */
static PyObject *queue_wait_slice(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    double before = wait_slice;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "queue_wait_slice() takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None) {
        double s = PyFloat_AsDouble(args[0]);
        if (s == -1.0 && PyErr_Occurred()) return NULL;
        if (!(s > 0) || s > 3600) {
            PyErr_SetString(PyExc_ValueError, "queue_wait_slice: seconds in (0, 3600]");
            return NULL;
        }
        wait_slice = s;
    }
    return PyFloat_FromDouble(before);
}

static PyMethodDef queue_functions[] = {
    {"queue_wait_slice", (PyCFunction)(void (*)(void))queue_wait_slice, METH_FASTCALL,
     "queue_wait_slice(seconds=None)\n--\n\nSet the longest single sleep of a SafeQueue wait "
     "(tests); returns the previous value."},
    {NULL, NULL, 0, NULL},
};

int sn_register_queue(PyObject *module) {
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (pickle == NULL) return -1;
    pickle_dumps = PyObject_GetAttrString(pickle, "dumps");
    pickle_loads = PyObject_GetAttrString(pickle, "loads");
    pickle_protocol = PyObject_GetAttrString(pickle, "HIGHEST_PROTOCOL");
    Py_DECREF(pickle);
    if (pickle_dumps == NULL || pickle_loads == NULL || pickle_protocol == NULL) return -1;
    if (PyModule_AddFunctions(module, queue_functions) < 0) return -1;
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "safeshm._native: pthread_atfork failed");
        return -1;
    }
    return sn_add_type(module, &Queue_spec, NULL);
}
