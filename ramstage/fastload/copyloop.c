/* The fast loader's copy loop in C: the same pipeline as pipeline.Ring's Python loop, with no
 * Python (and no GIL) between one read and the next.
 *
 * Threads take the chunks in order, each a free ring slot: wait for the slot's last copy to
 * leave it (its event), pread(2) the chunk into it, issue each piece's host-to-device copy on
 * the one copy stream, record the slot's event, and free the slot. Slots become usable as the
 * ring's preparing thread hands them over: *ready counts them, in slot order.
 *
 * The chunks are cut from the segments (sorted by file and offset) as the threads take them,
 * as pipeline.plan_chunks cuts them for the Python loop: segments close enough together share
 * a read, and long ones are split. Cut in Python, a 4 GiB load's 500-1400 chunks took 2.5-3.4
 * ms before its first read (one H100).
 *
 * Without driver entry points (cuda.copy NULL), the pieces are copied with memcpy: the
 * pipeline with the CPU as its target, which the tests run where there is no GPU.
 *
 * Built as ramstage/fastload/_copyloop*.so where a C compiler was at hand (setup.py) and loaded
 * with ctypes (native.py); it uses no Python API. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int (*copy_fn)(uint64_t dst, const void *src, size_t nbytes, void *stream);
typedef int (*record_fn)(void *event, void *stream);
typedef int (*event_fn)(void *event);
typedef int (*context_fn)(void *context);
typedef int (*pop_fn)(void **context);

/* cuMemcpyHtoDAsync_v2, cuEventRecord, cuEventSynchronize, cuCtxSetCurrent,
 * cuCtxPushCurrent_v2 and cuCtxPopCurrent_v2, as ctypes found them in libcuda.so.1, with the
 * device's primary context, the copy stream and one event per slot. */
struct rs_cuda {
    copy_fn copy;
    record_fn record;
    event_fn synchronize;
    context_fn set_context;
    context_fn push_context;
    pop_fn pop_context;
    void *context;
    void *stream;
    void *const *events;
};

/* nbytes of the file open as fd, from file_offset, go to device (or host) address target. */
struct rs_segment {
    int64_t fd;
    uint64_t file_offset, nbytes, target;
};

struct rs_piece {
    uint64_t chunk_offset, target, nbytes;
};

/* One read into a slot, then its pieces (at most one per segment) copied out. */
struct rs_chunk {
    int64_t fd;
    uint64_t file_offset, nbytes, count;
    struct rs_piece *pieces;
};

/* What went wrong first: kind 1 a read failed (code: errno), 2 the file ended (at offset), 3
 * a driver call failed (code: its CUresult). */
struct rs_error {
    int64_t kind, code, offset;
};

struct rs_job {
    const struct rs_segment *segments;
    int64_t segment_count;
    uint64_t chunk_bytes, max_gap; /* a read's most bytes; the most read along between two */
    const uint64_t *slots; /* each slot's address, chunk_bytes long */
    int64_t slot_count;
    const volatile int32_t *ready; /* slots handed over so far, in order (one writer) */
    const struct rs_cuda *cuda;
    struct rs_error *error;
    char *recorded;
    int *free_slots; /* a queue, oldest first: its copy is the likeliest to have left */
    int64_t free_first, free_count, known_ready;
    int64_t next_segment;   /* the first segment not wholly taken, */
    uint64_t next_done;     /* and how many of its bytes are */
    pthread_mutex_t lock;
};

static void fail(struct rs_job *job, int64_t kind, int64_t code, int64_t offset) {
    pthread_mutex_lock(&job->lock);
    if (job->error->kind == 0) {
        __atomic_store_n(&job->error->kind, kind, __ATOMIC_RELAXED);
        job->error->code = code;
        job->error->offset = offset;
    }
    pthread_mutex_unlock(&job->lock);
}

/* Under the lock: a free slot to the queue's end. */
static void put(struct rs_job *job, int slot) {
    job->free_slots[(job->free_first + job->free_count++) % job->slot_count] = slot;
}

/* Under the lock: the next chunk, from where the last one ended. A segment joins it if it is
 * of the same file, starts at or after the chunk's end, at most max_gap bytes later, and before
 * the chunk is full; a segment longer than what is left goes on in the next chunk. */
