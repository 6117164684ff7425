/* A small persistent thread pool for the kernels' parallel loops.
 *
 * Why not OpenMP: libgomp's workers spin for a long time (GOMP_SPINCOUNT) after each parallel
 * region, and on a 2-core board the ONNX Runtime segments that run between kernels would then
 * fight them for the cores. These workers spin only briefly (BF_SPIN_NS: long enough to catch
 * the next kernel of the same layer), then sleep on a condition variable.
 *
 * The caller never waits for a worker to wake up: units are claimed from a shared cursor, the
 * caller claims them too, and the job is over when every unit is done, whoever did it. A
 * worker that wakes late (a sleeping thread can take 50-100 us to be scheduled in a VM, as long
 * as a whole small layer) finds the cursor exhausted, or tagged with a newer job, and claims
 * nothing. So N threads are never slower than one by more than the cost of a wake-up call.
 *
 * One job runs at a time; a caller that finds the pool busy (another Python thread is in a
 * kernel: ctypes releases the GIL) runs its job alone rather than wait. After fork() the child
 * forgets the parent's workers (they do not exist there) and starts its own when needed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "internal.h"

#define BF_MAX_WORKERS 63
#ifndef BF_SPIN_NS
#define BF_SPIN_NS 60000 /* how long an idle worker (or a waiting caller) spins before sleeping */
#endif

static struct {
    pthread_mutex_t job_lock;      /* held by the caller for a whole job */
    pthread_mutex_t lock;          /* pairs with the two condition variables */
    pthread_cond_t wake;           /* workers sleep here waiting for a new job */
    pthread_cond_t done;           /* the caller sleeps here waiting for the last unit */
    pthread_t threads[BF_MAX_WORKERS];
    int n_workers;                 /* started (only the job_lock holder changes it) */
    /* the job: written before the cursor publishes it, read only after a unit is claimed */
    bf_unit_fn fn;
    void *ctx;
    int64_t n_units;
    int64_t chunk;                 /* units claimed at a time */
    int active;                    /* workers allowed to take part */
    /* (job number << 32) | next unit: a claim is a compare-and-swap that also checks that the
     * job is the one the worker woke up for */
    _Atomic uint64_t cursor;
    _Atomic int64_t finished;      /* units done in the current job */
} pool = {.job_lock = PTHREAD_MUTEX_INITIALIZER,
          .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline uint32_t job_of(uint64_t cursor) { return (uint32_t)(cursor >> 32); }

#define BF_CLOSED UINT32_MAX /* the unit part of a finished job's cursor */

/* Claim and run runs of units of job `job` until none is left; wakes the caller after the
 * job's last unit. */
static void work_on(uint32_t job) {
    for (;;) {
        uint64_t cursor = atomic_load_explicit(&pool.cursor, memory_order_acquire);
        if (job_of(cursor) != job) return;
        const int64_t first = (int64_t)(uint32_t)cursor;
        const int64_t n_units = pool.n_units;
        if (first >= n_units) return;
        const int64_t end = (first + pool.chunk < n_units) ? first + pool.chunk : n_units;
        const uint64_t next = ((uint64_t)job << 32) | (uint64_t)end;
        if (!atomic_compare_exchange_weak_explicit(&pool.cursor, &cursor, next,
                                                   memory_order_acq_rel, memory_order_acquire))
            continue;
        /* claimed: the job cannot finish before these units, so fn and ctx are still valid */
        const bf_unit_fn fn = pool.fn;
        void *ctx = pool.ctx;
        for (int64_t unit = first; unit < end; unit++) fn(ctx, unit);
        const int64_t count = end - first;
        if (atomic_fetch_add_explicit(&pool.finished, count, memory_order_acq_rel) + count ==
            n_units) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

/* Waits until the cursor names a job other than `seen` (spinning first) and returns it. */
static uint32_t next_job(uint32_t seen) {
    const int64_t deadline = now_ns() + BF_SPIN_NS;
    for (unsigned spins = 0;; spins++) {
        const uint32_t job = job_of(atomic_load_explicit(&pool.cursor, memory_order_acquire));
        if (job != seen) return job;
        if ((spins & 63) == 63 && now_ns() > deadline) break;
        cpu_relax();
    }
    pthread_mutex_lock(&pool.lock);
    uint32_t job;
    while ((job = job_of(atomic_load_explicit(&pool.cursor, memory_order_acquire))) == seen)
        pthread_cond_wait(&pool.wake, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return job;
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = job_of(atomic_load_explicit(&pool.cursor, memory_order_acquire));
    for (;;) {
        seen = next_job(seen);
        if (index < pool.active) work_on(seen);
    }
    return NULL;
}

static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.n_workers = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

/* Start workers until there are `wanted`. Returns how many exist: fewer if the system refuses
 * threads, in which case the job simply uses fewer. A new worker waits for the next job. */
static int ensure_workers(int wanted) {
    if (wanted > BF_MAX_WORKERS) wanted = BF_MAX_WORKERS;
    while (pool.n_workers < wanted) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20); /* the kernels' tiles need < 32 KB */
        const int failed = pthread_create(&pool.threads[pool.n_workers], &attr, worker_main,
                                          (void *)(intptr_t)pool.n_workers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pthread_detach(pool.threads[pool.n_workers]);
        pool.n_workers++;
    }
    return pool.n_workers;
}

void bf_parallel_for(int threads, int64_t n_units, bf_unit_fn fn, void *ctx) {
    if (n_units <= 0) return;
    int helpers = threads - 1;
    if ((int64_t)helpers > n_units - 1) helpers = (int)(n_units - 1);
    if (helpers <= 0 || n_units >= (int64_t)BF_CLOSED ||
        pthread_mutex_trylock(&pool.job_lock) != 0) {
        for (int64_t unit = 0; unit < n_units; unit++) fn(ctx, unit);
        return;
    }
    pthread_once(&atfork_once, install_atfork);
    const int started = ensure_workers(helpers);
    if (started < helpers) helpers = started;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_units = n_units;
    /* about four runs per thread: neighbouring units write neighbouring output rows, and rows
     * written alternately by two threads would share cache lines at every row end (a
     * 64-channel layer ran 1.4x slower on 2 threads than on 1 with single units) */
    const int64_t chunk = n_units / (4 * (int64_t)(helpers + 1));
    pool.chunk = chunk > 1 ? chunk : 1;
    pool.active = helpers;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    const uint32_t job =
        job_of(atomic_load_explicit(&pool.cursor, memory_order_relaxed)) + 1u;
    pthread_mutex_lock(&pool.lock); /* a worker about to sleep checks the cursor under it */
    atomic_store_explicit(&pool.cursor, (uint64_t)job << 32, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    work_on(job);

    const int64_t deadline = now_ns() + BF_SPIN_NS;
    for (unsigned spins = 0;
         atomic_load_explicit(&pool.finished, memory_order_acquire) < n_units; spins++) {
        if ((spins & 63) == 63 && now_ns() > deadline) {
            pthread_mutex_lock(&pool.lock);
            while (atomic_load_explicit(&pool.finished, memory_order_acquire) < n_units)
                pthread_cond_wait(&pool.done, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
            break;
        }
        cpu_relax();
    }
    /* close the job before the next can be published: a worker that read this job's cursor
     * just before its last claim must not claim past the end with the next job's unit count
     * (its compare-and-swap now fails) */
    atomic_store_explicit(&pool.cursor, ((uint64_t)job << 32) | BF_CLOSED, memory_order_release);
    pthread_mutex_unlock(&pool.job_lock);
}
