/* vmlab vsock shim: an LD_PRELOAD library that serves a program's AF_VSOCK sockets from a
 * vmlab lab's vhost-user backend, so unmodified host programs (C, Python, socat) talk to the
 * lab's guests on hosts without /dev/vhost-vsock.
 *
 * Design: socket(AF_VSOCK, SOCK_STREAM|SOCK_SEQPACKET) returns an AF_UNIX socket of the same
 * type, so read/write/poll/epoll/select/MSG_PEEK/SO_RCVTIMEO/SO_SNDTIMEO/dup/fork work on it
 * natively.  The vsock personality (addresses, options, errors) lives in a per-fd table:
 *
 *  - bind(port P) binds the Unix socket to the abstract name "\0<ns>:<P>" (<ns> is the lab's
 *    host namespace, $VMLAB_VSOCK_NS): the name is the port reservation (EADDRINUSE comes from
 *    the kernel, a dead process frees it).  The backend connects a guest's REQUEST for
 *    (CID 2, P) to that name and first writes a 16-byte preamble "VSK1" + peer cid + peer port
 *    + local port (little endian), which accept() consumes for the peer address.
 *  - connect(cid, P) connects to the VM's hybrid socket ($VMLAB_VSOCK_VMS: "cid=path;..."),
 *    writes "CONNECT <P> [<srcport>]\n" and waits for "OK <hostport>\n" (refused: EOF ->
 *    ECONNRESET as the virtio transport reports it; SO_VM_SOCKETS_CONNECT_TIMEOUT -> ETIMEDOUT).
 *    Non-blocking connect returns EINPROGRESS; getsockopt(SO_ERROR) waits for the verdict and
 *    the first read consumes the OK line.
 *
 *  - SEQPACKET connections are framed: every message between the shim and the backend is one
 *    flags byte (FRAME_EOR: MSG_EOR <-> VIRTIO_VSOCK_SEQ_EOR) and the data; the shim adds it on
 *    send and strips it on receive (CONNECT ... frame; the preamble magic "VSK2" on accept).
 *  - What an AF_UNIX socket cannot tell its peer goes out of band: "CTL <hostport> <guestport>
 *    shut_rd|buf=<n>\n" on the VM's hybrid socket (shutdown(SHUT_RD) and
 *    SO_VM_SOCKETS_BUFFER_SIZE after connect/accept); buf=<n> also rides on the CONNECT line.
 *  - poll/ppoll/select/epoll_wait honour SO_RCVLOWAT on stream sockets.
 *
 * Not the kernel: poll() reports POLLOUT during a non-blocking connect.  See docs/exec.md.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/vm_sockets.h>

#ifndef SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW
#define SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW 8
#endif
#ifndef SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD
#define SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD 6
#endif
#ifndef VMADDR_CID_LOCAL
#define VMADDR_CID_LOCAL 1
#endif

#define EXPORT __attribute__((visibility("default")))
#define PREAMBLE_LEN 16
#define MAX_VMS 256
#define LAST_RESERVED_PORT 1023
#define DEFAULT_BUF 262144ULL
#define MAX_BUF_DEFAULT 262144ULL
#define MIN_BUF_DEFAULT 128ULL
#define MAX_BUF_ALLOC 0xFFFFFFFFULL   /* VIRTIO_VSOCK_MAX_BUF_SIZE: the transport's clamp */
#define FRAME_EOR 0x01                /* framed SEQPACKET: this message ends a record */
#define HOST_SNDBUF 262144            /* stream SO_SNDBUF asked for: see hold_a_window() */

