/*
 * The C reference echo server of the benchmarks: recvmmsg/sendmmsg, up to 64 datagrams per
 * system call, blocking, one socket, no counters. Every other server is measured against it.
 * With --spin it never sleeps: it polls the socket without blocking, so no wake-up is ever
 * paid and what remains is the kernel's own cost of a datagram in and out.
 *
 * usage: echo_ref HOST PORT [--spin]
 * Binds HOST:PORT (IPv4 or IPv6 literal), prints "ready" and serves until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define SLOT 65536

static char buffers[BATCH][SLOT];
static struct sockaddr_storage peers[BATCH];

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "--spin") == 0)) {
        fprintf(stderr, "usage: %s HOST PORT [--spin]\n", argv[0]);
        return 2;
    }
    int wait = argc == 4 ? MSG_DONTWAIT : MSG_WAITFORONE;
    struct sockaddr_storage local;
    socklen_t local_len;
    memset(&local, 0, sizeof local);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&local;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&local;
    int port = atoi(argv[2]);
    if (inet_pton(AF_INET, argv[1], &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        local_len = sizeof *v4;
    } else if (inet_pton(AF_INET6, argv[1], &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        local_len = sizeof *v6;
    } else {
        fprintf(stderr, "echo_ref: not an address: %s\n", argv[1]);
        return 2;
    }
    int fd = socket(local.ss_family, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    /* The same receive buffer udpbindd asks for by default, so queues compare fairly. */
    int rcvbuf = 4 * 1024 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (bind(fd, (struct sockaddr *)&local, local_len) < 0) {
        perror("bind");
        return 1;
    }
    struct mmsghdr in[BATCH], out[BATCH];
    struct iovec in_iov[BATCH], out_iov[BATCH];
    for (int i = 0; i < BATCH; i++) {
        in_iov[i].iov_base = buffers[i];
        in_iov[i].iov_len = SLOT;
        out_iov[i].iov_base = buffers[i];
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            memset(&in[i].msg_hdr, 0, sizeof in[i].msg_hdr);
            in[i].msg_hdr.msg_name = &peers[i];
            in[i].msg_hdr.msg_namelen = sizeof peers[i];
            in[i].msg_hdr.msg_iov = &in_iov[i];
            in[i].msg_hdr.msg_iovlen = 1;
        }
        /* Block for the first datagram (or, spinning, poll), then take whatever is queued. */
        int got = recvmmsg(fd, in, BATCH, wait, NULL);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            perror("recvmmsg");
            return 1;
        }
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
    }
}
