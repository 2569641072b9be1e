/* fastbn/_pool.h -- the thread pool under fastbn's CPU kernels.
 *
 * Why not an OpenMP parallel region: its fork-join makes the calling thread wait at the end for
 * every thread of the team, started or not.  Next to another pool that spins (NumPy's OpenBLAS
 * after a matmul) on a 2-core machine, a helper that cannot get a core held every call for a
 * scheduler time slice: a (450, 100) forward + backward went from 66 us to 5 ms.  libgomp's
 * threads then spun after the call and slowed the matmul 24x in turn, and a child made by fork()
 * hung in its first parallel region.
 *
 * What this pool does instead (the pattern of TBB's and ONNX Runtime's pools):
 *   - a call is cut into `n` tasks; each of its threads (the caller, participant 0, and helper i,
 *     participant i + 1) owns a home range of them, the same equal share on every call, and
 *     claims its own tasks from the range's near end, then the others' from their far end;
 *     `back` (a backwards second pass) swaps the ends, so a thread starts where its first pass
 *     ended.  Homes keep the same rows on the same core from call to call: the Zen 4 VM's two
 *     cores behave as if each had a cache of its own, and a plain GroupNorm backward of
 *     (8, 256, 28, 28) float32 took 0.20 ms with fixed halves and 0.40 ms with the halves swapped
 *     every call (one shared claim counter, before, gave each call a different split);
 *   - the calling thread starts on them at once, and helpers join when they get a core (the
 *     caller takes a late helper's tasks from the far end of its range);
 *   - the caller waits only for tasks a helper has actually claimed (not for helpers that have not
 *     started), so a helper without a core costs the call its parallelism, never a time slice;
 *   - an idle helper spins for fbn_pool_spin_ns, then sleeps on a condition variable, so that it
 *     does not hold a core the next library needs;
 *   - fork(): the child forgets the parent's helpers (pthread_atfork) and starts its own.
 * Which thread ran which task does not change a result: the kernels write each task's partial
 * sums to the task's own slot and merge them in task order, and every task runs in the caller's
 * floating-point mode (x86's MXCSR: flush-to-zero, denormals-are-zero, rounding), which a helper
 * adopts when it claims a task (torch.set_flush_denormal(True) sets it on the calling thread only:
 * a helper that kept its own gave outputs that depended on which thread wrote them).
 *
 * A range's two ends and a generation number share one 64-bit word, so a claim is one
 * compare-and-swap that also proves the job is still the one the helper was invited to.  One
 * job runs at a time; a call from a second Python thread while a job runs does its tasks itself,
 * on its own thread (same results).
 */
#ifndef FASTBN_POOL_H
#define FASTBN_POOL_H

#include <stdint.h>
#include <string.h>
#include <time.h>

typedef void (*fbn_task_fn)(void *ctx, Py_ssize_t task);

#if defined(__GNUC__) && !defined(_WIN32)
#define FBN_POOL_THREADS 1
#include <pthread.h>
#include <signal.h>
#else
#define FBN_POOL_THREADS 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* the calling thread's floating-point mode: MXCSR's control bits, not its sticky exception flags
 * (bits 0-5), which differ between threads all the time and would cost an ldmxcsr a task */
#define FBN_FP_MODE() (_mm_getcsr() & ~0x3Fu)
#define FBN_FP_ADOPT(mode)                                      \
    do {                                                        \
        const unsigned int csr_ = _mm_getcsr();                 \
        if ((csr_ & ~0x3Fu) != (mode))                          \
            _mm_setcsr((csr_ & 0x3Fu) | (mode));                \
    } while (0)
#else
#define FBN_FP_MODE() 0u
#define FBN_FP_ADOPT(mode) ((void)(mode))
#endif

#define FBN_POOL_MAX 1024                      /* threads, the caller included */
#define FBN_GEN_BITS 20
#define FBN_COUNT_BITS 22                      /* task count and claim counter, each */
#define FBN_TASKS_MAX (((int64_t)1 << FBN_COUNT_BITS) - 1)

/* Nanoseconds an idle helper (and a caller waiting for a claimed task) spins before it sleeps;
 * read and written atomically (fbn_pool_spin, fbn_pool_set_spin): the benchmark changes it. */
static int64_t fbn_pool_spin_ns = 20000;

static inline int64_t fbn_pool_spin(void) { return __atomic_load_n(&fbn_pool_spin_ns, __ATOMIC_RELAXED); }
static inline void fbn_pool_set_spin(int64_t ns) { __atomic_store_n(&fbn_pool_spin_ns, ns, __ATOMIC_RELAXED); }

#if FBN_POOL_THREADS

#define FBN_LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define FBN_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)

static inline void fbn_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t fbn_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

