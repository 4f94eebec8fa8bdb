/* A persistent worker pool: `threads - 1` workers plus the calling thread. */
#ifndef MM_POOL_H
#define MM_POOL_H

#include <stdint.h>

typedef struct mm_pool mm_pool;
/* Called for every item of a parallel loop; `worker` is 0..threads-1 (0 = the caller). */
typedef void (*mm_task_fn)(void *arg, int64_t item, int worker);

mm_pool *mm_pool_create(int threads);       /* NULL if out of memory or threads cannot start */
void mm_pool_destroy(mm_pool *pool);
int mm_pool_threads(const mm_pool *pool);
/* Exclusive use of the pool for a sequence of loops (one forward call). */
void mm_pool_acquire(mm_pool *pool);
void mm_pool_release(mm_pool *pool);
/* Run fn(arg, i, worker) for i in [0, items) on at most `workers` threads and wait for all.
 * Items are handed out dynamically.  Must be called between acquire and release. */
void mm_pool_run(mm_pool *pool, int64_t items, int workers, mm_task_fn fn, void *arg);

#endif
