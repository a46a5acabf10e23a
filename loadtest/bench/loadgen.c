/*
 * loadgen: a lean closed-loop load generator for the Socket Arena line protocol.
 *
 * One thread, one epoll set, N connections. Every connection keeps exactly one request in
 * flight: it sends a line, waits for the whole reply line, checks it byte for byte against the
 * expected reply, records the latency and sends the next request. Latencies go into a
 * log-linear histogram (128 sub-buckets per power of two: relative error < 0.4 %).
 *
 * Why C: a Python client (Locust included) spends more CPU per request than the fastest Python
 * servers, so it would measure itself. This client is an ordinary C epoll client, so it is as
 * fast as one by construction; it reports its own CPU use so the harness can say when it was
 * saturated anyway.
 *
 * Open loop (--rate R): requests are due on a fixed timetable, R per second across all
 * connections (one every 1/R s from the fixed start), whatever the server does. A due request
 * goes to an idle connection (the longest idle first, so every connection takes a share); when
 * none is idle it waits and is sent as soon as one frees. Its latency counts from when it was
 * due, not from when it was sent, so a server that falls behind is charged for the whole queue
 * (the coordinated-omission correction of wrk2). A timerfd wakes the loop at the next due time
 * (epoll_wait alone counts in milliseconds). The result adds "open_loop": the offered rate, the
 * requests due and sent in the window and the backlog (due but not yet sent) at its end.
 *
 * Usage:
 *   loadgen --serve PORT       (a reference C echo server, see serve())
 *   loadgen --selftest         (prints the histogram's worst relative error)
 *   loadgen --port P [--host 127.0.0.1] [--connections N] [--duration S] [--warmup S]
 *           [--timeout S] [--connect-timeout S] [--rate R]
 *           --request WEIGHT LINE EXPECTED [--request ...]
 * First every connection is opened (up to --connect-timeout; --ramp-timeout is the old name).
 * Then, from one fixed start, every connection sends its first request; the load runs for
 * --warmup seconds unrecorded and --duration seconds recorded (the window).
 *
 * Fairness: no connection is waited for before measuring, so a server that never answers some
 * connections shows it. Per connection the generator counts the replies in the window and
 * keeps when its oldest unanswered request was first sent (the fixed start for the first one;
 * a request retried after a reconnect keeps its original time). The longest wait is the
 * longest of: requests answered in the window, and requests still unanswered at the end (their
 * age then: "still waiting after X s"). A connection with no reply in the window is starved.
 * LINE and EXPECTED are given without the trailing newline. The result is one JSON object on
 * stdout; diagnostics go to stderr. Exit code 0 on a completed run (errors are counted, not
 * fatal), 2 on bad arguments or when not a single connection could be opened.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SUB_BITS 7
#define SUB_COUNT (1 << SUB_BITS)            /* 128 sub-buckets per octave */
#define LINEAR_LIMIT (2 * SUB_COUNT)         /* values below 256 ns are kept exactly */
#define OCTAVES 40                           /* up to 2^48 ns: days */
#define BUCKETS (LINEAR_LIMIT + OCTAVES * SUB_COUNT)
#define MAX_KINDS 8
#define RECONNECT_DELAY_NS 10000000ULL       /* 10 ms between reconnect attempts of one slot */

typedef struct {
    uint64_t counts[BUCKETS];
    uint64_t total;
    uint64_t min_ns, max_ns;
    long double sum_ns;
} histogram;

typedef struct {
    char *request;        /* the line including '\n' */
    size_t request_len;
    char *expected;       /* the reply including '\n' */
    size_t expected_len;
    unsigned weight;
    histogram hist;
    uint64_t completed;
} request_kind;

/* CONNECTED: connected, waiting for the fixed start to send its first request. */
enum conn_state { IDLE_DEAD, CONNECTING, SENDING, RECEIVING, CONNECTED };

typedef struct {
    int fd;
    enum conn_state state;
    int kind;
    size_t sent;
    size_t received;
    uint64_t started_ns;     /* when the request was sent (or connect began) */
    uint64_t retry_at_ns;    /* for IDLE_DEAD slots */
    uint64_t waiting_since_ns;   /* first send of the oldest unanswered request */
    uint64_t answered;       /* replies received in the window */
    char *buffer;
} connection;