/* ---- real functions ------------------------------------------------------------------ */
static int (*r_socket)(int, int, int);
static int (*r_socketpair)(int, int, int, int[2]);
static int (*r_bind)(int, const struct sockaddr *, socklen_t);
static int (*r_listen)(int, int);
static int (*r_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*r_connect)(int, const struct sockaddr *, socklen_t);
static int (*r_getsockname)(int, struct sockaddr *, socklen_t *);
static int (*r_getpeername)(int, struct sockaddr *, socklen_t *);
static int (*r_getsockopt)(int, int, int, void *, socklen_t *);
static int (*r_setsockopt)(int, int, int, const void *, socklen_t);
static int (*r_ioctl)(int, unsigned long, ...);
static int (*r_close)(int);
static int (*r_dup)(int);
static int (*r_dup2)(int, int);
static int (*r_dup3)(int, int, int);
static int (*r_fcntl)(int, int, ...);
static ssize_t (*r_read)(int, void *, size_t);
static ssize_t (*r_readv)(int, const struct iovec *, int);
static ssize_t (*r_recv)(int, void *, size_t, int);
static ssize_t (*r_recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
static ssize_t (*r_recvmsg)(int, struct msghdr *, int);
static int (*r_open)(const char *, int, ...);
static int (*r_open64)(const char *, int, ...);
static int (*r_openat)(int, const char *, int, ...);
static int (*r_openat64)(int, const char *, int, ...);
static int (*r_poll)(struct pollfd *, nfds_t, int);
static int (*r_ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_writev)(int, const struct iovec *, int);
static ssize_t (*r_send)(int, const void *, size_t, int);
static ssize_t (*r_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*r_sendmsg)(int, const struct msghdr *, int);
static int (*r_shutdown)(int, int);

static void *need(const char *name)
{
    void *p = dlsym(RTLD_NEXT, name);
    if (!p) {
        fprintf(stderr, "vmlab-vsock: cannot find %s in libc\n", name);
        abort();
    }
    return p;
}

/* ---- configuration (environment) ------------------------------------------------------ */
struct vm { uint32_t cid; char path[108]; };
static struct vm vms[MAX_VMS];
static int nvms;
static char ns[81];               /* the backend allows 80 bytes; "<ns>:<port>" fits 107 */
static int debug;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

#define DBG(...) do { if (debug) { fprintf(stderr, "vmlab-vsock[%d]: ", (int)getpid()); \
                                   fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

static void init(void)
{
    r_socket = need("socket"); r_socketpair = need("socketpair"); r_bind = need("bind");
    r_listen = need("listen"); r_accept4 = need("accept4"); r_connect = need("connect");
    r_getsockname = need("getsockname"); r_getpeername = need("getpeername");
    r_getsockopt = need("getsockopt"); r_setsockopt = need("setsockopt");
    r_ioctl = need("ioctl"); r_close = need("close"); r_dup = need("dup"); r_dup2 = need("dup2");
    r_dup3 = need("dup3"); r_fcntl = need("fcntl"); r_read = need("read"); r_readv = need("readv");
    r_recv = need("recv"); r_recvfrom = need("recvfrom"); r_recvmsg = need("recvmsg");
    r_open = need("open"); r_open64 = need("open64"); r_openat = need("openat");
    r_openat64 = need("openat64"); r_poll = need("poll"); r_ppoll = need("ppoll");
    r_write = need("write"); r_writev = need("writev"); r_send = need("send");
    r_sendto = need("sendto"); r_sendmsg = need("sendmsg"); r_shutdown = need("shutdown");
    debug = getenv("VMLAB_VSOCK_DEBUG") != NULL;
    const char *n = getenv("VMLAB_VSOCK_NS");
    if (n && strlen(n) < sizeof ns)
        snprintf(ns, sizeof ns, "%s", n);
    else if (n)
        fprintf(stderr, "vmlab-vsock: VMLAB_VSOCK_NS is longer than %zu bytes; "
                        "host listeners are disabled\n", sizeof ns - 1);
    const char *v = getenv("VMLAB_VSOCK_VMS");
    while (v && *v && nvms < MAX_VMS) {
        char *end;
        unsigned long cid = strtoul(v, &end, 10);
        if (*end != '=')
            break;
        const char *p = end + 1, *q = strchr(p, ';');
        size_t len = q ? (size_t)(q - p) : strlen(p);
        if (len > 0 && len < sizeof vms[0].path - 12) {
            vms[nvms].cid = (uint32_t)cid;
            memcpy(vms[nvms].path, p, len);
            vms[nvms].path[len] = 0;
            nvms++;
        }
        v = q ? q + 1 : NULL;
    }
    DBG("ns=%s, %d VM(s)", ns, nvms);
}
#define INIT() pthread_once(&once, init)

__attribute__((constructor)) static void ctor(void) { INIT(); }

/* ---- per-fd state ----------------------------------------------------------------------- */
enum { K_SOCK = 1, K_DEV = 2 };

struct vs {
    int refs;                   /* fds sharing this socket (dup) */
    int kind;                   /* K_SOCK or K_DEV (/dev/vsock) */
    int type;                   /* SOCK_STREAM / SOCK_SEQPACKET */
    int bound, listening, connected, pending;
    int err;                    /* asynchronous error for SO_ERROR */
    int framed;                 /* SEQPACKET: a flags byte before each message on the wire */
    int buf_set;                /* the program set SO_VM_SOCKETS_BUFFER_SIZE (tell the backend) */
    int rd_shut;                /* shutdown(SHUT_RD) was told to the backend */
    int lowat;                  /* SO_RCVLOWAT, honoured by poll()/ppoll() as vsock does */
    uint32_t lcid, lport, pcid, pport;
    unsigned long long buf, buf_min, buf_max;
    struct timeval conn_timeout;
    struct timespec deadline;   /* non-blocking connect */
};

#define L1 1024
#define L2 1024
static struct vs **tab[L1];

static struct vs *get(int fd)
{
    if (fd < 0 || fd >= L1 * L2)
        return NULL;
    struct vs **page = __atomic_load_n(&tab[fd / L2], __ATOMIC_ACQUIRE);
    return page ? __atomic_load_n(&page[fd % L2], __ATOMIC_ACQUIRE) : NULL;
}

static void put(int fd, struct vs *v)   /* under lock; v == NULL untracks */
{
    if (fd < 0 || fd >= L1 * L2)
        return;
    struct vs **page = tab[fd / L2];
    if (!page) {
        if (!v)
            return;
        page = calloc(L2, sizeof *page);
        if (!page)
            return;
        __atomic_store_n(&tab[fd / L2], page, __ATOMIC_RELEASE);
    }
    struct vs *old = page[fd % L2];
    if (v)
        v->refs++;
    __atomic_store_n(&page[fd % L2], v, __ATOMIC_RELEASE);
    if (old && --old->refs == 0)
        free(old);
}

/* A tracked vsock socket, checked against the fd itself: an fd closed behind our back (by libc
 * internals, or a raw syscall) and reused for something else is untracked here, not misread. */
static struct vs *sock_of(int fd)
{
    struct vs *v = get(fd);
    if (!v || v->kind != K_SOCK)
        return NULL;
    int dom = -1, typ = -1;
    socklen_t l = sizeof dom;
    if (r_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &l) == 0 && dom == AF_UNIX) {
        l = sizeof typ;
        if (r_getsockopt(fd, SOL_SOCKET, SO_TYPE, &typ, &l) == 0 && typ == v->type)
            return v;
    }
    pthread_mutex_lock(&lock);
    if (get(fd) == v)
        put(fd, NULL);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static struct vs *new_vs(int kind, int type)
{
    struct vs *v = calloc(1, sizeof *v);
    if (!v)
        return NULL;
    v->kind = kind;
    v->type = type;
    v->lcid = VMADDR_CID_ANY;
    v->lport = VMADDR_PORT_ANY;
    v->lowat = 1;
    v->buf = DEFAULT_BUF;
    v->buf_min = MIN_BUF_DEFAULT;
    v->buf_max = MAX_BUF_DEFAULT;
    v->conn_timeout.tv_sec = 2;           /* the kernel's VSOCK_DEFAULT_CONNECT_TIMEOUT */
    const char *t = getenv("VMLAB_VSOCK_CONNECT_TIMEOUT");
    if (t && atof(t) > 0) {
        double d = atof(t);
        v->conn_timeout.tv_sec = (time_t)d;
        v->conn_timeout.tv_usec = (suseconds_t)((d - (double)(time_t)d) * 1e6);
    }
    return v;
}

static int fail(int e) { errno = e; return -1; }

static void dup_track(int oldfd, int newfd)
{
    struct vs *v = get(oldfd);
    pthread_mutex_lock(&lock);
    put(newfd, NULL);
    if (v && newfd >= 0)
        put(newfd, v);
    pthread_mutex_unlock(&lock);
}

/* ---- helpers -------------------------------------------------------------------------- */
static socklen_t abstract_addr(struct sockaddr_un *un, uint32_t port)
{
    memset(un, 0, sizeof *un);
    un->sun_family = AF_UNIX;
    int n = snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "%s:%u", ns, port);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

static int check_addr(const struct sockaddr *addr, socklen_t len, const struct sockaddr_vm **out)
{
    if (!addr || len < (socklen_t)sizeof(struct sockaddr_vm))
        return EINVAL;
    if (addr->sa_family != AF_VSOCK)
        return EAFNOSUPPORT;
    *out = (const struct sockaddr_vm *)addr;
    return 0;
}

static void fill_addr(struct sockaddr *addr, socklen_t *len, uint32_t cid, uint32_t port)
{
    if (!addr || !len)
        return;
    struct sockaddr_vm vm;
    memset(&vm, 0, sizeof vm);
    vm.svm_family = AF_VSOCK;
    vm.svm_cid = cid;
    vm.svm_port = port;
    memcpy(addr, &vm, *len < sizeof vm ? *len : sizeof vm);
    *len = sizeof vm;
}

static int can_bind_privileged(void)
{
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0)
        return geteuid() == 0;
    return (d[0].effective >> CAP_NET_BIND_SERVICE) & 1;
}

