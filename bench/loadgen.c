/*
 * The load generator of the benchmarks: a closed loop that keeps WINDOW requests in flight
 * to one UDP echo server (or spread over NPORTS consecutive ports), with sendmmsg/recvmmsg,
 * and reports the reply rate and round-trip percentiles as one JSON line. WINDOW 1 is
 * ping-pong. It stops by itself after WARMUP + DURATION seconds (at most 60).
 *
 * usage: loadgen -a HOST -p PORT [-n NPORTS] [-s SIZE] [-w WINDOW] [-d SECONDS] [-W SECONDS]
 *
 * Each request starts with a sockperf header (sequence, flags "client | pong request",
 * length), so `sockperf server` answers it like a plain echo server does; after it come an
 * epoch tag and the send time, which the reply brings back. A window with no reply for
 * 50 ms is counted as lost and sent again under a new epoch, so late replies are ignored.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_WINDOW 4096
#define MAX_SIZE 65507
#define MIN_SIZE 32
#define TAG_MAGIC 0x75646231u /* "udb1" */
#define HIST_NS 10            /* histogram resolution */
#define HIST_BUCKETS 200000   /* 10 ns buckets up to 2 ms; slower ones land in `overflow` */
#define STALL_NS 50000000ull  /* a window with no reply for this long is lost */

static uint32_t hist[HIST_BUCKETS];
static uint64_t overflow, max_ns;
static unsigned char in_buf[BATCH][MAX_SIZE + 1];
static unsigned char out_buf[BATCH][MAX_SIZE];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void put_be(unsigned char *p, uint64_t value, int bytes) {
    for (int i = bytes - 1; i >= 0; i--) {
        p[i] = (unsigned char)(value & 0xff);
        value >>= 8;
    }
}

static void record(uint64_t ns) {
    if (ns / HIST_NS < HIST_BUCKETS)
        hist[ns / HIST_NS]++;
    else
        overflow++;
    if (ns > max_ns)
        max_ns = ns;
}

static double percentile(uint64_t total, double share) {
    if (total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(share * (double)(total - 1)) + 1, seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank)
            return (i + 0.5) * HIST_NS / 1000.0;
    }
    return max_ns / 1000.0;
}

