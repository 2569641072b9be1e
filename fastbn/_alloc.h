/* fastbn/_alloc.h -- the caching allocator behind fastbn's large outputs (see _alloc.pyx).
 *
 * Why: a new output above glibc's mmap threshold (dynamic, up to 32 MiB) is a fresh mapping in
 * every call, and its first touch costs a page fault and the kernel's zeroing per page: one more
 * write pass over the output than the kernel itself makes.  This allocator keeps the blocks of
 * dropped outputs, with their pages, and hands them to the next call of about the same size.
 *
 * It is a NumPy data memory handler (PyDataMem_Handler, NumPy >= 1.22): _alloc.pyx installs it
 * only around fastbn's own allocations of large outputs, and every array made under it keeps a
 * reference to it, so that NumPy frees (and reallocates) the array's memory through it later,
 * from whichever thread drops the array.
 *
 * Blocks: one anonymous mapping each, a multiple of the page size; the array's data starts one
 * page in, after the block's record.  Page-aligned data, not just 64-byte aligned: NumPy's large
 * inputs start 16 bytes into a page (glibc's mmap chunks), and an output 48 bytes further into its
 * page than the input made every store alias a load a few vectors ahead in the low 12 address bits
 * (4K aliasing): eval forwards of 0.5-2 MiB outputs took 1.14-1.18x the time into NumPy's own
 * arrays with the data at 64 bytes, 0.86-1.00x at a page (AMD EPYC Zen 4, 2 threads).
 * Blocks from FBN_ALLOC_HUGE_MIN on are aligned to and rounded up to 2 MiB and marked for
 * transparent huge pages (MADV_HUGEPAGE, as NumPy marks its own arrays from 4 MiB on, unless
 * NumPy's _set_madvise_hugepage(False) turned that off before fastbn's import): 16 MiB outputs took
 * 1.12-1.31x NumPy's time without, 0.84-1.06x with.
 * Requests under the pool's minimum size (NumPy may ask for any size while the handler is
 * installed, or reallocate an array smaller) are page-aligned heap blocks with the same record.
 *
 * The cache: the dropped blocks, most recently dropped first.  An allocation takes the smallest
 * cached block that holds it and wastes at most an eighth of it; a drop evicts the least
 * recently dropped blocks while the cache would exceed its limit: FBN_ALLOC_MULTIPLE times the
 * largest of the last FBN_ALLOC_RECENT allocations, and never more than max_cached (a fraction of
 * physical memory, set from Python).  One mutex guards it all; mmap and munmap run outside it.
 *
 * Debug mode (FASTBN_ALLOCATOR=debug): a cached block's data pages are filled with 0xdb and made
 * inaccessible (mprotect), so that a read or write of a dropped output crashes at once instead of
 * reading another output's data.
 *
 * POSIX only (mmap, pthreads); elsewhere FBN_ALLOC_POOL is 0 and fastbn uses NumPy's allocator.
 */
#ifndef FASTBN_ALLOC_H
#define FASTBN_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#define FBN_ALLOC_POOL 1
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif
#else
#define FBN_ALLOC_POOL 0
#endif

#define FBN_ALLOC_ALIGN 64          /* bytes at least (the data is page-aligned: see above) */
#define FBN_ALLOC_HUGE ((size_t)2 << 20)       /* a transparent huge page (x86-64, aarch64 with 4 KiB pages) */
#define FBN_ALLOC_HUGE_MIN ((size_t)4 << 20)   /* blocks from this size on: huge pages */
#define FBN_ALLOC_MULTIPLE 4        /* the cache holds up to this many times the largest recent request */
#define FBN_ALLOC_RECENT 16         /* ... among the last this many pool requests */
#define FBN_ALLOC_MAX_SLACK 8       /* a cached block serves a request of at least 1 - 1/8 of its size */
#define FBN_MAGIC_POOL 0x6662706f6f6c3136ULL   /* the record of a mapped block */
#define FBN_MAGIC_HEAP 0x6662686561703136ULL   /* the record of a small heap block */