static long ms_left(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long ms = (deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
    return ms < 0 ? 0 : ms;
}

static void deadline_in(struct timespec *d, const struct timeval *tv)
{
    clock_gettime(CLOCK_MONOTONIC, d);
    d->tv_sec += tv->tv_sec;
    d->tv_nsec += tv->tv_usec * 1000L;
    if (d->tv_nsec >= 1000000000L) {
        d->tv_sec++;
        d->tv_nsec -= 1000000000L;
    }
}

/* Wait until fd is readable or the deadline passes: 1 readable, 0 timeout, -1 error. */
static int wait_in(int fd, const struct timespec *deadline)
{
    for (;;) {
        struct pollfd p = { fd, POLLIN, 0 };
        int r = poll(&p, 1, deadline ? (int)ms_left(deadline) : -1);
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -1 : r > 0;
    }
}

/* Read one '\n'-terminated line (stream: exactly the line is consumed; seqpacket: one
 * message).  Returns its length, 0 on EOF, -1 with errno (EAGAIN when incomplete). */
static ssize_t take_line(int fd, int type, char *buf, size_t cap)
{
    if (type == SOCK_SEQPACKET) {
        ssize_t n = r_recv(fd, buf, cap - 1, MSG_DONTWAIT);
        if (n > 0)
            buf[n] = 0;
        return n;
    }
    ssize_t n = r_recv(fd, buf, cap - 1, MSG_DONTWAIT | MSG_PEEK);
    if (n <= 0)
        return n;
    char *nl = memchr(buf, '\n', (size_t)n);
    if (!nl) {
        if ((size_t)n >= cap - 1)
            return fail(EPROTO);
        return fail(EAGAIN);
    }
    size_t want = (size_t)(nl - buf) + 1;
    n = r_recv(fd, buf, want, MSG_DONTWAIT);
    if (n > 0)
        buf[n] = 0;
    return n;
}

/* Consume the backend's "OK <port>\n".  wait: block until the deadline.
 * Returns 0 done, or an errno (EAGAIN: not yet, with !wait). */
static int finish_connect(int fd, struct vs *v, int wait)
{
    char line[64];
    for (;;) {
        ssize_t n = take_line(fd, v->type, line, sizeof line);
        if (n > 0) {
            unsigned long port;
            if (sscanf(line, "OK %lu", &port) != 1) {
                DBG("fd %d: bad handshake reply %.20s", fd, line);
                return EPROTO;
            }
            v->lport = (uint32_t)port;
            v->lcid = VMADDR_CID_HOST;
            v->pending = 0;
            v->connected = 1;
            return 0;
        }
        if (n == 0)
            return ECONNRESET;            /* the guest refused (RST): what virtio reports */
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return errno == ECONNREFUSED ? ECONNRESET : errno;
        if (!wait)
            return EAGAIN;
        int r = wait_in(fd, &v->deadline);
        if (r == 0)
            return ETIMEDOUT;
        if (r < 0)
            return errno;
    }
}

/* Room in a stream socket for a guest's whole credit window (256 KiB by default; Linux doubles
 * what is asked): the backend reads it only into guest rx buffers, as far as the guest's credit
 * goes, so with the default 208 KiB each credit update cost it two reads and two wakeups.
 * SEQPACKET keeps its default: there SO_SNDBUF also caps the message size (EMSGSIZE). A
 * program's own SO_SNDBUF, set later, wins. */
static void hold_a_window(int fd, int type)
{
    int n = HOST_SNDBUF;
    if (type == SOCK_STREAM)
        r_setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, sizeof n);
}

/* A failed connect leaves a fresh, unconnected socket behind (vsock allows a new connect). */
static void renew(int fd, struct vs *v)
{
    int fl = r_fcntl(fd, F_GETFL);
    int fdfl = r_fcntl(fd, F_GETFD);
    int s = r_socket(AF_UNIX, v->type | SOCK_CLOEXEC, 0);     /* options (SO_RCVLOWAT...) reset */
    v->lowat = 1;
    if (s < 0)
        return;
    hold_a_window(s, v->type);
    r_dup3(s, fd, (fdfl >= 0 && (fdfl & FD_CLOEXEC)) ? O_CLOEXEC : 0);
    r_close(s);
    if (fl >= 0)
        r_fcntl(fd, F_SETFL, fl);
    v->pending = v->connected = v->framed = 0;
    if (v->bound) {                 /* the old socket, now closed, held the port name */
        struct sockaddr_un un;
        socklen_t l = abstract_addr(&un, v->lport);
        if (r_bind(fd, (struct sockaddr *)&un, l) != 0)
            v->bound = 0;
    }
}

/* Completes a pending non-blocking connect seen from a read call: 0 go on, -1 errno set. */
static int settle(int fd, struct vs *v)
{
    pthread_mutex_lock(&lock);
    int e = v->pending ? finish_connect(fd, v, 0) : 0;
    if (e && e != EAGAIN) {
        v->pending = 0;
        v->err = 0;
        renew(fd, v);
    }
    pthread_mutex_unlock(&lock);
    if (e) {
        errno = e;
        return -1;
    }
    return 0;
}

#define SETTLE(fd) do { struct vs *v_ = get(fd); \
    if (v_ && v_->pending && settle(fd, v_) < 0) return -1; } while (0)

/* ---- socket calls --------------------------------------------------------------------- */
EXPORT int socket(int domain, int type, int protocol)
{
    INIT();
    if (domain != AF_VSOCK)
        return r_socket(domain, type, protocol);
    int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (protocol != 0)
        return fail(EPROTONOSUPPORT);
    if (base == SOCK_DGRAM) {
        if (!getenv("VMLAB_VSOCK_QUIET"))
            fprintf(stderr, "vmlab-vsock: socket(AF_VSOCK, SOCK_DGRAM) is not supported: "
                            "virtio-vsock has no datagram sockets (ENODEV, as the kernel)\n");
        return fail(ENODEV);
    }
    if (base != SOCK_STREAM && base != SOCK_SEQPACKET)
        return fail(ESOCKTNOSUPPORT);
    struct vs *v = new_vs(K_SOCK, base);
    if (!v)
        return fail(ENOMEM);
    int fd = r_socket(AF_UNIX, type, 0);
    if (fd < 0) {
        free(v);
        return -1;
    }
    hold_a_window(fd, base);
    pthread_mutex_lock(&lock);
    put(fd, v);
    pthread_mutex_unlock(&lock);
    DBG("socket fd %d type %d", fd, base);
    return fd;
}

EXPORT int socketpair(int domain, int type, int protocol, int sv[2])
{
    INIT();
    if (domain == AF_VSOCK)
        return fail(EOPNOTSUPP);
    return r_socketpair(domain, type, protocol, sv);
}

static int do_bind(int fd, struct vs *v, uint32_t cid, uint32_t port)
{
    if (v->bound || v->connected || v->pending)
        return fail(EINVAL);
    if (cid != VMADDR_CID_ANY && cid != VMADDR_CID_HOST)
        return fail(EADDRNOTAVAIL);
    struct sockaddr_un un;
    if (port == VMADDR_PORT_ANY) {
        uint32_t p = LAST_RESERVED_PORT + 1 + (uint32_t)(random() % 0x7ffff000U);
        for (int i = 0; i < 1000; i++, p++) {
            if (p <= LAST_RESERVED_PORT || p == VMADDR_PORT_ANY)
                p = LAST_RESERVED_PORT + 1;
            socklen_t l = abstract_addr(&un, p);
            if (r_bind(fd, (struct sockaddr *)&un, l) == 0) {
                port = p;
                break;
            }
            if (errno != EADDRINUSE)
                return -1;
        }
        if (port == VMADDR_PORT_ANY)
            return fail(EADDRNOTAVAIL);
    } else {
        if (port <= LAST_RESERVED_PORT && !can_bind_privileged())
            return fail(EACCES);
        socklen_t l = abstract_addr(&un, port);
        if (r_bind(fd, (struct sockaddr *)&un, l) != 0)
            return -1;
    }
    v->bound = 1;
    v->lcid = cid;
    v->lport = port;
    DBG("fd %d bound to %u:%u", fd, cid, port);
    return 0;
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    INIT();
    struct vs *v = sock_of(fd);
    if (!v)
        return r_bind(fd, addr, len);
    const struct sockaddr_vm *a;
    int e = check_addr(addr, len, &a);
    if (e)
        return fail(e);
    pthread_mutex_lock(&lock);
    int r = do_bind(fd, v, a->svm_cid, a->svm_port);
    pthread_mutex_unlock(&lock);
    return r;
}

EXPORT int listen(int fd, int backlog)
{
    INIT();
    struct vs *v = sock_of(fd);
    if (!v)
        return r_listen(fd, backlog);
    if (!v->bound || v->connected || v->pending)
        return fail(EINVAL);
    if (r_listen(fd, backlog) != 0)
        return -1;
    v->listening = 1;
    return 0;
}

