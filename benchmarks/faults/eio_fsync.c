/* An LD_PRELOAD shim that makes fsync(2) and fdatasync(2) fail with EIO, as a disk with a
 * failing sector or a lost connection to networked storage does. benchmarks/faults/disk.py
 * compiles it at run time (gcc -shared -fPIC -O2 -o eio_fsync.so eio_fsync.c -ldl) into
 * .bench/faults/; no binary is committed.
 *
 * Python's os.fsync and SQLite both call the C library's fsync/fdatasync through the dynamic
 * linker, so preloading this library intercepts them. The environment decides which calls fail:
 *
 *   EIO_FSYNC_UNDER  a folder: only calls on a descriptor whose path (readlink of
 *                    /proc/self/fd/N) is this folder or under it are considered; unset: none.
 *   EIO_FSYNC_EVERY  N: every Nth considered call fails (counted across threads); default 0 = never.
 *   EIO_FSYNC_LOG    a file: one line per failed call ("EIO <call> <path>"), appended.
 *
 * A failed call does not sync anything (it returns -1 at once with errno EIO), which is the
 * worst case a caller must handle: the data may or may not be on disk.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_long considered;

static int path_of(int fd, char *buf, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, buf, size - 1);
    if (n < 0) return -1;
    buf[n] = '\0';
    return 0;
}

static void note(const char *call, const char *path) {
    const char *log = getenv("EIO_FSYNC_LOG");
    if (!log) return;
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[4200];
    int n = snprintf(line, sizeof line, "EIO %s %s\n", call, path);
    if (n > 0) (void)!write(fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    close(fd);
}

/* 1 when this call is to fail (and it is logged), 0 when it goes to the real function. */
static int should_fail(int fd, const char *call) {
    const char *under = getenv("EIO_FSYNC_UNDER");
    const char *every_s = getenv("EIO_FSYNC_EVERY");
    long every = every_s ? atol(every_s) : 0;
    if (!under || !*under || every <= 0) return 0;
    char path[4096];
    if (path_of(fd, path, sizeof path) != 0) return 0;
    size_t len = strlen(under);
    while (len > 1 && under[len - 1] == '/') len--;
    if (strncmp(path, under, len) != 0 || (path[len] != '\0' && path[len] != '/')) return 0;
    if ((atomic_fetch_add(&considered, 1) + 1) % every != 0) return 0;
    note(call, path);
    return 1;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (should_fail(fd, "fsync")) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (should_fail(fd, "fdatasync")) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