static void cut(struct rs_job *job, struct rs_chunk *chunk) {
    const struct rs_segment *segment = &job->segments[job->next_segment];
    uint64_t begin = segment->file_offset + job->next_done, end = begin;
    chunk->fd = segment->fd;
    chunk->file_offset = begin;
    chunk->count = 0;
    for (;;) {
        uint64_t start = segment->file_offset + job->next_done;
        uint64_t n = segment->nbytes - job->next_done;
        if (n > begin + job->chunk_bytes - start)
            n = begin + job->chunk_bytes - start;
        chunk->pieces[chunk->count++] =
            (struct rs_piece){start - begin, segment->target + job->next_done, n};
        end = start + n;
        job->next_done += n;
        if (job->next_done < segment->nbytes)
            break; /* the chunk is full */
        job->next_done = 0;
        if (++job->next_segment == job->segment_count)
            break;
        segment++;
        if (segment->fd != chunk->fd || segment->file_offset < end ||
            segment->file_offset > end + job->max_gap ||
            segment->file_offset >= begin + job->chunk_bytes)
            break;
    }
    chunk->nbytes = end - begin;
}

/* The next chunk and a free slot for it: 0, or -1 when done or failed. Slots handed over since
 * the last look join the free ones; none free, it waits a little. */
static int take(struct rs_job *job, struct rs_chunk *chunk, int *slot) {
    const struct timespec pause = {0, 20000};
    pthread_mutex_lock(&job->lock);
    for (;;) {
        if (job->error->kind != 0 || job->next_segment == job->segment_count) { /* locked */
            pthread_mutex_unlock(&job->lock);
            return -1;
        }
        int64_t ready = __atomic_load_n(job->ready, __ATOMIC_ACQUIRE);
        while (job->known_ready < ready && job->known_ready < job->slot_count)
            put(job, (int)job->known_ready++);
        if (job->free_count > 0)
            break;
        pthread_mutex_unlock(&job->lock);
        nanosleep(&pause, NULL); /* every slot in use: one frees as its copy is waited for */
        pthread_mutex_lock(&job->lock);
    }
    *slot = job->free_slots[job->free_first];
    job->free_first = (job->free_first + 1) % job->slot_count;
    job->free_count--;
    cut(job, chunk);
    pthread_mutex_unlock(&job->lock);
    return 0;
}

static void give_back(struct rs_job *job, int slot, char recorded) {
    pthread_mutex_lock(&job->lock);
    job->recorded[slot] = recorded;
    put(job, slot);
    pthread_mutex_unlock(&job->lock);
}