static request_kind kinds[MAX_KINDS];
static int kind_count;
static unsigned weight_total;
static histogram overall;
static int epoll_fd;
static struct sockaddr_in target;
static size_t buffer_size;
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint64_t err_connect, err_closed, err_mismatch, err_timeout;
static uint64_t completed_total;
static int recording;
static int starting = 1;     /* connecting: until every connection is connected */
static uint64_t longest_answered_ns;   /* longest wait of a request answered in the window */

/* Open loop: request k is due at timetable_start + k * period (k from 0); `sent` of them went
 * out. Idle connections wait in a ring, the longest idle first. */
static double rate;                     /* requests per second; 0: closed loop */
static uint64_t timetable_start, period_ns_scaled;  /* period in ns << 16, for fractional gaps */
static uint64_t sent_total;
static connection **idle_ring;
static int idle_head, idle_count, ring_size;
static int timer_fd = -1;
static connection timer_marker;         /* epoll's data.ptr for the timerfd */

static uint64_t due_at(uint64_t k) {
    return timetable_start + (uint64_t)(((__uint128_t)k * period_ns_scaled) >> 16);
}

/* How many requests are due by `now` (all k with due_at(k) <= now). */
static uint64_t due_by(uint64_t now) {
    if (period_ns_scaled == 0 || now < timetable_start) return 0;   /* closed loop: none */
    return (uint64_t)((((__uint128_t)(now - timetable_start)) << 16) / period_ns_scaled) + 1;
}

static void idle_push(connection *c) {
    if (idle_count >= ring_size) return;   /* cannot happen: twice the connections */
    idle_ring[(idle_head + idle_count) % ring_size] = c;
    idle_count++;
}

static connection *idle_pop(void) {
    while (idle_count > 0) {
        connection *c = idle_ring[idle_head];
        idle_head = (idle_head + 1) % ring_size;
        idle_count--;
        if (c->state == CONNECTED) return c;   /* skip one dropped while it was idle */
    }
    return NULL;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(int which_user) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    struct timeval tv = which_user ? usage.ru_utime : usage.ru_stime;
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

/* ---- histogram ------------------------------------------------------------------------ */

static int bucket_of(uint64_t value) {
    if (value < LINEAR_LIMIT) return (int)value;
    int exponent = 63 - __builtin_clzll(value);          /* >= 8 */
    int shift = exponent - SUB_BITS;
    int index = LINEAR_LIMIT + (exponent - SUB_BITS - 1) * SUB_COUNT
                + (int)((value >> shift) - SUB_COUNT);
    return index < BUCKETS ? index : BUCKETS - 1;
}

/* The midpoint of a bucket: half a bucket width is at most 1/256 of the value. */
static double bucket_value(int index) {
    if (index < LINEAR_LIMIT) return (double)index;
    int octave = (index - LINEAR_LIMIT) / SUB_COUNT;
    int sub = (index - LINEAR_LIMIT) % SUB_COUNT;
    int shift = octave + 1;
    double low = (double)((uint64_t)(SUB_COUNT + sub) << shift);
    return low + (double)(1ULL << shift) / 2.0;
}

static void hist_record(histogram *h, uint64_t value) {
    h->counts[bucket_of(value)]++;
    if (h->total == 0 || value < h->min_ns) h->min_ns = value;
    if (value > h->max_ns) h->max_ns = value;
    h->total++;
    h->sum_ns += value;
}

static double hist_percentile_us(const histogram *h, double percentile) {
    if (h->total == 0) return 0.0;
    uint64_t rank = (uint64_t)((percentile / 100.0) * (double)h->total + 0.5);
    if (rank < 1) rank = 1;
    if (rank > h->total) rank = h->total;
    uint64_t seen = 0;
    for (int i = 0; i < BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            double value = bucket_value(i);
            if (value > (double)h->max_ns) value = (double)h->max_ns;
            if (value < (double)h->min_ns) value = (double)h->min_ns;
            return value / 1000.0;
        }
    }
    return (double)h->max_ns / 1000.0;
}