typedef struct fbn_block {
    uint64_t magic;
    size_t size;                /* bytes of the mapping (pool) or of the heap block, record included */
    void *base;                 /* what mmap / posix_memalign returned */
    struct fbn_block *prev;     /* the cache's list, while cached */
    struct fbn_block *next;
} fbn_block;

typedef struct {
    int64_t hits, misses, releases, frees;
    int64_t bytes_in_use, blocks_in_use, peak_bytes_in_use;
    int64_t bytes_cached, blocks_cached;
    int64_t cache_limit;
} fbn_alloc_stats;

static struct {
    size_t offset;              /* record + padding before the data: a page */
    size_t page;
    int huge;                   /* mark blocks from FBN_ALLOC_HUGE_MIN on for huge pages */
    size_t min_bytes;           /* smaller requests take the heap */
    size_t max_cached;          /* the cache never holds more (set from Python) */
    int multiple;               /* FBN_ALLOC_MULTIPLE unless tests change it */
    int debug;
    size_t recent[FBN_ALLOC_RECENT];
    unsigned recent_next;
    fbn_block *head, *tail;     /* cached blocks, most recently dropped first */
    fbn_alloc_stats st;
#if FBN_ALLOC_POOL
    pthread_mutex_t m;
#endif
} fbn_alloc = {
    4096, 4096, 0, (size_t)1 << 20, (size_t)1 << 30, FBN_ALLOC_MULTIPLE, 0,
    {0}, 0, NULL, NULL, {0},
#if FBN_ALLOC_POOL
    PTHREAD_MUTEX_INITIALIZER,
#endif
};

#if FBN_ALLOC_POOL

static void fbn_alloc_lock(void) { pthread_mutex_lock(&fbn_alloc.m); }
static void fbn_alloc_unlock(void) { pthread_mutex_unlock(&fbn_alloc.m); }

/* fork() holds the mutex (pthread_atfork), so that the child never inherits it locked by a thread
 * that does not exist there, nor the cache's list half changed. */

static void fbn_alloc_init(int debug, int huge, size_t min_bytes, size_t max_cached)
{
    long page = sysconf(_SC_PAGESIZE);
    fbn_alloc.page = page >= FBN_ALLOC_ALIGN ? (size_t)page : 4096;
    fbn_alloc.debug = debug;
    fbn_alloc.offset = fbn_alloc.page;
#ifdef MADV_HUGEPAGE
    fbn_alloc.huge = huge && fbn_alloc.page < FBN_ALLOC_HUGE;
#else
    (void)huge;
#endif
    fbn_alloc.min_bytes = min_bytes;
    fbn_alloc.max_cached = max_cached;
    pthread_atfork(fbn_alloc_lock, fbn_alloc_unlock, fbn_alloc_unlock);
}

static inline fbn_block *fbn_record(void *p)
{
    return (fbn_block *)((char *)p - fbn_alloc.offset);
}

static inline void *fbn_data(fbn_block *b)
{
    return (char *)b->base + fbn_alloc.offset;
}

static void fbn_corrupt(const char *what, void *p)
{
    fprintf(stderr, "fastbn allocator: %s %p: not a block of fastbn's allocator (memory corruption)\n", what, p);
    abort();
}

/* The cache's limit now (mutex held). */
static size_t fbn_limit(void)
{
    size_t top = 0, limit;
    for (int i = 0; i < FBN_ALLOC_RECENT; i++)
        top = fbn_alloc.recent[i] > top ? fbn_alloc.recent[i] : top;
    limit = top * (size_t)fbn_alloc.multiple;
    return limit < fbn_alloc.max_cached ? limit : fbn_alloc.max_cached;
}