/* Read the backend's 16-byte preamble from a freshly accepted socket (within 5 s); *framed:
 * the magic was "VSK2" (SEQPACKET messages carry a flags byte). */
static int read_preamble(int fd, int type, uint32_t out[3], int *framed)
{
    unsigned char b[PREAMBLE_LEN];
    struct timespec dl;
    struct timeval tv = { 5, 0 };
    deadline_in(&dl, &tv);
    for (;;) {
        ssize_t n = r_recv(fd, b, sizeof b, MSG_DONTWAIT | (type == SOCK_STREAM ? MSG_PEEK : 0));
        if (n == PREAMBLE_LEN) {
            if (type == SOCK_STREAM)
                r_recv(fd, b, sizeof b, MSG_DONTWAIT);
            break;
        }
        if (n == 0 || (n > 0 && type == SOCK_SEQPACKET))
            return -1;
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        if (wait_in(fd, &dl) <= 0)
            return -1;
        if (n > 0) {
            struct timespec ts = { 0, 1000000 };   /* partial: give the writer a moment */
            nanosleep(&ts, NULL);
        }
    }
    if (memcmp(b, "VSK1", 4) != 0 && (memcmp(b, "VSK2", 4) != 0 || type != SOCK_SEQPACKET))
        return -1;
    *framed = b[3] == '2';
    for (int i = 0; i < 3; i++)
        out[i] = (uint32_t)b[4 + 4 * i] | (uint32_t)b[5 + 4 * i] << 8 |
                 (uint32_t)b[6 + 4 * i] << 16 | (uint32_t)b[7 + 4 * i] << 24;
    return 0;
}

static int ctl(struct vs *v, const char *what);

EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    INIT();
    struct vs *v = sock_of(fd);
    if (!v)
        return r_accept4(fd, addr, len, flags);
    if (!v->listening)
        return fail(EINVAL);
    for (;;) {
        int nfd = r_accept4(fd, NULL, NULL, flags);
        if (nfd < 0)
            return -1;
        uint32_t pre[3];
        int framed = 0;
        if (read_preamble(nfd, v->type, pre, &framed) != 0) {
            DBG("fd %d: connection without a vmlab preamble dropped", fd);
            r_close(nfd);
            continue;
        }
        struct vs *c = new_vs(K_SOCK, v->type);
        if (!c) {
            r_close(nfd);
            return fail(ENOMEM);
        }
        hold_a_window(nfd, v->type);
        c->connected = 1;
        c->lcid = VMADDR_CID_HOST;
        c->lport = v->lport;
        c->pcid = pre[0];
        c->pport = pre[1];
        c->framed = framed;
        c->buf = v->buf > MAX_BUF_ALLOC ? MAX_BUF_ALLOC : v->buf;   /* inherited, as in vsock */
        c->buf_set = v->buf_set;
        c->buf_min = v->buf_min;
        c->buf_max = v->buf_max;
        c->conn_timeout = v->conn_timeout;
        pthread_mutex_lock(&lock);
        put(nfd, c);
        pthread_mutex_unlock(&lock);
        if (c->buf_set) {             /* the backend answered with its default: resize */
            char what[32];
            snprintf(what, sizeof what, "buf=%llu", c->buf);
            if (ctl(c, what) != 0)
                DBG("fd %d: could not tell the backend SO_VM_SOCKETS_BUFFER_SIZE", nfd);
        }
        fill_addr(addr, len, c->pcid, c->pport);
        DBG("fd %d: accepted %u:%u as fd %d", fd, c->pcid, c->pport, nfd);
        return nfd;
    }
}

EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    return accept4(fd, addr, len, 0);
}

static const char *vm_path(uint32_t cid)
{
    for (int i = 0; i < nvms; i++)
        if (vms[i].cid == cid)
            return vms[i].path;
    return NULL;
}

/* Out of band to the backend, for an established connection: "CTL <hostport> <guestport>
 * <what>\n" on the VM's hybrid socket, answered "OK\n" (within 2 s).  0 done, -1 not. */
static int ctl(struct vs *v, const char *what)
{
    const char *path = vm_path(v->pcid);
    if (!path || !v->connected)
        return -1;
    int s = r_socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct sockaddr_un un;
    memset(&un, 0, sizeof un);
    un.sun_family = AF_UNIX;
    snprintf(un.sun_path, sizeof un.sun_path, "%s", path);
    char line[80];
    int n = snprintf(line, sizeof line, "CTL %u %u %s\n", v->lport, v->pport, what);
    int ok = -1;
    if (r_connect(s, (struct sockaddr *)&un, sizeof un) == 0 && r_write(s, line, (size_t)n) == n) {
        struct pollfd p = { s, POLLIN, 0 };
        char reply[8];
        if (r_poll(&p, 1, 2000) > 0 && r_read(s, reply, sizeof reply) >= 3 && !memcmp(reply, "OK\n", 3))
            ok = 0;
    }
    r_close(s);
    DBG("ctl %u:%u %s: %s", v->pcid, v->pport, what, ok ? "failed" : "ok");
    return ok;
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    INIT();
    struct vs *v = sock_of(fd);
    if (!v)
        return r_connect(fd, addr, len);
    const struct sockaddr_vm *a;
    int e = check_addr(addr, len, &a);
    if (e)
        return fail(e);
    pthread_mutex_lock(&lock);
    int r = -1;
    if (v->connected) {
        errno = EISCONN;
        goto out;
    }
    if (v->pending) {
        errno = EALREADY;
        goto out;
    }
    if (v->listening) {
        errno = EINVAL;
        goto out;
    }
    const char *path = vm_path(a->svm_cid);
    if (!path) {
        /* the kernel: no transport reaches that CID (CID 0, 1, 2, a CID not in the lab) */
        DBG("connect to cid %u: not a VM of this lab", a->svm_cid);
        errno = ENODEV;
        goto out;
    }
    struct sockaddr_un un;
    memset(&un, 0, sizeof un);
    un.sun_family = AF_UNIX;
    snprintf(un.sun_path, sizeof un.sun_path, "%s%s", path,
             v->type == SOCK_SEQPACKET ? "_seqpacket" : "");
    int fl = r_fcntl(fd, F_GETFL);
    int nonblock = fl >= 0 && (fl & O_NONBLOCK);
    if (nonblock)
        r_fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    int cr = r_connect(fd, (struct sockaddr *)&un, sizeof un);
    int ce = errno;
    if (cr == 0) {
        char line[64], src[16] = "", buf[24] = "";
        if (v->bound)
            snprintf(src, sizeof src, " %u", v->lport);
        if (v->buf > MAX_BUF_ALLOC)
            v->buf = MAX_BUF_ALLOC;       /* what the virtio transport does at connect */
        if (v->buf_set)
            snprintf(buf, sizeof buf, " buf=%llu", v->buf);
        int n = snprintf(line, sizeof line, "CONNECT %u%s%s%s\n", a->svm_port, src,
                         v->type == SOCK_SEQPACKET ? " frame" : "", buf);
        if (r_write(fd, line, (size_t)n) != n) {
            cr = -1;
            ce = errno;
        }
    }
    if (nonblock)
        r_fcntl(fd, F_SETFL, fl);
    if (cr != 0) {
        DBG("connect to %s: %s", un.sun_path, strerror(ce));
        renew(fd, v);
        errno = (ce == ENOENT || ce == ECONNREFUSED) ? ENODEV : ce;
        goto out;
    }
    v->pcid = a->svm_cid;
    v->pport = a->svm_port;
    v->pending = 1;
    v->framed = v->type == SOCK_SEQPACKET;   /* what we send from now on is framed */
    deadline_in(&v->deadline, &v->conn_timeout);
    if (nonblock) {
        errno = EINPROGRESS;
        goto out;
    }
    e = finish_connect(fd, v, 1);
    if (e) {
        DBG("connect to %u:%u: %s", a->svm_cid, a->svm_port, strerror(e));
        renew(fd, v);
        errno = e;
        goto out;
    }
    DBG("fd %d connected to %u:%u from port %u", fd, v->pcid, v->pport, v->lport);
    r = 0;
out:
    pthread_mutex_unlock(&lock);
    return r;
}

EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    INIT();
    struct vs *v = sock_of(fd);
    if (!v)
        return r_getsockname(fd, addr, len);
    if (!len)
        return fail(EFAULT);
    fill_addr(addr, len, v->lcid, v->lport);
    return 0;
}

EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    INIT();
    struct vs *v = sock_of(fd);
    if (!v)
        return r_getpeername(fd, addr, len);
    if (v->pending)
        settle(fd, v);
    if (!v->connected)
        return fail(ENOTCONN);
    if (!len)
        return fail(EFAULT);
    fill_addr(addr, len, v->pcid, v->pport);
    return 0;
}

static unsigned long long clamp_buf(struct vs *v, unsigned long long val)
{
    if (val > v->buf_max)
        val = v->buf_max;
    if (val < v->buf_min)
        val = v->buf_min;
    return val;
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    INIT();
    struct vs *v = get(fd) ? sock_of(fd) : NULL;
    if (!v)
        return r_getsockopt(fd, level, name, val, len);
    if (level == AF_VSOCK) {
        if (!len)
            return fail(EFAULT);
        unsigned long long u;
        switch (name) {
        case SO_VM_SOCKETS_BUFFER_SIZE: u = v->buf; break;
        case SO_VM_SOCKETS_BUFFER_MIN_SIZE: u = v->buf_min; break;
        case SO_VM_SOCKETS_BUFFER_MAX_SIZE: u = v->buf_max; break;
        case SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD:
        case SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW:
            if (*len < (socklen_t)sizeof(struct timeval))
                return fail(EINVAL);
            memcpy(val, &v->conn_timeout, sizeof v->conn_timeout);
            *len = sizeof v->conn_timeout;
            return 0;
        default:
            return fail(ENOPROTOOPT);
        }
        if (*len < (socklen_t)sizeof u)
            return fail(EINVAL);
        memcpy(val, &u, sizeof u);
        *len = sizeof u;
        return 0;
    }
    if (level == SOL_SOCKET && len && *len >= (socklen_t)sizeof(int)) {
        int i;
        switch (name) {
        case SO_DOMAIN: i = AF_VSOCK; break;
        case SO_PROTOCOL: i = 0; break;
        case SO_ERROR:
            if (v->pending) {
                pthread_mutex_lock(&lock);
                int e = v->pending ? finish_connect(fd, v, 1) : 0;
                if (e) {
                    v->pending = 0;
                    renew(fd, v);
                }
                pthread_mutex_unlock(&lock);
                i = e;
            } else {
                i = v->err;
                v->err = 0;
                if (!i)
                    return r_getsockopt(fd, level, name, val, len);
            }
            break;
        case SO_ACCEPTCONN: i = v->listening; break;
        default:
            return r_getsockopt(fd, level, name, val, len);
        }
        memcpy(val, &i, sizeof i);
        *len = sizeof i;
        return 0;
    }
    return r_getsockopt(fd, level, name, val, len);
}

EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    INIT();
    struct vs *v = get(fd) ? sock_of(fd) : NULL;
    if (v && level == SOL_SOCKET && name == SO_RCVLOWAT) {
        int r = r_setsockopt(fd, level, name, val, len);
        if (r == 0 && val && len >= (socklen_t)sizeof(int)) {
            int lw;
            memcpy(&lw, val, sizeof lw);
            v->lowat = lw < 1 ? 1 : lw;
        }
        return r;
    }
    if (!v || level != AF_VSOCK)
        return r_setsockopt(fd, level, name, val, len);
    if (!val)
        return fail(EFAULT);
    if (name == SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD || name == SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW) {
        struct timeval tv;
        if (len < (socklen_t)sizeof tv)
            return fail(EINVAL);
        memcpy(&tv, val, sizeof tv);
        if (tv.tv_sec < 0 || tv.tv_usec < 0 || tv.tv_usec >= 1000000)
            return fail(ERANGE);
        v->conn_timeout = tv;
        return 0;
    }
    if (name != SO_VM_SOCKETS_BUFFER_SIZE && name != SO_VM_SOCKETS_BUFFER_MIN_SIZE &&
        name != SO_VM_SOCKETS_BUFFER_MAX_SIZE)
        return fail(ENOPROTOOPT);
    unsigned long long u;
    if (len < (socklen_t)sizeof u)
        return fail(EINVAL);
    memcpy(&u, val, sizeof u);
    unsigned long long before = v->buf;
    if (name == SO_VM_SOCKETS_BUFFER_SIZE) {
        v->buf = clamp_buf(v, u);
    } else if (name == SO_VM_SOCKETS_BUFFER_MIN_SIZE) {
        v->buf_min = u;
        v->buf = clamp_buf(v, v->buf);
    } else {
        v->buf_max = u;
        v->buf = clamp_buf(v, v->buf);
    }
    if (v->buf != before) {
        v->buf_set = 1;
        if (v->connected) {           /* the kernel clamps to the transport's maximum and */
            char what[32];            /* tells the peer (a credit update) */
            if (v->buf > MAX_BUF_ALLOC)
                v->buf = MAX_BUF_ALLOC;
            snprintf(what, sizeof what, "buf=%llu", v->buf);
            ctl(v, what);
        }
    }
    return 0;
}

EXPORT int ioctl(int fd, unsigned long req, ...)
{
    INIT();
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    struct vs *v = get(fd);
    if (v && v->kind == K_DEV && req == IOCTL_VM_SOCKETS_GET_LOCAL_CID) {
        if (!arg)
            return fail(EFAULT);
        uint32_t cid = VMADDR_CID_HOST;      /* the lab's guests see us as the host */
        memcpy(arg, &cid, sizeof cid);
        return 0;
    }
    if (v && v->kind == K_DEV)
        return fail(ENOTTY);
    int r = r_ioctl(fd, req, arg);    /* a vsock socket: ENOTTY from AF_UNIX, as the kernel */
    if (r == 0 && req == FIONREAD && arg && v && v->kind == K_SOCK && v->framed) {
        int n;                        /* the next message's length: without its flags byte */
        memcpy(&n, arg, sizeof n);
        if (n > 0)
            n--;
        memcpy(arg, &n, sizeof n);
    }
    return r;
}

/* ---- framed SEQPACKET: a flags byte before every message ---------------------------------
 * Unix SEQPACKET sockets neither keep nor report MSG_EOR, so on a framed connection each
 * message is <flags byte><data> (FRAME_EOR: the message ends a record).  One extra iovec per
 * call, no copy. */
static struct vs *framed_of(int fd)
{
    struct vs *v = get(fd);             /* checked against the fd: never frame a reused fd */
    return v && v->kind == K_SOCK && v->framed ? sock_of(fd) : NULL;
}