static void print_latency(FILE *out, const histogram *h) {
    fprintf(out,
            "{\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, \"p999\": %.2f, \"p9999\": %.2f, "
            "\"min\": %.2f, \"max\": %.2f, \"mean\": %.2f}",
            hist_percentile_us(h, 50), hist_percentile_us(h, 90), hist_percentile_us(h, 99),
            hist_percentile_us(h, 99.9), hist_percentile_us(h, 99.99),
            h->total ? (double)h->min_ns / 1000.0 : 0.0, (double)h->max_ns / 1000.0,
            h->total ? (double)(h->sum_ns / h->total) / 1000.0 : 0.0);
}

/* `loadgen --selftest`: the histogram's worst relative error over 1 ns .. 100 s, as JSON. */
static int selftest(void) {
    double worst = 0, worst_at = 0;
    for (double v = 1; v < 1e11; v *= 1.0007) {
        uint64_t value = (uint64_t)v;
        double error = (bucket_value(bucket_of(value)) - (double)value) / (double)value;
        if (error < 0) error = -error;
        if (error > worst) {
            worst = error;
            worst_at = (double)value;
        }
    }
    printf("{\"max_relative_error\": %.6f, \"at_ns\": %.0f, \"buckets\": %d}\n", worst,
           worst_at, BUCKETS);
    return 0;
}

/* ---- connections ---------------------------------------------------------------------- */

static int compare_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int pick_kind(void) {
    if (kind_count == 1) return 0;
    rng_state ^= rng_state << 13;   /* xorshift64: cheap and good enough to mix requests */
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    unsigned ticket = (unsigned)(rng_state % weight_total);
    for (int i = 0; i < kind_count; i++) {
        if (ticket < kinds[i].weight) return i;
        ticket -= kinds[i].weight;
    }
    return kind_count - 1;
}

static void watch(connection *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epoll_fd, op, c->fd, &ev) != 0) perror("epoll_ctl");
}

static void start_connect(connection *c, uint64_t now) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        err_connect++;
        c->state = IDLE_DEAD;
        c->retry_at_ns = now + RECONNECT_DELAY_NS;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc = connect(c->fd, (struct sockaddr *)&target, sizeof target);
    if (rc != 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->fd = -1;
        err_connect++;
        c->state = IDLE_DEAD;
        c->retry_at_ns = now + RECONNECT_DELAY_NS;
        return;
    }
    c->state = CONNECTING;
    c->started_ns = now;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void drop(connection *c, uint64_t now, uint64_t *counter) {
    /* A failed connect always counts: a connection that never got in must not go unnoticed. */
    if (recording || counter == &err_connect) (*counter)++;
    if (c->fd >= 0) close(c->fd);   /* close() also removes it from the epoll set */
    c->fd = -1;
    c->state = IDLE_DEAD;
    c->retry_at_ns = now + RECONNECT_DELAY_NS;
}

/* Send (the rest of) the current request; returns 0 when the connection was dropped. */
static int push_request(connection *c, uint64_t now) {
    request_kind *k = &kinds[c->kind];
    while (c->sent < k->request_len) {
        ssize_t n = send(c->fd, k->request + c->sent, k->request_len - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            if (c->state != SENDING) watch(c, EPOLLOUT, EPOLL_CTL_MOD);
            c->state = SENDING;
            return 1;
        } else {
            drop(c, now, &err_closed);
            return 0;
        }
    }
    if (c->state != RECEIVING) watch(c, EPOLLIN, EPOLL_CTL_MOD);
    c->state = RECEIVING;
    return 1;
}

static void next_request(connection *c, uint64_t now) {
    c->kind = pick_kind();
    c->sent = 0;
    c->received = 0;
    c->started_ns = now;
    push_request(c, now);
}

/* Open loop: the connection goes back to the idle ring until a request is due for it. */
static void become_idle(connection *c) {
    c->state = CONNECTED;
    watch(c, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
    idle_push(c);
}

/* Open loop: send every request due by now on idle connections, each timed from when it was
 * due; then arm the timer for the next one (or leave it off until a connection frees). */
static void dispatch_due(uint64_t now) {
    uint64_t due = due_by(now);
    while (sent_total < due) {
        connection *c = idle_pop();
        if (c == NULL) break;
        uint64_t intended = due_at(sent_total++);
        c->kind = pick_kind();
        c->sent = 0;
        c->received = 0;
        c->started_ns = intended;
        c->waiting_since_ns = intended;
        push_request(c, now);
    }
    struct itimerspec when = {0};
    if (sent_total >= due && idle_count > 0) {
        uint64_t next = due_at(sent_total);
        when.it_value.tv_sec = (time_t)(next / 1000000000ULL);
        when.it_value.tv_nsec = (long)(next % 1000000000ULL);
    }
    timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &when, NULL);
}

