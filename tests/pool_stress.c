/* A stress test of fastbn/_pool.h on its own: four threads each run 20000 jobs of 1 to 40 tasks
 * on 1 to 4 threads at once (so most calls find the pool busy and run alone), the spin budget
 * switching between 0 and 20 us, half of them backwards, and every task must run exactly once;
 * then a forked child runs 2000 more.  One thread alone must run the tasks in order, or in reverse
 * order with `back`.  tests/test_pool_stress.py builds it (under ThreadSanitizer where the
 * compiler has it) and runs it.  Exit status 0: every task ran once, in order where alone. */
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
typedef ssize_t Py_ssize_t;
#include "_pool.h"

#define MAX_TASKS 40

typedef struct {
    int *hits;
    double *slot;
} job_t;

static void task(void *p, Py_ssize_t k)
{
    job_t *job = (job_t *)p;
    double s = 0;
    for (int i = 0; i < 200 + (k % 7) * 50; i++)  /* uneven tasks */
        s += i * 0.5;
    job->slot[k] = s + (double)k;
    __atomic_add_fetch(&job->hits[k], 1, __ATOMIC_RELAXED);
}

static int run_many(unsigned seed, int jobs)
{
    int bad = 0;
    for (int j = 0; j < jobs; j++) {
        seed = seed * 1103515245u + 12345u;
        int n = 1 + (int)((seed >> 16) % MAX_TASKS), threads = 1 + (int)((seed >> 8) % 4);
        int hits[MAX_TASKS] = {0};
        double slot[MAX_TASKS];
        job_t job = {hits, slot};
        fbn_pool_run(task, &job, n, threads, (int)((seed >> 4) & 1));  /* forwards or backwards */
        for (int k = 0; k < n; k++)
            bad += hits[k] != 1;
        if (j % 97 == 0)
            fbn_pool_set_spin(j % 2 ? 0 : 20000);
    }
    return bad;
}

typedef struct {
    int seen[MAX_TASKS], count;
} order_t;

static void record(void *p, Py_ssize_t k)
{
    order_t *o = (order_t *)p;
    o->seen[o->count++] = (int)k;
}

/* One thread: the tasks in order, or in reverse order with `back`; returns 1 if not. */
static int order_alone(int back)
{
    order_t o = {{0}, 0};
    fbn_pool_run(record, &o, MAX_TASKS, 1, back);
    for (int i = 0; i < MAX_TASKS; i++)
        if (o.count != MAX_TASKS || o.seen[i] != (back ? MAX_TASKS - 1 - i : i))
            return 1;
    return 0;
}

static void *thread_main(void *arg) { return (void *)(intptr_t)run_many((unsigned)(intptr_t)arg, 20000); }

int main(void)
{
    pthread_t t[3];
    int bad = order_alone(0) + order_alone(1), status;
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, thread_main, (void *)(intptr_t)(i + 1));
    bad += run_many(7, 20000);
    for (int i = 0; i < 3; i++) {
        void *r;
        pthread_join(t[i], &r);
        bad += (int)(intptr_t)r;
    }
    pid_t pid = fork();
    if (pid == 0)
        _exit(run_many(11, 2000) ? 3 : 0);
    waitpid(pid, &status, 0);
    printf("tasks run other than once: %d; forked child: exit %d; helpers: %d\n", bad,
           WIFEXITED(status) ? WEXITSTATUS(status) : -1, fbn_pool_helpers());
    return bad != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0;
}