/* m = msg with the flags byte *f as its first iovec (iov: IOV_MAX entries); -1 if too long */
static int frame(struct msghdr *m, const struct msghdr *msg, struct iovec *iov, unsigned char *f)
{
    if (msg->msg_iovlen >= IOV_MAX)
        return fail(EMSGSIZE);
    iov[0].iov_base = f;
    iov[0].iov_len = 1;
    if (msg->msg_iovlen)
        memcpy(iov + 1, msg->msg_iov, msg->msg_iovlen * sizeof *iov);
    *m = *msg;
    m->msg_name = NULL;
    m->msg_namelen = 0;
    m->msg_iov = iov;
    m->msg_iovlen = msg->msg_iovlen + 1;
    return 0;
}

static ssize_t framed_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (msg->msg_name && msg->msg_namelen)
        return fail(EISCONN);             /* vsock: an address on a connected socket */
    struct iovec iov[IOV_MAX];
    struct msghdr m;
    unsigned char f = (flags & MSG_EOR) ? FRAME_EOR : 0;
    if (frame(&m, msg, iov, &f) != 0)
        return -1;
    ssize_t r = r_sendmsg(fd, &m, flags & ~MSG_EOR);
    return r > 0 ? r - 1 : r;
}

static ssize_t framed_recvmsg(int fd, struct msghdr *msg, int flags)
{
    struct iovec iov[IOV_MAX];
    struct msghdr m;
    unsigned char f = 0;
    if (frame(&m, msg, iov, &f) != 0)
        return -1;
    ssize_t r = r_recvmsg(fd, &m, flags);
    msg->msg_controllen = m.msg_controllen;
    msg->msg_flags = m.msg_flags & ~MSG_EOR;
    if (r <= 0)
        return r;                         /* 0: EOF (a framed message has at least the byte) */
    if (f & FRAME_EOR)
        msg->msg_flags |= MSG_EOR;
    return r - 1;                         /* with MSG_TRUNC: the real length, as vsock */
}

static ssize_t framed_send(int fd, const void *buf, size_t n, int flags)
{
    struct iovec iov = { (void *)buf, n };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    return framed_sendmsg(fd, &m, flags);
}

static ssize_t framed_recv(int fd, void *buf, size_t n, int flags)
{
    struct iovec iov = { buf, n };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    return framed_recvmsg(fd, &m, flags);
}

/* ---- reads: a pending non-blocking connect finishes on the first read ------------------ */
EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    INIT();
    SETTLE(fd);
    if (framed_of(fd))
        return framed_recv(fd, buf, n, 0);
    return r_read(fd, buf, n);
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int n)
{
    INIT();
    SETTLE(fd);
    if (framed_of(fd) && n >= 0) {
        struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
        return framed_recvmsg(fd, &m, 0);
    }
    return r_readv(fd, iov, n);
}

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    INIT();
    SETTLE(fd);
    if (framed_of(fd))
        return framed_recv(fd, buf, n, flags);
    return r_recv(fd, buf, n, flags);
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
                        socklen_t *alen)
{
    INIT();
    struct vs *v = get(fd);
    if (v && v->kind == K_SOCK) {
        SETTLE(fd);
        ssize_t r = v->framed ? framed_recv(fd, buf, n, flags)
                              : r_recvfrom(fd, buf, n, flags, NULL, NULL);
        if (r >= 0 && addr && alen)
            fill_addr(addr, alen, v->pcid, v->pport);
        return r;
    }
    return r_recvfrom(fd, buf, n, flags, addr, alen);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    INIT();
    struct vs *v = get(fd);
    if (v && v->kind == K_SOCK) {
        SETTLE(fd);
        void *name = msg->msg_name;
        socklen_t nlen = msg->msg_namelen;
        msg->msg_name = NULL;
        msg->msg_namelen = 0;
        ssize_t r = v->framed ? framed_recvmsg(fd, msg, flags) : r_recvmsg(fd, msg, flags);
        msg->msg_name = name;
        msg->msg_namelen = nlen;
        if (r >= 0 && name)
            fill_addr(name, &msg->msg_namelen, v->pcid, v->pport);
        return r;
    }
    return r_recvmsg(fd, msg, flags);
}

/* _FORTIFY_SOURCE builds call these instead; the length check stays glibc's */
static ssize_t (*r_read_chk)(int, void *, size_t, size_t);
static ssize_t (*r_recv_chk)(int, void *, size_t, size_t, int);
static ssize_t (*r_recvfrom_chk)(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    INIT();
    if (n > buflen) {
        if (!r_read_chk)
            r_read_chk = need("__read_chk");
        return r_read_chk(fd, buf, n, buflen);
    }
    return read(fd, buf, n);
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    INIT();
    if (n > buflen) {
        if (!r_recv_chk)
            r_recv_chk = need("__recv_chk");
        return r_recv_chk(fd, buf, n, buflen, flags);
    }
    return recv(fd, buf, n, flags);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *addr, socklen_t *alen)
{
    INIT();
    if (n > buflen) {
        if (!r_recvfrom_chk)
            r_recvfrom_chk = need("__recvfrom_chk");
        return r_recvfrom_chk(fd, buf, n, buflen, flags, addr, alen);
    }
    return recvfrom(fd, buf, n, flags, addr, alen);
}

/* ---- writes: framed SEQPACKET only; everything else goes straight to libc ------------- */
EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    INIT();
    if (framed_of(fd))
        return framed_send(fd, buf, n, 0);
    return r_write(fd, buf, n);
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int n)
{
    INIT();
    if (framed_of(fd) && n >= 0) {
        struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
        return framed_sendmsg(fd, &m, 0);
    }
    return r_writev(fd, iov, n);
}

EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    INIT();
    if (framed_of(fd))
        return framed_send(fd, buf, n, flags);
    return r_send(fd, buf, n, flags);
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
                      socklen_t alen)
{
    INIT();
    if (framed_of(fd)) {
        if (addr && alen)
            return fail(EISCONN);
        return framed_send(fd, buf, n, flags);
    }
    return r_sendto(fd, buf, n, flags, addr, alen);
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    INIT();
    if (framed_of(fd))
        return framed_sendmsg(fd, msg, flags);
    return r_sendmsg(fd, msg, flags);
}

/* ---- shutdown: SHUT_RD is told to the backend (the guest gets SHUTDOWN(RCV)) ------------ */
EXPORT int shutdown(int fd, int how)
{
    INIT();
    struct vs *v = get(fd) ? sock_of(fd) : NULL;
    if (v && v->connected && !v->rd_shut && (how == SHUT_RD || how == SHUT_RDWR)) {
        v->rd_shut = 1;
        if (ctl(v, "shut_rd") != 0)
            DBG("fd %d: could not tell the backend about SHUT_RD", fd);
    }
    return r_shutdown(fd, how);
}

/* ---- readiness with SO_RCVLOWAT: poll, ppoll, select, pselect, epoll_wait -----------------
 * vsock reports POLLIN only once SO_RCVLOWAT bytes are queued (or the peer shut down); an
 * AF_UNIX socket reports it for one byte.  Only when a waited-on stream socket has a mark above
 * one (no cost otherwise): poll/select wait without POLLIN for the sockets below their mark and
 * look at them again every LOWAT_STEP_MS; epoll_wait drops their POLLIN from what it returns
 * (re-arming EPOLLONESHOT) and, for level-triggered ones, waits LOWAT_STEP_MS before asking
 * again (so another fd's event may come up to that much later while one sits below its mark). */
#define LOWAT_STEP_MS 5
#define RD_EVENTS (POLLIN | POLLRDNORM)