static void on_readable(connection *c, int accept_new) {
    request_kind *k = &kinds[c->kind];
    for (;;) {
        ssize_t n = recv(c->fd, c->buffer + c->received, buffer_size - c->received, 0);
        uint64_t now = now_ns();
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            drop(c, now, &err_closed);
            return;
        }
        if (n < 0) return;   /* EAGAIN: the rest of the reply is still on its way */
        c->received += (size_t)n;
        if (c->received < k->expected_len) {
            if (memchr(c->buffer + c->received - n, '\n', (size_t)n) == NULL) continue;
            drop(c, now, &err_mismatch);   /* a short reply line: an ERR or a wrong answer */
            return;
        }
        if (c->received > k->expected_len ||
            memcmp(c->buffer, k->expected, k->expected_len) != 0) {
            drop(c, now, &err_mismatch);
            return;
        }
        if (recording) {
            uint64_t latency = now - c->started_ns;
            hist_record(&overall, latency);
            hist_record(&k->hist, latency);
            k->completed++;
            completed_total++;
            c->answered++;
            uint64_t wait = now - c->waiting_since_ns;
            if (wait > longest_answered_ns) longest_answered_ns = wait;
        }
        c->waiting_since_ns = now;   /* the next request is sent right now */
        if (accept_new && rate > 0) {
            become_idle(c);
        } else if (accept_new) {
            next_request(c, now);
        } else {
            c->state = IDLE_DEAD;   /* draining: no new request, keep the socket for close */
            c->retry_at_ns = UINT64_MAX;
        }
        return;
    }
}

static void on_writable(connection *c, uint64_t now, int accept_new) {
    if (c->state == CONNECTING) {
        int error = 0;
        socklen_t len = sizeof error;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &len);
        if (error != 0) {
            drop(c, now, &err_connect);
            return;
        }
        if (!accept_new) {
            c->state = IDLE_DEAD;
            c->retry_at_ns = UINT64_MAX;
            return;
        }
        if (starting) {   /* hold the first request until the fixed start */
            c->state = CONNECTED;
            watch(c, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
            return;
        }
        if (rate > 0) {   /* a reconnected slot waits for the timetable like any idle one */
            become_idle(c);
            return;
        }
        c->state = SENDING;   /* so push_request switches the watch to EPOLLIN */
        c->kind = pick_kind();
        c->sent = 0;
        c->received = 0;
        c->started_ns = now;
        push_request(c, now);
    } else if (c->state == SENDING) {
        push_request(c, now);
    }
}

/* ---- reference server ----------------------------------------------------------------- */

/* `loadgen --serve PORT`: a minimal C epoll server that upper-cases what it reads. It answers
 * the echo scenarios correctly (one request in flight per connection), so the harness can
 * measure the load generator's own ceiling against a server that costs almost nothing. */
static int serve(int port) {
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 ||
        listen(listener, 4096) != 0) {
        perror("loadgen --serve");
        return 2;
    }
    socklen_t length = sizeof address;
    getsockname(listener, (struct sockaddr *)&address, &length);
    fprintf(stderr, "ready model=c-epoll host=127.0.0.1 port=%d metrics_port=0\n",
            ntohs(address.sin_port));
    fflush(stderr);
    int poller = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(poller, EPOLL_CTL_ADD, listener, &event);
    struct epoll_event ready[1024];
    static char data[65536];
    for (;;) {
        int count = epoll_wait(poller, ready, 1024, -1);
        for (int i = 0; i < count; i++) {
            int fd = ready[i].data.fd;
            if (fd == listener) {
                int client;
                while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct epoll_event watch_in = {.events = EPOLLIN, .data.fd = client};
                    epoll_ctl(poller, EPOLL_CTL_ADD, client, &watch_in);
                }
                continue;
            }
            ssize_t n = read(fd, data, sizeof data);
            if (n <= 0) {
                close(fd);
                continue;
            }
            for (ssize_t j = 0; j < n; j++)
                if (data[j] >= 'a' && data[j] <= 'z') data[j] = (char)(data[j] - 32);
            if (write(fd, data, (size_t)n) != n) close(fd);
        }
    }
}

