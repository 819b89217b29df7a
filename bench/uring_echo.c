/*
 * A C echo over many ports on io_uring: one thread, one ring, for the many-listeners figures
 * of the bench.
 *
 * When the load is spread over many ports, each datagram arrives on a socket of its own, so a
 * server that waits in epoll and then reads the ready socket (echo_ref --ports, and udpbindd)
 * pays a readiness event, a receive and a send per datagram: nothing can be batched, since
 * recvmmsg and sendmmsg batch one socket only. io_uring is how one thread lets the receives
 * and sends of many sockets share system calls; this echo shows what that is worth on the
 * machine at hand, next to echo_ref over the same ports and on one port.
 *
 * Each socket has one multishot IORING_OP_RECVMSG that stays armed: every datagram completes
 * it once more, in a buffer taken from one provided buffer ring shared by all sockets, laid
 * out as io_uring_recvmsg_out, the source address, then the payload. The reply is an
 * IORING_OP_SEND with that address as destination (sendto, with no msghdr for the kernel to
 * copy in), or an IORING_OP_SENDMSG on a kernel that refuses an address on a send; it goes out
 * from the same buffer, which returns to the ring when the send completes. Each pass submits
 * every reply and re-armed receive queued since the last one and waits for completions, in
 * one io_uring_submit_and_wait. The sockets are registered files (no file lookup per
 * operation), and the ring is SINGLE_ISSUER|DEFER_TASKRUN where the kernel has them, so
 * completions are processed in that one call instead of interrupting the thread.
 *
 * usage: uring_echo HOST PORT N
 * Binds HOST:PORT..PORT+N-1 (IPv4 or IPv6 literal), prints "ready" once every socket is bound
 * and its receive submitted, and serves until killed. A datagram too long for a buffer (about
 * 2 KiB of payload) is dropped, not answered cut short: the bench sends 64 B. Needs liburing
 * 2.3 and Linux 6.0 (multishot recvmsg); it exits with a message when the kernel refuses
 * io_uring.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "echo_common.h"

#define BUFFERS 4096       /* provided buffers: a power of two; 64 requests in flight use few */
#define BUFFER_SIZE 2048   /* recvmsg_out header + source address + payload */
#define BUFFER_GROUP 0
#define SQ_ENTRIES 4096
#define CQ_ENTRIES 65536   /* room for a burst of completions from many sockets */
#define SEND_TAG (1ull << 63) /* user_data: a send (| buffer id), else a receive (socket index) */

/* Where a buffer's reply goes: kept until the send completes, and to send it again by
 * sendmsg when the kernel refuses an address on a send. */
struct reply {
    int socket;
    struct msghdr msg;
    struct iovec iov;
};

static struct io_uring ring;
static struct io_uring_buf_ring *buffer_ring;
static unsigned char *buffers;
static struct reply replies[BUFFERS];
static unsigned returned;       /* buffers given back since the ring's tail last moved */
static int *sockets;            /* the descriptors, for a ring without registered files */
static int registered;          /* the sockets are registered files: SQEs name them by index */
static int send_with_address = 1;
static struct msghdr receive_msg; /* what every multishot receive lays out in its buffer */

static void fail(const char *what, int error) {
    fprintf(stderr, "uring_echo: %s: %s\n", what, strerror(error));
    exit(1);
}