typedef struct {
    uint32_t mail;      /* the generation of the job this helper is invited to */
    uint32_t nudge;     /* bumped to wake it without a job (fbn_pool_wake) */
    int sleeping;       /* it waits on c: a poster must signal */
    pthread_mutex_t m;
    pthread_cond_t c;
    char pad[64];       /* one helper's mailbox per cache line, at least */
} fbn_helper;

typedef struct {
    uint64_t word;      /* generation | end | start of the tasks left in this participant's range */
    char pad[56];
} fbn_range;

static struct {
    fbn_range range[FBN_POOL_MAX];  /* participant p's home range: the caller 0, helper i i + 1 */
    Py_ssize_t done __attribute__((aligned(64)));  /* tasks finished in this job */
    Py_ssize_t n;       /* the job's task count */
    int parts;          /* participants of the job (the caller and its helpers) */
    int back;           /* owners claim their range's last task first (kernels' backwards passes) */
    fbn_task_fn fn;
    void *ctx;
    unsigned int fp_mode;  /* the caller's floating-point mode (FBN_FP_MODE) */
    uint32_t gen;       /* the last job's generation (the caller's own copy) */
    int busy;           /* a job is running */
    int started;        /* helpers started */
    int ready;          /* pthread_atfork and the caller's mutex are set up */
    pthread_mutex_t m;  /* the caller sleeps on c until done reaches the task count */
    pthread_cond_t c;
    fbn_helper helpers[FBN_POOL_MAX - 1];
    /* counters, for the benchmark: jobs run with helpers, tasks the helpers ran, the caller's
     * waits for claimed tasks (and how many of them slept) and the nanoseconds it waited */
    int64_t jobs, helper_tasks, waits, sleeps, wait_ns;
    int64_t keep_until; /* idle helpers spin at least until then (fbn_pool_wake) */
    int64_t wakes;      /* sleeping helpers fbn_pool_wake woke */
} fbn_pool;

#define FBN_WORD(gen, end, start) \
    (((uint64_t)(gen) << (2 * FBN_COUNT_BITS)) | ((uint64_t)(end) << FBN_COUNT_BITS) | (uint64_t)(start))
#define FBN_WORD_GEN(w) ((uint32_t)((w) >> (2 * FBN_COUNT_BITS)))
#define FBN_WORD_END(w) ((Py_ssize_t)(((w) >> FBN_COUNT_BITS) & FBN_TASKS_MAX))
#define FBN_WORD_START(w) ((Py_ssize_t)((w) & FBN_TASKS_MAX))

/* Claim one task of job `gen` from range q: from its front (front != 0) or its back; -1 when
 * the range is empty or the job is another one by now. */