/* ---- main ----------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --serve PORT | --selftest\n"
            "       loadgen --port P [--host H] [--connections N] [--duration S] [--warmup S]\n"
            "               [--timeout S] [--connect-timeout S] [--rate R]\n"
            "               --request WEIGHT LINE EXPECTED [--request ...]\n");
    exit(2);
}

static char *with_newline(const char *text, size_t *length) {
    size_t n = strlen(text);
    char *copy = malloc(n + 2);
    memcpy(copy, text, n);
    copy[n] = '\n';
    copy[n + 1] = '\0';
    *length = n + 1;
    return copy;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, connections = 100;
    double duration = 5.0, warmup = 1.0, timeout = 30.0, connect_timeout = 10.0;
    if (argc == 3 && !strcmp(argv[1], "--serve")) return serve(atoi(argv[2]));
    if (argc == 2 && !strcmp(argv[1], "--selftest")) return selftest();
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--connections") && i + 1 < argc) connections = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--duration") && i + 1 < argc) duration = atof(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atof(argv[++i]);
        else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) timeout = atof(argv[++i]);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
        else if ((!strcmp(argv[i], "--connect-timeout") || !strcmp(argv[i], "--ramp-timeout"))
                 && i + 1 < argc) connect_timeout = atof(argv[++i]);
        else if (!strcmp(argv[i], "--request") && i + 3 < argc && kind_count < MAX_KINDS) {
            request_kind *k = &kinds[kind_count++];
            k->weight = (unsigned)atoi(argv[++i]);
            k->request = with_newline(argv[++i], &k->request_len);
            k->expected = with_newline(argv[++i], &k->expected_len);
            if (k->weight == 0) usage();
            weight_total += k->weight;
        } else usage();
    }
    if (port <= 0 || connections <= 0 || kind_count == 0 || duration <= 0) usage();
    if (rate < 0 || rate > 1e8) {
        fprintf(stderr, "loadgen: --rate must be from 0 (closed loop) to 1e8 requests/s\n");
        return 2;
    }

    /* 1000 connections need more descriptors than the usual soft limit of 1024. */
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }

    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1) {
        fprintf(stderr, "loadgen: --host must be an IPv4 address, got %s\n", host);
        return 2;
    }
    for (int i = 0; i < kind_count; i++)
        if (kinds[i].expected_len + 1 > buffer_size) buffer_size = kinds[i].expected_len + 1;
    if (buffer_size < 256) buffer_size = 256;   /* room to see a whole ERR line */

    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (rate > 0) {
        period_ns_scaled = (uint64_t)(1e9 / rate * 65536.0);
        if (period_ns_scaled == 0) period_ns_scaled = 1;
        ring_size = 2 * connections;   /* room for a stale entry of every reconnected slot */
        idle_ring = calloc((size_t)ring_size, sizeof *idle_ring);
        timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &timer_marker};
        epoll_ctl(epoll_fd, EPOLL_CTL_ADD, timer_fd, &ev);
    }
    connection *conns = calloc((size_t)connections, sizeof *conns);
    struct epoll_event *events = calloc((size_t)connections + 1, sizeof *events);
    uint64_t start = now_ns();
    for (int i = 0; i < connections; i++) {
        conns[i].fd = -1;
        conns[i].buffer = malloc(buffer_size);
        start_connect(&conns[i], start);
    }

    /* Known at the fixed start: when every connection is connected (or the connect timeout
     * is over). Nothing waits for replies, so a connection the server never serves shows up
     * as starved instead of delaying the measurement until it is served. */
    uint64_t warmup_end = UINT64_MAX;
    uint64_t end = UINT64_MAX;
    uint64_t connect_deadline = start + (uint64_t)(connect_timeout * 1e9);
    double connect_seconds = 0;
    uint64_t timeout_ns = (uint64_t)(timeout * 1e9);
    uint64_t next_sweep = start + 100000000ULL;
    double cpu_user0 = 0, cpu_sys0 = 0;
    uint64_t measure_start = warmup_end;
    int connected_at_start = 0;
    uint64_t due_at_measure_start = 0, sent_at_measure_start = 0;

    for (;;) {
        int ready = epoll_wait(epoll_fd, events, connections + 1, 5);
        uint64_t now = now_ns();
        for (int e = 0; e < ready; e++) {
            connection *c = events[e].data.ptr;
            if (c == &timer_marker) {
                uint64_t expirations;
                if (read(timer_fd, &expirations, sizeof expirations) < 0) { /* spurious */ }
                continue;
            }
            if (c->fd < 0) continue;
            if (c->state == CONNECTED) {   /* nothing should arrive: the server closed it */
                drop(c, now, &err_closed);
            } else if (events[e].events & (EPOLLOUT)) on_writable(c, now, 1);
            else if (events[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (c->state == RECEIVING) on_readable(c, 1);
                else if (c->state == CONNECTING || c->state == SENDING) on_writable(c, now, 1);
            }
        }
        now = now_ns();
        if (starting) {
            int connected = 0;
            for (int i = 0; i < connections; i++) connected += conns[i].state == CONNECTED;
            if (connected == connections || now >= connect_deadline) {
                /* The fixed start: every connection waits from now, connected or not yet. */
                starting = 0;
                connect_seconds = (double)(now - start) / 1e9;
                timetable_start = now;
                for (int i = 0; i < connections; i++) {
                    conns[i].waiting_since_ns = now;
                    if (conns[i].state != CONNECTED) continue;
                    if (rate > 0) idle_push(&conns[i]);
                    else next_request(&conns[i], now);
                }
                warmup_end = now + (uint64_t)(warmup * 1e9);
                end = warmup_end + (uint64_t)(duration * 1e9);
            }
        }
        if (rate > 0 && !starting) dispatch_due(now);
        if (!recording && now >= warmup_end) {
            recording = 1;
            due_at_measure_start = due_by(now);
            sent_at_measure_start = sent_total;
            cpu_user0 = cpu_seconds(1);
            cpu_sys0 = cpu_seconds(0);
            measure_start = now;
            fprintf(stderr, "measure-start\n");
            fflush(stderr);
            for (int i = 0; i < connections; i++)
                if (conns[i].state == SENDING || conns[i].state == RECEIVING) connected_at_start++;
        }
        if (now >= next_sweep) {   /* reconnect dead slots, expire stuck requests */
            next_sweep = now + 20000000ULL;
            for (int i = 0; i < connections; i++) {
                connection *c = &conns[i];
                if (c->state == IDLE_DEAD && c->fd < 0 && now >= c->retry_at_ns) {
                    start_connect(c, now);
                } else if (c->state != IDLE_DEAD && c->state != CONNECTED &&
                           now - c->started_ns > timeout_ns) {
                    drop(c, now, c->state == CONNECTING ? &err_connect : &err_timeout);
                }
            }
        }
        if (now >= end) break;
    }
    uint64_t measure_end = now_ns();
    uint64_t due_at_measure_end = rate > 0 ? due_by(measure_end) : 0;
    double cpu_user = cpu_seconds(1) - cpu_user0;
    double cpu_sys = cpu_seconds(0) - cpu_sys0;
    recording = 0;

    /* Fairness, before the drain answers anything more. Every connection still has a request
     * outstanding (closed loop), or is reconnecting to retry one: its age counts as a wait. */
    uint64_t longest_unanswered_ns = 0;
    uint64_t *answered = malloc((size_t)connections * sizeof *answered);
    int answered_connections = 0;
    for (int i = 0; i < connections; i++) {
        int busy = conns[i].state == SENDING || conns[i].state == RECEIVING;
        /* Open loop: an idle connection waits for nothing (the backlog shows what is late). */
        uint64_t age = (rate > 0 && !busy) ? 0 : measure_end - conns[i].waiting_since_ns;
        if (age > longest_unanswered_ns) longest_unanswered_ns = age;
        answered[i] = conns[i].answered;
        answered_connections += conns[i].answered > 0;
    }
    qsort(answered, (size_t)connections, sizeof *answered, compare_u64);
    fprintf(stderr, "measure-end\n");
    fflush(stderr);

    /* Drain: let requests in flight finish (up to 2 s), so the server sees clean closes. */
    uint64_t drain_end = measure_end + 2000000000ULL;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < connections; i++)
            if (conns[i].state == RECEIVING || conns[i].state == SENDING) busy++;
        if (busy == 0 || now_ns() >= drain_end) break;
        int ready = epoll_wait(epoll_fd, events, connections, 10);
        uint64_t now = now_ns();
        for (int e = 0; e < ready; e++) {
            connection *c = events[e].data.ptr;
            if (c->fd < 0) continue;
            if (c->state == RECEIVING) on_readable(c, 0);
            else on_writable(c, now, 0);
        }
    }
    for (int i = 0; i < connections; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);

    double elapsed = (double)(measure_end - measure_start) / 1e9;
    FILE *out = stdout;
    /* ramp_s is the old name of connect_s, kept for readers of older results. */
    fprintf(out, "{\"connections\": %d, \"connected\": %d, \"connect_s\": %.3f, "
            "\"ramp_s\": %.3f, ", connections, connected_at_start, connect_seconds,
            connect_seconds);
    fprintf(out, "\"elapsed_s\": %.6f, ", elapsed);
    fprintf(out, "\"requests\": %llu, \"rps\": %.2f, ", (unsigned long long)completed_total,
            elapsed > 0 ? (double)completed_total / elapsed : 0.0);
    fprintf(out,
            "\"errors\": {\"connect\": %llu, \"closed\": %llu, \"mismatch\": %llu, "
            "\"timeout\": %llu}, ",
            (unsigned long long)err_connect, (unsigned long long)err_closed,
            (unsigned long long)err_mismatch, (unsigned long long)err_timeout);
    fprintf(out, "\"cpu_s\": {\"user\": %.6f, \"system\": %.6f}, \"cpu_fraction\": %.4f, ",
            cpu_user, cpu_sys, elapsed > 0 ? (cpu_user + cpu_sys) / elapsed : 0.0);
    uint64_t longest_ns = longest_answered_ns > longest_unanswered_ns ? longest_answered_ns
                                                                      : longest_unanswered_ns;
    fprintf(out,
            "\"fairness\": {\"connections\": %d, \"answered_connections\": %d, "
            "\"starved\": %s, \"requests_per_connection\": {\"min\": %llu, "
            "\"median\": %llu, \"max\": %llu}, \"longest_wait_s\": %.6f, "
            "\"longest_wait_unanswered\": %s, \"longest_answered_wait_s\": %.6f, "
            "\"longest_unanswered_wait_s\": %.6f}, ",
            connections, answered_connections,
            answered_connections < connections ? "true" : "false",
            (unsigned long long)answered[0], (unsigned long long)answered[connections / 2],
            (unsigned long long)answered[connections - 1], (double)longest_ns / 1e9,
            longest_unanswered_ns > longest_answered_ns ? "true" : "false",
            (double)longest_answered_ns / 1e9, (double)longest_unanswered_ns / 1e9);
    free(answered);
    if (rate > 0)
        fprintf(out,
                "\"open_loop\": {\"rate\": %.3f, \"due\": %llu, \"sent\": %llu, "
                "\"backlog_end\": %llu}, ",
                rate, (unsigned long long)(due_at_measure_end - due_at_measure_start),
                (unsigned long long)(sent_total - sent_at_measure_start),
                (unsigned long long)(due_at_measure_end > sent_total
                                         ? due_at_measure_end - sent_total : 0));
    fprintf(out, "\"latency_us\": ");
    print_latency(out, &overall);
    fprintf(out, ", \"kinds\": [");
    for (int i = 0; i < kind_count; i++) {
        fprintf(out, "%s{\"weight\": %u, \"requests\": %llu, \"latency_us\": ", i ? ", " : "",
                kinds[i].weight, (unsigned long long)kinds[i].completed);
        print_latency(out, &kinds[i].hist);
        fprintf(out, "}");
    }
    fprintf(out, "]}\n");
    return 0;
}
