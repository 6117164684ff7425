/* A small persistent thread pool for the kernels' parallel loops.
 *
 * Why not OpenMP: libgomp's workers spin for a long time (GOMP_SPINCOUNT) after each parallel
 * region, and on a 2-core board the ONNX Runtime segments that run between kernels would then
 * fight them for the cores. These workers spin only briefly (BF_SPIN_NS: long enough to catch
 * the next kernel of the same layer or the next layer, which follows within microseconds),
 * then sleep on a condition variable. Why not a thread per call: creating threads costs tens
 * of microseconds, as much as a small layer.
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
#define BF_SPIN_NS 60000 /* how long an idle worker (or a waiting caller) spins before sleeping */

static struct {
    pthread_mutex_t job_lock;      /* held by the caller for a whole job */
    pthread_mutex_t lock;          /* pairs with the two condition variables */
    pthread_cond_t wake;           /* workers sleep here waiting for a new generation */
    pthread_cond_t done;           /* the caller sleeps here waiting for the last worker */
    pthread_t threads[BF_MAX_WORKERS];
    uint64_t born[BF_MAX_WORKERS]; /* the generation each worker was created in */
    int n_workers;                 /* started (only the job_lock holder changes it) */
    /* the job: written before the generation is published, read after it is seen */
    bf_unit_fn fn;
    void *ctx;
    int64_t n_units;
    int64_t chunk;                 /* units taken at a time */
    int active;                    /* workers taking part */
    _Atomic uint64_t generation;
    _Atomic int running;           /* workers of the current job not yet finished */
    _Atomic int64_t next_unit;
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

/* Units are taken in runs of `chunk` neighbours: neighbouring units write neighbouring output
 * rows, and rows that two threads wrote alternately would share cache lines at every row end
 * (a 64-channel layer on 2 threads ran 1.4x slower than on 1 with single units). */
static void run_units(bf_unit_fn fn, void *ctx, int64_t n_units, int64_t chunk) {
    for (;;) {
        const int64_t first =
            atomic_fetch_add_explicit(&pool.next_unit, chunk, memory_order_relaxed);
        if (first >= n_units) return;
        const int64_t end = (first + chunk < n_units) ? first + chunk : n_units;
        for (int64_t unit = first; unit < end; unit++) fn(ctx, unit);
    }
}

/* Waits until the generation differs from `seen` (spinning first) and returns it. */
static uint64_t next_generation(uint64_t seen) {
    const int64_t deadline = now_ns() + BF_SPIN_NS;
    for (unsigned spins = 0;; spins++) {
        const uint64_t g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (g != seen) return g;
        if ((spins & 63) == 63 && now_ns() > deadline) break;
        cpu_relax();
    }
    pthread_mutex_lock(&pool.lock);
    uint64_t g;
    while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen)
        pthread_cond_wait(&pool.wake, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return g;
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    /* the generation current when this worker was created: the job that created it comes next */
    uint64_t seen = pool.born[index];
    for (;;) {
        seen = next_generation(seen);
        if (index >= pool.active) continue;
        run_units(pool.fn, pool.ctx, pool.n_units, pool.chunk);
        if (atomic_fetch_sub_explicit(&pool.running, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
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
    atomic_store(&pool.running, 0);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void install_atfork(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

/* Start workers until there are `wanted`. Returns how many exist: fewer if the system refuses
 * threads, in which case the job simply uses fewer. */
static int ensure_workers(int wanted) {
    if (wanted > BF_MAX_WORKERS) wanted = BF_MAX_WORKERS;
    while (pool.n_workers < wanted) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20); /* the kernels' tiles need < 32 KB */
        pool.born[pool.n_workers] = atomic_load(&pool.generation);
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
    const int started = ensure_workers(helpers);
    if (started < helpers) helpers = started;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_units = n_units;
    /* about four runs per thread: few shared row ends, and still some balancing */
    const int64_t chunk = n_units / (4 * (int64_t)(helpers + 1));
    pool.chunk = chunk > 1 ? chunk : 1;
    pool.active = helpers;
    atomic_store_explicit(&pool.next_unit, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.running, helpers, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock); /* a worker about to sleep checks the generation under it */
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_units(fn, ctx, n_units, pool.chunk);

    const int64_t deadline = now_ns() + BF_SPIN_NS;
    for (unsigned spins = 0; atomic_load_explicit(&pool.running, memory_order_acquire) > 0;
         spins++) {
        if ((spins & 63) == 63 && now_ns() > deadline) {
            pthread_mutex_lock(&pool.lock);
            while (atomic_load_explicit(&pool.running, memory_order_acquire) > 0)
                pthread_cond_wait(&pool.done, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
            break;
        }
        cpu_relax();
    }
    pthread_mutex_unlock(&pool.job_lock);
}