static int read_chunk(struct rs_job *job, const struct rs_chunk *chunk, char *memory) {
    uint64_t done = 0;
    while (done < chunk->nbytes) {
        ssize_t n = pread((int)chunk->fd, memory + done, chunk->nbytes - done,
                          (off_t)(chunk->file_offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            fail(job, 1, errno, (int64_t)(chunk->file_offset + done));
            return -1;
        }
        if (n == 0) {
            fail(job, 2, 0, (int64_t)(chunk->file_offset + done));
            return -1;
        }
        done += (uint64_t)n;
    }
    return 0;
}

/* The pieces to their targets; on a GPU, then the slot's event. */
static int copy_chunk(struct rs_job *job, const struct rs_chunk *chunk, const char *memory,
                      int slot) {
    const struct rs_cuda *cuda = job->cuda;
    for (uint64_t i = 0; i < chunk->count; i++) {
        const struct rs_piece *piece = &chunk->pieces[i];
        const char *source = memory + piece->chunk_offset;
        if (cuda == NULL) {
            memcpy((void *)(uintptr_t)piece->target, source, piece->nbytes);
            continue;
        }
        int error = cuda->copy(piece->target, source, piece->nbytes, cuda->stream);
        if (error != 0) {
            fail(job, 3, error, (int64_t)chunk->file_offset);
            return -1;
        }
    }
    if (cuda != NULL) {
        int error = cuda->record(job->cuda->events[slot], cuda->stream);
        if (error != 0) {
            fail(job, 3, error, (int64_t)chunk->file_offset);
            return -1;
        }
    }
    return 0;
}

static int failed(struct rs_job *job) {
    return __atomic_load_n(&job->error->kind, __ATOMIC_RELAXED) != 0;
}

/* Takes chunks until none is left or one failed. */
static void work(struct rs_job *job) {
    const struct rs_cuda *cuda = job->cuda;
    struct rs_chunk chunk = {.pieces = malloc((size_t)job->segment_count * sizeof *chunk.pieces)};
    if (chunk.pieces == NULL) {
        fail(job, 1, ENOMEM, 0);
        return;
    }
    int slot;
    while (take(job, &chunk, &slot) == 0) {
        char *memory = (char *)(uintptr_t)job->slots[slot];
        char recorded = 0;
        if (job->recorded[slot]) {
            int error = cuda->synchronize(cuda->events[slot]); /* its last copy has left it */
            if (error != 0)
                fail(job, 3, error, (int64_t)chunk.file_offset);
        }
        if (!failed(job) && read_chunk(job, &chunk, memory) == 0)
            recorded = copy_chunk(job, &chunk, memory, slot) == 0 && cuda != NULL;
        give_back(job, slot, recorded);
    }
    free(chunk.pieces);
}

/* A started thread: the device's context current in it first. */
static void *start(void *argument) {
    struct rs_job *job = argument;
    const struct rs_cuda *cuda = job->cuda;
    int error = cuda != NULL ? cuda->set_context(cuda->context) : 0;
    if (error != 0)
        fail(job, 3, error, 0);
    else
        work(job);
    return NULL;
}

/* Copies every segment (at least one, none empty; sorted by file and offset) through
 * `threads` threads, the caller's among them, in reads of at most chunk_bytes (a slot's size),
 * and returns once all are read and their copies issued (the caller synchronizes the stream);
 * 0, or -1 with *error set. Named for its arguments: a build of another version's loop, left in
 * place, lacks the name and is not called with these (native.py). */
int rs_copy_segments(int32_t threads, const struct rs_segment *segments, int64_t segment_count,
                     uint64_t chunk_bytes, uint64_t max_gap, const uint64_t *slots,
                     int64_t slot_count, const volatile int32_t *ready,
                     const struct rs_cuda *cuda, struct rs_error *error) {
    struct rs_job job = {
        .segments = segments,
        .segment_count = segment_count,
        .chunk_bytes = chunk_bytes,
        .max_gap = max_gap,
        .slots = slots,
        .slot_count = slot_count,
        .ready = ready,
        .cuda = cuda,
        .error = error,
    };
    memset(error, 0, sizeof *error);
    job.recorded = calloc((size_t)slot_count, 1);
    job.free_slots = calloc((size_t)slot_count, sizeof *job.free_slots);
    pthread_t *started = calloc((size_t)threads, sizeof *started);
    if (job.recorded == NULL || job.free_slots == NULL || started == NULL) {
        error->kind = 1;
        error->code = ENOMEM;
    }
    /* The caller works too, in the device's context pushed for the call: its own stays. */
    int push_error = cuda != NULL && error->kind == 0 ? cuda->push_context(cuda->context) : 0;
    if (push_error != 0) {
        error->kind = 3;
        error->code = push_error;
    }
    int count = 0;
    if (error->kind == 0) {
        pthread_mutex_init(&job.lock, NULL);
        /* Threads that cannot be started leave their share to the others, the caller's too. */
        while (count < threads - 1 && pthread_create(&started[count], NULL, start, &job) == 0)
            count++;
        work(&job);
        for (int i = 0; i < count; i++)
            pthread_join(started[i], NULL);
        for (int64_t i = 0; cuda != NULL && i < slot_count; i++)
            if (job.recorded[i])
                cuda->synchronize(cuda->events[i]);
        pthread_mutex_destroy(&job.lock);
        if (cuda != NULL) {
            void *popped;
            cuda->pop_context(&popped);
        }
    }
    free(job.recorded);
    free(job.free_slots);
    free(started);
    return error->kind == 0 ? 0 : -1;
}
