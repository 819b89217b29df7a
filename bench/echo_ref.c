/*
 * The C reference echo server of the benchmarks, with no counters. Every other server is
 * measured against it.
 *
 * One socket (the default): recvmmsg/sendmmsg, up to 64 datagrams per system call, blocking.
 * With --spin it never sleeps: it polls the socket without blocking, so no wake-up is ever
 * paid and what remains is the kernel's own cost of a datagram in and out.
 *
 * Many ports (--ports N): one non-blocking socket on each of PORT..PORT+N-1, all in one
 * level-triggered epoll. It shows what the kernel allows one thread that waits for load spread
 * over many ports as udpbindd does: the ceiling for udpbindd with as many listeners (sharing
 * system calls between sockets takes io_uring: uring_echo.c). When the load is spread, each
 * ready socket holds about one datagram, so by default it is answered with one recvfrom and
 * one sendto. A recvmmsg would return that one datagram in one call just the same, but cost
 * more per datagram: the 64 headers set up before each call, the kernel's try at a second
 * datagram before it returns, and a sendmmsg's set-up for a single reply. With --batch each
 * ready socket gets recvmmsg/sendmmsg as in the one-socket mode, which pays off only when the
 * load is not spread.
 *
 * usage: echo_ref HOST PORT [--spin]
 *        echo_ref HOST PORT --ports N [--batch]
 * Binds HOST:PORT (or the N ports from PORT; IPv4 or IPv6 literal), prints "ready" once every
 * socket is bound, and serves until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "echo_common.h"

#define BATCH 64
#define SLOT 65536
#define EVENTS 1024

static char buffers[BATCH][SLOT];
static struct sockaddr_storage peers[BATCH];
static struct mmsghdr in[BATCH], out[BATCH];
static struct iovec in_iov[BATCH], out_iov[BATCH];
static struct epoll_event ready[EVENTS];

static int usage(const char *name) {
    fprintf(stderr, "usage: %s HOST PORT [--spin]\n       %s HOST PORT --ports N [--batch]\n",
            name, name);
    return 2;
}

/* A UDP socket bound to HOST:PORT (type may add SOCK_NONBLOCK); -1 after saying why. */
static int bound_socket(const char *host, int port, int type) {
    struct sockaddr_storage local;
    socklen_t local_len = address(host, port, &local);
    if (local_len == 0) {
        fprintf(stderr, "echo_ref: not an address: %s\n", host);
        return -1;
    }
    int fd = socket(local.ss_family, SOCK_DGRAM | type, 0);
    if (fd < 0) {
        perror("socket");
        return -1;
    }
    /* The same receive buffer udpbindd asks for by default, so queues compare fairly. */
    int rcvbuf = 4 * 1024 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (bind(fd, (struct sockaddr *)&local, local_len) < 0) {
        perror("bind");
        close(fd);
        return -1;
    }
    return fd;
}

static void prepare_batch(void) {
    for (int i = 0; i < BATCH; i++) {
        in_iov[i].iov_base = buffers[i];
        in_iov[i].iov_len = SLOT;
        out_iov[i].iov_base = buffers[i];
    }
}

/* One recvmmsg (flags decide whether it waits) and the sendmmsg of its replies.
 * Returns what recvmmsg returned, with errno intact when it failed. */
static int echo_batch(int fd, int flags) {
    for (int i = 0; i < BATCH; i++) {
        memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
        in[i].msg_hdr.msg_name = &peers[i];
        in[i].msg_hdr.msg_namelen = sizeof peers[i];
        in[i].msg_hdr.msg_iov = &in_iov[i];
        in[i].msg_hdr.msg_iovlen = 1;
    }
    int got = recvmmsg(fd, in, BATCH, flags, NULL);
    if (got < 0)
        return got;
    for (int i = 0; i < got; i++) {
        memset(&out[i].msg_hdr, 0, sizeof out[i].msg_hdr);
        out[i].msg_hdr.msg_name = &peers[i];
        out[i].msg_hdr.msg_namelen = in[i].msg_hdr.msg_namelen;
        out_iov[i].iov_len = in[i].msg_len;
        out[i].msg_hdr.msg_iov = &out_iov[i];
        out[i].msg_hdr.msg_iovlen = 1;
    }
    int start = 0;
    while (start < got) {
        int sent = sendmmsg(fd, out + start, got - start, 0);
        /* A refused datagram is skipped, as every server here does. */
        start += sent > 0 ? sent : 1;
    }
    return got;
}

/* One recvfrom and the sendto of its reply. Returns what recvfrom returned. */
static ssize_t echo_one(int fd) {
    socklen_t peer_len = sizeof peers[0];
    ssize_t got = recvfrom(fd, buffers[0], SLOT, 0, (struct sockaddr *)&peers[0], &peer_len);
    if (got >= 0)
        /* A refused reply is skipped, as every server here does. */
        sendto(fd, buffers[0], (size_t)got, 0, (struct sockaddr *)&peers[0], peer_len);
    return got;
}

static int transient(void) {
    return errno == EINTR || errno == EAGAIN;
}

static int serve_socket(const char *host, int port, int spin) {
    int fd = bound_socket(host, port, 0);
    if (fd < 0)
        return 1;
    /* Block for the first datagram (or, spinning, poll), then take whatever is queued. */
    int wait = spin ? MSG_DONTWAIT : MSG_WAITFORONE;
    prepare_batch();
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        if (echo_batch(fd, wait) < 0 && !transient()) {
            perror("recvmmsg");
            return 1;
        }
    }
}

static int serve_ports(const char *host, int base, int count, int batch) {
    int epoll = epoll_create1(0);
    if (epoll < 0) {
        perror("epoll_create1");
        return 1;
    }
    for (int i = 0; i < count; i++) {
        /* Non-blocking: a readiness report can be stale (a datagram dropped on reading for a
         * bad checksum), and a read that blocked there would stall every other port. */
        int fd = bound_socket(host, base + i, SOCK_NONBLOCK);
        if (fd < 0)
            return 1;
        /* Level-triggered: a socket left with datagrams queued is reported again. */
        struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event) < 0) {
            perror("epoll_ctl");
            return 1;
        }
    }
    prepare_batch();
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(epoll, ready, EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            ssize_t got = batch ? echo_batch(fd, MSG_DONTWAIT) : echo_one(fd);
            if (got < 0 && !transient()) {
                perror(batch ? "recvmmsg" : "recvfrom");
                return 1;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc == 3 || (argc == 4 && strcmp(argv[3], "--spin") == 0))
        return serve_socket(argv[1], atoi(argv[2]), argc == 4);
    int batch = argc == 6 && strcmp(argv[5], "--batch") == 0;
    if (!(argc == 5 || batch) || strcmp(argv[3], "--ports") != 0)
        return usage(argv[0]);
    int base = number(argv[2], 1, 65535);
    int count = base < 0 ? -1 : number(argv[4], 1, 65536 - base);
    if (count < 0) {
        fprintf(stderr, "echo_ref: need 1 <= PORT and PORT + N - 1 <= 65535\n");
        return 2;
    }
    return serve_ports(argv[1], base, count, batch);
}