static void usage(const char *name) {
    fprintf(stderr,
            "usage: %s -a HOST -p PORT [-n NPORTS] [-s SIZE] [-w WINDOW] [-d SECONDS] "
            "[-W SECONDS]\n",
            name);
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = NULL;
    int port = 0, nports = 1, size = 64, window = 64;
    double duration = 2.0, warmup = 0.5;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:n:s:w:d:W:")) != -1) {
        switch (opt) {
        case 'a': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'n': nports = atoi(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'W': warmup = atof(optarg); break;
        default: usage(argv[0]);
        }
    }
    if (!host || port < 1 || nports < 1 || port + nports - 1 > 65535 || size < MIN_SIZE ||
        size > MAX_SIZE || window < 1 || window > MAX_WINDOW || !(duration > 0) ||
        duration + warmup > 60 || warmup < 0)
        usage(argv[0]);

    struct sockaddr_storage dest;
    socklen_t dest_len;
    memset(&dest, 0, sizeof dest);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&dest;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&dest;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        dest_len = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        dest_len = sizeof *v6;
    } else {
        fprintf(stderr, "loadgen: not an address: %s\n", host);
        return 2;
    }
    int fd = socket(dest.ss_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    int rcvbuf = 4 * 1024 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);

    struct sockaddr_storage names[BATCH];
    struct mmsghdr in[BATCH], out[BATCH];
    struct iovec in_iov[BATCH], out_iov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        in_iov[i].iov_base = in_buf[i];
        in_iov[i].iov_len = sizeof in_buf[i];
        out_iov[i].iov_base = out_buf[i];
        out_iov[i].iov_len = (size_t)size;
        memset(out_buf[i], 0xa5, (size_t)size);
        memset(&out[i], 0, sizeof out[i]);
        names[i] = dest;
        out[i].msg_hdr.msg_name = &names[i];
        out[i].msg_hdr.msg_namelen = dest_len;
        out[i].msg_hdr.msg_iov = &out_iov[i];
        out[i].msg_hdr.msg_iovlen = 1;
    }

    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(duration * 1e9);
    uint64_t sequence = 0, sent = 0, received = 0, lost = 0, stalls = 0, send_errors = 0;
    uint64_t replies = 0; /* every reply, warm-up included: the server's work */
    uint32_t epoch = 0;
    int outstanding = 0, measuring = 0;
    uint64_t last_reply = start;

    for (;;) {
        uint64_t now = now_ns();
        if (now >= end)
            break;
        if (!measuring && now >= measure_from) {
            /* Warm-up over: what happened so far is not measured. */
            measuring = 1;
            memset(hist, 0, sizeof hist);
            overflow = max_ns = 0;
            sent = received = lost = stalls = send_errors = 0;
        }
        if (outstanding > 0 && now - last_reply > STALL_NS) {
            lost += (uint64_t)outstanding;
            stalls++;
            outstanding = 0;
            epoch++;
            last_reply = now; /* the new window gets its own 50 ms */
        }
        while (outstanding < window) {
            int k = window - outstanding;
            if (k > BATCH)
                k = BATCH;
            for (int i = 0; i < k; i++) {
                unsigned char *p = out_buf[i];
                uint64_t seq = ++sequence;
                put_be(p, seq, 8);
                put_be(p + 8, 3, 2); /* sockperf: client | pong request */
                put_be(p + 10, (uint64_t)size, 4);
                uint32_t tag = TAG_MAGIC ^ epoch;
                memcpy(p + 16, &tag, 4);
                memcpy(p + 24, &now, 8);
                int target = port + (int)(seq % (uint64_t)nports);
                if (dest.ss_family == AF_INET)
                    ((struct sockaddr_in *)&names[i])->sin_port = htons(target);
                else
                    ((struct sockaddr_in6 *)&names[i])->sin6_port = htons(target);
            }
            int done = sendmmsg(fd, out, k, 0);
            if (done <= 0) {
                send_errors++;
                break;
            }
            outstanding += done;
            sent += (uint64_t)done;
            if (done < k)
                break;
        }
        if (outstanding > 0) {
            for (int i = 0; i < BATCH; i++) {
                memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
                in[i].msg_hdr.msg_iov = &in_iov[i];
                in[i].msg_hdr.msg_iovlen = 1;
            }
            /* Busy polling: the generator owns its core, and a sleep would add to every RTT. */
            int got = recvmmsg(fd, in, BATCH, MSG_DONTWAIT, NULL);
            if (got < 0)
                continue;
            uint64_t arrived = now_ns();
            for (int i = 0; i < got; i++) {
                uint32_t tag;
                uint64_t when;
                if (in[i].msg_len < MIN_SIZE)
                    continue;
                memcpy(&tag, in_buf[i] + 16, 4);
                if (tag != (TAG_MAGIC ^ epoch))
                    continue; /* a late reply from a window already counted as lost */
                memcpy(&when, in_buf[i] + 24, 8);
                outstanding--;
                replies++;
                last_reply = arrived;
                if (measuring) {
                    received++;
                    if (when >= measure_from)
                        record(arrived - when);
                }
            }
        }
    }
    double seconds = (double)(end - measure_from) / 1e9;
    uint64_t timed = overflow;
    for (int i = 0; i < HIST_BUCKETS; i++)
        timed += hist[i];
    printf("{\"sent\": %llu, \"received\": %llu, \"lost\": %llu, \"stalls\": %llu, "
           "\"send_errors\": %llu, \"seconds\": %.3f, \"rate\": %.1f, \"p50_us\": %.2f, "
           "\"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, \"max_us\": %.2f, "
           "\"replies\": %llu}\n",
           (unsigned long long)sent, (unsigned long long)received, (unsigned long long)lost,
           (unsigned long long)stalls, (unsigned long long)send_errors, seconds,
           (double)received / seconds, percentile(timed, 0.50), percentile(timed, 0.90),
           percentile(timed, 0.99), percentile(timed, 0.999), max_ns / 1000.0,
           (unsigned long long)replies);
    close(fd);
    return 0;
}