static void fbn_unlink(fbn_block *b)
{
    if (b->prev) b->prev->next = b->next; else fbn_alloc.head = b->next;
    if (b->next) b->next->prev = b->prev; else fbn_alloc.tail = b->prev;
    b->prev = b->next = NULL;
    fbn_alloc.st.bytes_cached -= (int64_t)b->size;
    fbn_alloc.st.blocks_cached--;
}

/* Evict the least recently dropped blocks until `room` more bytes fit under the limit (mutex
 * held); returns them as a list (through ->next) for fbn_release_list after unlocking. */
static fbn_block *fbn_evict(size_t room, size_t limit)
{
    fbn_block *out = NULL, *b;
    while (fbn_alloc.tail && (size_t)fbn_alloc.st.bytes_cached + room > limit) {
        b = fbn_alloc.tail;
        fbn_unlink(b);
        b->next = out;
        out = b;
        fbn_alloc.st.releases++;
    }
    return out;
}

static void fbn_release_list(fbn_block *b)
{
    fbn_block *next;
    while (b) {
        next = b->next;
        munmap(b->base, b->size);
        b = next;
    }
}

static void fbn_note_stats_in_use(int64_t bytes, int64_t blocks)
{
    fbn_alloc.st.bytes_in_use += bytes;
    fbn_alloc.st.blocks_in_use += blocks;
    if (fbn_alloc.st.bytes_in_use > fbn_alloc.st.peak_bytes_in_use)
        fbn_alloc.st.peak_bytes_in_use = fbn_alloc.st.bytes_in_use;
}

/* A new mapping of `need` bytes (2 MiB-aligned and marked for huge pages where need is a multiple
 * of 2 MiB and huge pages are on), or NULL. */
static void *fbn_map(size_t need)
{
    char *p, *aligned;
    size_t extra;
    int huge = fbn_alloc.huge && need >= FBN_ALLOC_HUGE_MIN;
    extra = huge ? FBN_ALLOC_HUGE - fbn_alloc.page : 0;
    p = (char *)mmap(NULL, need + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == (char *)MAP_FAILED)
        return NULL;
    if (!huge)
        return p;
    aligned = (char *)(((uintptr_t)p + FBN_ALLOC_HUGE - 1) & ~(uintptr_t)(FBN_ALLOC_HUGE - 1));
    if (aligned > p)
        munmap(p, (size_t)(aligned - p));
    if (aligned + need < p + need + extra)
        munmap(aligned + need, (size_t)(p + need + extra - (aligned + need)));
#ifdef MADV_HUGEPAGE
    madvise(aligned, need, MADV_HUGEPAGE);
#endif
    return aligned;
}

/* The bytes of the block for `size` bytes of data: whole pages, whole huge pages from
 * FBN_ALLOC_HUGE_MIN on (where huge pages are on). */
static size_t fbn_block_size(size_t size)
{
    size_t need = (fbn_alloc.offset + size + fbn_alloc.page - 1) / fbn_alloc.page * fbn_alloc.page;
    if (fbn_alloc.huge && need >= FBN_ALLOC_HUGE_MIN)
        need = (need + FBN_ALLOC_HUGE - 1) / FBN_ALLOC_HUGE * FBN_ALLOC_HUGE;
    return need;
}

