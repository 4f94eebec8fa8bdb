/* The worker pool.  Workers sleep on a condition variable between loops and spin briefly after
 * one, so that the back-to-back loops of a forward call do not pay a full wake-up each. */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#define MM_SPIN 4000

struct mm_pool {
    int threads;
    pthread_t *workers;
    pthread_mutex_t use;            /* held by the caller for a whole forward */
    pthread_mutex_t lock;           /* protects the fields below */
    pthread_cond_t wake, done;
    atomic_uint_fast64_t generation;
    int stopping;
    /* the current loop */
    mm_task_fn fn;
    void *arg;
    int64_t items;
    int participants;               /* workers taking part, caller included */
    atomic_int_fast64_t next;
    int pending;                    /* participating workers not yet finished */
};

typedef struct mm_worker_start {
    mm_pool *pool;
    int index;
} mm_worker_start;

static void mm_pool_work(mm_pool *pool, int worker)
{
    for (;;) {
        int64_t i = atomic_fetch_add(&pool->next, 1);
        if (i >= pool->items) break;
        pool->fn(pool->arg, i, worker);
    }
}

static void *mm_worker_main(void *start_arg)
{
    mm_worker_start start = *(mm_worker_start *)start_arg;
    free(start_arg);
    mm_pool *pool = start.pool;
    uint_fast64_t seen = 0;
    for (;;) {
        /* spin a little for the next loop, then sleep */
        for (int s = 0; s < MM_SPIN && atomic_load(&pool->generation) == seen; ++s) sched_yield();
        pthread_mutex_lock(&pool->lock);
        while (atomic_load(&pool->generation) == seen && !pool->stopping) pthread_cond_wait(&pool->wake, &pool->lock);
        if (pool->stopping) {
            pthread_mutex_unlock(&pool->lock);
            return NULL;
        }
        seen = atomic_load(&pool->generation);
        int take_part = start.index < pool->participants;
        pthread_mutex_unlock(&pool->lock);
        if (!take_part) continue;
        mm_pool_work(pool, start.index);
        pthread_mutex_lock(&pool->lock);
        if (--pool->pending == 0) pthread_cond_signal(&pool->done);
        pthread_mutex_unlock(&pool->lock);
    }
}

mm_pool *mm_pool_create(int threads)
{
    if (threads < 1) threads = 1;
    mm_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->threads = threads;
    pthread_mutex_init(&pool->use, NULL);
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->next, 0);
    pool->workers = calloc((size_t)threads, sizeof *pool->workers);
    if (!pool->workers) {
        mm_pool_destroy(pool);
        return NULL;
    }
    for (int w = 1; w < threads; ++w) {
        mm_worker_start *start = malloc(sizeof *start);
        if (!start || (start->pool = pool, start->index = w,
                       pthread_create(&pool->workers[w], NULL, mm_worker_main, start) != 0)) {
            free(start);
            pool->threads = w;          /* destroy joins the ones that started */
            mm_pool_destroy(pool);
            return NULL;
        }
    }
    return pool;
}

void mm_pool_destroy(mm_pool *pool)
{
    if (!pool) return;
    pthread_mutex_lock(&pool->lock);
    pool->stopping = 1;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    for (int w = 1; w < pool->threads && pool->workers; ++w) pthread_join(pool->workers[w], NULL);
    free(pool->workers);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    pthread_mutex_destroy(&pool->lock);
    pthread_mutex_destroy(&pool->use);
    free(pool);
}

int mm_pool_threads(const mm_pool *pool) { return pool->threads; }

void mm_pool_acquire(mm_pool *pool) { pthread_mutex_lock(&pool->use); }

void mm_pool_release(mm_pool *pool) { pthread_mutex_unlock(&pool->use); }

void mm_pool_run(mm_pool *pool, int64_t items, int workers, mm_task_fn fn, void *arg)
{
    if (items <= 0) return;
    if (workers < 1 || workers > pool->threads) workers = pool->threads;
    if (workers > items) workers = (int)items;
    if (workers == 1) {
        for (int64_t i = 0; i < items; ++i) fn(arg, i, 0);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    pool->fn = fn;
    pool->arg = arg;
    pool->items = items;
    pool->participants = workers;
    pool->pending = workers - 1;
    atomic_store(&pool->next, 0);
    atomic_fetch_add(&pool->generation, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    mm_pool_work(pool, 0);
    pthread_mutex_lock(&pool->lock);
    while (pool->pending > 0) pthread_cond_wait(&pool->done, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}
