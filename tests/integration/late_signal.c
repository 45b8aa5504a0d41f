/* LD_PRELOAD shim for tests/integration/test_signals.py: puts a signal at the instant that
 * went unanswered.  Before each blocking poll(2) / epoll_wait(2) it sleeps LATE_SIGNAL_MS in
 * user space -- after the interpreter's last check for signals, before the wait begins.  A
 * signal that lands in that sleep is noted by CPython's C-level handler and then, unless
 * something wakes the wait, waits with it for its whole timeout.  Each signal seen there is
 * logged to LATE_SIGNAL_LOG, so the test knows it hit the window. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

static void late(int timeout) {
    const char *ms = getenv("LATE_SIGNAL_MS");
    if (!ms || timeout == 0)
        return;
    struct timespec left = {atoi(ms) / 1000, (atoi(ms) % 1000) * 1000000L};
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
        const char *log = getenv("LATE_SIGNAL_LOG");
        int fd = log ? open(log, O_WRONLY | O_CREAT | O_APPEND, 0600) : -1;
        if (fd >= 0) {
            (void)!write(fd, "in the window\n", 14);
            close(fd);
        }
    }
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
    static int (*real)(struct pollfd *, nfds_t, int);
    if (!real)
        real = (int (*)(struct pollfd *, nfds_t, int))dlsym(RTLD_NEXT, "poll");
    late(timeout);
    return real(fds, n, timeout);
}

int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout) {
    static int (*real)(int, struct epoll_event *, int, int);
    if (!real)
        real = (int (*)(int, struct epoll_event *, int, int))dlsym(RTLD_NEXT, "epoll_wait");
    late(timeout);
    return real(epfd, events, max, timeout);
}