/* A data pointer of at least `size` bytes; *fresh: its pages come straight from the OS (zeros). */
static void *fbn_alloc_take(size_t size, int *fresh)
{
    fbn_block *b, *best = NULL, *evicted;
    size_t need, slack;
    void *base;
    *fresh = 0;
    if (size > SIZE_MAX / 2)
        return NULL;
    if (size < fbn_alloc.min_bytes) {  /* a heap block with the same record */
        need = fbn_alloc.offset + (size ? size : 1);
        if (posix_memalign(&base, fbn_alloc.offset, need) != 0)
            return NULL;
        b = (fbn_block *)base;
        b->magic = FBN_MAGIC_HEAP;
        b->size = need;
        b->base = base;
        b->prev = b->next = NULL;
        return fbn_data(b);
    }
    need = fbn_block_size(size);
    slack = need / FBN_ALLOC_MAX_SLACK;
    fbn_alloc_lock();
    fbn_alloc.recent[fbn_alloc.recent_next++ % FBN_ALLOC_RECENT] = need;
    for (b = fbn_alloc.head; b; b = b->next)
        if (b->size >= need && b->size - need <= slack && (!best || b->size < best->size))
            best = b;
    if (best) {
        fbn_unlink(best);
        fbn_alloc.st.hits++;
        fbn_note_stats_in_use((int64_t)best->size, 1);
        fbn_alloc_unlock();
        if (fbn_alloc.debug)
            mprotect((char *)best->base + fbn_alloc.offset, best->size - fbn_alloc.offset, PROT_READ | PROT_WRITE);
        return fbn_data(best);
    }
    fbn_alloc.st.misses++;
    fbn_alloc_unlock();
    base = fbn_map(need);
    if (base == NULL) {  /* give the cache back to the OS and try once more */
        fbn_alloc_lock();
        evicted = fbn_evict(SIZE_MAX / 2, 0);
        fbn_alloc_unlock();
        fbn_release_list(evicted);
        base = fbn_map(need);
        if (base == NULL)
            return NULL;
    }
    b = (fbn_block *)base;
    b->magic = FBN_MAGIC_POOL;
    b->size = need;
    b->base = base;
    b->prev = b->next = NULL;
    fbn_alloc_lock();
    fbn_note_stats_in_use((int64_t)need, 1);
    fbn_alloc_unlock();
    *fresh = 1;
    return fbn_data(b);
}

static void fbn_alloc_give(void *p)
{
    fbn_block *b, *evicted = NULL;
    size_t limit;
    if (p == NULL)
        return;
    b = fbn_record(p);
    if (b->magic == FBN_MAGIC_HEAP) {
        b->magic = 0;
        free(b->base);
        return;
    }
    if (b->magic != FBN_MAGIC_POOL || b->base != (void *)b)
        fbn_corrupt("free of", p);
    fbn_alloc_lock();
    fbn_alloc.st.frees++;
    fbn_note_stats_in_use(-(int64_t)b->size, -1);
    limit = fbn_limit();
    if (b->size > limit) {  /* too large to keep */
        fbn_alloc.st.releases++;
        fbn_alloc_unlock();
        munmap(b->base, b->size);
        return;
    }
    evicted = fbn_evict(b->size, limit);
    if (fbn_alloc.debug) {  /* poison and protect before another thread can take it */
        memset(fbn_data(b), 0xdb, b->size - fbn_alloc.offset);
        mprotect(fbn_data(b), b->size - fbn_alloc.offset, PROT_NONE);
    }
    b->prev = NULL;
    b->next = fbn_alloc.head;
    if (fbn_alloc.head) fbn_alloc.head->prev = b; else fbn_alloc.tail = b;
    fbn_alloc.head = b;
    fbn_alloc.st.bytes_cached += (int64_t)b->size;
    fbn_alloc.st.blocks_cached++;
    fbn_alloc_unlock();
    fbn_release_list(evicted);
}

/* Bytes the data of the block at p can hold. */
static size_t fbn_alloc_usable(void *p)
{
    fbn_block *b = fbn_record(p);
    if (b->magic != FBN_MAGIC_POOL && b->magic != FBN_MAGIC_HEAP)
        fbn_corrupt("realloc of", p);
    return b->size - fbn_alloc.offset;
}

/* Give every cached block back to the OS; returns the bytes released. */
static int64_t fbn_alloc_empty(void)
{
    fbn_block *evicted;
    int64_t bytes;
    fbn_alloc_lock();
    bytes = fbn_alloc.st.bytes_cached;
    evicted = fbn_evict(SIZE_MAX / 2, 0);
    fbn_alloc_unlock();
    fbn_release_list(evicted);
    return bytes;
}