/* A non-blocking UDP socket bound to HOST:PORT, as echo_ref binds its own. */
static int bound_socket(const struct sockaddr_storage *local, socklen_t local_len) {
    int fd = socket(local->ss_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        fail("socket", errno);
    /* The same receive buffer udpbindd asks for by default, so queues compare fairly. */
    int rcvbuf = 4 * 1024 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (bind(fd, (const struct sockaddr *)local, local_len) < 0) {
        int port = ntohs(((const struct sockaddr_in *)local)->sin_port); /* same place in v6 */
        fprintf(stderr, "uring_echo: bind port %d: %s\n", port, strerror(errno));
        exit(1);
    }
    return fd;
}

/* The ring, with SINGLE_ISSUER|DEFER_TASKRUN where the kernel has them (Linux 6.1). */
static void setup_ring(void) {
    unsigned modes[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, 0};
    int error = 0;
    for (unsigned i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        struct io_uring_params params;
        memset(&params, 0, sizeof params);
        /* SUBMIT_ALL: one refused SQE does not hold back the others of its batch. */
        params.flags = modes[i] | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
        params.cq_entries = CQ_ENTRIES;
        error = io_uring_queue_init_params(SQ_ENTRIES, &ring, &params);
        if (error == 0)
            return;
    }
    /* EPERM or ENOSYS: io_uring disabled (kernel.io_uring_disabled, a seccomp filter). */
    fprintf(stderr, "uring_echo: io_uring_queue_init: %s (is io_uring disabled here?)\n",
            strerror(-error));
    exit(1);
}

static void give_back(unsigned id) {
    io_uring_buf_ring_add(buffer_ring, buffers + (size_t)id * BUFFER_SIZE, BUFFER_SIZE,
                          (unsigned short)id, io_uring_buf_ring_mask(BUFFERS), (int)returned);
    returned++;
}

/* Make the buffers given back since the last call visible to the kernel. */
static void publish_buffers(void) {
    if (returned) {
        io_uring_buf_ring_advance(buffer_ring, (int)returned);
        returned = 0;
    }
}

/* The provided buffer ring, set up by hand: liburing 2.3 has no io_uring_setup_buf_ring. */
static void setup_buffers(void) {
    size_t size = BUFFERS * sizeof(struct io_uring_buf);
    buffer_ring = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (buffer_ring == MAP_FAILED)
        fail("mmap", errno);
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uintptr_t)buffer_ring;
    reg.ring_entries = BUFFERS;
    reg.bgid = BUFFER_GROUP;
    int error = io_uring_register_buf_ring(&ring, &reg, 0);
    if (error < 0)
        fail("io_uring_register_buf_ring", -error);
    io_uring_buf_ring_init(buffer_ring);
    buffers = aligned_alloc(4096, (size_t)BUFFERS * BUFFER_SIZE);
    if (!buffers)
        fail("aligned_alloc", ENOMEM);
    for (unsigned id = 0; id < BUFFERS; id++)
        give_back(id);
    publish_buffers();
}

/* The next free SQE, submitting the queued ones first when the queue is full. */
static struct io_uring_sqe *next_sqe(void) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
        if (!sqe)
            fail("io_uring_get_sqe", EBUSY);
    }
    return sqe;
}

/* An SQE prepared for socket ``index`` names it by index in the registered files. */
static void target(struct io_uring_sqe *sqe, int index) {
    if (registered) {
        sqe->fd = index;
        sqe->flags |= IOSQE_FIXED_FILE;
    } else {
        sqe->fd = sockets[index];
    }
}

static void arm_receive(int index) {
    struct io_uring_sqe *sqe = next_sqe();
    io_uring_prep_recvmsg_multishot(sqe, 0, &receive_msg, 0);
    target(sqe, index);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BUFFER_GROUP;
    io_uring_sqe_set_data64(sqe, (uint64_t)index);
}

static void send_reply(unsigned id) {
    struct reply *reply = &replies[id];
    struct io_uring_sqe *sqe = next_sqe();
    if (send_with_address) {
        io_uring_prep_send(sqe, 0, reply->iov.iov_base, reply->iov.iov_len, 0);
        io_uring_prep_send_set_addr(sqe, reply->msg.msg_name,
                                    (unsigned short)reply->msg.msg_namelen);
    } else {
        io_uring_prep_sendmsg(sqe, 0, &reply->msg, 0);
    }
    target(sqe, reply->socket);
    io_uring_sqe_set_data64(sqe, SEND_TAG | id);
}