static int has_mark(int fd)
{
    struct vs *v = get(fd);
    return v && v->kind == K_SOCK && v->type == SOCK_STREAM && v->lowat > 1;
}

static int below_lowat(int fd)
{
    struct vs *v = get(fd);
    if (!v || v->kind != K_SOCK || v->type != SOCK_STREAM || v->lowat <= 1 || !v->connected)
        return 0;
    int avail = 0;
    if (r_ioctl(fd, FIONREAD, &avail) != 0 || avail >= v->lowat)
        return 0;
    struct pollfd p = { fd, POLLRDHUP, 0 };
    if (r_poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
        return 0;                 /* EOF or error: readable whatever the mark */
    return 1;
}

static int lowat_fds(struct pollfd *fds, nfds_t n)
{
    for (nfds_t i = 0; i < n; i++)
        if ((fds[i].events & RD_EVENTS) && has_mark(fds[i].fd))
            return 1;
    return 0;
}

static long ms_since(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
}

/* The wait of one step: ppoll with the caller's signal mask (atomic, as theirs), else poll. */
static int poll_step(struct pollfd *fds, nfds_t n, long ms, const sigset_t *mask)
{
    if (!mask)
        return r_poll(fds, n, (int)ms);
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L }, *tp = ms < 0 ? NULL : &ts;
    return r_ppoll(fds, n, tp, mask);
}

static int poll_lowat(struct pollfd *fds, nfds_t n, long timeout_ms, const sigset_t *mask)
{
    short stack_ev[64];
    short *orig = n <= 64 ? stack_ev : malloc(n * sizeof *orig);
    if (!orig)
        return fail(ENOMEM);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int r;
    for (;;) {
        int held = 0;             /* sockets below their mark wait without POLLIN this step */
        for (nfds_t i = 0; i < n; i++) {
            orig[i] = fds[i].events;
            if ((fds[i].events & RD_EVENTS) && below_lowat(fds[i].fd)) {
                fds[i].events = (short)((fds[i].events & ~RD_EVENTS) | POLLRDHUP);
                held = 1;
            }
        }
        long left = timeout_ms < 0 ? -1 : timeout_ms - ms_since(&start);
        if (timeout_ms >= 0 && left < 0)
            left = 0;
        long step = held && (left < 0 || left > LOWAT_STEP_MS) ? LOWAT_STEP_MS : left;
        r = poll_step(fds, n, step, mask);
        int count = 0;
        for (nfds_t i = 0; i < n; i++) {
            if (fds[i].events != orig[i]) {        /* held: readable now if at the mark */
                fds[i].revents &= (short)(orig[i] | POLLHUP | POLLERR | POLLNVAL);
                if (!below_lowat(fds[i].fd))
                    fds[i].revents |= (short)(orig[i] & RD_EVENTS);
                fds[i].events = orig[i];
            } else if ((fds[i].revents & RD_EVENTS) && below_lowat(fds[i].fd)) {
                fds[i].revents &= (short)~RD_EVENTS;
            }
            if (r >= 0 && fds[i].revents)
                count++;
        }
        if (r < 0)
            break;
        r = count;
        if (count || (timeout_ms >= 0 && ms_since(&start) >= timeout_ms))
            break;
    }
    if (orig != stack_ev)
        free(orig);
    return r;
}

EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    INIT();
    if (!lowat_fds(fds, n))
        return r_poll(fds, n, timeout);
    return poll_lowat(fds, n, timeout, NULL);
}

static long ts_ms(const struct timespec *ts)
{
    return ts ? ts->tv_sec * 1000 + (ts->tv_nsec + 999999) / 1000000 : -1;
}

EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
    INIT();
    if (!lowat_fds(fds, n))
        return r_ppoll(fds, n, ts, mask);
    return poll_lowat(fds, n, ts_ms(ts), mask);
}

/* select/pselect: only when a socket with a mark is in readfds, the sets become a poll */
static int (*r_select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
static int (*r_pselect)(int, fd_set *, fd_set *, fd_set *, const struct timespec *, const sigset_t *);

static int select_has_mark(int nfds, fd_set *rd)
{
    if (!rd || nfds > FD_SETSIZE)
        return 0;
    for (int fd = 0; fd < nfds; fd++)
        if (FD_ISSET(fd, rd) && has_mark(fd))
            return 1;
    return 0;
}

static int select_lowat(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, long ms, const sigset_t *mask)
{
    struct pollfd fds[FD_SETSIZE];
    nfds_t n = 0;
    for (int fd = 0; fd < nfds; fd++) {
        short ev = (short)((rd && FD_ISSET(fd, rd) ? POLLIN : 0) |
                           (wr && FD_ISSET(fd, wr) ? POLLOUT : 0) |
                           (ex && FD_ISSET(fd, ex) ? POLLPRI : 0));
        if (ev) {
            fds[n].fd = fd;
            fds[n].events = ev;
            fds[n].revents = 0;
            n++;
        }
    }
    int r = poll_lowat(fds, n, ms, mask);
    if (r < 0)
        return r;
    for (nfds_t i = 0; i < n; i++)
        if (fds[i].revents & POLLNVAL)
            return fail(EBADF);
    int count = 0;
    for (nfds_t i = 0; i < n; i++) {     /* the kernel's POLLIN_SET / POLLOUT_SET / POLLEX_SET */
        int fd = fds[i].fd;
        short re = fds[i].revents;
        if (rd && FD_ISSET(fd, rd) && !(re & (POLLIN | POLLRDNORM | POLLRDBAND | POLLHUP | POLLERR)))
            FD_CLR(fd, rd);
        else if (rd && FD_ISSET(fd, rd))
            count++;
        if (wr && FD_ISSET(fd, wr) && !(re & (POLLOUT | POLLWRNORM | POLLWRBAND | POLLERR)))
            FD_CLR(fd, wr);
        else if (wr && FD_ISSET(fd, wr))
            count++;
        if (ex && FD_ISSET(fd, ex) && !(re & POLLPRI))
            FD_CLR(fd, ex);
        else if (ex && FD_ISSET(fd, ex))
            count++;
    }
    return count;
}

EXPORT int select(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, struct timeval *tv)
{
    INIT();
    if (!r_select)
        r_select = need("select");
    if (!select_has_mark(nfds, rd))
        return r_select(nfds, rd, wr, ex, tv);
    if (tv && (tv->tv_sec < 0 || tv->tv_usec < 0))
        return fail(EINVAL);
    long ms = tv ? tv->tv_sec * 1000 + (tv->tv_usec + 999) / 1000 : -1;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    int r = select_lowat(nfds, rd, wr, ex, ms, NULL);
    if (tv) {                     /* Linux leaves the time not slept in *timeout */
        long left = ms - ms_since(&start);
        if (left < 0)
            left = 0;
        tv->tv_sec = left / 1000;
        tv->tv_usec = (left % 1000) * 1000;
    }
    return r;
}

EXPORT int pselect(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, const struct timespec *ts,
                   const sigset_t *mask)
{
    INIT();
    if (!r_pselect)
        r_pselect = need("pselect");
    if (!select_has_mark(nfds, rd))
        return r_pselect(nfds, rd, wr, ex, ts, mask);
    return select_lowat(nfds, rd, wr, ex, ts_ms(ts), mask);
}

/* epoll: what the program registered (epoll_event.data is all an event says, so the fd is
 * found by its data, and only when no other registration has the same data) */
struct ep_reg { int epfd, fd; struct epoll_event ev; };
static struct ep_reg *eps;
static size_t neps, caps;
static int (*r_epoll_ctl)(int, int, int, struct epoll_event *);
static int (*r_epoll_wait)(int, struct epoll_event *, int, int);
static int (*r_epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);

static void ep_forget(int epfd, int fd)    /* under lock; -1 matches any */
{
    for (size_t i = 0; i < neps;)
        if ((epfd < 0 || eps[i].epfd == epfd) && (fd < 0 || eps[i].fd == fd))
            eps[i] = eps[--neps];
        else
            i++;
}

EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    INIT();
    if (!r_epoll_ctl)
        r_epoll_ctl = need("epoll_ctl");
    int r = r_epoll_ctl(epfd, op, fd, ev);
    if (r != 0)
        return r;
    /* every fd of the instance is kept: an event is ours only if its data is ours alone */
    pthread_mutex_lock(&lock);
    ep_forget(epfd, fd);
    if (op != EPOLL_CTL_DEL && ev) {
        if (neps == caps) {
            size_t nc = caps ? caps * 2 : 16;
            struct ep_reg *ne = realloc(eps, nc * sizeof *ne);
            if (ne) {
                eps = ne;
                caps = nc;
            }
        }
        if (neps < caps)
            eps[neps++] = (struct ep_reg){ epfd, fd, *ev };
    }
    pthread_mutex_unlock(&lock);
    return r;
}