static Py_ssize_t fbn_pool_claim(uint32_t gen, int q, int front)
{
    uint64_t *word = &fbn_pool.range[q].word;
    uint64_t w = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        const Py_ssize_t start = FBN_WORD_START(w), end = FBN_WORD_END(w);
        if (FBN_WORD_GEN(w) != gen || start >= end)
            return -1;
        const uint64_t next = front ? w + 1 : w - ((uint64_t)1 << FBN_COUNT_BITS);
        if (__atomic_compare_exchange_n(word, &w, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return front ? start : end - 1;
    }
}

/* Participant p's share of job `gen`: its own range's tasks in order, then the others' from the
 * far end (a helper that has not started yet loses its range's tail to those who have), until
 * no task is left (or the job is another one by now).  Returns the tasks it ran. */
static Py_ssize_t fbn_pool_work(uint32_t gen, int p)
{
    Py_ssize_t ran = 0, k;
    const int parts = __atomic_load_n(&fbn_pool.parts, __ATOMIC_ACQUIRE);
    const int back = __atomic_load_n(&fbn_pool.back, __ATOMIC_ACQUIRE);
    if (p >= parts)
        p = 0;  /* parts is a later job's (gen no longer matches: every claim below fails) */
    for (int i = 0; i < parts; i++) {
        const int q = (p + i) % parts;
        const int front = (i == 0) != back;  /* the owner from its near end, thieves from the far one */
        while ((k = fbn_pool_claim(gen, q, front)) >= 0) {
            /* A claimed task keeps job `gen` alive (its caller waits for it), so fn, ctx and
             * fp_mode are its. */
            const Py_ssize_t n = fbn_pool.n;  /* read before this task counts as done */
            FBN_FP_ADOPT(fbn_pool.fp_mode);
            fbn_pool.fn(fbn_pool.ctx, k);
            ran++;
            if (__atomic_add_fetch(&fbn_pool.done, 1, __ATOMIC_ACQ_REL) == n) {
                pthread_mutex_lock(&fbn_pool.m);  /* the last task: wake a caller that sleeps */
                pthread_cond_signal(&fbn_pool.c);
                pthread_mutex_unlock(&fbn_pool.m);
            }
        }
    }
    return ran;
}

static void *fbn_helper_main(void *arg)
{
    fbn_helper *h = (fbn_helper *)arg;
    uint32_t seen = 0, gen;
    for (;;) {
        int64_t until = fbn_now_ns() + fbn_pool_spin();
        for (int i = 1;; i++) {  /* spin a little: the next call often comes at once */
            gen = __atomic_load_n(&h->mail, __ATOMIC_ACQUIRE);
            if (gen != seen)
                break;
            if ((i & 63) == 0) {
                const int64_t now = fbn_now_ns(), keep = __atomic_load_n(&fbn_pool.keep_until, __ATOMIC_RELAXED);
                if (now > until && now > keep)
                    break;
            }
            fbn_cpu_relax();
        }
        if (gen == seen) {  /* then sleep until invited (or nudged: then spin again) */
            pthread_mutex_lock(&h->m);
            FBN_STORE(&h->sleeping, 1);
            const uint32_t nudged = h->nudge;
            while ((gen = FBN_LOAD(&h->mail)) == seen && h->nudge == nudged)
                pthread_cond_wait(&h->c, &h->m);
            FBN_STORE(&h->sleeping, 0);
            pthread_mutex_unlock(&h->m);
            if (gen == seen)
                continue;
        }
        seen = gen;
        Py_ssize_t ran = fbn_pool_work(gen, (int)(h - fbn_pool.helpers) + 1);
        if (ran)
            __atomic_add_fetch(&fbn_pool.helper_tasks, ran, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void fbn_pool_post(fbn_helper *h, uint32_t gen)
{
    FBN_STORE(&h->mail, gen);
    if (FBN_LOAD(&h->sleeping)) {  /* seq_cst both sides: it sees the mail or we see it asleep */
        pthread_mutex_lock(&h->m);
        pthread_cond_signal(&h->c);
        pthread_mutex_unlock(&h->m);
    }
}

/* A call that will post a job after work of its own (the fused ReLU's backward first finds its
 * mask's bounds, 5 us for 512 channels): idle helpers keep spinning for fbn_pool_spin_ns from now
 * on, and the sleeping ones among the first threads - 1 wake and spin.  Without it the helper of a
 * loop of such calls often fell asleep just before the job came, woke after the caller had taken
 * part of its share, and the next pass found that share in the other core's cache: on the Zen 4
 * VM, (32, 512, 7, 7)'s ReLU backward lost 10-15 us of 220 (what a 200 us spin won back). */
static inline void fbn_pool_wake(int threads)
{
    __atomic_store_n(&fbn_pool.keep_until, fbn_now_ns() + fbn_pool_spin(), __ATOMIC_RELAXED);
    const int n = __atomic_load_n(&fbn_pool.started, __ATOMIC_ACQUIRE);
    for (int i = 0; i < threads - 1 && i < n; i++) {
        fbn_helper *h = &fbn_pool.helpers[i];
        if (FBN_LOAD(&h->sleeping)) {
            pthread_mutex_lock(&h->m);
            h->nudge++;
            pthread_cond_signal(&h->c);
            pthread_mutex_unlock(&h->m);
            __atomic_add_fetch(&fbn_pool.wakes, 1, __ATOMIC_RELAXED);
        }
    }
}

/* In a child made by fork() only the forking thread exists: forget the parent's helpers. */
static void fbn_pool_atfork_child(void)
{
    fbn_pool.started = 0;
    fbn_pool.busy = 0;
    pthread_mutex_init(&fbn_pool.m, NULL);
    pthread_cond_init(&fbn_pool.c, NULL);
}

/* Start helpers up to `want` (as many as the system lets us); returns how many there are. */
static int fbn_pool_grow(int want)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);  /* helpers take no signals: Python's go to the main thread */
    while (fbn_pool.started < want) {
        fbn_helper *h = &fbn_pool.helpers[fbn_pool.started];
        pthread_t t;
        pthread_attr_t attr;
        h->mail = 0;  /* no job yet: the caller posts this one to it after */
        h->nudge = 0;
        h->sleeping = 0;
        pthread_mutex_init(&h->m, NULL);
        pthread_cond_init(&h->c, NULL);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, fbn_helper_main, h);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        __atomic_store_n(&fbn_pool.started, fbn_pool.started + 1, __ATOMIC_RELEASE);  /* (fbn_pool_wake) */
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return fbn_pool.started;
}

static void fbn_pool_setup(void)
{
    pthread_mutex_init(&fbn_pool.m, NULL);
    pthread_cond_init(&fbn_pool.c, NULL);
    pthread_atfork(NULL, NULL, fbn_pool_atfork_child);
    fbn_pool.ready = 1;
}

/* Run fn(ctx, 0 .. n-1) on up to `threads` threads, the caller one of them; returns when all ran.
 * `back`: each thread takes its home range's tasks last to first (alone: n-1 down to 0). */
static void fbn_pool_run(fbn_task_fn fn, void *ctx, Py_ssize_t n, int threads, int back)
{
    Py_ssize_t k;
    if (threads > n)
        threads = (int)n;
    if (threads > FBN_POOL_MAX)
        threads = FBN_POOL_MAX;
    if (threads <= 1 || n > FBN_TASKS_MAX || __atomic_exchange_n(&fbn_pool.busy, 1, __ATOMIC_ACQUIRE)) {
        for (k = 0; k < n; k++)  /* alone, or another thread's job runs: all tasks here */
            fn(ctx, back ? n - 1 - k : k);
        return;
    }
    if (!fbn_pool.ready)
        fbn_pool_setup();
    uint32_t gen = (fbn_pool.gen + 1) & ((1u << FBN_GEN_BITS) - 1);
    if (gen == 0)
        gen = 1;  /* 0 is no job: a new helper's mailbox may hold it */
    fbn_pool.gen = gen;
    int helpers = fbn_pool_grow(threads - 1);
    if (helpers > threads - 1)
        helpers = threads - 1;
    const int parts = helpers + 1;
    fbn_pool.fn = fn;
    fbn_pool.ctx = ctx;
    fbn_pool.n = n;
    fbn_pool.fp_mode = FBN_FP_MODE();
    __atomic_store_n(&fbn_pool.parts, parts, __ATOMIC_RELAXED);
    __atomic_store_n(&fbn_pool.back, back, __ATOMIC_RELAXED);
    __atomic_store_n(&fbn_pool.done, 0, __ATOMIC_RELAXED);
    for (int q = 0; q < parts; q++)  /* participant q's home: the q-th of `parts` equal ranges */
        __atomic_store_n(&fbn_pool.range[q].word, FBN_WORD(gen, n * (q + 1) / parts, n * q / parts), __ATOMIC_RELEASE);
    for (int i = 0; i < helpers; i++)
        fbn_pool_post(&fbn_pool.helpers[i], gen);
    fbn_pool_work(gen, 0);
    fbn_pool.jobs++;
    /* Every task is claimed; wait for the ones helpers hold: spin a little, then sleep. */
    if (__atomic_load_n(&fbn_pool.done, __ATOMIC_ACQUIRE) < n) {
        int64_t start = fbn_now_ns(), until = start + fbn_pool_spin();
        fbn_pool.waits++;
        for (int i = 1; __atomic_load_n(&fbn_pool.done, __ATOMIC_ACQUIRE) < n; i++) {
            if ((i & 63) == 0 && fbn_now_ns() > until) {
                fbn_pool.sleeps++;
                pthread_mutex_lock(&fbn_pool.m);
                while (__atomic_load_n(&fbn_pool.done, __ATOMIC_ACQUIRE) < n)
                    pthread_cond_wait(&fbn_pool.c, &fbn_pool.m);
                pthread_mutex_unlock(&fbn_pool.m);
                break;
            }
            fbn_cpu_relax();
        }
        fbn_pool.wait_ns += fbn_now_ns() - start;
    }
    __atomic_store_n(&fbn_pool.busy, 0, __ATOMIC_RELEASE);
}

static int fbn_pool_helpers(void) { return fbn_pool.started; }

/* counters[0..5] = jobs, helper tasks, waits, sleeps, wait nanoseconds, wakes */
static void fbn_pool_counters(int64_t *c)
{
    c[5] = __atomic_load_n(&fbn_pool.wakes, __ATOMIC_RELAXED);
    c[0] = fbn_pool.jobs;
    c[1] = __atomic_load_n(&fbn_pool.helper_tasks, __ATOMIC_RELAXED);
    c[2] = fbn_pool.waits;
    c[3] = fbn_pool.sleeps;
    c[4] = fbn_pool.wait_ns;
}

#else /* no pthreads or GCC atomics: every task on the calling thread */

static inline void fbn_pool_wake(int threads) { (void)threads; }

static void fbn_pool_run(fbn_task_fn fn, void *ctx, Py_ssize_t n, int threads, int back)
{
    (void)threads;
    for (Py_ssize_t k = 0; k < n; k++)
        fn(ctx, back ? n - 1 - k : k);
}

static int fbn_pool_helpers(void) { return 0; }

static void fbn_pool_counters(int64_t *c) { memset(c, 0, 6 * sizeof(int64_t)); }

#endif /* FBN_POOL_THREADS */
#endif /* FASTBN_POOL_H */
