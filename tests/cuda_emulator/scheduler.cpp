/* The thread scheduler of the CUDA emulator: runs a kernel's blocks one after another, and the
 * threads of a block as fibers on the calling OS thread.
 *
 * Each CUDA thread is a fiber with its own 128 KiB stack, started with makecontext/setcontext and
 * switched with _setjmp/_longjmp (no signal-mask system call per switch).  A fiber runs until it
 * reaches a barrier, then jumps back to the scheduler; the scheduler sweeps the fibers in thread
 * order and resumes every fiber whose barrier has since been passed by all the threads it waits
 * for.  The barriers: [0] the block (__syncthreads), [1 + w] warp w (each side of a shuffle).
 * A sweep that resumes nobody while some fibers are unfinished is a deadlock: the block is
 * abandoned and the launch returns 1, instead of hanging.
 *
 * The order is deterministic (thread 0 first at every step), which is one legal schedule among
 * many on a GPU: see README.md for what this can and cannot find. */
#include <csetjmp>
#include <cstdlib>
#include <ucontext.h>
#include <vector>

#include "cuda_builtins.h"
#include "launch.h"

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

struct emu_barrier {
    unsigned expected, arrived, generation;
};

struct emu_fiber {
    ucontext_t ctx;
    jmp_buf jb;    /* where the fiber resumes after a barrier */
    unsigned tid;  /* threadIdx.x + threadIdx.y * blockDim.x */
    bool started, done;
    int wait;      /* the barrier it waits at, or -1 */
    unsigned gen;  /* that barrier's generation when it arrived */
};

std::vector<emu_barrier> bars;
std::vector<emu_fiber> fibers;
jmp_buf sched;       /* where a fiber returns to the scheduler */
emu_fiber *cur;      /* the fiber running now */
double shfl[32][32]; /* [warp][lane]: the values being exchanged by a shuffle */
void (*body)(void *);
void *body_arg;

/* Arrives at barrier b, then hands control back to the scheduler until the barrier is passed. */
void wait_at(int b)
{
    emu_barrier &bar = bars[b];
    cur->wait = b;
    cur->gen = bar.generation;
    if (++bar.arrived == bar.expected) {
        bar.arrived = 0;
        bar.generation++;
    }
    if (!_setjmp(cur->jb))
        _longjmp(sched, 1);
}

void trampoline()
{
    body(body_arg);
    cur->done = true;
    _longjmp(sched, 1);
}

} // namespace

void __syncthreads() { wait_at(0); }

double __shfl_down_sync(unsigned mask, double v, int offset)
{
    unsigned t = cur->tid, w = t / 32, l = t % 32;
    if (mask != 0xffffffffu)
        abort();
    shfl[w][l] = v;
    wait_at(1 + w); /* every lane has written */
    double r = l + offset < 32 ? shfl[w][l + offset] : v;
    wait_at(1 + w); /* every lane has read: the next shuffle may write */
    return r;
}

int emu_run_grid(void (*f)(void *), void *arg, unsigned gx, unsigned gy, unsigned bx, unsigned by)
{
    const size_t stack = 128 * 1024;
    static std::vector<char> stacks; /* reused: allocating and faulting in stacks per launch is slow */
    body = f;
    body_arg = arg;
    blockDim = {bx, by, 1};
    gridDim = {gx, gy, 1};
    unsigned nt = bx * by;
    if (stacks.size() < (size_t)nt * stack)
        stacks.resize((size_t)nt * stack);
    fibers.assign(nt, emu_fiber{});
    ucontext_t proto;
    getcontext(&proto);
    for (unsigned y = 0; y < gy; y++)
        for (unsigned x = 0; x < gx; x++) {
            blockIdx = {x, y, 0};
            bars.assign(1 + nt / 32, emu_barrier{32, 0, 0});
            bars[0].expected = nt;
            for (unsigned t = 0; t < nt; t++) {
                emu_fiber &fb = fibers[t];
                fb.tid = t;
                fb.started = fb.done = false;
                fb.wait = -1;
                fb.ctx = proto;
                fb.ctx.uc_stack.ss_sp = stacks.data() + (size_t)t * stack;
                fb.ctx.uc_stack.ss_size = stack;
                fb.ctx.uc_link = nullptr;
                makecontext(&fb.ctx, trampoline, 0);
            }
            for (unsigned left = nt; left;) {
                bool progress = false;
                for (emu_fiber &fb : fibers) {
                    if (fb.done || (fb.wait >= 0 && bars[fb.wait].generation == fb.gen))
                        continue;
                    fb.wait = -1;
                    threadIdx = {fb.tid % bx, fb.tid / bx, 0};
                    cur = &fb;
                    if (!_setjmp(sched)) {
                        if (!fb.started) {
                            fb.started = true;
                            setcontext(&fb.ctx);
                        }
                        _longjmp(fb.jb, 1);
                    }
                    progress = true;
                    left -= fb.done;
                }
                if (!progress)
                    return 1;
            }
        }
    return 0;
}
