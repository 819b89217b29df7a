/*
 * What the benchmarks' C echo servers (echo_ref.c, uring_echo.c) share: reading their
 * command line. Header-only, so each server still builds from its one source file.
 */
#ifndef ECHO_COMMON_H
#define ECHO_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* HOST:PORT as a socket address; its length, or 0 if HOST is not an address literal. */
static socklen_t address(const char *host, int port, struct sockaddr_storage *local) {
    memset(local, 0, sizeof *local);
    struct sockaddr_in *v4 = (struct sockaddr_in *)local;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)local;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        return sizeof *v4;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        return sizeof *v6;
    }
    return 0;
}

/* A decimal argument in [low, high], or -1. */
static int number(const char *text, int low, int high) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < low || value > high)
        return -1;
    return (int)value;
}

#endif