static void fbn_alloc_get_stats(fbn_alloc_stats *out)
{
    fbn_alloc_lock();
    *out = fbn_alloc.st;
    out->cache_limit = (int64_t)fbn_limit();
    fbn_alloc_unlock();
}

static void fbn_alloc_settings(size_t *max_cached, int *multiple)
{
    fbn_alloc_lock();
    *max_cached = fbn_alloc.max_cached;
    *multiple = fbn_alloc.multiple;
    fbn_alloc_unlock();
}

/* Tests: change the minimum pool size, the cap and the multiple (0: keep), forget the recent sizes. */
static void fbn_alloc_configure(size_t min_bytes, size_t max_cached, int multiple, int forget)
{
    fbn_alloc_lock();
    if (min_bytes) fbn_alloc.min_bytes = min_bytes;
    if (max_cached) fbn_alloc.max_cached = max_cached;
    if (multiple > 0) fbn_alloc.multiple = multiple;
    if (forget) memset(fbn_alloc.recent, 0, sizeof(fbn_alloc.recent));
    fbn_alloc_unlock();
}

/* ------------------------------------------------------------------ NumPy's handler functions */
static void *fbn_np_malloc(void *ctx, size_t size)
{
    int fresh;
    (void)ctx;
    return fbn_alloc_take(size, &fresh);
}

static void *fbn_np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    int fresh;
    void *p;
    (void)ctx;
    if (elsize && nelem > SIZE_MAX / elsize)
        return NULL;
    p = fbn_alloc_take(nelem * elsize, &fresh);
    if (p && !fresh)  /* a recycled block holds an old output; a fresh mapping is zeros already */
        memset(p, 0, nelem * elsize);
    return p;
}

static void *fbn_np_realloc(void *ctx, void *p, size_t size)
{
    int fresh;
    size_t have;
    void *q;
    (void)ctx;
    if (p == NULL)
        return fbn_alloc_take(size, &fresh);
    have = fbn_alloc_usable(p);
    /* keep a block that still fits and is not mostly wasted, as realloc would */
    if (size <= have && (size >= have / 2 || fbn_record(p)->magic == FBN_MAGIC_HEAP) &&
            (size >= fbn_alloc.min_bytes || fbn_record(p)->magic == FBN_MAGIC_HEAP))
        return p;
    q = fbn_alloc_take(size, &fresh);
    if (q == NULL)
        return NULL;  /* p stays valid, as realloc's contract says */
    memcpy(q, p, size < have ? size : have);
    fbn_alloc_give(p);
    return q;
}

static void fbn_np_free(void *ctx, void *p, size_t size)
{
    (void)ctx;
    (void)size;  /* the record knows; NumPy's size can be smaller (a shrinking realloc kept the block) */
    fbn_alloc_give(p);
}

#else  /* no pool: these are never installed */

static void fbn_alloc_init(int debug, int huge, size_t min_bytes, size_t max_cached) { (void)debug; (void)huge; (void)min_bytes; (void)max_cached; }
static int64_t fbn_alloc_empty(void) { return 0; }
static void fbn_alloc_get_stats(fbn_alloc_stats *out) { memset(out, 0, sizeof(*out)); }
static void fbn_alloc_configure(size_t a, size_t b, int c, int d) { (void)a; (void)b; (void)c; (void)d; }
static void fbn_alloc_settings(size_t *max_cached, int *multiple) { *max_cached = 0; *multiple = 0; }
static void *fbn_np_malloc(void *ctx, size_t size) { (void)ctx; return malloc(size ? size : 1); }
static void *fbn_np_calloc(void *ctx, size_t n, size_t s) { (void)ctx; return calloc(n ? n : 1, s ? s : 1); }
static void *fbn_np_realloc(void *ctx, void *p, size_t size) { (void)ctx; return realloc(p, size ? size : 1); }
static void fbn_np_free(void *ctx, void *p, size_t size) { (void)ctx; (void)size; free(p); }

#endif  /* FBN_ALLOC_POOL */

#endif  /* FASTBN_ALLOC_H */