/* Answer the datagram in buffer ``id`` (``length`` bytes from the multishot receive). */
static void echo(int index, unsigned id, int length) {
    unsigned char *buffer = buffers + (size_t)id * BUFFER_SIZE;
    struct io_uring_recvmsg_out *out = io_uring_recvmsg_validate(buffer, length, &receive_msg);
    if (!out || out->namelen > receive_msg.msg_namelen || (out->flags & MSG_TRUNC)) {
        give_back(id);
        return;
    }
    struct reply *reply = &replies[id];
    reply->socket = index;
    reply->iov.iov_base = io_uring_recvmsg_payload(out, &receive_msg);
    reply->iov.iov_len = io_uring_recvmsg_payload_length(out, length, &receive_msg);
    reply->msg.msg_name = io_uring_recvmsg_name(out);
    reply->msg.msg_namelen = out->namelen;
    reply->msg.msg_iov = &reply->iov;
    reply->msg.msg_iovlen = 1;
    send_reply(id);
}

static void send_done(const struct io_uring_cqe *cqe) {
    unsigned id = (unsigned)(cqe->user_data & ~SEND_TAG);
    if (cqe->res == -EINVAL && send_with_address) {
        /* A kernel that takes no address on IORING_OP_SEND: the same reply by sendmsg. */
        send_with_address = 0;
        fprintf(stderr, "uring_echo: the kernel refuses a send with an address; sendmsg\n");
        send_reply(id);
        return;
    }
    /* Sent, or refused (skipped, as every server here does): the buffer is free again. */
    give_back(id);
}

static void receive_done(const struct io_uring_cqe *cqe) {
    int index = (int)cqe->user_data;
    if (cqe->res >= 0 && (cqe->flags & IORING_CQE_F_BUFFER))
        echo(index, cqe->flags >> IORING_CQE_BUFFER_SHIFT, cqe->res);
    else if (cqe->res < 0 && cqe->res != -ENOBUFS)
        /* EINVAL: a kernel without multishot recvmsg; nothing here can serve without it. */
        fail("multishot recvmsg", -cqe->res);
    /* The receive ended (no buffer was left, or the kernel stopped it): arm it again. */
    if (!(cqe->flags & IORING_CQE_F_MORE))
        arm_receive(index);
}

static void serve(void) {
    for (;;) {
        int error = io_uring_submit_and_wait(&ring, 1);
        /* EBUSY/EAGAIN: completions must be reaped first; what was not submitted stays queued. */
        if (error < 0 && error != -EINTR && error != -EAGAIN && error != -EBUSY)
            fail("io_uring_submit_and_wait", -error);
        unsigned head, seen = 0;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            if (cqe->user_data & SEND_TAG)
                send_done(cqe);
            else
                receive_done(cqe);
        }
        io_uring_cq_advance(&ring, seen);
        publish_buffers();
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT N\n", argv[0]);
        return 2;
    }
    int base = number(argv[2], 1, 65535);
    int count = base < 0 ? -1 : number(argv[3], 1, 65536 - base);
    if (count < 0) {
        fprintf(stderr, "uring_echo: need 1 <= PORT and PORT + N - 1 <= 65535\n");
        return 2;
    }
    struct sockaddr_storage local;
    socklen_t local_len = address(argv[1], base, &local);
    if (local_len == 0) {
        fprintf(stderr, "uring_echo: not an address: %s\n", argv[1]);
        return 2;
    }
    /* The ring first: where io_uring is refused, say so before binding any port. */
    setup_ring();
    setup_buffers();
    sockets = calloc((size_t)count, sizeof *sockets);
    if (!sockets)
        fail("calloc", ENOMEM);
    for (int i = 0; i < count; i++) {
        address(argv[1], base + i, &local);
        sockets[i] = bound_socket(&local, local_len);
    }
    /* Where the kernel refuses to register them, SQEs name the descriptors themselves. */
    registered = io_uring_register_files(&ring, sockets, (unsigned)count) == 0;
    /* Every source address is of the sockets' own family, so it fits in their length. */
    receive_msg.msg_namelen = local_len;
    for (int i = 0; i < count; i++)
        arm_receive(i);
    io_uring_submit(&ring);
    printf("ready\n");
    fflush(stdout);
    serve();
}
