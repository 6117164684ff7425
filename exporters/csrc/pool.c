/* A small persistent thread pool for the kernels' parallel loops.
 *
 * Why not OpenMP: libgomp's workers spin after each parallel region, and on a 2-core board the
 * ONNX Runtime segments that run between kernels would then fight them for the cores. These
 * workers sleep on a condition variable as soon as a job is done. Why not a thread per call:
 * creating threads costs tens of microseconds, as much as a small layer.
 *
 * One job runs at a time; a caller that finds the pool busy (another Python thread is in a
 * kernel: ctypes releases the GIL) runs its job alone rather than wait. After fork() the child
 * forgets the parent's workers (they do not exist there) and starts its own when needed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "internal.h"

#define BF_MAX_WORKERS 63

static struct {
    pthread_mutex_t job_lock;   /* held by the caller for a whole job */
    pthread_mutex_t lock;       /* guards the fields below */
    pthread_cond_t wake;        /* workers wait here for a new generation */
    pthread_cond_t done;        /* the caller waits here for the last worker */
    pthread_t threads[BF_MAX_WORKERS];
    uint64_t born[BF_MAX_WORKERS]; /* the generation each worker was created in */
    int n_workers;              /* started */
    int active;                 /* workers taking part in the current job */
    int running;                /* workers of the current job not yet finished */
    uint64_t generation;
    bf_unit_fn fn;
    void *ctx;
    int64_t n_units;
    _Atomic int64_t next_unit;
} pool = {.job_lock = PTHREAD_MUTEX_INITIALIZER,
          .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};

static void run_units(bf_unit_fn fn, void *ctx, int64_t n_units) {
    for (;;) {
        const int64_t unit = atomic_fetch_add_explicit(&pool.next_unit, 1, memory_order_relaxed);
        if (unit >= n_units) return;
        fn(ctx, unit);
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.lock);
    /* the generation current when this worker was created: the job that created it comes next */
    uint64_t seen = pool.born[index];
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        if (index >= pool.active) continue;
        const bf_unit_fn fn = pool.fn;
        void *ctx = pool.ctx;
        const int64_t n_units = pool.n_units;
        pthread_mutex_unlock(&pool.lock);
        run_units(fn, ctx, n_units);
        pthread_mutex_lock(&pool.lock);
        if (--pool.running == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.n_workers = 0;
    pool.active = 0;
    pool.running = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

/* Start workers until there are `wanted` (called with pool.lock held). Returns how many exist:
 * fewer if the system refuses threads, in which case the job simply uses fewer. */
static int ensure_workers(int wanted) {
    if (wanted > BF_MAX_WORKERS) wanted = BF_MAX_WORKERS;
    while (pool.n_workers < wanted) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pool.born[pool.n_workers] = pool.generation;
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
    if (helpers <= 0 || pthread_mutex_trylock(&pool.job_lock) != 0) {
        for (int64_t unit = 0; unit < n_units; unit++) fn(ctx, unit);
        return;
    }
    pthread_once(&atfork_once, install_atfork);
    pthread_mutex_lock(&pool.lock);
    helpers = ensure_workers(helpers) < helpers ? pool.n_workers : helpers;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_units = n_units;
    atomic_store_explicit(&pool.next_unit, 0, memory_order_relaxed);
    pool.active = helpers;
    pool.running = helpers;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_units(fn, ctx, n_units);

    pthread_mutex_lock(&pool.lock);
    while (pool.running > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.job_lock);
}
