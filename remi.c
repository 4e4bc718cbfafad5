/* remi.c - REMI (Xie et al., "Rethinking Multi-Interest Learning for Candidate Matching
 * in Recommender Systems", RecSys 2023) in one C file.
 *
 * A multi-interest encoder (ComiRec-SA self-attention, ComiRec-DR or MIND capsule routing;
 * DNN, GRU4Rec and Pop as single-vector baselines) turns a user's history into K
 * interest vectors; training is sampled softmax over shared uniform negatives, with
 * REMI's two changes: interest-aware hard negatives (IHN, --rbeta) and routing
 * regularisation (RR, --rlambda). Evaluation retrieves the top-N items of every interest
 * over the whole catalogue and scores Recall, NDCG and HitRate.
 *
 * Every formula follows REMI-SPEC (the specification of the authors' released code);
 * comments cite its sections, e.g. "REMI-SPEC d.4".
 *
 * What it deliberately is not: no BLAS, no OpenMP, no autodiff graph. The hot loops are one
 * register-tiled gemm (GCC vector extensions) and loops written so the compiler vectorises
 * them, with vector extensions where it would not (the sampled softmax's maxima and sums, the
 * evaluation's threshold tests); intrinsics only for the fused multiply-add of `make FMA=1`
 * and, with AVX-512, the evaluation's comparison masks (reach_bits). The gemm has a scalar
 * twin that the self-test compares it against. Every sum runs in a
 * fixed order, without fused multiply-adds (or with them in every sum of products, built
 * with FMA=1), so results depend neither on the thread count nor on the vector width.
 *
 * Dimensions: B batch, L history length, D hidden, H = 4D, K interests,
 * M sampled negatives, N items (id 0 = padding), U users. */
#define _GNU_SOURCE
#include "remi.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <ftw.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#if (defined(REMI_FMA) && (defined(__FMA__) || defined(__AVX512F__))) || defined(__AVX512VL__)
#include <immintrin.h>
#endif

/* ======================================================================== gcc and clang
 * What the two compilers spell differently, in one place. */
#if defined(__clang__) && defined(__AVX512F__)
/* clang computes 16-float vectors as two 8-float halves where the target prefers 256-bit
 * vectors (Intel's cores) unless the function asks for 512: every function asks (popped at
 * the end of the file), so that clang's build runs the kernels (and measures the FMA peak)
 * at AVX-512's width, as gcc's */
#pragma clang attribute push(__attribute__((min_vector_width(512))), apply_to = function)
#define REMI_CLANG_WIDE
#endif
#if defined(__SANITIZE_ADDRESS__) /* an AddressSanitizer build: gcc's mark, then clang's */
#define REMI_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define REMI_ASAN 1
#endif
#endif
#if defined(__clang__)
#define NOIPA __attribute__((noinline))                       /* clang has no noipa */
#define TILE_INLINE inline __attribute__((always_inline))     /* see gemm_tile_full */
#define CONTRACT_ATTR                                         /* contraction: see fma_task */
#define CONTRACT_BODY _Pragma("clang fp contract(fast)")
#else
#define NOIPA __attribute__((noipa))
#define TILE_INLINE
#define CONTRACT_ATTR __attribute__((optimize("fp-contract=fast")))
#define CONTRACT_BODY
#endif

/* ======================================================================== utilities */

/* Output files in progress: die() removes them, so no half-written file survives. */
#define MAX_PENDING 16
static struct { FILE *f; char tmp[4096]; char path[4096]; } pending[MAX_PENDING];

void die(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs("remi: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    for (int i = 0; i < MAX_PENDING; i++)
        if (pending[i].f) { fclose(pending[i].f); unlink(pending[i].tmp); pending[i].f = NULL; }
    exit(1);
}

/* The temporary files being written, removed; signal-safe (unlink only). */
static void unlink_pending(void) {
    for (int i = 0; i < MAX_PENDING; i++)
        if (pending[i].f) unlink(pending[i].tmp);
}
/* SIGINT, SIGTERM, SIGHUP or SIGPIPE (output piped to a reader that quit, `| head`; unless
 * train's loop takes SIGINT and SIGTERM over, on_stop_signal): the files being written are
 * removed, and the process ends as the signal would have ended it. A signal the process was
 * started with ignored stays ignored. */
static void on_fatal_signal(int sig) {
    unlink_pending();
    signal(sig, SIG_DFL);
    raise(sig);
}
static void catch_fatal_signals(void) {
    const int sigs[4] = { SIGINT, SIGTERM, SIGHUP, SIGPIPE };
    for (int i = 0; i < 4; i++) {
        struct sigaction old;
        if (sigaction(sigs[i], NULL, &old) == 0 && old.sa_handler != SIG_IGN) signal(sigs[i], on_fatal_signal);
    }
}

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes (%.1f MiB); lower --batch, --eval-batch, --neg, --hidden, --len "
                "or the data size", n, n / 1048576.0);
    return p;
}
void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu x %zu bytes (%.1f MiB); lower --batch, --eval-batch, --neg, --hidden, "
                "--len or the data size", n, size, (double)n * size / 1048576.0);
    return p;
}
/* Zeroed memory for a large array, mapped on its own, so that only the pages written become
 * resident: calloc takes an array under glibc's mmap threshold from the heap and clears it there
 * if the heap has held other data, all of it then resident, and glibc raises the threshold to
 * the size of any mapped array freed. Arrays sized for every position but written on the real
 * rows, and the gradient table, of which a step writes only its items' rows, are what this
 * saves (Beauty's peak in bench 31 -> 24 MB on an Intel Xeon). With huge,
 * an array of 2 MB or more (the parameters and their moments, a batch's largest activations)
 * starts at a 2 MB boundary and is advised for transparent huge pages: Linux's default THP mode
 * ("madvise") gives none otherwise, and a training step walks several MB per array, which on
 * 4 KB pages costs TLB misses (the Beauty step on 2 threads: 3.44 -> 3.10 ms); the others
 * are kept off huge pages, where one row written would make 2 MB resident. Arrays under 64 KB
 * come from calloc. Freed with big_free and the same size. */
#define BIG_PAGE ((size_t)2 << 20)
#define MAP_MIN ((size_t)64 << 10)
#ifdef REMI_ASAN
#define BIG_MAPPED 0 /* AddressSanitizer guards heap arrays, not mappings: keep them on the heap */
#else
#define BIG_MAPPED 1
#endif
static void *big_calloc(size_t bytes, int huge) {
    if (!BIG_MAPPED || bytes < MAP_MIN) return xcalloc(bytes, 1);
    huge = huge && bytes >= BIG_PAGE;
    size_t len = (bytes + 4095) & ~(size_t)4095;
    char *p = mmap(NULL, len + (huge ? BIG_PAGE : 0), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("out of memory allocating %zu bytes (%.1f MiB); lower --batch, --eval-batch, --neg, --hidden, "
                             "--len or the data size", bytes, bytes / 1048576.0);
    if (!huge) {
#ifdef MADV_NOHUGEPAGE
        madvise(p, len, MADV_NOHUGEPAGE); /* 4 KB pages also where THP is "always" */
#endif
        return p;
    }
    char *q = (char *)(((uintptr_t)p + BIG_PAGE - 1) & ~(uintptr_t)(BIG_PAGE - 1)); /* keep [q, q + len) */
    if (q > p) munmap(p, q - p);
    munmap(q + len, p + BIG_PAGE - q); /* the tail: at least a page, since p is page-aligned */
#ifdef MADV_HUGEPAGE
    madvise(q, len, MADV_HUGEPAGE); /* a hint: without it (or with THP off) the array is just on 4 KB pages */
#endif
    return q;
}
/* Memory a run reserves, checked against the machine's before it is touched: Linux grants
 * more than it has (overcommit), and a run that outgrows it is killed partway with no
 * message, where a refusal can say what to lower. Over half, with note: a note. */
static void check_fits(double bytes, const char *what, const char *lower, int note) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double have = (double)pages * page;
    if (pages <= 0 || page <= 0) return;
    if (bytes > have)
        die("%s need %.1f GB, more than this machine's %.1f GB of memory; %s", what, bytes / 1e9, have / 1e9, lower);
    if (note && bytes > have / 2)
        fprintf(stderr, "remi: note: %s may take up to %.1f GB of this machine's %.1f GB of memory\n", what, bytes / 1e9, have / 1e9);
}
static void big_free(void *p, size_t bytes) {
    if (!p) return;
    if (!BIG_MAPPED || bytes < MAP_MIN) free(p);
    else munmap(p, bytes); /* every page the range touches */
}

/* Starts a new peak for VmHWM (Linux: "5" in clear_refs); 0 if that is not possible. */
static int rss_peak_reset(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    int ok = f && fputs("5", f) >= 0;
    if (f) ok &= fclose(f) == 0;
    return ok;
}

/* A size in MB from a /proc/self file: resident memory now ("status", VmRSS) or its peak since
 * rss_peak_reset (VmHWM), or what of it is on huge pages ("smaps_rollup", AnonHugePages); 0
 * if unknown. */
static double proc_mb(const char *file, const char *field) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/%s", file);
    FILE *f = fopen(path, "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, field, strlen(field))) kb = atof(line + strlen(field));
    if (f) fclose(f);
    return kb / 1024.0;
}

void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) die("out of memory reallocating %zu bytes", n);
    return p;
}

/* fopen that refuses directories and says what to do about a missing file. */
FILE *xfopen(const char *path, const char *mode, const char *hint) {
    struct stat st;
    if (mode[0] == 'r' && stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        die("%s: is a directory, expected a file", path);
    FILE *f = fopen(path, mode);
    int missing = !f && errno == ENOENT; /* the hint says how to make a missing file */
    if (!f) die("cannot open %s: %s%s%s", path, strerror(errno), missing && hint ? "; " : "", missing && hint ? hint : "");
    return f;
}

/* The signals that end a command (catch_fatal_signals), to hold back while a file is created
 * and registered or a set of files is renamed, and in the worker threads for good (so that
 * the main thread takes them). */
static sigset_t fatal_signals(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT); sigaddset(&set, SIGTERM); sigaddset(&set, SIGHUP); sigaddset(&set, SIGPIPE);
    return set;
}

/* The pending entry of an output file that atomic_open returned. */
static int pending_slot(FILE *f) {
    int i = 0;
    while (i < MAX_PENDING && pending[i].f != f) i++;
    if (i == MAX_PENDING) die("internal: an output file atomic_open did not open");
    return i;
}

/* Write to "<path>.tmp.<pid>", then atomic_commit() renames it over <path>. */
FILE *atomic_open(const char *path) {
    int i = 0;
    while (i < MAX_PENDING && pending[i].f) i++;
    if (i == MAX_PENDING) die("too many output files open at once");
    if (strlen(path) + 32 > sizeof pending[i].tmp) die("output path too long: %s", path);
    snprintf(pending[i].tmp, sizeof pending[i].tmp, "%s.tmp.%d", path, (int)getpid());
    snprintf(pending[i].path, sizeof pending[i].path, "%s", path);
    sigset_t set = fatal_signals(), old; /* a signal finds the file registered once it exists */
    pthread_sigmask(SIG_BLOCK, &set, &old);
    pending[i].f = fopen(pending[i].tmp, "wb");
    int err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!pending[i].f) die("cannot write %s: %s", pending[i].tmp, strerror(err));
    return pending[i].f;
}

void atomic_commit(FILE *f) {
    int i = pending_slot(f), bad = ferror(f);
    if (fclose(f) != 0) bad = 1;
    if (bad) { pending[i].f = NULL; unlink(pending[i].tmp); die("error writing %s (disk full?)", pending[i].path); }
    int moved = rename(pending[i].tmp, pending[i].path) == 0, err = errno;
    pending[i].f = NULL; /* after the rename: a signal before it still removes the temporary file */
    if (!moved) {
        unlink(pending[i].tmp);
        die("cannot rename %s to %s: %s", pending[i].tmp, pending[i].path, strerror(err));
    }
}

/* s as one shell word (for a command to paste): as it is if plain, else in single quotes. */
static const char *shell_word(char *buf, size_t n, const char *s) {
    if (*s && strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./+,:@%-") == strlen(s)) return s;
    size_t k = 0;
    if (k + 1 < n) buf[k++] = '\'';
    for (; *s && k + 5 < n; s++) {
        if (*s == '\'') { memcpy(buf + k, "'\\''", 4); k += 4; }
        else buf[k++] = *s;
    }
    if (k + 1 < n) buf[k++] = '\'';
    buf[k] = 0;
    return buf;
}

/* The folder of a file's path, into buf: what comes before its last '/' ("/" at the root),
 * or "." for a bare name. */
static const char *path_folder(char *buf, size_t n, const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(buf, n, ".");
    else snprintf(buf, n, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    return buf;
}

/* The lock of a folder's file sets, FOLDER/.remi-commit.lock:
 * exclusive while a set is renamed into it (atomic_commit_all), shared while one is read
 * (load_dataset), so that two processes at once (two preps into one folder, a train reading
 * what a prep rewrites) replace and read each set whole, where their renames and reads would
 * otherwise interleave. The writers create it. Returns its descriptor (close releases it), or
 * -1 where there is none to take (a reader of a folder no writer has used, a lock file this
 * user cannot open): let through, as is a file system without locks (flock fails, the
 * descriptor is returned unlocked). A file rather than the folder itself, which train's
 * lock_out_dir holds for a whole run: the readers and writers of a data folder that is also a
 * train's --out would wait for that run to end. */
static int set_lock(const char *dir, int exclusive) {
    char path[4200 + 32];
    snprintf(path, sizeof path, "%s/.remi-commit.lock", dir);
    int fd = open(path, exclusive ? O_RDWR | O_CREAT | O_CLOEXEC : O_RDONLY | O_CLOEXEC, 0644);
    if (fd >= 0) while (flock(fd, exclusive ? LOCK_EX : LOCK_SH) != 0 && errno == EINTR) {}
    return fd;
}

/* Files that belong together (prep's five, export's two): each written out and checked,
 * and each destination checked (a folder in its place would refuse its rename alone), before
 * the first is renamed, so that an error leaves the old set whole; renamed under the folder's
 * set_lock and with the fatal signals held back, so that one arriving then ends the process
 * only after the whole set. */
static void atomic_commit_all(FILE **f, int n) {
    char dir[4200];
    int lock = set_lock(path_folder(dir, sizeof dir, pending[pending_slot(f[0])].path), 1);
    for (int k = 0; k < n; k++) {
        const char *path = pending[pending_slot(f[k])].path;
        struct stat st;
        if (fflush(f[k]) != 0 || ferror(f[k])) die("error writing %s (disk full?)", path);
        if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode)) die("cannot replace %s: it is a folder", path);
    }
    sigset_t set = fatal_signals(), old;
    pthread_sigmask(SIG_BLOCK, &set, &old);
    for (int k = 0; k < n; k++) atomic_commit(f[k]);
    if (lock >= 0) close(lock);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* A file's path into buf (n bytes), or a clear error where it would not fit (snprintf would
 * cut it short, and another file be opened). */
static __attribute__((format(printf, 3, 4))) void path_printf(char *buf, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(buf, n, fmt, ap);
    va_end(ap);
    if (len < 0 || (size_t)len >= n) die("path too long (%d characters; at most %zu): %.60s...", len, n - 1, buf);
}

#define MAX_OUT_DIR 4000 /* an output folder's path: room for a file name and the temporary suffix below 4096 */
static void mkdir_p(const char *dir) {
    char buf[4096];
    if (strlen(dir) > MAX_OUT_DIR) die("output folder path too long (%zu characters; at most %d)", strlen(dir), MAX_OUT_DIR);
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(buf, 0755); *p = '/'; }
    struct stat st;
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create folder %s: %s", dir, strerror(errno));
    if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) die("%s exists and is not a folder; pick another --out", dir);
}

/* An output folder that exists must take files (a read-only file system, no permission): said
 * before any work, not at the first file written. */
static void check_out_writable(const char *dir) {
    struct stat st;
    if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode) && access(dir, W_OK | X_OK) != 0)
        die("cannot write to folder %s: %s; pick another --out", dir, strerror(errno));
}

/* One remi train at a time in an output folder: an advisory lock on the folder itself, held
 * until the process exits (a file system without locks is let through). */
static void lock_out_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) die("cannot open folder %s: %s", dir, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK)
        die("%s is in use by another remi train; wait for it to end, or pick another --out", dir);
}

/* Under the lock of lock_out_dir: temporary files of train's outputs (NAME.tmp.PID) left by
 * a run that was killed (SIGKILL, a power cut) before it could remove them; those of a live
 * process stay (a file system without locks lets two runs in). */
static void remove_stale_temps(const char *dir) {
    static const char *names[] = { "model.bin", "checkpoint.bin", "metrics.jsonl", "curves.svg" };
    DIR *d = opendir(dir);
    if (!d) return;
    for (struct dirent *e; (e = readdir(d));)
        for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
            size_t n = strlen(names[i]);
            const char *pid = e->d_name + n + 5;
            if (strncmp(e->d_name, names[i], n) || strncmp(e->d_name + n, ".tmp.", 5) || !*pid ||
                strspn(pid, "0123456789") != strlen(pid) || strlen(pid) > 9)
                continue;
            if (kill((pid_t)atol(pid), 0) == 0 || errno == EPERM) continue; /* its writer is alive */
            char path[8300];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    closedir(d);
}

static double now_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A first line that starts with a UTF-8 byte-order mark: every reader refuses it (else it
 * would become part of the first field), with this message. */
#define BOM_MESSAGE "starts with a UTF-8 byte-order mark; save the file without it"
static int starts_with_bom(int lineno, const char *line) { return lineno == 1 && !strncmp(line, "\xef\xbb\xbf", 3); }

/* The code point of the UTF-8 character at s if it prints as nothing or as a plain space
 * (no-break and zero-width spaces, joiners, direction marks, line and paragraph separators,
 * the word joiner, a byte-order mark), with its length in *len; else 0. */
static unsigned invisible_char(const unsigned char *s, int *len) {
    unsigned cp = 0;
    if (s[0] == 0xc2 && s[1] == 0xa0) cp = 0xa0, *len = 2;
    else if (s[0] == 0xe2 && (s[1] == 0x80 || s[1] == 0x81) && s[2] >= 0x80 && s[2] <= 0xbf)
        cp = 0x2000 | (unsigned)(s[1] & 0x3f) << 6 | (s[2] & 0x3f), *len = 3;
    else if (s[0] == 0xef && s[1] == 0xbb && s[2] == 0xbf) cp = 0xfeff, *len = 3;
    return cp == 0xa0 || cp == 0xfeff || (cp >= 0x200b && cp <= 0x200f) || cp == 0x2028 || cp == 0x2029 ||
                   cp == 0x2060 ? cp : 0;
}

/* A line for an error message: up to its line ending, control characters escaped (\r,
 * \t, \xNN) and invisible ones too (\uFEFF), cut to 80 characters. */
static const char *excerpt(const char *s) {
    static char buf[96];
    size_t w = 0;
    for (size_t i = 0; s[i] && s[i] != '\n' && w <= 80; i++) {
        unsigned char c = (unsigned char)s[i];
        int len;
        unsigned cp = invisible_char((const unsigned char *)s + i, &len);
        if (c == '\r' && s[i + 1] == '\n') break;
        if (cp) w += (size_t)snprintf(buf + w, 7, "\\u%04X", cp), i += (size_t)len - 1;
        else if (c >= 0x20 && c != 0x7f) buf[w++] = (char)c;
        else w += (size_t)snprintf(buf + w, 5, c == '\r' ? "\\r" : c == '\t' ? "\\t" : "\\x%02x", c);
    }
    if (w > 80) strcpy(buf + 77, "...");
    else buf[w] = 0;
    return buf;
}

/* ------------------------------------------------------------------ RNG
 * SplitMix64 is the generator: one 64-bit state that advances by a constant, so draw i of a
 * stream can be made out of turn (rng_at), and it passes BigCrush. */
#define RNG_GAMMA 0x9e3779b97f4a7c15ull
static inline uint64_t rng_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint64_t rng_next(uint64_t *s) { return rng_mix(*s += RNG_GAMMA); }
/* The state is a counter: the k-th draw after state s (k = 0 is the next one) can be made
 * out of turn, by any thread, with the same value; rng_skip moves past n draws. */
static inline uint64_t rng_at(uint64_t s, uint64_t k) { return rng_mix(s + (k + 1) * RNG_GAMMA); }
static void rng_skip(uint64_t *s, uint64_t n) { *s += n * RNG_GAMMA; }
/* Uniform integer in [0, n), unbiased (Lemire's multiply-and-reject). */
static uint32_t rng_below(uint64_t *s, uint32_t n) {
    uint64_t m = (uint64_t)(uint32_t)rng_next(s) * n;
    if ((uint32_t)m < n) {
        uint32_t t = (uint32_t)(-n) % n;
        while ((uint32_t)m < t) m = (uint64_t)(uint32_t)rng_next(s) * n;
    }
    return (uint32_t)(m >> 32);
}
static inline double rng_unit(uint64_t r) { return (r >> 11) * (1.0 / 9007199254740992.0); } /* [0, 1) */
static double rng_uniform(uint64_t *s) { return rng_unit(rng_next(s)); }
/* Standard normal by Box-Muller from two draws (one value per pair; simple and reproducible). */
static double normal_of(uint64_t r1, uint64_t r2) {
    double u1 = rng_unit(r1), u2 = rng_unit(r2);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
static double rng_normal(uint64_t *s) {
    uint64_t r1 = rng_next(s);
    return normal_of(r1, rng_next(s));
}

/* ------------------------------------------------------------------ flags
 * Poor man's argparse: each command declares a table of flags with their defaults. */
typedef enum { F_INT, F_LONG, F_FLOAT, F_STR, F_U64, F_BOOL } FlagType;
typedef struct { const char *name; FlagType type; void *dst; const char *help; } Flag;

static void flag_value_str(char *buf, size_t n, const Flag *f) {
    switch (f->type) {
    case F_INT: snprintf(buf, n, "%d", *(int *)f->dst); break;
    case F_LONG: snprintf(buf, n, "%ld", *(long *)f->dst); break;
    case F_FLOAT: snprintf(buf, n, isnan(*(float *)f->dst) ? "per model" : "%g", *(float *)f->dst); break;
    case F_STR: snprintf(buf, n, "%s", *(const char **)f->dst ? *(const char **)f->dst : "(none)"); break;
    case F_U64: snprintf(buf, n, "%llu", (unsigned long long)*(uint64_t *)f->dst); break;
    case F_BOOL: snprintf(buf, n, "%s", *(int *)f->dst ? "on" : "off"); break;
    }
}

/* A command's exit status once what it printed on standard output is out: what went there is
 * output too (report's table, a log, --help), so a full disk or a closed stdout must not pass
 * for success with the text lost. */
static int stdout_status(int rc) {
    errno = 0;
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "remi: error writing standard output: %s\n", errno ? strerror(errno) : "write failed");
        return rc ? rc : 1; /* an interrupted train keeps its 130 / 143 */
    }
    return rc;
}

static void usage(const char *cmd, const char *what, const Flag *flags, int nf) {
    printf("usage: remi %s [flags]\n%s\n\nflags (default in brackets):\n", cmd, what);
    for (int i = 0; i < nf; i++) {
        char v[256];
        flag_value_str(v, sizeof v, &flags[i]);
        printf("  %-14s %s [%s]\n", flags[i].name, flags[i].help, v);
    }
}

/* The flags given on the command line (parse_flags; entries of the command's table), for
 * the notes on flags a setting ignores and the flags a resumed run refuses. */
static const Flag **flags_given;
static int n_flags_given;
static int flag_given(const void *dst) {
    for (int i = 0; i < n_flags_given; i++) if (flags_given[i]->dst == dst) return 1;
    return 0;
}

static void parse_flags(int argc, char **argv, const char *cmd, const char *what, const Flag *flags, int nf) {
    flags_given = xrealloc(flags_given, (size_t)(n_flags_given + argc) * sizeof *flags_given);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { usage(cmd, what, flags, nf); exit(stdout_status(0)); }
        const Flag *f = NULL;
        for (int j = 0; j < nf && !f; j++) if (!strcmp(argv[i], flags[j].name)) f = &flags[j];
        if (!f) die("%s: unknown flag '%s'; see `remi %s --help`", cmd, argv[i], cmd);
        flags_given[n_flags_given++] = f;
        if (f->type == F_BOOL) { *(int *)f->dst = 1; continue; }
        if (i + 1 >= argc) die("%s: flag %s needs a value", cmd, f->name);
        const char *v = argv[++i];
        char *end = NULL;
        errno = 0;
        switch (f->type) {
        case F_INT: { long x = strtol(v, &end, 10); if (x < INT_MIN || x > INT_MAX) errno = ERANGE; *(int *)f->dst = (int)x; break; }
        case F_LONG: *(long *)f->dst = strtol(v, &end, 10); break;
        case F_FLOAT: { /* decimal only, as the integer flags: strtof would also read hex (0x1p-10) */
            float x = strtof(v, &end);
            if (!isfinite(x) || strpbrk(v, "xX")) errno = ERANGE;
            *(float *)f->dst = x;
            break;
        }
        case F_U64: *(uint64_t *)f->dst = strtoull(v, &end, 10); if (v[0] == '-') errno = ERANGE; break;
        case F_STR: *(const char **)f->dst = v; end = (char *)v + strlen(v); break;
        case F_BOOL: break;
        }
        int blank = f->type != F_STR && isspace((unsigned char)v[0]); /* strto* skip it: " -1" would wrap a seed */
        if (errno || end == v || *end || blank) die("%s: bad value '%s' for %s (%s)", cmd, v, f->name, f->help);
    }
}

static void check_range(const char *flag, double v, double lo, double hi) {
    if (!(v >= lo && v <= hi)) die("%s = %.15g is out of range [%.15g, %.15g]", flag, v, lo, hi);
}
/* A float flag: its bounds rounded to float as its value was (--dropout 0.99 is 0.99f) */
static void check_range_float(const char *flag, float v, double lo, double hi) {
    if (!(v >= (float)lo && v <= (float)hi)) die("%s = %g is out of range [%g, %g]", flag, v, lo, hi);
}

/* ======================================================================== thread pool
 * Static partitioning: parallel_for(n, fn, ctx) gives thread t the contiguous range
 * [n*t/T, n*(t+1)/T). Every output element is written by one thread and every sum runs
 * in a fixed order inside one call, so results are identical for any thread count. */
typedef void (*task_fn)(void *ctx, int lo, int hi);

/* Workers spin on the generation counter (a few hundred microseconds) before sleeping on
 * the condition variable: a training step hands out dozens of small tasks with short serial
 * stretches between them, and a sleep/wake pair per task would cost more than some of the
 * tasks (a ten times shorter spin made a Beauty step on 2 threads about 20% slower). */
#define POOL_SPIN 200000

static struct {
    int n;                      /* threads, the caller included */
    pthread_t th[256];
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    _Atomic long gen;           /* bumped for every parallel_for */
    _Atomic int busy;           /* workers still running the current task */
    task_fn fn;
    void *ctx;
    int total;
} pool = { .n = 1, .mu = PTHREAD_MUTEX_INITIALIZER,
           .go = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER };

static void pool_range(int t, int total, int *lo, int *hi) {
    *lo = (int)((long)total * t / pool.n);
    *hi = (int)((long)total * (t + 1) / pool.n);
}

static void *pool_worker(void *arg) {
    int t = (int)(intptr_t)arg;
    long seen = 0;
    for (;;) {
        for (int i = 0; i < POOL_SPIN && atomic_load(&pool.gen) == seen; i++) {}
        if (atomic_load(&pool.gen) == seen) {
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.go, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = atomic_load(&pool.gen);
        int lo, hi;
        pool_range(t, pool.total, &lo, &hi);
        if (lo < hi) pool.fn(pool.ctx, lo, hi);
        if (atomic_fetch_sub(&pool.busy, 1) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

static void pool_start(int n) {
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    pool.n = n;
    sigset_t set = fatal_signals(), old; /* the workers start with them blocked: the main thread takes them */
    pthread_sigmask(SIG_BLOCK, &set, &old);
    for (int t = 1; t < n; t++)
        if (pthread_create(&pool.th[t], NULL, pool_worker, (void *)(intptr_t)t) != 0)
            die("cannot start thread %d of %d; lower -t", t + 1, n);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void parallel_run(int total, task_fn fn, void *ctx) {
    if (pool.n == 1 || total < 2) { if (total > 0) fn(ctx, 0, total); return; }
    pool.fn = fn; pool.ctx = ctx; pool.total = total;
    atomic_store(&pool.busy, pool.n - 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.gen, 1); /* publishes fn, ctx, total */
    pthread_cond_broadcast(&pool.go);
    pthread_mutex_unlock(&pool.mu);
    int lo, hi;
    pool_range(0, total, &lo, &hi);
    if (lo < hi) fn(ctx, lo, hi);
    for (int i = 0; i < POOL_SPIN && atomic_load(&pool.busy) > 0; i++) {}
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.busy) > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
}

/* Seconds spent in parallel regions, by task function, while `on` (remi bench --regions). */
#define MAX_REGIONS 48
static struct { int on, n; const char *name[MAX_REGIONS]; double sec[MAX_REGIONS]; } region_time;

/* fn over [0, total), split among the pool's threads in fixed ranges; the caller runs the
 * first. Named after the task function, for region timing. */
#define parallel_for(total, fn, ctx) parallel_for_named(total, fn, ctx, #fn)
static void parallel_for_named(int total, task_fn fn, void *ctx, const char *name) {
    if (!region_time.on) { parallel_run(total, fn, ctx); return; }
    double t0 = now_sec();
    parallel_run(total, fn, ctx);
    int i = 0;
    while (i < region_time.n && strcmp(region_time.name[i], name)) i++;
    if (i == MAX_REGIONS) return;
    if (i == region_time.n) { region_time.name[i] = name; region_time.sec[i] = 0; region_time.n++; }
    region_time.sec[i] += now_sec() - t0;
}

/* ======================================================================== data
 * Split files (REMI-SPEC b.3): lines "user,item,index,timestamp" (or "user,item,time").
 * Lines are grouped by user and each user's items stable-sorted by time. */
typedef struct { int64_t user, time; int line, item; } Rec;

static int rec_cmp(const void *pa, const void *pb) {
    const Rec *a = pa, *b = pb;
    if (a->user != b->user) return a->user < b->user ? -1 : 1;
    if (a->time != b->time) return a->time < b->time ? -1 : 1;
    return a->line - b->line; /* stable: file order breaks time ties */
}

/* Parse a decimal integer field ending at ',' or end of string; returns the end, or NULL
 * (with *overflow set if the digits lie outside a 64-bit integer). */
static const char *parse_i64(const char *s, int64_t *out, int *overflow) {
    const char *p = s;
    int neg = 0;
    if (*p == '-') { neg = 1; p++; }
    if (*p < '0' || *p > '9') return NULL;
    uint64_t v = 0, lim = UINT64_C(9223372036854775807) + (uint64_t)neg; /* INT64_MIN's magnitude is one more */
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (lim - (uint64_t)(*p - '0')) / 10) { *overflow = 1; return NULL; }
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (*p != ',' && *p != 0) return NULL;
    *out = neg && v ? -(int64_t)(v - 1) - 1 : (int64_t)v; /* v - 1: no overflow at INT64_MIN */
    return p;
}

/* Read a split; item ids must lie in 1..max_item (errors say where that came from: `from`,
 * or NULL), users need >= min_items items. */
void load_split(Split *s, const char *path, int max_item, const char *from, int min_items) {
    FILE *f = xfopen(path, "rb", "run `remi prep` to make split files, or pass --data DIR --name NAME");
    Rec *rec = NULL;
    size_t n = 0, cap = 0, lcap = 0;
    char *line = NULL;
    ssize_t len;
    int lineno = 0, nf1 = 0; /* nf1: the first line's fields, which every line must have */
    while ((len = getline(&line, &lcap, f)) != -1) {
        lineno++;
        if (len > 0 && line[len - 1] == '\n') line[--len] = 0;
        if (len > 0 && line[len - 1] == '\r') line[--len] = 0;
        if ((size_t)len != strlen(line)) die("%s:%d: line holds a NUL byte (binary file?)", path, lineno);
        if (starts_with_bom(lineno, line)) die("%s:1: " BOM_MESSAGE, path);
        int64_t v[4];
        int nf = 0, overflow = 0;
        const char *p = line;
        while (nf < 4 && (p = parse_i64(p, &v[nf], &overflow)) != NULL) {
            nf++;
            if (*p == 0 || nf == 4) break; /* a comma after a fourth field is refused below */
            p++;
        }
        if (overflow)
            die("%s:%d: field %d is an integer beyond 64 bits, in \"%s\"", path, lineno, nf + 1, excerpt(line));
        if (!p || *p != 0 || nf < 3)
            die("%s:%d: expected 'user,item,index,timestamp' or 'user,item,time' (integers), got \"%s\"",
                path, lineno, excerpt(line));
        if (!nf1) nf1 = nf;
        if (nf != nf1) /* a line cut short: its index would be read as the time */
            die("%s:%d: %d fields where line 1 has %d (every line has the same; a line cut short?), got \"%s\"", path,
                lineno, nf, nf1, excerpt(line));
        if (v[1] < 1 || v[1] > max_item)
            die("%s:%d: item id %lld out of range 1..%d%s%s%s in \"%s\"", path, lineno, (long long)v[1], max_item,
                from ? " (the items of " : "", from ? from : "", from ? ")" : "", excerpt(line));
        if (n == cap) { cap = cap ? 2 * cap : 4096; rec = xrealloc(rec, cap * sizeof *rec); }
        rec[n] = (Rec){ v[0], nf == 3 ? v[2] : v[3], lineno, (int)v[1] };
        n++;
        if (n > INT_MAX / 2) die("%s: too many lines", path);
    }
    if (ferror(f)) die("%s: read error: %s", path, strerror(errno));
    fclose(f);
    free(line);
    if (n == 0) die("%s: empty file; run `remi prep` to make split files", path);
    qsort(rec, n, sizeof *rec, rec_cmp);
    s->n_users = 0;
    for (size_t i = 0; i < n; i++) s->n_users += (i == 0 || rec[i].user != rec[i - 1].user);
    s->user_id = xmalloc(s->n_users * sizeof *s->user_id);
    s->off = xmalloc((s->n_users + 1) * sizeof *s->off);
    s->items = xmalloc(n * sizeof *s->items);
    int u = -1;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || rec[i].user != rec[i - 1].user) { u++; s->user_id[u] = rec[i].user; s->off[u] = (int)i; }
        s->items[i] = rec[i].item;
    }
    s->off[s->n_users] = (int)n;
    for (int k = 0; k < s->n_users; k++)
        if (s->off[k + 1] - s->off[k] < min_items) {
            /* name the first line of the offending user */
            int first = INT_MAX;
            for (size_t i = s->off[k]; i < (size_t)s->off[k + 1]; i++) if (rec[i].line < first) first = rec[i].line;
            die("%s:%d: user %lld has %d item(s); every user needs at least %d (history + target)",
                path, first, (long long)s->user_id[k], s->off[k + 1] - s->off[k], min_items);
        }
    free(rec);
}

static void free_split(Split *s) { free(s->user_id); free(s->off); free(s->items); memset(s, 0, sizeof *s); }

/* A file's bytes, read to the end (a pipe too), with a NUL after them. */
typedef struct { char *p; size_t n; } Bytes;

static Bytes read_all(const char *path, const char *hint) {
    FILE *f = xfopen(path, "rb", hint);
    Bytes b = { xmalloc(4096), 0 };
    size_t cap = 4096, got;
    while ((got = fread(b.p + b.n, 1, cap - b.n, f)) > 0)
        if ((b.n += got) == cap) b.p = xrealloc(b.p, cap *= 2);
    if (ferror(f)) die("%s: read error: %s", path, strerror(errno));
    fclose(f);
    b.p[b.n] = 0;
    return b;
}

/* Where text holds its first control character (U+0000..U+001F, U+007F), or -1: raw ids
 * hold none, as an item map's lines and export's TSV columns could not keep them. */
static long find_control(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return (long)i;
    return -1;
}

/* A control character's name in a message. */
static const char *control_name(unsigned char c) {
    static char buf[48];
    snprintf(buf, sizeof buf, c == '\r' ? "a carriage return (\\r)" : c == '\n' ? "a line feed (\\n)"
             : c == '\t' ? "a tab (\\t)" : c == 0 ? "a NUL byte" : "the control character \\x%02x", c);
    return buf;
}

/* NAME_item_map.txt: one line "raw id,item" per item (as prep writes it), the items 1..n
 * each once, where n is the number of lines; lines end in \n or \r\n, the last one may not.
 * Returns n, or -1 when the file does not exist. With names (N slots), names[item] = its
 * raw id, and the map must hold N - 1 items (a model's N). Any other line (an empty raw id,
 * a control character), an item out of range or given twice, a raw id given twice, and an
 * empty map are errors that name the file (and the lines). */
typedef struct { const char *raw; int line; } RawLine;
static int raw_line_cmp(const void *a, const void *b) { /* by raw id, then by line */
    const RawLine *x = a, *y = b;
    int c = strcmp(x->raw, y->raw);
    return c ? c : x->line - y->line;
}
static int read_item_map(const char *path, char **names, int N) {
    struct stat sb;
    if (stat(path, &sb) != 0 && errno == ENOENT) return -1;
    Bytes b = read_all(path, NULL);
    int n = 0;
    for (size_t i = 0; i < b.n; i++) n += b.p[i] == '\n';
    n += b.n > 0 && b.p[b.n - 1] != '\n';
    if (n == 0) die("%s: empty file; an item map holds a line 'raw id,item' per item", path);
    int hi = n; /* the lines are checked first, so that a bad line is named as such */
    unsigned char *seen = xcalloc((size_t)hi + 1, 1);
    RawLine *raw = xmalloc((size_t)n * sizeof *raw); /* each line's raw id, in b */
    char *line = b.p;
    for (int lineno = 1; lineno <= n; lineno++) {
        char *nl = memchr(line, '\n', (size_t)(b.p + b.n - line));
        size_t len = nl ? (size_t)(nl - line) : (size_t)(b.p + b.n - line);
        char *next = line + len + 1;
        line[len] = 0;
        if (len > 0 && line[len - 1] == '\r') line[--len] = 0;
        if (lineno == 1 && starts_with_bom(1, line)) die("%s:1: " BOM_MESSAGE, path);
        long bad = find_control(line, len);
        if (bad >= 0)
            die("%s:%d: the line holds %s%s, in \"%s\"", path, lineno, control_name((unsigned char)line[bad]),
                line[bad] == '\r' ? " (line endings are \\n or \\r\\n)" : "", excerpt(line));
        char *comma = strrchr(line, ','), *end = comma;
        errno = 0;
        long id = comma && comma[1] >= '0' && comma[1] <= '9' ? strtol(comma + 1, &end, 10) : 0;
        if (!comma || comma == line || *end || errno || id < 1 || id > hi)
            die("%s:%d: expected 'raw id,item' with a raw id and an item in 1..%d, got \"%s\"", path, lineno, hi, excerpt(line));
        if (seen[id]) die("%s:%d: item %ld appears twice in the map, in \"%s\"", path, lineno, id, excerpt(line));
        seen[id] = 1;
        *comma = 0;
        raw[lineno - 1] = (RawLine){ line, lineno };
        if (names && id < N && !(names[id] = strdup(line))) die("out of memory reading %s", path);
        line = next;
    }
    qsort(raw, (size_t)n, sizeof *raw, raw_line_cmp);
    for (int i = 1; i < n; i++)
        if (strcmp(raw[i - 1].raw, raw[i].raw) == 0)
            die("%s:%d: raw id \"%s\" is also on line %d; each item has its own", path, raw[i].line,
                excerpt(raw[i].raw), raw[i - 1].line);
    free(raw);
    if (names && n != N - 1)
        die("%s has %d items but the model was trained with %d: the map of another dataset?", path, n, N - 1);
    free(seen);
    free(b.p);
    return n;
}

/* Users two splits share (each split's ids ascending, as load_split leaves them). */
static int shared_users(const Split *a, const Split *b) {
    int n = 0;
    for (int i = 0, j = 0; i < a->n_users && j < b->n_users;)
        if (a->user_id[i] < b->user_id[j]) i++;
        else if (a->user_id[i] > b->user_id[j]) j++;
        else n++, i++, j++;
    return n;
}

/* DIR/NAME_{train,valid,test}.txt. N = (lines of NAME_item_map.txt) + 1 when the map
 * exists (read_item_map checks it), else the largest item id + 1. Every user needs >= 2
 * items: evaluation takes the first 80% as history and the rest as targets (REMI-SPEC g.1). */
void load_dataset(Dataset *ds, const char *dir, const char *name) {
    char path[3][4096], map[4096];
    const char *part[3] = { "train", "valid", "test" };
    Split *sp[3] = { &ds->train, &ds->valid, &ds->test };
    path_printf(map, sizeof map, "%s/%s_item_map.txt", dir, name);
    int lock = set_lock(dir, 0); /* the four files of one prep (set_lock) */
    int n_items = read_item_map(map, NULL, 0);
    for (int i = 0; i < 3; i++) {
        path_printf(path[i], sizeof path[i], "%s/%s_%s.txt", dir, name, part[i]);
        load_split(sp[i], path[i], n_items > 0 ? n_items : INT_MAX - 1, n_items > 0 ? map : NULL, 2);
    }
    if (lock >= 0) close(lock);
    if (n_items <= 0) {
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < sp[i]->off[sp[i]->n_users]; j++)
                if (sp[i]->items[j] > n_items) n_items = sp[i]->items[j];
        unsigned char *seen = xcalloc((size_t)n_items + 1, 1); /* a stray large id would make N large */
        int distinct = 0;
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < sp[i]->off[sp[i]->n_users]; j++) distinct += !seen[sp[i]->items[j]]++;
        free(seen);
        if (distinct < n_items / 2)
            fprintf(stderr, "remi: note: no %s, so N = %d (the largest item id + 1), but only %d distinct items "
                    "appear; the model keeps a row for every id below N (remi prep numbers the items 1..n)\n",
                    map, n_items + 1, distinct);
    }
    for (int i = 0; i < 3; i++) /* the reference splits by user (REMI-SPEC b.2): a user in two splits is a leak, or a mix-up */
        for (int j = i + 1; j < 3; j++) {
            int n = shared_users(sp[i], sp[j]);
            if (n)
                fprintf(stderr, "remi: note: %d users of %s are also in %s; remi prep puts each user in one split\n", n,
                        path[j], path[i]);
        }
    ds->N = n_items + 1;
}

/* History before position k: seq[max(0, k-L) .. k), left-aligned, zero-padded to L, with
 * its mask (REMI-SPEC f.4 and g.1). */
static void fill_history(int *hist, float *mask, const int *seq, int k, int L) {
    int start = k > L ? k - L : 0;
    for (int l = 0; l < L; l++) {
        int real = start + l < k;
        hist[l] = real ? seq[start + l] : 0;
        mask[l] = real ? 1.0f : 0.0f;
    }
}

/* Real items in a history row (its mask, L positions): a count. fill_history puts them first,
 * so they are positions 0..n-1, which GRU4Rec's dropout draws rely on; real_span (below) is the
 * span that holds them whatever the layout. */
static int history_len(const float *mask, int L) {
    int n = 0;
    for (int l = 0; l < L; l++) n += mask[l] != 0.0f;
    return n;
}

/* Build one training batch (REMI-SPEC f.4): B distinct users uniformly at random; for
 * each a target position k uniform in {4..n-1} (for n < 5, where the reference would
 * fail, {n-1}); the history is what precedes k. */
static void make_train_batch(Acts *a, const Split *s, int *perm, int B, int L, uint64_t *rng) {
    int U = s->n_users;
    for (int b = 0; b < B; b++) {
        int j = b + (int)rng_below(rng, (uint32_t)(U - b)); /* partial Fisher-Yates */
        int t = perm[b]; perm[b] = perm[j]; perm[j] = t;
        const int *seq = s->items + s->off[perm[b]];
        int n = s->off[perm[b] + 1] - s->off[perm[b]];
        int lo = n > 4 ? 4 : n - 1;
        int k = lo + (int)rng_below(rng, (uint32_t)(n - lo));
        a->target[b] = seq[k];
        fill_history(a->hist + b * L, a->mask + b * L, seq, k, L);
    }
}

/* REMI-SPEC g.1: a user of n items is evaluated on the items after the first floor(0.8 n),
 * computed as Python's int(len * 0.8), with the same double rounding. */
static int eval_split_point(int n) { return (int)(n * 0.8); }

/* Evaluation case of user u: history = the first eval_split_point(n) items (the last L of
 * them), targets = the rest. Returns the index of the first target. */
static int make_eval_row(int *hist, float *mask, const Split *s, int u, int L) {
    const int *seq = s->items + s->off[u];
    int n = s->off[u + 1] - s->off[u];
    int k = eval_split_point(n);
    fill_history(hist, mask, seq, k, L);
    return k;
}

/* ======================================================================== prep
 * remi prep: a raw interaction log -> the five files REMI trains on (REMI-SPEC b.2).
 *
 * It reproduces the reference preprocessing (Tokkiu/REMI process/data.py) exactly,
 * quirks included:
 *   - one pass of item filtering, then one pass of user filtering (not an iterative
 *     k-core), so a kept item can end up with fewer than --min interactions;
 *   - items ranked by count, descending, ties in first-seen order; ids 1..n in that order;
 *   - kept users shuffled with Python's random.seed(seed) + random.shuffle, re-implemented
 *     below bit for bit, so --seed 1230 gives the reference's split byte for byte;
 *   - the split is by user (8:1:1), not by time; duplicates are kept.
 *
 * Input is "pairs" (one interaction per line: user, item and optional time columns),
 * "sequence" (one user per line: user item item ...) or "sessions" (item item ...: the
 * user is the line number). Ids stay strings and are written
 * back exactly as read. The whole file is read and validated before the first output is
 * opened, and outputs go through atomic_open/atomic_commit, so bad input never leaves a
 * partial file behind.
 *
 * Relies on the utility section for die, x*alloc, xfopen, atomic_open/commit, excerpt,
 * mkdir_p and now_sec. Every helper here is static and named prep_*. */

/* ------------------------------------------------------------------ Python's random
 * CPython's Modules/_randommodule.c: MT19937 seeded by init_by_array() with the 32-bit
 * words of abs(seed), and Lib/random.py's shuffle()/_randbelow(). Only what shuffle
 * needs: getrandbits(k) for k <= 32 is the top k bits of one 32-bit output. */
#define PREP_MT_N 624
#define PREP_MT_M 397

typedef struct {
    uint32_t mt[PREP_MT_N];
    int i; /* next word of mt to temper; PREP_MT_N = regenerate first */
} PrepMT;

/* init_genrand: the classic linear-congruential fill of the state. */
static void prep_mt_seed32(PrepMT *r, uint32_t s) {
    r->mt[0] = s;
    for (int i = 1; i < PREP_MT_N; i++)
        r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->i = PREP_MT_N;
}

/* init_by_array: mix a key of n 32-bit words into the state (all arithmetic mod 2^32). */
static void prep_mt_seed_array(PrepMT *r, const uint32_t *key, int n) {
    uint32_t *mt = r->mt;
    prep_mt_seed32(r, 19650218u);
    int i = 1, j = 0;
    for (int k = n > PREP_MT_N ? n : PREP_MT_N; k > 0; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525u)) + key[j] + (uint32_t)j;
        i++, j++;
        if (i >= PREP_MT_N) { mt[0] = mt[PREP_MT_N - 1]; i = 1; }
        if (j >= n) j = 0;
    }
    for (int k = PREP_MT_N - 1; k > 0; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        i++;
        if (i >= PREP_MT_N) { mt[0] = mt[PREP_MT_N - 1]; i = 1; }
    }
    mt[0] = 0x80000000u; /* MSB is 1, assuring a non-zero initial state */
}

/* genrand_uint32: regenerate the 624 words when used up, then temper one. The indices
 * wrap with %, which reads the already-updated words exactly as the 3-loop original does. */
static uint32_t prep_mt_next(PrepMT *r) {
    if (r->i >= PREP_MT_N) {
        for (int k = 0; k < PREP_MT_N; k++) {
            uint32_t y = (r->mt[k] & 0x80000000u) | (r->mt[(k + 1) % PREP_MT_N] & 0x7fffffffu);
            r->mt[k] = r->mt[(k + PREP_MT_M) % PREP_MT_N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        r->i = 0;
    }
    uint32_t y = r->mt[r->i++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* random.seed(seed) for an int: the key is abs(seed) as little-endian 32-bit words,
 * at least one word (so seed 0 is the key {0}). The caller passes abs(seed). */
static void prep_py_seed(PrepMT *r, uint64_t seed) {
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    prep_mt_seed_array(r, key, key[1] ? 2 : 1);
}

/* random._randbelow(n), n >= 1: draw k = n.bit_length() bits, reject values >= n. */
static uint32_t prep_py_randbelow(PrepMT *r, uint32_t n) {
    int k = 0;
    while (k < 32 && (n >> k)) k++; /* bit length of n */
    uint32_t v;
    do v = prep_mt_next(r) >> (32 - k); /* getrandbits(k) for 1 <= k <= 32 */
    while (v >= n);
    return v;
}

/* random.shuffle(x): Fisher-Yates from the end, j = _randbelow(i + 1). */
static void prep_py_shuffle(PrepMT *r, int *x, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)prep_py_randbelow(r, (uint32_t)i + 1);
        int t = x[i]; x[i] = x[j]; x[j] = t;
    }
}

/* ------------------------------------------------------------------ id interning
 * Raw ids (any string without NUL) -> dense indices 0,1,2,... in first-seen order.
 * The ids live back to back in one growing buffer; an open-addressing table of
 * power-of-two size, at most half full, finds them. */
typedef struct {
    char *text;       /* every id, NUL-terminated, back to back */
    size_t len, cap;  /* bytes used / allocated in text */
    size_t *off;      /* (n) id i is text + off[i] */
    int n, cap_n;
    int *slot;        /* (nslot) 0 = empty, else index + 1 */
    size_t nslot;
} PrepIds;

static uint64_t prep_hash(const char *s, size_t len) {
    uint64_t h = 14695981039346656037ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h ^ (h >> 29); /* fold high bits into the low ones used as the slot */
}

static const char *prep_id(const PrepIds *t, int i) { return t->text + t->off[i]; }
static size_t prep_id_len(const PrepIds *t, int i) { return (i + 1 < t->n ? t->off[i + 1] : t->len) - t->off[i] - 1; }

/* Double the table and re-insert every id. */
static void prep_ids_grow(PrepIds *t) {
    size_t nslot = t->nslot ? 2 * t->nslot : 1024;
    int *slot = xcalloc(nslot, sizeof *slot);
    for (int i = 0; i < t->n; i++) {
        const char *s = prep_id(t, i);
        size_t h = (size_t)prep_hash(s, strlen(s)) & (nslot - 1);
        while (slot[h]) h = (h + 1) & (nslot - 1);
        slot[h] = i + 1;
    }
    free(t->slot);
    t->slot = slot;
    t->nslot = nslot;
}

/* Index of the id s[0..len), added at the end if new. */
static int prep_ids_intern(PrepIds *t, const char *s, size_t len) {
    if (2 * ((size_t)t->n + 1) > t->nslot) prep_ids_grow(t);
    size_t h = (size_t)prep_hash(s, len) & (t->nslot - 1);
    for (; t->slot[h]; h = (h + 1) & (t->nslot - 1)) {
        int i = t->slot[h] - 1; /* lengths first: memcmp may read all len bytes of a shorter id */
        if (prep_id_len(t, i) == len && memcmp(prep_id(t, i), s, len) == 0) return i;
    }
    if (t->n == INT32_MAX - 1) die("more than %d distinct ids", INT32_MAX - 1);
    if (t->n == t->cap_n) {
        t->cap_n = t->cap_n ? 2 * t->cap_n : 1024;
        t->off = xrealloc(t->off, (size_t)t->cap_n * sizeof *t->off);
    }
    while (t->len + len + 1 > t->cap) {
        t->cap = t->cap ? 2 * t->cap : 65536;
        t->text = xrealloc(t->text, t->cap);
    }
    memcpy(t->text + t->len, s, len);
    t->text[t->len + len] = '\0';
    t->off[t->n] = t->len;
    t->len += len + 1;
    t->slot[h] = t->n + 1;
    return t->n++;
}

static void prep_ids_free(PrepIds *t) {
    free(t->text); free(t->off); free(t->slot);
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------ reading */
enum { PREP_PAIRS, PREP_SEQUENCE, PREP_JSON, PREP_SESSIONS };

typedef struct {
    const char *input, *name, *out;
    int format;        /* PREP_PAIRS, PREP_SEQUENCE, PREP_JSON or PREP_SESSIONS */
    int sep;           /* 0: runs of spaces/tabs, else this exact byte */
    int header;        /* skip the first line */
    int ucol, icol, tcol; /* 0-based columns (pairs); tcol -1 = no time column */
    int keep_col;      /* pairs: keep only lines whose column keep_col is keep_value; -1 = all */
    const char *keep_value;
    int iso_time;      /* pairs: the time column is YYYY-MM-DDTHH:MM:SSZ, not a number */
    int int_ids;       /* ids read as Python int() reads them, written back normalised */
    const char *ukey, *ikey, *tkey; /* json: the member names of user, item and time */
    int min;           /* filter_size of data.py */
    uint64_t seed;     /* abs() of --seed, as random.seed() uses it */
} PrepOpts;

/* The time is a double because read_from_amazon keeps float(unixReviewTime) and sorts by
 * it, writing only its truncation ('%d'); the other readers' int(float(x)), ISO times and
 * line numbers are integers below 2^63 that the double holds exactly or to within the
 * rounding float(x) already did. Output is always (long long)time. */
typedef struct {
    int user, item; /* interned indices */
    double time;
} PrepEvent;

typedef struct {
    PrepIds users, items;
    PrepEvent *ev;     /* (n_ev) every interaction, in file order */
    size_t n_ev, cap_ev;
    size_t n_skipped;  /* lines dropped by --keep-col */
    char *json, *id;   /* scratch: a JSON line being decoded, an id being normalised */
    size_t cap_json, cap_id;
} PrepData;

/* A parse error: name the file, the 1-based line number and the line itself, then die. */
static void prep_bad_line(const PrepOpts *o, long lineno, const char *line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5), noreturn));
static void prep_bad_line(const PrepOpts *o, long lineno, const char *line, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    die("%s:%ld: %s: \"%s\"", o->input, lineno, msg, excerpt(line));
}

static const char *prep_sep_name(int sep) {
    static char buf[8];
    if (sep == 0) return "spaces/tabs";
    if (sep == '\t') return "tab";
    if (sep == ',') return "comma";
    if (sep == ';') return "semicolon";
    snprintf(buf, sizeof buf, "'%c'", sep);
    return buf;
}

/* Field cursor over one line. sep 0 splits on runs of spaces/tabs and ignores them at
 * both ends (Python's str.split()); any other sep splits on every occurrence, so empty
 * fields exist (Python's str.split(sep)). */
typedef struct {
    const char *p, *end;
    int sep, done;
} PrepFields;

static int prep_next_field(PrepFields *f, const char **s, size_t *len) {
    if (f->sep == 0) {
        while (f->p < f->end && (*f->p == ' ' || *f->p == '\t')) f->p++;
        if (f->p == f->end) return 0;
        *s = f->p;
        while (f->p < f->end && *f->p != ' ' && *f->p != '\t') f->p++;
        *len = (size_t)(f->p - *s);
        return 1;
    }
    if (f->done) return 0;
    const char *q = memchr(f->p, f->sep, (size_t)(f->end - f->p));
    if (!q) { q = f->end; f->done = 1; }
    *s = f->p;
    *len = (size_t)(q - f->p);
    f->p = q + 1;
    return 1;
}

/* Python's float(s) for a decimal number: optional spaces, sign, digits with an optional
 * fraction and exponent. inf, nan, hex and underscores are refused (int() or '%d' would
 * refuse the first two; the others are never meant as times), and so is anything beyond
 * +-2^63, which the output's %lld could not write. Returns 1; 0 if not such a number, -1 if
 * beyond +-2^63 (1e400 too). */
static int prep_parse_float(const char *s, size_t len, double *out) {
    char buf[128];
    size_t a = 0, b = len;
    while (a < b && (s[a] == ' ' || s[a] == '\t')) a++;
    while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t')) b--;
    if (b - a == 0 || b - a >= sizeof buf) return 0;
    memcpy(buf, s + a, b - a);
    buf[b - a] = '\0';
    /* check the grammar first, so strtod cannot accept anything wider */
    const char *p = buf;
    int digits = 0;
    if (*p == '+' || *p == '-') p++;
    while (*p >= '0' && *p <= '9') p++, digits++;
    if (*p == '.') { p++; while (*p >= '0' && *p <= '9') p++, digits++; }
    if (!digits) return 0;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-') p++;
        if (!(*p >= '0' && *p <= '9')) return 0;
        while (*p >= '0' && *p <= '9') p++;
    }
    if (*p) return 0;
    double d = strtod(buf, NULL); /* correctly rounded, like Python's float() */
    if (!(d > -9223372036854775808.0 && d < 9223372036854775808.0)) return -1; /* also inf */
    *out = d;
    return 1;
}

/* Python's int(float(s)): the float truncated toward zero, like int(). 1, or as
 * prep_parse_float. */
static int prep_parse_time(const char *s, size_t len, double *out) {
    int ok = prep_parse_float(s, len, out);
    if (ok == 1) *out = trunc(*out);
    return ok;
}

/* Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (H. Hinnant's
 * days_from_civil): eras of 400 years = 146097 days, years starting in March so that the
 * leap day is the last day of the year. No libc time zone code involved. */
static int64_t prep_days_from_civil(int64_t y, int m, int d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;                                  /* [0, 399] */
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;  /* [0, 365] */
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;          /* [0, 146096] */
    return era * 146097 + doe - 719468;
}

/* "YYYY-MM-DDTHH:MM:SSZ" (SNAP's check-in time) -> Unix seconds, UTC: what
 * calendar.timegm(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) gives. Like strptime: T and Z
 * in either case, the date must exist, seconds up to 61 (timegm counts them on). Unlike
 * strptime, every field must have its full width (strptime also takes "2010-1-5T..."). */
static int prep_parse_iso(const char *s, size_t len, double *out) {
    static const char form[] = "dddd-dd-ddTdd:dd:ddZ";
    if (len != sizeof form - 1) return 0;
    int v[6] = {0}, f = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i], want = form[i];
        if (want == 'd') {
            if (c < '0' || c > '9') return 0;
            v[f] = 10 * v[f] + (c - '0');
        } else {
            if ((c | 0x20) != (want | 0x20)) return 0; /* T, Z case-blind; - and : exact */
            f++;
        }
    }
    int y = v[0], mo = v[1], d = v[2], h = v[3], mi = v[4], sec = v[5];
    static const int mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || (mo == 2 && d == 29 && !leap) ||
        h > 23 || mi > 59 || sec > 61)
        return 0;
    *out = (double)(prep_days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec);
    return 1;
}

static int prep_digit(char c) { return c >= '0' && c <= '9'; }

/* The ASCII whitespace of Python's str.strip() and int(): \t \n \v \f \r, \x1c-\x1f, space. */
static int prep_py_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

/* Python's int(s) of an id, as the RecBole readers do (uid = int(conts[0])): surrounding
 * whitespace, an optional sign, digits with single underscores between them. The value is
 * written to t as Python prints it (no '+', no leading zeros, "-0" is 0), so "007" and "7"
 * are one id; no size limit, as Python ints have none. Returns the length, 0 if not an
 * integer. t needs len + 1 bytes. */
static size_t prep_int_id(const char *s, size_t len, char *t) {
    size_t a = 0, b = len;
    while (a < b && prep_py_space(s[a])) a++;
    while (b > a && prep_py_space(s[b - 1])) b--;
    int neg = 0;
    if (a < b && (s[a] == '+' || s[a] == '-')) neg = s[a++] == '-';
    size_t digits = 0, k = (size_t)neg;
    for (size_t i = a; i < b; i++) {
        if (s[i] == '_') { /* only between two digits */
            if (!(i > a && prep_digit(s[i - 1]) && i + 1 < b && prep_digit(s[i + 1]))) return 0;
            continue;
        }
        if (!prep_digit(s[i])) return 0;
        digits++;
        if (k == (size_t)neg && s[i] == '0') continue; /* a leading zero */
        t[k++] = s[i];
    }
    if (digits == 0) return 0;
    if (k == (size_t)neg) return (t[0] = '0', 1); /* all zeros: 0, never -0 */
    if (neg) t[0] = '-';
    return k;
}

/* ------------------------------------------------------------------ JSON lines
 * read_from_amazon (REMI-SPEC b.1) does r = json.loads(line.strip()) and reads
 * r['reviewerID'], r['asin'] and float(r['unixReviewTime']). This is a strict parser
 * of one such line: it walks the whole value (so malformed JSON anywhere is refused, as
 * json.loads refuses it) and keeps only the three members asked for. Strings are decoded
 * in place in a copy of the line: an escape is never shorter than its UTF-8, so the write
 * position never passes the read position. Like json.loads it takes NaN, Infinity and
 * -Infinity as numbers, lets a repeated key's last value win and takes lone surrogates
 * (\ud800) in strings; an id holding one is refused, as Python could not write it out. */
#define PREP_JSON_DEPTH 512 /* json.loads hits Python's recursion limit near 1000 */

typedef struct {
    char *p, *end;
    const char *err; /* the first error, for the message */
} PrepJson;

/* What a kept member held: its type, the decoded string or the number's value. */
typedef struct {
    char type;      /* 0 missing, 's' string, '#' number, else the value's first byte: { [ t f n */
    int lone;       /* string with a lone surrogate */
    char *s;
    size_t len;
    double num;
} PrepJsonVal;

static int prep_json_fail(PrepJson *j, const char *msg) {
    if (!j->err) j->err = msg;
    return 0;
}

static void prep_json_ws(PrepJson *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static int prep_json_hex4(const char *p, const char *end, unsigned *v) {
    if (end - p < 4) return 0;
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int h = prep_digit(c) ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
        if (h < 0) return 0;
        *v = *v << 4 | (unsigned)h;
    }
    return 1;
}

/* Code point cp as UTF-8 at w (surrogates as their 3 bytes, "WTF-8"); returns the length. */
static int prep_utf8_put(char *w, unsigned cp) {
    if (cp < 0x80) { w[0] = (char)cp; return 1; }
    if (cp < 0x800) { w[0] = (char)(0xc0 | cp >> 6); w[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        w[0] = (char)(0xe0 | cp >> 12); w[1] = (char)(0x80 | (cp >> 6 & 0x3f)); w[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    w[0] = (char)(0xf0 | cp >> 18); w[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    w[2] = (char)(0x80 | (cp >> 6 & 0x3f)); w[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* One \uXXXX escape at r (after the backslash and u), a surrogate pair taken whole. */
static int prep_json_u(PrepJson *j, char **r, char **w, int *lone) {
    unsigned cp, lo;
    if (!prep_json_hex4(*r, j->end, &cp)) return prep_json_fail(j, "\\u needs four hex digits");
    *r += 4;
    if (cp >= 0xd800 && cp < 0xdc00 && j->end - *r >= 6 && (*r)[0] == '\\' && (*r)[1] == 'u' &&
        prep_json_hex4(*r + 2, j->end, &lo) && lo >= 0xdc00 && lo < 0xe000) {
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        *r += 6;
    } else if (cp >= 0xd800 && cp < 0xe000) *lone = 1;
    *w += prep_utf8_put(*w, cp);
    return 1;
}

/* A string at j->p (its opening quote), decoded in place into *s, *len. */
static int prep_json_string(PrepJson *j, char **s, size_t *len, int *lone) {
    char *r = j->p + 1, *w = r;
    *s = w;
    *lone = 0;
    for (;;) {
        if (r == j->end) return prep_json_fail(j, "unterminated string");
        unsigned char c = (unsigned char)*r++;
        if (c == '"') break;
        if (c < 0x20) return prep_json_fail(j, "control character in a string (JSON needs it escaped)");
        if (c != '\\') { *w++ = (char)c; continue; }
        if (r == j->end) return prep_json_fail(j, "unterminated string");
        static const char esc[] = "\"\\/bfnrt", val[] = "\"\\/\b\f\n\r\t";
        const char *e = *r ? strchr(esc, *r) : NULL;
        if (e) { *w++ = val[e - esc]; r++; continue; }
        if (*r++ != 'u') return prep_json_fail(j, "invalid escape in a string (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
        if (!prep_json_u(j, &r, &w, lone)) return 0;
    }
    *len = (size_t)(w - *s);
    j->p = r;
    return 1;
}

/* A number (JSON grammar, or NaN/Infinity/-Infinity as json.loads allows) into *v. */
static int prep_json_number(PrepJson *j, double *v) {
    char *p = j->p, *end = j->end;
    int neg = p < end && *p == '-';
    p += neg;
    static const char *word[2] = {"NaN", "Infinity"};
    for (int k = 0; k < 2; k++) {
        size_t n = strlen(word[k]);
        if ((size_t)(end - p) >= n && !memcmp(p, word[k], n) && (k || !neg)) {
            *v = k ? (neg ? -INFINITY : INFINITY) : NAN;
            j->p = p + n;
            return 1;
        }
    }
    if (p == end || !prep_digit(*p)) return prep_json_fail(j, "invalid value");
    if (*p == '0') p++; /* no leading zeros */
    else while (p < end && prep_digit(*p)) p++;
    if (p < end && *p == '.') {
        if (++p == end || !prep_digit(*p)) return prep_json_fail(j, "invalid number");
        while (p < end && prep_digit(*p)) p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p == end || !prep_digit(*p)) return prep_json_fail(j, "invalid number");
        while (p < end && prep_digit(*p)) p++;
    }
    char keep = *p; /* strtod needs a terminator; the grammar above already bounds it */
    *p = '\0';
    *v = strtod(j->p, NULL); /* correctly rounded, like Python's float(); 1e999 is inf, as there */
    *p = keep;
    j->p = p;
    return 1;
}

static int prep_json_value(PrepJson *j, PrepJsonVal *out, int depth);

/* An object or array at j->p; with keys, an object whose members named keys[k] are kept
 * in out[k] (keys may be NULL: keep nothing). */
static int prep_json_container(PrepJson *j, const char *const *keys, PrepJsonVal *out, int depth) {
    int obj = *j->p == '{';
    char close = obj ? '}' : ']';
    if (depth >= PREP_JSON_DEPTH) return prep_json_fail(j, "nested more than 512 levels deep");
    j->p++;
    prep_json_ws(j);
    if (j->p < j->end && *j->p == close) { j->p++; return 1; }
    for (;;) {
        PrepJsonVal *slot = NULL;
        if (obj) {
            char *k;
            size_t klen;
            int lone;
            if (j->p == j->end || *j->p != '"') return prep_json_fail(j, "expected a \"key\" in an object");
            if (!prep_json_string(j, &k, &klen, &lone)) return 0;
            for (int i = 0; keys && i < 3; i++)
                if (strlen(keys[i]) == klen && !memcmp(keys[i], k, klen)) slot = &out[i];
            prep_json_ws(j);
            if (j->p == j->end || *j->p != ':') return prep_json_fail(j, "expected ':' after a key");
            j->p++;
            prep_json_ws(j);
        }
        if (!prep_json_value(j, slot, depth + 1)) return 0;
        prep_json_ws(j);
        if (j->p < j->end && *j->p == close) { j->p++; return 1; }
        if (j->p == j->end || *j->p != ',')
            return prep_json_fail(j, obj ? "expected ',' or '}' in an object" : "expected ',' or ']' in an array");
        j->p++;
        prep_json_ws(j);
    }
}

/* Any value at j->p; out (if not NULL) gets its type and, for strings and numbers, its value. */
static int prep_json_value(PrepJson *j, PrepJsonVal *out, int depth) {
    PrepJsonVal v = {0};
    if (j->p == j->end) return prep_json_fail(j, "a value is missing");
    char c = *j->p;
    v.type = c;
    if (c == '"') {
        v.type = 's';
        if (!prep_json_string(j, &v.s, &v.len, &v.lone)) return 0;
    } else if (c == '{' || c == '[') {
        if (!prep_json_container(j, NULL, NULL, depth)) return 0;
    } else if (c == 't' || c == 'f' || c == 'n') {
        const char *w = c == 't' ? "true" : c == 'f' ? "false" : "null";
        size_t n = strlen(w);
        if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n)) return prep_json_fail(j, "invalid value");
        j->p += n;
    } else {
        v.type = '#';
        if (!prep_json_number(j, &v.num)) return 0;
    }
    if (out) *out = v; /* a repeated key: the last value wins, as in a Python dict */
    return 1;
}

/* Bytes [s, s+n) are valid UTF-8, as Python's strict decoder of the file wants: no
 * overlong forms, no encoded surrogates, nothing beyond U+10FFFF. */
static int prep_utf8_valid(const unsigned char *s, size_t n) {
    static const unsigned min_cp[4] = {0, 0x80, 0x800, 0x10000};
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        int k = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : -1;
        if (k < 0) return 0;
        unsigned cp = c & (0x7fu >> k); /* the lead byte's payload bits */
        for (int m = 1; m <= k; m++) {
            if (i + (size_t)m >= n || (s[i + m] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + m] & 0x3f);
        }
        if (cp < min_cp[k] || cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) return 0;
        i += (size_t)k + 1;
    }
    return 1;
}

static void prep_add(PrepData *d, int user, int item, double time) {
    if (d->n_ev == d->cap_ev) {
        d->cap_ev = d->cap_ev ? 2 * d->cap_ev : 65536;
        d->ev = xrealloc(d->ev, d->cap_ev * sizeof *d->ev);
    }
    d->ev[d->n_ev++] = (PrepEvent){user, item, time};
}

/* Intern a user or item id; with --int-ids through Python's int() first, so the id kept
 * (and written to the map) is the integer as Python prints it. */
static int prep_intern(PrepData *d, PrepIds *t, const PrepOpts *o, const char *s, size_t len,
                       long lineno, const char *line, const char *what) {
    long bad = find_control(s, len); /* a tab in a comma-separated column, a JSON escape */
    if (bad >= 0)
        prep_bad_line(o, lineno, line, "the %s id holds %s; raw ids hold no control characters", what,
                      control_name((unsigned char)s[bad]));
    if (!o->int_ids) return prep_ids_intern(t, s, len);
    if (len + 2 > d->cap_id) {
        d->cap_id = 2 * len + 64;
        d->id = xrealloc(d->id, d->cap_id);
    }
    size_t k = prep_int_id(s, len, d->id);
    if (!k)
        prep_bad_line(o, lineno, line, "the %s id \"%.*s\" is not an integer, which --int-ids "
                      "(Python's int(), as the RecBole readers use) needs", what, (int)(len > 40 ? 40 : len), s);
    return prep_ids_intern(t, d->id, k);
}

/* A field that opens a double quote the separator then cuts ("Smith, J" in a comma-separated
 * file): the columns after it would be read shifted, silently. Fields are split at every
 * separator, as the reference's split() does; CSV quoting is not read, so such a line is refused.
 * A quote is left open when the field holds an odd number of them (CSV doubles a quote inside
 * quotes): "Weird Al" Yankovic, a whole field, is an id like any other. */
static void prep_check_quote(const PrepOpts *o, long lineno, const char *line, const char *s, size_t len, int col) {
    if (len == 0 || s[0] != '"') return;
    size_t quotes = 0;
    for (size_t i = 0; i < len; i++) quotes += s[i] == '"';
    if (quotes % 2)
        prep_bad_line(o, lineno, line, "field %d (%.*s) opens a quote that a separator (%s) cuts: fields are split at "
                      "every separator, as the reference's split() does, with no CSV quoting; remove the quotes and the "
                      "separators inside them, or give another --sep", col, (int)(len > 40 ? 40 : len), s,
                      prep_sep_name(o->sep));
}

/* Why a time field is not a number, for the message: a first line's field without a digit is
 * likely a header's name; one with a date's '-' and a time's ':' an ISO 8601 time. */
static const char *prep_time_not_number(const char *s, size_t n, int first_line) {
    int digits = 0;
    for (size_t i = 0; i < n; i++) digits |= s[i] >= '0' && s[i] <= '9';
    if (!digits) return first_line ? "not a number (a header line? give --header)" : "not a number";
    if (memchr(s, '-', n) && memchr(s, ':', n)) return "not a number (a date and time? give --time-format iso8601)";
    return "not a number";
}

/* One "pairs" line: the user, item and (optional) time columns; extra columns are ignored.
 * Without a time column the time is the 1-based line number, header included. A line
 * whose --keep-col is not --keep-value is skipped once it has the columns (Taobao's
 * reader: if conts[3] != 'pv': continue). */
static void prep_parse_pair(PrepData *d, const PrepOpts *o, long lineno, const char *line, size_t n) {
    int need = o->ucol > o->icol ? o->ucol : o->icol;
    if (o->tcol > need) need = o->tcol;
    if (o->keep_col > need) need = o->keep_col;
    need++;
    const char *fs[4] = {0}; /* user, item, time, keep */
    size_t fl[4] = {0};
    PrepFields f = {line, line + n, o->sep, 0};
    const char *s;
    size_t len;
    int col = 0;
    for (; col < need && prep_next_field(&f, &s, &len); col++) {
        prep_check_quote(o, lineno, line, s, len, col);
        if (col == o->ucol) fs[0] = s, fl[0] = len;
        if (col == o->icol) fs[1] = s, fl[1] = len;
        if (col == o->tcol) fs[2] = s, fl[2] = len;
        if (col == o->keep_col) fs[3] = s, fl[3] = len;
    }
    if (col < need)
        prep_bad_line(o, lineno, line, "found %d column%s separated by %s, need at least %d "
                      "(user column %d, item column %d%s%s)%s", col, col == 1 ? "" : "s",
                      prep_sep_name(o->sep), need, o->ucol, o->icol,
                      o->tcol >= 0 ? ", time column given by --time-col" : "",
                      o->keep_col >= 0 ? ", --keep-col" : "",
                      col == 1 && o->sep && memchr(line, ' ', n) ? "; the line holds spaces: --sep space, or --format "
                      "sequence for \"user item item ...\" lines?" : "");
    if (o->keep_col >= 0 && (fl[3] != strlen(o->keep_value) || memcmp(fs[3], o->keep_value, fl[3]))) {
        d->n_skipped++;
        return;
    }
    if (fl[0] == 0) prep_bad_line(o, lineno, line, "empty user id (column %d)", o->ucol);
    if (fl[1] == 0) prep_bad_line(o, lineno, line, "empty item id (column %d)", o->icol);
    double t = (double)lineno;
    if (o->tcol >= 0 && o->iso_time && !prep_parse_iso(fs[2], fl[2], &t))
        prep_bad_line(o, lineno, line, "time column %d (\"%.*s\") is not a valid YYYY-MM-DDTHH:MM:SSZ time",
                      o->tcol, (int)(fl[2] > 40 ? 40 : fl[2]), fs[2]);
    int got = o->tcol >= 0 && !o->iso_time ? prep_parse_time(fs[2], fl[2], &t) : 1;
    if (got != 1)
        prep_bad_line(o, lineno, line, "time column %d (\"%.*s\") is %s", o->tcol, (int)(fl[2] > 40 ? 40 : fl[2]), fs[2],
                      got < 0 ? "out of range: times lie strictly between -2^63 and 2^63"
                              : prep_time_not_number(fs[2], fl[2], lineno == 1 && !o->header));
    int user = prep_intern(d, &d->users, o, fs[0], fl[0], lineno, line, "user");
    prep_add(d, user, prep_intern(d, &d->items, o, fs[1], fl[1], lineno, line, "item"), t);
}

/* One "sequence" line: user item item ...; the time of each interaction is a running
 * 1-based counter over the whole file, so file order is time order. A "sessions" line holds
 * items only: its user is the 1-based line number (header included, as awk's NR). */
static void prep_parse_sequence(PrepData *d, const PrepOpts *o, long lineno, const char *line,
                                size_t n, double *counter) {
    PrepFields f = {line, line + n, o->sep, 0};
    const char *s = line;
    size_t len = 0;
    int sessions = o->format == PREP_SESSIONS, user;
    if (sessions) {
        char id[24];
        user = prep_intern(d, &d->users, o, id, (size_t)snprintf(id, sizeof id, "%ld", lineno), lineno, line, "user");
    } else {
        prep_next_field(&f, &s, &len); /* the line is not blank, so there is a first field */
        if (len == 0) prep_bad_line(o, lineno, line, "empty user id (first field)");
        prep_check_quote(o, lineno, line, s, len, 0);
        user = prep_intern(d, &d->users, o, s, len, lineno, line, "user");
    }
    int n_items = 0;
    while (prep_next_field(&f, &s, &len)) {
        if (len == 0)
            prep_bad_line(o, lineno, line, "empty item id (field %d, separator %s)", n_items + 2 - sessions,
                          prep_sep_name(o->sep));
        prep_check_quote(o, lineno, line, s, len, n_items + 1 - sessions);
        prep_add(d, user, prep_intern(d, &d->items, o, s, len, lineno, line, "item"), ++*counter);
        n_items++;
    }
    if (n_items == 0)
        prep_bad_line(o, lineno, line, "a user but no items; expected \"user item item ...\" "
                      "separated by %s", prep_sep_name(o->sep));
}

/* The type of a JSON value, for messages. */
static const char *prep_json_type(char type) {
    switch (type) {
    case 's': return "a string";
    case '#': return "a number";
    case '{': return "an object";
    case '[': return "an array";
    case 't': case 'f': return "a boolean";
    default: return "null";
    }
}

/* One JSON line (read_from_amazon): the user and item members must be strings (a number
 * would become a dict key of another type, printed with Python's repr rules: refused
 * rather than imitated); the time a number or a string float() reads. The time is kept
 * as float, unlike the other readers: REMI-SPEC b.1's ts = float(r['unixReviewTime']). */
static void prep_parse_json(PrepData *d, const PrepOpts *o, long lineno, const char *line, size_t n) {
    if (!prep_utf8_valid((const unsigned char *)line, n))
        prep_bad_line(o, lineno, line, "not valid UTF-8 (Python's reader would stop here too)");
    if (n + 1 > d->cap_json) {
        d->cap_json = 2 * n + 64;
        d->json = xrealloc(d->json, d->cap_json);
    }
    memcpy(d->json, line, n + 1); /* decoded in place; line stays intact for messages */
    size_t a = 0, b = n; /* line.strip() */
    while (a < b && prep_py_space(line[a])) a++;
    while (b > a && prep_py_space(line[b - 1])) b--;
    PrepJson j = {d->json + a, d->json + b, NULL};
    const char *keys[3] = {o->ukey, o->ikey, o->tkey};
    PrepJsonVal v[3] = {{0}};
    prep_json_ws(&j);
    if (j.p == j.end || *j.p != '{') prep_bad_line(o, lineno, line, "expected a JSON object {...}");
    if (!prep_json_container(&j, keys, v, 0)) prep_bad_line(o, lineno, line, "malformed JSON: %s", j.err);
    prep_json_ws(&j);
    if (j.p != j.end) prep_bad_line(o, lineno, line, "malformed JSON: extra text after the object");
    for (int k = 0; k < 3; k++)
        if (!v[k].type) prep_bad_line(o, lineno, line, "no \"%s\" key (--%s-key)", keys[k], k == 0 ? "user" : k == 1 ? "item" : "time");
    for (int k = 0; k < 2; k++) {
        const char *what = k ? "item" : "user";
        if (v[k].type != 's')
            prep_bad_line(o, lineno, line, "the %s id \"%s\" is %s; remi takes string ids only", what, keys[k],
                          prep_json_type(v[k].type));
        if (v[k].lone)
            prep_bad_line(o, lineno, line, "the %s id \"%s\" holds a lone UTF-16 surrogate, which "
                          "Python cannot write as UTF-8", what, keys[k]);
        if (v[k].len == 0) prep_bad_line(o, lineno, line, "the %s id \"%s\" is empty", what, keys[k]);
    }
    double t = v[2].num; /* got: 1, 0 (not a number), -1 (beyond +-2^63, infinities too), as prep_parse_float */
    int got = v[2].type == '#' ? (isnan(t) ? 0 : fabs(t) < 9223372036854775808.0 ? 1 : -1)
            : v[2].type == 's' ? prep_parse_float(v[2].s, v[2].len, &t) : 0;
    if (got < 0)
        prep_bad_line(o, lineno, line, "the time \"%s\" is out of range: times lie strictly between -2^63 and 2^63", keys[2]);
    if (!got)
        prep_bad_line(o, lineno, line, "the time \"%s\" is %s; it must be a finite number or a string holding one", keys[2],
                      v[2].type == '#' ? "NaN" : v[2].type == 's' ? "a string that is not a number" : prep_json_type(v[2].type));
    int user = prep_intern(d, &d->users, o, v[0].s, v[0].len, lineno, line, "user");
    prep_add(d, user, prep_intern(d, &d->items, o, v[1].s, v[1].len, lineno, line, "item"), t);
}

/* Read and validate the whole input. CRLF is accepted; a blank line is an error, except
 * that the file may end with a single newline. */
static void prep_read(PrepData *d, const PrepOpts *o) {
    FILE *f = xfopen(o->input, "rb", "check --input");
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    long lineno = 0;
    double counter = 0;
    while ((got = getline(&line, &cap, f)) != -1) {
        size_t n = (size_t)got;
        lineno++;
        if (o->header && lineno == 1) continue;
        if (memchr(line, '\0', n)) prep_bad_line(o, lineno, line, "line contains a NUL byte");
        if (starts_with_bom(lineno, line)) prep_bad_line(o, lineno, line, BOM_MESSAGE);
        if (n && line[n - 1] == '\n') line[--n] = '\0';
        if (n && line[n - 1] == '\r') line[--n] = '\0';
        if (memchr(line, '\r', n))
            prep_bad_line(o, lineno, line, "a carriage return (\\r) inside the line: lines end in \\n or \\r\\n "
                          "(Python's reader would end a line at a lone \\r)");
        if (strspn(line, " \t") == n)
            prep_bad_line(o, lineno, line, "blank line; remove it (only a single newline may end the file)");
        if (o->format == PREP_SEQUENCE || o->format == PREP_SESSIONS) prep_parse_sequence(d, o, lineno, line, n, &counter);
        else if (o->format == PREP_JSON) prep_parse_json(d, o, lineno, line, n);
        else prep_parse_pair(d, o, lineno, line, n);
    }
    if (ferror(f)) die("error reading %s: %s", o->input, strerror(errno));
    free(line);
    fclose(f);
    free(d->json); free(d->id);
    d->json = d->id = NULL;
    if (d->n_ev == 0 && d->n_skipped)
        die("%s: no interactions: none of the %zu lines has \"%s\" in column %d (--keep-col, --keep-value)",
            o->input, d->n_skipped, o->keep_value, o->keep_col);
    if (d->n_ev == 0)
        die("%s: empty file: no interactions%s", o->input, o->header ? " after the header line" : "");
}

/* ------------------------------------------------------------------ filter, shuffle, write */

/* Items by count descending, ties by first-seen index (= Python's stable sort). */
static const int *prep_sort_count;
static int prep_cmp_item(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (prep_sort_count[x] != prep_sort_count[y]) return prep_sort_count[x] > prep_sort_count[y] ? -1 : 1;
    return (x > y) - (x < y);
}

/* One user's kept interaction: time, position in file order (the tie-break that makes
 * qsort stable), new item id. */
typedef struct { double time; size_t pos; int item; } PrepKept;
static int prep_cmp_kept(const void *a, const void *b) {
    const PrepKept *x = a, *y = b;
    if (x->time != y->time) return x->time < y->time ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* --preset: the options of each file the paper prepares (REMI-SPEC b.1). Explicit flags
 * given beside --preset override it; a switch it turns on (--header, --int-ids) stays on. */
typedef struct {
    const char *name, *file;
    const char *format, *sep, *time_format;
    int header, ucol, icol, tcol, keep_col, int_ids, min;
    const char *keep_value;
} PrepPreset;

static const PrepPreset PREP_PRESETS[] = {
    /* read_from_amazon: r['reviewerID'], r['asin'], float(r['unixReviewTime']) */
    { "book", "reviews_Books_5.json", "json", NULL, "number", 0, 0, 1, -1, -1, 0, 5, NULL },
    /* read_from_gowalla: int(conts[0]), int(conts[1]), int(float(conts[2])); the reference
     * reads no header, so RecBole's header line must be removed by hand there */
    { "gowalla", "gowalla.inter", "pairs", "tab", "number", 1, 0, 1, 2, -1, 1, 5, NULL },
    { "gowalla10", "gowalla.inter", "pairs", "tab", "number", 1, 0, 1, 2, -1, 1, 10, NULL },
    /* read_from_rocket: int(conts[1]), int(conts[2]), int(float(conts[0])) */
    { "rocket", "retailrocket-view.inter", "pairs", "tab", "number", 1, 1, 2, 0, -1, 1, 5, NULL },
    /* Kaggle's events.csv: timestamp,visitorid,event,itemid,transactionid; views only */
    { "rocket-events", "events.csv", "pairs", "comma", "number", 1, 1, 3, 0, 2, 1, 5, "view" },
    /* SNAP: user, check-in time, latitude, longitude, location id */
    { "gowalla-snap", "loc-gowalla_totalCheckins.txt", "pairs", "tab", "iso8601", 0, 0, 4, 1, -1, 1, 5, NULL },
};
#define PREP_N_PRESETS (int)(sizeof PREP_PRESETS / sizeof *PREP_PRESETS)

static const char *PREP_WHAT =
    "Turn an interaction log into NAME_{train,valid,test}.txt, NAME_user_map.txt and\n"
    "NAME_item_map.txt in --out, exactly as the reference process/data.py does\n"
    "(REMI-SPEC b.2): items with >= --min interactions, then users with >= --min\n"
    "interactions on those items, users shuffled (Python random, --seed) and split 8:1:1.\n"
    "Without a time column the time is the 1-based line number, header included (pairs),\n"
    "or a running 1-based interaction counter (sequence, sessions); ties in time keep file order.\n"
    "Output lines: user_id,item_id,index,timestamp; maps: raw_id,new_id.\n"
    "\n"
    "Presets (--preset NAME; flags given beside it override it):\n"
    "  book           reviews_Books_5.json: --format json (reviewerID, asin, unixReviewTime)\n"
    "  gowalla        RecBole gowalla.inter: --header --user-col 0 --item-col 1 --time-col 2 --int-ids\n"
    "  gowalla10      the same with --min 10\n"
    "  rocket         RecBole retailrocket-view.inter: --header --user-col 1 --item-col 2 --time-col 0 --int-ids\n"
    "  rocket-events  Kaggle events.csv: --sep comma --header --keep-col 2 --keep-value view\n"
    "                 --user-col 1 --item-col 3 --time-col 0 --int-ids\n"
    "  gowalla-snap   SNAP loc-gowalla_totalCheckins.txt: --user-col 0 --item-col 4 --time-col 1\n"
    "                 --time-format iso8601 --int-ids";

/* Apply --preset NAME to o and the string options, before parse_flags reads the rest. */
static void prep_apply_preset(const char *name, PrepOpts *o, const char **format, const char **sep,
                              const char **time_format) {
    const PrepPreset *p = NULL;
    for (int i = 0; i < PREP_N_PRESETS && !p; i++) if (!strcmp(name, PREP_PRESETS[i].name)) p = &PREP_PRESETS[i];
    if (!p) die("prep: unknown --preset \"%s\"; expected book, gowalla, gowalla10, rocket, rocket-events "
                "or gowalla-snap (see remi prep --help)", name);
    *format = p->format;
    *sep = p->sep;
    *time_format = p->time_format;
    o->header = p->header;
    o->ucol = p->ucol, o->icol = p->icol, o->tcol = p->tcol;
    o->keep_col = p->keep_col, o->keep_value = p->keep_value;
    o->int_ids = p->int_ids;
    o->min = p->min;
}

/* The value of --preset in argv, stepping over the values of the other flags. */
static const char *prep_find_preset(int argc, char **argv, const Flag *flags, int nf) {
    const char *preset = NULL;
    for (int i = 1; i < argc; i++) {
        const Flag *f = NULL;
        for (int j = 0; j < nf && !f; j++) if (!strcmp(argv[i], flags[j].name)) f = &flags[j];
        if (!f || f->type == F_BOOL) continue; /* parse_flags reports unknown flags */
        if (!strcmp(argv[i], "--preset") && i + 1 < argc) preset = argv[i + 1];
        i++;
    }
    return preset;
}

static int prep_parse_format(const char *format) {
    if (!strcmp(format, "pairs")) return PREP_PAIRS;
    if (!strcmp(format, "sequence")) return PREP_SEQUENCE;
    if (!strcmp(format, "json")) return PREP_JSON;
    if (!strcmp(format, "sessions")) return PREP_SESSIONS;
    die("prep: --format must be pairs, sequence, sessions or json, got \"%s\"", format);
}

static int prep_parse_sep(const char *sep, int format) {
    if (!sep) return format == PREP_SEQUENCE || format == PREP_SESSIONS ? 0 : '\t';
    if (!strcmp(sep, "tab")) return '\t';
    if (!strcmp(sep, "comma")) return ',';
    if (!strcmp(sep, "semicolon")) return ';';
    if (!strcmp(sep, "space") || !strcmp(sep, "whitespace") || !strcmp(sep, " ")) return 0;
    if (strlen(sep) == 1 && sep[0] != '\r' && sep[0] != '\n') return (unsigned char)sep[0];
    die("prep: --sep must be tab, comma, semicolon, space or one character, got \"%s\"", sep);
}

/* Checks that flags fit the format and each other. */
static void prep_check_opts(const PrepOpts *o, const char *sep, const char *time_format) {
    check_range("--user-col", o->ucol, 0, 1000000);
    check_range("--item-col", o->icol, 0, 1000000);
    check_range("--time-col", o->tcol, -1, 1000000);
    check_range("--keep-col", o->keep_col, -1, 1000000);
    if (o->min < 2) die("prep: --min = %d: must be at least 2, since every user needs a history and a target", o->min);
    if (strcmp(time_format, "number") && strcmp(time_format, "iso8601"))
        die("prep: --time-format must be number or iso8601, got \"%s\"", time_format);
    if ((o->keep_col >= 0) != (o->keep_value != NULL))
        die("prep: --keep-col and --keep-value go together");
    if (o->format != PREP_PAIRS && (o->ucol != 0 || o->icol != 1 || o->tcol != -1 || o->keep_col != -1 || o->iso_time))
        die("prep: --user-col, --item-col, --time-col, --keep-col and --time-format apply to --format pairs only");
    if (o->format == PREP_PAIRS && (o->ucol == o->icol || o->ucol == o->tcol || o->icol == o->tcol))
        die("prep: --user-col, --item-col and --time-col must be different columns");
    if (o->iso_time && o->tcol < 0) die("prep: --time-format iso8601 needs a --time-col");
    if (o->format == PREP_JSON && sep) die("prep: --sep does not apply to --format json");
    if (o->format != PREP_JSON &&
        (strcmp(o->ukey, "reviewerID") || strcmp(o->ikey, "asin") || strcmp(o->tkey, "unixReviewTime")))
        die("prep: --user-key, --item-key and --time-key apply to --format json only");
    if (!strcmp(o->ukey, o->ikey) || !strcmp(o->ukey, o->tkey) || !strcmp(o->ikey, o->tkey))
        die("prep: --user-key, --item-key and --time-key must be different keys");
}

/* The filter and split's plan (REMI-SPEC b.2). */
typedef struct {
    int *count;          /* (items) interactions of each item, duplicates too */
    int *rank;           /* (items) item indices by count, descending */
    int *new_item;       /* (items) 0 = dropped, else its new id 1..n_kept_items */
    int n_kept_items;
    size_t *off, *ev_of; /* user u's events are ev_of[off[u]..off[u+1]), in file order */
    int *kept_of;        /* (users) each user's interactions on kept items */
    int *order;          /* (U) kept users in first-seen order, then shuffled: user id = position */
    int U, max_len;      /* kept users, the most kept interactions of one */
    size_t total;        /* kept interactions */
} PrepPlan;

/* Items: count every interaction (duplicates too), rank, keep the prefix >= min. */
static void prep_keep_items(PrepPlan *p, const PrepData *d, int min) {
    int n_items = d->items.n;
    p->count = xcalloc((size_t)n_items, sizeof *p->count);
    for (size_t e = 0; e < d->n_ev; e++) p->count[d->ev[e].item]++;
    p->rank = xmalloc((size_t)n_items * sizeof *p->rank);
    for (int i = 0; i < n_items; i++) p->rank[i] = i;
    prep_sort_count = p->count;
    qsort(p->rank, (size_t)n_items, sizeof *p->rank, prep_cmp_item);
    p->n_kept_items = 0;
    while (p->n_kept_items < n_items && p->count[p->rank[p->n_kept_items]] >= min) p->n_kept_items++;
    p->new_item = xcalloc((size_t)n_items, sizeof *p->new_item);
    for (int r = 0; r < p->n_kept_items; r++) p->new_item[p->rank[r]] = r + 1;
}

/* Users: group events by user (counting sort, stable in file order), keep those with min or
 * more interactions on kept items, in first-seen order. */
static void prep_keep_users(PrepPlan *p, const PrepData *d, int min) {
    int n_users = d->users.n;
    p->off = xcalloc((size_t)n_users + 1, sizeof *p->off);
    p->kept_of = xcalloc((size_t)n_users, sizeof *p->kept_of);
    for (size_t e = 0; e < d->n_ev; e++) {
        p->off[d->ev[e].user + 1]++;
        if (p->new_item[d->ev[e].item]) p->kept_of[d->ev[e].user]++;
    }
    for (int u = 0; u < n_users; u++) p->off[u + 1] += p->off[u];
    size_t *fill = xmalloc((size_t)n_users * sizeof *fill);
    p->ev_of = xmalloc(d->n_ev * sizeof *p->ev_of);
    memcpy(fill, p->off, (size_t)n_users * sizeof *fill);
    for (size_t e = 0; e < d->n_ev; e++) p->ev_of[fill[d->ev[e].user]++] = e;
    free(fill);
    p->order = xmalloc((size_t)n_users * sizeof *p->order);
    p->U = 0; p->max_len = 0; p->total = 0;
    for (int u = 0; u < n_users; u++)
        if (p->kept_of[u] >= min) {
            p->order[p->U++] = u;
            p->total += (size_t)p->kept_of[u];
            if (p->kept_of[u] > p->max_len) p->max_len = p->kept_of[u];
        }
}

/* The five files, each whole or not at all: the maps, then per user (in shuffled order) the
 * kept interactions stable-sorted by time and indexed 0,1,2,..., into the split of its
 * position (< split1 train, < split2 valid, else test); n_split: interactions per split. */
static void prep_write(const PrepOpts *o, const PrepData *d, const PrepPlan *p, int split1, int split2,
                       size_t n_split[3]) {
    if (strlen(o->out) + strlen(o->name) + 64 > 4096) die("prep: --out and --name make output paths too long");
    mkdir_p(o->out);
    static const char *suffix[5] = {"train", "valid", "test", "user_map", "item_map"};
    FILE *out[5];
    char path[4096];
    for (int k = 0; k < 5; k++) {
        if ((size_t)snprintf(path, sizeof path, "%s/%s_%s.txt", o->out, o->name, suffix[k]) >= sizeof path)
            die("prep: output path too long: %s/%s_%s.txt", o->out, o->name, suffix[k]);
        out[k] = atomic_open(path);
    }
    for (int q = 0; q < p->U; q++) fprintf(out[3], "%s,%d\n", prep_id(&d->users, p->order[q]), q);
    for (int r = 0; r < p->n_kept_items; r++) fprintf(out[4], "%s,%d\n", prep_id(&d->items, p->rank[r]), r + 1);
    PrepKept *kept = xmalloc((size_t)p->max_len * sizeof *kept);
    for (int q = 0; q < p->U; q++) {
        int u = p->order[q], n = 0, k = q < split1 ? 0 : q < split2 ? 1 : 2;
        for (size_t i = p->off[u]; i < p->off[u + 1]; i++) {
            const PrepEvent *e = &d->ev[p->ev_of[i]];
            if (p->new_item[e->item]) kept[n++] = (PrepKept){e->time, i, p->new_item[e->item]};
        }
        qsort(kept, (size_t)n, sizeof *kept, prep_cmp_kept);
        for (int i = 0; i < n; i++)
            fprintf(out[k], "%d,%d,%d,%lld\n", q, kept[i].item, i, (long long)kept[i].time); /* '%d' truncates */
        n_split[k] += (size_t)n;
    }
    free(kept);
    atomic_commit_all(out, 5);
}

/* Without a time column the file's order is the time. Files of unordered (set) data, as
 * LightGCN's or CaseRecommender's, list each user's items by ascending id instead; a note
 * when (almost) every user's integer item ids ascend in file order, since the split then
 * takes each user's highest ids as the evaluation targets. Users of 3+ interactions count. */
static void prep_note_sorted_ids(const PrepData *d, const PrepOpts *o) {
    if (o->format == PREP_JSON || (o->format == PREP_PAIRS && o->tcol >= 0)) return;
    int U = d->users.n;
    long long *last = xmalloc((size_t)U * sizeof *last);
    int *seen = xcalloc((size_t)U, sizeof *seen);
    unsigned char *up = xmalloc((size_t)U);
    memset(up, 1, (size_t)U);
    int ints = 1, n = 0, asc = 0;
    for (size_t i = 0; i < d->n_ev && ints; i++) {
        int u = d->ev[i].user;
        char *end;
        const char *id = prep_id(&d->items, d->ev[i].item);
        errno = 0;
        long long v = strtoll(id, &end, 10);
        ints = *id && !*end && !errno; /* other ids: no order to look at */
        if (seen[u]++ && v < last[u]) up[u] = 0;
        last[u] = v;
    }
    for (int u = 0; u < U; u++)
        if (seen[u] >= 3) { n++; asc += up[u]; }
    if (ints && n >= 20 && asc >= 0.9 * n)
        fprintf(stderr, "remi: note: %s has no time %s, so its order is the time, but %d of %d users (%.0f%%) list "
                "their items by ascending id: if the file holds unordered (set) data, each user's highest ids "
                "become the evaluation targets; shuffle each user's items first%s\n", o->input,
                o->format == PREP_PAIRS ? "column" : "in its lines", asc, n, 100.0 * asc / n,
                o->format == PREP_PAIRS ? ", or give a --time-col" : "");
    free(last); free(seen); free(up);
}

int cmd_prep(int argc, char **argv) {
    PrepOpts o = { .out = "data", .ucol = 0, .icol = 1, .tcol = -1, .keep_col = -1, .min = 5, .seed = 1230,
                   .ukey = "reviewerID", .ikey = "asin", .tkey = "unixReviewTime" };
    const char *format = "pairs", *sep = NULL, *time_format = "number", *preset = NULL;
    Flag flags[] = {
        { "--input", F_STR, &o.input, "interaction file (required)" },
        { "--name", F_STR, &o.name, "dataset name, prefix of the output files (required)" },
        { "--out", F_STR, &o.out, "output folder, created if missing" },
        { "--preset", F_STR, &preset, "options of a paper file: book, gowalla, gowalla10, rocket, rocket-events, gowalla-snap" },
        { "--format", F_STR, &format, "pairs (user, item[, time] columns), sequence (user item item ...), sessions "
                                      "(item item ...: the user is the line number) or json (one object a line)" },
        { "--sep", F_STR, &sep, "tab, comma, semicolon, space (runs of blanks) or one character;"
                                " none: tab for pairs, space for sequence and sessions" },
        { "--header", F_BOOL, &o.header, "skip the first line" },
        { "--user-col", F_INT, &o.ucol, "0-based user column (pairs)" },
        { "--item-col", F_INT, &o.icol, "0-based item column (pairs)" },
        { "--time-col", F_INT, &o.tcol, "0-based time column (pairs), read as int(float(x)); -1 = none" },
        { "--time-format", F_STR, &time_format, "number (int(float(x))) or iso8601 (YYYY-MM-DDTHH:MM:SSZ, UTC)" },
        { "--keep-col", F_INT, &o.keep_col, "0-based column (pairs): keep only lines where it is --keep-value; -1 = all" },
        { "--keep-value", F_STR, &o.keep_value, "the value --keep-col must have, exactly" },
        { "--int-ids", F_BOOL, &o.int_ids, "read ids as Python int() does (\"007\" = \"7\", written 7)" },
        { "--user-key", F_STR, &o.ukey, "json: member holding the user id (a string)" },
        { "--item-key", F_STR, &o.ikey, "json: member holding the item id (a string)" },
        { "--time-key", F_STR, &o.tkey, "json: member holding the time (number or numeric string, kept as float)" },
        { "--min", F_INT, &o.min, "filter size for items and users" },
        { "--seed", F_U64, &o.seed, "Python random.seed of the user shuffle" },
    };
    int nf = (int)(sizeof flags / sizeof *flags);
    const char *pre = prep_find_preset(argc, argv, flags, nf);
    if (pre) prep_apply_preset(pre, &o, &format, &sep, &time_format);
    parse_flags(argc, argv, "prep", PREP_WHAT, flags, nf);
    if (!o.input) die("prep: --input FILE is required; see remi prep --help");
    if (!o.name) die("prep: --name NAME is required; see remi prep --help");
    if (!o.name[0] || strchr(o.name, '/'))
        die("prep: --name must be non-empty and contain no '/', got \"%s\"", o.name);
    if (!o.out[0]) die("prep: --out must not be empty");
    o.format = prep_parse_format(format);
    o.iso_time = !strcmp(time_format, "iso8601");
    prep_check_opts(&o, sep, time_format);
    o.sep = prep_parse_sep(sep, o.format);

    double t0 = now_sec();
    PrepData d = {0};
    prep_read(&d, &o);
    int n_users = d.users.n, n_items = d.items.n;
    PrepPlan p;
    prep_keep_items(&p, &d, o.min);
    prep_keep_users(&p, &d, o.min);
    int U = p.U;
    if (U == 0)
        die("%s: no user left after filtering: no user has %d or more interactions on items "
            "with %d or more interactions (%d users, %d items read, %d items kept); try a lower --min",
            o.input, o.min, o.min, n_users, n_items, p.n_kept_items);
    if ((uint64_t)U > UINT32_MAX) die("too many users to shuffle");

    /* shuffle; the user id is the position; first int(0.8U) train, up to int(0.9U) valid */
    PrepMT mt;
    prep_py_seed(&mt, o.seed);
    prep_py_shuffle(&mt, p.order, U);
    int split1 = (int)(U * 0.8), split2 = (int)(U * 0.9); /* in double, as Python does */
    if (split1 == 0 || split2 == split1 || split2 == U)
        die("%s: %d user(s) left after filtering: too few for a training, a validation and a test split "
            "(%d, %d, %d users); at least 6 are needed", o.input, U, split1, split2 - split1, U - split2);

    size_t n_split[3] = {0}; /* all input is valid: only now touch the output folder */
    prep_write(&o, &d, &p, split1, split2, n_split);

    printf("prep %s: read %zu interactions, %d users, %d items from %s", o.name, d.n_ev, n_users, n_items, o.input);
    if (o.keep_col >= 0) printf(" (%zu lines without %s in column %d skipped)", d.n_skipped, o.keep_value, o.keep_col);
    printf("\n");
    printf("prep %s: kept %d users (train %d, valid %d, test %d), %d items, %zu interactions "
           "(train %zu, valid %zu, test %zu), %.4f per user\n",
           o.name, U, split1, split2 - split1, U - split2, p.n_kept_items, p.total,
           n_split[0], n_split[1], n_split[2], (double)p.total / U);
    printf("prep %s: wrote %s/%s_{train,valid,test,user_map,item_map}.txt in %.2f s\n",
           o.name, o.out, o.name, now_sec() - t0);
    fflush(stdout);
    prep_note_sorted_ids(&d, &o);

    free(p.order); free(p.ev_of); free(p.kept_of); free(p.off);
    free(p.new_item); free(p.rank); free(p.count); free(d.ev);
    prep_ids_free(&d.users);
    prep_ids_free(&d.items);
    return 0;
}

/* ======================================================================== kernels
 * C (m, n) = A . B or A^T . B with C[i][j] = sum_p A[i][p] B[p][j], accumulated as
 * s = madd(s, a, b) with p ascending from 0, then added to C when acc is set. By default
 * madd is a rounded multiply, then a rounded add; built with REMI_FMA (`make FMA=1`), one
 * fused multiply-add. Either way the same bits come out of the vector kernel, its scalar
 * twin, the portable build and any vector width, and the sums beside the kernel that must
 * give its bits (dotf, dots, axpyf, weighted_sum, the narrow layers) use madd too; the two
 * modes give different bits. (Zen 4 issues two multiplies and two adds per cycle: separate
 * multiply-add pairs run at 92% of its FMA rate. Cores whose adds share the FMA units,
 * Intel's among them, run them at half the rate: there FMA=1 doubles the kernel's
 * arithmetic. `remi bench` prints both rates.)
 * Register tile: MR rows x NR columns, NV vectors of VW floats per row, held in GCC
 * vector-extension registers. The shape is chosen so that the MR * NV accumulators, the
 * NV vectors of B and the broadcast of A fit the target's vector registers (32 of 16
 * floats with AVX-512, 16 of 8 with AVX, 16 of 4 otherwise); spilled accumulators would
 * cost several times the speed. The sums do not depend on the shape. */
#if defined(__AVX512F__)
#define VW 16
#define NV 1
#define MR 16
#elif defined(__AVX__)
#define VW 8
#define NV 2
#define MR 6
#else
#define VW 4
#define NV 2
#define MR 6
#endif
#define NR (VW * NV)
/* may_alias and aligned(4): loads and stores straight from float arrays, at any address */
typedef float vfw __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef float f8 __attribute__((vector_size(32), aligned(4), may_alias)); /* 8 floats, on any target */

/* s + a b, the step of every sum of products (see above). Fused: the intrinsics where the
 * target has FMA (GCC would otherwise vectorise the lane loops of a packed tile into one
 * load and a shuffle per element, half the kernel's speed), else the lane loops (calls of
 * fmaf where the target has no FMA: the same bits, slowly). */
#ifdef REMI_FMA
#define PRODUCTS_FUSED 1
static inline float madd(float s, float a, float b) { return __builtin_fmaf(a, b, s); }
#if defined(__FMA__) && defined(__AVX__)
static inline f8 vmadd8(f8 s, float a, f8 b) { return (f8)_mm256_fmadd_ps(_mm256_set1_ps(a), (__m256)b, (__m256)s); }
#else
static inline __attribute__((unused)) f8 vmadd8(f8 s, float a, f8 b) {
    for (int i = 0; i < 8; i++) s[i] = __builtin_fmaf(a, b[i], s[i]);
    return s;
}
#endif
#if defined(__AVX512F__)
static inline vfw vmadd(vfw s, float a, vfw b) { return (vfw)_mm512_fmadd_ps(_mm512_set1_ps(a), (__m512)b, (__m512)s); }
#elif defined(__FMA__) && defined(__AVX__)
static inline vfw vmadd(vfw s, float a, vfw b) { return (vfw)vmadd8((f8)s, a, (f8)b); }
#else
static inline vfw vmadd(vfw s, float a, vfw b) {
    for (int i = 0; i < VW; i++) s[i] = __builtin_fmaf(a, b[i], s[i]);
    return s;
}
#endif
#else
#define PRODUCTS_FUSED 0
static inline float madd(float s, float a, float b) { return s + a * b; }
static inline vfw vmadd(vfw s, float a, vfw b) { return s + a * b; }
static inline __attribute__((unused)) f8 vmadd8(f8 s, float a, f8 b) { return s + a * b; }
#endif

typedef struct {
    float *C; int ldc;
    const float *A; int sa, sp; /* A element (i, p) = A[i * sa + p * sp] */
    const float *B; int ldb;
    int m, n, k, acc; /* acc: 0 C = sum, 1 C = C + sum; 2 (gemm_task_blocked only): the sums
                       * start from C's values, to continue them over the next block of k */
} Gemm;

/* A ROWS x NR tile (ROWS <= MR, a constant once inlined): ROWS x NV vector accumulators;
 * each step loads the NV vectors of B's row p and broadcasts one element of A per row. */
static inline __attribute__((always_inline)) void gemm_tile_rows(const Gemm *g, int i, int j, const int ROWS) {
    vfw c[MR][NV] = { 0 };
    if (g->acc == 2) {
        #pragma GCC unroll 16
        for (int r = 0; r < ROWS; r++)
            for (int v = 0; v < NV; v++) c[r][v] = *(const vfw *)(g->C + (size_t)(i + r) * g->ldc + j + VW * v);
    }
    const float *a0 = g->A + (size_t)i * g->sa, *b = g->B + j;
    const size_t sa = g->sa, sp = g->sp, ldb = g->ldb;
    for (int p = 0; p < g->k; p++, b += ldb) {
        const float *ap = a0 + p * sp;
        vfw bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = *(const vfw *)(b + VW * v);
        #pragma GCC unroll 16 /* both row loops unrolled (MR <= 16): the accumulators stay in
                                 * registers, with no zeroed array on the stack */
        for (int r = 0; r < ROWS; r++) {
            float x = ap[r * sa];
            for (int v = 0; v < NV; v++) c[r][v] = vmadd(c[r][v], x, bv[v]);
        }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) {
        vfw *cr = (vfw *)(g->C + (size_t)(i + r) * g->ldc + j);
        for (int v = 0; v < NV; v++) {
            if (g->acc == 1) c[r][v] = cr[v] + c[r][v];
            cr[v] = c[r][v];
        }
    }
}
/* A's columns as rows (A^T B: sa 1, the weight gradients) get an instance with sa 1 as a
 * constant: a step's MR elements at known offsets, as in a packed tile (on Intel, 1 thread:
 * 71-73 -> 83-88 GFLOP/s; with fused multiply-adds 70-83 -> 84-111). Inlined by force under
 * clang (TILE_INLINE), which left it out of line with its accumulators on the stack: the
 * step's products took 1.5 times as long. */
static TILE_INLINE void gemm_tile_full(const Gemm *g, int i, int j) {
    if (g->sa == 1) {
        Gemm t = *g;
        t.sa = 1;
        gemm_tile_rows(&t, i, j, MR);
    } else gemm_tile_rows(g, i, j, MR);
}
static void gemm_tile_4(const Gemm *g, int i, int j) { gemm_tile_rows(g, i, j, 4); }
#if MR > 8
static void gemm_tile_8(const Gemm *g, int i, int j) { gemm_tile_rows(g, i, j, 8); }
#endif
#if VW == 16
/* At most 8 columns of a product left (all of them in SA's K attention logits and the K x L
 * dot products): a tile of 8-float vectors, half the work of a zero-padded 16-column one, the
 * same sums. (A second copy of the loop above, for the half-width vector type.) */
static inline __attribute__((always_inline)) void gemm_half_rows(const Gemm *g, int i, int j, const int ROWS) {
    f8 c[MR] = { 0 };
    const float *a0 = g->A + (size_t)i * g->sa, *b = g->B + j;
    const size_t sa = g->sa, sp = g->sp, ldb = g->ldb;
    for (int p = 0; p < g->k; p++, b += ldb) {
        const float *ap = a0 + p * sp;
        f8 bv = *(const f8 *)b;
        #pragma GCC unroll 16
        for (int r = 0; r < ROWS; r++) c[r] = vmadd8(c[r], ap[r * sa], bv);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < ROWS; r++) {
        f8 *cr = (f8 *)(g->C + (size_t)(i + r) * g->ldc + j);
        if (g->acc) c[r] = *cr + c[r];
        *cr = c[r];
    }
}
static void gemm_half(const Gemm *g, int i, int j, int rows) {
    if (rows == 4) gemm_half_rows(g, i, j, 4);
    else if (rows == 8) gemm_half_rows(g, i, j, 8);
    else gemm_half_rows(g, i, j, MR);
}
#endif
#if VW == 16 && MR == 16
/* x (16 rows of 16) becomes its transpose: four rounds of the same perfect shuffle (row 2i
 * takes the first halves of rows i and i + 8 interleaved, row 2i + 1 the second halves). */
static inline void transpose16(vfw *x) {
    for (int round = 0; round < 4; round++) {
        vfw y[16];
        for (int i = 0; i < 8; i++) {
            y[2 * i] = __builtin_shufflevector(x[i], x[i + 8], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            y[2 * i + 1] = __builtin_shufflevector(x[i], x[i + 8], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                                   15, 31);
        }
        memcpy(x, y, sizeof y);
    }
}
#endif
/* A's rows packed for the kernel: each tile of MR rows stored step by step, its element
 * (r, p) at p MR + r, the tiles k MR apart, the last one zero-padded. The kernel then finds a
 * step's MR elements at offsets it knows, in one line (AVX-512), where rows at a run-time
 * stride need MR row offsets (more than the registers hold: some are reloaded): 108 -> 115
 * GFLOP/s on 1 thread in cache at the evaluation's shape (AVX-512). Packing costs about a
 * sixth of one such tile's product, so it pays where A serves several column tiles: the
 * evaluation's blocks (packed once for a group's queries) and the training's row tiles
 * (gemm_task, from PACK_COLS column tiles). */
static void pack_rows(float *Ap, const float *A, int m, int k, int sa) {
    for (int i = 0; i < m; i += MR) {
        float *t = Ap + (size_t)i * k;
        int mr = m - i < MR ? m - i : MR, p = 0;
#if VW == 16 && MR == 16
        for (; mr == MR && p + 16 <= k; p += 16) { /* 16 x 16 blocks through the vector registers */
            vfw x[16];
            for (int r = 0; r < 16; r++) x[r] = *(const vfw *)(A + (size_t)(i + r) * sa + p);
            transpose16(x);
            for (int q = 0; q < 16; q++) *(vfw *)(t + (size_t)(p + q) * MR) = x[q];
        }
#endif
        for (; p < k; p++)
            for (int r = 0; r < MR; r++) t[(size_t)p * MR + r] = r < mr ? A[(size_t)(i + r) * sa + p] : 0.0f;
    }
}
/* One MR x NR tile of C from a row tile packed by pack_rows: the kernel inlined with the
 * packed strides as constants. */
static inline __attribute__((always_inline)) void gemm_tile_packed(float *C, int ldc, const float *Ap, const float *B,
                                                                   int ldb, int k, int acc) {
    gemm_tile_rows(&(Gemm){ C, ldc, Ap, 1, MR, B, ldb, MR, NR, k, acc }, 0, 0, MR);
}
#if VW == 16 && MR == 16
/* Half a packed row tile (rows h8 .. h8 + 7) by 32 columns: 8 broadcasts and 2 loads of B per
 * step for 16 multiply-adds, where the 16 x 16 tile needs 16 and 1. Fused, the 16 x 16 tile
 * runs out of load slots before FMA units (Intel, in cache, 1 thread: 154-156 -> 168-171
 * GFLOP/s, 88% of the FMA peak); with separate multiplies and adds it gains 1%, so that
 * build keeps the one tile. The same sums. */
static inline __attribute__((always_inline)) void gemm_tile_packed_wide(float *C, int ldc, const float *Ap, int h8,
                                                                        const float *B, int ldb, int k) {
    vfw c[8][2] = { 0 };
    const float *a = Ap + h8, *b = B;
    for (int p = 0; p < k; p++, a += MR, b += ldb) {
        vfw b0 = *(const vfw *)b, b1 = *(const vfw *)(b + VW);
        #pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            c[r][0] = vmadd(c[r][0], a[r], b0);
            c[r][1] = vmadd(c[r][1], a[r], b1);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < 8; r++) {
        *(vfw *)(C + (size_t)(h8 + r) * ldc) = c[r][0];
        *(vfw *)(C + (size_t)(h8 + r) * ldc + VW) = c[r][1];
    }
}
#endif
/* C (m, n) = A B for A packed by pack_rows (m rows, k steps) and n a multiple of NR; C has
 * room for m rounded up to MR rows (the padding rows get sums of zeros). The same sums as gemm.
 * pre (npre floats) is fetched into the caches a few lines a tile, while the tiles compute. */
static __attribute__((noinline)) void gemm_packed(float *C, int ldc, const float *Ap, const float *B, int ldb, int m, int n,
                                                   int k, const float *pre, size_t npre) {
    size_t tiles = (size_t)(m + MR - 1) / MR * (size_t)(n / NR), t = 0, f = 0;
    for (int i = 0; i < m; i += MR)
        for (int j = 0; j < n; j += NR) {
#if VW == 16 && MR == 16
            if (PRODUCTS_FUSED && j + 2 * NR <= n) {
                for (t += 2; f < npre && f * tiles < npre * t; f += 16) __builtin_prefetch(pre + f);
                gemm_tile_packed_wide(C + (size_t)i * ldc + j, ldc, Ap + (size_t)i * k, 0, B + j, ldb, k);
                gemm_tile_packed_wide(C + (size_t)i * ldc + j, ldc, Ap + (size_t)i * k, 8, B + j, ldb, k);
                j += NR;
                continue;
            }
#endif
            for (t++; f < npre && f * tiles < npre * t; f += 16) __builtin_prefetch(pre + f);
            gemm_tile_packed(C + (size_t)i * ldc + j, ldc, Ap + (size_t)i * k, B + j, ldb, k, 0);
        }
}
/* The smallest tile height that covers mr rows. */
static int tile_rows(int mr) {
#if MR > 8
    if (mr > 4 && mr <= 8) return 8;
#endif
    return mr <= 4 ? 4 : MR;
}
static void gemm_tile(const Gemm *g, int i, int j, int rows) {
#if MR > 8
    if (rows == 8) { gemm_tile_8(g, i, j); return; }
#endif
    if (rows == 4) gemm_tile_4(g, i, j);
    else gemm_tile_full(g, i, j);
}

/* Growable per-thread scratch buffers, one per slot: the gemm's edge tiles, the per-sample
 * layers (capsule routing) that need a few rows of their own, the K x L dot products, a row
 * of the loss, the routing coefficients of one capsule, the item gradient's scatter plan,
 * and a thread's own copy of the step's negatives (neg_rows). */
enum { SCRATCH_GEMM, SCRATCH_LAYER, SCRATCH_DOTS, SCRATCH_LOSS, SCRATCH_COEF, SCRATCH_TERMS, SCRATCH_NEG, N_SCRATCH };
static __thread float *scratch_buf[N_SCRATCH];
static __thread size_t scratch_cap[N_SCRATCH];

static float *thread_scratch(int slot, size_t n) {
    if (n > scratch_cap[slot]) { scratch_buf[slot] = xrealloc(scratch_buf[slot], n * sizeof(float)); scratch_cap[slot] = n; }
    return scratch_buf[slot];
}

/* Edge tiles (fewer than MR rows or NR columns) are copied, zero-padded, into a tile of
 * the next height (4, 8 or MR rows) and NR columns and computed by the same kernel, so a
 * narrow product (the K attention logits, their weight gradient) runs at full speed; the
 * real elements get the same sums. The padded B columns are packed once per task, the
 * padded A rows once per row tile.
 * gemm_tile_via: the kernel on A (`rows` rows at a, strides sa/sp) and B (NR columns at
 * b, ldb) into a local tile, then the mr x nr real part stored (or added) at c. */
/* The mr x nr real part of a local tile (rows NR apart) stored at c, or added with g->acc. */
static void tile_store(const Gemm *g, float *c, const float *tile, int mr, int nr) {
    for (int r = 0; r < mr; r++)
        for (int q = 0; q < nr; q++) {
            float *cc = c + (size_t)r * g->ldc + q;
            *cc = g->acc ? *cc + tile[r * NR + q] : tile[r * NR + q];
        }
}
static void gemm_tile_via(const Gemm *g, const float *a, int sa, int sp, const float *b, int ldb, float *c,
                          int mr, int nr, int rows) {
    float tile[MR * NR];
    Gemm t = { tile, NR, a, sa, sp, b, ldb, rows, NR, g->k, 0 };
#if VW == 16
    if (nr <= 8) gemm_half(&t, 0, 0, rows);
    else
#endif
    gemm_tile(&t, 0, 0, rows);
    tile_store(g, c, tile, mr, nr);
}

/* Tile t's row tile rt and column tile ct. A tile of MR x NR reads MR rows of A and a panel of
 * NR columns of B: sweeping the row tiles under one panel re-reads A once per column tile,
 * sweeping the columns re-reads B once per row tile; the first is less traffic when NR > MR
 * (AVX2's 6 x 16 tile) and B does not stay in the L1 cache anyway (over 32 KB: the
 * evaluation's queries stay), the second otherwise (AVX-512's 16 x 16, a little faster there). */
static int tile_cols_first(const Gemm *g) { return NR > MR && (size_t)g->k * g->n > 8192; }
static void tile_pos(const Gemm *g, int t, int *rt, int *ct) {
    int nct = (g->n + NR - 1) / NR, nrt = (g->m + MR - 1) / MR;
    if (tile_cols_first(g)) { *rt = t % nrt; *ct = t / nrt; }
    else { *rt = t / nct; *ct = t % nct; }
}

/* A long sum (k > 2 KBLOCK: a weight gradient over a batch's rows, the user vectors'
 * gradient over the negatives): the full tiles in blocks of KBLOCK steps, each block over
 * all of the task's full tiles, so that every tile reads the block's A and B from L2 instead
 * of streaming the whole of k from L3 alone (the hidden layer's weight gradient at Beauty's
 * defaults: 98 -> 109 GFLOP/s on 1 thread). The tiles' sums wait in scratch between blocks
 * and continue from there (acc 2), so each is the same chain over p: the same bits. The
 * edge tiles (the last row or column tile, when MR or NR does not divide the product: with
 * AVX2's 6-row tile, most products) follow, one at a time, as in any product. */
#define KBLOCK 256
#ifndef PACK_COLS
#define PACK_COLS 4
#endif
/* A's row tiles (rows at stride sa, sp 1) are packed (pack_rows) where the columns are swept
 * under each and a packed tile serves col_tiles >= PACK_COLS column tiles */
static int packs_row_tiles(const Gemm *g, int col_tiles) {
    return g->sp == 1 && !tile_cols_first(g) && col_tiles >= PACK_COLS;
}
static int gemm_blocked(const Gemm *g) {
    return g->k > 2 * KBLOCK && g->m >= MR && g->n >= NR && !(g->sp == 1 && g->sa % 1024 == 0);
}
static int tile_full(const Gemm *g, int rt, int ct) { /* the tile has MR rows and NR columns */
    return rt < g->m / MR && ct < g->n / NR;
}
static void gemm_task_blocked(const Gemm *g, int lo, int hi) {
    /* A's rows (sp 1) serving PACK_COLS column tiles or more: each row tile's block of k is
     * packed once for them (pack_rows), as gemm_task packs a whole row tile */
    int pack_a = packs_row_tiles(g, g->n / NR); /* the full column tiles: the edge ones come after */
    float *part = thread_scratch(SCRATCH_GEMM, (size_t)(hi - lo) * MR * NR + (pack_a ? (size_t)MR * KBLOCK : 0));
    float *ap = part + (size_t)(hi - lo) * MR * NR; /* part (hi - lo, MR, NR), then the packed block (KBLOCK, MR) */
    for (int p0 = 0; p0 < g->k; p0 += KBLOCK)
        for (int t = lo, ap_rt = -1; t < hi; t++) {
            int rt, ct;
            tile_pos(g, t, &rt, &ct);
            if (!tile_full(g, rt, ct)) continue;
            int i = rt * MR, j = ct * NR, kb = g->k - p0 < KBLOCK ? g->k - p0 : KBLOCK;
            float *c = part + (size_t)(t - lo) * MR * NR;
            const float *a = g->A + (size_t)i * g->sa + (size_t)p0 * g->sp, *b = g->B + (size_t)p0 * g->ldb + j;
            if (pack_a) {
                if (ap_rt != rt) pack_rows(ap, a, MR, kb, g->sa);
                ap_rt = rt;
                gemm_tile_packed(c, NR, ap, b, g->ldb, kb, p0 ? 2 : 0);
            } else gemm_tile_full(&(Gemm){ c, NR, a, g->sa, g->sp, b, g->ldb, MR, NR, kb, p0 ? 2 : 0 }, 0, 0);
        }
    for (int t = lo; t < hi; t++) {
        int rt, ct;
        tile_pos(g, t, &rt, &ct);
        if (!tile_full(g, rt, ct)) continue;
        tile_store(g, g->C + (size_t)rt * MR * g->ldc + (size_t)ct * NR, part + (size_t)(t - lo) * MR * NR, MR, NR);
    }
}

/* Tiles [lo, hi) of one product, numbered row tile by row tile or column tile by column tile
 * (tile_pos), so a product with few rows (a weight gradient of K rows) still splits over
 * threads. Each tile is written by one thread, with the same sums. */
static void gemm_task(void *ctx, int lo, int hi) {
    const Gemm *g = ctx;
    int blocked = gemm_blocked(g); /* the full tiles done in blocks of k, the edge tiles below */
    if (blocked) gemm_task_blocked(g, lo, hi);
    int k = g->k, nfull = g->n / NR * NR, nr = g->n - nfull, ap_rt = -1, panel_ct = -1; /* the row tile in ap, the panel in panel */
    /* rows of A a multiple of 4 KB apart would all fall in one set of the L1 cache (a tile's
     * 16 rows thrash it): such tiles are copied first, like the short ones, to rows k + 16 apart */
    int alias = g->sp == 1 && g->sa % 1024 == 0, ka = k + 16;
    /* sweeping row tiles under a panel of B (tile_pos), the panel is copied first into NR
     * consecutive columns: B's rows are often a multiple of 1 KB apart, and the panel's lines
     * would share a few sets of the L1 cache (AVX2: the logits 61 -> 87 GFLOP/s, the hidden
     * layer's products 80-82 -> 89-97) */
    int pack = tile_cols_first(g) && !blocked && g->m > MR;
    /* sweeping the columns under a row tile of A's rows (sp 1), the tile is packed first
     * (pack_rows) when it serves PACK_COLS column tiles or more: the kernel then reads a
     * step's MR elements at offsets it knows instead of MR row offsets, more than the
     * registers hold (on Intel, 1 thread, the step's products: 68-74 -> 80-83 GFLOP/s; with
     * fused multiply-adds 90-100 -> 125-142) */
    int pack_a = !blocked && packs_row_tiles(g, (g->n + NR - 1) / NR);
    float *bp = NULL, *ap = NULL, *panel = NULL;
    if (nr > 0 || g->m % MR || alias || pack || pack_a) {
        float *buf = thread_scratch(SCRATCH_GEMM, (size_t)k * NR * 2 + (size_t)MR * ka);
        bp = buf; ap = buf + (size_t)k * NR; panel = ap + (size_t)MR * ka;
    }
    if (nr > 0) /* the last, narrow column tile of B, zero-padded to NR columns */
        for (int p = 0; p < k; p++)
            for (int q = 0; q < NR; q++) bp[(size_t)p * NR + q] = q < nr ? g->B[(size_t)p * g->ldb + nfull + q] : 0.0f;
    for (int t = lo; t < hi; t++) {
        int rt, ct;
        tile_pos(g, t, &rt, &ct);
        if (blocked && tile_full(g, rt, ct)) continue;
        int j = ct * NR;
        int i = rt * MR, mr = g->m - i < MR ? g->m - i : MR, rows = tile_rows(mr);
        const float *a = g->A + (size_t)i * g->sa;
        int sa = g->sa, sp = g->sp, tile_packed = pack_a && mr == MR;
        if (tile_packed) {
            if (ap_rt != rt) pack_rows(ap, a, MR, k, sa);
            ap_rt = rt;
            a = ap; sa = 1; sp = MR;
        } else if (mr < rows || alias) { /* the row tile of A copied: zero-padded to `rows` rows if short */
            if (ap_rt != rt)
                for (int r = 0; r < rows; r++)
                    for (int p = 0; p < k; p++) ap[(size_t)r * ka + p] = r < mr ? a[(size_t)r * sa + (size_t)p * sp] : 0.0f;
            ap_rt = rt;
            a = ap; sa = ka; sp = 1;
        }
        float *c = g->C + (size_t)i * g->ldc;
        const float *b = g->B + j;
        int ldb = g->ldb;
        if (j == nfull) { gemm_tile_via(g, a, sa, sp, bp, NR, c + nfull, mr, nr, rows); continue; }
        if (pack) {
            if (panel_ct != ct)
                for (int p = 0; p < k; p++) memcpy(panel + (size_t)p * NR, b + (size_t)p * ldb, NR * sizeof(float));
            panel_ct = ct;
            b = panel; ldb = NR;
        }
        if (tile_packed) gemm_tile_packed(c + j, g->ldc, ap, b, ldb, k, g->acc);
        else if (mr == rows && !alias) gemm_tile(&(Gemm){ c + j, g->ldc, a, sa, sp, b, ldb, rows, NR, k, g->acc }, 0, 0, rows);
        else gemm_tile_via(g, a, sa, sp, b, ldb, c + j, mr, NR, rows);
    }
}

static int gemm_tiles(const Gemm *g) { return (g->m + MR - 1) / MR * ((g->n + NR - 1) / NR); }

static void gemm_run(Gemm g, int parallel) {
    if (parallel) parallel_for(gemm_tiles(&g), gemm_task, &g);
    else gemm_task(&g, 0, gemm_tiles(&g));
}

/* Independent products in one parallel region (one hand-off instead of one each): their
 * tiles numbered product after product, first[p] the first tile of product p. */
typedef struct { const Gemm *g; const int *first; int count; } GemmMany;
static void gemm_many_task(void *ctx, int lo, int hi) {
    const GemmMany *b = ctx;
    for (int p = 0; p < b->count; p++) {
        int t0 = lo > b->first[p] ? lo : b->first[p], t1 = hi < b->first[p + 1] ? hi : b->first[p + 1];
        if (t0 < t1) gemm_task((void *)&b->g[p], t0 - b->first[p], t1 - b->first[p]);
    }
}
static void gemm_many(const Gemm *g, int count) {
    int *first = xmalloc((size_t)(count + 1) * sizeof(int));
    first[0] = 0;
    for (int p = 0; p < count; p++) first[p + 1] = first[p] + gemm_tiles(&g[p]);
    GemmMany b = { g, first, count };
    parallel_for(first[count], gemm_many_task, &b);
    free(first);
}

/* C = A B       with A (m, k), B (k, n). */
static void gemm_nn(float *C, const float *A, const float *B, int m, int n, int k, int acc) {
    gemm_run((Gemm){ C, n, A, k, 1, B, n, m, n, k, acc }, 1);
}
/* C = A^T B     with A (k, m), B (k, n). */
static void gemm_tn(float *C, const float *A, const float *B, int m, int n, int k, int acc) {
    gemm_run((Gemm){ C, n, A, 1, m, B, n, m, n, k, acc }, 1);
}

/* Scalar twin of both products, for the self-test. */
static void gemm_ref(float *C, const float *A, const float *B, int m, int n, int k, int trans_a, int acc) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            float s = 0.0f;
            for (int p = 0; p < k; p++) {
                float a = trans_a ? A[(size_t)p * m + i] : A[(size_t)i * k + p];
                s = madd(s, a, B[(size_t)p * n + j]);
            }
            C[(size_t)i * n + j] = acc ? C[(size_t)i * n + j] + s : s;
        }
}

/* dot(a, b) with i ascending. */
static float dotf(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s = madd(s, a[i], b[i]);
    return s;
}
/* y[r] = <A[r], x> (or y[r] += it, with acc) for the n rows of A at stride sa: each sum is
 * dotf's, in ascending order, but eight of them advance together so that their additions
 * overlap instead of waiting on one another. */
static void dots(float *y, const float *A, size_t sa, const float *x, int n, int D, int acc) {
    int r = 0;
    for (; r + 8 <= n; r += 8) {
        float s[8] = { 0 };
        for (int d = 0; d < D; d++)
            for (int i = 0; i < 8; i++) s[i] = madd(s[i], A[(r + i) * sa + d], x[d]);
        for (int i = 0; i < 8; i++) y[r + i] = acc ? y[r + i] + s[i] : s[i];
    }
    for (; r < n; r++) {
        float s = dotf(A + r * sa, x, D);
        y[r] = acc ? y[r] + s : s;
    }
}
/* y += a * x */
static void axpyf(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] = madd(y[i], a, x[i]);
}
/* y (D) = sum_i a[i sa] x[i] over n rows of x, sx apart, i ascending: the sums of axpyf into a
 * zeroed y, held in registers (4 vectors at a time) instead of stored and loaded per row */
static void weighted_sum(float *y, const float *a, size_t sa, const float *x, size_t sx, int n, int D) {
    int d = 0;
    for (; d + 4 * VW <= D; d += 4 * VW) {
        vfw s[4] = { 0 };
        for (int i = 0; i < n; i++)
            for (int v = 0; v < 4; v++) s[v] = vmadd(s[v], a[i * sa], *(const vfw *)(x + i * sx + d + v * VW));
        for (int v = 0; v < 4; v++) *(vfw *)(y + d + v * VW) = s[v];
    }
    for (; d + VW <= D; d += VW) {
        vfw s = { 0 };
        for (int i = 0; i < n; i++) s = vmadd(s, a[i * sa], *(const vfw *)(x + i * sx + d));
        *(vfw *)(y + d) = s;
    }
    for (; d < D; d++) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) s = madd(s, a[i * sa], x[i * sx + d]);
        y[d] = s;
    }
}

/* dst (cols, rows) = src (rows, cols)^T, dst's rows ld floats apart (rows, or more for a
 * share of a wider matrix); with AVX-512, 16 x 16 blocks through the vector registers
 * (ComiRec-DR's L maps each step: its forward 2x faster). */
static void transpose_ld(float *dst, size_t ld, const float *src, int rows, int cols) {
    int i = 0;
#if VW == 16 && MR == 16
    for (; i + 16 <= rows; i += 16) {
        int j = 0;
        for (; j + 16 <= cols; j += 16) {
            vfw x[16];
            for (int r = 0; r < 16; r++) x[r] = *(const vfw *)(src + (size_t)(i + r) * cols + j);
            transpose16(x);
            for (int q = 0; q < 16; q++) *(vfw *)(dst + (size_t)(j + q) * ld + i) = x[q];
        }
        for (; j < cols; j++)
            for (int r = 0; r < 16; r++) dst[(size_t)j * ld + i + r] = src[(size_t)(i + r) * cols + j];
    }
#endif
    for (; i < rows; i++)
        for (int j = 0; j < cols; j++) dst[(size_t)j * ld + i] = src[(size_t)i * cols + j];
}
static void transpose(float *dst, const float *src, int rows, int cols) { transpose_ld(dst, (size_t)rows, src, rows, cols); }

/* Products with few outputs, y (rows, out) = x (rows, in) W^T for W (out, in) and out <=
 * NARROW_OUT (SA's K attention logits, the K x n dot products of dots_kl): the matrix
 * kernel pads out to NR columns (a quarter of its work kept at K 4), so here VW rows sit in
 * the lanes of a vector, their in-long sums in `out` registers. Each sum runs over p
 * ascending from 0, as the kernel's do: the same bits. */
#define NARROW_OUT 8

/* One tile: xt (in, VW) packed rows, nr of them kept. */
static inline __attribute__((always_inline)) void narrow_tile(float *y, const float *xt, const float *W, int in,
                                                               int nr, const int OUT) {
    vfw acc[NARROW_OUT] = { 0 };
    for (int p = 0; p < in; p++) {
        vfw a = *(const vfw *)(xt + (size_t)p * VW);
        for (int o = 0; o < OUT; o++) acc[o] = vmadd(acc[o], W[(size_t)o * in + p], a);
    }
    for (int r = 0; r < nr; r++)
        for (int o = 0; o < OUT; o++) y[(size_t)r * OUT + o] = acc[o][r];
}

/* Rows [r0, r1) of y, x's rows sx apart; xt: scratch of in * VW floats. */
static void narrow_rows(float *y, const float *x, size_t sx, const float *W, int r0, int r1, int in, int out, float *xt) {
    for (int i = r0; i < r1; i += VW) {
        int nr = r1 - i < VW ? r1 - i : VW;
#if MR == VW
        pack_rows(xt, x + (size_t)i * sx, nr, in, (int)sx); /* its tiles are VW rows too */
#else
        for (int p = 0; p < in; p++)
            for (int r = 0; r < VW; r++) xt[(size_t)p * VW + r] = r < nr ? x[(size_t)(i + r) * sx + p] : 0.0f;
#endif
        float *yi = y + (size_t)i * out;
        switch (out) { /* the accumulators unrolled */
        case 4: narrow_tile(yi, xt, W, in, nr, 4); break;
        case 8: narrow_tile(yi, xt, W, in, nr, 8); break;
        default: narrow_tile(yi, xt, W, in, nr, out);
        }
    }
}

/* y[k L + l] = <A[l], B[k]> (or y += it, with acc) for the first n of the L rows of A (at
 * stride sa; the rest of y untouched) and the K rows of B, each D long: K x n dot products,
 * each summed over d ascending as dotf, done as one product t (n, K) = A B^T (narrow_rows
 * for K <= NARROW_OUT, else the matrix kernel; dots would walk each sum alone). per_k: A
 * holds a row for each interest instead, y[k L + l] = <A[l K + k], B[k]>: the product t (n K, K) then makes K sums per row and y
 * takes one (ComiRec-DR's u_hat; a quarter of the kernel's work is kept at K 4, still twice
 * as fast as dots). */
static void dots_kl(float *y, const float *A, int sa, const float *B, int K, int L, int n, int D, int per_k, int acc) {
    int rows = per_k ? n * K : n;
    size_t nbt = (size_t)D * (K > VW ? K : VW); /* B^T, or narrow_rows' packed rows */
    float *bt = thread_scratch(SCRATCH_DOTS, nbt + (size_t)rows * K), *t = bt + nbt;
    if (K <= NARROW_OUT) narrow_rows(t, A, (size_t)sa, B, 0, rows, D, K, bt);
    else {
        transpose(bt, B, K, D);
        gemm_run((Gemm){ t, K, A, sa, 1, bt, K, rows, K, D, 0 }, 0);
    }
    for (int k = 0; k < K; k++)
        for (int l = 0; l < n; l++) {
            float d = t[(size_t)(per_k ? l * K + k : l) * K + k];
            y[k * L + l] = acc ? y[k * L + l] + d : d;
        }
}

/* Vectorisable exp and tanh (Cephes polynomials, about 1-2 ulp). They replace libm in
 * the hot loops: libm's scalar calls would dominate a step, and a fixed polynomial gives
 * the same bits on every libm. Inputs below -87.3 give exactly 0 (the reference's masked
 * logits, -2^32, underflow to 0 in float32 as well). */
static inline float bits_to_float(int32_t i) { float f; memcpy(&f, &i, 4); return f; }

/* x = n ln2 + r with n = round(x / ln 2) (returned in *n) and |r| <= ln2 / 2 (Cody-Waite) */
static inline float exp_reduce(float x, float *n) {
    *n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - *n * 0.693359375f;
    return r - *n * -2.12194440e-4f;
}
/* e^r for |r| <= ln2 / 2, times 2^n for an integer n in [-126, 128] */
static inline float exp_scaled(float r, float n) {
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = p * r * r + r + 1.0f;
    return e * bits_to_float((int32_t)((uint32_t)((int32_t)n + 127) << 23));
}

static inline float exp_v(float x) {
    float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x), n;
    float r = exp_reduce(xc, &n);
    n = fabsf(n) <= 128.0f ? n : 0.0f; /* n is in [-126, 128]; a NaN input: no undefined conversion, NaN out */
    float y = exp_scaled(r, n);
    return x < -87.3f ? 0.0f : y;
}

/* For |x| > 0.625, 1 - 2 / (e^2|x| + 1) with the sign of x (|x| capped at 9, where tanh is 1
 * in float32: e^2|x| needs no range checks); else an odd polynomial. A NaN takes the second. */
static inline float tanh_reduce(float x, float *n) { /* 2|x| = n ln2 + r, for e^2|x| */
    float ax = fabsf(x);
    return exp_reduce(2.0f * (ax < 9.0f ? ax : 9.0f), n);
}
static inline float tanh_pick(float x, float e2) { /* e2 = e^2|x| */
    float z = x * x;
    float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                    + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    return fabsf(x) > 0.625f ? copysignf(1.0f - 2.0f / (e2 + 1.0f), x) : small;
}
static inline float tanh_v(float x) {
    float n, r = tanh_reduce(x, &n);
    return tanh_pick(x, exp_scaled(r, n));
}

/* ======================================================================== model */
static const char *ENC_NAMES[N_ENCODERS] = { "sa", "dr", "mind", "dnn", "gru4rec", "pop" };
static const char *TENSOR_NAMES[N_PARAM_TENSORS] = { "item_emb", "pos_emb", "W1", "W2", "bilinear", "relu_w",
                                                     "dnn_w", "gru_ih", "gru_hh", "dense_w", "dense_b" };

/* How each tensor starts (REMI-SPEC c.6): 'n' normal with std `scale`, 'u' uniform in
 * [-scale, scale), 0 zeros. */
typedef struct { size_t size; char dist; double scale; } TensorInit;

/* kaiming_normal_ with its defaults: std = sqrt(2 / fan_in), fan_in = size(1) * prod(size[2:]) */
#define KAIMING(fan_in) sqrt(2.0 / (double)(fan_in))

static void encoder_tensors(TensorInit *t, const Model *m) {
    size_t N = m->N, D = m->D, L = m->L, K = m->K, H = m->H, G = m->G;
    memset(t, 0, N_PARAM_TENSORS * sizeof *t);
    t[0] = (TensorInit){ N * D, 'n', KAIMING(D) };
    switch (m->enc) {
    case ENC_SA:
        t[1] = (TensorInit){ L * D, 'n', KAIMING(L * D) };   /* stored (1, L, D) */
        t[2] = (TensorInit){ H * D, 'n', KAIMING(D) };
        t[3] = (TensorInit){ K * H, 'n', KAIMING(H) };
        break;
    case ENC_DR: /* stored (1, L, K D, D): fan_in = L K D D */
        t[4] = (TensorInit){ L * K * D * D, 'n', KAIMING(L * K * D * D) };
        break;
    case ENC_MIND:
        t[4] = (TensorInit){ D * D, 'n', KAIMING(D) };
        if (m->relu) t[5] = (TensorInit){ D * D, 'n', KAIMING(D) };
        break;
    case ENC_DNN:
        t[6] = (TensorInit){ D * D, 'n', KAIMING(D) };
        break;
    case ENC_GRU4REC: /* the exception: xavier_normal_ on E, xavier_uniform_ on the GRU,
                       * nn.Linear's own init (bound 1 / sqrt(fan_in)) on the dense layer */
        t[0].scale = sqrt(2.0 / (double)(N + D));
        t[7] = (TensorInit){ 3 * G * D, 'u', sqrt(6.0 / (double)(3 * G + D)) };
        t[8] = (TensorInit){ 3 * G * G, 'u', sqrt(6.0 / (double)(3 * G + G)) };
        t[9] = (TensorInit){ D * G, 'u', 1.0 / sqrt((double)G) };
        t[10] = (TensorInit){ D, 'u', 1.0 / sqrt((double)G) };
        break;
    case ENC_POP: /* counts, not parameters */
        t[0] = (TensorInit){ N, 0, 0 };
        break;
    default: break;
    }
}

/* The model's shape (dimensions and tensor sizes) without allocating anything. */
static void model_shape(Model *m, TensorInit *t, int N, const Config *c) {
    memset(m, 0, sizeof *m);
    m->enc = c->enc;
    m->multi = c->enc == ENC_SA || c->enc == ENC_DR || c->enc == ENC_MIND;
    m->relu = c->enc == ENC_MIND && c->relu;
    m->N = N; m->D = c->enc == ENC_POP ? 1 : c->D; m->K = m->multi ? c->K : 1; m->L = c->L;
    m->H = 4 * m->D; m->G = 2 * m->D;
    encoder_tensors(t, m);
    for (int i = 0; i < N_PARAM_TENSORS; i++) { m->size[i] = t[i].size; m->n_params += t[i].size; }
}

static void check_params_fit(const Model *m) { /* what every command touches */
    char what[96]; /* N named: without an item map, one stray large item id makes it large */
    snprintf(what, sizeof what, "the model's parameters (N = %d items)", m->N);
    check_fits(m->n_params * sizeof(float), what, "train one with a smaller --len, --hidden or --interests", 0);
}

/* The model's arrays, zeroed, and its tensors' places in them; t (N_PARAM_TENSORS) gets
 * each tensor's initialisation. */
static void model_alloc(Model *m, TensorInit *t, int N, const Config *c) {
    model_shape(m, t, N, c);
    check_params_fit(m);
    m->mem = big_calloc(m->n_params * sizeof(float), 1);
    m->gmem = big_calloc(m->n_params * sizeof(float), 0); /* mostly untouched (the item rows are kept by ItemGrad) */
    m->mmem = big_calloc(m->n_params * sizeof(float), 1);
    m->vmem = big_calloc(m->n_params * sizeof(float), 1);
    float **pp = (float **)&m->p, **gp = (float **)&m->g;
    size_t off = 0;
    for (int i = 0; i < N_PARAM_TENSORS; i++) { pp[i] = m->mem + off; gp[i] = m->gmem + off; off += m->size[i]; }
    m->ge = (ItemGrad){ m->g.item_emb, xmalloc((size_t)N * sizeof(int)), xmalloc((size_t)N * sizeof(int)), 0 };
    for (int j = 0; j < N; j++) m->ge.row[j] = -1;
    m->add_pos = c->enc == ENC_SA && c->add_pos;
}

/* A new model: its arrays, and the parameters drawn as the reference initialises them (c.6). */
void model_init(Model *m, int N, const Config *c) {
    TensorInit t[N_PARAM_TENSORS];
    model_alloc(m, t, N, c);
    float **pp = (float **)&m->p;
    uint64_t rng = c->seed ^ 0x5eedf00dull;
    for (int i = 0; i < N_PARAM_TENSORS; i++)
        for (size_t j = 0; j < m->size[i]; j++)
            pp[i][j] = t[i].dist == 'n' ? (float)(t[i].scale * rng_normal(&rng))
                     : t[i].dist == 'u' ? (float)(t[i].scale * (2.0 * rng_uniform(&rng) - 1.0)) : 0.0f;
    if (c->enc == ENC_SA && !c->add_pos) memset(m->p.pos_emb, 0, m->size[1] * sizeof(float));
}

/* An array of the activations, zeroed (big_calloc), recorded for acts_free. */
static void *acts_own(Acts *a, size_t bytes, int rows) {
    if (a->n_owned == (int)(sizeof a->owned / sizeof *a->owned)) die("acts_calloc: more arrays than Acts records");
    a->owned_bytes[a->n_owned] = bytes;
    a->owned_rows[a->n_owned] = (unsigned char)rows;
    return a->owned[a->n_owned++] = big_calloc(bytes, !rows);
}
static void *acts_calloc(Acts *a, size_t n, size_t size) { return acts_own(a, n * size, 0); }
/* An array of rows of which a step writes the first R only (real_rows: the real positions),
 * sized for every position: on 4 KB pages, so that only the rows written become resident.
 * On a huge page the first row written makes 2 MB resident (SA's h at Beauty: 0.7 MB
 * written of 2.6; peak memory 26 -> 23.5 MB, the step as fast). */
static void *acts_calloc_rows(Acts *a, size_t n, size_t size) { return acts_own(a, n * size, 1); }

/* Floats from one sample's u_hat to the next (capsule encoders). DR's (L, K D) block is
 * padded by one cache line: at L K D a multiple of 1024 (the defaults: 20 x 4 x 64), rows
 * 4 KB apart would share one set of the L1 cache, and a tile of 16 such rows thrashes it
 * (DR's dx product ran at half speed). MIND's u_hat stays one (nb L, D) matrix. */
static size_t caps_stride(const Model *m) {
    return m->enc == ENC_DR ? (size_t)m->L * m->K * m->D + 16 : (size_t)m->L * m->D;
}

void acts_init(Acts *a, const Model *m, int cap_b, int M) {
    int L = m->L, D = m->D, H = m->H, K = m->K;
    size_t B = (size_t)cap_b;
    memset(a, 0, sizeof *a);
    a->cap_b = cap_b; a->M = M;
    a->hist = acts_calloc(a, B * L, sizeof(int));
    a->mask = acts_calloc(a, B * L, sizeof(float));
    a->target = acts_calloc(a, B, sizeof(int));
    a->neg = acts_calloc(a, M ? M : 1, sizeof(int));
    a->sel = acts_calloc(a, B, sizeof(int));
    a->xt = acts_calloc_rows(a, B * L * D, sizeof(float));
    a->dxt = acts_calloc_rows(a, B * L * D, sizeof(float));
    a->dx = acts_calloc_rows(a, B * L * D, sizeof(float));
    a->prow = acts_calloc(a, B * L, sizeof(int));
    a->poff = acts_calloc(a, (size_t)L + 1, sizeof(int));
    if (m->enc == ENC_SA) {
        a->x = acts_calloc_rows(a, B * L * D, sizeof(float));
        a->h = acts_calloc_rows(a, B * L * H, sizeof(float));
        a->dh = acts_calloc_rows(a, B * L * H, sizeof(float));
        a->zr = acts_calloc_rows(a, B * L * K, sizeof(float));
        a->dzr = acts_calloc_rows(a, B * L * K, sizeof(float));
    }
    a->z = acts_calloc(a, B * L * K, sizeof(float));
    a->dz = acts_calloc(a, B * L * K, sizeof(float));
    a->att = acts_calloc(a, B * K * L, sizeof(float));
    a->datt = acts_calloc(a, B * K * L, sizeof(float));
    a->v = acts_calloc(a, B * K * D, sizeof(float));
    a->dv = acts_calloc(a, B * K * D, sizeof(float));
    a->r = acts_calloc(a, B * D, sizeof(float));
    a->dr = acts_calloc(a, B * D, sizeof(float));
    a->en = acts_calloc(a, 2 * (size_t)M * D + 1, sizeof(float)); /* en (M, D), then ent (D, M): neg_rows */
    a->den = acts_calloc(a, (size_t)M * D + 1, sizeof(float));
    a->logit = acts_calloc(a, B * M + 1, sizeof(float));
    a->dlogit = a->logit; /* the logits are not read after ssm_forward */
    a->ssm_st = acts_calloc(a, 6 * B, sizeof(double)); /* SsmStats */
    a->pos = acts_calloc(a, B, sizeof(float));
    a->dpos = acts_calloc(a, B, sizeof(float));
    a->loss = acts_calloc(a, B, sizeof(float));
    a->rr_d = acts_calloc(a, B * K, sizeof(float));
    a->w1t = acts_calloc(a, (size_t)D * H, sizeof(float));
    a->w2t = acts_calloc(a, (size_t)H * K, sizeof(float));
    if (m->enc == ENC_DR || m->enc == ENC_MIND) {
        a->uhat = acts_calloc(a, B * caps_stride(m), sizeof(float));
        a->ur = acts_calloc_rows(a, B * L * (m->enc == ENC_DR ? K * D : D), sizeof(float));
        a->dur = acts_calloc_rows(a, B * L * (m->enc == ENC_DR ? K * D : D), sizeof(float));
        a->duhat = acts_calloc(a, B * caps_stride(m), sizeof(float));
        a->capt = acts_calloc(a, m->enc == ENC_DR ? (size_t)L * D * K * D : 2 * (size_t)D * D, sizeof(float)); /* MIND: S^T, R^T */
        a->noise = acts_calloc(a, B * K * L, sizeof(float));
        a->rp = acts_calloc(a, B * 3 * K * L, sizeof(float));
        a->rs = acts_calloc(a, B * 3 * K * D, sizeof(float));
        a->rv = acts_calloc(a, B * 2 * K * D, sizeof(float));
        a->caps = acts_calloc(a, B * K * D, sizeof(float));
        a->dcaps = acts_calloc(a, B * K * D, sizeof(float));
    }
    if (m->enc == ENC_DNN) a->mean = acts_calloc(a, B * D, sizeof(float));
    if (m->enc == ENC_GRU4REC) {
        size_t G = m->G, R = B * L;
        a->glen = acts_calloc(a, B, sizeof(int));
        a->gorder = acts_calloc(a, B, sizeof(int));
        a->grow = acts_calloc(a, B, sizeof(int));
        a->gact = acts_calloc(a, L, sizeof(int));
        a->goff = acts_calloc(a, L + 1, sizeof(int));
        a->drop = acts_calloc(a, B * L * D, sizeof(float));
        a->gx = acts_calloc_rows(a, R * D, sizeof(float));
        a->ggi = acts_calloc_rows(a, R * 3 * G, sizeof(float));
        a->ggate = acts_calloc_rows(a, R * 3 * G, sizeof(float));
        a->gghn = acts_calloc_rows(a, R * G, sizeof(float));
        a->gh = acts_calloc_rows(a, R * G, sizeof(float));
        a->ggh = acts_calloc(a, B * 3 * G, sizeof(float));
        a->gdh = acts_calloc(a, B * G, sizeof(float));
        a->glast = acts_calloc(a, B * G, sizeof(float));
        a->dglast = acts_calloc(a, B * G, sizeof(float));
        a->gwt = acts_calloc(a, 3 * G * G, sizeof(float));
    }
}

/* Rows of a training run's activations: a batch, or an evaluation chunk if larger. */
static int train_rows(const Config *c) { return c->B > c->eval_batch ? c->B : c->eval_batch; }

/* Training's memory on N items, checked against the machine's before anything is written:
 * the model's arrays (parameters, gradient, Adam's two moments), a batch's activations (as
 * acts_init reserves them; the arrays of rows count as written, so not here) and `copies`
 * more copies of the parameters (train's best model). M as resolve_negatives leaves it. */
static void check_train_fits(int N, const Config *c, int copies) {
    Model m;
    TensorInit t[N_PARAM_TENSORS];
    model_shape(&m, t, N, c);
    check_params_fit(&m);
    Acts a;
    acts_init(&a, &m, train_rows(c), c->M); /* reserved, not written */
    double bytes = (4.0 + copies) * m.n_params * sizeof(float);
    for (int i = 0; i < a.n_owned; i++) bytes += a.owned_rows[i] ? 0 : a.owned_bytes[i];
    acts_free(&a);
    char what[160];
    snprintf(what, sizeof what, "the parameters (N = %d items), their gradient, Adam's two moments and a batch's activations", N);
    check_fits(bytes, what, "lower --len, --hidden, --interests, --batch, --eval-batch or --neg", 1);
}

void acts_free(Acts *a) {
    for (int i = 0; i < a->n_owned; i++) big_free(a->owned[i], a->owned_bytes[i]);
    memset(a, 0, sizeof *a);
}

void model_free(Model *m) {
    size_t bytes = m->n_params * sizeof(float);
    big_free(m->mem, bytes); big_free(m->gmem, bytes); big_free(m->mmem, bytes); big_free(m->vmem, bytes);
    free(m->ge.row); free(m->ge.items);
    memset(m, 0, sizeof *m);
}

/* ======================================================================== layers
 * Forward/backward pairs with the same argument order (outputs, inputs, weights, sizes).
 * Backward functions accumulate (+=) into gradients zeroed once per step. */

/* Item lookup (REMI-SPEC c.0): x[b,l] = mask[b,l] * E[hist[b,l]].  x (BL, D), or with row
 * its rows (real_rows: position i to row[i], none for -1). */
static void embed_forward(float *x, const int *row, const int *hist, const float *mask, const float *E, int bl,
                          int D) {
    for (int i = 0; i < bl; i++) {
        const float *e = E + (size_t)hist[i] * D;
        long r = row ? row[i] : i;
        if (r >= 0)
            for (int d = 0; d < D; d++) x[r * D + d] = mask[i] != 0.0f ? e[d] : 0.0f;
    }
}
/* The gradient row of an item (ItemGrad), taken on its first write in a step. Serial callers only. */
static int item_grad_row(ItemGrad *ge, int item) {
    if (!ge->row) return item;
    if (ge->row[item] < 0) { ge->row[item] = ge->n; ge->items[ge->n++] = item; }
    return ge->row[item];
}
static float *item_grad(ItemGrad *ge, int item, int D) { return ge->g + (size_t)item_grad_row(ge, item) * D; }

/* The dense (N, D) gradient of a row-kept one (tests). */
static void item_grad_dense(float *out, const ItemGrad *ge, int N, int D) {
    memset(out, 0, (size_t)N * D * sizeof(float));
    for (int r = 0; r < ge->n; r++) memcpy(out + (size_t)ge->items[r] * D, ge->g + (size_t)r * D, D * sizeof(float));
}

/* A list of terms dE[item[i]] += scale[i] x_i, i ascending: only where mask[i] != 0 (mask
 * NULL: every i) and xrow[i] >= 0, scale NULL for 1, x_i = x + (xrow ? xrow[i] : i) D. */
typedef struct { ItemGrad *dE; const int *item; const float *mask, *scale, *x; const int *xrow; int n, D; } Scatter;

/* The terms grouped by the row they add to: row r is group r % SCATTER_GROUPS's, and the
 * group's terms are term[first[g]] .. term[first[g + 1] - 1] in list order, rows in row. */
#define SCATTER_GROUPS 8
typedef struct { const Scatter *s; const int *term, *first, *row; } ScatterPlan;
static void scatter_task(void *ctx, int lo, int hi) { /* groups [lo, hi) */
    const ScatterPlan *p = ctx;
    const Scatter *s = p->s;
    for (int e = p->first[lo]; e < p->first[hi]; e++) {
        int i = p->term[e];
        axpyf(s->dE->g + (size_t)p->row[i] * s->D, s->scale ? s->scale[i] : 1.0f,
              s->x + (size_t)(s->xrow ? s->xrow[i] : i) * s->D, s->D);
    }
}
/* The list's rows taken in order (item_grad_row is serial), then each group's sums on one
 * thread, in list order: every row gets the sums of one loop over the list, for any thread
 * count (serial, the negatives' and the history's scatters took 0.05 ms a Beauty step). */
static void item_grad_scatter(const Scatter *s) {
    int n = s->n, count[SCATTER_GROUPS + 1] = { 0 };
    int *row = (int *)thread_scratch(SCRATCH_TERMS, 2 * (size_t)n), *term = row + n; /* ints in the float scratch */
    for (int i = 0; i < n; i++) {
        int used = (!s->mask || s->mask[i] != 0.0f) && (!s->xrow || s->xrow[i] >= 0);
        row[i] = used ? item_grad_row(s->dE, s->item[i]) : -1;
        if (row[i] >= 0) count[row[i] % SCATTER_GROUPS + 1]++;
    }
    for (int g = 0; g < SCATTER_GROUPS; g++) count[g + 1] += count[g]; /* each group's first term */
    int first[SCATTER_GROUPS + 1];
    memcpy(first, count, sizeof first);
    for (int i = 0; i < n; i++)
        if (row[i] >= 0) term[count[row[i] % SCATTER_GROUPS]++] = i;
    ScatterPlan p = { s, term, first, row };
    parallel_for(SCATTER_GROUPS, scatter_task, &p);
}

/* dE[hist[b,l]] += dx[b,l] on real positions, in order (padding_idx 0 receives nothing).
 * dx (B, L, D), or with row its rows (real_rows, GRU4Rec's steps; -1: none). */
static void embed_backward(ItemGrad *dE, const float *dx, const int *row, const int *hist, const float *mask, int bl,
                           int D) {
    item_grad_scatter(&(Scatter){ dE, hist, mask, NULL, dx, row, bl, D });
}

/* REMI-SPEC c.1 step 1: xt[b,l] = x[b,l] + P[l], padded positions included.  x and xt (B, L, D)
 * when row is NULL, else row[b L + l] is the row of x and xt that position (b, l) is at, -1 for
 * none (SA's hidden layer skips rows, see real_rows). */
static void posadd_forward(float *xt, const float *x, const float *P, const int *row, int nb, int L, int D) {
    for (int i = 0; i < nb * L; i++) {
        long r = row ? row[i] : i;
        if (r >= 0)
            for (int d = 0; d < D; d++) xt[r * D + d] = x[r * D + d] + P[(size_t)(i % L) * D + d];
    }
}
/* dx[b] += dxt[b] for the samples b in [b0, b1); dP[i] += sum_b dxt[b,i] (b ascending, all
 * nb samples) for the flat positions i = l D + d in [i0, i1); dx and dxt on the rows of row
 * as in posadd_forward, positions without one add nothing */
static void posadd_backward_part(float *dx, float *dP, const float *dxt, const int *row, int nb, int L, int D,
                                 int b0, int b1, size_t i0, size_t i1) {
    for (int i = b0 * L; i < b1 * L; i++) {
        long r = row ? row[i] : i;
        if (r >= 0)
            for (int d = 0; d < D; d++) dx[r * D + d] += dxt[r * D + d];
    }
    for (int b = 0; b < nb; b++)
        for (size_t l = i0 / D; l * D < i1; l++) {
            long r = row ? row[b * L + l] : b * L + (long)l;
            size_t d0 = l * D < i0 ? i0 - l * D : 0, d1 = (l + 1) * D > i1 ? i1 - l * D : (size_t)D;
            if (r >= 0)
                for (size_t d = d0; d < d1; d++) dP[l * D + d] += dxt[r * D + d];
        }
}
/* The whole batch in one part, for gradcheck; training splits it over threads (sa_backward). */
static void posadd_backward(float *dx, float *dP, const float *dxt, int nb, int L, int D) {
    posadd_backward_part(dx, dP, dxt, NULL, nb, L, D, 0, nb, 0, (size_t)L * D);
}

typedef struct { float *y; const float *x, *W; int rows, in, out; } NarrowCtx;
static void narrow_task(void *ctx, int lo, int hi) { /* row tiles [lo, hi) of VW rows */
    const NarrowCtx *c = ctx;
    int r1 = hi * VW < c->rows ? hi * VW : c->rows;
    narrow_rows(c->y, c->x, (size_t)c->in, c->W, lo * VW, r1, c->in, c->out, thread_scratch(SCRATCH_GEMM, (size_t)c->in * VW));
}

/* Bias-free nn.Linear: y = x W^T.  y (rows, out), x (rows, in), W (out, in), wt scratch (in, out). */
static void linear_forward(float *y, const float *x, const float *W, float *wt, int rows, int in, int out) {
    if (out <= NARROW_OUT) {
        NarrowCtx c = { y, x, W, rows, in, out };
        parallel_for((rows + VW - 1) / VW, narrow_task, &c);
        return;
    }
    transpose(wt, W, out, in);
    gemm_nn(y, x, wt, rows, out, in, 0);
}
/* y = tanh(y) in place. tanh_v is a chain of some 40 dependent operations per vector, more
 * than the core keeps in flight for the next vectors; over blocks of TANH_BLOCK elements, a
 * stage at a time, the vectors of a stage are independent of each other (45 -> 32 cycles per
 * 16 floats; the same operations, the same bits). */
#define TANH_BLOCK 128
static void tanh_forward(float *y, size_t n) {
    size_t i = 0;
    for (; i + TANH_BLOCK <= n; i += TANH_BLOCK) {
        float *x = y + i, r[TANH_BLOCK], e[TANH_BLOCK];
        for (int j = 0; j < TANH_BLOCK; j++) r[j] = tanh_reduce(x[j], &e[j]);
        for (int j = 0; j < TANH_BLOCK; j++) e[j] = exp_scaled(r[j], e[j]);
        for (int j = 0; j < TANH_BLOCK; j++) x[j] = tanh_pick(x[j], e[j]);
    }
    for (; i < n; i++) y[i] = tanh_v(y[i]);
}
/* forward: y = tanh(u);  du = dy * (1 - y^2), in place on dy */
static void tanh_backward(float *dy, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) dy[i] = dy[i] * (1.0f - y[i] * y[i]);
}

/* A layer with few outputs (SA's K attention logits): the products of its backward pass
 * have a 4-long sum (dx) or 4 output rows (dW), which the register tiles serve badly (a tile
 * per 4 steps of work; 16 tiles, each walking a column strip of x). Here they stream the rows
 * instead: dx[r] = sum_k dy[r,k] W[k] and dW[k] += sum_r dy[r,k] x[r], each sum in the order
 * of the tiles' (k, resp. r ascending, from 0, then added to dW), so the same bits.
 * tanh_x: x is the output of a tanh, and dx becomes the gradient of its input,
 * (dy W) * (1 - x^2), as tanh_backward computes it, in the same pass. */
typedef struct { float *dx, *dW; const float *dy, *x, *W; int rows, in, out, tanh_x; } LinearCtx;
static void narrow_dx_task(void *ctx, int lo, int hi) { /* rows [lo, hi) of dx */
    const LinearCtx *c = ctx;
    size_t in = c->in, out = c->out;
    for (size_t r = lo; r < (size_t)hi; r++) {
        weighted_sum(c->dx + r * in, c->dy + r * out, 1, c->W, in, (int)out, (int)in);
        if (c->tanh_x) tanh_backward(c->dx + r * in, c->x + r * in, in); /* the row still in L1 */
    }
}
/* dW's rows [k0, k0 + KN) on the NARROW_NS VW columns from j, their sums over the rows of x
 * held in registers (KN <= 4: at most 16 accumulators) */
#define NARROW_NS (VW == 16 ? 4 : 2)
static inline __attribute__((always_inline)) void narrow_dw_strip(const LinearCtx *c, size_t j, size_t k0,
                                                                  const int KN) {
    vfw acc[4][NARROW_NS] = { 0 };
    size_t in = c->in, out = c->out;
    for (size_t r = 0; r < (size_t)c->rows; r++) {
        const float *x = c->x + r * in + j, *dy = c->dy + r * out + k0;
        vfw xv[NARROW_NS];
        for (int v = 0; v < NARROW_NS; v++) xv[v] = *(const vfw *)(x + v * VW);
        for (int k = 0; k < KN; k++)
            for (int v = 0; v < NARROW_NS; v++) acc[k][v] = vmadd(acc[k][v], dy[k], xv[v]);
    }
    for (int k = 0; k < KN; k++)
        for (int v = 0; v < NARROW_NS; v++) {
            vfw *d = (vfw *)(c->dW + (k0 + k) * in + j + v * VW);
            *d = *d + acc[k][v];
        }
}
static void narrow_dw_task(void *ctx, int lo, int hi) { /* columns [16 lo, 16 hi) of dW */
    const LinearCtx *c = ctx;
    size_t in = c->in, out = c->out, j0 = (size_t)lo * 16, j1 = (size_t)hi * 16 < in ? (size_t)hi * 16 : in;
    /* strips of NARROW_NS vectors: a few passes over the rows of x, four cache lines of each
     * row per pass with AVX-512 (strips of 16 columns, one line of each row per pass, were
     * slower inside the step than the loop below, which takes what is left) */
    for (; j0 + NARROW_NS * VW <= j1; j0 += NARROW_NS * VW)
        for (size_t k0 = 0; k0 < out; k0 += 4) {
            size_t kn = out - k0 < 4 ? out - k0 : 4;
            if (kn == 4) narrow_dw_strip(c, j0, k0, 4);
            else if (kn == 3) narrow_dw_strip(c, j0, k0, 3);
            else if (kn == 2) narrow_dw_strip(c, j0, k0, 2);
            else narrow_dw_strip(c, j0, k0, 1);
        }
    size_t w = j1 - j0; /* the columns left: one pass, the sums in a scratch row per k */
    if (!w) return;
    float *t = thread_scratch(SCRATCH_LAYER, out * w); /* (out, w) the sums over rows */
    for (size_t i = 0; i < out * w; i++) t[i] = 0.0f;
    for (size_t r = 0; r < (size_t)c->rows; r++)
        for (size_t k = 0; k < out; k++) axpyf(t + k * w, c->dy[r * out + k], c->x + r * in + j0, (int)w);
    for (size_t k = 0; k < out; k++) axpyf(c->dW + k * in + j0, 1.0f, t + k * w, (int)w);
}

static void tanh_rows_task(void *ctx, int lo, int hi) { /* rows [lo, hi) of dx, after the products */
    const LinearCtx *c = ctx;
    tanh_backward(c->dx + (size_t)lo * c->in, c->x + (size_t)lo * c->in, (size_t)(hi - lo) * c->in);
}

/* dx = dy W (written, not added: every caller's dx is fresh);  dW += dy^T x. With tanh_x,
 * x is a tanh's output and dx becomes the gradient of the tanh's input, (dy W) * (1 - x^2):
 * in the narrow layer's row pass, else in a pass of its own after the products. */
static void linear_backward(float *dx, float *dW, const float *dy, const float *x, const float *W,
                            int rows, int in, int out, int tanh_x) {
    LinearCtx c = { dx, dW, dy, x, W, rows, in, out, tanh_x };
    if (out <= NARROW_OUT) {
        if (dx) parallel_for(rows, narrow_dx_task, &c);
        parallel_for((in + 15) / 16, narrow_dw_task, &c);
        return;
    }
    if (dx) gemm_nn(dx, dy, W, rows, in, out, 0);
    gemm_tn(dW, dy, x, out, in, rows, 1);
    if (dx && tanh_x) parallel_for(rows, tanh_rows_task, &c);
}

/* softmax of one row in place */
static void softmax_row(float *x, int n) {
    float mx = -FLT_MAX, sum = 0.0f;
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++) { x[i] = exp_v(x[i] - mx); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* REMI-SPEC c.1 steps 3-5: att[b,k,:] = softmax over l of z[b,l,k], with masked positions
 * set to -2^32+1 first, so they get exactly 0.  z (B, L, K), att (B, K, L) */
static void masked_softmax_forward(float *att, const float *z, const float *mask, int nb, int K, int L) {
    const float masked = -4294967295.0f;
    for (int b = 0; b < nb; b++)
        for (int k = 0; k < K; k++) {
            float *a = att + ((size_t)b * K + k) * L;
            for (int l = 0; l < L; l++) a[l] = mask[b * L + l] != 0.0f ? z[((size_t)b * L + l) * K + k] : masked;
            softmax_row(a, L);
        }
}
/* forward: a = softmax(z);  dz[b,l,k] += a_l (da_l - sum_l' a_l' da_l') on real positions;
 * padded ones receive nothing (their z was replaced by a constant, c.1 step 4: the
 * reference's torch.where passes them no gradient). With a real position in the sample the
 * formula gives them 0 anyway (a_l = 0); with none, a is uniform and it need not. */
static void masked_softmax_backward(float *dz, const float *datt, const float *att, const float *mask, int nb, int K,
                                    int L) {
    for (int b = 0; b < nb; b++)
        for (int k = 0; k < K; k++) {
            const float *a = att + ((size_t)b * K + k) * L, *da = datt + ((size_t)b * K + k) * L;
            float dot = 0.0f;
            for (int l = 0; l < L; l++) dot += a[l] * da[l];
            for (int l = 0; l < L; l++)
                if (mask[b * L + l] != 0.0f) dz[((size_t)b * L + l) * K + k] += a[l] * (da[l] - dot);
        }
}

/* The number of a sample's real positions when they come first (the histories' layout,
 * fill_history; 0 for none), else L: the positions that SA's attention sums and the capsule
 * routing reads u_hat at (interest_forward, routing_forward): the later, padded ones add only
 * +-0 terms there. */
static int real_span(const float *mask, int L) {
    int n = 0;
    while (n < L && mask[n] != 0.0f) n++;
    for (int l = n; l < L; l++)
        if (mask[l] != 0.0f) return L;
    return n;
}
/* REMI-SPEC c.1 step 6: v[b,k] = sum_l att[b,k,l] x[b,l] (x without positions).
 * v (B, K, D), att (B, K, L), x (B, L, D). With mask (B, L), the sums run over a sample's
 * real positions when they come first (real_span) and att is 0 at all the others, as the
 * masked softmax leaves it: their terms are +-0 and the sums, which start at +0 and are never
 * -0, the same bits (x finite). A history with no real position attends evenly to all L. */
static int attention_span(const float *att, const float *mask, int K, int L) { /* one sample */
    int n = mask ? real_span(mask, L) : L;
    for (int k = 0; k < K; k++)
        for (int l = n; l < L; l++)
            if (att[k * L + l] != 0.0f) return L;
    return n;
}
/* One sample, over its positions 0..n-1: v (K, D), att (K, L), x (n, D). */
static void interest_forward_one(float *v, const float *att, const float *x, int n, int K, int L, int D) {
    for (int k = 0; k < K; k++) weighted_sum(v + (size_t)k * D, att + (size_t)k * L, 1, x, D, n, D);
}
/* The batch over interest_forward_one, for gradcheck and the selftest: training calls the one
 * sample's pass from its attention task (sa_attend_task). */
static void interest_forward(float *v, const float *att, const float *x, const float *mask, int nb, int K, int L,
                             int D) {
    for (int b = 0; b < nb; b++) {
        int n = attention_span(att + (size_t)b * K * L, mask ? mask + (size_t)b * L : NULL, K, L);
        interest_forward_one(v + (size_t)b * K * D, att + (size_t)b * K * L, x + (size_t)b * L * D, n, K, L, D);
    }
}
/* datt[b,k,l] += <dv[b,k], x[b,l]>;  dx[b,l] = sum_k att[b,k,l] dv[b,k] (written, not added).
 * With mask, at the positions interest_forward sums only: the others' datt is used only times
 * their att (+0) in the softmax's backward, and their dx reaches nothing (embed_backward). */
static void interest_backward_one(float *datt, float *dx, const float *dv, const float *att, const float *x, int n,
                                  int K, int L, int D) {
    dots_kl(datt, x, D, dv, K, L, n, D, 0, 1);
    for (int l = 0; l < n; l++) weighted_sum(dx + (size_t)l * D, att + l, L, dv, D, K, D);
}
/* The batch over interest_backward_one, for gradcheck and the selftest (training: sa_attend_back_task). */
static void interest_backward(float *datt, float *dx, const float *dv, const float *att, const float *x,
                              const float *mask, int nb, int K, int L, int D) {
    for (int b = 0; b < nb; b++) {
        size_t kl = (size_t)b * K * L, ld = (size_t)b * L * D;
        int n = attention_span(att + kl, mask ? mask + (size_t)b * L : NULL, K, L);
        interest_backward_one(datt + kl, dx + ld, dv + (size_t)b * K * D, att + kl, x + ld, n, K, L, D);
    }
}

/* REMI-SPEC c.4, label-aware hard readout: k* = argmax_k <v[b,k], E[t_b]> (first on ties),
 * r[b] = v[b,k*]. Neither the argmax nor E[t] used for it pass a gradient. */
static void readout_forward(float *r, int *sel, const float *v, const float *E, const int *target,
                            int nb, int K, int D) {
    for (int b = 0; b < nb; b++) {
        float s[64]; /* K <= 64 (check_config) */
        dots(s, v + (size_t)b * K * D, D, E + (size_t)target[b] * D, K, D, 0);
        int best = 0;
        for (int k = 1; k < K; k++)
            if (s[k] > s[best]) best = k;
        sel[b] = best;
        memcpy(r + (size_t)b * D, v + ((size_t)b * K + best) * D, D * sizeof(float));
    }
}
/* dv[b,k*] += dr[b] */
static void readout_backward(float *dv, const float *dr, const int *sel, int nb, int K, int D) {
    for (int b = 0; b < nb; b++) axpyf(dv + ((size_t)b * K + sel[b]) * D, 1.0f, dr + (size_t)b * D, D);
}

/* ======================================================================== encoder: ComiRec-SA
 * REMI-SPEC c.1; the same forward serves ComiRec-SA and REMI. Reads a->hist, a->mask;
 * writes x, xt, h, z, att and the interests v (nb, K, D). The per-sample layers run on
 * ranges of samples in parallel (each sample is written by one thread), the products
 * inside gemm. */
typedef struct { Model *m; Acts *a; int nb, rr; } EncCtx; /* parallel tasks of every encoder */

/* The rows a per-position layer computes (SA's hidden layer, the capsules' maps): the real
 * positions. row (B, L) holds the row of each real position and -1 for a padded one; returns
 * their number R. Sample by sample, or with off (L + 1) position by position (off[l] the
 * first row of position l, samples ascending within it). With `all`, every position gets a
 * row, as the reference computes them (the selftest compares). What a padded row would have
 * computed reaches nothing (see sa_forward and caps_forward); the weight gradients' sums then
 * miss only zero terms, which can change the sign of a zero gradient and nothing else (Adam's
 * m is never -0, so m, v and the parameters come out the same bits). */
static int real_rows(int *row, int *off, const float *mask, int nb, int L, int all) {
    int R = 0;
    if (!off)
        for (int i = 0; i < nb * L; i++) row[i] = mask[i] != 0.0f || all ? R++ : -1;
    else
        for (int l = 0; l < L; l++) {
            off[l] = R;
            for (int b = 0; b < nb; b++) row[b * L + l] = mask[b * L + l] != 0.0f || all ? R++ : -1;
        }
    if (off) off[L] = R;
    return R;
}

static void sa_input_task(void *ctx, int lo, int hi) { /* samples [lo, hi) */
    const EncCtx *c = ctx;
    const Model *m = c->m;
    Acts *a = c->a;
    size_t o = (size_t)lo * m->L;
    embed_forward(a->x, a->prow + o, a->hist + o, a->mask + o, m->p.item_emb, (hi - lo) * m->L, m->D);
    posadd_forward(a->xt, a->x, m->p.pos_emb, a->prow + o, hi - lo, m->L, m->D);
}
static void sa_tanh_task(void *ctx, int lo, int hi) { /* rows [lo, hi) of h */
    const EncCtx *c = ctx;
    size_t H = c->m->H;
    tanh_forward(c->a->h + lo * H, (hi - lo) * H);
}
/* x and dx are kept on the rows of real_rows, as xt is; the attention sums read sample b's
 * positions 0..n-1 (n: attention_span). Those are rows row[0] .. row[0] + n - 1 when its real
 * positions come first and n does not pass them (fill_history's batches, or every position a
 * row): off is then the offset of the sample's rows in x and dx, used in place. Else (no real
 * position, which attends to all L, or a real one after a padded one) off is -1, and sa_block
 * builds its (L, D) block, zeros at the positions without a row. */
typedef struct { const float *att, *mask; const int *row; int n; long off; } SaSample;
static SaSample sa_sample(const Acts *a, int b, int K, int L, int D) {
    SaSample s = { a->att + (size_t)b * K * L, a->mask + (size_t)b * L, a->prow + (size_t)b * L, 0, 0 };
    s.n = attention_span(s.att, s.mask, K, L);
    for (int l = 0; l < s.n; l++)
        if (s.row[l] < 0 || s.row[l] != s.row[0] + l) return s.off = -1, s;
    s.off = s.n ? (long)s.row[0] * D : 0;
    return s;
}
static const float *sa_block(float *tmp, const float *x, const int *row, int L, int D) {
    for (int l = 0; l < L; l++)
        if (row[l] >= 0) memcpy(tmp + (size_t)l * D, x + (size_t)row[l] * D, D * sizeof(float));
        else memset(tmp + (size_t)l * D, 0, D * sizeof(float));
    return tmp;
}
static void sa_attend_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    const Model *m = c->m;
    Acts *a = c->a;
    int L = m->L, D = m->D, K = m->K;
    for (int i = lo * L; i < hi * L; i++) /* z of the hidden layer's rows, 0 where skipped (masked) */
        for (int k = 0; k < K; k++) a->z[(size_t)i * K + k] = a->prow[i] >= 0 ? a->zr[(size_t)a->prow[i] * K + k] : 0.0f;
    masked_softmax_forward(a->att + (size_t)lo * K * L, a->z + (size_t)lo * L * K, a->mask + (size_t)lo * L, hi - lo,
                           K, L);
    float *tmp = thread_scratch(SCRATCH_LAYER, (size_t)L * D);
    for (int b = lo; b < hi; b++) {
        SaSample s = sa_sample(a, b, K, L, D);
        const float *x = s.off >= 0 ? a->x + s.off : sa_block(tmp, a->x, s.row, L, D);
        interest_forward_one(a->v + (size_t)b * K * D, s.att, x, s.n, K, L, D);
    }
}

static void sa_forward(const Model *m, Acts *a, int nb) {
    int L = m->L, D = m->D, H = m->H, K = m->K;
    EncCtx c = { (Model *)m, a, nb, 0 };
    a->R = real_rows(a->prow, NULL, a->mask, nb, L, a->all_rows); /* a padded position's z is replaced before
                                                                    * the softmax and gets no gradient */
    parallel_for(nb, sa_input_task, &c);                                   /* x, xt */
    linear_forward(a->h, a->xt, m->p.w1, a->w1t, a->R, D, H);       /* xt W1^T */
    parallel_for(a->R, sa_tanh_task, &c);                                  /* h */
    linear_forward(a->zr, a->h, m->p.w2, a->w2t, a->R, H, K);     /* z */
    parallel_for(nb, sa_attend_task, &c);                                  /* att, v */
}

static void sa_attend_back_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    const Model *m = c->m;
    Acts *a = c->a;
    int L = m->L, D = m->D, K = m->K;
    size_t kl = (size_t)lo * K * L, n = (size_t)(hi - lo) * L;
    memset(a->dz + kl, 0, n * K * sizeof(float));
    float *tmp = thread_scratch(SCRATCH_LAYER, 2 * (size_t)L * D), *dtmp = tmp + (size_t)L * D;
    for (int b = lo; b < hi; b++) { /* dx on the sample's rows: in place, or through dtmp */
        SaSample s = sa_sample(a, b, K, L, D);
        const float *x = s.off >= 0 ? a->x + s.off : sa_block(tmp, a->x, s.row, L, D);
        float *dx = s.off >= 0 ? a->dx + s.off : dtmp;
        interest_backward_one(a->datt + (size_t)b * K * L, dx, a->dv + (size_t)b * K * D, s.att, x, s.n, K, L, D);
        if (s.off < 0)
            for (int l = 0; l < s.n; l++)
                if (s.row[l] >= 0) memcpy(a->dx + (size_t)s.row[l] * D, dtmp + (size_t)l * D, D * sizeof(float));
    }
    masked_softmax_backward(a->dz + kl, a->datt + kl, a->att + kl, a->mask + (size_t)lo * L, hi - lo, K, L);
    for (int i = lo * L; i < hi * L; i++) /* dz of the hidden layer's rows */
        if (a->prow[i] >= 0)
            for (int k = 0; k < K; k++) a->dzr[(size_t)a->prow[i] * K + k] = a->dz[(size_t)i * K + k];
}
/* samples [lo, hi) of dx and a share of P's positions in proportion: each thread adds to the
 * rows of dx its own samples wrote (with the cores on separate caches, 0.1-0.25 ms less per
 * step than splitting dx by positions too) */
static void sa_pos_back_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    size_t LD = (size_t)c->m->L * c->m->D;
    posadd_backward_part(c->a->dx, c->m->g.pos_emb, c->a->dxt, c->a->prow, c->nb, c->m->L, c->m->D, lo, hi,
                         lo * LD / c->nb, hi * LD / c->nb);
}

/* From dv and datt (which may already hold the RR gradient) to the parameter gradients. */
static void sa_backward(Model *m, Acts *a, int nb) {
    int L = m->L, D = m->D, H = m->H, K = m->K;
    EncCtx c = { m, a, nb, 0 };
    parallel_for(nb, sa_attend_back_task, &c);                                   /* datt -> dz, dx */
    linear_backward(a->dh, m->g.w2, a->dzr, a->h, m->p.w2, a->R, H, K, 1); /* dh: of xt W1^T, tanh's included */
    linear_backward(a->dxt, m->g.w1, a->dh, a->xt, m->p.w1, a->R, D, H, 0);
    parallel_for(nb, sa_pos_back_task, &c);                                      /* dx, dP */
    embed_backward(&m->ge, a->dx, a->prow, a->hist, a->mask, nb * L, D);
}

/* ======================================================================== encoder: capsule routing (ComiRec-DR, MIND)
 * REMI-SPEC c.2 (DR) and c.3 (MIND). Predictions u_hat[k,l] come from a per-position
 * bilinear map (DR: W[l] maps x_l to K vectors of D) or from one shared map (MIND: S x_l,
 * the same vector for every k). Three routing iterations, per sample and interest:
 *   c = mask * softmax over l of the logits b (padded slots stay in the denominator),
 *   s_k = sum_l c_kl u_hat_kl,  v_k = squash(s_k),
 *   after iterations 0 and 1: b_kl += <u_hat_kl, v_k>.
 * b starts at 0 (DR) or N(0, 1) (MIND, drawn on every forward pass). The logits of
 * iterations 0 and 1 are built from a detached u_hat, so the interests (v of the last
 * iteration) pass their gradient to u_hat with c held constant.
 *
 * RR on DR and MIND (which the reference does not define, REMI-SPEC i.1): the routing
 * matrix is the last iteration's c (K, L), and RR is the formula of REMI-SPEC e on it.
 * RR's gradient goes back through the three iterations to u_hat: with the stop-gradient
 * applied to it too, c would be a constant and RR would change nothing. */

/* u_hat[k, l] of one sample is at u + k sk + l sl (sk = 0 for MIND: one vector for all k;
 * DR: sk = D, sl = K D, a position's K rows one after another). */
typedef struct { float *u; size_t sk, sl; } Uhat;
static float *uhat_at(Uhat u, int k, int l) { return u.u + k * u.sk + l * u.sl; }

/* y[k L + l] = <u_hat[k,l], V[k]> (or y += it, with acc) for l < n, V (K, D), as one product
 * of the matrix kernel (dots_kl): MIND's positions have one u_hat row for every interest,
 * DR's K rows of a position are consecutive (sl = K sk). */
static void uhat_dots(float *y, Uhat u, const float *V, int K, int L, int n, int D, int acc) {
    if (u.sk) dots_kl(y, u.u, (int)u.sk, V, K, L, n, D, 1, acc);
    else dots_kl(y, u.u, (int)u.sl, V, K, L, n, D, 0, acc);
}

/* squash(s) = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + 1e-9), as the reference writes it */
static float squash_factor(float n2) { return n2 / (1.0f + n2) / sqrtf(n2 + 1e-9f); }
static void squash_forward(float *v, const float *s, int D) {
    float f = squash_factor(dotf(s, s, D));
    for (int d = 0; d < D; d++) v[d] = f * s[d];
}
/* forward: v = f(n) s with n = |s|^2;  ds += f dv + 2 f'(n) <s, dv> s, where
 * f'(n) = ((n + e) - n (1 + n) / 2) / ((1 + n)^2 (n + e)^(3/2)) */
static void squash_backward(float *ds, const float *dv, const float *s, int D) {
    float n2 = dotf(s, s, D), f = squash_factor(n2), ne = n2 + 1e-9f;
    float fp = (ne - 0.5f * n2 * (1.0f + n2)) / ((1.0f + n2) * (1.0f + n2) * ne * sqrtf(ne));
    float c = 2.0f * fp * dotf(s, dv, D);
    for (int d = 0; d < D; d++) ds[d] += f * dv[d] + c * s[d];
}

/* forward: p = softmax(b), c = mask * p, the mask after the softmax (no renormalising: routing,
 * c.2; SA masks its logits before, masked_softmax_backward);  db += p (mask dc - <p, mask dc>) */
static void softmax_then_mask_row_backward(float *db, const float *dc, const float *p, const float *mask, int n) {
    float dot = 0.0f;
    for (int i = 0; i < n; i++) dot += p[i] * mask[i] * dc[i];
    for (int i = 0; i < n; i++) db[i] += p[i] * (mask[i] * dc[i] - dot);
}

/* s_k = sum_l c_kl u_hat_kl over l < n with c = mask * p (or `frozen`), then v_k = squash(s_k). */
static void route_capsules(float *v, float *s, const float *p, const float *mask, const float *frozen, Uhat u,
                           int K, int L, int n, int D) {
    float *c = thread_scratch(SCRATCH_COEF, L);
    for (int k = 0; k < K; k++) {
        float *sk = s + (size_t)k * D;
        for (int l = 0; l < n; l++) c[l] = frozen ? frozen[k * L + l] : mask[l] * p[k * L + l];
        weighted_sum(sk, c, 1, uhat_at(u, k, 0), u.sl, n, D);
        squash_forward(v + (size_t)k * D, sk, D);
    }
}

/* One sample. b0 (K, L) initial logits or NULL for zeros. Writes p (3, K, L) the softmax
 * of each iteration, s (3, K, D), v01 (2, K, D) the squashed capsules of iterations 0
 * and 1, att (K, L) = mask * p[2] the routing matrix, out (K, D) the interests.
 * frozen (K, L), if given, replaces the last c in the interests (gradient check only).
 * n: u_hat is read at positions l < n only, those after being padded ones (real_span):
 * there u_hat is 0, so c_kl u_hat_kl adds +0 to s_k (which starts at +0 and so is never
 * -0: the same bits) and <u_hat_kl, v_k> is +0, which leaves the logit as it is (b + 0 is
 * b but for the sign of a zero, which its exp ignores). Finite values assumed: an inf in
 * v_k would have made those terms NaN. The softmax still spans all L positions. */
static void routing_forward(float *out, float *att, float *p, float *s, float *v01, Uhat u, const float *mask,
                            const float *b0, const float *frozen, int K, int L, int n, int D) {
    size_t KL = (size_t)K * L, KD = (size_t)K * D;
    if (b0) memcpy(p, b0, KL * sizeof(float));
    else memset(p, 0, KL * sizeof(float));
    for (int it = 0; it < 3; it++) {
        float *pi = p + it * KL, *next = pi + KL;
        if (it < 2) memcpy(next, pi, KL * sizeof(float)); /* next logits = these + the update */
        for (int k = 0; k < K; k++) softmax_row(pi + k * L, L);
        float *v = it < 2 ? v01 + it * KD : out;
        route_capsules(v, s + it * KD, pi, mask, it == 2 ? frozen : NULL, u, K, L, n, D);
        if (it < 2) uhat_dots(next, u, v, K, L, n, D, 1);
    }
    for (size_t i = 0; i < KL; i++) att[i] = mask[i % L] * p[2 * KL + i];
}

/* One sample. dout (K, D): gradient of the interests; datt (K, L): of the routing
 * matrix, or NULL. du (same layout as u) += the gradient w.r.t. u_hat, at l < n: as in
 * routing_forward, u_hat is 0 at the later, padded positions, so the sums over l miss +-0
 * terms only and the dot products there are +0; their gradient would reach no parameter
 * (x is 0 there, and the item table takes nothing from a padded position). */
static void routing_backward(Uhat du, const float *dout, const float *datt, const float *p, const float *s,
                             const float *v01, Uhat u, const float *mask, int K, int L, int n, int D) {
    size_t KL = (size_t)K * L, KD = (size_t)K * D;
    float *ds = thread_scratch(SCRATCH_LAYER, 2 * KL + KD + (size_t)D), *gb = ds + KD, *gc = gb + KL, *gv = gc + KL;
    /* the interests, c of the last iteration constant */
    for (int k = 0; k < K; k++) {
        for (int d = 0; d < D; d++) ds[d] = 0.0f;
        squash_backward(ds, dout + (size_t)k * D, s + 2 * KD + (size_t)k * D, D);
        for (int l = 0; l < n; l++) axpyf(uhat_at(du, k, l), mask[l] * p[2 * KL + k * L + l], ds, D);
    }
    if (!datt) return;
    /* the routing matrix, back through the iterations: gc = d/dc of iteration it, gb =
     * d/db of its logits (b_it = b_{it-1} + <u_hat, v_{it-1}>; b_0 is a constant) */
    memcpy(gc, datt, KL * sizeof(float));
    memset(gb, 0, KL * sizeof(float));
    for (int it = 2; it > 0; it--) {
        const float *pi = p + it * KL, *pp = p + (it - 1) * KL, *vp = v01 + (it - 1) * KD, *sp = s + (it - 1) * KD;
        for (int k = 0; k < K; k++) softmax_then_mask_row_backward(gb + k * L, gc + k * L, pi + k * L, mask, L);
        for (int k = 0; k < K; k++) {
            weighted_sum(gv, gb + k * L, 1, uhat_at(u, k, 0), u.sl, n, D); /* sum_l gb_kl u_hat_kl */
            float *dsk = ds + (size_t)k * D; /* (K, D): d/ds of iteration it - 1 */
            for (int d = 0; d < D; d++) dsk[d] = 0.0f;
            squash_backward(dsk, gv, sp + (size_t)k * D, D);
            for (int l = 0; l < n; l++) { /* du_kl += gb_kl v_k (through the logits), then c_kl ds_k */
                float *dul = uhat_at(du, k, l), a = gb[k * L + l], c = mask[l] * pp[k * L + l];
                const float *vk = vp + (size_t)k * D;
                for (int d = 0; d < D; d++) dul[d] = (dul[d] + a * vk[d]) + c * dsk[d];
            }
        }
        uhat_dots(gc, u, ds, K, L, n, D, 0);
        for (int k = 0; k < K; k++)
            for (int l = n; l < L; l++) gc[k * L + l] = 0.0f; /* <0, ds_k> */
    }
}

/* u_hat of sample b (DR: (L, K D) rows, k-major inside; MIND: (L, D), stride 0 over k) */
static Uhat caps_uhat(const Model *m, float *base, int b) {
    size_t D = m->D, K = m->K;
    if (m->enc == ENC_DR) return (Uhat){ base + (size_t)b * caps_stride(m), D, K * D };
    return (Uhat){ base + (size_t)b * caps_stride(m), 0, D };
}

static void caps_embed_task(void *ctx, int lo, int hi) { /* the history's item embeddings on its rows, into xt (no positions) */
    const EncCtx *c = ctx;
    size_t o = (size_t)lo * c->m->L;
    embed_forward(c->a->xt, c->a->prow + o, c->a->hist + o, c->a->mask + o, c->m->p.item_emb, (hi - lo) * c->m->L,
                  c->m->D);
}
static void caps_route_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    const Model *m = c->m;
    Acts *a = c->a;
    size_t K = m->K, L = m->L, D = m->D;
    for (int b = lo; b < hi; b++) {
        Uhat u = caps_uhat(m, a->uhat, b);
        int n = real_span(a->mask + b * L, (int)L);
        for (int l = 0; l < n; l++) { /* u_hat from its rows, 0 at padded positions */
            int r = a->prow[b * L + l];
            if (r >= 0) memcpy(u.u + l * u.sl, a->ur + (size_t)r * u.sl, u.sl * sizeof(float));
            else memset(u.u + l * u.sl, 0, u.sl * sizeof(float));
        }
        routing_forward(a->caps + b * K * D, a->att + b * K * L, a->rp + b * 3 * K * L, a->rs + b * 3 * K * D,
                        a->rv + b * 2 * K * D, u, a->mask + b * L, m->enc == ENC_MIND ? a->noise + b * K * L : NULL,
                        a->route_frozen ? a->route_frozen + b * K * L : NULL, (int)K, (int)L, n, (int)D);
    }
}

/* DR's bilinear step, position by position: uhat[:, l, :] (nb, K D) = x[:, l, :] W[l]^T */
static void dr_transpose_task(void *ctx, int lo, int hi) { /* positions [lo, hi): W[l]^T into capt */
    const EncCtx *c = ctx;
    size_t D = c->m->D, KD = (size_t)c->m->K * D;
    for (int l = lo; l < hi; l++) transpose(c->a->capt + l * D * KD, c->m->p.caps + l * KD * D, (int)KD, (int)D);
}
static void dr_bilinear_forward(const Model *m, Acts *a, int nb) {
    int L = m->L, D = m->D, KD = m->K * m->D;
    EncCtx c = { (Model *)m, a, nb, 0 };
    parallel_for(L, dr_transpose_task, &c);
    Gemm *g = xmalloc((size_t)L * sizeof(Gemm));
    for (int l = 0; l < L; l++) /* position l's rows: ur[poff[l]..] (n_l, K D) = xt[poff[l]..] (n_l, D) W[l]^T */
        g[l] = (Gemm){ a->ur + (size_t)a->poff[l] * KD, KD, a->xt + (size_t)a->poff[l] * D, D, 1,
                       a->capt + (size_t)l * D * KD, KD, a->poff[l + 1] - a->poff[l], KD, D, 0 };
    gemm_many(g, L);
    free(g);
}
/* On position l's rows: dW[l] += dur^T xt;  dxt = dur W[l] */
static void dr_bilinear_backward(Model *m, Acts *a) {
    int L = m->L, D = m->D, KD = m->K * m->D;
    Gemm *g = xmalloc((size_t)2 * L * sizeof(Gemm));
    for (int l = 0; l < L; l++) {
        const float *du = a->dur + (size_t)a->poff[l] * KD;
        int n = a->poff[l + 1] - a->poff[l];
        g[2 * l] = (Gemm){ m->g.caps + (size_t)l * KD * D, D, du, 1, KD, a->xt + (size_t)a->poff[l] * D, D, KD, D, n, 1 };
        g[2 * l + 1] = (Gemm){ a->dxt + (size_t)a->poff[l] * D, D, du, KD, 1, m->p.caps + (size_t)l * KD * D, D, n, D, KD, 0 };
    }
    gemm_many(g, 2 * L);
    free(g);
}

/* Writes the interests a->v (nb, K, D) and the routing matrices a->att (nb, K, L). */
static void caps_forward(const Model *m, Acts *a, int nb) {
    int L = m->L, D = m->D, K = m->K;
    EncCtx c = { (Model *)m, a, nb, 0 };
    /* a padded position's x is 0, so its u_hat is 0 (+0, as the products would give) and the
     * maps' gradients through it are zero terms: the maps run on the real positions' rows */
    a->R = real_rows(a->prow, m->enc == ENC_DR ? a->poff : NULL, a->mask, nb, L, a->all_rows);
    parallel_for(nb, caps_embed_task, &c);
    if (m->enc == ENC_DR) dr_bilinear_forward(m, a, nb);
    else linear_forward(a->ur, a->xt, m->p.caps, a->capt, a->R, D, D);
    parallel_for(nb, caps_route_task, &c);
    if (m->relu) { /* MIND on Book: V = ReLU(caps R^T) */
        linear_forward(a->v, a->caps, m->p.relu_w, a->capt + D * D, nb * K, D, D);
        for (size_t i = 0; i < (size_t)nb * K * D; i++) a->v[i] = a->v[i] > 0.0f ? a->v[i] : 0.0f;
    } else memcpy(a->v, a->caps, (size_t)nb * K * D * sizeof(float));
}

static void caps_route_back_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    const Model *m = c->m;
    Acts *a = c->a;
    size_t K = m->K, L = m->L, D = m->D;
    for (int b = lo; b < hi; b++) {
        Uhat du = caps_uhat(m, a->duhat, b);
        int n = real_span(a->mask + b * L, (int)L);
        memset(du.u, 0, (size_t)n * du.sl * sizeof(float));
        routing_backward(du, a->dcaps + b * K * D, c->rr ? a->datt + b * K * L : NULL,
                         a->rp + b * 3 * K * L, a->rs + b * 3 * K * D, a->rv + b * 2 * K * D,
                         caps_uhat(m, a->uhat, b), a->mask + b * L, (int)K, (int)L, n, (int)D);
        for (int l = 0; l < n; l++) /* its rows */
            if (a->prow[b * L + l] >= 0)
                memcpy(a->dur + (size_t)a->prow[b * L + l] * du.sl, du.u + l * du.sl, du.sl * sizeof(float));
    }
}

/* From a->dv (and a->datt when RR is on) to the parameter gradients. */
static void caps_backward(Model *m, Acts *a, int nb, int rr) {
    int L = m->L, D = m->D, K = m->K;
    size_t KD = (size_t)nb * K * D;
    EncCtx c = { m, a, nb, rr };
    if (m->relu) {
        for (size_t i = 0; i < KD; i++) a->dv[i] = a->v[i] > 0.0f ? a->dv[i] : 0.0f;
        linear_backward(a->dcaps, m->g.relu_w, a->dv, a->caps, m->p.relu_w, nb * K, D, D, 0);
    } else memcpy(a->dcaps, a->dv, KD * sizeof(float));
    parallel_for(nb, caps_route_back_task, &c); /* zeroes each sample's du_hat first */
    if (m->enc == ENC_DR) dr_bilinear_backward(m, a);
    else linear_backward(a->dxt, m->g.caps, a->dur, a->xt, m->p.caps, a->R, D, D, 0);
    embed_backward(&m->ge, a->dxt, a->prow, a->hist, a->mask, nb * L, D);
}

/* ======================================================================== encoder: DNN
 * REMI-SPEC c.5: u = W (sum over all L positions of E[hist] / history length). The sum is
 * not masked, so padded positions add E[0]; the lookup passes no gradient to row 0
 * (padding_idx). */
static void dnn_mean_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    int L = c->m->L, D = c->m->D;
    for (int b = lo; b < hi; b++) {
        float *mu = c->a->mean + (size_t)b * D, n = (float)history_len(c->a->mask + b * L, L);
        for (int d = 0; d < D; d++) mu[d] = 0.0f;
        for (int l = 0; l < L; l++) axpyf(mu, 1.0f, c->m->p.item_emb + (size_t)c->a->hist[b * L + l] * D, D);
        for (int d = 0; d < D; d++) mu[d] /= n;
    }
}
static void dnn_forward(const Model *m, Acts *a, int nb) {
    EncCtx c = { (Model *)m, a, nb, 0 };
    parallel_for(nb, dnn_mean_task, &c);
    linear_forward(a->v, a->mean, m->p.dnn_w, a->w1t, nb, m->D, m->D);
}
static void dnn_backward(Model *m, Acts *a, int nb) {
    int L = m->L, D = m->D;
    float *dmean = a->dx; /* (nb, D) */
    linear_backward(dmean, m->g.dnn_w, a->dv, a->mean, m->p.dnn_w, nb, D, D, 0);
    for (int b = 0; b < nb; b++) {
        float n = (float)history_len(a->mask + b * L, L);
        for (int l = 0; l < L; l++) {
            int item = a->hist[b * L + l];
            if (item == 0) continue;
            float *de = item_grad(&m->ge, item, D);
            for (int d = 0; d < D; d++) de[d] += dmean[(size_t)b * D + d] / n;
        }
    }
}

/* ======================================================================== encoder: GRU4Rec
 * REMI-SPEC c.5: dropout on E[hist] (training only), a one-layer bias-free GRU of hidden
 * size G = 2D (PyTorch's gate equations), and a dense layer with bias on the hidden state
 * at the last real position n-1:
 *   r = sigmoid(W_ir x + W_hr h),  z = sigmoid(W_iz x + W_hz h),
 *   n = tanh(W_in x + r * (W_hn h)),  h' = (1 - z) n + z h,  h_0 = 0,
 *   u = W_d h_{n-1} + b_d.
 * The output at n-1 depends only on positions 0..n-1, so each sample runs n steps. The
 * batch is sorted by history length (longest first, ties by sample) so the samples still
 * running at step t are the first gact[t] rows; step t's rows are packed at goff[t]. */
static float sigmoid_v(float x) { return 1.0f / (1.0f + exp_v(-x)); }

/* Sort the batch by length and lay out the packed steps (a->glen, grow, gorder, gact,
 * goff, gsteps). */
static void gru_layout(const Model *m, Acts *a, int nb) {
    int L = m->L, T = 0, i = 0;
    for (int b = 0; b < nb; b++) {
        int n = history_len(a->mask + b * L, L);
        if (n == 0) die("internal: a history of length 0 reached GRU4Rec");
        a->glen[b] = n;
        T = n > T ? n : T;
    }
    for (int len = T; len >= 1; len--) /* counting sort, stable in the sample index */
        for (int b = 0; b < nb; b++)
            if (a->glen[b] == len) { a->grow[b] = i; a->gorder[i++] = b; }
    a->goff[0] = 0;
    for (int t = 0; t < T; t++) {
        int act = 0;
        while (act < nb && a->glen[a->gorder[act]] > t) act++;
        a->gact[t] = act;
        a->goff[t + 1] = a->goff[t] + act;
    }
    a->gsteps = T;
}

/* One row's gates r, z, n and new state h from gi (x W_ih^T) and gh (h_prev W_hh^T); hp is
 * h_prev, NULL at the first step (a zero state). Separate arrays (restrict): vectorised. */
static inline void gru_gates(float *restrict gate, float *restrict ghn, float *restrict h, const float *restrict gi,
                             const float *restrict gh, const float *restrict hp, int G) {
    for (int j = 0; j < G; j++) {
        float r = sigmoid_v(gi[j] + gh[j]), z = sigmoid_v(gi[G + j] + gh[G + j]);
        float n = tanh_v(gi[2 * G + j] + r * gh[2 * G + j]), prev = hp ? hp[j] : 0.0f;
        gate[j] = r; gate[G + j] = z; gate[2 * G + j] = n; ghn[j] = gh[2 * G + j];
        h[j] = (1.0f - z) * n + z * prev;
    }
}

/* Gates of step t for its rows [lo, hi), given gi (x W_ih^T) and gh (h W_hh^T). */
typedef struct { const Model *m; Acts *a; int t; } GruCtx;
static void gru_gate_task(void *ctx, int lo, int hi) {
    const GruCtx *c = ctx;
    Acts *a = c->a;
    int G = c->m->G, t = c->t;
    for (int i = lo; i < hi; i++) {
        size_t row = (size_t)a->goff[t] + i;
        const float *gi = a->ggi + row * 3 * G, *gh = a->ggh + (size_t)i * 3 * G;
        const float *hp = t > 0 ? a->gh + ((size_t)a->goff[t - 1] + i) * G : NULL;
        float *gate = a->ggate + row * 3 * G, *ghn = a->gghn + row * G, *h = a->gh + row * G;
        gru_gates(gate, ghn, h, gi, gh, hp, G);
    }
}

/* Writes a->v (nb, 1, D). drop: apply a->drop (training) or not (evaluation). */
static void gru_forward(const Model *m, Acts *a, int nb, int drop) {
    gru_layout(m, a, nb);
    int L = m->L, D = m->D, G = m->G, T = a->gsteps;
    for (int t = 0; t < T; t++) /* inputs, packed */
        for (int i = 0; i < a->gact[t]; i++) {
            int b = a->gorder[i];
            const float *e = m->p.item_emb + (size_t)a->hist[b * L + t] * D, *dm = a->drop + ((size_t)b * L + t) * D;
            float *x = a->gx + ((size_t)a->goff[t] + i) * D;
            for (int d = 0; d < D; d++) x[d] = drop ? e[d] * dm[d] : e[d];
        }
    float *wt = a->gwt;
    transpose(wt, m->p.gru_ih, 3 * G, D);
    gemm_nn(a->ggi, a->gx, wt, a->goff[T], 3 * G, D, 0);           /* all steps' x W_ih^T */
    transpose(wt, m->p.gru_hh, 3 * G, G);
    for (int t = 0; t < T; t++) {
        int act = a->gact[t];
        if (t > 0) gemm_nn(a->ggh, a->gh + (size_t)a->goff[t - 1] * G, wt, act, 3 * G, G, 0);
        else memset(a->ggh, 0, (size_t)act * 3 * G * sizeof(float));
        GruCtx c = { m, a, t };
        parallel_for(act, gru_gate_task, &c);
    }
    for (int b = 0; b < nb; b++) { /* the hidden state at each sample's last position */
        size_t row = (size_t)a->goff[a->glen[b] - 1] + a->grow[b];
        memcpy(a->glast + (size_t)b * G, a->gh + row * G, G * sizeof(float));
    }
    linear_forward(a->v, a->glast, m->p.dense_w, wt, nb, G, D);
    for (int b = 0; b < nb; b++) axpyf(a->v + (size_t)b * D, 1.0f, m->p.dense_b, D);
}

/* gru_gates' backward for one row: from dh (d/dh_t) to the gate-input gradients dgi (x side)
 * and dgh (h side); dh becomes the direct part of d/dh_{t-1}. noipa: inlined or specialised
 * for its one caller, gcc 12 no longer vectorises the loop. */
static NOIPA void gru_gates_backward(float *restrict dgi, float *restrict dgh, float *restrict dh,
                                      const float *restrict gate, const float *restrict ghn,
                                      const float *restrict hp, int G) {
    for (int j = 0; j < G; j++) {
        float r = gate[j], z = gate[G + j], n = gate[2 * G + j], prev = hp ? hp[j] : 0.0f;
        float dhj = dh[j], dn = dhj * (1.0f - z), dz = dhj * (prev - n);
        float dan = dn * (1.0f - n * n), dar = dan * ghn[j] * r * (1.0f - r), daz = dz * z * (1.0f - z);
        dgi[j] = dar; dgi[G + j] = daz; dgi[2 * G + j] = dan;
        dgh[j] = dar; dgh[G + j] = daz; dgh[2 * G + j] = dan * r;
        dh[j] = dhj * z;
    }
}

/* Step t backward for rows [lo, hi): from gdh (d/dh_t) to the gate-input gradients, in
 * ggi (x side) and ggh (h side), and gdh = the direct part of d/dh_{t-1}. */
static void gru_gate_back_task(void *ctx, int lo, int hi) {
    const GruCtx *c = ctx;
    Acts *a = c->a;
    int G = c->m->G, t = c->t;
    for (int i = lo; i < hi; i++) {
        size_t row = (size_t)a->goff[t] + i;
        const float *gate = a->ggate + row * 3 * G, *ghn = a->gghn + row * G;
        const float *hp = t > 0 ? a->gh + ((size_t)a->goff[t - 1] + i) * G : NULL;
        float *dgi = a->ggi + row * 3 * G, *dgh = a->ggh + (size_t)i * 3 * G, *dh = a->gdh + (size_t)i * G;
        gru_gates_backward(dgi, dgh, dh, gate, ghn, hp, G);
    }
}

/* Samples [lo, hi): the input gradient's rows (in gx, packed by step) times their dropout
 * multipliers, and prow[b L + t] = the row of position t (-1 past the history), for the
 * scatter into the item table: g dm then added, the sums of de += g dm. */
static void gru_drop_back_task(void *ctx, int lo, int hi) {
    const EncCtx *c = ctx;
    Acts *a = c->a;
    int L = c->m->L, D = c->m->D;
    for (int b = lo; b < hi; b++)
        for (int t = 0; t < L; t++) {
            int r = t < a->glen[b] ? a->goff[t] + a->grow[b] : -1;
            a->prow[b * L + t] = r;
            if (r < 0) continue;
            float *g = a->gx + (size_t)r * D;
            const float *dm = a->drop + ((size_t)b * L + t) * D;
            for (int d = 0; d < D; d++) g[d] = g[d] * dm[d];
        }
}
/* From a->dv (nb, 1, D) to the parameter gradients. */
static void gru_backward(Model *m, Acts *a, int nb) {
    int L = m->L, D = m->D, G = m->G, T = a->gsteps;
    linear_backward(a->dglast, m->g.dense_w, a->dv, a->glast, m->p.dense_w, nb, G, D, 0);
    for (int b = 0; b < nb; b++) axpyf(m->g.dense_b, 1.0f, a->dv + (size_t)b * D, D);
    memset(a->gdh, 0, (size_t)nb * G * sizeof(float));
    for (int t = T - 1; t >= 0; t--) {
        int act = a->gact[t];
        for (int i = 0; i < act; i++) /* samples whose last position is t */
            if (a->glen[a->gorder[i]] == t + 1) axpyf(a->gdh + (size_t)i * G, 1.0f, a->dglast + (size_t)a->gorder[i] * G, G);
        GruCtx c = { m, a, t };
        parallel_for(act, gru_gate_back_task, &c);
        if (t > 0) {
            const float *hp = a->gh + (size_t)a->goff[t - 1] * G;
            gemm_nn(a->gdh, a->ggh, m->p.gru_hh, act, G, 3 * G, 1);      /* dh_{t-1} += dgh W_hh */
            gemm_tn(m->g.gru_hh, a->ggh, hp, 3 * G, G, act, 1);           /* dW_hh += dgh^T h_{t-1} */
        }
    }
    int R = a->goff[T];
    gemm_tn(m->g.gru_ih, a->ggi, a->gx, 3 * G, D, R, 1);                 /* dW_ih += dgi^T x */
    float *dx = a->gx;                                                   /* x is no longer needed */
    gemm_nn(dx, a->ggi, m->p.gru_ih, R, D, 3 * G, 0);
    EncCtx c = { m, a, nb, 0 };
    parallel_for(nb, gru_drop_back_task, &c);                  /* dx times the dropout multipliers */
    embed_backward(&m->ge, dx, a->prow, a->hist, a->mask, nb * L, D); /* dE[hist] += dx */
}

/* ======================================================================== encoders: dispatch
 * Every encoder reads a->hist and a->mask (and the draws in a->noise, a->drop) and writes
 * the user vectors a->v (nb, K, D), K = 1 for the single-vector models; the
 * multi-interest ones also write the routing matrix a->att (nb, K, L) that RR penalises.
 * train: training mode (GRU4Rec's dropout). */
static void encode_forward(const Model *m, Acts *a, int nb, int train) {
    switch (m->enc) {
    case ENC_SA: sa_forward(m, a, nb); break;
    case ENC_DR: case ENC_MIND: caps_forward(m, a, nb); break;
    case ENC_DNN: dnn_forward(m, a, nb); break;
    case ENC_GRU4REC: gru_forward(m, a, nb, train); break;
    case ENC_POP: for (int b = 0; b < nb; b++) a->v[b] = 1.0f; break; /* score = count (D = 1) */
    default: break;
    }
}
/* From a->dv (and a->datt, holding RR's gradient when rr is set) to m->g. */
static void encode_backward(Model *m, Acts *a, int nb, int rr) {
    switch (m->enc) {
    case ENC_SA: sa_backward(m, a, nb); break;
    case ENC_DR: case ENC_MIND: caps_backward(m, a, nb, rr); break;
    case ENC_DNN: dnn_backward(m, a, nb); break;
    case ENC_GRU4REC: gru_backward(m, a, nb); break;
    default: break;
    }
}

/* Substream i of a key: independent draws per user, whatever the chunking and threads. */
static uint64_t rng_stream(uint64_t key, uint64_t i) {
    uint64_t s = key ^ (i * 0xbf58476d1ce4e5b9ull);
    rng_next(&s);
    return s;
}

/* The encoder's randomness for a training batch, drawn in order from the step's stream:
 * MIND's initial routing logits N(0, 1) (REMI-SPEC c.3), GRU4Rec's dropout multipliers
 * (0 with probability p, else 1 / (1 - p), as torch's dropout) on the real positions. */
typedef struct { const Model *m; Acts *a; uint64_t s; float dropout; } DrawCtx;
static void mind_noise_task(void *ctx, int lo, int hi) { /* samples [lo, hi): normal i from draws 2i, 2i + 1 */
    const DrawCtx *c = ctx;
    size_t KL = (size_t)c->m->K * c->m->L;
    for (size_t i = lo * KL; i < hi * KL; i++) c->a->noise[i] = (float)normal_of(rng_at(c->s, 2 * i), rng_at(c->s, 2 * i + 1));
}
static void gru_drop_task(void *ctx, int lo, int hi) { /* samples [lo, hi): one draw per real position and d, if p > 0 */
    const DrawCtx *c = ctx;
    int L = c->m->L, D = c->m->D;
    float keep = 1.0f / (1.0f - c->dropout);
    uint64_t k = 0; /* draws of the samples before lo */
    for (int b = 0; b < lo; b++) k += (uint64_t)history_len(c->a->mask + (size_t)b * L, L) * D;
    for (int b = lo; b < hi; b++) /* histories are left-aligned: the real positions come first */
        for (int l = 0, n = history_len(c->a->mask + (size_t)b * L, L); l < n; l++, k += D) {
            float *dm = c->a->drop + ((size_t)b * L + l) * D;
            for (int d = 0; d < D; d++) dm[d] = c->dropout > 0.0f && rng_unit(rng_at(c->s, k + d)) < c->dropout ? 0.0f : keep;
        }
}

/* MIND's routing logits, N(0, 1) (two draws each), or GRU4Rec's dropout multipliers (one
 * draw per real position and dimension, none when the rate is 0), in the order of a plain
 * loop over samples, positions and dimensions; made in parallel from the counter state. */
static void encoder_draws(const Model *m, Acts *a, const Config *c, int nb, uint64_t *rng) {
    int L = m->L, D = m->D;
    DrawCtx ctx = { m, a, *rng, c->dropout };
    if (m->enc == ENC_MIND) {
        parallel_for(nb, mind_noise_task, &ctx);
        rng_skip(rng, 2 * (uint64_t)nb * m->K * L);
    }
    if (m->enc == ENC_GRU4REC) {
        parallel_for(nb, gru_drop_task, &ctx);
        if (c->dropout > 0.0f)
            for (int b = 0; b < nb; b++) rng_skip(rng, (uint64_t)history_len(a->mask + (size_t)b * L, L) * D);
    }
}

/* MIND draws its routing logits at evaluation too (REMI-SPEC c.3): user u of a pass gets
 * substream u of `key`, so the draws depend on neither -t nor --eval-batch. */
typedef struct { const Model *m; Acts *a; int u0; uint64_t key; } EvalDrawCtx;
static void eval_draws_task(void *ctx, int lo, int hi) { /* rows [lo, hi), each from its user's substream */
    const EvalDrawCtx *c = ctx;
    size_t KL = (size_t)c->m->K * c->m->L;
    for (int b = lo; b < hi; b++) {
        uint64_t s = rng_stream(c->key, (uint64_t)(c->u0 + b));
        for (size_t i = 0; i < KL; i++) c->a->noise[b * KL + i] = (float)rng_normal(&s);
    }
}
static void encoder_eval_draws(const Model *m, Acts *a, int u0, int nb, uint64_t key) {
    if (m->enc != ENC_MIND) return;
    EvalDrawCtx c = { m, a, u0, key };
    parallel_for(nb, eval_draws_task, &c);
}
/* The user vectors (evaluation mode) of rows already in a->hist/mask: nb of them, rows
 * u0.. of their split. */
static void user_vectors(const Model *m, Acts *a, int u0, int nb, uint64_t key) {
    encoder_eval_draws(m, a, u0, nb, key);
    encode_forward(m, a, nb, 0);
}
/* The key of an evaluation pass: "fresh" draws anew every pass, as the reference does;
 * "fixed" uses the same draws for every pass, so a saved model always scores the same. */
static uint64_t eval_noise_key(const char *mode, uint64_t seed, long pass) {
    uint64_t s = seed ^ 0x6d696e646576616cull; /* "mindeval" in ASCII: a stream of its own */
    return rng_stream(rng_next(&s), strcmp(mode, "fixed") ? (uint64_t)pass : 0);
}

/* Pop (REMI-SPEC c.5) trains no parameters: each step adds 1 to the count of every
 * distinct target of the batch (the reference's `cnt[item] = cnt[item] + 1` with an index
 * tensor writes a repeated item once). Counts are floats, exact below 2^24. */
static void pop_count(Model *m, const Acts *a, int nb) {
    for (int b = 0; b < nb; b++) {
        int t = a->target[b], seen = 0;
        for (int j = 0; j < b && !seen; j++) seen = a->target[j] == t;
        if (seen) continue;
        if (m->p.item_emb[t] >= 16777216.0f) die("Pop: item %d was counted 2^24 times; lower --iters", t);
        m->p.item_emb[t] += 1.0f;
    }
}

/* ======================================================================== loss: sampled softmax + IHN
 * REMI-SPEC d.1-d.4. Scores: pos[b] = <r_b, E[t_b]>, logit[b,j] = <r_b, E[n_j]> over one
 * set of M uniform negatives shared by the batch (no accidental-hit removal, as the
 * reference; --remove-hits drops a row's hits from its negatives). */
/* The negatives' rows en (M, D) = E[neg], then their transpose ent (D, M): the logits
 * product reads ent whole on every thread, and dr's product en. On several threads, when
 * they are small (NEG_OWN_BYTES), each thread gathers all of them into its own scratch:
 * reading lines that another core has just written costs more than gathering them again
 * (the Beauty SA step on 2 threads 2-5% faster, 1 thread unchanged); otherwise the threads
 * gather a share each into shared (M, D) + (D, M) floats. The same values either way. */
#define NEG_OWN_BYTES ((size_t)2 << 20)
typedef struct { float *shared; const float *E; const int *neg; int M, D, own; } NegRows;
static NegRows neg_rows(float *shared, const float *E, const int *neg, int M, int D) {
    return (NegRows){ shared, E, neg, M, D, pool.n > 1 && 2 * (size_t)M * D * sizeof(float) <= NEG_OWN_BYTES };
}
static float *neg_en(const NegRows *c) { return c->own ? thread_scratch(SCRATCH_NEG, 2 * (size_t)c->M * c->D) : c->shared; }
static void gather_rows(const NegRows *c, float *en, int lo, int hi) { /* negatives [lo, hi): rows of en, columns of ent */
    size_t D = c->D, M = c->M;
    float *ent = en + M * D;
    for (int j = lo; j < hi; j++) memcpy(en + j * D, c->E + (size_t)c->neg[j] * D, D * sizeof(float));
    transpose_ld(ent + lo, M, en + (size_t)lo * D, hi - lo, (int)D);
}
static void gather_task(void *ctx, int lo, int hi) { /* shared: negatives [lo, hi); own: one task a thread, all */
    const NegRows *c = ctx;
    if (c->own) gather_rows(c, neg_en(c), 0, c->M);
    else gather_rows(c, c->shared, lo, hi);
}
typedef struct { Gemm g; const NegRows *neg; int ent; } NegGemm; /* a product whose B is en, or ent */
static void neg_gemm_task(void *ctx, int lo, int hi) {
    const NegGemm *p = ctx;
    Gemm g = p->g;
    g.B = neg_en(p->neg) + (p->ent ? (size_t)p->neg->M * p->neg->D : 0);
    gemm_task(&g, lo, hi);
}
static void neg_gemm(const NegRows *neg, int ent, Gemm g) {
    NegGemm p = { g, neg, ent };
    parallel_for(gemm_tiles(&g), neg_gemm_task, &p);
}

static void logits_forward(float *pos, float *logit, const NegRows *neg, const float *r, const int *target, int nb) {
    int M = neg->M, D = neg->D;
    parallel_for(neg->own ? pool.n : M, gather_task, (void *)neg);
    for (int b = 0; b < nb; b++) pos[b] = dotf(r + (size_t)b * D, neg->E + (size_t)target[b] * D, D);
    neg_gemm(neg, 1, (Gemm){ logit, M, r, D, 1, NULL, M, nb, M, D, 0 }); /* (nb, D) x ent (D, M) */
}
/* dr += dlogit en + dpos E[t];  dE[n_j] += sum_b dlogit[b,j] r_b;  dE[t_b] += dpos_b r_b */
static void logits_backward(float *dr, ItemGrad *dE, float *den, const float *dpos, const float *dlogit,
                            const float *r, const NegRows *rows, const int *target, int nb) {
    int M = rows->M, D = rows->D;
    const float *E = rows->E;
    const int *neg = rows->neg;
    neg_gemm(rows, 0, (Gemm){ dr, D, dlogit, M, 1, NULL, D, nb, D, M, 1 }); /* (nb, M) x en (M, D), as gathered */
    gemm_tn(den, dlogit, r, M, D, nb, 0);     /* (M, nb) x (nb, D) */
    for (int b = 0; b < nb; b++) axpyf(dr + (size_t)b * D, dpos[b], E + (size_t)target[b] * D, D);
    item_grad_scatter(&(Scatter){ dE, neg, NULL, NULL, den, NULL, M, D });
    item_grad_scatter(&(Scatter){ dE, target, NULL, dpos, r, NULL, nb, D });
}

/* Per-sample quantities of d.4, shifted by m = max(s+, s_1..s_M):
 *   x0 = s+ - m, x_j = s_j - m, imp_j = exp(beta x_j - max_i beta x_i), S = sum imp,
 *   T = sum imp_j e^{x_j}, Ng = M T / S = M sum_j w_j e^{x_j} with w = softmax(beta s).
 * beta = 0 gives imp = 1, Ng = sum e^{x_j}: plain sampled softmax (d.3).
 * The forward pass keeps these statistics and leaves imp_j and e^{x_j} in tmp (2, M), from
 * which the gradient is made: by the backward pass, or in training by the forward pass
 * itself, row by row. P = e^{x0}, the target's own term (0 for full softmax, where the target
 * is one of the logits), and Z = P + Ng, the partition function: loss = -x0 + log Z. Mb is
 * M, or with --remove-hits the number of negatives kept. */
typedef struct { double x0, S, T, P, Z, Mb; } SsmStats;
_Static_assert(sizeof(SsmStats) == 6 * sizeof(double), "acts_init allocates ssm_st as 6 doubles per row");

/* max(init, max over the kept j of a (x_j - shift)); keep NULL keeps every j. Four vectors
 * of eight lanes (four independent chains of compare and blend), then their maximum: the
 * same value as a plain scan (of two zeros, the lanes may keep the other: nothing
 * downstream depends on it). Written with vectors of 8 floats (GCC does not vectorise the
 * loop over an array of eight lanes). */
typedef int32_t i8 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));
/* Lane by lane, a where the mask m is all ones, else b. */
static inline f8 blend8(i8 m, f8 a, f8 b) { return (f8)(((i8)a & m) | ((i8)b & ~m)); }
/* lane, or a (x[0..8) - shift) where that is larger (never for a NaN) and kept */
static inline f8 fmax8(f8 lane, const float *x, const float *keep, float a, float shift) {
    f8 v = a * (*(const f8 *)x - shift);
    i8 take = v > lane;
    if (keep) take &= *(const f8 *)keep != 0.0f;
    return blend8(take, v, lane);
}
static float fmax_kept(const float *x, const float *keep, int M, float a, float shift, float init) {
    f8 l0 = (f8){ 0 } + init, l1 = l0, l2 = l0, l3 = l0;
    int j = 0;
    for (; j + 32 <= M; j += 32) {
        l0 = fmax8(l0, x + j, keep ? keep + j : NULL, a, shift);
        l1 = fmax8(l1, x + j + 8, keep ? keep + j + 8 : NULL, a, shift);
        l2 = fmax8(l2, x + j + 16, keep ? keep + j + 16 : NULL, a, shift);
        l3 = fmax8(l3, x + j + 24, keep ? keep + j + 24 : NULL, a, shift);
    }
    for (; j + 8 <= M; j += 8) l0 = fmax8(l0, x + j, keep ? keep + j : NULL, a, shift);
    for (; j < M; j++) {
        float v = a * (x[j] - shift);
        l0[0] = v > l0[0] && (!keep || keep[j] != 0.0f) ? v : l0[0];
    }
    l0 = blend8(l1 > l0, l1, l0);
    l2 = blend8(l3 > l2, l3, l2);
    l0 = blend8(l2 > l0, l2, l0);
    float m = l0[0];
    for (int l = 1; l < 8; l++) m = l0[l] > m ? l0[l] : m;
    return m;
}

/* with_pos: the target's own term e^{x0} is in the partition function (sampled softmax,
 * REMI-SPEC d.3-d.4); 0 for full softmax, where the target is one of the M = N logits (d.6).
 * keep (M): NULL, or 1 for the negatives that count and 0 for the removed hits, which then
 * take no part in m, w, Ng or the gradient (M becomes their number, Mb). */
static SsmStats ssm_stats(float *tmp, float pos, const float *logit, const float *keep, int M, float beta,
                          int with_pos) {
    float *imp = tmp, *ex = tmp + M;
    float mx = fmax_kept(logit, keep, M, 1.0f, 0.0f, pos);
    float bmax = fmax_kept(logit, keep, M, beta, mx, -FLT_MAX);
    for (int j = 0; j < M; j++) { /* flat, branch-free: vectorised */
        float x = logit[j] - mx;
        imp[j] = exp_v(beta * x - bmax);
        ex[j] = exp_v(x);
    }
    double Mb = M;
    if (keep) {
        Mb = 0;
        for (int j = 0; j < M; j++) { /* a removed hit may score far above m: its exps can be inf */
            imp[j] = keep[j] != 0.0f ? imp[j] : 0.0f;
            ex[j] = keep[j] != 0.0f ? ex[j] : 0.0f;
            Mb += keep[j];
        }
    }
    /* 8 partial sums (lane j % 8) reduced in a fixed order: the same on every machine */
    d8 S8 = { 0 }, T8 = { 0 };
    double S = 0, T = 0;
    int j = 0;
    for (; j + 8 <= M; j += 8) {
        f8 w = *(const f8 *)(imp + j), e = *(const f8 *)(ex + j);
        S8 += __builtin_convertvector(w, d8);
        T8 += __builtin_convertvector(w * e, d8);
    }
    for (; j < M; j++) { S8[j % 8] += imp[j]; T8[j % 8] += (double)(imp[j] * ex[j]); }
    for (int l = 0; l < 8; l++) { S += S8[l]; T += T8[l]; }
    SsmStats st = { pos - mx, S, T, 0, 0, Mb };
    st.P = with_pos ? exp(st.x0) : 0.0;
    st.Z = st.P + (Mb > 0 ? Mb * T / S : 0.0); /* e^{x0} + Ng */
    return st;
}

/* --remove-hits: keep[j] = 0 where negative j is the row's target (target) or also one of
 * its history items (history); hist (L) holds the row's window, 0 = padding. */
static void hits_keep(float *keep, const int *neg, int M, int target, const int *hist, int L, int mode) {
    for (int j = 0; j < M; j++) {
        int hit = neg[j] == target;
        for (int l = 0; l < L && mode == HITS_HISTORY; l++) hit |= hist[l] != 0 && neg[j] == hist[l];
        keep[j] = hit ? 0.0f : 1.0f;
    }
}

typedef struct {
    float *loss, *dpos, *dlogit, *tmp;
    SsmStats *st;
    const float *pos, *logit;
    int M, with_pos; float beta, scale;
    const int *neg, *target, *hist; int L, hits; /* --remove-hits (forward only) */
} SsmCtx;

/* With G = T / S and Z = P + M G, P = e^{x0} or 0 (REMI-SPEC d.4, weights not detached):
 *   d loss / d s+  = -1 + P / Z
 *   d loss / d s_j = (M / Z) w_j [ (beta + 1) e^{x_j} - beta G ],  w_j = imp_j / S
 * each scaled by `scale` (1/B for the batch mean), for one row from its st and tmp (2, M).
 * Returns d loss / d s+ and writes dl (M), which may be the row's logits. */
static float ssm_row_backward(float *dl, const float *tmp, SsmStats st, int M, float beta, float scale) {
    const float *imp = tmp, *ex = tmp + M;
    double G = st.S > 0 ? st.T / st.S : 0.0, kd = st.S > 0 ? scale * (float)st.Mb / (st.Z * st.S) : 0.0;
    float k = (float)kd, b1 = beta + 1.0f, bg = (float)(beta * G);
    if (isfinite(k))
        for (int j = 0; j < M; j++) dl[j] = k * imp[j] * (b1 * ex[j] - bg);
    else /* k beyond float (beta < 0 can make Z S tiny): the factors in double, each term still small */
        for (int j = 0; j < M; j++) dl[j] = (float)(kd * imp[j] * (b1 * ex[j] - bg));
    return (float)(scale * (-1.0 + st.P / st.Z));
}

/* loss[b] = -x0 + log(e^{x0} + Ng); with dlogit, also the row's gradient (ssm_row_backward)
 * while its tmp is in cache, written over its logits if dlogit is logit. With tmp NULL,
 * each thread's scratch row holds the row's tmp (2, M) instead. */
static void ssm_forward_task(void *ctx, int lo, int hi) {
    const SsmCtx *c = ctx;
    size_t M = c->M;
    float *keep = c->hits ? thread_scratch(SCRATCH_LAYER, M) : NULL;
    float *row = c->tmp ? NULL : thread_scratch(SCRATCH_LOSS, 2 * M);
    for (int b = lo; b < hi; b++) {
        float *tmp = row ? row : c->tmp + b * 2 * M;
        if (keep) hits_keep(keep, c->neg, c->M, c->target[b], c->hist + (size_t)b * c->L, c->L, c->hits);
        c->st[b] = ssm_stats(tmp, c->pos[b], c->logit + b * M, keep, c->M, c->beta, c->with_pos);
        c->loss[b] = (float)(-c->st[b].x0 + log(c->st[b].Z));
        if (c->dlogit) c->dpos[b] = ssm_row_backward(c->dlogit + b * M, tmp, c->st[b], c->M, c->beta, c->scale);
    }
}
/* Returns the batch mean of the per-sample losses (L_CE of d.4). st (nb); tmp (nb, 2M) for
 * ssm_backward, or NULL. hits: HITS_NONE (the reference), or remove each row's hits among
 * neg (M) as hits_keep says, from target (nb) and hist (nb, L). grad: NULL, or the
 * gradient's outputs and scale, as ssm_backward would write them. */
typedef struct { float *dpos, *dlogit, scale; } SsmGrad;
static double ssm_forward(float *loss, SsmStats *st, float *tmp, const float *pos, const float *logit, int nb, int M,
                          float beta, int with_pos, int hits, const int *neg, const int *target, const int *hist, int L,
                          const SsmGrad *grad) {
    SsmCtx c = { loss, grad ? grad->dpos : NULL, grad ? grad->dlogit : NULL, tmp, st, pos, logit, M, with_pos, beta,
                 grad ? grad->scale : 0, neg, target, hist, L, hits };
    parallel_for(nb, ssm_forward_task, &c);
    double sum = 0;
    for (int b = 0; b < nb; b++) sum += loss[b];
    return sum / nb;
}

/* The gradient from what ssm_forward kept in st and tmp (the gradient checks' path). */
static void ssm_backward_task(void *ctx, int lo, int hi) {
    const SsmCtx *c = ctx;
    size_t M = c->M;
    for (int b = lo; b < hi; b++)
        c->dpos[b] = ssm_row_backward(c->dlogit + b * M, c->tmp + b * 2 * M, c->st[b], c->M, c->beta, c->scale);
}
static void ssm_backward(float *dpos, float *dlogit, const SsmStats *st, float *tmp, int nb, int M, float beta,
                         float scale) {
    SsmCtx c = { NULL, dpos, dlogit, tmp, (SsmStats *)st, NULL, NULL, M, 0, beta, scale, NULL, NULL, NULL, 0, 0 };
    parallel_for(nb, ssm_backward_task, &c);
}

/* ======================================================================== routing regularisation
 * REMI-SPEC e: abar = mean over all L positions of att[b,k,:]; D_bk = sum_l (att - abar)^2 / D
 * (the divisor is the hidden size); RR = sum_b sum_k D_bk^2, summed over the batch. */
static float rr_mean(const float *a, int L) { /* abar_bk of one row, over all L positions */
    float mean = 0.0f;
    for (int l = 0; l < L; l++) mean += a[l];
    return mean / L;
}
static void rr_rows(float *rr_d, const float *att, int n, int L, int D) { /* D_bk of n rows (b, k) */
    for (int i = 0; i < n; i++) {
        const float *a = att + (size_t)i * L;
        float mean = rr_mean(a, L), ss = 0.0f;
        for (int l = 0; l < L; l++) ss += (a[l] - mean) * (a[l] - mean);
        rr_d[i] = ss / D;
    }
}
static double rr_total(const float *rr_d, int n) { /* RR from the n rows' D_bk, in order */
    double rr = 0;
    for (int i = 0; i < n; i++) rr += (double)rr_d[i] * rr_d[i];
    return rr;
}
/* RR of a batch, for gradcheck; training makes the rows' D_bk in head_task and sums them with rr_total. */
static double rr_forward(float *rr_d, const float *att, int nb, int K, int L, int D) {
    rr_rows(rr_d, att, nb * K, L, D);
    return rr_total(rr_d, nb * K);
}
/* forward: RR = sum D_bk^2 (rr_d holds the D_bk);  d(lambda RR)/d att[b,k,l] = lambda (4 / D) D_bk
 * (att[b,k,l] - abar_bk), D the hidden size as in D_bk's divisor (the mean's own gradient
 * sums to zero over l) */
static void rr_backward(float *datt, const float *att, const float *rr_d, float lambda, int nb, int K, int L, int D) {
    for (int i = 0; i < nb * K; i++) {
        const float *a = att + (size_t)i * L;
        float mean = rr_mean(a, L), c = lambda * 4.0f / D * rr_d[i];
        for (int l = 0; l < L; l++) datt[(size_t)i * L + l] += c * (a[l] - mean);
    }
}

/* ======================================================================== Adam
 * REMI-SPEC f.3, PyTorch semantics, dense: every parameter moves every step, rows with a
 * zero gradient included (their moments are non-zero). The gradient is zeroed in the same
 * pass, so the next backward can accumulate into it. The item table's gradient is sparse
 * (ItemGrad): only the rows a step touched (history items, targets, negatives) are read
 * and zeroed; the others are updated with the constant 0 in the same expressions, which
 * gives the same bits. --adam lazy (not the reference) updates the touched rows only. */
typedef struct { Model *m; float step_size, sqrt_bc2; int lazy; } AdamCtx;
/* REMI-SPEC f.3: Adam(betas=(0.9, 0.999), eps=1e-8). PyTorch takes 1 - beta in double and
 * rounds it to float (0.1f, 0.001f; 1.0f - 0.999f would be 0.00099998713), and multiplies
 * the squared gradient as (1 - beta2) g g, in that order (addcmul_). It rounds the update as
 * p + ((-ss) m) / den (addcdiv_) where remi has p - ss (m / den), and its CPU kernels may fuse
 * the moments' multiply-adds: a unit in the last place a step at most (README). */
#define ADAM_B1 0.9f
#define ADAM_B2 0.999f
#define ADAM_C1 0.1f   /* 1 - 0.9 */
#define ADAM_C2 0.001f /* 1 - 0.999 */
#define ADAM_EPS 1e-8f
#define ADAM_CHUNK 8192

static inline uint32_t float_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
/* x is denormal (not zero) */
static inline int is_denormal(uint32_t x) { return (x & 0x7fffffff) - 1 < 0x007fffff; }

/* Elements [i0, i1) with a zero gradient, as PyTorch computes them: the terms in zero stay,
 * since adding +0 turns a moment of -0 into +0 as PyTorch's update does (the same bits). */
static void adam_range_zero(const AdamCtx *c, size_t i0, size_t i1) {
    float *p = c->m->mem, *mo = c->m->mmem, *v = c->m->vmem;
    const float ss = c->step_size, sb = c->sqrt_bc2, zero = 0.0f;
    for (size_t i = i0; i < i1; i++) {
        mo[i] = mo[i] * ADAM_B1 + zero * ADAM_C1;
        v[i] = v[i] * ADAM_B2 + ADAM_C2 * zero * zero;
        p[i] = p[i] - ss * (mo[i] / (sqrtf(v[i]) / sb + ADAM_EPS));
    }
}

/* A row no step touches sees its first moment decay by 0.9 a step: from about 1e-5 it is
 * denormal after some 720 steps and then stays at the smallest denormal (0.9 of it rounds
 * back) until a step touches the row. At Book's size 3.5% of the rows reach that state
 * (synthetic histories; more with a real long tail), and a denormal operand costs a
 * microcode assist on Intel's cores (Adam went 15.2-15.7 -> 18-19 ms a step on 2 threads; the
 * item table's pass without gradients takes 29.9 ms on 1 thread with this path, 35.8 without).
 * The same bits without denormal arithmetic, for elements with a zero gradient whose first
 * moment m is denormal: m 0.9 + 0 is m's significand times 0.9f's, rounded to the nearest
 * integer (ties to even) as the denormal grid rounds it (never to 0); the second
 * moment is computed as ever (normal: the caller checks); the parameter's change,
 * ss (m / (sqrt(v) / sb + eps)) with |m| < 2^-126 and the divisor >= eps > 2^-27, is below
 * ss 2^-98, less than half the spacing of floats next to p when |p| > ss 2^-72 (checked),
 * so p - it rounds back to p. The other lanes run the plain expressions (m taken as 0 in the
 * denormal lanes, which leaves p as it is there too). Rows with no denormal first moment keep
 * the plain loop: this one costs 1.19 ns an element there, against 0.77 (in L2, 1 thread). */
static float decay_denormal(uint32_t m) {
    uint64_t k = m & 0x7fffff, prod = k * 15099494u; /* 0.9f = 15099494 2^-24 */
    uint64_t q = prod >> 24, rem = prod & 0xffffff;
    q += rem > 0x800000 || (rem == 0x800000 && (q & 1));
    uint32_t r = (m & 0x80000000u) | (uint32_t)q; /* q >= 1: 0.9 k rounds to 0 for no k >= 1 */
    float x;
    memcpy(&x, &r, 4);
    return x;
}
#define ADAM_ROW 64 /* elements checked together for denormal first moments */
static void adam_range_stuck(const AdamCtx *c, size_t i0, size_t i1) {
    float *p = c->m->mem, *mo = c->m->mmem, *v = c->m->vmem;
    const float ss = c->step_size, sb = c->sqrt_bc2, zero = 0.0f;
    for (size_t i = i0; i < i1; i++) {
        uint32_t mb = float_bits(mo[i]), keep = is_denormal(mb) ? 0 : ~0u; /* bits, not a select of floats:
                                                    GCC would multiply the denormal and select after */
        float m_in, mn;
        uint32_t kb = mb & keep;
        memcpy(&m_in, &kb, 4);
        mn = m_in * ADAM_B1 + zero * ADAM_C1;
        v[i] = v[i] * ADAM_B2 + ADAM_C2 * zero * zero;
        p[i] = p[i] - ss * (mn / (sqrtf(v[i]) / sb + ADAM_EPS));
        mo[i] = is_denormal(mb) ? decay_denormal(mb) : mn;
    }
}
static void adam_range_nograd(const AdamCtx *c, size_t i0, size_t i1) {
    const float *p = c->m->mem, *mo = c->m->mmem, *v = c->m->vmem, pmin = c->step_size * 0x1p-72f;
    for (size_t r0 = i0; r0 < i1; r0 += ADAM_ROW) {
        size_t r1 = r0 + ADAM_ROW < i1 ? r0 + ADAM_ROW : i1;
        int den = 0;
        for (size_t i = r0; i < r1; i++) den |= is_denormal(float_bits(mo[i]));
        int safe = den;
        if (den)
            for (size_t i = r0; i < r1; i++) /* p far from 0, v normal after the step */
                safe &= (!is_denormal(float_bits(mo[i]))) | ((fabsf(p[i]) > pmin) & (v[i] >= 0x1p-125f));
        if (safe) adam_range_stuck(c, r0, r1);
        else adam_range_zero(c, r0, r1);
    }
}

/* Elements [i0, i1): with the gradient g (g[0] is element i0's), or with a zero gradient
 * when g is NULL. */
static void adam_range(const AdamCtx *c, size_t i0, size_t i1, float *g) {
    Model *m = c->m;
    float *p = m->mem, *mo = m->mmem, *v = m->vmem;
    const float ss = c->step_size, sb = c->sqrt_bc2;
    if (g)
        for (size_t i = i0; i < i1; i++) {
            float gi = g[i - i0];
            mo[i] = mo[i] * ADAM_B1 + gi * ADAM_C1;
            v[i] = v[i] * ADAM_B2 + ADAM_C2 * gi * gi;
            p[i] = p[i] - ss * (mo[i] / (sqrtf(v[i]) / sb + ADAM_EPS));
            g[i - i0] = 0.0f;
        }
    else adam_range_nograd(c, i0, i1);
}

/* Touched rows [*pf, to) of the item table: their parameters and gradient rows fetched for
 * writing ahead of the update. Other threads read these rows in the step (the gathers) and
 * wrote the gradient's (the scatters), so their lines sit in another core's cache; asked for
 * one at a time by the update's stores, each costs a round trip between the cores. */
#define ADAM_AHEAD 16 /* rows */
static void adam_prefetch(const Model *m, size_t *pf, size_t to) {
    size_t D = m->D;
    for (; *pf < to; (*pf)++) {
        if (m->ge.row[*pf] < 0) continue;
        const char *p = (const char *)(m->mem + *pf * D), *g = (const char *)(m->ge.g + (size_t)m->ge.row[*pf] * D);
        for (size_t b = 0; b < D * sizeof(float); b += 64) { __builtin_prefetch(p + b, 1); __builtin_prefetch(g + b, 1); }
    }
}

static void adam_task(void *ctx, int lo, int hi) {
    const AdamCtx *c = ctx;
    Model *m = c->m;
    const int *grow = m->ge.row;
    size_t i0 = (size_t)lo * ADAM_CHUNK, i1 = (size_t)hi * ADAM_CHUNK, D = m->D, table = m->size[0];
    if (i1 > m->n_params) i1 = m->n_params;
    if (!grow) table = 0; /* a dense item gradient (tests): one flat pass */
    size_t t1 = i1 < table ? i1 : table, rows = (t1 + D - 1) / D, pf = i0 / D;
    for (size_t i = i0; i < t1;) { /* item table: a touched row, or a run of untouched ones */
        size_t row = i / D, next = row + 1;
        if (grow[row] < 0)
            while (next * D < t1 && grow[next] < 0) next++;
        size_t end = next * D < t1 ? next * D : t1;
        adam_prefetch(m, &pf, next + ADAM_AHEAD < rows ? next + ADAM_AHEAD : rows);
        if (grow[row] >= 0) adam_range(c, i, end, m->ge.g + (size_t)grow[row] * D + (i - row * D));
        else if (!c->lazy) adam_range(c, i, end, NULL);
        i = end;
    }
    size_t f = i0 > table ? i0 : table; /* the other tensors, flat */
    if (i1 > f) adam_range(c, f, i1, m->gmem + f);
}

/* The bias corrections in double from the betas as written, 0.9 and 0.999 (PyTorch's
 * arithmetic; ADAM_B1 and ADAM_B2 are their floats, for the moments). */
static void adam_step(Model *m, float lr, int lazy) {
    m->step++;
    AdamCtx c = { m, (float)(lr / (1.0 - pow(0.9, (double)m->step))), (float)sqrt(1.0 - pow(0.999, (double)m->step)),
                  lazy };
    parallel_for((int)((m->n_params + ADAM_CHUNK - 1) / ADAM_CHUNK), adam_task, &c);
    if (m->ge.row)
        for (int r = 0; r < m->ge.n; r++) m->ge.row[m->ge.items[r]] = -1;
    m->ge.n = 0;
}

/* Flags the item rows a batch touches (real history positions, targets, negatives) with v:
 * the rows its backward writes (tests and bench count them). */
static void mark_rows(unsigned char *touched, const Acts *a, int B, int L, int M, unsigned char v) {
    for (int i = 0; i < B * L; i++) if (a->mask[i] != 0.0f) touched[a->hist[i]] = v;
    for (int b = 0; b < B; b++) touched[a->target[b]] = v;
    for (int j = 0; j < M; j++) touched[a->neg[j]] = v;
}

/* ======================================================================== training step
 * REMI-SPEC f.5: forward, L_CE + lambda RR, backward, Adam. */

/* Samples [lo, hi) after the encoder: the readout, and RR's D_bk when it is on (one
 * region: each sample reads its target's row of E from memory, 0.03 ms a step at Beauty
 * when serial). */
typedef struct { const Model *m; Acts *a; int rr; } HeadCtx;
static void head_task(void *ctx, int lo, int hi) {
    const HeadCtx *c = ctx;
    Acts *a = c->a;
    int K = c->m->K, D = c->m->D, L = c->m->L;
    readout_forward(a->r + (size_t)lo * D, a->sel + lo, a->v + (size_t)lo * K * D, c->m->p.item_emb, a->target + lo,
                    hi - lo, K, D);
    if (c->rr) rr_rows(a->rr_d + (size_t)lo * K, a->att + (size_t)lo * K * L, (hi - lo) * K, L, D);
}

/* Forward of a batch already in a->hist/mask/target/neg (and the encoder's draws):
 * returns L_CE + lambda RR. With grad, the loss's gradient with respect to the logits
 * comes out of the same pass (written over them: a->dlogit is a->logit), as step_backward
 * needs. */
static double step_forward(Model *m, Acts *a, const Config *c, int grad) {
    int B = c->B, L = m->L, D = m->D, K = m->K, M = c->M;
    encode_forward(m, a, B, 1);
    HeadCtx head = { m, a, c->rlambda != 0.0f };
    parallel_for(B, head_task, &head);
    NegRows neg = neg_rows(a->en, m->p.item_emb, a->neg, M, D);
    logits_forward(a->pos, a->logit, &neg, a->r, a->target, B);
    double loss = ssm_forward(a->loss, (SsmStats *)a->ssm_st, NULL, a->pos, a->logit, B, M, c->rbeta,
                              !c->full_softmax, c->hits, a->neg, a->target, a->hist, L,
                              grad ? &(SsmGrad){ a->dpos, a->dlogit, 1.0f / B } : NULL);
    double rr = c->rlambda != 0.0f ? rr_total(a->rr_d, B * K) : 0.0;
    return loss + c->rlambda * rr;
}

/* Gradients of step_forward's loss (run with grad), accumulated into m->g. */
/* The loss's own gradient (a->dpos, a->dlogit, written over the logits) was made by
 * step_forward's loss pass, row by row while each row's exponentials were in cache
 * (ssm_forward with grad); ssm_backward, its separate twin, serves gradcheck. From there: the
 * logits' products, the readout, RR and the encoder. */
static void step_backward(Model *m, Acts *a, const Config *c) {
    int B = c->B, L = m->L, D = m->D, K = m->K, M = c->M;
    memset(a->dr, 0, (size_t)B * D * sizeof(float));
    memset(a->dv, 0, (size_t)B * K * D * sizeof(float));
    memset(a->datt, 0, (size_t)B * K * L * sizeof(float));
    NegRows neg = neg_rows(a->en, m->p.item_emb, a->neg, M, D); /* as step_forward gathered them */
    logits_backward(a->dr, &m->ge, a->den, a->dpos, a->dlogit, a->r, &neg, a->target, B);
    readout_backward(a->dv, a->dr, a->sel, B, K, D);
    if (c->rlambda != 0.0f) rr_backward(a->datt, a->att, a->rr_d, c->rlambda, B, K, L, D);
    encode_backward(m, a, B, c->rlambda != 0.0f);
    if (m->enc == ENC_SA && !m->add_pos) memset(m->g.pos_emb, 0, m->size[1] * sizeof(float));
}

/* Seconds spent in each phase of train_step since the program started (for bench). */
static struct { double batch, forward, backward, adam; } step_time;

/* One training step: batch, negatives, the encoder's draws, forward, backward, Adam.
 * Pop only counts the batch's targets. Returns the loss; a non-finite loss skips Adam, so
 * the parameters stay as they were and the gradients show where it went wrong. */
float train_step(Model *m, Acts *a, const Split *train, const Config *c, uint64_t *rng, int *perm) {
    double t0 = now_sec();
    make_train_batch(a, train, perm, c->B, m->L, rng);
    if (m->enc == ENC_POP) { pop_count(m, a, c->B); return 0.0f; }
    for (int j = 0; j < c->M; j++) /* uniform, id 0 included; or every item (full softmax) */
        a->neg[j] = c->full_softmax ? j : (int)rng_below(rng, (uint32_t)m->N);
    encoder_draws(m, a, c, c->B, rng);
    double t1 = now_sec();
    double loss = step_forward(m, a, c, 1);
    double t2 = now_sec();
    step_backward(m, a, c);
    double t3 = now_sec();
    if (isfinite(loss)) adam_step(m, c->lr, !strcmp(c->adam, "lazy"));
    double t4 = now_sec();
    step_time.batch += t1 - t0; step_time.forward += t2 - t1; step_time.backward += t3 - t2; step_time.adam += t4 - t3;
    return (float)loss;
}

/* ======================================================================== evaluation
 * REMI-SPEC g. For each user: interests V (K, D) from the first 80% of the history, exact
 * top-N of every interest over all N items (id 0 included), merge by score skipping id 0
 * and duplicates (for multi-interest models the same list is found by best interest, see
 * best_block), then Recall, HitRate and two NDCGs against the last 20%. */
#define EVAL_MAX_TOPN 1000 /* the largest cut-off N (user_metrics keeps a list's set order on the stack) */

/* CPython set iteration order (REMI-SPEC g.4): order[p] = position of keys[p] when a set
 * built by inserting keys[0..n) in turn is iterated. Keys are distinct non-negative ints,
 * whose hash is the value itself. */
#define SET_MAX_SLOTS 8192
static void set_insert(int *slot, size_t mask, int key, int idx) {
    size_t i = (size_t)key & mask, perturb = (size_t)key;
    for (;;) {
        if (slot[i] < 0) { slot[i] = idx; return; }
        if (i + 9 <= mask) /* LINEAR_PROBES = 9 */
            for (size_t j = 1; j <= 9; j++)
                if (slot[i + j] < 0) { slot[i + j] = idx; return; }
        perturb >>= 5; /* PERTURB_SHIFT */
        i = (i * 5 + 1 + perturb) & mask;
    }
}

void set_order(int *order, const int *keys, int n) {
    static __thread int slot[SET_MAX_SLOTS], old[SET_MAX_SLOTS];
    size_t size = 8, fill = 0;
    for (size_t i = 0; i < size; i++) slot[i] = -1;
    for (int p = 0; p < n; p++) {
        set_insert(slot, size - 1, keys[p], p);
        fill++;
        if (fill * 5 >= (size - 1) * 3) { /* resize to the smallest power of two > 4 fill */
            size_t used = fill, nsize = 8;
            while (nsize <= (used > 50000 ? 2 * used : 4 * used)) nsize <<= 1;
            if (nsize > SET_MAX_SLOTS) die("set_order: too many keys (%d)", n);
            memcpy(old, slot, size * sizeof(int));
            for (size_t i = 0; i < nsize; i++) slot[i] = -1;
            for (size_t i = 0; i < size; i++)
                if (old[i] >= 0) set_insert(slot, nsize - 1, keys[old[i]], old[i]);
            size = nsize;
        }
    }
    int pos = 0;
    for (size_t i = 0; i < size; i++)
        if (slot[i] >= 0) order[slot[i]] = pos++;
}

/* A scored item; lists are kept best first: higher score, then lower id. */
typedef struct { float s; int id; } Scored;
static int scored_better(Scored a, Scored b) { return a.s > b.s || (a.s == b.s && a.id < b.id); }

/* A scored item as one integer that orders as scored_better: the score's bits made monotone (the two
 * zeros made one: -0 comes back as +0; a NaN below everything), then the complement of the id
 * (the lower id is the better). The heaps compare these: one integer comparison instead of
 * two float and id ones. */
static inline uint64_t scored_key(float s, int id) {
    uint32_t u;
    float z = s + 0.0f;
    memcpy(&u, &z, 4);
    u = s != s ? 0 : u & 0x80000000u ? ~u : u | 0x80000000u;
    return (uint64_t)u << 32 | (uint32_t)~(uint32_t)id;
}
static inline float key_score(uint64_t k) {
    uint32_t u = (uint32_t)(k >> 32);
    u = u & 0x80000000u ? u & 0x7fffffffu : ~u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline Scored key_scored(uint64_t k) { return (Scored){ key_score(k), (int)~(uint32_t)k }; }

/* Min-heap of the best keys (scored_key): h[0] is the worst kept. */
static void heap_sift(uint64_t *h, int n, int i, uint64_t x) { /* put x in the hole at i, moving it down */
    for (int c = 2 * i + 1; c < n; i = c, c = 2 * i + 1) {
        uint64_t a = h[c], b = c + 1 < n ? h[c + 1] : UINT64_MAX;
        c += b < a; /* the worse child */
        a = b < a ? b : a;
        if (x < a) break;
        h[i] = a;
    }
    h[i] = x;
}

static void heap_push(uint64_t *h, int *n, int cap, uint64_t x) {
    if (*n < cap) {
        int i = (*n)++;
        for (; i > 0 && h[(i - 1) / 2] > x; i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
        h[i] = x;
        return;
    }
    if (x > h[0]) heap_sift(h, cap, 0, x);
}

/* A heap of n keys sorted in place, best first: the worst goes to the end, n times. */
static void heap_sort(uint64_t *h, int n) {
    for (int m = n - 1; m > 0; m--) {
        uint64_t x = h[m];
        h[m] = h[0];
        heap_sift(h, m, 0, x);
    }
}

/* A heap of n keys (consumed) as a list of scored items, best first. */
static void heap_finish(Scored *out, uint64_t *h, int n) {
    heap_sort(h, n);
    for (int i = 0; i < n; i++) out[i] = key_scored(h[i]);
}

/* Sort best first (insertion sort: stable, lists are short). */
static void scored_sort(Scored *h, int n, int by_score_only) {
    for (int i = 1; i < n; i++) {
        Scored x = h[i];
        int j = i - 1;
        while (j >= 0 && (by_score_only ? x.s > h[j].s : scored_better(x, h[j]))) { h[j + 1] = h[j]; j--; }
        h[j + 1] = x;
    }
}

/* REMI-SPEC g.2 step 3: concatenate the first n entries of each interest (interest-major),
 * stable-sort by score, keep unique non-zero ids until n are taken. Returns |R|. The
 * lists are best first, so the sort is a merge of the K lists taking the lowest interest
 * on equal scores (merge_interests_ref in the tests sorts). A single-vector model's list
 * is taken as it is, id 0 included (REMI-SPEC i.12). */
static int merge_interests(int *R, const Scored *lists, int K, int stride, int n, int multi) {
    if (!multi) {
        for (int i = 0; i < n; i++) R[i] = lists[i].id;
        return n;
    }
    int head[64] = { 0 }, taken = 0; /* K <= 64 */
    while (taken < n) {
        int best = -1;
        for (int k = 0; k < K; k++)
            if (head[k] < n && (best < 0 || lists[k * stride + head[k]].s > lists[best * stride + head[best]].s))
                best = k;
        if (best < 0) break;
        int id = lists[best * stride + head[best]++].id, dup = (id == 0);
        for (int j = 0; j < taken; j++) dup |= (R[j] == id);
        if (!dup) R[taken++] = id;
    }
    return taken;
}

/* REMI-SPEC g.3 for one user: hits are distinct retrieved items found among the targets;
 * recall divides by |T| with duplicates. ndcg ranks by retrieval position; ndcg_ref by
 * the CPython set order the reference enumerates (g.4), or by position too when
 * ref_in_order is set (its Pop evaluation enumerates the ranked list). IDCG counts the hits. */
static void user_metrics(double *out /* recall, ndcg, ndcg_ref, hit */, const int *R, int nr,
                         const int *T, int nt, int ref_in_order) {
    int order[EVAL_MAX_TOPN], hits = 0;
    double dcg = 0, dcg_ref = 0, idcg = 0;
    if (ref_in_order) for (int p = 0; p < nr; p++) order[p] = p;
    else set_order(order, R, nr);
    for (int p = 0; p < nr; p++) {
        int found = 0;
        for (int t = 0; t < nt && !found; t++) found = (T[t] == R[p]);
        if (!found) continue;
        dcg += 1.0 / (log(p + 2.0) / log(2.0));
        dcg_ref += 1.0 / (log(order[p] + 2.0) / log(2.0));
        idcg += 1.0 / (log(hits + 2.0) / log(2.0));
        hits++;
    }
    out[0] = (double)hits / nt;
    out[1] = hits ? dcg / idcg : 0.0;
    out[2] = hits ? dcg_ref / idcg : 0.0;
    out[3] = hits > 0;
}

/* A comparison's lanes (-1 or 0 each) as the bits of an integer. */
static inline unsigned lane_bits(i8 m) {
#if defined(__AVX__)
    return (unsigned)__builtin_ia32_movmskps256((f8)m);
#else
    unsigned bits = 0;
    for (int l = 0; l < 8; l++) bits |= (unsigned)(m[l] & 1) << l;
    return bits;
#endif
}

/* Bit i of the n (at most 32) scores x[i] that reach their thresholds t[i]. */
static inline uint32_t pass_bits(const float *x, const float *t, int n) {
    uint32_t bits = 0;
    int i = 0;
    for (; i + 8 <= n; i += 8) bits |= lane_bits(*(const f8 *)(x + i) >= *(const f8 *)(t + i)) << i;
    for (; i < n; i++) bits |= (uint32_t)(x[i] >= t[i]) << i;
    return bits;
}

/* Offer a block's scores St (nj, q), item-major, to the q heaps: an item goes to the heaps of
 * the queries whose threshold thr[i] it reaches (the worst score the heap keeps, -inf until
 * full), 32 queries at a time, in item order, as a plain scan would. */
static void topk_block(uint64_t *heap, int *hn, int maxn, float *thr, const float *St, int nj, int q, int j0) {
    for (int j = 0; j < nj; j++) {
        const float *row = St + (size_t)j * q;
        for (int i0 = 0; i0 < q; i0 += 32)
            for (uint32_t reach = pass_bits(row + i0, thr + i0, q - i0 < 32 ? q - i0 : 32); reach; reach &= reach - 1) {
                int i = i0 + __builtin_ctz(reach);
                heap_push(heap + (size_t)i * maxn, &hn[i], maxn, scored_key(row[i], j0 + j));
                if (hn[i] == maxn) thr[i] = key_score(heap[(size_t)i * maxn]);
            }
    }
}

/* Selection by best interest, for multi-interest models. REMI-SPEC g.2 step 3 merges the K
 * top-n lists in the order (score, then lower interest, then rank), and an item's first
 * entry is its best: the key (max over k of s_k, the lowest k attaining it, the lower id).
 * If id 0 is in none of the K lists, R is exactly the n best items by that key, id 0 left
 * out: an item among them has, in its best interest, only items before it that come before
 * it by this key too, fewer than n, so its best entry is in that list; and every entry of
 * another item comes after it. So one heap per user (n ln(N / n) pushes, not K times that)
 * replaces the K heaps. Whether id 0 is in a list is known by counting, per interest, the
 * items whose score key exceeds id 0's (id 0 wins ties) until there are n; a user with a
 * count short of n (id 0 in a list, or a list short of n: NaN scores, N <= n) is selected
 * again per interest.
 * Eight users per group, their scores at columns k 8 + b of St (nj, 8 K). */
#define BEST_LANES 8

/* x "beats" y as scored_key orders scores (a NaN lowest, -0 = +0), eight at a time: -1 where it does. */
static inline i8 beats(f8 x, f8 y) { return (x > y) | ((y != y) & (x == x)); }

/* The heap key of an item under its best interest k: score, lower k, lower id (K N <= 2^32). */
static inline uint64_t best_key(float s, int k, int id, int N) {
    return (scored_key(s, 0) & ~0xffffffffull) | (uint32_t)~((uint32_t)k * (uint32_t)N + (uint32_t)id);
}
static inline int best_key_id(uint64_t key, int N) { return (int)((uint32_t)~(uint32_t)key % (uint32_t)N); }

typedef struct {      /* one group's best-interest selection */
    uint64_t *heap;   /* (8, maxn) */
    int hn[BEST_LANES];
    float thr[BEST_LANES]; /* score of the worst kept: -inf until full; NaN: no user */
    float *s0;        /* (K, 8) id 0's scores */
    int32_t *cnt;     /* (K, 8) items that beat id 0, counted until every count reaches n */
    int counting;     /* 0 no longer; 1 yes; 2 yes, and id 0's scores hold no NaN (beats is then >) */
} BestSel;

/* Bit b: some of the K scores row[k 8 + b] reaches thr[b]. With AVX-512, the comparisons'
 * masks are or-ed as they are, without a vector of lanes between them and the bits. */
static inline __attribute__((always_inline)) unsigned reach_bits(const float *row, f8 thr, const int K) {
#if defined(__AVX512VL__)
    __mmask8 m = _mm256_cmp_ps_mask((__m256)*(const f8 *)row, (__m256)thr, _CMP_GE_OQ); /* f8: any alignment */
    for (int k = 1; k < K; k++)
        m |= _mm256_cmp_ps_mask((__m256)*(const f8 *)(row + BEST_LANES * k), (__m256)thr, _CMP_GE_OQ);
    return m;
#else
    i8 pass = *(const f8 *)row >= thr;
    for (int k = 1; k < K; k++) pass |= *(const f8 *)(row + BEST_LANES * k) >= thr;
    return lane_bits(pass);
#endif
}

static inline __attribute__((always_inline)) void best_block_k(BestSel *b, const float *St, int nj, const int K, int j0,
                                                                int N, int maxn) {
    f8 thr = *(const f8 *)b->thr;
    int counting = b->counting; /* in a register: the stores below could alias it */
    for (int j = 0; j < nj; j++) {
        const float *row = St + (size_t)j * BEST_LANES * K;
        if (j0 + j == 0) { /* id 0: the counts' reference, never selected */
            memcpy(b->s0, row, (size_t)BEST_LANES * K * sizeof(float));
            int nan = 0;
            for (int i = 0; i < BEST_LANES * K; i++) nan |= row[i] != row[i];
            counting = counting && !nan ? 2 : counting;
            continue;
        }
        if (counting)
            for (int k = 0; k < K; k++) {
                int32_t *c = b->cnt + BEST_LANES * k;
                f8 x = *(const f8 *)(row + BEST_LANES * k), y = *(const f8 *)(b->s0 + BEST_LANES * k);
                i8 n;
                memcpy(&n, c, sizeof n);
                n -= counting == 2 ? (i8)(x > y) : beats(x, y);
                memcpy(c, &n, sizeof n);
            }
        unsigned reach = reach_bits(row, thr, K); /* the users for whom some interest's score reaches the threshold */
        if (!reach) continue;
        f8 best = *(const f8 *)row; /* each user's best interest: the lowest k of the highest score */
        i8 arg = { 0 };
        for (int k = 1; k < K; k++) {
            f8 v = *(const f8 *)(row + BEST_LANES * k);
            i8 gt = beats(v, best);
            best = blend8(gt, v, best);
            arg = (k & gt) | (arg & ~gt);
        }
        for (; reach; reach &= reach - 1) {
            int l = __builtin_ctz(reach);
            uint64_t *h = b->heap + (size_t)l * maxn;
            heap_push(h, &b->hn[l], maxn, best_key(best[l], arg[l], j0 + j, N));
            if (b->hn[l] == maxn) thr[l] = key_score(h[0]);
        }
    }
    memcpy(b->thr, &thr, sizeof thr);
    if (counting) { /* stop once every count has reached n */
        int short_of = 0;
        for (int i = 0; i < BEST_LANES * K; i++) short_of |= b->cnt[i] < maxn;
        b->counting = short_of ? counting : 0;
    }
}
/* With K a constant, the loops over interests unrolled (K 4, the default: the top-k 12%
 * faster on Intel, medians of eight runs). */
static void best_block(BestSel *b, const float *St, int nj, int K, int j0, int N, int maxn) {
    switch (K) {
    case 2: best_block_k(b, St, nj, 2, j0, N, maxn); break;
    case 4: best_block_k(b, St, nj, 4, j0, N, maxn); break;
    case 8: best_block_k(b, St, nj, 8, j0, N, maxn); break;
    default: best_block_k(b, St, nj, K, j0, N, maxn);
    }
}

#define EVAL_GROUP BEST_LANES /* the fewest users in a group (eval_group), whose queries share each block of items */
/* Users in a group: 8 by best interest (its lanes); per interest, enough for the group's
 * columns to fill the kernel's column tiles (16 single vectors, not 8 in a half tile). */
static int eval_group(int K, int best) { return best || EVAL_GROUP * K >= NR ? EVAL_GROUP : (NR + K - 1) / K; }
/* A group's products fill full column tiles, so its blocks of items are packed (pack_rows). */
static int eval_packs(int K, int best) { return eval_group(K, best) * K >= NR; }

#define EVAL_BLOCK 512  /* items per block: their rows of E stay in L2 while the group's queries use them */

typedef struct {
    const Model *m;
    const Acts *a;
    const Split *s;
    int u0;               /* chunk: its users from u0 on */
    const int *user;      /* the chunk's users to evaluate (chunk-local), group_size per group */
    int n_user;
    int best;             /* select by best interest (else per interest) */
    unsigned char *redo;  /* best: users to select again per interest (chunk-local) */
    const int *cuts; int n_cut, maxn;
    double *res;          /* (U, n_cut, 4) per-user metrics */
    double *sec;          /* (groups, 3) seconds in products, top-k, merge + metrics */
} EvalCtx;

/* Seconds spent in each phase of evaluate since the program started (for bench): the
 * interest vectors (wall clock), then the threads' summed time in the item products, the
 * top-k selection, and the merge and metrics; users evaluated, and of them selected again
 * per interest after a best-interest selection. */
static struct { double vectors, products, topk, metrics; long users, again; } eval_time;

static int eval_per_interest; /* selftest: every user selected per interest, to compare */
/* Whether evaluate selects m's users by best interest (multi-interest models, within
 * best_key's range) before selecting the few it must again per interest. */
static int eval_by_best(const Model *m) {
    return m->multi && !eval_per_interest && (uint64_t)m->K * (uint64_t)m->N <= (1ull << 32);
}

static int group_size(const EvalCtx *e) { return eval_group(e->m->K, e->best); }
static int group_users(const EvalCtx *e, int g) { /* users in group g: group_size, fewer in the last */
    int n = group_size(e);
    return e->n_user - g * n < n ? e->n_user - g * n : n;
}

/* User b of the chunk, retrieved list R (nr ids): its metrics at cut ci. */
static void cut_metrics(const EvalCtx *e, int b, int ci, const int *R, int nr) {
    int u = e->u0 + b, n = e->s->off[u + 1] - e->s->off[u], k = eval_split_point(n);
    const int *seq = e->s->items + e->s->off[u];
    user_metrics(e->res + ((size_t)u * e->n_cut + ci) * 4, R, nr, seq + k, n - k, e->m->enc == ENC_POP);
}

/* One call of eval_groups: its groups' queries, selections and scratch. */
typedef struct {
    int g0, g1, Q;     /* groups [g0, g1); Q = group_size K columns a group at most */
    void *lines;       /* St, Qt and Ap, from a cache-line boundary */
    float *St;         /* (rows, Q) a block's scores, item-major */
    float *Qt;         /* (ng, D, Q) the groups' queries */
    float *Ap;         /* (rows, D) the block packed */
    float *thr;        /* (ng, Q) per interest: each heap's worst kept score */
    uint64_t *heap;    /* (ng, Q, maxn): per interest a heap per column, by best interest per user */
    int *hn;           /* (ng, Q) per interest: the heaps' sizes */
    BestSel *sel;      /* (ng) by best interest */
    float *s0;         /* (ng, Q) by best interest: id 0's scores */
    int32_t *cnt;      /* (ng, Q) by best interest: the counts of items that beat id 0 */
    Scored *lists;     /* (K, maxn) one user's lists, to merge */
    int *R;            /* (maxn) one user's retrieved ids */
} GroupWork;

/* St, Qt and Ap start at a cache-line boundary, so that each vector the kernel loads or
 * stores is one line (malloc aligns to 16 bytes; St's size is a multiple of 64 bytes); rows:
 * EVAL_BLOCK rounded up to the kernel's tiles. */
static void groups_alloc(GroupWork *w, const EvalCtx *e, int g0, int g1) {
    int D = e->m->D, maxn = e->maxn, Q = group_size(e) * e->m->K, ng = g1 - g0;
    size_t rows = (EVAL_BLOCK + MR - 1) / MR * MR, n_st = (size_t)Q * rows, n_qt = (size_t)ng * Q * D;
    *w = (GroupWork){ .g0 = g0, .g1 = g1, .Q = Q };
    w->lines = xcalloc((n_st + n_qt + rows * D) * sizeof(float) + 64, 1);
    w->St = (float *)(((uintptr_t)w->lines + 63) & ~(uintptr_t)63);
    w->Qt = w->St + n_st;
    w->Ap = w->Qt + n_qt;
    w->thr = xmalloc((size_t)ng * Q * sizeof(float));
    w->heap = xmalloc((size_t)ng * Q * maxn * sizeof(uint64_t));
    w->hn = xmalloc((size_t)ng * Q * sizeof(int));
    w->sel = xmalloc((size_t)ng * sizeof(BestSel));
    w->s0 = xmalloc((size_t)ng * Q * sizeof(float));
    w->cnt = xmalloc((size_t)ng * Q * sizeof(int32_t));
    w->lists = xmalloc((size_t)e->m->K * maxn * sizeof(Scored));
    w->R = xmalloc((size_t)maxn * sizeof(int));
}

static void groups_free(GroupWork *w) {
    free(w->lines); free(w->thr); free(w->heap); free(w->hn); free(w->sel); free(w->s0); free(w->cnt);
    free(w->lists); free(w->R);
}

/* Group g's queries Qt (D, q) and empty selections. Per interest: q = users x K columns,
 * user-major, a heap per column. By best interest: q = 8 K columns, interest-major, a heap
 * per user (zero columns for a short group). */
static void group_start(GroupWork *w, const EvalCtx *e, int g) {
    int K = e->m->K, D = e->m->D, maxn = e->maxn, Q = w->Q, i0 = (g - w->g0) * Q;
    const int *gu = e->user + g * group_size(e);
    int gb = group_users(e, g), q = e->best ? Q : gb * K;
    float *qt = w->Qt + (size_t)i0 * D;
    for (int b = 0; b < gb; b++)
        for (int k = 0; k < K; k++) {
            const float *v = e->a->v + ((size_t)gu[b] * K + k) * D;
            int col = e->best ? k * BEST_LANES + b : b * K + k;
            for (int d = 0; d < D; d++) qt[(size_t)d * q + col] = v[d];
        }
    if (!e->best) {
        for (int i = 0; i < q; i++) { w->hn[i0 + i] = 0; w->thr[i0 + i] = -INFINITY; }
        return;
    }
    BestSel *bs = w->sel + (g - w->g0);
    *bs = (BestSel){ .heap = w->heap + (size_t)i0 * maxn, .s0 = w->s0 + i0, .cnt = w->cnt + i0, .counting = 1 };
    for (int l = 0; l < BEST_LANES; l++) bs->thr[l] = l < gb ? -INFINITY : NAN;
    for (int i = 0; i < Q; i++) bs->cnt[i] = i % BEST_LANES < gb ? 0 : maxn;
}

/* Every item against the groups' queries, a block at a time: St (items, q) = E[block] Q^T
 * by one product per group, read straight from the item table, then offered to the group's
 * selection. The groups take turns on each block, so it comes from memory once for all of
 * them (at Amazon Book's size the table does not fit in any cache). sec: the products' and
 * the selection's seconds. */
static void groups_score(GroupWork *w, const EvalCtx *e, double *sec) {
    int K = e->m->K, D = e->m->D, N = e->m->N, maxn = e->maxn, Q = w->Q, g0 = w->g0, g1 = w->g1;
    int pack = eval_packs(K, e->best);
    for (int j0 = 0; j0 < N; j0 += EVAL_BLOCK) {
        int nj = N - j0 < EVAL_BLOCK ? N - j0 : EVAL_BLOCK;
        const float *E = e->m->p.item_emb + (size_t)j0 * D;
        double t0 = now_sec(), t1;
        if (pack) pack_rows(w->Ap, E, nj, D, D); /* once for the groups' products */
        sec[0] += now_sec() - t0;
        int after = N - j0 - nj; /* items after this block */
        size_t next = (size_t)(after < EVAL_BLOCK ? after : EVAL_BLOCK) * D; /* the next block's floats */
        for (int g = g0; g < g1; g++) {
            int q = e->best ? Q : group_users(e, g) * K, qf = pack ? q / NR * NR : 0; /* columns in full tiles */
            size_t o = (size_t)(g - g0) * Q;
            /* the next block's share of this group, fetched into the caches while the products run */
            size_t f0 = next * (g - g0) / (g1 - g0) / 16 * 16, f1 = next * (g - g0 + 1) / (g1 - g0) / 16 * 16;
            t0 = now_sec();
            gemm_packed(w->St, q, w->Ap, w->Qt + o * D, q, nj, qf, D, E + (size_t)nj * D + f0, f1 - f0);
            if (q > qf) gemm_run((Gemm){ w->St + qf, q, E, D, 1, w->Qt + o * D + qf, q, nj, q - qf, D, 0 }, 0);
            t1 = now_sec(); sec[0] += t1 - t0;
            if (e->best) best_block(w->sel + (g - g0), w->St, nj, K, j0, N, maxn);
            else topk_block(w->heap + o * maxn, w->hn + o, maxn, w->thr + o, w->St, nj, q, j0);
            sec[1] += now_sec() - t1;
        }
    }
}

/* Group g's users from their selections to their metrics at every cut-off. By best interest
 * the heap is the list (a user whose counts fall short goes to e->redo instead); per
 * interest the K lists are merged. */
static void group_finish(GroupWork *w, const EvalCtx *e, int g) {
    int K = e->m->K, N = e->m->N, maxn = e->maxn, *R = w->R;
    const int *gu = e->user + g * group_size(e);
    uint64_t *gh = w->heap + (size_t)(g - w->g0) * w->Q * maxn;
    const int *gn = w->hn + (g - w->g0) * w->Q;
    const BestSel *bs = w->sel + (g - w->g0);
    int gb = group_users(e, g);
    for (int b = 0; b < gb; b++) {
        if (e->best) {
            int again = 0;
            for (int k = 0; k < K; k++) again |= bs->cnt[k * BEST_LANES + b] < maxn;
            if (again) { e->redo[gu[b]] = 1; continue; }
            uint64_t *h = gh + (size_t)b * maxn;
            heap_sort(h, bs->hn[b]);
            for (int i = 0; i < bs->hn[b]; i++) R[i] = best_key_id(h[i], N);
            for (int ci = 0; ci < e->n_cut; ci++)
                cut_metrics(e, gu[b], ci, R, e->cuts[ci] < bs->hn[b] ? e->cuts[ci] : bs->hn[b]);
            continue;
        }
        for (int k = 0; k < K; k++)
            heap_finish(w->lists + (size_t)k * maxn, gh + (size_t)(b * K + k) * maxn, gn[b * K + k]);
        for (int ci = 0; ci < e->n_cut; ci++) {
            int cut = e->cuts[ci] < gn[b * K] ? e->cuts[ci] : gn[b * K];
            cut_metrics(e, gu[b], ci, R, merge_interests(R, w->lists, K, maxn, cut, e->m->multi));
        }
    }
}

/* Score groups [g0, g1) of e->user against every item, select, then merge and score at
 * every cut-off; the seconds of each phase to e->sec (the groups' first row). */
static void eval_groups(const EvalCtx *e, int g0, int g1) {
    GroupWork w;
    double *sec = e->sec + (size_t)g0 * 3;
    groups_alloc(&w, e, g0, g1);
    for (int g = g0; g < g1; g++) group_start(&w, e, g);
    groups_score(&w, e, sec);
    double t0 = now_sec();
    for (int g = g0; g < g1; g++) group_finish(&w, e, g);
    sec[2] += now_sec() - t0;
    groups_free(&w);
}

#define EVAL_SHARE 8    /* groups that take turns on each block of items (their heaps stay in L2) */

static void eval_task(void *ctx, int lo, int hi) { /* groups [lo, hi) of the chunk */
    for (int g = lo; g < hi; g += EVAL_SHARE) eval_groups(ctx, g, hi - g < EVAL_SHARE ? hi : g + EVAL_SHARE);
}

static void eval_pass(const EvalCtx *e, int groups) { /* e's users on the threads, their times to eval_time */
    for (int i = 0; i < groups * 3; i++) e->sec[i] = 0.0;
    parallel_for((e->n_user + group_size(e) - 1) / group_size(e), eval_task, (void *)e);
    for (int g = 0; g < groups; g++) {
        eval_time.products += e->sec[g * 3]; eval_time.topk += e->sec[g * 3 + 1]; eval_time.metrics += e->sec[g * 3 + 2];
    }
}

/* Evaluate every user of split s at each cut-off (e.g. 20 and 50). noise_key: MIND's
 * evaluation draws (eval_noise_key). Multi-interest models select by best interest, and
 * the few users for whom that is not exact again per interest (see best_block). The same
 * computation written plainly, as REMI-SPEC g.2 states it (every score by a dot product, a
 * full sort per interest, the merge), is evaluate_ref among the self-tests, its twin. */
void evaluate(Metrics *out, const int *cuts, int n_cut, const Model *m, Acts *a, const Split *s, uint64_t noise_key) {
    int L = m->L, U = s->n_users, maxn = 0;
    for (int ci = 0; ci < n_cut; ci++) maxn = cuts[ci] > maxn ? cuts[ci] : maxn;
    if (maxn > m->N) maxn = m->N;
    if (maxn > EVAL_MAX_TOPN) die("--topn above %d is not supported", EVAL_MAX_TOPN);
    double *res = xcalloc((size_t)U * n_cut * 4, sizeof(double));
    int groups = (a->cap_b + EVAL_GROUP - 1) / EVAL_GROUP, *users = xmalloc((size_t)a->cap_b * sizeof(int));
    double *sec = xmalloc((size_t)groups * 3 * sizeof(double));
    unsigned char *redo = xmalloc((size_t)a->cap_b);
    int best = eval_by_best(m);
    for (int u0 = 0; u0 < U; u0 += a->cap_b) {
        int nb = U - u0 < a->cap_b ? U - u0 : a->cap_b;
        double t0 = now_sec();
        for (int b = 0; b < nb; b++) make_eval_row(a->hist + b * L, a->mask + b * L, s, u0 + b, L);
        user_vectors(m, a, u0, nb, noise_key);
        eval_time.vectors += now_sec() - t0;
        for (int b = 0; b < nb; b++) { users[b] = b; redo[b] = 0; }
        EvalCtx e = { m, a, s, u0, users, nb, best, redo, cuts, n_cut, maxn, res, sec };
        eval_pass(&e, groups);
        eval_time.users += nb;
        if (!best) continue;
        e.n_user = 0;
        for (int b = 0; b < nb; b++)
            if (redo[b]) users[e.n_user++] = b;
        e.best = 0;
        if (e.n_user) eval_pass(&e, groups);
        eval_time.again += e.n_user;
    }
    free(sec); free(users); free(redo);
    for (int ci = 0; ci < n_cut; ci++) {
        double sum[4] = { 0, 0, 0, 0 };
        for (int u = 0; u < U; u++)
            for (int j = 0; j < 4; j++) sum[j] += res[((size_t)u * n_cut + ci) * 4 + j];
        out[ci] = (Metrics){ cuts[ci], U, sum[0] / U, sum[1] / U, sum[2] / U, sum[3] / U };
    }
    free(res);
}

/* ======================================================================== model files
 * Layout: magic, version, encoder, N, D, K, L, add_pos, relu, mind_fixed (int32 each), the
 * training seed, n_params and (version 4) the fingerprint of the splits trained on, data_sum
 * (uint64), the parameters (float32, Params order), FNV-1a 64
 * checksum of the header and parameter bytes. mind_fixed is 1 for a MIND model trained with
 * --mind-eval fixed (0 otherwise): eval's default, so it reproduces the metrics train printed. */
static uint64_t fnv1a_update(uint64_t h, const void *p, size_t n) {
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ull;
    return h;
}
static uint64_t fnv1a(const void *p, size_t n) { return fnv1a_update(0xcbf29ce484222325ull, p, n); }

/* A model file's checksum: its header (hdr, meta) and its parameters. */
static uint64_t model_sum(const int32_t hdr[10], const uint64_t *meta, int n_meta, const float *params, size_t n) {
    uint64_t h = fnv1a_update(fnv1a(hdr, 10 * sizeof *hdr), meta, (size_t)n_meta * sizeof *meta);
    return fnv1a_update(h, params, n * sizeof *params);
}

static void model_save(const Model *m, const float *params, const Config *c, const char *path) {
    FILE *f = atomic_open(path);
    int32_t hdr[10] = { (int32_t)REMI_MODEL_MAGIC, REMI_MODEL_VERSION, m->enc, m->N, m->D, m->K, m->L, m->add_pos,
                        m->relu, m->enc == ENC_MIND && !strcmp(c->mind_eval, "fixed") };
    uint64_t meta[3] = { c->seed, m->n_params, c->data_fp }, sum = model_sum(hdr, meta, 3, params, m->n_params);
    fwrite(hdr, sizeof hdr, 1, f);
    fwrite(meta, sizeof meta, 1, f);
    fwrite(params, sizeof(float), m->n_params, f);
    fwrite(&sum, sizeof sum, 1, f);
    atomic_commit(f);
}

/* --mind-eval given for a model that draws nothing at evaluation (any but MIND): a note;
 * returns whether it was. */
static int note_mind_eval_unused(const Config *c) {
    if (c->enc == ENC_MIND || !flag_given(&c->mind_eval)) return 0;
    fprintf(stderr, "remi: note: --mind-eval has no effect: only MIND draws at evaluation\n");
    return 1;
}

/* Reads a model file into a fresh Model; the encoder, dimensions and seed come from the file,
 * and --mind-eval too where the command was not given one and the file says fixed. */
static void model_load(Model *m, Config *c, const char *path) {
    FILE *f = xfopen(path, "rb", "train a model first with `remi train --out DIR` (it writes DIR/model.bin)");
    int32_t hdr[10];
    uint64_t meta[3] = { 0, 0, 0 }, sum;
    if (fread(hdr, 4, 2, f) != 2 || (uint32_t)hdr[0] != REMI_MODEL_MAGIC) die("%s: not a remi model file", path);
    if (hdr[1] != REMI_MODEL_VERSION && hdr[1] != 3)
        die("%s: model file version %d, this remi reads versions 3 and %d (retrain it)", path, hdr[1],
            REMI_MODEL_VERSION);
    int n_meta = hdr[1] == 3 ? 2 : 3; /* version 3 has no data fingerprint */
    if (fread(hdr + 2, 4, 8, f) != 8 || fread(meta, sizeof *meta, n_meta, f) != (size_t)n_meta)
        die("%s: truncated model file", path);
    if (hdr[2] < 0 || hdr[2] >= N_ENCODERS || hdr[3] < 2 || hdr[4] < 1 || hdr[5] < 1 || hdr[6] < 1 ||
        hdr[4] > 4096 || hdr[5] > 64 || hdr[6] > 10000 || (hdr[7] | hdr[8] | hdr[9]) & ~1 || (hdr[9] && hdr[2] != ENC_MIND))
        die("%s: corrupt header", path);
    c->enc = (Encoder)hdr[2]; c->model = ENC_NAMES[c->enc];
    c->D = hdr[4]; c->K = hdr[5]; c->L = hdr[6]; c->add_pos = hdr[7]; c->relu = hdr[8]; c->seed = meta[0];
    c->data_fp = meta[2];
    if (hdr[9] && !flag_given(&c->mind_eval)) c->mind_eval = "fixed";
    note_mind_eval_unused(c);
    TensorInit t[N_PARAM_TENSORS];
    model_shape(m, t, hdr[3], c); /* check the sizes against the file before allocating */
    struct stat sb;
    uint64_t want = sizeof hdr + (uint64_t)n_meta * sizeof *meta + m->n_params * sizeof(float) + 8;
    if (meta[1] != m->n_params || fstat(fileno(f), &sb) != 0) die("%s: corrupt header (parameter count)", path);
    int regular = S_ISREG(sb.st_mode); /* a pipe (<(zcat model.bin.gz), /dev/stdin) has no size: checked at its end */
    if (regular && (uint64_t)sb.st_size < want)
        die("%s: truncated model file (%lld bytes, its header needs %llu)", path, (long long)sb.st_size,
            (unsigned long long)want);
    if (regular && (uint64_t)sb.st_size != want) die("%s: corrupt model file (%lld bytes, its header needs %llu)", path,
                                          (long long)sb.st_size, (unsigned long long)want);
    model_alloc(m, t, hdr[3], c); /* the parameters come from the file */
    if (fread(m->mem, sizeof(float), m->n_params, f) != m->n_params || fread(&sum, sizeof sum, 1, f) != 1)
        die("%s: truncated model file", path);
    if (sum != model_sum(hdr, meta, n_meta, m->mem, m->n_params)) die("%s: checksum mismatch (corrupt model file)", path);
    if (!regular && fgetc(f) != EOF) die("%s: corrupt model file (bytes after its checksum)", path);
    fclose(f);
}

/* ======================================================================== command line */
static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > INT_MAX ? INT_MAX : (int)n;
}
static int default_threads(void) { return online_cpus() > 64 ? 64 : online_cpus(); }
/* -t above the online CPUs: a note (threads that share cores are slower; the results are the same). */
static void note_threads(int t) {
    if (t > online_cpus())
        fprintf(stderr, "remi: note: -t %d is more threads than the %d online CPUs: they share cores, which is slower "
                "(the results are the same for any -t)\n", t, online_cpus());
}

static Config default_config(void) {
    Config c = { 0 };
    c.data = "data"; c.name = "beauty"; c.out = "out"; c.model = "sa"; c.enc = ENC_SA;
    c.D = 64; c.K = 4; c.L = 20; c.B = 128; c.M = 1280; c.add_pos = 1;
    c.dropout = 0.2f; c.mind_eval = "fresh"; c.adam = "dense"; c.remove_hits = "none";
    c.lr = 1e-3f;
    c.rbeta = NAN; c.rlambda = NAN; /* per model, set by check_config */
    c.iters = 1000000; c.eval_every = 1000; c.patience = 50; c.topn = 50;
    c.seed = 2021; c.threads = default_threads(); c.eval_batch = 128;
    return c;
}

/* Flags shared by train, eval and bench. */
#define MODEL_FLAGS(c)                                                                                \
    { "--data", F_STR, &(c).data, "folder holding NAME_{train,valid,test}.txt" },                     \
    { "--name", F_STR, &(c).name, "dataset name (file prefix)" },                                     \
    { "--model", F_STR, &(c).model, "encoder: sa (ComiRec-SA), dr (ComiRec-DR), mind, dnn, gru4rec, pop" }, \
    { "--relu", F_BOOL, &(c).relu, "MIND: the ReLU layer the reference adds on Book" },              \
    { "--hidden", F_INT, &(c).D, "embedding size D" },                                                \
    { "--interests", F_INT, &(c).K, "number of interests K" },                                        \
    { "--len", F_INT, &(c).L, "history length L" },                                                   \
    { "-t", F_INT, &(c).threads, "threads (results do not depend on it)" }

#define STEP_FLAGS(c)                                                                                 \
    { "--rbeta", F_FLOAT, &(c).rbeta, "IHN hardness beta, 0 = uniform sampled softmax (default 0.1 for sa, dr, mind; 0 for dnn, gru4rec)" }, \
    { "--rlambda", F_FLOAT, &(c).rlambda, "RR weight lambda, 0 = off (default 100 for sa, dr, mind; single-vector models have no RR)" }, \
    { "--dropout", F_FLOAT, &(c).dropout, "GRU4Rec: embedding dropout" },                            \
    { "--batch", F_INT, &(c).B, "batch size B" },                                                     \
    { "--neg", F_INT, &(c).M, "sampled negatives M, shared by the batch" },                           \
    { "--lr", F_FLOAT, &(c).lr, "Adam learning rate" },                                               \
    { "--adam", F_STR, &(c).adam, "dense (every row moves every step, as the reference) or lazy (touched rows only)" }, \
    { "--remove-hits", F_STR, &(c).remove_hits, "none (as the reference), target (a row drops its target from the negatives) or history (also its history items)" }, \
    { "--seed", F_U64, &(c).seed, "random seed" }

#define LOOP_FLAGS(c)                                                                                 \
    { "--iters", F_LONG, &(c).iters, "maximum training steps" },                                      \
    { "--eval-every", F_INT, &(c).eval_every, "steps between validations" },                          \
    { "--patience", F_INT, &(c).patience, "stop once more validations than this in a row bring no improvement" }, \
    { "--topn", F_INT, &(c).topn, "N of the validation Recall@N used for model selection" },          \
    { "--out", F_STR, &(c).out, "output folder (metrics.jsonl, curves.svg, model.bin, checkpoint.bin)" },  \
    { "--eval-batch", F_INT, &(c).eval_batch, "users per evaluation chunk" },                         \
    { "--mind-eval", F_STR, &(c).mind_eval, "MIND's routing logits at evaluation: fresh (new draws every pass, as the reference) or fixed" }

static void check_mind_eval(const char *mode) {
    if (strcmp(mode, "fresh") && strcmp(mode, "fixed")) die("--mind-eval %s: expected fresh or fixed", mode);
}

static uint64_t data_sum(const Dataset *ds);

/* A saved model and the dataset it is evaluated on, which must have its number of items; a
 * dataset with other splits than the model was trained on (a prep with another --seed, the
 * same item count) gets a note: its valid/test users may be the model's training users. */
static void load_model_data(Model *m, Dataset *ds, Config *c, const char *model_file) {
    model_load(m, c, model_file);
    load_dataset(ds, c->data, c->name);
    if (ds->N != m->N)
        die("%s/%s has %d items but the model was trained with %d; give the --data and --name it was trained on",
            c->data, c->name, ds->N - 1, m->N - 1);
    if (c->data_fp && c->data_fp != data_sum(ds))
        fprintf(stderr, "remi: note: %s/%s is not the data %s was trained on (other users or items in its splits: "
                "was prep run again, with another --seed?); its valid and test users may be the model's training "
                "users, and then the metrics overstate it\n", c->data, c->name, model_file);
}

/* --neg 0: full softmax, every item a "negative" (REMI-SPEC d.6), so M = N. */
static void resolve_negatives(Config *c, int N) {
    if (c->M == 0) { c->full_softmax = 1; c->M = N; }
}

/* A batch holds B distinct training users (REMI-SPEC f.4): the split needs that many. */
static void check_batch_users(const Split *train, int B, const char *data, const char *name) {
    if (train->n_users < B)
        die("%s/%s_train.txt has %d users, fewer than --batch %d (batches hold distinct users); lower --batch", data,
            name, train->n_users, B);
}

/* Validates the flags and resolves the per-model defaults: the multi-interest encoders
 * train REMI (beta 0.1, lambda 100; beta chosen on Beauty's validation split), the
 * single-vector ones their plain baseline. */
static void check_config(Config *c) {
    c->enc = N_ENCODERS;
    for (int e = 0; e < N_ENCODERS; e++) if (!strcmp(c->model, ENC_NAMES[e])) c->enc = (Encoder)e;
    if (c->enc == N_ENCODERS) die("--model %s: expected sa, dr, mind, dnn, gru4rec or pop", c->model);
    int multi = c->enc == ENC_SA || c->enc == ENC_DR || c->enc == ENC_MIND;
    if (isnan(c->rbeta)) c->rbeta = multi ? 0.1f : 0.0f;
    if (isnan(c->rlambda)) c->rlambda = multi ? 100.0f : 0.0f;
    if (!multi && c->rlambda != 0.0f)
        die("--rlambda %g: RR regularises a routing matrix, which --model %s does not have; use --rlambda 0",
            c->rlambda, c->model);
    if (c->enc == ENC_POP && c->rbeta != 0.0f) die("--rbeta %g: Pop has no loss to reweight; use --rbeta 0", c->rbeta);
    if (c->relu && c->enc != ENC_MIND) die("--relu is MIND's layer; use it with --model mind");
    check_mind_eval(c->mind_eval);
    if (strcmp(c->adam, "dense") && strcmp(c->adam, "lazy")) die("--adam %s: expected dense or lazy", c->adam);
    static const char *hits_names[] = { "none", "target", "history" }; /* in Hits order */
    int h = 0;
    while (h < 3 && strcmp(c->remove_hits, hits_names[h])) h++;
    if (h == 3) die("--remove-hits %s: expected none, target or history", c->remove_hits);
    c->hits = (Hits)h;
    if (c->hits && c->enc == ENC_POP) die("--remove-hits: Pop samples no negatives; use --remove-hits none");
    check_range_float("--dropout", c->dropout, 0, 0.99);
    if (c->enc != ENC_GRU4REC && c->dropout != 0.2f) /* REMI-SPEC: --dropout is GRU4Rec's only */
        die("--dropout %g: only GRU4Rec has dropout (REMI-SPEC c.5); leave it out, or use --model gru4rec", c->dropout);
    check_range("--hidden", c->D, 1, 4096);
    check_range("--interests", c->K, 1, 64);
    check_range("--len", c->L, 1, 10000);
    check_range("--batch", c->B, 1, 1 << 20);
    check_range("--neg", c->M, 0, 1 << 24);
    if (c->M == 0 && c->rbeta != 0.0f)
        die("--neg 0 (full softmax) has no sampled negatives for IHN to reweight; use --rbeta 0");
    if (c->M == 0 && c->hits) die("--neg 0 (full softmax) has no sampled negatives to remove hits from; use --remove-hits none");
    check_range_float("--lr", c->lr, 1e-12, 10);
    check_range_float("--rlambda", c->rlambda, 0, 1e9);
    check_range_float("--rbeta", c->rbeta, -1e4, 1e4);
    c->rbeta += 0.0f, c->rlambda += 0.0f; /* -0 trains as 0: recorded as 0 (report's rows) */
    check_range("--iters", (double)c->iters, 1, 1e12);
    check_range("--eval-every", c->eval_every, 1, 1e9);
    check_range("--patience", c->patience, 0, 1e9);
    check_range("--topn", c->topn, 1, EVAL_MAX_TOPN);
    check_range("-t", c->threads, 1, 256);
    /* flags the model takes nothing from: a note, not an error, as a sweep gives every model
     * one set of flags (the reference's argparse takes them all too) */
    if (note_mind_eval_unused(c)) c->mind_eval = "fresh"; /* recorded as the default: report's rows stay one */
    if (!multi && flag_given(&c->K))
        fprintf(stderr, "remi: note: --interests has no effect: --model %s has one user vector\n", c->model);
    const struct { const void *dst; const char *name; } pop_unused[] = {
        { &c->D, "--hidden" }, { &c->L, "--len" }, { &c->lr, "--lr" }, { &c->M, "--neg" }, { &c->adam, "--adam" } };
    for (size_t i = 0; i < sizeof pop_unused / sizeof *pop_unused && c->enc == ENC_POP; i++)
        if (flag_given(pop_unused[i].dst))
            fprintf(stderr, "remi: note: %s has no effect: --model pop counts the training targets\n", pop_unused[i].name);
}

static void print_metrics_row(const char *label, const Metrics *mt) {
    printf("%-6s N=%-3d  recall %.6f  ndcg %.6f  ndcg_ref %.6f  hitrate %.6f  (%d users)\n", label, mt->topn,
           mt->recall, mt->ndcg, mt->ndcg_ref, mt->hitrate, mt->users);
}

static int json_metrics(char *buf, size_t n, const Metrics *mt) {
    return snprintf(buf, n, "\"topn\":%d,\"users\":%d,\"recall\":%.6f,\"ndcg\":%.6f,\"ndcg_ref\":%.6f,\"hitrate\":%.6f",
                    mt->topn, mt->users, mt->recall, mt->ndcg, mt->ndcg_ref, mt->hitrate);
}

/* s as the inside of a JSON string: quotes, backslashes and control bytes escaped. */
static void json_escape(char *dst, size_t n, const char *s) {
    size_t k = 0;
    for (; *s && k + 7 < n; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') { dst[k++] = '\\'; dst[k++] = (char)ch; }
        else if (ch < 0x20) k += (size_t)snprintf(dst + k, n - k, "\\u%04x", ch);
        else dst[k++] = (char)ch;
    }
    dst[k] = 0;
}

/* The metrics log lives in memory and is rewritten (temp file + rename) after every
 * evaluation, so the file on disk is always complete. */
typedef struct { char *buf; size_t len, cap; char path[4096]; } Log;

static void log_line(Log *lg, const char *fmt, ...) {
    va_list ap, again;
    va_start(ap, fmt);
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap); /* its length, then the line itself in place */
    va_end(ap);
    if (n < 0) die("internal: cannot format a log line");
    if (lg->len + n + 2 > lg->cap) { lg->cap = 2 * (lg->len + n + 2) + 4096; lg->buf = xrealloc(lg->buf, lg->cap); }
    vsnprintf(lg->buf + lg->len, (size_t)n + 1, fmt, again);
    va_end(again);
    lg->len += n;
    lg->buf[lg->len++] = '\n';
    FILE *f = atomic_open(lg->path);
    fwrite(lg->buf, 1, lg->len, f);
    atomic_commit(f);
}

/* ======================================================================== training state, checkpoints
 * Everything the training loop carries from one step to the next. A checkpoint holds all
 * of it, so a run resumed from one continues with the bits of the run left alone. It is
 * written (temporary file + rename) after every evaluation and when the run is
 * interrupted. Layout: magic, version, the settings, the dataset's size and fingerprint
 * (data_sum), the state below, parameters, Adam's moments and step, the best parameters,
 * the metrics log; then the FNV-1a 64 checksum of every byte before it. */
#define REMI_CKPT_MAGIC 0x504b4352u /* "RCKP" */
#define REMI_CKPT_VERSION 3

typedef struct { long iter; double loss, recall, ndcg; } CurvePoint;

typedef struct {
    long it, pass, best_iter;   /* steps done, evaluations done (MIND's draws), best model's step */
    int trials;                 /* evaluations since the last improvement */
    double best_recall, loss_sum, elapsed, t_train; /* loss_sum: since the last evaluation */
    uint64_t rng;
    int *perm;                  /* (U) the batch sampler's permutation */
    float *best;                /* (n_params) parameters of the best model */
    CurvePoint *curve; long n_curve; /* one point per evaluation, for curves.svg */
    Log log;                    /* metrics.jsonl so far */
} TrainState;

/* A file read or written with a running checksum. */
typedef struct { FILE *f; uint64_t h; const char *path; } Stream;
static void put(Stream *s, const void *p, size_t n) {
    if (n == 0) return;
    fwrite(p, 1, n, s->f);
    s->h = fnv1a_update(s->h, p, n);
}
static void get(Stream *s, void *p, size_t n) {
    if (n == 0) return;
    if (fread(p, 1, n, s->f) != n) die("%s: truncated checkpoint", s->path);
    s->h = fnv1a_update(s->h, p, n);
}
static void put_str(Stream *s, const char *x) {
    uint32_t n = (uint32_t)strlen(x);
    put(s, &n, 4);
    put(s, x, n);
}
static void get_str(Stream *s, char *x, size_t cap) {
    uint32_t n;
    get(s, &n, 4);
    if (n >= cap) die("%s: corrupt checkpoint (string of %u bytes)", s->path, n);
    get(s, x, n);
    x[n] = 0;
}

/* The settings that define a run, in checkpoint order. */
#define CKPT_INTS(c) &(c)->D, &(c)->K, &(c)->L, &(c)->B, &(c)->M, &(c)->full_softmax, &(c)->add_pos, &(c)->relu, \
                     &(c)->eval_every, &(c)->patience, &(c)->topn, &(c)->eval_batch
#define CKPT_FLOATS(c) &(c)->lr, &(c)->rbeta, &(c)->rlambda, &(c)->dropout

/* The three splits' users and items (FNV-1a 64): a resumed run checks that its data is the
 * one it started on, not a new prep of the same sizes. */
static uint64_t data_sum(const Dataset *ds) {
    const Split *sp[3] = { &ds->train, &ds->valid, &ds->test };
    uint64_t h = fnv1a(&ds->N, sizeof ds->N);
    for (int i = 0; i < 3; i++) {
        const Split *x = sp[i];
        h = fnv1a_update(h, &x->n_users, sizeof x->n_users);
        h = fnv1a_update(h, x->user_id, (size_t)x->n_users * sizeof *x->user_id);
        h = fnv1a_update(h, x->off, (size_t)(x->n_users + 1) * sizeof *x->off);
        h = fnv1a_update(h, x->items, (size_t)x->off[x->n_users] * sizeof *x->items);
    }
    return h;
}

static void ckpt_write(const char *path, const Config *c, const Model *m, const TrainState *st, int n_users,
                       uint64_t data) {
    Stream s = { atomic_open(path), 0xcbf29ce484222325ull, path };
    uint32_t hdr[2] = { REMI_CKPT_MAGIC, REMI_CKPT_VERSION };
    put(&s, hdr, sizeof hdr);
    put_str(&s, c->data); put_str(&s, c->name); put_str(&s, c->model); put_str(&s, c->mind_eval);
    put_str(&s, c->adam); put_str(&s, c->remove_hits);
    const int *ints[] = { CKPT_INTS(c) };
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) put(&s, ints[i], sizeof(int));
    const float *floats[] = { CKPT_FLOATS(c) };
    for (size_t i = 0; i < sizeof floats / sizeof *floats; i++) put(&s, floats[i], sizeof(float));
    int64_t meta[6] = { c->iters, (int64_t)c->seed, m->N, n_users, (int64_t)m->n_params, (int64_t)data };
    put(&s, meta, sizeof meta);
    int64_t counters[6] = { st->it, st->pass, st->best_iter, st->trials, m->step, st->n_curve };
    double sums[4] = { st->best_recall, st->loss_sum, st->elapsed, st->t_train };
    put(&s, counters, sizeof counters);
    put(&s, sums, sizeof sums);
    put(&s, &st->rng, sizeof st->rng);
    put(&s, st->perm, (size_t)n_users * sizeof(int));
    const float *tensors[4] = { m->mem, m->mmem, m->vmem, st->best };
    for (int i = 0; i < 4; i++) put(&s, tensors[i], m->n_params * sizeof(float));
    put(&s, st->curve, (size_t)st->n_curve * sizeof *st->curve);
    uint64_t len = st->log.len;
    put(&s, &len, sizeof len);
    put(&s, st->log.buf, st->log.len);
    uint64_t sum = s.h;
    fwrite(&sum, sizeof sum, 1, s.f);
    atomic_commit(s.f);
}

/* Opens a checkpoint, checks its checksum, magic and version, and reads its settings into
 * c (the strings live in static storage). The stream is left at the dataset's size. */
static Stream ckpt_open(const char *path, Config *c) {
    static char data[4096], name[4096], model[32], mind_eval[32], adam[32], remove_hits[32];
    FILE *f = xfopen(path, "rb", "the folder holds no checkpoint: `remi train --out DIR` writes DIR/checkpoint.bin");
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || sb.st_size < 16) die("%s: not a remi checkpoint (too short)", path);
    uint32_t hdr[2];
    if (fread(hdr, sizeof hdr, 1, f) != 1 || hdr[0] != REMI_CKPT_MAGIC) die("%s: not a remi checkpoint", path);
    if (hdr[1] != REMI_CKPT_VERSION)
        die("%s: checkpoint version %u, this remi reads version %d", path, hdr[1], REMI_CKPT_VERSION);
    uint64_t h = fnv1a_update(0xcbf29ce484222325ull, hdr, sizeof hdr), stored;
    unsigned char buf[1 << 16];
    for (off_t left = sb.st_size - 8 - (off_t)sizeof hdr; left > 0;) {
        size_t n = fread(buf, 1, left < (off_t)sizeof buf ? (size_t)left : sizeof buf, f);
        if (n == 0) die("%s: read error", path);
        h = fnv1a_update(h, buf, n);
        left -= (off_t)n;
    }
    if (fread(&stored, sizeof stored, 1, f) != 1 || stored != h)
        die("%s: checksum mismatch (truncated or corrupt checkpoint)", path);
    fseek(f, (long)sizeof hdr, SEEK_SET);
    Stream s = { f, fnv1a_update(0xcbf29ce484222325ull, hdr, sizeof hdr), path };
    get_str(&s, data, sizeof data); get_str(&s, name, sizeof name);
    get_str(&s, model, sizeof model); get_str(&s, mind_eval, sizeof mind_eval);
    get_str(&s, adam, sizeof adam); get_str(&s, remove_hits, sizeof remove_hits);
    c->data = data; c->name = name; c->model = model; c->mind_eval = mind_eval;
    c->adam = adam; c->remove_hits = remove_hits;
    int *ints[] = { CKPT_INTS(c) };
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) get(&s, ints[i], sizeof(int));
    float *floats[] = { CKPT_FLOATS(c) };
    for (size_t i = 0; i < sizeof floats / sizeof *floats; i++) get(&s, floats[i], sizeof(float));
    int64_t meta[2];
    get(&s, meta, sizeof meta);
    c->iters = meta[0]; c->seed = (uint64_t)meta[1];
    return s;
}

/* Reads the rest of a checkpoint into a model and a state made for its settings and data. */
static void ckpt_read_state(Stream *s, Model *m, TrainState *st, int n_users, uint64_t data, const char *where) {
    int64_t meta[4], counters[6];
    double sums[4];
    get(s, meta, sizeof meta);
    if (meta[0] != m->N || meta[1] != n_users || meta[2] != (int64_t)m->n_params)
        die("%s: the checkpoint's data has %lld items and %lld training users, %s has %d and %d",
            s->path, (long long)meta[0] - 1, (long long)meta[1], where, m->N - 1, n_users);
    if ((uint64_t)meta[3] != data)
        die("%s: %s is not the data this run started on (the same numbers of items and training users, "
            "other users or items in its splits: was prep run again?)", s->path, where);
    get(s, counters, sizeof counters);
    get(s, sums, sizeof sums);
    int bad = counters[0] < 0 || counters[5] < 0 || counters[5] > counters[0] + 2;
    for (int i = 1; i <= 4; i++) /* the pass, best step, trials without improvement and Adam's step: up to the step */
        bad |= counters[i] < 0 || counters[i] > counters[0];
    if (bad) die("%s: corrupt checkpoint", s->path);
    st->it = counters[0]; st->pass = counters[1]; st->best_iter = counters[2]; st->trials = (int)counters[3];
    m->step = counters[4]; st->n_curve = counters[5];
    st->best_recall = sums[0]; st->loss_sum = sums[1]; st->elapsed = sums[2]; st->t_train = sums[3];
    get(s, &st->rng, sizeof st->rng);
    get(s, st->perm, (size_t)n_users * sizeof(int));
    unsigned char *seen = xcalloc((size_t)n_users, 1); /* each user once */
    for (int u = 0; u < n_users; u++)
        if (st->perm[u] < 0 || st->perm[u] >= n_users || seen[st->perm[u]]++) die("%s: corrupt checkpoint (permutation)", s->path);
    free(seen);
    float *tensors[4] = { m->mem, m->mmem, m->vmem, st->best };
    for (int i = 0; i < 4; i++) get(s, tensors[i], m->n_params * sizeof(float));
    st->curve = xrealloc(st->curve, (size_t)(st->n_curve + 1) * sizeof *st->curve);
    get(s, st->curve, (size_t)st->n_curve * sizeof *st->curve);
    uint64_t len;
    get(s, &len, sizeof len);
    if (len > (1u << 30)) die("%s: corrupt checkpoint (log of %llu bytes)", s->path, (unsigned long long)len);
    st->log.cap = len + 4096;
    st->log.buf = xrealloc(st->log.buf, st->log.cap);
    get(s, st->log.buf, len);
    st->log.len = len;
    fclose(s->f);
}

/* ======================================================================== training curves
 * OUT/curves.svg, rewritten after every evaluation: the training loss (left) and the
 * validation Recall and NDCG at --topn (right) against the step. */
static void svg_panel(FILE *f, double x0, const char *title, const CurvePoint *p, long n, int n_series,
                      const char *const *names, const char *const *colors) {
    const double y0 = 40, w = 380, h = 240;
    double lo = INFINITY, hi = -INFINITY, xmax = p[n - 1].iter;
    for (long i = 0; i < n; i++)
        for (int s = 0; s < n_series; s++) {
            double v = s == 0 && n_series == 1 ? p[i].loss : s == 0 ? p[i].recall : p[i].ndcg;
            lo = v < lo ? v : lo; hi = v > hi ? v : hi;
        }
    if (hi <= lo) { hi = lo + 1; }
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" font-weight=\"bold\">%s</text>\n", x0, y0 - 12, title);
    fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#888\"/>\n", x0, y0, w, h);
    for (int t = 0; t <= 4; t++) { /* y ticks */
        double v = lo + (hi - lo) * t / 4, y = y0 + h - h * t / 4;
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.4g</text>\n", x0 - 4, y + 4, v);
        fprintf(f, "<line x1=\"%.0f\" x2=\"%.0f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#eee\"/>\n", x0, x0 + w, y, y);
    }
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\">0</text><text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\">step %ld</text>\n",
            x0, y0 + h + 16, x0 + w, y0 + h + 16, p[n - 1].iter);
    for (int s = 0; s < n_series; s++) {
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", colors[s]);
        for (long i = 0; i < n; i++) {
            double v = n_series == 1 ? p[i].loss : s == 0 ? p[i].recall : p[i].ndcg;
            fprintf(f, "%.1f,%.1f ", x0 + w * p[i].iter / xmax, y0 + h - h * (v - lo) / (hi - lo));
        }
        fprintf(f, "\"/>\n<text x=\"%.0f\" y=\"%.0f\" fill=\"%s\">%s</text>\n", x0 + w - 150, y0 + 16 + 14 * s,
                colors[s], names[s]);
    }
}

static void write_curves(const char *path, const CurvePoint *p, long n, int topn) {
    if (n == 0) return;
    FILE *f = atomic_open(path);
    char r[32], d[32];
    snprintf(r, sizeof r, "Recall@%d", topn);
    snprintf(d, sizeof d, "NDCG@%d", topn);
    const char *loss_name[] = { "loss" }, *loss_color[] = { "#333" };
    const char *val_names[] = { r, d }, *val_colors[] = { "#1f77b4", "#d62728" };
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"920\" height=\"320\" font-family=\"sans-serif\" "
               "font-size=\"12\">\n<rect width=\"920\" height=\"320\" fill=\"white\"/>\n");
    svg_panel(f, 70, "training loss (mean since the previous evaluation)", p, n, 1, loss_name, loss_color);
    svg_panel(f, 530, "validation", p, n, 2, val_names, val_colors);
    fprintf(f, "</svg>\n");
    atomic_commit(f);
}

/* ======================================================================== train */
static const char *TRAIN_WHAT =
    "Train REMI (ComiRec-SA + IHN + RR) on DATA/NAME_train.txt, select the best model by\n"
    "validation Recall@topn every --eval-every steps, stop after --patience evaluations\n"
    "without improvement, then report test Recall/NDCG/HitRate@20,50 of the best model.\n"
    "--model dr|mind applies REMI to ComiRec-DR or MIND; --rbeta 0 --rlambda 0 trains the plain\n"
    "encoder; --model dnn|gru4rec|pop trains a single-vector baseline.\n"
    "Writes OUT/metrics.jsonl, OUT/curves.svg, OUT/model.bin (the best model) and\n"
    "OUT/checkpoint.bin (the whole state, after every evaluation and on Ctrl-C / SIGTERM);\n"
    "`remi train --resume OUT` continues a stopped run with the bits it would have had.";

static volatile sig_atomic_t stop_signal;
static void on_stop_signal(int sig) {
    if (stop_signal) { /* a second Ctrl-C: quit at once, without the files being written */
        unlink_pending();
        _exit(128 + sig);
    }
    stop_signal = sig;
}

/* The final evaluation: the checkpoint already holds the finished run, so SIGINT or SIGTERM
 * ends the process at once (the files being written removed, as on_fatal_signal does), saying
 * that a resume evaluates it again; one that came after the loop's last look does so now. */
static char final_note[4 * 4200 + 160];
static size_t final_note_len;
static void on_final_signal(int sig) {
    if (write(STDERR_FILENO, final_note, final_note_len) < 0) { /* nothing more to do */ }
    on_fatal_signal(sig);
}
static void final_signals(const char *out) {
    char word[4 * 4200];
    final_note_len = (size_t)snprintf(final_note, sizeof final_note, "\nremi: stopped in the final evaluation; the "
                                      "checkpoint holds the finished run: `remi train --resume %s` evaluates it again\n",
                                      shell_word(word, sizeof word, out));
    if (final_note_len >= sizeof final_note) final_note_len = sizeof final_note - 1;
    signal(SIGINT, on_final_signal);
    signal(SIGTERM, on_final_signal);
    if (stop_signal) raise(stop_signal);
}

/* Names the first tensor of mem (the parameters or the gradients) holding a NaN or an
 * infinity, with their count, or returns NULL. */
static const char *nonfinite_tensor(const Model *m, const float *mem, size_t *count) {
    const float *p = mem;
    for (int i = 0; i < N_PARAM_TENSORS; p += m->size[i], i++) {
        size_t n = 0;
        for (size_t j = 0; j < m->size[i]; j++) n += !isfinite(p[j]);
        if (n) { *count = n; return TENSOR_NAMES[i]; }
    }
    return NULL;
}

/* The message that stops a run on a NaN or an infinity: the step, the tensor (a parameter,
 * else a gradient) and the last checkpoint. */
static void nonfinite_message(char *buf, size_t cap, const Model *m, long it, double loss, const char *ckpt,
                              long ckpt_it) {
    size_t n = 0;
    const char *t = nonfinite_tensor(m, m->mem, &n);
    char what[128] = "", last[4300] = "no checkpoint was written yet";
    if (t) snprintf(what, sizeof what, "; %zu non-finite values in the parameters %s", n, t);
    else if ((t = nonfinite_tensor(m, m->gmem, &n)))
        snprintf(what, sizeof what, "; the parameters are finite, %zu values of the gradient of %s are not", n, t);
    if (ckpt_it > 0) snprintf(last, sizeof last, "the last good checkpoint is %s (iteration %ld)", ckpt, ckpt_it);
    snprintf(buf, cap, "iteration %ld: the loss is %g%s; %s; lower --lr or --rlambda", it, loss, what, last);
}
static void die_nonfinite(const Model *m, long it, double loss, const char *ckpt, long ckpt_it) {
    char msg[4600];
    nonfinite_message(msg, sizeof msg, m, it, loss, ckpt, ckpt_it);
    die("%s", msg);
}

/* The live status line on a terminal: step, speed, loss, best so far, time to go. */
static void progress_line(const Config *c, const TrainState *st, double rate) {
    long since = st->it % c->eval_every ? st->it % c->eval_every : c->eval_every;
    long to_eval = c->eval_every - since, to_end = c->iters - st->it;
    if (rate <= 0) return;
    printf("\r  iter %ld  %.0f it/s  loss %.4f  best recall@%d %.4f  next eval in %.0f s  limit in %.1f h\033[K",
           st->it, rate, st->loss_sum / since, c->topn, st->best_recall, to_eval / rate, to_end / rate / 3600);
    fflush(stdout);
}

/* The files of a run's --out folder. */
typedef struct { char model[4200], curves[4200], ckpt[4200]; } OutFiles;
static void out_files(OutFiles *o, const char *dir) {
    path_printf(o->model, sizeof o->model, "%s/model.bin", dir);
    path_printf(o->curves, sizeof o->curves, "%s/curves.svg", dir);
    path_printf(o->ckpt, sizeof o->ckpt, "%s/checkpoint.bin", dir);
}

/* REMI-SPEC f.5: validate at step st->it; keep the model if its Recall@topn is strictly the
 * best so far, else count a trial; print and log the line; redraw the curves. */
static void validate(const Config *c, const Model *m, Acts *a, const Split *valid, TrainState *st,
                     const OutFiles *out, double elapsed) {
    long it = st->it, steps = it % c->eval_every ? it % c->eval_every : c->eval_every;
    int cut = c->topn;
    Metrics mv;
    evaluate(&mv, &cut, 1, m, a, valid, eval_noise_key(c->mind_eval, c->seed, ++st->pass));
    int improved = mv.recall > st->best_recall;
    if (improved) {
        st->best_recall = mv.recall; st->best_iter = it; st->trials = 0;
        memcpy(st->best, m->mem, m->n_params * sizeof(float));
        model_save(m, st->best, c, out->model);
    } else st->trials++;
    double loss = st->loss_sum / steps;
    printf("iter %8ld  loss %.4f  valid recall@%d %.6f  ndcg %.6f  ndcg_ref %.6f  hitrate %.6f%s  %6.1f it/s  %7.1f s\n",
           it, loss, cut, mv.recall, mv.ndcg, mv.ndcg_ref, mv.hitrate, improved ? " *" : "  ", it / st->t_train, elapsed);
    fflush(stdout);
    char js[512];
    json_metrics(js, sizeof js, &mv);
    log_line(&st->log, "{\"iter\":%ld,\"loss\":%.6f,\"valid\":{%s},\"best_iter\":%ld,\"steps_per_s\":%.1f,"
             "\"elapsed\":%.1f}", it, loss, js, st->best_iter, it / st->t_train, elapsed);
    st->curve = xrealloc(st->curve, (size_t)(st->n_curve + 2) * sizeof *st->curve);
    st->curve[st->n_curve++] = (CurvePoint){ it, loss, mv.recall, mv.ndcg };
    write_curves(out->curves, st->curve, st->n_curve, cut);
    st->loss_sum = 0;
}

/* train --resume: the run's settings from its checkpoint, whose stream is left at the
 * state; the run's split files must be found from here as they were given. */
static Stream resume_settings(Config *c, const OutFiles *out) {
    struct stat st;
    if (stat(c->out, &st) == 0 && !S_ISDIR(st.st_mode))
        die("--resume %s: not a folder; give the --out folder of the run to continue", c->out);
    Stream ck = ckpt_open(out->ckpt, c);
    char train_path[8300]; /* a relative --data is read from the current folder */
    path_printf(train_path, sizeof train_path, "%s/%s_train.txt", c->data, c->name);
    if (access(train_path, F_OK) != 0)
        die("the run's data %s (as given when it started) is not found from here; %s", train_path,
            c->data[0] == '/' ? "put the run's data back in that folder"
                              : "run the --resume from the folder the run started in, or put the file back there");
    return ck;
}

/* The run's first line: data, sizes, model and settings. */
static void print_train_header(const Config *c, const Model *m, const Dataset *ds) {
    char hyper[256]; /* Pop counts the batches' targets: only B matters to it */
    int lazy = strcmp(c->adam, "dense") && m->enc != ENC_POP; /* shown when not the default */
    if (m->enc == ENC_POP) snprintf(hyper, sizeof hyper, "B %d", c->B);
    else snprintf(hyper, sizeof hyper, "D %d K %d L %d B %d M %d lr %g  beta %g  lambda %g", m->D, m->K, c->L, c->B,
                  c->M, c->lr, c->rbeta, c->rlambda);
    printf("remi train: %s/%s  users %d/%d/%d  items %d  |  model %s%s  %s%s%s%s%s  seed %llu  threads %d\n", c->data,
           c->name, ds->train.n_users, ds->valid.n_users, ds->test.n_users, ds->N - 1, c->model, m->relu ? "+relu" : "",
           hyper, c->hits ? "  remove-hits " : "", c->hits ? c->remove_hits : "", lazy ? "  adam " : "",
           lazy ? c->adam : "", (unsigned long long)c->seed, c->threads);
    fflush(stdout); /* a log shows the run has started (and holds its --out) */
}

/* A new run replaces the folder's previous one whole: its checkpoint, model and curves go
 * before the new metrics.jsonl starts with the settings, so that no file of it is taken for
 * the new run's. */
static void start_run(const Config *c, const Model *m, const Dataset *ds, TrainState *st, const OutFiles *out) {
    const char *old_run[3] = { out->ckpt, out->model, out->curves };
    for (int i = 0; i < 3; i++)
        if (unlink(old_run[i]) != 0 && errno != ENOENT) die("cannot remove %s: %s", old_run[i], strerror(errno));
    memcpy(st->best, m->mem, m->n_params * sizeof(float));
    for (int u = 0; u < ds->train.n_users; u++) st->perm[u] = u;
    char jdata[6 * 4096 + 1], jname[6 * 4096 + 1]; /* the longest paths and names the flags take, escaped */
    json_escape(jdata, sizeof jdata, c->data);
    json_escape(jname, sizeof jname, c->name);
    log_line(&st->log, "{\"config\":{\"data\":\"%s\",\"name\":\"%s\",\"model\":\"%s\",\"D\":%d,\"K\":%d,\"L\":%d,"
             "\"B\":%d,\"M\":%d,\"lr\":%g,\"rbeta\":%g,\"rlambda\":%g,\"relu\":%d,\"dropout\":%g,"
             "\"mind_eval\":\"%s\",\"adam\":\"%s\",\"remove_hits\":\"%s\",\"seed\":%llu,\"N\":%d,\"train_users\":%d,"
             "\"iters\":%ld,\"eval_every\":%d,\"patience\":%d,\"topn\":%d}}",
             jdata, jname, c->model, m->D, m->K, c->L, c->B, c->full_softmax ? 0 : c->M, c->lr, c->rbeta, c->rlambda,
             m->relu, c->dropout, c->mind_eval, c->adam, c->remove_hits, (unsigned long long)c->seed, ds->N,
             ds->train.n_users, c->iters, c->eval_every, c->patience, c->topn);
}

/* Steps until --iters or early stop (returns -1), validating every --eval-every steps and
 * checkpointing after each validation; on a signal or at --stop-after, checkpoints and
 * returns the exit status. t0: the clock's reading at the run's step 0. */
static int train_loop(const Config *c, Model *m, Acts *a, const Dataset *ds, TrainState *st, const OutFiles *out,
                      long stop_after, double t0) {
    int tty = isatty(fileno(stdout));
    double t_mark = now_sec(), t_shown = now_sec();
    long it_mark = st->it, ckpt_it = st->it; /* a new run has no checkpoint: ckpt_it 0 */
    while (st->it < c->iters && st->trials <= c->patience) {
        long it = ++st->it;
        float loss = train_step(m, a, &ds->train, c, &st->rng, st->perm);
        if (!isfinite(loss)) die_nonfinite(m, it, loss, out->ckpt, ckpt_it);
        st->loss_sum += loss;
        int eval_now = it % c->eval_every == 0 || it == c->iters;
        if (!eval_now && !stop_signal && it != stop_after) {
            if (tty && (it & 15) == 0 && now_sec() - t_shown > 0.25) {
                t_shown = now_sec();
                progress_line(c, st, (it - it_mark) / (t_shown - t_mark));
            }
            continue;
        }
        st->t_train += now_sec() - t_mark;
        if (eval_now) {
            if (tty) printf("\r\033[K");
            validate(c, m, a, &ds->valid, st, out, now_sec() - t0);
            size_t bad;
            if (nonfinite_tensor(m, m->mem, &bad)) die_nonfinite(m, it, NAN, out->ckpt, ckpt_it);
        }
        st->elapsed = now_sec() - t0;
        ckpt_write(out->ckpt, c, m, st, ds->train.n_users, c->data_fp);
        ckpt_it = it;
        if (st->trials > c->patience) printf("early stop: %d evaluations without improvement\n", st->trials);
        if (stop_signal || it == stop_after) {
            if (tty) printf("\r\033[K");
            char word[4 * 4200];
            printf("%s after iteration %ld: wrote %s; continue with `remi train --resume %s`\n",
                   stop_signal == SIGINT ? "interrupted (SIGINT)" : stop_signal == SIGTERM ? "terminated (SIGTERM)"
                                                                                       : "stopped (--stop-after)",
                   it, out->ckpt, shell_word(word, sizeof word, c->out));
            return stop_signal ? 128 + stop_signal : 0;
        }
        t_mark = now_sec();
        it_mark = it;
    }
    return -1;
}

/* The end of a run: the best model (else the last parameters) evaluated on validation at
 * --topn and on test at 20 and 50, printed and logged. A resumed run's folder may hold the
 * checkpoint alone: it gets the files a run ends with. */
static void final_report(const Config *c, Model *m, Acts *a, const Dataset *ds, TrainState *st, const OutFiles *out,
                         int resumed, double t0) {
    if (st->best_iter == 0) {
        printf("no validation improvement over recall 0: reporting the last parameters\n");
        memcpy(st->best, m->mem, m->n_params * sizeof(float));
    }
    if (st->best_iter == 0 || resumed) model_save(m, st->best, c, out->model);
    if (resumed && st->n_curve) write_curves(out->curves, st->curve, st->n_curve, c->topn);
    memcpy(m->mem, st->best, m->n_params * sizeof(float));
    Metrics mv, mt[2];
    int cut = c->topn, cuts[2] = { 20, 50 };
    long pass = st->pass; /* the final evaluations do not change the checkpointed state */
    evaluate(&mv, &cut, 1, m, a, &ds->valid, eval_noise_key(c->mind_eval, c->seed, ++pass));
    evaluate(mt, cuts, 2, m, a, &ds->test, eval_noise_key(c->mind_eval, c->seed, ++pass));
    if (st->best_iter) printf("\nbest model: iter %ld of %ld (%.1f s)\n", st->best_iter, st->it, now_sec() - t0);
    else printf("\nmodel: the last parameters, iter %ld (%.1f s)\n", st->it, now_sec() - t0);
    print_metrics_row("valid", &mv);
    if (c->enc == ENC_MIND && strcmp(c->mind_eval, "fixed") && st->best_iter && fflush(stdout) == 0)
        fprintf(stderr, "remi: note: MIND with --mind-eval fresh draws new routing logits at every evaluation pass, so "
                "the valid line above differs from the validation at iter %ld that chose the model (--mind-eval fixed "
                "keeps them equal)\n", st->best_iter);
    print_metrics_row("test", &mt[0]);
    print_metrics_row("test", &mt[1]);
    char js[512];
    json_metrics(js, sizeof js, &mv);
    log_line(&st->log, "{\"final\":\"valid\",\"best_iter\":%ld,%s}", st->best_iter, js);
    for (int i = 0; i < 2; i++) {
        json_metrics(js, sizeof js, &mt[i]);
        log_line(&st->log, "{\"final\":\"test\",\"best_iter\":%ld,%s}", st->best_iter, js);
    }
    printf("wrote %s, %s and %s\n", st->log.path, out->model, out->curves);
}

/* A note for each cut-off N that reaches the catalogue's items (N = 20 and 50 for train's
 * final test lines): a list then holds (almost) every item, and recall and hit rate are 1 or
 * nearly so whatever the model. */
static int cut_covers(int cut, int items) { return cut >= items; }
static void note_cuts_cover(const int *cuts, int n_cut, int items, const char *data, const char *name) {
    for (int i = 0; i < n_cut; i++)
        if (cut_covers(cuts[i], items))
            fprintf(stderr, "remi: note: %s/%s has %d items: at N = %d a list holds (almost) every item, and recall and "
                    "hit rate there cannot tell models apart\n", data, name, items, cuts[i]);
}

int cmd_train(int argc, char **argv) {
    Config c = default_config();
    const char *resume = NULL;
    long stop_after = 0;
    Flag flags[] = { MODEL_FLAGS(c), STEP_FLAGS(c), LOOP_FLAGS(c),
                     { "--resume", F_STR, &resume, "continue the run whose --out folder this is, from its checkpoint" },
                     { "--stop-after", F_LONG, &stop_after, "stop after this step as an interrupt would (checkpoint and exit)" } };
    parse_flags(argc, argv, "train", TRAIN_WHAT, flags, sizeof flags / sizeof *flags);
    if (resume) { /* the settings come from the checkpoint; only -t and --stop-after may be given */
        for (int i = 0; i < n_flags_given; i++) {
            const void *dst = flags_given[i]->dst;
            if (dst != &resume && dst != &c.threads && dst != &stop_after)
                die("train --resume takes the run's settings from its checkpoint; %s cannot be changed", flags_given[i]->name);
        }
        c.out = resume;
    }
    OutFiles out;
    out_files(&out, c.out);
    check_out_writable(c.out);
    Stream ck = resume ? resume_settings(&c, &out) : (Stream){ 0 };
    check_config(&c);
    note_threads(c.threads);
    check_range("--eval-batch", c.eval_batch, 1, 1 << 16);
    check_range("--stop-after", (double)stop_after, 0, 1e12);
    if (stop_after > c.iters)
        fprintf(stderr, "remi: note: --stop-after %ld has no effect: the run ends at --iters %ld\n", stop_after, c.iters);
    pool_start(c.threads);

    Dataset ds;
    load_dataset(&ds, c.data, c.name);
    check_batch_users(&ds.train, c.B, c.data, c.name);
    int U = ds.train.n_users;
    c.data_fp = data_sum(&ds); /* the splits' fingerprint: a resume checks it, model.bin keeps it for eval & co. */
    if (ds.N - 1 < 2) /* no --topn (at least 1) lies below the number of items */
        die("%s/%s has %d item: a model that ranks items needs 2 or more (a lower prep --min, or more data)", c.data,
            c.name, ds.N - 1);
    if (cut_covers(c.topn, ds.N - 1)) /* every validation list would hold (almost) every item: recall 1, no best model */
        die("--topn %d: %s/%s has %d items, and validation at that cut-off cannot tell models apart; give a --topn "
            "below %d", c.topn, c.data, c.name, ds.N - 1, ds.N - 1);
    note_cuts_cover((int[]){ 20, 50 }, 2, ds.N - 1, c.data, c.name);
    resolve_negatives(&c, ds.N);
    check_train_fits(ds.N, &c, 1);
    Model m;
    model_init(&m, ds.N, &c);
    Acts a;
    acts_init(&a, &m, train_rows(&c), c.M);
    TrainState st = { .rng = c.seed };
    st.perm = xmalloc(U * sizeof(int));
    st.best = xmalloc(m.n_params * sizeof(float));
    st.curve = xmalloc(sizeof *st.curve);
    mkdir_p(c.out);
    lock_out_dir(c.out);
    remove_stale_temps(c.out);
    snprintf(st.log.path, sizeof st.log.path, "%s/metrics.jsonl", c.out);

    print_train_header(&c, &m, &ds);
    if (resume) {
        char where[4400];
        snprintf(where, sizeof where, "%s/%s", c.data, c.name);
        ckpt_read_state(&ck, &m, &st, U, c.data_fp, where);
        if (stop_after > 0 && stop_after <= st.it)
            die("--stop-after %ld: %s is at step %ld already; give a later step", stop_after, out.ckpt, st.it);
        printf("resumed from %s at iteration %ld\n", out.ckpt, st.it);
        if (st.it >= c.iters || st.trials > c.patience)
            printf("the run had finished training (%s): its final evaluation follows\n",
                   st.it >= c.iters ? "its last step" : "early stop");
    } else start_run(&c, &m, &ds, &st, &out);
    signal(SIGINT, on_stop_signal);
    signal(SIGTERM, on_stop_signal);
    double t0 = now_sec() - st.elapsed;
    int status = train_loop(&c, &m, &a, &ds, &st, &out, stop_after, t0);
    if (status >= 0) return status;
    final_signals(c.out);
    final_report(&c, &m, &a, &ds, &st, &out, resume != NULL, t0);
    return 0;
}

/* ======================================================================== eval */
int cmd_eval(int argc, char **argv) {
    Config c = default_config();
    const char *model_file = "out/model.bin", *split = "test";
    int topn = 0;
    Flag flags[] = {
        { "--model-file", F_STR, &model_file, "model written by remi train" },
        { "--data", F_STR, &c.data, "folder holding NAME_{train,valid,test}.txt" },
        { "--name", F_STR, &c.name, "dataset name (file prefix)" },
        { "--split", F_STR, &split, "valid or test" },
        { "--topn", F_INT, &topn, "one cut-off N (0 = both 20 and 50)" },
        { "--mind-eval", F_STR, &c.mind_eval, "MIND's routing logits: fresh (new draws, seeded) or fixed (the draws train used with --mind-eval fixed; the default for a model trained so)" },
        { "-t", F_INT, &c.threads, "threads (results do not depend on it)" },
    };
    parse_flags(argc, argv, "eval", "Evaluate a saved model on the valid or test users.", flags, sizeof flags / sizeof *flags);
    if (strcmp(split, "valid") && strcmp(split, "test")) die("--split must be valid or test, got '%s'", split);
    check_mind_eval(c.mind_eval);
    check_range("--topn", topn, 0, EVAL_MAX_TOPN);
    check_range("-t", c.threads, 1, 256);
    note_threads(c.threads);
    pool_start(c.threads);
    Model m;
    Dataset ds;
    load_model_data(&m, &ds, &c, model_file);
    Acts a;
    acts_init(&a, &m, c.eval_batch, 1);
    int cuts[2] = { 20, 50 }, n_cut = 2;
    if (topn) { cuts[0] = topn; n_cut = 1; }
    note_cuts_cover(cuts, n_cut, ds.N - 1, c.data, c.name);
    Metrics mt[2];
    evaluate(mt, cuts, n_cut, &m, &a, strcmp(split, "test") ? &ds.valid : &ds.test, eval_noise_key(c.mind_eval, c.seed, 1));
    for (int i = 0; i < n_cut; i++) print_metrics_row(split, &mt[i]);
    return 0;
}

/* ======================================================================== recommend, export
 * A saved model put to use: the top-N items for a history given on the command line, and
 * the item embeddings and user interest vectors as TSV for other tools. */

/* NAME_item_map.txt ("raw id,item" per line, as prep writes it): raw[item] = raw id, or
 * NULL for every item when no folder is given or (unless required) the file does not exist. */
static char **load_item_names(const char *dir, const char *name, int N, int required) {
    char path[4200];
    path_printf(path, sizeof path, "%s/%s_item_map.txt", dir ? dir : "", name);
    char **raw = xcalloc((size_t)N, sizeof *raw);
    if (dir && read_item_map(path, raw, N) < 0 && required)
        die("no item map %s: --data names the folder of remi prep's files, to show raw item ids "
            "(without --data the items are shown by number)", path);
    return raw;
}

/* Integers separated by blanks or commas (a CR too: a history pasted from a CRLF file), each
 * in lo..hi (`what` names them in errors); returns how many. */
static int parse_int_list(int **out, const char *text, long lo, long hi, const char *flag, const char *what) {
    int n = 0, cap = 16, *x = xmalloc(cap * sizeof(int));
    for (const char *p = text; *p;) {
        if (strchr(" ,\t\r\n", *p)) { p++; continue; }
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < lo || v > hi || (*end && !strchr(" ,\t\r\n", *end))) {
            int len = (int)strcspn(p, " ,\t\r\n"); /* a long token shown by its start */
            die("%s: \"%.*s%s\" is not %s in %ld..%ld", flag, len > 40 ? 40 : len, p, len > 40 ? "..." : "", what, lo, hi);
        }
        if (n == cap) x = xrealloc(x, (cap *= 2) * sizeof(int));
        x[n++] = (int)v;
        p = end;
    }
    *out = x;
    return n;
}

int cmd_recommend(int argc, char **argv) {
    Config c = default_config();
    const char *model_file = "out/model.bin", *history = NULL;
    int topn = 20, exclude = 0;
    Flag flags[] = {
        { "--model-file", F_STR, &model_file, "model written by remi train" },
        { "--history", F_STR, &history, "the user's items, oldest first, e.g. \"12 7 403\" (required)" },
        { "--topn", F_INT, &topn, "how many items to recommend" },
        { "--data", F_STR, &c.data, "folder of NAME_item_map.txt, to show raw item ids (optional)" },
        { "--name", F_STR, &c.name, "dataset name (file prefix)" },
        { "--mind-eval", F_STR, &c.mind_eval, "MIND's routing logits: fixed (the draws of train --mind-eval fixed) or fresh" },
        { "--exclude-history", F_BOOL, &exclude, "leave the history's items out of the list (evaluation keeps them, as the reference)" },
    };
    c.mind_eval = "fixed";
    c.data = NULL;
    parse_flags(argc, argv, "recommend", "The top-N items for a history, with the interest that retrieved each.",
                flags, sizeof flags / sizeof *flags);
    if (!history) die("recommend: --history \"ITEM ITEM ...\" is required; see remi recommend --help");
    check_mind_eval(c.mind_eval);
    Model m;
    model_load(&m, &c, model_file);
    check_range("--topn", topn, 1, m.N - 1);
    int *h, n = parse_int_list(&h, history, 1, m.N - 1, "--history", "an item id"), K = m.K, D = m.D, N = m.N;
    if (n == 0) die("--history: give at least one item id, e.g. --history \"12 7 403\"");
    unsigned char *skip = xcalloc((size_t)N, 1); /* with --exclude-history, the history's items */
    int n_skip = 0;
    for (int i = 0; i < n && exclude; i++) n_skip += !skip[h[i]]++;
    if (topn > N - 1 - n_skip) die("--topn %d: only %d items are not in the history", topn, N - 1 - n_skip);
    if (!c.data && flag_given(&c.name)) fprintf(stderr, "remi: note: --name has no effect without --data\n");
    char **raw = load_item_names(c.data, c.name, N, 1);
    pool_start(1);
    Acts a;
    acts_init(&a, &m, 1, 1);
    fill_history(a.hist, a.mask, h, n, m.L);
    user_vectors(&m, &a, 0, 1, eval_noise_key(c.mind_eval, c.seed, 1));
    Scored *lists = xmalloc((size_t)K * topn * sizeof(Scored));
    uint64_t *hk = xmalloc((size_t)topn * sizeof(uint64_t));
    for (int k = 0; k < K; k++) { /* each interest's exact top-N of the items (not the padding id 0), best first */
        int hn = 0;
        for (int j = 1; j < N; j++)
            if (!skip[j]) heap_push(hk, &hn, topn, scored_key(dotf(a.v + (size_t)k * D, m.p.item_emb + (size_t)j * D, D), j));
        heap_finish(lists + (size_t)k * topn, hk, hn);
    }
    free(hk);
    int *R = xmalloc(topn * sizeof(int)), nr = merge_interests(R, lists, K, topn, topn, m.multi);
    if (m.enc == ENC_POP)
        printf("pop model: the most frequent training targets (%s)\n",
               exclude ? "the history only leaves its items out" : "a history changes nothing");
    else printf("%s model, history of %d item(s) (the last %d used)\n", ENC_NAMES[m.enc], n, n < m.L ? n : m.L);
    printf("rank\titem\traw\tscore\tinterest\n");
    for (int r = 0; r < nr; r++) { /* the interest whose list scored the item highest */
        int best_k = 0;
        float best_s = -INFINITY;
        for (int k = 0; k < K; k++)
            for (int i = 0; i < topn; i++)
                if (lists[k * topn + i].id == R[r] && lists[k * topn + i].s > best_s) { best_s = lists[k * topn + i].s; best_k = k; }
        printf("%d\t%d\t%s\t%.6f\t%d\n", r + 1, R[r], raw[R[r]] ? raw[R[r]] : "-", best_s, best_k);
    }
    return 0;
}

int cmd_export(int argc, char **argv) {
    Config c = default_config();
    const char *model_file = "out/model.bin", *out = "out";
    Flag flags[] = {
        { "--model-file", F_STR, &model_file, "model written by remi train" },
        { "--data", F_STR, &c.data, "folder holding NAME_{train,valid,test}.txt" },
        { "--name", F_STR, &c.name, "dataset name (file prefix)" },
        { "--out", F_STR, &out, "folder for items.tsv and users.tsv" },
        { "--mind-eval", F_STR, &c.mind_eval, "MIND's routing logits: fixed or fresh" },
        { "-t", F_INT, &c.threads, "threads (results do not depend on it)" },
    };
    c.mind_eval = "fixed";
    parse_flags(argc, argv, "export",
                "Write OUT/items.tsv (item, raw id, embedding) and OUT/users.tsv (split, user, interest,\n"
                "vector): train users from their whole history, valid/test users from the history\n"
                "their evaluation uses (the first 80%), each the last L items (the model's --len).",
                flags, sizeof flags / sizeof *flags);
    check_mind_eval(c.mind_eval);
    check_range("-t", c.threads, 1, 256);
    note_threads(c.threads);
    check_out_writable(out);
    pool_start(c.threads);
    Model m;
    Dataset ds;
    load_model_data(&m, &ds, &c, model_file);
    char **raw = load_item_names(c.data, c.name, m.N, 0);
    mkdir_p(out);
    char path[4200];
    path_printf(path, sizeof path, "%s/items.tsv", out);
    FILE *f = atomic_open(path);
    fprintf(f, "item\traw");
    for (int d = 0; d < m.D; d++) fprintf(f, "\te%d", d);
    for (int j = 0; j < m.N; j++) {
        fprintf(f, "\n%d\t%s", j, raw[j] ? raw[j] : "-");
        for (int d = 0; d < m.D; d++) fprintf(f, "\t%.9g", m.p.item_emb[(size_t)j * m.D + d]);
    }
    fputc('\n', f);
    path_printf(path, sizeof path, "%s/users.tsv", out);
    FILE *files[2] = { f, NULL };
    f = files[1] = atomic_open(path);
    fprintf(f, "split\tuser\tinterest");
    for (int d = 0; d < m.D; d++) fprintf(f, "\tv%d", d);
    fputc('\n', f);
    Acts a;
    acts_init(&a, &m, c.eval_batch, 1);
    const Split *sp[3] = { &ds.train, &ds.valid, &ds.test };
    const char *names[3] = { "train", "valid", "test" };
    for (int s = 0; s < 3; s++)
        for (int u0 = 0; u0 < sp[s]->n_users; u0 += c.eval_batch) {
            int nb = sp[s]->n_users - u0 < c.eval_batch ? sp[s]->n_users - u0 : c.eval_batch;
            for (int b = 0; b < nb; b++) {
                const int *seq = sp[s]->items + sp[s]->off[u0 + b];
                int n = sp[s]->off[u0 + b + 1] - sp[s]->off[u0 + b];
                fill_history(a.hist + b * m.L, a.mask + b * m.L, seq, s == 0 ? n : eval_split_point(n), m.L);
            }
            user_vectors(&m, &a, u0, nb, eval_noise_key(c.mind_eval, c.seed, 1));
            for (int b = 0; b < nb; b++)
                for (int k = 0; k < m.K; k++) {
                    fprintf(f, "%s\t%lld\t%d", names[s], (long long)sp[s]->user_id[u0 + b], k);
                    for (int d = 0; d < m.D; d++) fprintf(f, "\t%.9g", a.v[((size_t)b * m.K + k) * m.D + d]);
                    fputc('\n', f);
                }
        }
    atomic_commit_all(files, 2); /* the pair, or neither: the folder never mixes two models' files */
    printf("wrote %s/items.tsv (%d items) and %s/users.tsv (%d users x %d vectors)\n", out, m.N, out,
           ds.train.n_users + ds.valid.n_users + ds.test.n_users, m.K);
    return 0;
}

/* ======================================================================== inspect
 * The routing collapse the paper's RR addresses: for a multi-interest model, the K x L
 * routing matrix of each user (SA's attention A, or the last routing iteration's c for DR
 * and MIND) over the history its evaluation uses. Statistics over every user with at least
 * two history items, and an SVG heatmap of chosen users. */
typedef struct { double users, interests, collapsed, max_w, entropy; } RouteStats;

/* Adds user b's K rows of a->att (only the n real positions carry weight). */
static void route_stats_add(RouteStats *rs, const float *att, int K, int L, int n) {
    rs->users++;
    for (int k = 0; k < K; k++) {
        const float *a = att + (size_t)k * L;
        float mx = 0.0f;
        double h = 0, sum = 0;
        for (int l = 0; l < n; l++) sum += a[l];
        for (int l = 0; l < n; l++) {
            double p = a[l] / (sum > 0 ? sum : 1);
            mx = a[l] > mx ? a[l] : mx;
            if (p > 0) h -= p * log(p);
        }
        rs->interests++;
        rs->collapsed += mx / (sum > 0 ? sum : 1) > 0.9;
        rs->max_w += mx / (sum > 0 ? sum : 1);
        rs->entropy += h / log((double)n);
    }
}

/* Heatmap rows: one block of K rows x n columns per user, darker = more weight. */
static void route_svg(FILE *f, int row0, const float *att, const int *hist, int K, int L, int n, long user, int row) {
    const int cw = 26, ch = 18, x0 = 90;
    int y0 = row0;
    fprintf(f, "<text x=\"4\" y=\"%d\" font-weight=\"bold\">user %ld (row %d)</text>\n", y0 - 4, user, row);
    for (int l = 0; l < n; l++)
        fprintf(f, "<text x=\"%d\" y=\"%d\" font-size=\"9\" text-anchor=\"middle\">%d</text>\n", x0 + l * cw + cw / 2,
                y0 - 4, hist[l]);
    for (int k = 0; k < K; k++) {
        fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">interest %d</text>\n", x0 - 6, y0 + k * ch + 13, k);
        for (int l = 0; l < n; l++) {
            float w = att[(size_t)k * L + l];
            int shade = (int)lrintf(255.0f * (1.0f - (w < 0 ? 0 : w > 1 ? 1 : w)));
            fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"rgb(%d,%d,255)\" stroke=\"white\">"
                       "<title>%.3f</title></rect>\n", x0 + l * cw, y0 + k * ch, cw, ch, shade, shade, w);
        }
    }
}

/* User u's routing matrix into a->att (K, L): its history's positions, at most L, returned. */
static int route_user(const Model *m, Acts *a, const Split *s, int u, uint64_t key) {
    int n = make_eval_row(a->hist, a->mask, s, u, m->L);
    user_vectors(m, a, u, 1, key);
    return n < m->L ? n : m->L;
}

/* The users to draw: the rows --users lists, else the first 4 with 8 or more items. */
static int inspect_pick(int **draw, const Split *s, const char *users) {
    int n_draw = 0;
    if (users) {
        n_draw = parse_int_list(draw, users, 0, s->n_users - 1, "--users", "a user row");
        if (n_draw == 0) die("--users: give at least one user row, e.g. --users \"0 7\"");
        return n_draw;
    }
    *draw = xmalloc(4 * sizeof(int));
    for (int u = 0; u < s->n_users && n_draw < 4; u++)
        if (eval_split_point(s->off[u + 1] - s->off[u]) >= 8) (*draw)[n_draw++] = u;
    return n_draw;
}

/* The collapse statistics over every user of s with 2 or more history items, printed. */
static void inspect_stats(const Model *m, Acts *a, const Split *s, const char *split, uint64_t key) {
    RouteStats rs = { 0 };
    for (int u = 0; u < s->n_users; u++) {
        int n = route_user(m, a, s, u, key);
        if (n >= 2) route_stats_add(&rs, a->att, m->K, m->L, n);
    }
    printf("%s model, %s users with 2+ history items: %.0f users, %.0f interests\n", ENC_NAMES[m->enc], split,
           rs.users, rs.interests);
    if (rs.interests > 0) {
        printf("collapsed interests (largest weight > 0.9): %.1f%%\n", 100.0 * rs.collapsed / rs.interests);
        printf("mean largest weight: %.3f   mean entropy / log n: %.3f\n", rs.max_w / rs.interests, rs.entropy / rs.interests);
    } else printf("no collapse statistics: no user's history (at most --len %d items) holds 2 or more items\n", m->L);
}

/* The drawn users' routing matrices: printed, and as heatmaps in OUT/routing.svg. */
static void inspect_figure(const Model *m, Acts *a, const Split *s, const int *draw, int n_draw, uint64_t key,
                           const char *out) {
    int K = m->K, L = m->L;
    mkdir_p(out);
    char path[4200];
    path_printf(path, sizeof path, "%s/routing.svg", out);
    FILE *f = atomic_open(path);
    int height = 30;
    for (int i = 0; i < n_draw; i++) height += K * 18 + 40;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
               "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", 100 + 26 * L, height);
    int y = 40;
    for (int i = 0; i < n_draw; i++) {
        int n = route_user(m, a, s, draw[i], key);
        route_svg(f, y, a->att, a->hist, K, L, n, (long)s->user_id[draw[i]], draw[i]);
        y += K * 18 + 40;
        printf("user %lld (row %d), history:", (long long)s->user_id[draw[i]], draw[i]);
        for (int l = 0; l < n; l++) printf(" %5d", a->hist[l]);
        for (int k = 0; k < K; k++) {
            printf("\n  interest %d:   ", k);
            for (int l = 0; l < n; l++) printf(" %5.2f", a->att[(size_t)k * L + l]);
        }
        printf("\n");
    }
    fprintf(f, "</svg>\n");
    atomic_commit(f);
    printf("wrote %s (%d users)\n", path, n_draw);
}

int cmd_inspect(int argc, char **argv) {
    Config c = default_config();
    const char *model_file = "out/model.bin", *split = "test", *users = NULL, *out = "out";
    Flag flags[] = {
        { "--model-file", F_STR, &model_file, "model written by remi train (sa, dr or mind)" },
        { "--data", F_STR, &c.data, "folder holding NAME_{train,valid,test}.txt" },
        { "--name", F_STR, &c.name, "dataset name (file prefix)" },
        { "--split", F_STR, &split, "valid or test" },
        { "--users", F_STR, &users, "rows of the split to draw (printed as \"(row R)\" beside the user id), "
                                    "e.g. \"0 7 12\" (default: the first 4 with 8+ items)" },
        { "--out", F_STR, &out, "folder for routing.svg" },
        { "--mind-eval", F_STR, &c.mind_eval, "MIND's routing logits: fixed or fresh" },
    };
    c.mind_eval = "fixed";
    parse_flags(argc, argv, "inspect",
                "Routing collapse: statistics of every user's K x L routing matrix (the share of interests\n"
                "whose largest weight exceeds 0.9, the mean largest weight, the mean entropy normalised by\n"
                "log n) and OUT/routing.svg, a heatmap of chosen users.", flags, sizeof flags / sizeof *flags);
    if (strcmp(split, "valid") && strcmp(split, "test")) die("--split must be valid or test, got '%s'", split);
    check_mind_eval(c.mind_eval);
    check_out_writable(out);
    Model m;
    Dataset ds;
    load_model_data(&m, &ds, &c, model_file);
    if (!m.multi) die("inspect: --model %s has no routing matrix (it needs sa, dr or mind)", ENC_NAMES[m.enc]);
    const Split *s = strcmp(split, "test") ? &ds.valid : &ds.test;
    int *draw, n_draw = inspect_pick(&draw, s, users);
    pool_start(1);
    Acts a;
    acts_init(&a, &m, 1, 1);
    uint64_t key = eval_noise_key(c.mind_eval, c.seed, 1);
    inspect_stats(&m, &a, s, split, key);
    inspect_figure(&m, &a, s, draw, n_draw, key, out);
    return 0;
}

/* ======================================================================== report
 * Tables and the negatives figure from finished runs: each run folder's metrics.jsonl
 * gives its settings and final metrics; runs that differ only in the seed (and the data
 * folder's path) are one row, with the mean and standard deviation over the seeds. */
/* The settings besides those the table shows, as the config line writes them; the default
 * stands for a file that predates the field ("?": never written). */
static const struct { const char *key, *dflt; } RUN_MORE[] = {
    { "D", "?" }, { "K", "?" }, { "L", "?" }, { "B", "?" }, { "lr", "?" }, { "dropout", "0.2" },
    { "mind_eval", "fresh" }, { "N", "?" }, { "train_users", "?" }, { "iters", "?" }, { "eval_every", "?" },
    { "patience", "?" }, { "topn", "?" } };
#define N_RUN_MORE (int)(sizeof RUN_MORE / sizeof *RUN_MORE)
typedef struct {
    char name[4096], model[32], adam[16], hits[16]; /* adam, hits: "dense", "none" when the file predates them */
    double rbeta, rlambda, M, relu, seed, v[8]; /* v: test @20 recall ndcg ndcg_ref hitrate, then @50 */
    double best_iter, last_iter;                /* the best model's step, the last validation's */
    char more[N_RUN_MORE][32];                  /* RUN_MORE's values */
    const char *dir;
} RunResult;

/* The value after "key": in a metrics.jsonl line (a number, or a string copied to str). */
static int json_field(const char *line, const char *key, double *num, char *str, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    if (!p) return 0;
    p += strlen(pat);
    if (*p == '"') { /* decoded as JSON (prep_json_string), the inverse of json_escape: a name may hold a quote */
        if (!str) return 0; /* a string where a number belongs ("iter":"") */
        size_t rest = strlen(p), len;
        char *buf = xmalloc(rest + 1), *s;
        memcpy(buf, p, rest + 1);
        PrepJson j = { buf, buf + rest, NULL };
        int lone, ok = prep_json_string(&j, &s, &len, &lone) && len < cap && !memchr(s, 0, len);
        if (ok) { memcpy(str, s, len); str[len] = 0; }
        free(buf);
        return ok;
    }
    char *end;
    double x = strtod(p, &end);
    if (end == p || !num) return 0;
    *num = x;
    return 1;
}

static int prefix(const char *s, const char *p) { return !strncmp(s, p, strlen(p)); }

/* A final test line's numbers: recall, NDCG and hit rate in [0, 1], best_iter a step. */
static int final_values_ok(const double *v, double best_iter) {
    int ok = isfinite(best_iter) && best_iter >= 0 && best_iter == floor(best_iter);
    for (int i = 0; i < 4; i++) ok &= v[i] >= 0 && v[i] <= 1; /* false for NaN */
    return ok;
}

/* Reads DIR/metrics.jsonl, as train writes it: a config line, a line per validation, then
 * the final lines (valid, test @20, test @50). Returns 0 for a run that has not finished.
 * Any other line, a second config line, a final test line at another cut-off or with a value
 * out of range is an error naming the file and the line. */
static int read_run(RunResult *r, const char *dir) {
    static const int final_topn[2] = { 20, 50 };
    char path[4200];
    path_printf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = xfopen(path, "rb", "each argument must be the --out folder of a remi train run");
    char *line = NULL;
    size_t cap = 0;
    int lineno = 0, got_config = 0, finals = 0;
    memset(r, 0, sizeof *r);
    while (getline(&line, &cap, f) != -1) {
        lineno++;
        size_t n = strcspn(line, "\r\n"); /* every line is one object: a line without its '}' was cut */
        if (n && line[0] == '{' && line[n - 1] != '}')
            die("%s:%d: a line cut short (no closing '}'): \"%s\"", path, lineno, excerpt(line));
        if (prefix(line, "{\"config\":")) {
            if (got_config) die("%s:%d: a second config line; one run's metrics per file", path, lineno);
            got_config = json_field(line, "name", NULL, r->name, sizeof r->name) &&
                         json_field(line, "model", NULL, r->model, sizeof r->model) &&
                         json_field(line, "rbeta", &r->rbeta, NULL, 0) && json_field(line, "rlambda", &r->rlambda, NULL, 0) &&
                         json_field(line, "M", &r->M, NULL, 0) && json_field(line, "seed", &r->seed, NULL, 0);
            json_field(line, "relu", &r->relu, NULL, 0);
            if (!json_field(line, "adam", NULL, r->adam, sizeof r->adam)) strcpy(r->adam, "dense");
            if (!json_field(line, "remove_hits", NULL, r->hits, sizeof r->hits)) strcpy(r->hits, "none");
            if (!got_config) die("%s:%d: a config line without name, model, rbeta, rlambda, M or seed", path, lineno);
            if (!isfinite(r->rbeta) || !isfinite(r->rlambda) || !(r->M >= 0 && isfinite(r->M)) || !isfinite(r->relu) ||
                !(r->seed >= 0 && isfinite(r->seed)))
                die("%s:%d: a config line whose rbeta, rlambda, M, relu or seed is NaN or infinite, or M or seed "
                    "negative: \"%s\"", path, lineno, excerpt(line));
            for (int i = 0; i < N_RUN_MORE; i++) {
                double x = NAN;
                char *v = r->more[i];
                if (!json_field(line, RUN_MORE[i].key, &x, v, sizeof r->more[i])) snprintf(v, sizeof r->more[i], "%s", RUN_MORE[i].dflt);
                else if (!isnan(x)) snprintf(v, sizeof r->more[i], "%g", x);
            }
        } else if (!got_config) {
            die("%s:%d: expected the config line first, got \"%s\"; is it a remi metrics file?", path, lineno, excerpt(line));
        } else if (prefix(line, "{\"final\":\"test\",")) {
            double topn, *v = r->v + 4 * finals;
            if (finals == 2 || !json_field(line, "topn", &topn, NULL, 0) || !json_field(line, "best_iter", &r->best_iter, NULL, 0) ||
                !json_field(line, "recall", &v[0], NULL, 0) ||
                !json_field(line, "ndcg", &v[1], NULL, 0) || !json_field(line, "ndcg_ref", &v[2], NULL, 0) ||
                !json_field(line, "hitrate", &v[3], NULL, 0) || topn != final_topn[finals] || !final_values_ok(v, r->best_iter))
                die("%s:%d: unexpected final test line \"%s\" (train writes one at N = 20, then one at 50, with "
                    "values in [0, 1])", path, lineno, excerpt(line));
            finals++;
        } else if (prefix(line, "{\"iter\":")) {
            if (!json_field(line, "iter", &r->last_iter, NULL, 0) || !isfinite(r->last_iter) || r->last_iter < 1 ||
                r->last_iter != floor(r->last_iter))
                die("%s:%d: bad iter line \"%s\"", path, lineno, excerpt(line));
        } else if (!prefix(line, "{\"final\":\"valid\",")) {
            die("%s:%d: not a line remi train writes: \"%s\"", path, lineno, excerpt(line));
        }
    }
    free(line);
    fclose(f);
    if (!got_config) die("%s: no config line; is it a remi metrics file?", path);
    return finals == 2;
}

/* The same row of the table: the shown settings (shown_setting), and the others (RUN_MORE). */
static int shown_setting(const RunResult *a, const RunResult *b) {
    return !strcmp(a->name, b->name) && !strcmp(a->model, b->model) && a->rbeta == b->rbeta &&
           a->rlambda == b->rlambda && a->M == b->M && a->relu == b->relu && !strcmp(a->adam, b->adam) &&
           !strcmp(a->hits, b->hits);
}
static int same_setting(const RunResult *a, const RunResult *b) {
    int same = shown_setting(a, b);
    for (int i = 0; i < N_RUN_MORE && same; i++) same = !strcmp(a->more[i], b->more[i]);
    return same;
}

static int run_is_pop(const RunResult *r) { return !strcmp(r->model, "pop"); } /* counts: no negatives */

/* Text as SVG character data: &, < and > escaped (a dataset's name may hold them). */
static void svg_escaped(FILE *f, const char *s) {
    for (; *s; s++)
        if (*s == '&') fputs("&amp;", f);
        else if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else fputc(*s, f);
}

/* Two rows on one line of the negatives figure: every setting the same but M (both sampled,
 * or both full softmax). */
static int same_series(const RunResult *a, const RunResult *b) {
    RunResult t = *b;
    t.M = a->M;
    return (a->M > 0) == (b->M > 0) && same_setting(a, &t);
}

/* Recall@50 against the number of negatives, one line per setting but M (same_series); full
 * softmax (M = 0) as a dashed level; Pop, which draws no negatives, is left out. The legend
 * names each line's model and beta, its dataset and lambda where the rows differ in them,
 * lazy Adam and hit removal, and the table's other settings (D, K, lr, ...) where lines differ. */
static void negatives_svg(const char *path, const RunResult *rows, const double *mean, int n_rows) {
    static const char *colors[] = { "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b" };
    double lo = INFINITY, hi = -INFINITY, mmin = INFINITY, mmax = -INFINITY;
    for (int i = 0; i < n_rows; i++) { /* the scales of the rows drawn: Pop's neither */
        if (run_is_pop(&rows[i])) continue;
        double y = mean[i * 8 + 4];
        lo = y < lo ? y : lo; hi = y > hi ? y : hi;
        if (rows[i].M > 0) { mmin = rows[i].M < mmin ? rows[i].M : mmin; mmax = rows[i].M > mmax ? rows[i].M : mmax; }
    }
    if (!(mmax > mmin)) { mmin = isfinite(mmin) ? mmin / 10 : 1; mmax = mmin * 100; } /* one M: in the middle */
    int names = 0, lambdas = 0; /* rows of more than one dataset, or lambda: say which in the legend */
    for (int i = 0, r0 = -1; i < n_rows; i++) {
        if (run_is_pop(&rows[i])) continue;
        if (r0 < 0) r0 = i;
        names |= strcmp(rows[i].name, rows[r0].name) != 0;
        lambdas |= rows[i].rlambda != rows[r0].rlambda;
    }
    if (!isfinite(lo)) lo = 0; /* Pop alone: an empty plot */
    if (!(hi > lo)) hi = lo + 0.01;
    const double x0 = 70, y0 = 30, w = 520, h = 300;
    FILE *f = atomic_open(path);
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"380\" font-family=\"sans-serif\" "
               "font-size=\"12\">\n<rect width=\"800\" height=\"380\" fill=\"white\"/>\n");
    fprintf(f, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#888\"/>\n", x0, y0, w, h);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">sampled negatives M (log scale)</text>\n", x0 + w / 2,
            y0 + h + 34);
    fprintf(f, "<text x=\"14\" y=\"%.0f\" transform=\"rotate(-90 14 %.0f)\" text-anchor=\"middle\">test Recall@50</text>\n",
            y0 + h / 2, y0 + h / 2);
    for (int t = 0; t <= 4; t++) {
        double v = lo + (hi - lo) * t / 4, y = y0 + h - h * t / 4;
        fprintf(f, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.4f</text>\n", x0 - 4, y + 4, v);
    }
#define NX(M) (x0 + w * (log(M) - log(mmin)) / (log(mmax) - log(mmin)))
#define NY(v) (y0 + h - h * ((v) - lo) / (hi - lo))
    int series = 0;
    for (int i = 0; i < n_rows; i++) {
        int first = !run_is_pop(&rows[i]); /* a new series: the first row of its setting but M */
        for (int j = 0; j < i; j++) first &= !same_series(&rows[j], &rows[i]);
        if (!first) continue;
        const char *col = colors[series++ % 6];
        if (rows[i].M == 0) {
            fprintf(f, "<line x1=\"%.0f\" x2=\"%.0f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-dasharray=\"6 4\"/>\n", x0,
                    x0 + w, NY(mean[i * 8 + 4]), NY(mean[i * 8 + 4]), col);
        } else {
            fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", col);
            for (double last = 0;;) { /* this series' rows in increasing M */
                int next = -1;
                for (int j = i; j < n_rows; j++)
                    if (rows[j].M > last && same_series(&rows[j], &rows[i]) && (next < 0 || rows[j].M < rows[next].M))
                        next = j;
                if (next < 0) break;
                fprintf(f, "%.1f,%.1f ", NX(rows[next].M), NY(mean[next * 8 + 4]));
                last = rows[next].M;
            }
            fprintf(f, "\"/>\n");
            for (int j = i; j < n_rows; j++)
                if (rows[j].M > 0 && same_series(&rows[j], &rows[i]))
                    fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/><text x=\"%.1f\" y=\"%.0f\" "
                               "font-size=\"10\" text-anchor=\"middle\">%g</text>\n",
                            NX(rows[j].M), NY(mean[j * 8 + 4]), col, NX(rows[j].M), y0 + h + 14, rows[j].M);
        }
        char more[512];
        snprintf(more, sizeof more, "%s%s%s", strcmp(rows[i].adam, "dense") ? ", lazy Adam" : "",
                 strcmp(rows[i].hits, "none") ? ", hits removed: " : "", strcmp(rows[i].hits, "none") ? rows[i].hits : "");
        if (lambdas) snprintf(more + strlen(more), sizeof more - strlen(more), ", lambda %g", rows[i].rlambda);
        for (int k = 0; k < N_RUN_MORE; k++) { /* the table's other settings (D, K, lr, ...) where the lines differ */
            int differs = 0;
            for (int j = 0; j < n_rows; j++)
                differs |= !run_is_pop(&rows[j]) && strcmp(rows[j].more[k], rows[i].more[k]);
            if (differs)
                snprintf(more + strlen(more), sizeof more - strlen(more), ", %s %s", RUN_MORE[k].key, rows[i].more[k]);
        }
        fprintf(f, "<text x=\"%.0f\" y=\"%.0f\" fill=\"%s\">", x0 + w + 12, y0 + 14 + 16 * (series - 1), col);
        if (names) svg_escaped(f, rows[i].name), fputs(": ", f);
        fprintf(f, "%s%s, %s%s</text>\n", rows[i].model, rows[i].relu ? "+relu" : "",
                rows[i].M == 0 ? "full softmax" : rows[i].rbeta == 0 ? "uniform sampled softmax" : "IHN", more);
    }
#undef NX
#undef NY
    fprintf(f, "</svg>\n");
    atomic_commit(f);
}

int cmd_report(int argc, char **argv) {
    const char *svg = NULL, **dirs = xmalloc(argc * sizeof *dirs);
    int n = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: remi report [--negatives-svg FILE] RUN_DIR...\n"
                   "One markdown row per setting over the finished runs given (their --out folders): runs that\n"
                   "differ only in the seed share a row (a model's other settings, D, K, L, B, lr, ..., are shown\n"
                   "where rows differ in them), with test Recall/NDCG/ndcg_ref/HitRate@20,50 as mean +- standard\n"
                   "deviation over the seeds. --negatives-svg FILE also draws test Recall@50 against M.\n");
            return 0;
        }
        if (!strcmp(argv[i], "--negatives-svg")) {
            if (i + 1 >= argc) die("report: --negatives-svg needs a file name");
            svg = argv[++i];
        } else if (argv[i][0] == '-') die("report: unknown flag '%s'; see `remi report --help`", argv[i]);
        else dirs[n++] = argv[i];
    }
    if (n == 0) die("report: give the --out folders of finished runs; see `remi report --help`");
    struct stat sb;
    if (svg && (!*svg || (stat(svg, &sb) == 0 && S_ISDIR(sb.st_mode)))) /* before the table is printed */
        die("report: --negatives-svg \"%s\": give a file name (the figure is an SVG file)", svg);
    if (svg) { /* its folder must take the file: said before the table is printed, too */
        char dir[4200];
        if (access(path_folder(dir, sizeof dir, svg), W_OK | X_OK) != 0)
            die("report: --negatives-svg %s: cannot write to folder %s: %s", svg, dir, strerror(errno));
    }
    int n_rows = 0, *count = xcalloc(n, sizeof(int));
    RunResult *runs = xmalloc(n * sizeof *runs), *rows = xmalloc(n * sizeof *rows);
    double *sum = xcalloc((size_t)n * 8, sizeof(double)), *sq = xcalloc((size_t)n * 8, sizeof(double));
    double *steps = xcalloc((size_t)n * 2, sizeof(double)); /* summed best and last steps per row */
    for (int i = 0; i < n; i++) {
        if (!read_run(&runs[i], dirs[i])) { fprintf(stderr, "report: %s has not finished, left out\n", dirs[i]); continue; }
        runs[i].dir = dirs[i];
        for (int j = 0; j < i; j++) /* a run counted twice would pass for a seed with the same result */
            if (runs[j].dir && same_setting(&runs[j], &runs[i]) && runs[j].seed == runs[i].seed)
                die("report: %s and %s are the same setting and seed (%g); give each run once", dirs[j], dirs[i],
                    runs[i].seed);
        int r = 0;
        while (r < n_rows && !same_setting(&rows[r], &runs[i])) r++;
        if (r == n_rows) rows[n_rows++] = runs[i];
        count[r]++;
        for (int k = 0; k < 8; k++) { sum[r * 8 + k] += runs[i].v[k]; sq[r * 8 + k] += runs[i].v[k] * runs[i].v[k]; }
        steps[2 * r] += runs[i].best_iter;
        steps[2 * r + 1] += runs[i].last_iter;
    }
    if (n_rows == 0) die("report: none of the %d run(s) has finished: nothing to tabulate", n);
    printf("| data | model | beta | lambda | M | seeds | R@20 | NDCG@20 | ndcg_ref@20 | HR@20 | R@50 | NDCG@50 | ndcg_ref@50 | HR@50 | steps: best / last |\n");
    printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int r = 0; r < n_rows; r++) {
        char mb[64] = "all (full softmax)";
        if (run_is_pop(&rows[r])) strcpy(mb, "-");
        else if (rows[r].M != 0 && !strcmp(rows[r].hits, "none")) snprintf(mb, sizeof mb, "%g", rows[r].M);
        else if (rows[r].M != 0) snprintf(mb, sizeof mb, "%g, %s hits removed", rows[r].M, rows[r].hits);
        char more[512] = ""; /* the other settings in which this row differs from a row that looks the same */
        for (int i = 0; i < N_RUN_MORE; i++) {
            int differs = 0;
            for (int q = 0; q < n_rows; q++) differs |= shown_setting(&rows[q], &rows[r]) && strcmp(rows[q].more[i], rows[r].more[i]);
            if (differs) snprintf(more + strlen(more), sizeof more - strlen(more), ", %s %s", RUN_MORE[i].key, rows[r].more[i]);
        }
        printf("| %s | %s%s%s%s | %g | %g | %s | %d |", rows[r].name, rows[r].model, rows[r].relu ? "+relu" : "",
               strcmp(rows[r].adam, "dense") ? ", lazy Adam" : "", more, rows[r].rbeta, rows[r].rlambda, mb, count[r]);
        for (int k = 0; k < 8; k++) {
            double c = count[r], mean = sum[r * 8 + k] / c, var = c > 1 ? (sq[r * 8 + k] - c * mean * mean) / (c - 1) : 0;
            sum[r * 8 + k] = mean;
            if (c > 1) printf(" %.4f ± %.4f |", mean, sqrt(var > 0 ? var : 0));
            else printf(" %.4f |", mean);
        }
        printf(" %.0f / %.0f |\n", steps[2 * r] / count[r], steps[2 * r + 1] / count[r]);
    }
    if (svg) negatives_svg(svg, rows, sum, n_rows);
    return 0;
}

/* ======================================================================== gradcheck
 * Central finite differences against every backward, on tiny shapes. Each check
 * perturbs one input element by +-eps, evaluates a scalar objective sum_i c_i y_i (or the
 * loss itself) accumulated in double, and compares (f+ - f-) / (2 eps) with the analytic
 * gradient: |fd - an| <= GC_ATOL + GC_RTOL |an|. The forward passes run in float, so eps
 * is large enough that float rounding (~1e-7 relative) stays far below the tolerance.
 * A whole model has kinks (MIND's ReLU, the readout's argmax): an element whose +-eps
 * steps move any of them is tried again at eps / 4, and skipped and counted if those move
 * one too, since its difference quotient measures the jump, not the derivative; a check
 * that keeps fewer than 4 elements (or fewer than all, if it tries fewer) fails. An
 * element whose difference misses the tolerance is tried at eps / 4 as well, and the closer
 * of the two counts: a curved objective's truncation error (16-fold smaller there) no
 * longer fails a right gradient on some seeds, while a wrong one misses at both steps.
 * (Smaller steps drown in the float rounding of a whole model's loss.) */
#define GC_EPS 1e-2
#define GC_ATOL 2e-3
#define GC_RTOL 2e-2

typedef struct GcState {
    int B, L, D, H, K, M, N;
    float beta, lambda;
    int full;           /* sampled-softmax check: full softmax (no separate target term) */
    int hits;           /* sampled-softmax check: --remove-hits mode (a.neg, a.target, a.hist) */
    uint64_t rng;
    Config cfg;
    Model m;
    Acts a;
    float *c;           /* random objective weights, as long as the largest output */
    float *buf[8];      /* inputs / outputs of the layer under test */
    uint64_t (*kinks)(const struct GcState *g); /* or NULL: fingerprint of the last evaluation's kinks */
} GcState;

static void gc_fill(float *x, size_t n, double std, uint64_t *rng) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * rng_normal(rng));
}
static double gc_dot(const float *c, const float *y, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)c[i] * y[i];
    return s;
}

typedef double (*GcObj)(GcState *g);

/* Element i's error against the tolerance at step eps, or -1 if the steps move a kink. */
static double gc_error(GcObj obj, GcState *g, float *x, size_t i, double an, double eps, uint64_t base) {
    float orig = x[i];
    x[i] = (float)(orig + eps);
    double hp = (double)x[i] - orig, fp = obj(g);
    int moved = g->kinks && g->kinks(g) != base;
    x[i] = (float)(orig - eps);
    double hm = orig - (double)x[i], fm = obj(g);
    moved |= g->kinks && g->kinks(g) != base;
    x[i] = orig;
    if (moved) return -1;
    double fd = (fp - fm) / (hp + hm), r = fabs(fd - an) / (GC_ATOL + GC_RTOL * fabs(an));
    return r == r ? r : INFINITY; /* a NaN fails */
}
/* Compare the analytic gradient of obj w.r.t. x (n elements) with central differences. */
static int gc_check(const char *what, GcObj obj, GcState *g, float *x, const float *an, size_t n) {
    double worst = 0;
    size_t checked = 0, skipped = 0;
    size_t step = n > 200 ? n / 200 : 1;
    uint64_t base = g->kinks ? (obj(g), g->kinks(g)) : 0;
    for (size_t i = 0; i < n; i += step) {
        double r = -1;
        for (double eps = GC_EPS; eps >= GC_EPS / 4 && (r < 0 || r > 1); eps /= 4) { /* a kink or a miss: a smaller step */
            double e = gc_error(obj, g, x, i, an[i], eps, base);
            r = r < 0 ? e : e < 0 ? r : fmin(r, e);
        }
        if (r < 0) { skipped++; continue; }
        if (r > worst) worst = r;
        checked++;
    }
    obj(g); /* restore the activations of the unperturbed point */
    size_t tried = checked + skipped;
    int ok = worst <= 1.0 && checked >= (tried < 4 ? tried : 4) && checked > 0; /* 4 elements at least (or all) */
    printf("  %-38s %5zu elements  worst err/tol %.3f  %s", what, checked, worst, ok ? "ok" : "FAIL");
    if (skipped) printf("  (%zu more skipped at a kink)", skipped);
    printf("\n");
    return ok;
}

/* Layer objectives. buf[0..] hold the layer's inputs and outputs as noted. */
static double gc_posadd(GcState *g) { /* buf0 x (B,L,D), buf1 P (L,D), buf2 xt */
    posadd_forward(g->buf[2], g->buf[0], g->buf[1], NULL, g->B, g->L, g->D);
    return gc_dot(g->c, g->buf[2], (size_t)g->B * g->L * g->D);
}
static double gc_lintanh(GcState *g) { /* buf0 x (BL,D), buf1 W (H,D), buf2 h (BL,H), buf3 wt */
    linear_forward(g->buf[2], g->buf[0], g->buf[1], g->buf[3], g->B * g->L, g->D, g->H);
    tanh_forward(g->buf[2], (size_t)g->B * g->L * g->H);
    return gc_dot(g->c, g->buf[2], (size_t)g->B * g->L * g->H);
}
static double gc_softmax(GcState *g) { /* buf0 z (B,L,K), buf1 att (B,K,L); mask in a.mask */
    masked_softmax_forward(g->buf[1], g->buf[0], g->a.mask, g->B, g->K, g->L);
    return gc_dot(g->c, g->buf[1], (size_t)g->B * g->K * g->L);
}
static double gc_interest(GcState *g) { /* buf0 att (B,K,L), buf1 x (B,L,D), buf2 v (B,K,D) */
    interest_forward(g->buf[2], g->buf[0], g->buf[1], NULL, g->B, g->K, g->L, g->D);
    return gc_dot(g->c, g->buf[2], (size_t)g->B * g->K * g->D);
}
static double gc_readout(GcState *g) { /* buf0 v (B,K,D), buf1 r (B,D) */
    readout_forward(g->buf[1], g->a.sel, g->buf[0], g->m.p.item_emb, g->a.target, g->B, g->K, g->D);
    return gc_dot(g->c, g->buf[1], (size_t)g->B * g->D);
}
static double gc_logits(GcState *g) { /* buf0 r (B,D); E = m.p.item_emb */
    NegRows neg = neg_rows(g->a.en, g->m.p.item_emb, g->a.neg, g->M, g->D);
    logits_forward(g->a.pos, g->a.logit, &neg, g->buf[0], g->a.target, g->B);
    return gc_dot(g->c, g->a.logit, (size_t)g->B * g->M) + gc_dot(g->c + (size_t)g->B * g->M, g->a.pos, g->B);
}
static double gc_ssm(GcState *g) { /* buf0 pos (B), buf1 logit (B,M), buf2 loss (B) */
    return ssm_forward(g->buf[2], (SsmStats *)g->a.ssm_st, g->buf[5], g->buf[0], g->buf[1], g->B, g->M, g->beta,
                       !g->full, g->hits, g->a.neg, g->a.target, g->a.hist, g->L, NULL);
}
static double gc_rr(GcState *g) { /* buf0 att (B,K,L), buf1 rr_d (B,K); 1e3 RR, so its gradient is
                                   * well above the tolerance */
    return 1e3 * rr_forward(g->buf[1], g->buf[0], g->B, g->K, g->L, g->D);
}
static double gc_model(GcState *g) { return step_forward(&g->m, &g->a, &g->cfg, 0); }
/* The readout's kinks: each row's chosen interest. */
static uint64_t gc_sel_kinks(const GcState *g) { return fnv1a(g->a.sel, (size_t)g->B * sizeof(int)); }
/* The model's kinks: each row's chosen interest and, for MIND with --relu, the ReLU's signs. */
static uint64_t gc_model_kinks(const GcState *g) {
    uint64_t h = gc_sel_kinks(g);
    if (g->m.relu)
        for (size_t i = 0; i < (size_t)g->B * g->m.K * g->m.D; i++) h = (h ^ (g->a.v[i] > 0.0f)) * 0x100000001b3ull;
    return h;
}

/* Capsule routing of B samples. buf0 u_hat (B, L, K, D) (DR layout; MIND: (B, L, D) shared
 * by every k), buf1 interests (B, K, D), buf2 routing matrix (B, K, L), buf3..5 p, s, v01,
 * buf6 the frozen last c, buf7 MIND's initial logits. Objective: c . interests (with the
 * last c frozen, as the stop-gradient) or 10 c' . routing matrix (live). */
typedef struct { int mind, matrix; } GcRoute;
static GcRoute gc_route_mode;
static Uhat gc_uhat(GcState *g, float *base, int b) {
    size_t L = g->L, K = g->K, D = g->D;
    return gc_route_mode.mind ? (Uhat){ base + b * L * D, 0, D } : (Uhat){ base + b * L * K * D, D, K * D };
}
static double gc_route(GcState *g) {
    size_t K = g->K, L = g->L, D = g->D, B = g->B;
    for (size_t b = 0; b < B; b++)
        routing_forward(g->buf[1] + b * K * D, g->buf[2] + b * K * L, g->buf[3] + b * 3 * K * L,
                        g->buf[4] + b * 3 * K * D, g->buf[5] + b * 2 * K * D, gc_uhat(g, g->buf[0], (int)b),
                        g->a.mask + b * L, gc_route_mode.mind ? g->buf[7] + b * K * L : NULL,
                        gc_route_mode.matrix ? NULL : g->buf[6] + b * K * L, (int)K, (int)L, (int)L, (int)D);
    if (gc_route_mode.matrix) return 10.0 * gc_dot(g->c + B * K * D, g->buf[2], B * K * L);
    return gc_dot(g->c, g->buf[1], B * K * D);
}
static int gc_route_check(GcState *g, float *an, int mind, int matrix) {
    size_t K = g->K, L = g->L, D = g->D, B = g->B, n = B * L * (mind ? 1 : K) * D;
    gc_route_mode = (GcRoute){ mind, matrix };
    gc_fill(g->buf[0], n, 1.0, &g->rng);
    gc_fill(g->buf[7], B * K * L, 1.0, &g->rng);
    gc_route_mode.matrix = 1;
    gc_route(g);
    memcpy(g->buf[6], g->buf[2], B * K * L * sizeof(float)); /* c of the last iteration, frozen */
    gc_route_mode.matrix = matrix;
    float *datt = g->buf[7] + B * K * L, *zero = datt + B * K * L;
    for (size_t i = 0; i < B * K * L; i++) datt[i] = 10.0f * g->c[B * K * D + i];
    memset(zero, 0, B * K * D * sizeof(float));
    memset(an, 0, n * sizeof(float));
    for (size_t b = 0; b < B; b++)
        routing_backward(gc_uhat(g, an, (int)b), matrix ? zero : g->c + b * K * D, matrix ? datt + b * K * L : NULL,
                         g->buf[3] + b * 3 * K * L, g->buf[4] + b * 3 * K * D, g->buf[5] + b * 2 * K * D,
                         gc_uhat(g, g->buf[0], (int)b), g->a.mask + b * L, (int)K, (int)L, (int)L, (int)D);
    char what[80];
    snprintf(what, sizeof what, "%s routing, %s: d/du_hat", mind ? "MIND" : "DR",
             matrix ? "routing matrix (x10)" : "interests (last c frozen)");
    return gc_check(what, gc_route, g, g->buf[0], an, n);
}

/* Encoder e end to end: L_CE + lambda RR (multi-interest models) w.r.t. every parameter
 * tensor, with MIND's logits and GRU4Rec's dropout drawn once. For DR and MIND the
 * interests use the last c of the unperturbed point, which is what the stop-gradient
 * differentiates; RR sees the live c. */
static int gc_model_check(GcState *g, Encoder e) {
    GcState h = *g;
    int multi = e == ENC_SA || e == ENC_DR || e == ENC_MIND, ok = 1;
    h.cfg.enc = e; h.cfg.relu = e == ENC_MIND; h.cfg.dropout = 0.3f;
    h.cfg.rbeta = 2.0f; h.cfg.rlambda = multi ? 1000.0f : 0.0f;
    h.kinks = gc_model_kinks;
    model_init(&h.m, g->N, &h.cfg);
    acts_init(&h.a, &h.m, g->B, g->M);
    memcpy(h.a.hist, g->a.hist, (size_t)g->B * g->L * sizeof(int));
    memcpy(h.a.mask, g->a.mask, (size_t)g->B * g->L * sizeof(float));
    memcpy(h.a.target, g->a.target, (size_t)g->B * sizeof(int));
    memcpy(h.a.neg, g->a.neg, (size_t)g->M * sizeof(int));
    gc_fill(h.m.mem, h.m.n_params, 0.5, &g->rng);
    encoder_draws(&h.m, &h.a, &h.cfg, g->B, &g->rng);
    step_forward(&h.m, &h.a, &h.cfg, 1);
    float *frozen = xmalloc((size_t)g->B * h.m.K * g->L * sizeof(float));
    memcpy(frozen, h.a.att, (size_t)g->B * h.m.K * g->L * sizeof(float));
    if (e == ENC_DR || e == ENC_MIND) h.a.route_frozen = frozen;
    step_backward(&h.m, &h.a, &h.cfg);
    float **pp = (float **)&h.m.p, **gp = (float **)&h.m.g, *dE = xmalloc(h.m.size[0] * sizeof(float));
    item_grad_dense(dE, &h.m.ge, h.m.N, h.m.D);
    gp[0] = dE;
    for (int i = 0; i < N_PARAM_TENSORS; i++) {
        if (!h.m.size[i]) continue;
        char what[80];
        snprintf(what, sizeof what, "%s model: d/d %s", ENC_NAMES[e], TENSOR_NAMES[i]);
        /* DNN sums E[0] at padded positions but, like the reference (padding_idx), passes it
         * no gradient through the lookup: its row 0 is left out of the comparison */
        size_t skip = e == ENC_DNN && i == 0 ? (size_t)h.m.D : 0;
        ok &= gc_check(what, gc_model, &h, pp[i] + skip, gp[i] + skip, h.m.size[i] - skip);
    }
    free(frozen); free(dE);
    return ok;
}

#define ZERO(p, n) memset((p), 0, (n) * sizeof(float))

/* The checks' state: a small random model; a batch of a full, a padded and a one-item history;
 * random objective weights and inputs; an[0..2], room for the analytic gradients. */
static void gc_setup(GcState *g, float **an, uint64_t seed) {
    *g = (GcState){ .B = 3, .L = 5, .D = 6, .K = 3, .M = 7, .N = 11, .rng = seed };
    g->H = 4 * g->D;
    g->cfg = default_config();
    g->cfg.D = g->D; g->cfg.K = g->K; g->cfg.L = g->L; g->cfg.B = g->B; g->cfg.M = g->M; g->cfg.seed = seed;
    model_init(&g->m, g->N, &g->cfg);
    acts_init(&g->a, &g->m, g->B, g->M);
    size_t big = (size_t)g->B * g->L * g->H + (size_t)g->B * g->M + 64;
    g->c = xmalloc(big * sizeof(float));
    for (int i = 0; i < 8; i++) g->buf[i] = xcalloc(big, sizeof(float));
    for (int i = 0; i < 3; i++) an[i] = xcalloc(big > g->m.n_params ? big : g->m.n_params, sizeof(float));
    gc_fill(g->c, big, 1.0, &g->rng);
    gc_fill(g->m.mem, g->m.n_params, 0.5, &g->rng);
    int lens[3] = { 5, 3, 1 }; /* a full, a padded and a one-item history */
    for (int b = 0; b < g->B; b++) {
        for (int l = 0; l < g->L; l++) {
            g->a.hist[b * g->L + l] = l < lens[b] ? 1 + (int)rng_below(&g->rng, g->N - 1) : 0;
            g->a.mask[b * g->L + l] = l < lens[b];
        }
        g->a.target[b] = 1 + (int)rng_below(&g->rng, g->N - 1);
    }
    for (int j = 0; j < g->M; j++) g->a.neg[j] = (int)rng_below(&g->rng, g->N);
    g->a.neg[1] = g->a.neg[0]; /* a duplicate draw must accumulate */
    g->a.neg[2] = 0;          /* the padding id can be drawn */
}

/* ComiRec-SA's layers: position add, linear + tanh, masked softmax, V = A X, hard readout. */
static int gc_sa_layers(GcState *g, float **an) {
    int ok = 1, B = g->B, L = g->L, D = g->D, H = g->H, K = g->K;
    size_t BLD = (size_t)B * L * D;
    /* position add */
    gc_fill(g->buf[0], BLD, 1.0, &g->rng); gc_fill(g->buf[1], (size_t)L * D, 1.0, &g->rng);
    ZERO(an[0], BLD); ZERO(an[1], (size_t)L * D);
    posadd_backward(an[0], an[1], g->c, B, L, D);
    ok &= gc_check("posadd: d/dx", gc_posadd, g, g->buf[0], an[0], BLD);
    ok &= gc_check("posadd: d/dP", gc_posadd, g, g->buf[1], an[1], (size_t)L * D);

    /* linear + tanh */
    gc_fill(g->buf[0], BLD, 1.0, &g->rng); gc_fill(g->buf[1], (size_t)H * D, 0.4, &g->rng);
    gc_lintanh(g);
    memcpy(g->buf[4], g->c, (size_t)B * L * H * sizeof(float));
    tanh_backward(g->buf[4], g->buf[2], (size_t)B * L * H);
    ZERO(an[0], BLD); ZERO(an[1], (size_t)H * D);
    linear_backward(an[0], an[1], g->buf[4], g->buf[0], g->buf[1], B * L, D, H, 0);
    ok &= gc_check("linear+tanh: d/dx", gc_lintanh, g, g->buf[0], an[0], BLD);
    ok &= gc_check("linear+tanh: d/dW", gc_lintanh, g, g->buf[1], an[1], (size_t)H * D);

    /* masked softmax, the last sample's positions all padded for it (its softmax is uniform
     * whatever z is: no gradient) */
    float *last = g->a.mask + (size_t)(B - 1) * L, kept[64];
    memcpy(kept, last, L * sizeof(float));
    memset(last, 0, L * sizeof(float));
    gc_fill(g->buf[0], (size_t)B * L * K, 2.0, &g->rng);
    gc_softmax(g);
    ZERO(an[0], (size_t)B * L * K);
    masked_softmax_backward(an[0], g->c, g->buf[1], g->a.mask, B, K, L);
    ok &= gc_check("masked softmax: d/dz", gc_softmax, g, g->buf[0], an[0], (size_t)B * L * K);
    memcpy(last, kept, L * sizeof(float));

    /* V = A X */
    gc_fill(g->buf[0], (size_t)B * K * L, 1.0, &g->rng); gc_fill(g->buf[1], BLD, 1.0, &g->rng);
    ZERO(an[0], (size_t)B * K * L); ZERO(an[1], BLD);
    interest_backward(an[0], an[1], g->c, g->buf[0], g->buf[1], NULL, B, K, L, D);
    ok &= gc_check("A X: d/dA", gc_interest, g, g->buf[0], an[0], (size_t)B * K * L);
    ok &= gc_check("A X: d/dX", gc_interest, g, g->buf[1], an[1], BLD);

    /* hard readout */
    gc_fill(g->buf[0], (size_t)B * K * D, 1.0, &g->rng);
    gc_readout(g);
    ZERO(an[0], (size_t)B * K * D);
    readout_backward(an[0], g->c, g->a.sel, B, K, D);
    g->kinks = gc_sel_kinks;
    ok &= gc_check("hard readout: d/dV", gc_readout, g, g->buf[0], an[0], (size_t)B * K * D);
    g->kinks = NULL;
    return ok;
}

/* The loss: sampled logits (d/dr, d/dE), then the sampled softmax at beta 0 and beta > 0
 * (IHN), full softmax (--neg 0) and with hits removed. */
static int gc_loss_layers(GcState *g, float **an) {
    int ok = 1, B = g->B, L = g->L, D = g->D, M = g->M;
    /* sampled logits: r and E */
    gc_fill(g->buf[0], (size_t)B * D, 1.0, &g->rng);
    gc_logits(g);
    ZERO(an[0], (size_t)B * D); ZERO(g->m.gmem, g->m.size[0]);
    NegRows neg = neg_rows(g->a.en, g->m.p.item_emb, g->a.neg, M, D);
    logits_backward(an[0], &g->m.ge, g->a.den, g->c + (size_t)B * M, g->c, g->buf[0], &neg, g->a.target, B);
    item_grad_dense(an[1], &g->m.ge, g->N, D);
    ok &= gc_check("sampled logits: d/dr", gc_logits, g, g->buf[0], an[0], (size_t)B * D);
    ok &= gc_check("sampled logits: d/dE", gc_logits, g, g->m.p.item_emb, an[1], g->m.size[0]);

    /* sampled softmax, beta = 0 and beta > 0 (IHN); full softmax (--neg 0); then with hits
     * removed (negatives drawn from 7 ids, so that targets and history items recur) */
    float betas[6] = { 0.0f, 2.0f, 10.0f, 0.0f, 0.0f, 2.0f };
    for (int i = 0; i < 6; i++) {
        char what[96];
        g->beta = betas[i];
        g->full = i == 3;
        g->hits = i == 4 ? HITS_TARGET : i == 5 ? HITS_HISTORY : HITS_NONE;
        if (g->hits) {
            for (int j = 0; j < M; j++) g->a.neg[j] = 1 + j % 7;
            for (int b = 0; b < B; b++) {
                g->a.target[b] = 1 + b % 7;
                for (int l = 0; l < L; l++) g->a.hist[b * L + l] = l < 2 ? 1 + (b + 3 + l) % 7 : 0;
            }
        }
        gc_fill(g->buf[0], B, 1.0, &g->rng); gc_fill(g->buf[1], (size_t)B * M, 1.0, &g->rng);
        gc_ssm(g);
        ssm_backward(an[0], an[1], (SsmStats *)g->a.ssm_st, g->buf[5], B, M, g->beta, 1.0f / B);
        const char *kind = g->full ? "full" : g->hits == HITS_TARGET ? "sampled, target hits removed,"
                                           : g->hits == HITS_HISTORY ? "sampled, history hits removed," : "sampled";
        snprintf(what, sizeof what, "%s softmax beta %g: d/ds+", kind, g->beta);
        ok &= gc_check(what, gc_ssm, g, g->buf[0], an[0], B);
        snprintf(what, sizeof what, "%s softmax beta %g: d/ds_j", kind, g->beta);
        ok &= gc_check(what, gc_ssm, g, g->buf[1], an[1], (size_t)B * M);
    }
    g->full = 0;
    return ok;
}

/* Removing hits is the sampled softmax over the kept negatives alone, compared loss by loss
 * (history mode, beta 2), on gc_loss_layers' targets, histories and negatives of 7 ids. */
static int gc_hits_removed(GcState *g) {
    int B = g->B, L = g->L, M = g->M;
    g->beta = 2.0f;
    g->hits = HITS_HISTORY;
    float keep[64], kept[64], tmp1[128], loss1;
    SsmStats st1;
    double worst = 0;
    int removed = 0;
    uint64_t rng = 99; /* its own draws: the later checks see the same points as without it */
    gc_fill(g->buf[0], B, 1.0, &rng); gc_fill(g->buf[1], (size_t)B * M, 1.0, &rng);
    for (int b = 0; b < B; b++) /* a removed hit scoring far above the rest: its exps overflow */
        for (int j = 0; j < M; j++)
            if (g->a.neg[j] == g->a.target[b]) g->buf[1][b * M + j] = 200.0f;
    gc_ssm(g);
    for (int b = 0; b < B; b++) {
        int n = 0;
        hits_keep(keep, g->a.neg, M, g->a.target[b], g->a.hist + b * L, L, HITS_HISTORY);
        for (int j = 0; j < M; j++)
            if (keep[j] != 0.0f) kept[n++] = g->buf[1][b * M + j];
        removed += M - n;
        ssm_forward(&loss1, &st1, tmp1, g->buf[0] + b, kept, 1, n, g->beta, 1, HITS_NONE, NULL, NULL, NULL, 0, NULL);
        double r = fabs(loss1 - g->buf[2][b]) / (1e-6 + 1e-6 * fabs(g->buf[2][b]));
        if (!(r <= worst)) worst = r; /* a NaN stays, and fails */
    }
    int ok = worst <= 1.0 && removed > 0;
    printf("  %-38s %5d removed   worst err/tol %.3f  %s\n", "removed hits = kept negatives alone", removed, worst,
           ok ? "ok" : "FAIL");
    g->hits = HITS_NONE;
    return ok;
}

int cmd_gradcheck(int argc, char **argv) {
    uint64_t seed = 7;
    Flag flags[] = { { "--seed", F_U64, &seed, "seed of the random shapes' contents" } };
    parse_flags(argc, argv, "gradcheck", "Finite-difference check of every backward pass; exits 1 on failure.",
                flags, 1);
    GcState g;
    float *an[3];
    gc_setup(&g, an, seed);
    int B = g.B, L = g.L, D = g.D, K = g.K;
    printf("gradcheck: B %d L %d D %d H %d K %d M %d N %d, eps %g, tol %g + %g |grad|\n", B, L, D, g.H, K, g.M, g.N,
           GC_EPS, GC_ATOL, GC_RTOL);
    int ok = gc_sa_layers(&g, an);
    ok &= gc_loss_layers(&g, an);
    ok &= gc_hits_removed(&g);

    /* RR on a real attention matrix (rows sum to 1, padded entries 0) */
    gc_fill(g.buf[2], (size_t)B * L * K, 2.0, &g.rng);
    masked_softmax_forward(g.buf[0], g.buf[2], g.a.mask, B, K, L);
    gc_rr(&g);
    ZERO(an[0], (size_t)B * K * L);
    rr_backward(an[0], g.buf[0], g.buf[1], 1.0f, B, K, L, D);
    for (size_t i = 0; i < (size_t)B * K * L; i++) an[0][i] *= 1e3f;
    ok &= gc_check("RR (x1e3): d/dA", gc_rr, &g, g.buf[0], an[0], (size_t)B * K * L);

    /* capsule routing (squash, the iterations, both stop-gradient paths), DR and MIND layouts */
    ok &= gc_route_check(&g, an[0], 0, 0);
    ok &= gc_route_check(&g, an[0], 0, 1);
    ok &= gc_route_check(&g, an[0], 1, 0);
    ok &= gc_route_check(&g, an[0], 1, 1);

    /* every model, end to end */
    for (int e = 0; e < N_ENCODERS; e++)
        if (e != ENC_POP) ok &= gc_model_check(&g, (Encoder)e);
    printf("gradcheck: %s\n", ok ? "all passed" : "FAILED");
    return ok ? 0 : 1;
}
#undef ZERO

/* ======================================================================== self-test
 * Fast kernels against scalar twins, evaluation against a brute-force twin, the CPython
 * set-order emulation against orders recorded from CPython, and thread-count invariance. */
static int st_report(const char *what, int ok, const char *detail) {
    printf("  %-46s %s%s%s\n", what, ok ? "ok" : "FAIL", detail[0] ? "  " : "", detail);
    return ok;
}

static int st_gemm(uint64_t *rng) {
    int sizes[][3] = { { 1, 1, 1 }, { 3, 17, 5 }, { 4, 16, 64 }, { 5, 33, 7 }, { 9, 40, 70 }, { 13, 3, 129 }, { 8, 64, 256 },
                      { 16, 32, 257 }, { 11, 20, 600 }, { 4, 64, 2560 }, { 37, 35, 65 }, { 96, 16, 64 },
                      { 35, 20, 1024 } /* rows 4 KB apart: the copied tiles */,
                      { 32, 48, 1100 }, { 16, 16, 513 } /* full tiles, k > 2 KBLOCK: in blocks of k */,
                      { 37, 50, 1030 } /* and edge tiles after them */,
                      { 37, 70, 65 }, { 20, 64, 1024 } /* row tiles packed under 4 or more columns */,
                      { 37, 64, 1030 } /* the same in blocks of k, and edge tiles */ };
    int ok = 1;
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int acc = 0; acc < 2; acc++) {
                int m = sizes[s][0], n = sizes[s][1], k = sizes[s][2];
                float *A = xmalloc((size_t)m * k * 4), *B = xmalloc((size_t)k * n * 4);
                float *C = xmalloc((size_t)m * n * 4), *R = xmalloc((size_t)m * n * 4);
                gc_fill(A, (size_t)m * k, 1, rng); gc_fill(B, (size_t)k * n, 1, rng); gc_fill(C, (size_t)m * n, 1, rng);
                memcpy(R, C, (size_t)m * n * 4);
                if (ta) gemm_tn(C, A, B, m, n, k, acc); else gemm_nn(C, A, B, m, n, k, acc);
                gemm_ref(R, A, B, m, n, k, ta, acc);
                double worst = 0;
                for (int i = 0; i < m * n; i++) {
                    double e = fabs(C[i] - R[i]) / (1e-6 + 1e-6 * fabs(R[i]));
                    worst = e > worst ? e : worst;
                }
                if (worst > 1 || memcmp(C, R, (size_t)m * n * 4)) {
                    char d[96];
                    snprintf(d, sizeof d, "m %d n %d k %d trans %d acc %d: worst err/tol %.3g", m, n, k, ta, acc, worst);
                    ok &= st_report("gemm vs scalar twin", 0, d);
                }
                free(A); free(B); free(C); free(R);
            }
    return st_report("gemm (nn, tn, +=) vs scalar twin, 19 shapes", ok, "bit-identical, tol 1e-6 + 1e-6|ref|");
}

/* pack_rows + gemm_packed (the evaluation's products) against the scalar twin, bit for bit:
 * rows not a multiple of the tile (zero-padded), steps not a multiple of 16 (the blocks
 * transposed through registers, then the rest), A's rows wider than k, prefetches running
 * past nothing: the real C rows equal, the padding rows 0. */
static int st_gemm_packed(uint64_t *rng) {
    int sizes[][4] = { { 1, NR, 1, 1 }, { 17, NR, 64, 64 }, { 33, 2 * NR, 70, 75 }, { 512, 2 * NR, 64, 64 }, { 5, 3 * NR, 17, 40 } };
    int ok = 1;
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int m = sizes[s][0], n = sizes[s][1], k = sizes[s][2], sa = sizes[s][3], mp = (m + MR - 1) / MR * MR;
        float *A = xmalloc((size_t)m * sa * 4), *B = xmalloc((size_t)k * n * 4), *Ap = xmalloc((size_t)mp * k * 4);
        float *C = xmalloc((size_t)mp * n * 4), *R = xcalloc((size_t)mp * n, 4), *Ac = xmalloc((size_t)m * k * 4);
        gc_fill(A, (size_t)m * sa, 1, rng); gc_fill(B, (size_t)k * n, 1, rng); gc_fill(C, (size_t)mp * n, 1, rng);
        for (int i = 0; i < m; i++) memcpy(Ac + (size_t)i * k, A + (size_t)i * sa, (size_t)k * 4);
        pack_rows(Ap, A, m, k, sa);
        gemm_packed(C, n, Ap, B, n, m, n, k, A, (size_t)m * sa);
        gemm_ref(R, Ac, B, m, n, k, 0, 0);
        if (memcmp(C, R, (size_t)mp * n * 4)) {
            char d[64];
            snprintf(d, sizeof d, "m %d n %d k %d: differs", m, n, k);
            ok &= st_report("packed gemm vs scalar twin", 0, d);
        }
        free(A); free(B); free(Ap); free(C); free(R); free(Ac);
    }
    return st_report("packed gemm (evaluation) vs scalar twin", ok, "5 shapes, padded rows, bit-identical");
}

/* The generator as a counter: draw k made out of turn (rng_at) equals the k-th made in
 * turn, and skipping n draws lands where n draws in turn do. */
static int st_rng(void) {
    int ok = 1;
    for (uint64_t seed = 1; seed < 4; seed++) {
        uint64_t s = seed * 0x1234567ull, t = s, u = s;
        for (uint64_t k = 0; k < 1000; k++) ok &= rng_next(&t) == rng_at(s, k);
        rng_skip(&u, 1000);
        ok &= u == t && rng_next(&u) == rng_next(&t);
    }
    return st_report("counter generator: draws out of turn", ok, "1000 draws, 3 seeds");
}

/* A linear layer's backward against the products' twin, bit for bit: the narrow layer
 * (NARROW_OUT) and, for tanh's backward after the products, two wider ones. */
static int st_narrow(uint64_t *rng) {
    int shapes[][3] = { { 1, 1, 1 },   { 17, 15, 3 },  { 100, 33, 4 }, { 64, 256, 8 }, { 5, 40, 1 },
                        { 2560, 256, 4 }, { 50, 200, 3 }, { 33, 130, 7 }, { 9, 70, 2 }, { 12, 64, 5 },
                        { 40, 30, 12 },   { 20, 64, 9 } };
    int ok = 1;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
        float *dy = xmalloc((size_t)rows * out * 4), *x = xmalloc((size_t)rows * in * 4), *W = xmalloc((size_t)out * in * 4);
        float *dx = xmalloc((size_t)rows * in * 4), *dW = xmalloc((size_t)out * in * 4);
        float *rx = xmalloc((size_t)rows * in * 4), *rW = xmalloc((size_t)out * in * 4);
        gc_fill(dy, (size_t)rows * out, 1, rng); gc_fill(x, (size_t)rows * in, 1, rng); gc_fill(W, (size_t)out * in, 1, rng);
        gc_fill(dW, (size_t)out * in, 1, rng);
        memcpy(rW, dW, (size_t)out * in * 4);
        float *y = xmalloc((size_t)rows * out * 4), *ry = xmalloc((size_t)rows * out * 4), *wt = xmalloc((size_t)out * in * 4);
        linear_forward(y, x, W, wt, rows, in, out); /* y = x W^T */
        transpose(rW, W, out, in); /* W^T, in rW for the moment */
        gemm_ref(ry, x, rW, rows, out, in, 0, 0);
        memcpy(rW, dW, (size_t)out * in * 4);
        ok &= !memcmp(y, ry, (size_t)rows * out * 4);
        free(y); free(ry); free(wt);
        linear_backward(dx, dW, dy, x, W, rows, in, out, 0);
        gemm_ref(rx, dy, W, rows, in, out, 0, 0);
        gemm_ref(rW, dy, x, out, in, rows, 1, 1);
        ok &= !memcmp(dx, rx, (size_t)rows * in * 4) && !memcmp(dW, rW, (size_t)out * in * 4);
        /* with tanh's backward in the same pass: x is a tanh's output, in (-1, 1) */
        for (size_t i = 0; i < (size_t)rows * in; i++) x[i] = tanhf(x[i]);
        memcpy(dW, rW, (size_t)out * in * 4);
        gemm_ref(rW, dy, x, out, in, rows, 1, 1);
        tanh_backward(rx, x, (size_t)rows * in);
        linear_backward(dx, dW, dy, x, W, rows, in, out, 1);
        ok &= !memcmp(dx, rx, (size_t)rows * in * 4) && !memcmp(dW, rW, (size_t)out * in * 4);
        free(dy); free(x); free(W); free(dx); free(dW); free(rx); free(rW);
    }
    return st_report("linear layer forward and backward vs product twin", ok,
                     "12 shapes, 1 to 12 outputs, plain and with tanh's backward; bit-identical");
}

/* The loss's gradient made in its forward pass (training) = ssm_backward's, bit for bit. */
static int st_ssm_fused(uint64_t *rng) {
    enum { B = 7, M = 45, L = 3 };
    int neg[M], target[B], hist[B * L], ok = 1;
    float pos[B], logit[B * M], tmp[B * 2 * M], loss[B], loss2[B], dpos[B], dpos2[B], dl[B * M];
    SsmStats st[B], st2[B];
    for (int j = 0; j < M; j++) neg[j] = (int)rng_below(rng, 9);
    for (int b = 0; b < B; b++) target[b] = (int)rng_below(rng, 9);
    for (int i = 0; i < B * L; i++) hist[i] = (int)rng_below(rng, 9);
    for (int t = 0; t < 6; t++) {
        float beta = t % 2 ? 0.1f : 2.0f;
        int hits = t / 2 == 0 ? HITS_NONE : t / 2 == 1 ? HITS_TARGET : HITS_HISTORY;
        gc_fill(pos, B, 3, rng); gc_fill(logit, B * M, 3, rng);
        ssm_forward(loss, st, tmp, pos, logit, B, M, beta, 1, hits, neg, target, hist, L, NULL);
        ssm_backward(dpos, dl, st, tmp, B, M, beta, 1.0f / B);
        ssm_forward(loss2, st2, NULL, pos, logit, B, M, beta, 1, hits, neg, target, hist, L,
                    &(SsmGrad){ dpos2, logit, 1.0f / B }); /* written over the logits, as in training */
        ok &= !memcmp(loss, loss2, sizeof loss) && !memcmp(dpos, dpos2, sizeof dpos) && !memcmp(dl, logit, sizeof dl);
    }
    return st_report("loss gradient in the forward pass vs backward", ok, "6 cases (beta, removed hits), bit-identical");
}

static int st_math(void) {
    double we = 0, wt = 0;
    for (double x = -87.0; x <= 88.0; x += 0.000731) {
        double e = fabs(exp_v((float)x) - expf((float)x)) / expf((float)x);
        we = e > we ? e : we;
    }
    for (double x = -12.0; x <= 12.0; x += 0.0000917) {
        double ref = tanhf((float)x);
        double e = fabs(tanh_v((float)x) - ref) / (fabs(ref) > 1e-30 ? fabs(ref) : 1e-30);
        wt = e > wt ? e : wt;
    }
    int same = 1; /* tanh's exponential, without range checks, is exp_v on its inputs [0, 18] */
    for (uint32_t u = 0, top = 0x41900000u /* 18 */; u <= top; u += 997) {
        float x = bits_to_float((int32_t)u), n, r = exp_reduce(x, &n), y = exp_scaled(r, n), z = exp_v(x);
        same &= !memcmp(&y, &z, 4);
    }
    enum { NT = 3 * TANH_BLOCK + 37 }; /* tanh_forward's blocks and tail against tanh_v, bit for bit */
    float y[NT], x[NT], sp[] = { 0.0f, -0.0f, 0.625f, -0.625f, 9.0f, -9.0f, 20.0f, INFINITY, -INFINITY, NAN, 1e-30f };
    for (int i = 0; i < NT; i++) y[i] = x[i] = i < 11 ? sp[i] : (float)((i * 2654435761u) % 20000) / 1000.0f - 10.0f;
    tanh_forward(y, NT);
    int blocks = 1;
    for (int i = 0; i < NT; i++) { float t = tanh_v(x[i]); blocks &= !memcmp(&t, &y[i], 4); }
    char d[160];
    snprintf(d, sizeof d, "max rel err exp %.2e, tanh %.2e (tol 1e-6); tanh's exp = exp_v on [0, 18]: %s; "
             "tanh_forward = tanh_v: %s", we, wt, same ? "yes" : "NO", blocks ? "yes" : "NO");
    return st_report("exp_v / tanh_v vs libm", we < 1e-6 && wt < 1e-6 && exp_v(-4294967296.0f) == 0.0f && same &&
                     blocks && isnan(tanh_v(NAN)), d);
}

/* fmax_kept against a plain scan: lengths around the 8 lanes, with and without keep, NaNs
 * (never taken), both zeros, infinities. The same value; of two zeros, the lanes may keep
 * the other one (no logit or exponential depends on it). */
static int st_fmax(uint64_t *rng) {
    enum { MAXM = 75 }; /* past the four vectors of eight */
    const float special[] = { NAN, 0.0f, -0.0f, INFINITY, -INFINITY, 1.0f };
    float x[MAXM], keep[MAXM];
    int ok = 1, cases = 0;
    for (int rep = 0; rep < 400; rep++)
        for (int M = 0; M <= MAXM; M += 1 + (rep % 3)) {
            for (int j = 0; j < M; j++) {
                double u = rng_uniform(rng);
                x[j] = u < 0.1 ? special[(int)(u * 60)] : (float)(4.0 * rng_uniform(rng) - 2.0);
                keep[j] = rng_uniform(rng) < 0.7f ? 1.0f : 0.0f;
            }
            const float *kp = rep % 2 ? keep : NULL;
            float a = rep % 4 < 2 ? 1.0f : 0.5f, shift = rep % 5 ? 0.0f : 0.25f, init = rep % 3 ? -FLT_MAX : 0.0f;
            float m = init;
            for (int j = 0; j < M; j++) {
                float v = a * (x[j] - shift);
                m = v > m && (!kp || kp[j] != 0.0f) ? v : m;
            }
            float got = fmax_kept(x, kp, M, a, shift, init);
            ok &= got == m;
            cases++;
        }
    char d[64];
    snprintf(d, sizeof d, "%d cases, same values", cases);
    return st_report("sampled softmax maxima vs plain scan", ok, d);
}

/* dots_kl (the matrix kernel) against dots, one interest at a time, bit for bit: odd sizes,
 * a row stride above D, written and accumulated. */
static int st_dots_kl(uint64_t *rng) {
    int shapes[][4] = { { 1, 1, 1, 1 }, { 4, 20, 64, 64 }, { 7, 9, 33, 40 }, { 3, 17, 5, 8 }, { 9, 33, 64, 256 } };
    int ok = 1;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int K = shapes[s][0], L = shapes[s][1], D = shapes[s][2], sa = shapes[s][3];
        float *A = xmalloc((size_t)L * K * sa * 4), *B = xmalloc((size_t)K * D * 4), *y = xmalloc((size_t)K * L * 4 * 2);
        float *r = y + K * L;
        gc_fill(A, (size_t)L * K * sa, 1, rng); gc_fill(B, (size_t)K * D, 1, rng);
        for (int per_k = 0; per_k < 2; per_k++) /* rows shared by the K interests, or a row each */
            for (int acc = 0; acc < 2; acc++) {
                gc_fill(y, (size_t)K * L, 1, rng);
                memcpy(r, y, (size_t)K * L * 4);
                dots_kl(y, A, sa, B, K, L, L, D, per_k, acc);
                for (int k = 0; k < K; k++)
                    dots(r + k * L, A + (per_k ? (size_t)k * sa : 0), (size_t)sa * (per_k ? K : 1), B + (size_t)k * D, L,
                         D, acc);
                ok &= !memcmp(y, r, (size_t)K * L * 4);
            }
        free(A); free(B); free(y);
    }
    return st_report("K x L dot products vs dots", ok,
                     "5 shapes, rows shared or one per interest, written and accumulated, bit-identical");
}

/* SA's attention sums on a sample's real positions only (interest_forward/backward with the
 * mask) against all L, att from the masked softmax: the same interests, the same softmax
 * gradient dz everywhere, the same dx at the real positions; real prefixes of every length,
 * none included, and RR's gradient already in datt. */
static int st_attention_span(uint64_t *rng) {
    int B = 12, K = 3, L = 9, D = 20, ok = 1;
    size_t BKL = (size_t)B * K * L, BLD = (size_t)B * L * D, BKD = (size_t)B * K * D;
    float *z = xmalloc(BKL * 4), *att = xmalloc(BKL * 4), *x = xmalloc(BLD * 4), *dv = xmalloc(BKD * 4);
    float *mask = xmalloc((size_t)B * L * 4), *rr = xmalloc(BKL * 4), *v[2], *datt[2], *dx[2], *dz[2];
    for (int w = 0; w < 2; w++) {
        v[w] = xmalloc(BKD * 4); datt[w] = xmalloc(BKL * 4); dx[w] = xcalloc(BLD, 4); dz[w] = xcalloc(BKL, 4);
    }
    gc_fill(z, BKL, 2, rng); gc_fill(x, BLD, 1, rng); gc_fill(dv, BKD, 1, rng); gc_fill(rr, BKL, 1, rng);
    for (int b = 0; b < B; b++)
        for (int l = 0; l < L; l++) mask[b * L + l] = l < b % (L + 1) ? 1.0f : 0.0f; /* 0..L real */
    masked_softmax_forward(att, z, mask, B, K, L);
    for (int w = 0; w < 2; w++) { /* w 0: all L positions, w 1: the real span */
        interest_forward(v[w], att, x, w ? mask : NULL, B, K, L, D);
        memcpy(datt[w], rr, BKL * 4);
        interest_backward(datt[w], dx[w], dv, att, x, w ? mask : NULL, B, K, L, D);
        masked_softmax_backward(dz[w], datt[w], att, mask, B, K, L);
    }
    ok &= !memcmp(v[0], v[1], BKD * 4) && !memcmp(dz[0], dz[1], BKL * 4);
    for (int i = 0; i < B * L; i++)
        if (mask[i] != 0.0f) ok &= !memcmp(dx[0] + (size_t)i * D, dx[1] + (size_t)i * D, D * 4);
    for (int w = 0; w < 2; w++) { free(v[w]); free(datt[w]); free(dx[w]); free(dz[w]); }
    free(z); free(att); free(x); free(dv); free(mask); free(rr);
    return st_report("attention sums on the real positions vs all", ok,
                     "0..L real positions first, RR in datt: interests, dz, dx bit-identical");
}

/* The capsule routing on a sample's real positions only (n = real_span) against all L
 * (u_hat 0 at the padded ones): the same routing matrix, interests, saved softmaxes and sums,
 * and the same gradient at the real positions, for DR's and MIND's layouts, with and
 * without RR's gradient, with logits starting at 0 and at random values. */
static int st_routing_span(uint64_t *rng) {
    int K = 4, L = 9, D = 24, ok = 1;
    size_t KL = (size_t)K * L, KD = (size_t)K * D, nu = (size_t)L * KD;
    float *buf = xcalloc(2 * (nu + 6 * KL + 5 * KD) + 3 * nu + KL + KD + L, sizeof(float));
    float *u = buf + 2 * (nu + 6 * KL + 5 * KD), *du[2] = { u + nu, u + 2 * nu }, *b0 = u + 3 * nu, *dout = b0 + KL,
          *mask = dout + KD;
    for (int trial = 0; trial < 8; trial++) {
        int mind = trial & 1, n = (int)rng_below(rng, L + 1), rr = (trial >> 1) & 1, noise = trial >> 2;
        Uhat uh = mind ? (Uhat){ u, 0, D } : (Uhat){ u, D, KD };
        memset(u, 0, nu * sizeof(float));
        gc_fill(u, (size_t)n * uh.sl, 1, rng); /* the real positions' rows; the padded ones 0 */
        gc_fill(b0, KL, 1, rng); gc_fill(dout, KD, 1, rng);
        for (int l = 0; l < L; l++) mask[l] = l < n;
        float *out[2][6];
        for (int w = 0; w < 2; w++) { /* w 0: all L positions, w 1: the first n */
            float *o = buf + w * (nu + 6 * KL + 5 * KD);
            out[w][0] = o; out[w][1] = o + KD; out[w][2] = o + KD + KL; out[w][3] = out[w][2] + 3 * KL;
            out[w][4] = out[w][3] + 3 * KD; out[w][5] = out[w][4] + 2 * KD; /* out, att, p, s, v01, datt */
            routing_forward(out[w][0], out[w][1], out[w][2], out[w][3], out[w][4], uh, mask, noise ? b0 : NULL, NULL, K,
                            L, w ? n : L, D);
            memcpy(out[w][5], out[w][1], KL * sizeof(float)); /* some gradient for the routing matrix */
            memset(du[w], 0, nu * sizeof(float));
            routing_backward(mind ? (Uhat){ du[w], 0, D } : (Uhat){ du[w], D, KD }, dout, rr ? out[w][5] : NULL,
                             out[w][2], out[w][3], out[w][4], uh, mask, K, L, w ? n : L, D);
        }
        ok &= !memcmp(out[0][0], out[1][0], (KD + KL + 3 * KL + 3 * KD + 2 * KD) * sizeof(float));
        ok &= !memcmp(du[0], du[1], (size_t)n * uh.sl * sizeof(float));
    }
    free(buf);
    return st_report("capsule routing on the real positions vs all", ok,
                     "DR and MIND layouts, 0..L real, RR on/off, logits from 0 and random: bit-identical");
}

/* item_grad_scatter (parallel, rows in groups) vs the plain loop of axpyf over the list, on
 * a list with repeated items, a mask, scales and a row map (-1: no term); kept rows and dense. */
static int st_scatter(uint64_t *rng) {
    int N = 50, D = 24, n = 300, ok = 1;
    float *x = xmalloc((size_t)n * D * 4), *scale = xmalloc(n * 4), *mask = xmalloc(n * 4);
    float *g = xcalloc((size_t)N * D, 4), *ref = xcalloc((size_t)N * D, 4), *dense = xmalloc((size_t)N * D * 4);
    int *item = xmalloc(n * 4), *xrow = xmalloc(n * 4), *rowmap = xmalloc(N * 4), *items = xmalloc(N * 4);
    gc_fill(x, (size_t)n * D, 1, rng); gc_fill(scale, n, 1, rng);
    for (int i = 0; i < n; i++) {
        item[i] = (int)rng_below(rng, N); xrow[i] = rng_below(rng, 8) ? (int)rng_below(rng, n) : -1;
        mask[i] = rng_below(rng, 4) ? 1.0f : 0.0f;
    }
    for (int kept = 0; kept < 2; kept++) {
        for (int j = 0; j < N; j++) rowmap[j] = -1;
        ItemGrad ge = { g, kept ? rowmap : NULL, items, 0 };
        memset(g, 0, (size_t)N * D * 4); memset(ref, 0, (size_t)N * D * 4);
        item_grad_scatter(&(Scatter){ &ge, item, NULL, NULL, x, NULL, n, D });
        item_grad_scatter(&(Scatter){ &ge, item, mask, scale, x, xrow, n, D });
        int *rowmap2 = kept ? xmalloc(N * 4) : NULL, *items2 = xmalloc(N * 4);
        for (int j = 0; j < N && kept; j++) rowmap2[j] = -1;
        ItemGrad gr = { ref, rowmap2, items2, 0 };
        for (int i = 0; i < n; i++) axpyf(item_grad(&gr, item[i], D), 1.0f, x + (size_t)i * D, D);
        for (int i = 0; i < n; i++)
            if (mask[i] != 0.0f && xrow[i] >= 0) axpyf(item_grad(&gr, item[i], D), scale[i], x + (size_t)xrow[i] * D, D);
        if (kept) { /* the same rows in the same order, so the same (N, D) gradient */
            float *want = xmalloc((size_t)N * D * 4);
            item_grad_dense(dense, &ge, N, D); item_grad_dense(want, &gr, N, D);
            ok &= !memcmp(dense, want, (size_t)N * D * 4) && ge.n == gr.n && !memcmp(items, items2, ge.n * 4);
            free(want);
        } else ok &= !memcmp(g, ref, (size_t)N * D * 4);
        free(rowmap2); free(items2);
    }
    free(x); free(scale); free(mask); free(g); free(ref); free(dense); free(item); free(xrow); free(rowmap); free(items);
    return st_report("item gradient scatter vs a plain loop", ok,
                     "300 terms on 50 items, masked, scaled, row map; kept rows and dense, bit-identical");
}

static int st_topk(uint64_t *rng) {
    int ok = 1;
    for (int trial = 0; trial < 200; trial++) {
        int n = 1 + (int)rng_below(rng, 300), cap = 1 + (int)rng_below(rng, 60), hn = 0;
        Scored all[300], top[60];
        uint64_t heap[60];
        for (int i = 0; i < n; i++) all[i] = (Scored){ (float)(int)rng_below(rng, 20) - 10.0f, i }; /* many ties, both signs */
        for (int i = 0; i < n; i++) heap_push(heap, &hn, cap, scored_key(all[i].s, all[i].id));
        heap_finish(top, heap, hn);
        scored_sort(all, n, 0);
        ok &= hn == (n < cap ? n : cap);
        for (int i = 0; i < hn; i++) ok &= top[i].id == all[i].id && top[i].s == all[i].s;
    }
    ok &= scored_key(NAN, 0) < scored_key(-INFINITY, 1 << 30); /* a NaN below everything */
    /* the keys order as scored_better, and give their scores back, over signs, zeros, denormals, infinities */
    float v[10] = { -INFINITY, -1e30f, -1.0f, -1e-40f, -0.0f, 0.0f, 1e-40f, 1.0f, 1e30f, INFINITY };
    for (int a = 0; a < 30; a++)
        for (int b = 0; b < 30; b++) {
            Scored x = { v[a % 10], a / 10 * 7 }, y = { v[b % 10], b / 10 * 7 };
            ok &= (scored_key(x.s, x.id) > scored_key(y.s, y.id)) == scored_better(x, y);
            ok &= key_scored(scored_key(x.s, x.id)).s == x.s && key_scored(scored_key(x.s, x.id)).id == x.id;
        }
    return st_report("heap top-k vs full sort (ties by id)", ok, "200 random lists; key order");
}

/* REMI-SPEC g.2 step 3 as written: concatenate, stable-sort by score, keep unique non-zero ids. */
static int merge_interests_ref(int *R, Scored *cand, const Scored *lists, int K, int stride, int n, int multi) {
    if (!multi) {
        for (int i = 0; i < n; i++) R[i] = lists[i].id;
        return n;
    }
    int c = 0, taken = 0;
    for (int k = 0; k < K; k++)
        for (int i = 0; i < n; i++) cand[c++] = lists[k * stride + i];
    scored_sort(cand, c, 1);
    for (int i = 0; i < c && taken < n; i++) {
        int id = cand[i].id, dup = (id == 0);
        for (int j = 0; j < taken && !dup; j++) dup = (R[j] == id);
        if (!dup) R[taken++] = id;
    }
    return taken;
}

static int st_merge(void) {
    /* interest 0: 5(0.9) 0(0.8) 7(0.5); interest 1: 7(0.9) 5(0.7) 3(0.1). Sorted by score
     * with ties in interest-major order: 5 7 0 5 7 3 -> skip 0 and repeats -> 5 7 3. */
    Scored lists[6] = { { 0.9f, 5 }, { 0.8f, 0 }, { 0.5f, 7 }, { 0.9f, 7 }, { 0.7f, 5 }, { 0.1f, 3 } };
    Scored cand[6];
    int R[3], nr = merge_interests(R, lists, 2, 3, 3, 1);
    int R2[2], nr2 = merge_interests(R2, lists, 2, 3, 2, 1);
    int Rr[3], nrr = merge_interests_ref(Rr, cand, lists, 2, 3, 3, 1);
    int ok = nr == 3 && R[0] == 5 && R[1] == 7 && R[2] == 3 && nr2 == 2 && R2[0] == 5 && R2[1] == 7;
    ok &= nrr == 3 && Rr[0] == 5 && Rr[1] == 7 && Rr[2] == 3;
    return st_report("merge of interests (hand-checked)", ok, "");
}

static int st_merge_random(uint64_t *rng) { /* the merge against concatenate + stable sort */
    int ok = 1;
    for (int trial = 0; trial < 300; trial++) {
        int K = 1 + (int)rng_below(rng, 8), stride = 1 + (int)rng_below(rng, 30), n = 1 + (int)rng_below(rng, stride);
        Scored lists[8 * 30], cand[8 * 30];
        for (int k = 0; k < K; k++) { /* few distinct scores and ids: ties and repeats */
            for (int i = 0; i < stride; i++) lists[k * stride + i] = (Scored){ (float)(int)rng_below(rng, 6), (int)rng_below(rng, 12) };
            scored_sort(lists + k * stride, stride, 1);
        }
        int R[30], Rr[30], nr = merge_interests(R, lists, K, stride, n, 1), nrr = merge_interests_ref(Rr, cand, lists, K, stride, n, 1);
        ok &= nr == nrr;
        for (int i = 0; i < nr && i < nrr; i++) ok &= R[i] == Rr[i];
    }
    return st_report("merge of interests vs stable sort", ok, "300 random lists with ties");
}

static int st_set_order(const char *path) {
    FILE *f = fopen(path, "rb");
    char why[4300];
    snprintf(why, sizeof why, "cannot open %s (run from the repository, or give --expected DIR)", path);
    if (!f) return st_report("CPython set order", 0, why);
    char *line = NULL;
    size_t cap = 0;
    int lines = 0, ok = 1;
    while (getline(&line, &cap, f) != -1) {
        int keys[1024], want[1024], n = 0, m = 0, side = 0;
        for (char *tok = strtok(line, " \t\r\n"); tok; tok = strtok(NULL, " \t\r\n")) {
            if (!strcmp(tok, "|")) { side = 1; continue; }
            if (side == 0 && n < 1024) keys[n++] = atoi(tok);
            else if (side == 1 && m < 1024) want[m++] = atoi(tok);
        }
        if (n == 0) continue;
        int order[1024], got[1024];
        set_order(order, keys, n);
        for (int p = 0; p < n; p++) got[order[p]] = keys[p];
        ok &= m == n && !memcmp(got, want, n * sizeof(int));
        lines++;
    }
    free(line);
    fclose(f);
    char d[64];
    snprintf(d, sizeof d, "%d lists recorded from CPython", lines);
    return st_report("CPython set order emulation", ok && lines > 0, d);
}

/* Reference steps (expected/reference-steps.txt): small models of every encoder with their
 * inputs (parameters, a batch, the shared negatives, MIND's routing logits or GRU4Rec's
 * dropout multipliers) and the loss and gradients the reference implementation computes from
 * them, in float64 (README, Cross-check). remi's training step (step_forward, step_backward)
 * on the same inputs must give the loss and every gradient tensor to float32's rounding. */
#define REF_STEP_TOL 1e-5 /* relative: the observed differences are about 1e-7 to 1e-6 */

/* The next whitespace-separated token of *s (terminated in place), skipping '#' comment lines. */
static char *ref_token(char **s) {
    char *p = *s;
    for (;;) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (*p != '#') break;
        while (*p && *p != '\n') p++;
    }
    if (!*p) { *s = p; return NULL; }
    char *q = p;
    while (*q && !isspace((unsigned char)*q)) q++;
    if (*q) *q++ = 0;
    *s = q;
    return p;
}
static int ref_number(char **s, double *v) {
    char *t = ref_token(s), *end;
    if (!t) return 0;
    *v = strtod(t, &end);
    return !*end;
}
/* "key value" */
static int ref_field(char **s, const char *key, double *v) {
    char *t = ref_token(s);
    return t && !strcmp(t, key) && ref_number(s, v);
}
/* "key n" and n numbers into out (NULL: n must be 0) */
static int ref_array(char **s, const char *key, size_t n, double *out) {
    double cnt;
    if (!ref_field(s, key, &cnt) || cnt != (double)n) return 0;
    for (size_t i = 0; i < n; i++)
        if (!ref_number(s, &out[i])) return 0;
    return 1;
}

/* How far g is from the reference's ref (n elements): the larger of the difference's norm and
 * its largest element, each relative to the reference's. */
static double ref_difference(const float *g, const double *ref, size_t n) {
    double dd = 0, rr = 0, dmax = 0, rmax = 0;
    for (size_t j = 0; j < n; j++) {
        double d = g[j] - ref[j];
        dd += d * d; rr += ref[j] * ref[j];
        dmax = fmax(dmax, fabs(d)); rmax = fmax(rmax, fabs(ref[j]));
    }
    return rr > 0 ? fmax(sqrt(dd / rr), dmax / rmax) : dd > 0 ? INFINITY : 0;
}

/* One case: parse it, run remi's step, compare. Returns 0 on a parse error (why says where);
 * *err: the largest relative difference, loss or gradient tensor, and its name in worst. */
static int ref_step_case(char **s, double *err, char *worst, size_t cap, char *why, size_t why_cap) {
    char *name = ref_token(s), *t;
    double v[10];
    static const char *keys[10] = { "relu", "N", "D", "K", "L", "B", "M", "rbeta", "rlambda", "dropout" };
    Config c = default_config();
    if (!name || !(t = ref_token(s)) || strcmp(t, "model") || !(t = ref_token(s))) goto bad;
    c.enc = N_ENCODERS;
    for (int e = 0; e < N_ENCODERS; e++) if (!strcmp(t, ENC_NAMES[e])) c.enc = (Encoder)e, c.model = ENC_NAMES[e];
    for (int i = 0; i < 10; i++) if (!ref_field(s, keys[i], &v[i])) goto bad;
    if (c.enc == N_ENCODERS || c.enc == ENC_POP) goto bad;
    c.relu = (int)v[0]; c.D = (int)v[2]; c.K = (int)v[3]; c.L = (int)v[4]; c.B = (int)v[5]; c.M = (int)v[6];
    c.rbeta = (float)v[7]; c.rlambda = (float)v[8]; c.dropout = (float)v[9];
    int N = (int)v[1], B = c.B, L = c.L, M = c.M;
    if (N < 2 || c.D < 1 || c.K < 1 || L < 1 || B < 1 || M < 1 || N > 1000 || c.D > 64 || c.K > 8 || L > 64 || B > 64 || M > 1000)
        goto bad;
    Model m;
    Acts a;
    model_init(&m, N, &c);
    acts_init(&a, &m, B, M);
    size_t P = m.n_params, nd = m.enc == ENC_MIND ? (size_t)B * m.K * L : m.enc == ENC_GRU4REC ? (size_t)B * L * m.D : 0;
    double *buf = xmalloc((2 * P + 2 * (size_t)B * L + B + M + nd + 1) * sizeof(double)), *grad = buf + P;
    double *hist = grad + P, *mask = hist + (size_t)B * L, *target = mask + (size_t)B * L, *neg = target + B, *draws = neg + M;
    double loss_ref;
    int ok = ref_array(s, "params", P, buf) && ref_array(s, "hist", (size_t)B * L, hist) &&
             ref_array(s, "mask", (size_t)B * L, mask) && ref_array(s, "target", B, target) && ref_array(s, "neg", M, neg) &&
             ref_array(s, "draws", nd, draws) && ref_field(s, "loss", &loss_ref) && ref_array(s, "grad", P, grad) &&
             (t = ref_token(s)) && !strcmp(t, "end");
    for (size_t i = 0; ok && i < (size_t)B * L; i++) ok = hist[i] >= 0 && hist[i] < N && (mask[i] == 0 || mask[i] == 1);
    for (int i = 0; ok && i < B + M; i++) ok = target[i] >= 0 && target[i] < N; /* the targets, then neg */
    if (ok) {
        for (size_t i = 0; i < P; i++) m.mem[i] = (float)buf[i];
        for (size_t i = 0; i < (size_t)B * L; i++) { a.hist[i] = (int)hist[i]; a.mask[i] = (float)mask[i]; }
        for (int b = 0; b < B; b++) a.target[b] = (int)target[b];
        for (int j = 0; j < M; j++) a.neg[j] = (int)neg[j];
        for (size_t i = 0; i < nd; i++) (m.enc == ENC_MIND ? a.noise : a.drop)[i] = (float)draws[i];
        double loss = step_forward(&m, &a, &c, 1);
        step_backward(&m, &a, &c);
        float *g = xmalloc(P * sizeof(float));
        memcpy(g, m.gmem, P * sizeof(float));
        item_grad_dense(g, &m.ge, N, m.D);
        *err = fabs(loss - loss_ref) / fabs(loss_ref);
        snprintf(worst, cap, "%s: loss", name);
        for (int i = 0, off = 0; i < N_PARAM_TENSORS; off += (int)m.size[i++]) {
            double e = ref_difference(g + off, grad + off, m.size[i]);
            if (m.size[i] && !(e <= *err)) { *err = e; snprintf(worst, cap, "%s: d/d %s", name, TENSOR_NAMES[i]); }
        }
        free(g);
    }
    free(buf);
    acts_free(&a);
    model_free(&m);
    if (ok) return 1;
bad:
    snprintf(why, why_cap, "reference-steps.txt: case %s: malformed", name ? name : "?");
    return 0;
}

static int st_reference_steps(const char *path) {
    const char *what = "training step vs the reference's (float64)";
    FILE *f = fopen(path, "rb");
    char why[4300], worst[96] = "";
    snprintf(why, sizeof why, "cannot open %s (run from the repository, or give --expected DIR)", path);
    if (!f) return st_report(what, 0, why);
    fclose(f);
    Bytes b = read_all(path, "");
    char *s = b.p, *t;
    int cases = 0, ok = 1;
    double most = 0;
    while (ok && (t = ref_token(&s))) {
        double err = INFINITY;
        char w[96];
        if (strcmp(t, "case")) snprintf(why, sizeof why, "reference-steps.txt: expected 'case', got '%.40s'", t);
        ok = !strcmp(t, "case") && ref_step_case(&s, &err, w, sizeof w, why, sizeof why);
        if (!ok) break;
        cases++;
        if (!(err <= most)) { most = err; snprintf(worst, sizeof worst, "%s", w); }
    }
    free(b.p);
    if (!ok) return st_report(what, 0, why);
    char d[200];
    snprintf(d, sizeof d, "%d models: loss and gradients within %.1e (largest %.1e, %s)", cases, REF_STEP_TOL, most, worst);
    return st_report(what, cases > 0 && most <= REF_STEP_TOL, d);
}

/* Brute-force twin of evaluate(): every score by dotf, full sort per interest. */
static void evaluate_ref(Metrics *out, int cut, const Model *m, Acts *a, const Split *s, uint64_t key) {
    int K = m->K, D = m->D, N = m->N, L = m->L;
    double sum[4] = { 0 };
    Scored *lists = xmalloc((size_t)K * N * sizeof(Scored)), *cand = xmalloc((size_t)K * N * sizeof(Scored));
    int *R = xmalloc((size_t)cut * sizeof(int));
    for (int u = 0; u < s->n_users; u++) {
        int k = make_eval_row(a->hist, a->mask, s, u, L), n = s->off[u + 1] - s->off[u];
        user_vectors(m, a, u, 1, key);
        for (int q = 0; q < K; q++) {
            for (int j = 0; j < N; j++) lists[q * N + j] = (Scored){ dotf(a->v + q * D, m->p.item_emb + (size_t)j * D, D), j };
            scored_sort(lists + q * N, N, 0);
        }
        int c = cut < N ? cut : N, nr = merge_interests_ref(R, cand, lists, K, N, c, m->multi);
        double r[4];
        user_metrics(r, R, nr, s->items + s->off[u] + k, n - k, m->enc == ENC_POP);
        for (int j = 0; j < 4; j++) sum[j] += r[j];
    }
    int U = s->n_users;
    *out = (Metrics){ cut, U, sum[0] / U, sum[1] / U, sum[2] / U, sum[3] / U };
    free(lists); free(cand); free(R);
}

/* A random model and a random split with users of varied lengths. */
static void st_random_data(Model *m, Split *s, Config *c, int N, int U, uint64_t *rng) {
    model_init(m, N, c);
    s->n_users = U;
    s->user_id = xmalloc(U * sizeof(int64_t));
    s->off = xmalloc((U + 1) * sizeof(int));
    s->items = xmalloc((size_t)U * 60 * sizeof(int));
    s->off[0] = 0;
    for (int u = 0; u < U; u++) {
        int n = 2 + (int)rng_below(rng, 55);
        s->user_id[u] = u;
        for (int i = 0; i < n; i++) s->items[s->off[u] + i] = 1 + (int)rng_below(rng, N - 1);
        s->off[u + 1] = s->off[u] + n;
    }
}

/* The four metrics equal (as values). */
static int same_metrics(const Metrics *a, const Metrics *b) {
    return a->recall == b->recall && a->ndcg == b->ndcg && a->ndcg_ref == b->ndcg_ref && a->hitrate == b->hitrate;
}

/* Every encoder: the tiled evaluation against its brute-force twin, same metrics. */
static int st_eval(uint64_t *rng) {
    int ok = 1;
    char d[256] = "";
    for (int e = 0; e < N_ENCODERS; e++) {
        Config c = default_config();
        c.D = 24; c.K = 3; c.L = 7; c.enc = (Encoder)e; c.relu = e == ENC_MIND;
        Model m;
        Split s;
        st_random_data(&m, &s, &c, 1200, 37, rng);
        if (e == ENC_POP) /* counts with ties */
            for (int j = 0; j < m.N; j++) m.p.item_emb[j] = (float)rng_below(rng, 40);
        Acts a;
        acts_init(&a, &m, 24, 1); /* chunks of 24 and 13 users: full and partial groups of 8 and of 16 */
        int cuts[2] = { 20, 50 };
        uint64_t key = 77;
        Metrics fast[2], ref;
        evaluate(fast, cuts, 2, &m, &a, &s, key);
        for (int i = 0; i < 2; i++) {
            evaluate_ref(&ref, cuts[i], &m, &a, &s, key);
            ok &= same_metrics(&fast[i], &ref) && (cuts[i] < 50 || ref.hitrate > 0); /* hits to compare */
        }
        size_t k = strlen(d);
        snprintf(d + k, sizeof d - k, "%s%s R@50 %.3f", e ? ", " : "", ENC_NAMES[e], fast[1].recall);
        free_split(&s);
    }
    return st_report("tiled evaluation vs brute-force twin, every model", ok, d);
}

/* best_block against topk_block + merge_interests on random blocks of scores from a few
 * values (ties between items and between interests), with NaN, infinities and both zeros,
 * K 1 to 8, catalogues below and above the cut, blocks of any size: a user is selected
 * again exactly when id 0 is in one of its interest lists or a list is short (NaN scores,
 * N <= n), and otherwise gets the same R at the cut and at a smaller one. */
static int st_best_select(void) {
    uint64_t rng = 77;
    int ok = 1, again_seen = 0, exact_seen = 0;
    const float vals[10] = { -2, -1, -0.0f, 0, 1, 2, 3, INFINITY, -INFINITY, NAN };
    for (int trial = 0; trial < 400; trial++) {
        int K = 1 + (int)rng_below(&rng, 8), N = 2 + (int)rng_below(&rng, 300), maxn = 1 + (int)rng_below(&rng, 60);
        int q = BEST_LANES * K, nv = trial % 3 ? 7 : 10; /* a third of the trials with non-finite scores */
        if (maxn > N) maxn = N;
        float *St = xmalloc((size_t)N * q * sizeof(float)), *S2 = xmalloc((size_t)N * q * sizeof(float));
        for (size_t i = 0; i < (size_t)N * q; i++) St[i] = vals[rng_below(&rng, nv)];
        for (int j = 0; j < N; j++) /* S2: the same scores, user-major columns b K + k */
            for (int k = 0; k < K; k++)
                for (int b = 0; b < BEST_LANES; b++) S2[(size_t)j * q + b * K + k] = St[(size_t)j * q + k * BEST_LANES + b];
        uint64_t *heap = xmalloc((size_t)BEST_LANES * maxn * sizeof(uint64_t)), *h2 = xmalloc((size_t)q * maxn * sizeof(uint64_t));
        float *s0 = xmalloc((size_t)q * sizeof(float)), *thr2 = xmalloc((size_t)q * sizeof(float));
        int32_t *cnt = xcalloc((size_t)q, sizeof(int32_t));
        int hn2[64] = { 0 };
        BestSel sel = { .heap = heap, .s0 = s0, .cnt = cnt, .counting = 1 };
        for (int l = 0; l < BEST_LANES; l++) { sel.hn[l] = 0; sel.thr[l] = -INFINITY; }
        for (int i = 0; i < q; i++) thr2[i] = -INFINITY;
        for (int j0 = 0, nj; j0 < N; j0 += nj) {
            nj = 1 + (int)rng_below(&rng, 90);
            nj = nj < N - j0 ? nj : N - j0;
            best_block(&sel, St + (size_t)j0 * q, nj, K, j0, N, maxn);
            topk_block(h2, hn2, maxn, thr2, S2 + (size_t)j0 * q, nj, q, j0);
        }
        Scored lists[8 * 60];
        for (int b = 0; b < BEST_LANES; b++) {
            int again = 0, zero_listed = 0, short_list = 0, R[60], R2[60];
            for (int k = 0; k < K; k++) {
                heap_finish(lists + k * maxn, h2 + (size_t)(b * K + k) * maxn, hn2[b * K + k]);
                again |= cnt[k * BEST_LANES + b] < maxn;
                short_list |= hn2[b * K + k] < maxn; /* NaN scores are never listed */
                for (int i = 0; i < hn2[b * K + k]; i++) zero_listed |= lists[k * maxn + i].id == 0;
            }
            ok &= again == (zero_listed || short_list);
            again_seen += again;
            if (again) continue;
            exact_seen++;
            uint64_t *h = heap + (size_t)b * maxn;
            heap_sort(h, sel.hn[b]);
            for (int i = 0; i < sel.hn[b]; i++) R[i] = best_key_id(h[i], N);
            int cut[2] = { maxn, 1 + (int)rng_below(&rng, maxn) };
            for (int ci = 0; ci < 2; ci++) {
                int n = cut[ci] < hn2[b * K] ? cut[ci] : hn2[b * K], nr = merge_interests(R2, lists, K, maxn, n, 1);
                ok &= nr == (cut[ci] < sel.hn[b] ? cut[ci] : sel.hn[b]) && !memcmp(R, R2, nr * sizeof(int));
            }
        }
        free(St); free(S2); free(heap); free(h2); free(s0); free(thr2); free(cnt);
    }
    char d[96];
    snprintf(d, sizeof d, "400 random score blocks, 8 users each: %d users exact, %d selected again", exact_seen, again_seen);
    return st_report("best-interest selection vs merge of K lists", ok && again_seen && exact_seen, d);
}

/* Selection by best interest against selection per interest (the same metrics to the bit),
 * and against the brute-force twin where every score is finite: the multi-interest
 * encoders, K 1 to 8, with id 0 made the best item of some interests, a catalogue smaller
 * than the cut, two interests equal (ties between interests), items with equal scores,
 * infinite and NaN scores. Both paths must run: some users are selected again. */
static int st_eval_best(void) {
    uint64_t rng = 2024;
    int ok = 1;
    long users = 0, again = 0;
    for (int trial = 0; trial < 14; trial++) {
        Config c = default_config();
        Encoder enc[3] = { ENC_SA, ENC_DR, ENC_MIND };
        int Ks[5] = { 1, 2, 3, 4, 8 }, N = trial == 3 ? 40 : 700 + (int)rng_below(&rng, 600);
        c.enc = enc[trial % 3]; c.K = Ks[trial % 5]; c.D = 16 + 8 * (trial % 3); c.L = 7;
        Model m;
        Split s;
        st_random_data(&m, &s, &c, N, 29, &rng);
        int D = m.D, finite = 1;
        if (trial % 4 == 1) /* id 0 far out along a random direction: first for some interests */
            for (int d = 0; d < D; d++) m.p.item_emb[d] *= 40.0f;
        if (trial % 5 == 2) /* equal items: equal scores */
            for (int j = 10; j < 60; j++) memcpy(m.p.item_emb + (size_t)j * D, m.p.item_emb + 5 * D, D * sizeof(float));
        if (c.enc == ENC_SA && c.K > 1 && trial % 2 == 0) /* interests 0 and 1 equal: every score tied between them */
            memcpy(m.p.w2 + m.H, m.p.w2, m.H * sizeof(float));
        if (trial >= 11) { /* an infinite item (inf and NaN scores), a NaN item, a zero item */
            m.p.item_emb[7 * D] = INFINITY;
            m.p.item_emb[9 * D + 1] = NAN;
            memset(m.p.item_emb + 11 * D, 0, D * sizeof(float));
            finite = 0;
        }
        Acts a;
        acts_init(&a, &m, 8 + (int)rng_below(&rng, 20), 1);
        int cuts[2] = { 20, 50 };
        Metrics best[2], per[2], ref;
        long a0 = eval_time.again, u0 = eval_time.users;
        evaluate(best, cuts, 2, &m, &a, &s, 5);
        again += eval_time.again - a0; users += eval_time.users - u0;
        eval_per_interest = 1;
        evaluate(per, cuts, 2, &m, &a, &s, 5);
        eval_per_interest = 0;
        for (int i = 0; i < 2; i++) {
            ok &= !memcmp(&best[i], &per[i], sizeof best[i]);
            if (!finite) continue;
            evaluate_ref(&ref, cuts[i], &m, &a, &s, 5);
            ok &= same_metrics(&best[i], &ref);
        }
        free_split(&s);
        acts_free(&a);
        model_free(&m);
    }
    ok &= again > 0 && again < users;
    char d[96];
    snprintf(d, sizeof d, "14 models, %ld of %ld users selected again per interest", again, users);
    return st_report("best-interest selection vs per interest and brute force", ok, d);
}

/* A few training steps of every encoder with 1 thread and with `threads` threads:
 * identical bits. */
static int st_threads(uint64_t *rng, int threads) {
    int ok = 1;
    for (int e = 0; e < N_ENCODERS; e++) {
        Config c = default_config();
        c.D = 16; c.K = 3; c.L = 9; c.B = 12; c.M = 40; c.enc = (Encoder)e; c.relu = e == ENC_MIND;
        c.rbeta = 1; c.rlambda = e == ENC_SA || e == ENC_DR || e == ENC_MIND ? 100 : 0;
        float *res[2];
        uint64_t start = *rng;
        for (int run = 0; run < 2; run++) {
            Model m;
            Split s;
            uint64_t r = start, step_rng = 99;
            st_random_data(&m, &s, &c, 300, 40, &r);
            Acts a;
            acts_init(&a, &m, c.B, c.M);
            int perm[40];
            for (int u = 0; u < 40; u++) perm[u] = u;
            pool.n = run == 0 ? 1 : threads;
            for (int i = 0; i < 5; i++) train_step(&m, &a, &s, &c, &step_rng, perm);
            res[run] = m.mem;
            if (run == 1) ok &= !memcmp(res[0], res[1], m.n_params * sizeof(float));
            free_split(&s);
        }
        rng_next(rng);
    }
    char d[64];
    snprintf(d, sizeof d, "5 steps, 1 vs %d threads", threads);
    return st_report("training bits independent of -t, every model", ok, d);
}

/* Adam without a gradient on denormal first moments (adam_range_nograd: the decay by integer
 * rounding, the parameter left as it is) against the plain expressions, bit for bit, over 40
 * steps: moments of every size down through the denormals to the smallest and 0, of both
 * signs, parameters near 0 and second moments near the denormals (rows left to the plain loop). */
static int st_adam_stuck(uint64_t *rng) {
    enum { N = 64 * 40 };
    Model m[2] = { 0 };
    for (int r = 0; r < 2; r++) {
        m[r].mem = xmalloc(N * 4); m[r].mmem = xmalloc(N * 4); m[r].vmem = xmalloc(N * 4);
    }
    for (int i = 0; i < N; i++) {
        uint32_t u = (uint32_t)rng_next(rng), sign = u & 0x80000000u, kind = (u >> 8) % 8, mb;
        if (kind < 4) mb = sign | (uint32_t)(rng_next(rng) % 0x7fffff + 1) >> (kind * 7); /* denormal */
        else if (kind == 4) mb = sign;                                                         /* +-0 */
        else mb = sign | ((uint32_t)(rng_next(rng) % 0x10000000u) + 0x00800000u);            /* small normal */
        memcpy(&m[0].mmem[i], &mb, 4);
        float pv = (float)((int)(rng_next(rng) % 2001) - 1000) / 1000.0f;
        m[0].mem[i] = i % 97 == 0 ? pv * 1e-30f : pv;                   /* some p near 0: plain loop */
        m[0].vmem[i] = i % 89 == 0 ? 0x1p-124f : 1e-9f * (1 + i % 13);   /* some v soon denormal */
    }
    memcpy(m[1].mem, m[0].mem, N * 4); memcpy(m[1].mmem, m[0].mmem, N * 4); memcpy(m[1].vmem, m[0].vmem, N * 4);
    int ok = 1, stuck = 0;
    for (int step = 1; step <= 40; step++) {
        AdamCtx c0 = { &m[0], (float)(1e-3 / (1.0 - pow(0.9, step))), (float)sqrt(1.0 - pow(0.999, step)), 0 }, c1 = c0;
        c1.m = &m[1];
        adam_range_nograd(&c0, 0, N);
        adam_range_zero(&c1, 0, N);
        ok &= !memcmp(m[0].mem, m[1].mem, N * 4) && !memcmp(m[0].mmem, m[1].mmem, N * 4) &&
              !memcmp(m[0].vmem, m[1].vmem, N * 4);
    }
    for (int i = 0; i < N; i++) stuck += float_bits(m[0].mmem[i]) << 1 == 2;
    for (int r = 0; r < 2; r++) { free(m[r].mem); free(m[r].mmem); free(m[r].vmem); }
    char d[96];
    snprintf(d, sizeof d, "40 steps, %d elements, %d stuck at the smallest denormal: same bits", N, stuck);
    return st_report("Adam on denormal first moments vs plain", ok && stuck > 0, d);
}

/* Adam's first step from zero moments against PyTorch's (REMI-SPEC f.3): m = (1 - 0.9) g and
 * v = ((1 - 0.999) g) g, with 1 - beta taken in double and rounded to float, and each
 * parameter moving by lr sign(g) (the bias corrections cancel the moments' scale). */
static int st_adam_first(void) {
    const float g[4] = { 1.0f, 3.0f, -0.5f, 1e-3f }, p0[4] = { 0.5f, -0.25f, 1.0f, 0.0f };
    float p[4], mo[4] = { 0 }, v[4] = { 0 }, gc[4];
    Model m = { .mem = p, .mmem = mo, .vmem = v };
    memcpy(p, p0, sizeof p0);
    memcpy(gc, g, sizeof g);
    AdamCtx c = { &m, (float)(1e-3 / (1.0 - 0.9)), (float)sqrt(1.0 - 0.999), 0 };
    adam_range(&c, 0, 4, gc);
    const float c1 = (float)(1.0 - 0.9), c2 = (float)(1.0 - 0.999);
    int ok = 1;
    for (int i = 0; i < 4; i++) {
        float step = p0[i] - p[i], want = g[i] > 0 ? 1e-3f : -1e-3f;
        ok &= mo[i] == c1 * g[i] && v[i] == c2 * g[i] * g[i] && fabsf(step - want) < 1e-3f * 1e-4f && gc[i] == 0.0f;
    }
    char d[96];
    snprintf(d, sizeof d, "m %.9g v %.9g for g = 1 (PyTorch: 0.1f, 0.001f)", mo[0], v[0]);
    return st_report("Adam's first step: PyTorch's float constants", ok, d);
}

/* Two Adam steps through adam_step against PyTorch's update computed in double
 * (REMI-SPEC f.3), bias corrections included: a DNN's layer from zero with gradients g1,
 * then g2; the item table, with no gradient and zero moments, stays where it was. */
static int st_adam_steps(void) {
    Config c = default_config();
    c.enc = ENC_DNN; c.D = 2;
    Model m;
    model_init(&m, 3, &c);
    size_t e0 = m.size[0], n = m.n_params - e0; /* the layer: D x D after the item table */
    const double g[2][4] = { { 1.0, -3.0, 0.5, 1e-3 }, { -2.0, -1.0, 0.25, 4e-3 } }, lr = 1e-3;
    double mo[4] = { 0 }, v[4] = { 0 }, want[4] = { 0 }, err = 0;
    float table[6];
    memcpy(table, m.mem, sizeof table);
    memset(m.mem + e0, 0, n * sizeof(float));
    int ok = e0 == 6 && n == 4;
    for (int t = 1; t <= 2 && ok; t++) {
        for (size_t i = 0; i < n; i++) m.gmem[e0 + i] = (float)g[t - 1][i];
        adam_step(&m, (float)lr, 0);
        double bc1 = 1.0 - pow(0.9, t), bc2 = sqrt(1.0 - pow(0.999, t));
        for (size_t i = 0; i < n; i++) {
            mo[i] = 0.9 * mo[i] + 0.1 * g[t - 1][i];
            v[i] = 0.999 * v[i] + 0.001 * g[t - 1][i] * g[t - 1][i];
            want[i] -= lr / bc1 * mo[i] / (sqrt(v[i]) / bc2 + 1e-8);
            double d = fabs(m.mem[e0 + i] - want[i]) / fabs(want[i]);
            err = d > err ? d : err;
        }
    }
    ok &= err < 1e-5 && !memcmp(table, m.mem, sizeof table);
    char d[96];
    snprintf(d, sizeof d, "largest relative error %.1e after 2 steps", err);
    model_free(&m);
    return st_report("Adam through adam_step: two steps with bias corrections, as PyTorch in double", ok, d);
}

/* --remove-hits by hand: negatives holding the target, history items, id 0 and others,
 * against a full history window (its last position one of the negatives) and a padded one
 * (id 0 there is padding, not an item). */
static int st_hits_keep(void) {
    const int neg[8] = { 4, 0, 9, 7, 3, 9, 12, 5 }, full[4] = { 3, 5, 6, 12 }, padded[4] = { 5, 12, 0, 0 };
    const float want[3][8] = { { 1, 1, 0, 1, 1, 0, 1, 1 },  /* target 9 */
                               { 1, 1, 0, 1, 0, 0, 0, 0 },  /* and 3, 5, 12 of the full window */
                               { 1, 1, 0, 1, 1, 0, 0, 0 } }; /* and 5, 12 of the padded one */
    float keep[3][8];
    hits_keep(keep[0], neg, 8, 9, full, 4, HITS_TARGET);
    hits_keep(keep[1], neg, 8, 9, full, 4, HITS_HISTORY);
    hits_keep(keep[2], neg, 8, 9, padded, 4, HITS_HISTORY);
    return st_report("--remove-hits: the negatives kept, by hand (target; history, full and padded)",
                     !memcmp(keep, want, sizeof want), "");
}

/* Training targets (REMI-SPEC f.4): a user of n >= 5 items gets a position k uniform in
 * {4..n-1}, one of n < 5 the last; the history is the items before k. Users of 2 to 8
 * items, whose items name their positions, in 300 batches: every k drawn is allowed, its
 * history is right, and every allowed k is drawn. */
static int st_train_targets(uint64_t *rng) {
    enum { U = 7, L = 8 };
    int off[U + 1], items[64], perm[U], hist[U * L], target[U], seen[U][L + 1] = { { 0 } }, ok = 1;
    float mask[U * L];
    off[0] = 0;
    for (int u = 0; u < U; u++) {
        off[u + 1] = off[u] + u + 2;
        for (int i = 0; i < u + 2; i++) items[off[u] + i] = 100 * (u + 1) + i;
        perm[u] = u;
    }
    Split s = { U, NULL, off, items };
    Acts a = { .hist = hist, .mask = mask, .target = target };
    for (int rep = 0; rep < 300; rep++) {
        make_train_batch(&a, &s, perm, U, L, rng);
        for (int b = 0; b < U; b++) {
            int u = perm[b], n = u + 2, k = target[b] - 100 * (u + 1);
            ok &= k >= (n < 5 ? n - 1 : 4) && k < n && history_len(mask + b * L, L) == k;
            for (int l = 0; l < k && ok; l++) ok &= hist[b * L + l] == items[off[u] + l];
            if (ok) seen[u][k] = 1;
        }
    }
    for (int u = 0; u < U; u++)
        for (int k = u + 2 < 5 ? u + 1 : 4; k < u + 2; k++) ok &= seen[u][k];
    return st_report("training targets: the last item below 5 items, else uniform from the fifth on", ok, "");
}

/* user_metrics by hand (REMI-SPEC g.3): 4 retrieved, 6 targets (one twice), hits at
 * positions 1 and 3: recall 2/6, NDCG (1/log2 3 + 1/log2 5) / (1 + 1/log2 3), hit 1; and
 * targets none of which is retrieved: all 0. */
static int st_user_metrics(void) {
    const int R[4] = { 5, 9, 2, 7 }, T[6] = { 9, 3, 7, 11, 13, 3 };
    double r[4], z[4], ndcg = (1 / log2(3.0) + 1 / log2(5.0)) / (1 + 1 / log2(3.0));
    user_metrics(r, R, 4, T, 6, 1);
    user_metrics(z, R, 4, T + 3, 3, 1);
    int ok = fabs(r[0] - 2.0 / 6) < 1e-12 && fabs(r[1] - ndcg) < 1e-12 && fabs(r[2] - ndcg) < 1e-12 && r[3] == 1 &&
             z[0] == 0 && z[1] == 0 && z[2] == 0 && z[3] == 0;
    char d[96];
    snprintf(d, sizeof d, "recall %.4f ndcg %.4f", r[0], r[1]);
    return st_report("one user's metrics by hand: more targets than retrieved, a target twice", ok, d);
}

/* The full softmax (--neg 0) through step_forward against the cross-entropy over every item
 * in double, the target once: mean over the batch of logsumexp_j (r E_j) - r E_t. */
static int st_full_softmax(uint64_t *rng) {
    Config c = default_config();
    c.D = 8; c.K = 2; c.L = 5; c.B = 6; c.rbeta = 0; c.rlambda = 0;
    Model m;
    Split s;
    st_random_data(&m, &s, &c, 40, 10, rng);
    c.M = 0;
    resolve_negatives(&c, m.N);
    Acts a;
    acts_init(&a, &m, c.B, c.M);
    int perm[10];
    for (int u = 0; u < 10; u++) perm[u] = u;
    make_train_batch(&a, &s, perm, c.B, c.L, rng);
    for (int j = 0; j < c.M; j++) a.neg[j] = j;
    encoder_draws(&m, &a, &c, c.B, rng);
    double loss = step_forward(&m, &a, &c, 0), want = 0;
    for (int b = 0; b < c.B; b++) {
        double z = 0, st = 0;
        for (int j = 0; j < m.N; j++) {
            double sj = 0;
            for (int d = 0; d < m.D; d++) sj += (double)a.r[b * m.D + d] * m.p.item_emb[j * m.D + d];
            z += exp(sj);
            if (j == a.target[b]) st = sj;
        }
        want += (log(z) - st) / c.B;
    }
    char d[96];
    snprintf(d, sizeof d, "loss %.6f, in double %.6f", loss, want);
    acts_free(&a); model_free(&m); free_split(&s);
    return st_report("full softmax: the loss as cross-entropy over every item, in double", fabs(loss - want) < 1e-5 * want, d);
}

/* Adam with the item gradient kept by rows (ItemGrad) against a dense item gradient and
 * Adam over every element (the same bits), and --adam lazy: the rows the batch touches
 * move (mark_rows: so the rows the backward wrote are exactly those), the others do not. */
static int st_adam(uint64_t *rng) {
    Config c = default_config();
    c.D = 16; c.K = 3; c.L = 9; c.B = 12; c.M = 40; c.rbeta = 1; c.rlambda = 100;
    Model m[2];
    Split s;
    uint64_t start = *rng;
    for (int run = 0; run < 2; run++) { /* run 0: by rows; run 1: all dense */
        uint64_t r = start, step_rng = 11;
        st_random_data(&m[run], &s, &c, 300, 40, &r);
        if (run == 1) { free(m[run].ge.row); m[run].ge.row = NULL; }
        Acts a;
        acts_init(&a, &m[run], c.B, c.M);
        int perm[40];
        for (int u = 0; u < 40; u++) perm[u] = u;
        for (int i = 0; i < 4; i++) {
            if (run == 0) { train_step(&m[run], &a, &s, &c, &step_rng, perm); continue; }
            make_train_batch(&a, &s, perm, c.B, m[run].L, &step_rng);
            for (int j = 0; j < c.M; j++) a.neg[j] = (int)rng_below(&step_rng, (uint32_t)m[run].N);
            step_forward(&m[run], &a, &c, 1);
            step_backward(&m[run], &a, &c);
            adam_step(&m[run], c.lr, 0);
        }
        free_split(&s);
    }
    int same = !memcmp(m[0].mem, m[1].mem, m[0].n_params * sizeof(float));
    /* lazy: one more step from m[0]'s state */
    c.adam = "lazy";
    uint64_t r = start, step_rng = 12;
    Model lz;
    st_random_data(&lz, &s, &c, 300, 40, &r);
    memcpy(lz.mem, m[0].mem, lz.n_params * sizeof(float));
    memcpy(lz.mmem, m[0].mmem, lz.n_params * sizeof(float));
    memcpy(lz.vmem, m[0].vmem, lz.n_params * sizeof(float));
    lz.step = m[0].step;
    Acts a;
    acts_init(&a, &lz, c.B, c.M);
    int perm[40];
    for (int u = 0; u < 40; u++) perm[u] = u;
    train_step(&lz, &a, &s, &c, &step_rng, perm);
    unsigned char touched[300] = { 0 };
    mark_rows(touched, &a, c.B, lz.L, c.M, 1);
    int lazy_ok = lz.ge.n == 0, moved = 0, kept = 0; /* and Adam cleared the row map */
    for (int j = 0; j < lz.N; j++) {
        int diff = memcmp(lz.p.item_emb + (size_t)j * lz.D, m[0].p.item_emb + (size_t)j * lz.D, lz.D * sizeof(float));
        lazy_ok &= (touched[j] ? diff != 0 : diff == 0) && lz.ge.row[j] == -1;
        moved += touched[j] != 0; kept += !touched[j];
    }
    free_split(&s);
    char d[128];
    snprintf(d, sizeof d, "4 steps identical; lazy: %d rows moved, %d untouched rows kept", moved, kept);
    return st_report("Adam: item gradient by rows = dense; lazy", same && lazy_ok && moved > 0 && kept > 0, d);
}

/* The per-position layers on the real positions' rows (real_rows) against a row for every
 * position, as the reference computes: one step of SA, DR and MIND (with its ReLU layer) on a
 * batch with full, short, empty and non-prefix masks, RR and IHN on. The same loss, routing
 * matrices and interests (bits), gradients equal as values (a zero's sign may differ), and
 * after Adam the same parameters and moments (bits). A row map that leaves out a real
 * position fails it. */
static int st_real_rows_one(Encoder e, uint64_t start, int *rows) {
    Config c = default_config();
    c.D = 8; c.K = 3; c.L = 7; c.B = 6; c.M = 20; c.rbeta = 1; c.rlambda = 100;
    c.enc = e; c.relu = e == ENC_MIND;
    const char *masks[6] = { "1111111", "1110000", "0000000", "1000000", "1111100", "1001000" };
    Model m[2];
    Acts a[2];
    Split s;
    double loss[2];
    float *dE[2];
    for (int run = 0; run < 2; run++) { /* run 0: the real positions' rows; run 1: every position */
        uint64_t r = start;
        st_random_data(&m[run], &s, &c, 50, 10, &r);
        free_split(&s);
        acts_init(&a[run], &m[run], c.B, c.M);
        a[run].all_rows = run;
        for (int i = 0; i < c.B * c.L; i++) {
            a[run].mask[i] = masks[i / c.L][i % c.L] == '1';
            a[run].hist[i] = a[run].mask[i] != 0.0f ? 1 + (int)rng_below(&r, 49) : 0;
        }
        for (int b = 0; b < c.B; b++) a[run].target[b] = 1 + (int)rng_below(&r, 49);
        for (int j = 0; j < c.M; j++) a[run].neg[j] = (int)rng_below(&r, 50);
        encoder_draws(&m[run], &a[run], &c, c.B, &r);
        loss[run] = step_forward(&m[run], &a[run], &c, 1);
        step_backward(&m[run], &a[run], &c);
        dE[run] = xmalloc((size_t)m[run].size[0] * sizeof(float));
        item_grad_dense(dE[run], &m[run].ge, m[run].N, m[run].D);
    }
    size_t KL = (size_t)c.B * c.K * c.L, KD = (size_t)c.B * c.K * c.D, n = m[0].n_params, t = m[0].size[0];
    int ok = !memcmp(&loss[0], &loss[1], sizeof(double)) && !memcmp(a[0].att, a[1].att, KL * sizeof(float)) &&
             !memcmp(a[0].v, a[1].v, KD * sizeof(float));
    for (size_t i = t; i < n; i++) ok &= m[0].gmem[i] == m[1].gmem[i];
    for (size_t i = 0; i < t; i++) ok &= dE[0][i] == dE[1][i];
    for (int run = 0; run < 2; run++) adam_step(&m[run], c.lr, 0);
    ok &= !memcmp(m[0].mem, m[1].mem, n * sizeof(float)) && !memcmp(m[0].mmem, m[1].mmem, n * sizeof(float)) &&
          !memcmp(m[0].vmem, m[1].vmem, n * sizeof(float)) && a[1].R == c.B * c.L;
    *rows = a[0].R;
    for (int run = 0; run < 2; run++) { free(dE[run]); acts_free(&a[run]); model_free(&m[run]); }
    return ok;
}
static int st_real_rows(uint64_t *rng) {
    Encoder enc[3] = { ENC_SA, ENC_DR, ENC_MIND };
    int ok = 1, rows[3];
    for (int i = 0; i < 3; i++) ok &= st_real_rows_one(enc[i], *rng + (uint64_t)i, &rows[i]) && rows[i] == 18;
    char d[160];
    snprintf(d, sizeof d, "SA, DR, MIND on 18 of 42 rows: forward and after Adam same bits, gradients same values%s",
             ok ? "" : ": DIFFER");
    return st_report("per-position layers on real positions vs every position", ok, d);
}
/* big_calloc's arrays become resident only where written (what the arrays sized for every
 * position, and the gradient table, rely on), where calloc would make them resident whole:
 * glibc's mmap threshold raised by a mapped array freed, then a free, never written 12 MB
 * chunk on the heap below a live one, which calloc would hand out and clear (8 MB more). One
 * page written in 16 (8 MB on 4 KB pages): under a quarter of it more resident. */
static int st_pages(void) {
    const char *what = "arrays resident only where written";
    if (!BIG_MAPPED) return st_report(what, 1, "not checked: this build keeps its arrays on the heap (sanitizers)");
    char *volatile t = xmalloc((size_t)16 << 20); /* mapped; freeing it raises the threshold */
    t[0] = 1;
    free(t);
    char *volatile hole = xmalloc((size_t)12 << 20), *volatile pin = xmalloc((size_t)256 << 10);
    free(hole);
    long page = sysconf(_SC_PAGESIZE);
    size_t stride = 16 * (size_t)(page > 0 ? page : 4096), n = 128 * stride; /* 8 MB on 4 KB pages */
    double r0 = proc_mb("status", "VmRSS:");
    char *p = big_calloc(n, 0);
    for (size_t i = 0; i < n; i += stride) p[i] = 1;
    double grew = proc_mb("status", "VmRSS:") - r0, mb = n / 1048576.0;
    big_free(p, n);
    free(pin);
    if (r0 == 0) return st_report(what, 1, "not checked: no /proc/self/status");
    char d[128];
    snprintf(d, sizeof d, "%.0f MB, 128 pages written: %.2f MB more resident", mb, grew);
    return st_report(what, grew < mb / 4, d);
}

/* A NaN planted in W1: the step reports a non-finite loss, skips Adam, and the check that
 * names the offending tensor finds W1 and nothing else. */
static int st_nonfinite(uint64_t *rng) {
    Config c = default_config();
    c.D = 16; c.K = 3; c.L = 9; c.B = 12; c.M = 40; c.rbeta = 1; c.rlambda = 100;
    Model m;
    Split s;
    st_random_data(&m, &s, &c, 300, 40, rng);
    Acts a;
    acts_init(&a, &m, c.B, c.M);
    int perm[40];
    for (int u = 0; u < 40; u++) perm[u] = u;
    uint64_t r = 5;
    m.p.w1[7] = NAN;
    float loss = train_step(&m, &a, &s, &c, &r, perm);
    size_t n = 0, ng = 0;
    const char *t = nonfinite_tensor(&m, m.mem, &n), *tg = nonfinite_tensor(&m, m.gmem, &ng);
    char msg[4600];
    nonfinite_message(msg, sizeof msg, &m, 5, loss, "out/checkpoint.bin", 4);
    int ok = !isfinite(loss) && t && !strcmp(t, "W1") && n == 1 && m.step == 0 && tg &&
             strstr(msg, "iteration 5: the loss is nan; 1 non-finite values in the parameters W1;") &&
             strstr(msg, "the last good checkpoint is out/checkpoint.bin (iteration 4)");
    char d[128];
    snprintf(d, sizeof d, "loss %g, parameters: %s (%zu), first gradient: %s", loss, t ? t : "none", n, tg ? tg : "none");
    printf("  stop message: %s\n", msg);
    free_split(&s);
    return st_report("NaN in W1: no update, W1 named", ok, d);
}

static int st_transpose(void) {
    int shapes[][2] = { { 1, 1 }, { 16, 16 }, { 17, 33 }, { 256, 64 }, { 33, 16 }, { 5, 40 }, { 48, 20 }, { 64, 255 } };
    uint64_t rng = 5;
    int ok = 1;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1];
        size_t ld = (size_t)rows + 7; /* transpose_ld: a share of a wider matrix, the rest untouched */
        float *a = xmalloc((size_t)rows * cols * 4), *t = xmalloc((size_t)rows * cols * 4), *w = xmalloc(ld * cols * 4);
        gc_fill(a, (size_t)rows * cols, 1, &rng);
        transpose(t, a, rows, cols);
        for (size_t i = 0; i < ld * cols; i++) w[i] = -7.0f;
        transpose_ld(w + 3, ld, a, rows, cols);
        for (int j = 0; j < cols; j++)
            for (size_t i = 0; i < ld; i++) {
                float want = i >= 3 && i < 3 + (size_t)rows ? a[(i - 3) * cols + j] : -7.0f;
                ok &= (i < (size_t)rows ? t[(size_t)j * rows + i] == a[i * cols + j] : 1) && w[j * ld + i] == want;
            }
        free(a); free(t); free(w);
    }
    return st_report("transpose vs element by element", ok, "8 shapes, blocks of 16 and the edges; into a wider matrix");
}

/* prep's id table: a long id that probes a slot held by a short one (a half-full table, twenty
 * lengths) is compared by length first, and every id keeps its index (the sanitizer build
 * reports an over-read of the short one). */
static int st_prep_ids(void) {
    int ok = 1;
    char *id = xmalloc(70100);
    memset(id, 'a', 70100);
    for (int r = 0; r < 20; r++) {
        PrepIds t = { 0 };
        char s[16];
        for (int i = 0; i < 500; i++) ok &= prep_ids_intern(&t, s, (size_t)snprintf(s, sizeof s, "s%d", i)) == i;
        size_t len = 70000 + (size_t)r;
        ok &= prep_ids_intern(&t, id, len) == 500 && prep_ids_intern(&t, id, len - 1) == 501;
        ok &= prep_ids_intern(&t, id, len) == 500 && prep_ids_intern(&t, "s7", 2) == 7 && prep_id_len(&t, 501) == len - 1;
        prep_ids_free(&t);
    }
    free(id);
    return st_report("prep's id table", ok, "500 short ids and long ones of 70,000-70,020 bytes in 20 tables");
}

int cmd_selftest(int argc, char **argv) {
    const char *expected = "expected";
    int threads = 3;
    Flag flags[] = { { "--expected", F_STR, &expected, "folder holding setorder.txt and reference-steps.txt" },
                     { "-t", F_INT, &threads, "threads for the thread-invariance check" } };
    parse_flags(argc, argv, "selftest", "Kernels against scalar twins and other unit checks; exits 1 on failure.",
                flags, 2);
    check_range("-t", threads, 2, 256);
    pool_start(threads);
    uint64_t rng = 12345;
    char path[4096];
    snprintf(path, sizeof path, "%s/setorder.txt", expected);
    printf("selftest:\n");
    int ok = 1;
    ok &= st_gemm(&rng);
    ok &= st_gemm_packed(&rng);
    ok &= st_math();
    ok &= st_fmax(&rng);
    ok &= st_dots_kl(&rng);
    ok &= st_scatter(&rng);
    ok &= st_routing_span(&rng);
    ok &= st_attention_span(&rng);
    ok &= st_topk(&rng);
    ok &= st_merge();
    ok &= st_set_order(path);
    snprintf(path, sizeof path, "%s/reference-steps.txt", expected);
    ok &= st_reference_steps(path);
    ok &= st_eval(&rng);
    ok &= st_threads(&rng, threads);
    ok &= st_adam_first();
    ok &= st_adam_steps();
    ok &= st_hits_keep();
    ok &= st_train_targets(&rng);
    ok &= st_user_metrics();
    ok &= st_full_softmax(&rng);
    ok &= st_adam(&rng);
    ok &= st_adam_stuck(&rng);
    ok &= st_real_rows(&rng);
    ok &= st_nonfinite(&rng);
    ok &= st_merge_random(&rng);
    ok &= st_narrow(&rng);
    ok &= st_ssm_fused(&rng);
    ok &= st_rng();
    ok &= st_best_select();
    ok &= st_eval_best();
    ok &= st_transpose();
    ok &= st_prep_ids();
    ok &= st_pages(); /* last: it raises glibc's mmap threshold */
    printf("selftest: %s\n", ok ? "all passed" : "FAILED");
    return ok ? 0 : 1;
}

/* ======================================================================== fuzz
 * Every reader against mutated copies of valid inputs: split files, the raw formats of
 * prep, model files and checkpoints. Each case runs in a child process, which must end
 * with success or remi's clean error exit (status 1); a signal, or a sanitizer's status,
 * is a crash, and its input is kept for reproduction. */
static void write_all(const char *path, const char *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f) != 0) die("fuzz: cannot write %s", path);
}

/* One random edit of b (capacity grows as needed). */
static void mutate(Bytes *b, uint64_t *rng) {
    static const char *inserts[] = { "\r", "\xef\xbb\xbf", "", "\n", ",", "\t", "-", "99999999999999999999999",
                                     "-1", "0", "nan", "1e999", "\"", "\\u0000", " ", "\xff\xfe" };
    size_t at = b->n ? rng_below(rng, (uint32_t)b->n + 1) : 0;
    switch (rng_below(rng, 8)) {
    case 0: if (b->n) b->p[at % b->n] ^= (char)(1 << rng_below(rng, 8)); break;          /* flip a bit */
    case 1: if (b->n) b->p[at % b->n] = (char)rng_below(rng, 256); break;                  /* a random byte */
    case 2: b->n = at; break;                                                              /* truncate */
    case 3: { size_t len = 1 + rng_below(rng, 64);                                         /* delete a run */
              if (at + len > b->n) len = b->n - at;
              memmove(b->p + at, b->p + at + len, b->n - at - len); b->n -= len; break; }
    default: {                                                                             /* insert text */
        const char *ins = inserts[rng_below(rng, sizeof inserts / sizeof *inserts)];
        size_t len = strlen(ins), rep = rng_below(rng, 8) == 0 ? 5000 : 1;             /* sometimes a long run */
        if (!len) { ins = "\0"; len = 1; }
        b->p = xrealloc(b->p, b->n + len * rep + 1);
        memmove(b->p + at + len * rep, b->p + at, b->n - at);
        for (size_t r = 0; r < rep; r++) memcpy(b->p + at + r * len, ins, len);
        b->n += len * rep;
    } }
}

typedef enum { FZ_SPLIT, FZ_ITEM_MAP, FZ_PREP_PAIRS, FZ_PREP_SEQ, FZ_PREP_JSON, FZ_MODEL, FZ_CKPT, FZ_METRICS, N_FZ } FuzzKind;
static const char *FZ_NAMES[N_FZ] = { "split file", "item map", "prep pairs", "prep sequence", "prep json", "model file",
                                      "checkpoint", "metrics.jsonl" };
/* Where a kind's input is written under the fuzz folder: report reads a run folder's metrics.jsonl. */
static void fuzz_input_path(char *path, size_t cap, const char *dir, FuzzKind k) {
    snprintf(path, cap, k == FZ_METRICS ? "%s/run/metrics.jsonl" : "%s/input", dir);
}

/* The reader of one kind on `path`, in the child. */
static void fuzz_target(FuzzKind k, const char *path, const char *dir) {
    Config c = default_config();
    Model m;
    Split s;
    char out[4200];
    snprintf(out, sizeof out, "%s/prep-out", dir);
    switch (k) {
    case FZ_SPLIT: load_split(&s, path, 400, NULL, 2); break;
    case FZ_ITEM_MAP: read_item_map(path, NULL, 0); break;
    case FZ_PREP_PAIRS: {
        char *argv[] = { "prep", "--input", (char *)path, "--name", "f", "--out", out, "--sep", "comma", "--header",
                         "--time-col", "3", "--min", "2" };
        cmd_prep(sizeof argv / sizeof *argv, argv);
        break;
    }
    case FZ_PREP_SEQ: {
        char *argv[] = { "prep", "--input", (char *)path, "--name", "f", "--out", out, "--format", "sequence",
                         "--min", "2" };
        cmd_prep(sizeof argv / sizeof *argv, argv);
        break;
    }
    case FZ_PREP_JSON: {
        char *argv[] = { "prep", "--input", (char *)path, "--name", "f", "--out", out, "--preset", "book", "--min", "2" };
        cmd_prep(sizeof argv / sizeof *argv, argv);
        break;
    }
    case FZ_MODEL: model_load(&m, &c, path); break;
    case FZ_CKPT: { Stream st = ckpt_open(path, &c); fclose(st.f); check_config(&c); break; }
    case FZ_METRICS: { /* the whole report: the reader, the table and the negatives figure */
        char run[4200], svg[4200];
        snprintf(run, sizeof run, "%s/run", dir);
        snprintf(svg, sizeof svg, "%s/negatives.svg", dir);
        char *argv[] = { "report", "--negatives-svg", svg, run };
        cmd_report(sizeof argv / sizeof *argv, argv);
        break;
    }
    default: break;
    }
}

/* Valid inputs of each kind: fixtures from `expected`, a model and a checkpoint made here. */
static void fuzz_fixtures(Bytes *fx, const char *expected, const char *dir) {
    char path[4200];
    const char *hint = "fuzz reads its fixtures from --expected";
    snprintf(path, sizeof path, "%s/tiny/tiny_valid.txt", expected);
    fx[FZ_SPLIT] = read_all(path, hint);
    if (fx[FZ_SPLIT].n > 3000) fx[FZ_SPLIT].n = 3000; /* whole lines: cut after a newline */
    while (fx[FZ_SPLIT].n && fx[FZ_SPLIT].p[fx[FZ_SPLIT].n - 1] != '\n') fx[FZ_SPLIT].n--;
    Bytes map = { xmalloc(1024), 0 }; /* items 1..40 with raw ids, as prep writes them */
    for (int i = 1; i <= 40; i++) map.n += (size_t)snprintf(map.p + map.n, 1024 - map.n, "r%d,%d\n", 7 * i, i);
    fx[FZ_ITEM_MAP] = map;
    snprintf(path, sizeof path, "%s/prep/a_pairs_time.csv", expected);
    fx[FZ_PREP_PAIRS] = read_all(path, hint);
    snprintf(path, sizeof path, "%s/prep/b_sequence.txt", expected);
    fx[FZ_PREP_SEQ] = read_all(path, hint);
    snprintf(path, sizeof path, "%s/prep/e_book.json", expected);
    fx[FZ_PREP_JSON] = read_all(path, hint);
    Config c = default_config();
    c.D = 4; c.K = 2; c.L = 3; c.enc = ENC_MIND; c.model = "mind"; c.relu = 1;
    Model m;
    model_init(&m, 9, &c);
    snprintf(path, sizeof path, "%s/model.bin", dir);
    model_save(&m, m.mem, &c, path);
    fx[FZ_MODEL] = read_all(path, hint);
    int perm[3] = { 2, 0, 1 };
    TrainState st = { .it = 5, .pass = 1, .rng = 3, .perm = perm, .best = m.mem };
    snprintf(path, sizeof path, "%s/checkpoint.bin", dir);
    ckpt_write(path, &c, &m, &st, 3, 0);
    fx[FZ_CKPT] = read_all(path, hint);
    snprintf(path, sizeof path, "%s/tiny_sa_metrics.jsonl", expected);
    fx[FZ_METRICS] = read_all(path, hint);
    snprintf(path, sizeof path, "%s/run", dir);
    if (mkdir(path, 0777) != 0) die("fuzz: cannot create %s: %s", path, strerror(errno));
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

int cmd_fuzz(int argc, char **argv) {
    const char *expected = "expected", *keep = ".";
    int iters = 500;
    uint64_t seed = 1;
    Flag flags[] = { { "--iters", F_INT, &iters, "mutated inputs to try" },
                     { "--seed", F_U64, &seed, "seed of the mutations" },
                     { "--expected", F_STR, &expected, "folder holding the fixtures (tiny/, prep/)" },
                     { "--keep", F_STR, &keep, "folder where a crashing input is saved" } };
    parse_flags(argc, argv, "fuzz", "Feed every reader mutated valid inputs; each must succeed or fail cleanly.\n"
                "Exits 1 and keeps the input if one crashes.", flags, sizeof flags / sizeof *flags);
    check_range("--iters", iters, 1, 1e9);
    char dir[] = "/tmp/remi-fuzz-XXXXXX";
    if (!mkdtemp(dir)) die("fuzz: cannot create a temporary folder: %s", strerror(errno));
    Bytes fx[N_FZ];
    fuzz_fixtures(fx, expected, dir);
    uint64_t rng = seed;
    int crashes = 0, clean[2] = { 0, 0 };
    char path[4200];
    for (int i = 0; i < iters; i++) {
        FuzzKind k = (FuzzKind)(i % N_FZ);
        fuzz_input_path(path, sizeof path, dir, k);
        Bytes b = { xmalloc(fx[k].n + 1), fx[k].n };
        memcpy(b.p, fx[k].p, b.n);
        for (int e = 1 + (int)rng_below(&rng, 3); e > 0; e--) mutate(&b, &rng);
        write_all(path, b.p, b.n);
        fflush(stdout);
        pid_t pid = fork();
        if (pid < 0) die("fuzz: fork failed: %s", strerror(errno));
        if (pid == 0) {
            if (!freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr)) _exit(2);
            fuzz_target(k, path, dir);
            exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        if (code == 0 || code == 1) clean[code]++;
        else {
            char saved[4300];
            snprintf(saved, sizeof saved, "%s/fuzz-crash-%d.bin", keep, i);
            write_all(saved, b.p, b.n);
            printf("fuzz: %s case %d %s %d; input saved as %s\n", FZ_NAMES[k], i,
                   WIFSIGNALED(status) ? "killed by signal" : "exit status", WIFSIGNALED(status) ? WTERMSIG(status) : code,
                   saved);
            crashes++;
        }
        free(b.p);
    }
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    printf("fuzz: %d inputs, %d accepted, %d refused cleanly, %d crashed\n", iters, clean[0], clean[1], crashes);
    return crashes ? 1 : 0;
}

/* ======================================================================== bench
 * Times a training step and an evaluation pass, beside the FMA peak and the memory
 * bandwidth measured in the same run (see PERF.md for the budget). */
#ifndef REMI_CFLAGS
#define REMI_CFLAGS "?"
#endif

typedef struct { long iters; float out[256]; } FmaCtx;
/* 12 independent chains x = x m + a of VW-lane vectors per thread: with contraction (only
 * fma_task is compiled with it) the machine's FMA peak; without (muladd_task), a separate
 * multiply and add, as remi's kernels do unless built with FMA=1: on Zen 4 about 92% of
 * that peak, on cores whose adds share the FMA units (Intel's) half. Contraction is a
 * function attribute for gcc and a pragma at the start of the body for clang, which ignores
 * the attribute (CONTRACT_ATTR, CONTRACT_BODY). */
#define CHAINS_TASK(name, attr, body)                                                   \
    attr static void name(void *ctx, int lo, int hi) {                                  \
        body                                                                            \
        FmaCtx *f = ctx;                                                                \
        for (int t = lo; t < hi; t++) {                                                 \
            vfw x[12], m = { 0 }, a = { 0 };                                            \
            for (int i = 0; i < VW; i++) { m[i] = 0.9999999f; a[i] = 1e-7f; }           \
            for (int r = 0; r < 12; r++) x[r] = m * (float)r;                           \
            for (long it = 0; it < f->iters; it++)                                      \
                for (int r = 0; r < 12; r++) x[r] = x[r] * m + a;                       \
            float s = 0;                                                                \
            for (int r = 0; r < 12; r++) for (int i = 0; i < VW; i++) s += x[r][i];     \
            f->out[t] = s;                                                              \
        }                                                                               \
    }
CHAINS_TASK(fma_task, CONTRACT_ATTR, CONTRACT_BODY)
CHAINS_TASK(muladd_task, , )

/* The best GFLOP/s of `reps` runs of `task` on every thread, each thread doing `flop`. */
static double best_gflops(void (*task)(void *, int, int), void *ctx, double flop, int reps) {
    double best = 0;
    for (int rep = 0; rep < reps; rep++) {
        double t = now_sec();
        parallel_for(pool.n, task, ctx);
        double g = flop * pool.n / (now_sec() - t) / 1e9;
        best = g > best ? g : best;
    }
    return best;
}

/* GFLOP/s of the chains of `task` (fma_task: the FMA peak) on every thread; ~10 ms a run,
 * the best of ten survives a neighbour's burst. */
static double measure_peak(void (*task)(void *, int, int)) {
    FmaCtx f = { 4000000, { 0 } };
    return best_gflops(task, &f, 2.0 * 12 * VW * f.iters, 10);
}

typedef struct { const float *a; size_t n; double out[256]; } BwCtx;
static void bw_task(void *ctx, int lo, int hi) {
    BwCtx *b = ctx;
    size_t chunk = b->n / pool.n;
    for (int t = lo; t < hi; t++) {
        float s[16] = { 0 };
        const float *a = b->a + chunk * t;
        for (size_t i = 0; i + 16 <= chunk; i += 16)
            for (int c = 0; c < 16; c++) s[c] += a[i + c];
        double tot = 0;
        for (int c = 0; c < 16; c++) tot += s[c];
        b->out[t] = tot;
    }
}
/* GB/s of a streaming read over 512 MiB on every thread. */
static double measure_bandwidth(void) {
    size_t n = (size_t)128 << 20;
    float *a = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023);
    BwCtx b = { a, n, { 0 } };
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t = now_sec();
        parallel_for(pool.n, bw_task, &b);
        t = now_sec() - t;
        double g = n * sizeof(float) / t / 1e9;
        best = g > best ? g : best;
    }
    free(a);
    return best;
}

/* GFLOP/s of remi's matrix kernel with its operands in cache, on every thread: each thread
 * repeats its own C (512, n) = A (512, 64) B (64, n) (A 128 KB in L2, B in L1): as the
 * evaluation runs it, n 32 (a group's queries) and A packed once (pack_rows); as the
 * training's products run it, n 64 through gemm_run, which packs each row tile of A for its
 * 4 column tiles (PACK_COLS). The ceiling of the products, below the FMA peak: a multiply
 * and an add per term (unless built with FMA=1), and the loads and stores of each tile. */
typedef struct { int reps, packed, n; double out[256]; } KernelCtx;
enum { KM = 512, KN = 32, KK = 64 }; /* the evaluation's shape; the training's has 2 KN columns */
static void kernel_task(void *ctx, int lo, int hi) {
    KernelCtx *k = ctx;
    int n = k->n;
    float *a = xmalloc(KM * KK * sizeof(float)), *b = xmalloc(KK * n * sizeof(float));
    float *c = xmalloc((KM + MR) * n * sizeof(float)), *ap = xmalloc((KM + MR) * KK * sizeof(float)); /* rows to MR's multiple */
    for (int i = 0; i < KM * KK; i++) a[i] = (float)(i % 17) * 0.125f;
    for (int i = 0; i < KK * n; i++) b[i] = (float)(i % 13) * 0.25f;
    pack_rows(ap, a, KM, KK, KK);
    for (int t = lo; t < hi; t++) {
        for (int r = 0; r < k->reps; r++)
            if (k->packed) gemm_packed(c, n, ap, b, n, KM, n / NR * NR, KK, NULL, 0);
            else gemm_run((Gemm){ c, n, a, KK, 1, b, n, KM, n, KK, 0 }, 0);
        k->out[t] = c[KM * n - 1];
    }
    free(a); free(b); free(c); free(ap);
}
static double measure_kernel(int packed) { /* ~20 ms a run, the best of five */
    KernelCtx k = { packed ? 2000 : 1000, packed, packed ? KN : 2 * KN, { 0 } };
    return best_gflops(kernel_task, &k, 2.0 * KM * (k.n / NR * NR) * KK * k.reps, 5);
}

/* Microseconds per parallel region of empty tasks: the pool's hand-off there and back
 * (the best of five rounds of 2,000). */
static void empty_task(void *ctx, int lo, int hi) { (void)ctx; (void)lo; (void)hi; }
static double measure_handoff(void) {
    double best = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        double t = now_sec();
        for (int i = 0; i < 2000; i++) parallel_for(pool.n, empty_task, NULL);
        t = (now_sec() - t) / 2000 * 1e6;
        best = t < best ? t : best;
    }
    return best;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void cpu_name(char *buf, size_t n) {
    snprintf(buf, n, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            char *p = strchr(line, ':');
            if (p) { p += 1 + (p[1] == ' '); p[strcspn(p, "\n")] = 0; snprintf(buf, n, "%s", p); }
            break;
        }
    fclose(f);
}

/* Multiply-adds x 2 of a training step's products, forward and both backward products
 * (3x), for a batch whose histories hold `rows` real positions on average, the positions
 * that SA's hidden layer and attention sums, the capsules' maps and routing (real_rows,
 * real_span) and GRU4Rec's packed steps run on: the encoder's matrix products and routing,
 * and the sampled logits. Elementwise work is not counted. */
static double step_flops(const Model *m, const Config *c, double rows) {
    double B = c->B, D = m->D, H = m->H, K = m->K, G = m->G, M = c->M, enc = 0;
    switch (m->enc) {
    case ENC_SA: enc = B * rows * (D * H + H * K + K * D); break;
    case ENC_DR: enc = B * rows * (K * D * D + 3 * 2 * K * D); break; /* bilinear maps, routing */
    case ENC_MIND: enc = B * rows * (D * D + 3 * 2 * K * D) + (m->relu ? B * K * D * D : 0); break;
    case ENC_DNN: enc = B * D * D; break;
    case ENC_GRU4REC: enc = B * rows * (3 * G * D + 3 * G * G) + B * G * D; break;
    default: return 0;
    }
    return 2.0 * 3 * (enc + B * M * D);
}

/* A random dataset of the given size: U users with 5..44 interactions over N items, ids
 * drawn uniformly (for timing only). */
static void synthetic_dataset(Dataset *ds, int N, int U, int U_eval, uint64_t seed) {
    uint64_t r = seed;
    Split *sp[3] = { &ds->train, &ds->valid, &ds->test };
    int n_users[3] = { U, U_eval, U_eval };
    for (int s = 0; s < 3; s++) {
        Split *x = sp[s];
        x->n_users = n_users[s];
        x->user_id = xmalloc((size_t)x->n_users * sizeof(int64_t));
        x->off = xmalloc((size_t)(x->n_users + 1) * sizeof(int));
        x->items = xmalloc((size_t)x->n_users * 44 * sizeof(int));
        x->off[0] = 0;
        for (int u = 0; u < x->n_users; u++) {
            int n = 5 + (int)rng_below(&r, 40);
            x->user_id[u] = u;
            for (int i = 0; i < n; i++) x->items[x->off[u] + i] = 1 + (int)rng_below(&r, (uint32_t)N - 1);
            x->off[u + 1] = x->off[u] + n;
        }
    }
    ds->N = N;
}

/* One line of the parallel regions' mean milliseconds per step, longest first, and the time
 * outside them (serial code), from region_time over `steps` steps of `total` seconds. */
static void region_report(char *out, size_t cap, int steps, double total) {
    int order[MAX_REGIONS], n = region_time.n;
    double inside = 0;
    for (int i = 0; i < n; i++) { order[i] = i; inside += region_time.sec[i]; }
    for (int i = 1; i < n; i++) /* insertion sort by time, longest first */
        for (int j = i; j > 0 && region_time.sec[order[j]] > region_time.sec[order[j - 1]]; j--) {
            int x = order[j]; order[j] = order[j - 1]; order[j - 1] = x;
        }
    size_t len = snprintf(out, cap, "mean %.2f ms:", total / steps * 1e3);
    for (int i = 0; i < n && len < cap; i++)
        len += snprintf(out + len, cap - len, " %s %.2f,", region_time.name[order[i]], region_time.sec[order[i]] / steps * 1e3);
    if (len < cap) snprintf(out + len, cap - len, " outside regions %.2f", (total - inside) / steps * 1e3);
}

/* Median milliseconds of `steps` training steps; phase: the mean ms per step of batch,
 * forward, backward and Adam; real: the mean real positions per history; touched_rows: the
 * item rows one batch touches; regions (when not NULL): region_report's line. */
static double bench_steps(Model *m, Acts *a, const Split *train, const Config *c, int steps, double *phase,
                          double *real, int *touched_rows, char *regions, size_t cap) {
    int *perm = xmalloc(train->n_users * sizeof(int));
    for (int u = 0; u < train->n_users; u++) perm[u] = u;
    uint64_t rng = c->seed;
    for (int i = 0; i < 5; i++) train_step(m, a, train, c, &rng, perm);
    double *t = xmalloc(steps * sizeof(double)), p0[4] = { step_time.batch, step_time.forward, step_time.backward,
                                                          step_time.adam };
    *real = 0;
    region_time.n = 0;
    region_time.on = regions != NULL;
    double total = 0;
    for (int i = 0; i < steps; i++) {
        double t0 = now_sec();
        train_step(m, a, train, c, &rng, perm);
        t[i] = now_sec() - t0;
        total += t[i];
        for (int j = 0; j < c->B * c->L; j++) *real += a->mask[j];
    }
    region_time.on = 0;
    if (regions) region_report(regions, cap, steps, total);
    *real /= (double)steps * c->B;
    unsigned char *touched = xcalloc((size_t)m->N, 1); /* the last batch's touched rows, for Adam's bytes */
    mark_rows(touched, a, c->B, m->L, c->M, 1);
    int rows = 0;
    for (int j = 0; j < m->N; j++) rows += touched[j];
    free(touched);
    *touched_rows = rows;
    double p1[4] = { step_time.batch, step_time.forward, step_time.backward, step_time.adam };
    for (int i = 0; i < 4; i++) phase[i] = (p1[i] - p0[i]) / steps * 1e3;
    qsort(t, steps, sizeof *t, cmp_double);
    double med = t[steps / 2] * 1e3;
    free(t); free(perm);
    return med;
}

/* Median of 3 validation passes, in seconds; the mean seconds per pass of each phase
 * (eval_time: vectors, then the threads' summed products, top-k, merge + metrics). */
static double bench_eval(const Model *m, Acts *a, const Split *valid, const Config *c, double *phase, long *again) {
    int cut = 50;
    Metrics mv;
    long a0 = eval_time.again;
    double te[3], p0[4] = { eval_time.vectors, eval_time.products, eval_time.topk, eval_time.metrics };
    for (int i = 0; i < 3; i++) {
        double t0 = now_sec();
        evaluate(&mv, &cut, 1, m, a, valid, eval_noise_key(c->mind_eval, c->seed, i + 1));
        te[i] = now_sec() - t0;
    }
    double p1[4] = { eval_time.vectors, eval_time.products, eval_time.topk, eval_time.metrics };
    for (int i = 0; i < 4; i++) phase[i] = (p1[i] - p0[i]) / 3;
    *again = (eval_time.again - a0) / 3;
    qsort(te, 3, sizeof *te, cmp_double);
    return te[1];
}

/* The benchmark of one dataset, on 1 thread and on all of them. */
static void bench_dataset(const char *label, const Dataset *ds, Config c, int steps, const double *peak,
                          const double *kern, const double *kpack, const double *bw, int threads, int regions) {
    resolve_negatives(&c, ds->N);
    int peak_known = rss_peak_reset();
    Model m;
    model_init(&m, ds->N, &c);
    Acts a;
    acts_init(&a, &m, train_rows(&c), c.M);
    printf("\n== %s: %d items, %d training users, %d validation users; model %s, D %d K %d L %d B %d M %d\n", label,
           ds->N - 1, ds->train.n_users, ds->valid.n_users, c.model, m.D, m.K, c.L, c.B, c.M);
    double step[2], phase[2][4], real = 0, ev[2], evp[2][4];
    long again = 0;
    int rows = 0;
    int nt[2] = { 1, threads }, ns = threads > 1 ? 2 : 1; /* the settings: 1 thread, and -t if it is more */
    char reg[2][2048];
    for (int i = ns - 1; i >= 0; i--) { /* -t first: after a long single-thread phase the workers wake slowly */
        pool.n = nt[i];
        step[i] = bench_steps(&m, &a, &ds->train, &c, steps, phase[i], &real, &rows, regions ? reg[i] : NULL, sizeof reg[i]);
        ev[i] = bench_eval(&m, &a, &ds->valid, &c, evp[i], &again);
    }
    if (ns == 1) { /* -t 1: index 1 (the -t figures) is the 1-thread run */
        step[1] = step[0], ev[1] = ev[0];
        memcpy(phase[1], phase[0], sizeof phase[0]), memcpy(evp[1], evp[0], sizeof evp[0]);
    }
    pool.n = threads;
    /* Adam's bytes: parameter and both moments read and written, the gradient read and zeroed
     * where it can be non-zero (every tensor but the item table, and its touched rows) */
    double grads = (double)m.n_params - m.size[0] + (double)rows * m.D;
    double flops = step_flops(&m, &c, real), adam_bytes = m.enc == ENC_POP ? 0 : 24.0 * m.n_params + 8.0 * grads;
    double eflops = 2.0 * ds->valid.n_users * m.K * (double)ds->N * m.D;
    if (m.enc == ENC_SA || m.enc == ENC_DR || m.enc == ENC_MIND)
        printf("per-position layers: %.1f rows per sample of %d positions (the padded ones are skipped: real_rows, "
               "real_span); the "
               "step's arithmetic %.2f GFLOP, %.2f with every position\n", real, m.L, flops / 1e9,
               step_flops(&m, &c, m.L) / 1e9);
    printf("train step (median of %d): %.2f ms on 1 thread", steps, step[0]);
    if (ns > 1) printf(", %.2f ms on %d: scaling %.2fx", step[1], threads, step[0] / step[1]);
    printf("; %.0f sequences/s\n", c.B / step[1] * 1e3);
    for (int i = 0; i < ns; i++) {
        double fl = flops / (peak[i] * 1e9) * 1e3, fa = adam_bytes / (bw[i] * 1e9) * 1e3;
        char fr[40] = "", ar[40] = ""; /* the rates, where there is arithmetic and an Adam (not Pop's) */
        if (flops > 0) snprintf(fr, sizeof fr, " (%.1f GFLOP/s)", flops / ((phase[i][1] + phase[i][2]) * 1e-3) / 1e9);
        if (adam_bytes > 0) snprintf(ar, sizeof ar, " (%.1f GB/s)", adam_bytes / (phase[i][3] * 1e-3) / 1e9);
        printf("  %d thread(s): batch %.2f  forward + backward %.2f ms%s  Adam %.2f ms%s\n", nt[i], phase[i][0],
               phase[i][1] + phase[i][2], fr, phase[i][3], ar);
        if (flops > 0)
            printf("    floor %.2f ms (%.2f GFLOP at %.0f GFLOP/s + %.0f MB of Adam at %.1f GB/s): step / floor = %.2f "
                   "(%.2f with the matrix kernel's ceiling for the arithmetic)\n", fl + fa, flops / 1e9, peak[i],
                   adam_bytes / 1e6, bw[i], step[i] / (fl + fa), step[i] / (flops / (kern[i] * 1e9) * 1e3 + fa));
        if (regions) printf("    parallel regions, ms per step (%s)\n", reg[i]);
    }
    printf("evaluation: %.3f s on 1 thread", ev[0]);
    if (ns > 1) printf(", %.3f s on %d: scaling %.2fx", ev[1], threads, ev[0] / ev[1]);
    printf("; scoring %.1f GFLOP/s = %.0f%% of the %.0f GFLOP/s peak\n", eflops / ev[1] / 1e9,
           100.0 * eflops / ev[1] / 1e9 / peak[1], peak[1]);
    int packs = eval_packs(m.K, eval_by_best(&m));
    for (int i = 0; i < ns; i++) { /* the threads' time by phase; the products' own speed against the per-thread peak */
        double *p = evp[i], busy = p[1] + p[2] + p[3], rate = eflops / p[1] * nt[i] / 1e9;
        printf("  %d thread(s): interest vectors %.3f s; threads' time: products %.0f%% (%.1f GFLOP/s = %.0f%% of peak, "
               "%.0f%% of the %skernel's), top-k %.0f%%, merge + metrics %.0f%%\n", nt[i], p[0], 100 * p[1] / busy, rate,
               100 * rate / peak[i], 100 * rate / (packs ? kpack[i] : kern[i]), packs ? "packed " : "", 100 * p[2] / busy,
               100 * p[3] / busy);
    }
    if (eval_by_best(&m)) printf("  selection by best interest; users selected again per interest: %ld of %d\n", again, ds->valid.n_users);
    size_t data_bytes = 0;
    const Split *sp[3] = { &ds->train, &ds->valid, &ds->test };
    for (int i = 0; i < 3; i++) data_bytes += (size_t)sp[i]->off[sp[i]->n_users] * 4 + (size_t)sp[i]->n_users * 12;
    double need = (12.0 * m.n_params + data_bytes) / 1048576.0, rss = proc_mb("status", peak_known ? "VmHWM:" : "VmRSS:");
    printf("memory: %.0f MB resident (%s); parameters + Adam moments + data = %.0f MB: ratio %.2f; on huge pages "
           "now: %.0f MB\n", rss, peak_known ? "peak" : "at the end", need, rss / need, proc_mb("smaps_rollup", "AnonHugePages:"));
    acts_free(&a);
    model_free(&m);
}

enum { SYN_USERS = 20000 }; /* the synthetic dataset's training users (and a tenth as many validation users) */
int cmd_bench(int argc, char **argv) {
    Config c = default_config();
    const int BOOK_ITEMS = 367983; /* the reference's N for Amazon Book (REMI-SPEC) */
    int steps = 50, book = BOOK_ITEMS, regions = 0;
    Flag flags[] = { MODEL_FLAGS(c), STEP_FLAGS(c), { "--steps", F_INT, &steps, "timed training steps" },
                     { "--synthetic-items", F_INT, &book, "items of the synthetic dataset (0 = skip it)" },
                     { "--regions", F_BOOL, &regions, "also time each parallel region of the step (by task function)" } };
    parse_flags(argc, argv, "bench",
                "Time training steps and evaluation passes on DATA/NAME and on a synthetic dataset of Amazon\n"
                "Book's size, on 1 thread and on -t threads, against the FMA peak and the memory bandwidth\n"
                "measured in the same run.", flags, sizeof flags / sizeof *flags);
    check_config(&c);
    check_range("--steps", steps, 1, 100000);
    check_range("--synthetic-items", book, 0, 1e8);
    Dataset ds; /* the users a batch needs, before anything is measured */
    load_dataset(&ds, c.data, c.name);
    check_batch_users(&ds.train, c.B, c.data, c.name);
    if (book > 0 && c.B > SYN_USERS)
        die("the synthetic dataset has %d training users, fewer than --batch %d; lower --batch", SYN_USERS, c.B);
    for (int i = 0; i < 1 + (book > 0); i++) { /* both datasets' memory */
        Config ci = c;
        int N = i ? book + 1 : ds.N;
        resolve_negatives(&ci, N);
        check_train_fits(N, &ci, 0);
    }
    pool_start(c.threads);
    char cpu[256];
    cpu_name(cpu, sizeof cpu);
    printf("remi bench: %s, -t %d, flags: %s\n", cpu, c.threads, REMI_CFLAGS);
    if (c.threads > online_cpus()) /* the products' rates count each thread's own time, as if on a core of its own */
        printf("note: -t %d is more threads than the %d online CPUs: the rates per thread's time overstate the "
               "machine's, and the ratios to the ceilings mean little\n", c.threads, online_cpus());
    double peak[2], kern[2], kpack[2], bw[2], muladd[2];
    int nt[2] = { 1, c.threads }, ns = c.threads > 1 ? 2 : 1;
    for (int i = 0; i < ns; i++) {
        pool.n = nt[i];
        peak[i] = kern[i] = kpack[i] = muladd[i] = 0;
        for (int round = 0; round < 3; round++) { /* best of three rounds a moment apart: a host that holds
                                                     back a CPU for a while does not set the ceilings */
            double p = measure_peak(fma_task), ma = measure_peak(muladd_task), k = measure_kernel(0), kp = measure_kernel(1);
            peak[i] = p > peak[i] ? p : peak[i];
            muladd[i] = ma > muladd[i] ? ma : muladd[i];
            kern[i] = k > kern[i] ? k : kern[i];
            kpack[i] = kp > kpack[i] ? kp : kpack[i];
            nanosleep(&(struct timespec){ 0, 100000000 }, NULL);
        }
        bw[i] = measure_bandwidth();
        printf("ceilings, %d thread(s): FMA peak %.1f GFLOP/s, streaming read %.1f GB/s", nt[i], peak[i], bw[i]);
        if (nt[i] > 1) printf(", hand-off %.2f us per parallel region", measure_handoff());
        printf("\n  separate multiply and add: %.1f GFLOP/s = %.0f%% of the FMA peak; matrix kernel (%s), operands in "
               "cache: %.1f GFLOP/s = %.0f%% of the FMA peak", muladd[i], 100 * muladd[i] / peak[i],
               PRODUCTS_FUSED ? "fused multiply-add" : "multiply and add", kern[i], 100 * kern[i] / peak[i]);
        if (!PRODUCTS_FUSED) printf(", %.0f%% of multiply and add", 100 * kern[i] / muladd[i]);
        printf("; with A packed (evaluation): %.1f GFLOP/s = %.0f%%\n", kpack[i], 100 * kpack[i] / peak[i]);
    }
    if (ns == 1) peak[1] = peak[0], kern[1] = kern[0], kpack[1] = kpack[0], bw[1] = bw[0], muladd[1] = muladd[0];
    pool.n = c.threads;
    char label[4200];
    snprintf(label, sizeof label, "%s/%s", c.data, c.name);
    bench_dataset(label, &ds, c, steps, peak, kern, kpack, bw, c.threads, regions);
    if (book > 0) {
        Dataset syn;
        synthetic_dataset(&syn, book + 1, SYN_USERS, SYN_USERS / 10, 99);
        bench_dataset(book == BOOK_ITEMS ? "synthetic, Amazon Book size" : "synthetic", &syn, c, steps, peak, kern, kpack, bw,
                      c.threads, regions);
    }
    return 0;
}

/* ======================================================================== main */
#ifdef REMI_ASAN
/* Buffers live as long as the process (allocated once, freed by exit): not leaks. */
/* A sanitizer's error exits with 86 / 87, never with remi's clean-error status 1 (fuzz). */
const char *__asan_default_options(void) { return "detect_leaks=0:exitcode=86:allocator_may_return_null=1"; }
const char *__ubsan_default_options(void) { return "halt_on_error=1:print_stacktrace=1:exitcode=87"; }
#endif

static void main_usage(void) {
    printf("remi - REMI multi-interest candidate matching (RecSys 2023) in C\n\n"
           "usage: remi <command> [flags]     (remi <command> --help lists every flag)\n\n"
           "  train      train REMI / ComiRec-SA on data/ (default: data/beauty_*.txt)\n"
           "  eval       evaluate a saved model on the valid or test users\n"
           "  recommend  the top-N items for a history, with the interest that retrieved each\n"
           "  export     item embeddings and user interest vectors as TSV\n"
           "  inspect    routing collapse: statistics and a heatmap of the routing matrices\n"
           "  report     one table (mean +- std over seeds) and the negatives figure from finished runs\n"
           "  prep       turn a raw interaction file into split files\n"
           "  gradcheck  finite-difference check of every backward pass\n"
           "  selftest   fast kernels against scalar twins, evaluation checks\n"
           "  bench      time a step and an evaluation pass against the machine's ceilings\n"
           "  fuzz       feed every reader mutated inputs: each must succeed or fail cleanly\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) { main_usage(); return stdout_status(argc < 2); }
    catch_fatal_signals();
    struct { const char *name; int (*fn)(int, char **); } cmds[] = {
        { "train", cmd_train }, { "eval", cmd_eval }, { "prep", cmd_prep }, { "gradcheck", cmd_gradcheck },
        { "selftest", cmd_selftest }, { "bench", cmd_bench }, { "fuzz", cmd_fuzz },
        { "recommend", cmd_recommend }, { "export", cmd_export }, { "inspect", cmd_inspect },
        { "report", cmd_report },
    };
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++)
        if (!strcmp(argv[1], cmds[i].name)) return stdout_status(cmds[i].fn(argc - 1, argv + 1));
    die("unknown command '%s'; run `remi --help`", argv[1]);
}
#ifdef REMI_CLANG_WIDE
#pragma clang attribute pop
#endif