static int ep_has_mark(int epfd)
{
    int yes = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < neps && !yes; i++)
        yes = eps[i].epfd == epfd && (eps[i].ev.events & EPOLLIN) && has_mark(eps[i].fd);
    pthread_mutex_unlock(&lock);
    return yes;
}

/* Drop POLLIN of events from sockets below their mark; returns the events left, *lt set when
 * a level-triggered one was held back (it would come straight back). */
static int ep_filter(int epfd, struct epoll_event *evs, int n, int *lt)
{
    int out = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < n; i++) {
        struct ep_reg *hit = NULL;
        int matches = 0;
        for (size_t k = 0; k < neps; k++)
            if (eps[k].epfd == epfd && eps[k].ev.data.u64 == evs[i].data.u64) {
                hit = &eps[k];
                matches++;
            }
        if (matches == 1 && (evs[i].events & EPOLLIN) && below_lowat(hit->fd)) {
            evs[i].events &= ~(uint32_t)(EPOLLIN | EPOLLRDNORM);
            if (hit->ev.events & EPOLLONESHOT) {      /* it fired: arm it again */
                struct epoll_event again = hit->ev;
                r_epoll_ctl(epfd, EPOLL_CTL_MOD, hit->fd, &again);
            } else if (!(hit->ev.events & EPOLLET)) {
                *lt = 1;
            }
        }
        if (evs[i].events)
            evs[out++] = evs[i];
    }
    pthread_mutex_unlock(&lock);
    return out;
}

static int epoll_lowat(int epfd, struct epoll_event *evs, int max, int timeout, const sigset_t *mask)
{
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        long left = timeout < 0 ? -1 : timeout - ms_since(&start);
        if (timeout >= 0 && left < 0)
            left = 0;
        int r = mask ? r_epoll_pwait(epfd, evs, max, (int)left, mask)
                     : r_epoll_wait(epfd, evs, max, (int)left);
        if (r <= 0)
            return r;
        int lt = 0;
        r = ep_filter(epfd, evs, r, &lt);
        if (r > 0 || left == 0)
            return r;
        if (lt) {
            long nap = left < 0 || left > LOWAT_STEP_MS ? LOWAT_STEP_MS : left;
            struct timespec ts = { 0, nap * 1000000L };
            nanosleep(&ts, NULL);
        }
    }
}

EXPORT int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout)
{
    INIT();
    if (!r_epoll_wait)
        r_epoll_wait = need("epoll_wait");
    if (!ep_has_mark(epfd))
        return r_epoll_wait(epfd, evs, max, timeout);
    return epoll_lowat(epfd, evs, max, timeout, NULL);
}

EXPORT int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout, const sigset_t *mask)
{
    INIT();
    if (!r_epoll_pwait)
        r_epoll_pwait = need("epoll_pwait");
    if (!ep_has_mark(epfd))
        return r_epoll_pwait(epfd, evs, max, timeout, mask);
    if (!r_epoll_wait)
        r_epoll_wait = need("epoll_wait");
    return epoll_lowat(epfd, evs, max, timeout, mask);
}

/* ---- descriptors ---------------------------------------------------------------------- */
EXPORT int close(int fd)
{
    INIT();
    if (get(fd) || __atomic_load_n(&neps, __ATOMIC_RELAXED)) {
        pthread_mutex_lock(&lock);
        put(fd, NULL);
        ep_forget(fd, -1);            /* an epoll instance closed, or a socket in one */
        ep_forget(-1, fd);
        pthread_mutex_unlock(&lock);
    }
    return r_close(fd);
}

EXPORT int dup(int fd)
{
    INIT();
    int n = r_dup(fd);
    if (n >= 0)
        dup_track(fd, n);
    return n;
}

EXPORT int dup2(int fd, int fd2)
{
    INIT();
    int n = r_dup2(fd, fd2);
    if (n >= 0 && fd != fd2)
        dup_track(fd, n);
    return n;
}

EXPORT int dup3(int fd, int fd2, int flags)
{
    INIT();
    int n = r_dup3(fd, fd2, flags);
    if (n >= 0)
        dup_track(fd, n);
    return n;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    INIT();
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    int n = r_fcntl(fd, cmd, arg);
    if (n >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
        dup_track(fd, n);
    return n;
}
EXPORT int fcntl64(int fd, int cmd, ...) __attribute__((alias("fcntl")));

/* ---- /dev/vsock: IOCTL_VM_SOCKETS_GET_LOCAL_CID answers VMADDR_CID_HOST ---------------- */
static int track_dev(int fd)
{
    if (fd >= 0) {
        struct vs *v = new_vs(K_DEV, 0);
        pthread_mutex_lock(&lock);
        put(fd, NULL);
        if (v)
            put(fd, v);
        pthread_mutex_unlock(&lock);
    }
    return fd;
}

static int is_dev_vsock(const char *path) { return path && strcmp(path, "/dev/vsock") == 0; }

static int open_dev(int (*o)(const char *, int, ...), const char *path, int flags, mode_t mode)
{
    int fd = o(path, flags, mode);
    if (fd < 0 && errno == ENOENT)             /* no vsock module on this host: stand in */
        fd = o("/dev/null", flags & ~(O_CREAT | O_EXCL | O_TRUNC), 0);
    return track_dev(fd);
}

#define MODE_ARG(flags) mode_t mode = 0; if ((flags) & (O_CREAT | O_TMPFILE)) { \
    va_list ap; va_start(ap, flags); mode = (mode_t)va_arg(ap, int); va_end(ap); }

EXPORT int open(const char *path, int flags, ...)
{
    INIT();
    MODE_ARG(flags);
    if (is_dev_vsock(path))
        return open_dev(r_open, path, flags, mode);
    return r_open(path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    INIT();
    MODE_ARG(flags);
    if (is_dev_vsock(path))
        return open_dev(r_open64, path, flags, mode);
    return r_open64(path, flags, mode);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    INIT();
    MODE_ARG(flags);
    if (is_dev_vsock(path))
        return open_dev(r_open, path, flags, mode);
    return r_openat(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    INIT();
    MODE_ARG(flags);
    if (is_dev_vsock(path))
        return open_dev(r_open64, path, flags, mode);
    return r_openat64(dirfd, path, flags, mode);
}
