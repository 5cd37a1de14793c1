/* A lean load generator in C for the native data plane's benchmarks (issue 16).
 *
 *   cload HOST PORT MODE CONCURRENCY SECONDS MAX_OPS [SOURCES [CPU]]
 *
 * MODE: churn   connect + upgrade (GET /echo) + one 32-byte echo + close 1000,
 *               then wait for the TCP close (tests/benchmarks/loadgen.py's churn);
 *       http    an upgrade to /refuse answered 429 (or 503): close at the head;
 *       close   an upgrade answered 101 then close 1013: echo the close, wait for
 *               the TCP close.
 * CONCURRENCY connection loops run at once, for SECONDS or MAX_OPS attempts,
 * whichever comes first (each cycle times out after 5 s: an error). SOURCES > 0:
 * each attempt binds to one of SOURCES loopback addresses 127.1.x.y (a fleet of
 * clients by address). CPU >= 0: pinned to that CPU.
 *
 * One thread, epoll, non-blocking sockets, pre-built requests and frames: a
 * cycle costs this process a few µs of user time beside the kernel's TCP work,
 * so the Python harness can drive a target faster than its own load generator
 * could. Prints one JSON line: ops (cycles that ended as expected), attempts,
 * errors, elapsed_s, rate, cpu_user_s, cpu_sys_s (this process), outcomes.
 * Built by tests/benchmarks/targets.py (cc -O2) into the run's temp dir.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum mode { CHURN, HTTP, CLOSE };
enum state { IDLE, CONNECTING, HEAD, OPEN, CLOSING };
enum outcome { OK, REFUSED_CONNECT, TIMEOUT, BAD_STATUS, BAD_CLOSE, RESET, N_OUTCOMES };
static const char *OUTCOME_NAMES[N_OUTCOMES] = {"ok", "connect", "timeout", "status", "close_code", "reset"};

#define BUF 4096
#define CYCLE_TIMEOUT 5.0

struct slot {
    int fd;
    enum state state;
    double started;
    int status, code, echoed, sent_close;
    size_t len;
    char buf[BUF];
};

static enum mode mode;
static struct sockaddr_in target;
static char request[512];
static size_t request_len;
static unsigned char echo_frame[2 + 4 + 32], close_1000[2 + 4 + 2], close_echo[2 + 4 + 2];
static long counts[N_OUTCOMES];
static long attempts, max_ops;
static int sources, epfd;
static double deadline;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void masked(unsigned char *out, int opcode, const unsigned char *payload, int n) {
    static const unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    out[0] = 0x80 | opcode;
    out[1] = 0x80 | n;
    memcpy(out + 2, mask, 4);
    for (int i = 0; i < n; i++) out[6 + i] = payload[i] ^ mask[i & 3];
}

static void finish(struct slot *s, enum outcome o) {
    if (s->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
    }
    s->fd = -1;
    s->state = IDLE;
    counts[o]++;
}

static int start(struct slot *s) {
    if (attempts >= max_ops || now() >= deadline) return 0;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (sources > 0) {
        long i = attempts % sources;
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl((127u << 24) | (1u << 16) | (unsigned)(i / 250) << 8 | (unsigned)(i % 250 + 1));
        setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(fd);
            return 0;
        }
    }
    attempts++;
    memset(s, 0, offsetof(struct slot, buf));
    s->fd = fd;
    s->started = now();
    s->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.ptr = s};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        finish(s, REFUSED_CONNECT);
        return 1;
    }
    return 1;
}

static int send_all(struct slot *s, const void *data, size_t n) {
    ssize_t w = send(s->fd, data, n, MSG_NOSIGNAL);
    return w == (ssize_t)n; /* tiny writes on a fresh socket: all or an error */
}

/* Frames in s->buf once the head is read. Returns 1 when the cycle has ended. */
static int frames(struct slot *s) {
    size_t pos = 0;
    while (s->len - pos >= 2) {
        unsigned char *b = (unsigned char *)s->buf + pos;
        size_t n = b[1] & 0x7f, hl = 2;
        if (n == 126) {
            if (s->len - pos < 4) break;
            n = (size_t)b[2] << 8 | b[3];
            hl = 4;
        } else if (n == 127) {
            finish(s, BAD_CLOSE); /* never in these scenarios */
            return 1;
        }
        if (s->len - pos < hl + n) break;
        int opcode = b[0] & 0x0f;
        if (opcode == 0x8) {
            s->code = n >= 2 ? (b[hl] << 8 | b[hl + 1]) : 1005;
            if (!s->sent_close) {
                s->sent_close = 1;
                int code = (s->code == 1005 || s->code == 1006) ? 1000 : s->code;
                unsigned char payload[2] = {code >> 8, code & 0xff};
                masked(close_echo, 0x8, payload, 2);
                send_all(s, close_echo, sizeof close_echo);
            }
            s->state = CLOSING;
            s->len = 0;
            return 0;
        }
        if (mode == CHURN && !s->echoed && opcode <= 0x2) {
            s->echoed = 1;
            s->sent_close = 1;
            send_all(s, close_1000, sizeof close_1000);
        }
        pos += hl + n;
    }
    memmove(s->buf, s->buf + pos, s->len - pos);
    s->len -= pos;
    return 0;
}

static void readable(struct slot *s) {
    for (;;) {
        if (s->len == BUF) s->len = 0; /* a body we do not need */
        ssize_t r = recv(s->fd, s->buf + s->len, BUF - s->len, 0);
        if (r == 0) { /* the target closed */
            int ok;
            if (mode == HTTP) ok = s->status == 429 || s->status == 503;
            else if (mode == CLOSE) ok = s->status == 101 && s->code == 1013;
            else ok = s->status == 101 && s->echoed && s->code == 1000;
            finish(s, ok ? OK : s->status != (mode == HTTP ? 429 : 101) ? BAD_STATUS : BAD_CLOSE);
            return;
        }
        if (r < 0) {
            if (errno == EAGAIN) return;
            finish(s, RESET);
            return;
        }
        s->len += r;
        if (s->state == HEAD) {
            char *end = memmem(s->buf, s->len, "\r\n\r\n", 4);
            if (!end) continue;
            s->status = s->len >= 12 ? atoi(s->buf + 9) : -1;
            if (s->status != 101) { /* a refusal (or not): close at the head, as loadgen.py */
                finish(s, mode == HTTP && (s->status == 429 || s->status == 503) ? OK : BAD_STATUS);
                return;
            }
            size_t rest = s->len - (end + 4 - s->buf);
            memmove(s->buf, end + 4, rest);
            s->len = rest;
            s->state = OPEN;
            if (mode == CHURN && !send_all(s, echo_frame, sizeof echo_frame)) {
                finish(s, RESET);
                return;
            }
        }
        if (s->state == OPEN || s->state == CLOSING) {
            if (frames(s)) return;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s HOST PORT churn|http|close CONCURRENCY SECONDS MAX_OPS [SOURCES [CPU]]\n", argv[0]);
        return 2;
    }
    target.sin_family = AF_INET;
    target.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", argv[1]);
        return 2;
    }
    mode = !strcmp(argv[3], "churn") ? CHURN : !strcmp(argv[3], "http") ? HTTP : !strcmp(argv[3], "close") ? CLOSE : -1;
    if ((int)mode < 0) {
        fprintf(stderr, "bad mode %s\n", argv[3]);
        return 2;
    }
    int concurrency = atoi(argv[4]);
    double seconds = atof(argv[5]);
    max_ops = atol(argv[6]);
    sources = argc > 7 ? atoi(argv[7]) : 0;
    int cpu = argc > 8 ? atoi(argv[8]) : -1;
    if (concurrency < 1 || concurrency > 10000 || seconds <= 0 || seconds > 600 || max_ops < 1 || sources < 0 || sources > 60000) {
        fprintf(stderr, "out of range: concurrency 1..10000, seconds (0, 600], max_ops >= 1, sources 0..60000\n");
        return 2;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) perror("sched_setaffinity");
    }
    request_len = snprintf(request, sizeof request,
                           "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                           mode == CHURN ? "/echo" : "/refuse", argv[1], argv[2]);
    unsigned char payload[32], code[2] = {1000 >> 8, 1000 & 0xff};
    for (int i = 0; i < 32; i++) payload[i] = (unsigned char)(i * 7 + 1);
    masked(echo_frame, 0x2, payload, 32);
    masked(close_1000, 0x8, code, 2);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc(concurrency, sizeof *slots);
    struct epoll_event *events = calloc(concurrency, sizeof *events);
    double t0 = now();
    deadline = t0 + seconds;
    int live = 0;
    for (int i = 0; i < concurrency; i++) {
        slots[i].fd = -1;
        live += start(&slots[i]);
    }
    double last_sweep = t0;
    while (live > 0) {
        int n = epoll_wait(epfd, events, concurrency, 100);
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            if (s->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    finish(s, REFUSED_CONNECT);
                } else if (!send_all(s, request, request_len)) {
                    finish(s, RESET);
                } else {
                    s->state = HEAD;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
                }
            } else if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                readable(s);
            }
            if (s->state == IDLE) {
                live--;
                live += start(s);
            }
        }
        double t = now();
        if (t - last_sweep > 0.5) { /* cycles past their timeout */
            last_sweep = t;
            for (int i = 0; i < concurrency; i++) {
                if (slots[i].state != IDLE && t - slots[i].started > CYCLE_TIMEOUT) {
                    finish(&slots[i], TIMEOUT);
                    live--;
                    live += start(&slots[i]);
                }
            }
        }
    }
    double elapsed = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"ops\": %ld, \"attempts\": %ld, \"errors\": %ld, \"elapsed_s\": %.6f, \"rate\": %.3f, "
           "\"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"outcomes\": {",
           counts[OK], attempts, attempts - counts[OK], elapsed, counts[OK] / elapsed,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    for (int o = 0; o < N_OUTCOMES; o++) printf("%s\"%s\": %ld", o ? ", " : "", OUTCOME_NAMES[o], counts[o]);
    printf("}}\n");
    return 0;
}
