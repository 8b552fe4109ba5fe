/* Host-side AF_VSOCK conformance program for vmlab (tests/integration/test_conformance.py).
 *
 * A plain AF_VSOCK program: under `vmlab exec` (vhost-user) its sockets go through the shim,
 * on vhost through the kernel; compiled -static and run inside a guest against CID 1 it
 * measures the guest kernel's own vsock_loopback, which is what the shim is compared with.
 * The peers are the guest helper (vmlab-guest) started by the test.
 *
 *   vsock_conformance client CID ECHO_PORT SEQ_ECHO_PORT CLOSED_PORT
 *       host as the client of a stream echo server, a seqpacket echo server and a closed port;
 *       client_close and shut_rd use their own echo servers on ECHO_PORT+50 and +51 (the guest
 *       helper's echo exits when its peer is gone mid-echo); seqpacket_eor and shut_rd_told
 *       talk to `peer ECHO_PORT+52` (this program on the other end)
 *   vsock_conformance peer PORT
 *       the other end for the client: on PORT a SEQPACKET echo that says what it saw (each
 *       message comes back with 'E' or 'n' appended and with MSG_EOR iff it had MSG_EOR); on
 *       PORT+1 accepts A then B, reads "go" from B, sends on A and writes the errno to B
 *   vsock_conformance push CID PORT BYTES MS BUFSIZE
 *       connect with SO_VM_SOCKETS_BUFFER_SIZE BUFSIZE and send BYTES of the vmlab pattern;
 *       reports how many bytes send() had taken after MS ms: the peer's credit window while
 *       the `stall` peer reads nothing (capped by our own buffer size where the kernel has
 *       "vsock/virtio: cap TX credit to local buffer size", as Debian's 6.1 does)
 *   vsock_conformance bind-only PORT SECONDS    bind, never listen, for SECONDS
 *   vsock_conformance peer-close PORT           accept one, read to EOF, then send: EPIPE
 *   vsock_conformance server-close PORT         accept one, send "bye", close
 *   vsock_conformance many PORT N               accept N connections, read each to EOF
 *   vsock_conformance stall PORT BYTES BUFSIZE MS
 *       large SO_VM_SOCKETS_BUFFER_SIZE, accept, do not read for MS, then read BYTES and check
 *       the vmlab pattern (byte i == i % 251)
 *
 * Each case prints one JSON line {"case": ..., "ok": true|false, ...}; the exit status is 0
 * only if every case passed.  Observations that differ between kernels (poll with
 * SO_RCVLOWAT, ...) are printed as fields and judged by the test, not here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int failures;
static unsigned cid;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void msleep(int ms)
{
	struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
	nanosleep(&t, NULL);
}

static const char *ename(int e)
{
	switch (e) {
	case 0: return "0";
	case ECONNRESET: return "ECONNRESET";
	case ECONNREFUSED: return "ECONNREFUSED";
	case ETIMEDOUT: return "ETIMEDOUT";
	case EAGAIN: return "EAGAIN";
	case EPIPE: return "EPIPE";
	case ENODEV: return "ENODEV";
	case EINPROGRESS: return "EINPROGRESS";
	case ENOTCONN: return "ENOTCONN";
	case EINVAL: return "EINVAL";
	case EMSGSIZE: return "EMSGSIZE";
	default: return strerror(e);
	}
}

static void report(const char *name, int ok, const char *fmt, ...)
{
	char extra[1024] = "";
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(extra, sizeof extra, fmt, ap);
		va_end(ap);
	}
	printf("{\"case\":\"%s\",\"ok\":%s%s%s}\n", name, ok ? "true" : "false", *extra ? "," : "", extra);
	fflush(stdout);
	if (!ok)
		failures++;
}

static int vsock(int type)
{
	int s = socket(AF_VSOCK, type | SOCK_CLOEXEC, 0);
	if (s < 0) {
		perror("socket");
		exit(2);
	}
	return s;
}

static int connect_to(int type, unsigned port, int *err)
{
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	int s = vsock(type);
	struct timeval tv = {10, 0};
	setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
	if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
		*err = errno;
		close(s);
		return -1;
	}
	*err = 0;
	return s;
}

static int wait_in(int s, int ms)
{
	struct pollfd p = {s, POLLIN, 0};
	return poll(&p, 1, ms) > 0 && (p.revents & (POLLIN | POLLHUP));
}

static ssize_t send_all(int s, const void *buf, size_t n)
{
	size_t done = 0;
	while (done < n) {
		ssize_t r = send(s, (const char *)buf + done, n - done, MSG_NOSIGNAL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		done += (size_t)r;
	}
	return (ssize_t)done;
}

/* Read until EOF (or error / 10 s of silence) into buf; returns bytes read, -errno on error. */
static long read_eof(int s, char *buf, size_t cap)
{
	size_t got = 0;
	for (;;) {
		if (!wait_in(s, 10000))
			return -ETIMEDOUT;
		ssize_t r = recv(s, buf + got, got < cap ? cap - got : 0, 0);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (r == 0)
			return (long)got;
		got += (size_t)r;
		if (got >= cap)
			return (long)got;
	}
}

/* ---- host as the client ------------------------------------------------------------------ */
static void case_reset(unsigned closed)
{
	int e;
	connect_to(SOCK_STREAM, closed, &e);
	int blocking = e;
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = closed};
	int s = vsock(SOCK_STREAM | SOCK_NONBLOCK);
	int r = connect(s, (struct sockaddr *)&a, sizeof a);
	int first = r == 0 ? 0 : errno, soerr = -1;
	if (first == EINPROGRESS) {
		struct pollfd p = {s, POLLOUT, 0};
		poll(&p, 1, 10000);
		socklen_t l = sizeof soerr;
		getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &l);
	}
	close(s);
	report("reset_to_closed_port", blocking == ECONNRESET && first == EINPROGRESS && soerr == ECONNRESET,
	       "\"blocking\":\"%s\",\"nonblocking\":\"%s\",\"so_error\":\"%s\"", ename(blocking),
	       ename(first), soerr >= 0 ? ename(soerr) : "none");
}

static void case_nonblocking_connect(unsigned port)
{
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	int s = vsock(SOCK_STREAM | SOCK_NONBLOCK);
	int r = connect(s, (struct sockaddr *)&a, sizeof a);
	int first = r == 0 ? 0 : errno, soerr = -1;
	struct pollfd p = {s, POLLOUT, 0};
	poll(&p, 1, 10000);
	socklen_t l = sizeof soerr;
	getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &l);
	struct sockaddr_vm peer;
	socklen_t pl = sizeof peer;
	int pr = getpeername(s, (struct sockaddr *)&peer, &pl);
	int fl = fcntl(s, F_GETFL);
	fcntl(s, F_SETFL, fl & ~O_NONBLOCK);
	char buf[16];
	send_all(s, "ping", 4);
	shutdown(s, SHUT_WR);
	long n = read_eof(s, buf, sizeof buf);
	close(s);
	report("nonblocking_connect", (first == EINPROGRESS || first == 0) && soerr == 0 && pr == 0 &&
	       peer.svm_cid == cid && peer.svm_port == port && n == 4 && !memcmp(buf, "ping", 4),
	       "\"connect\":\"%s\",\"so_error\":\"%s\",\"echo\":%ld", ename(first), ename(soerr), n);
}

static void case_client_close(unsigned port, unsigned own)
{
	int e, s = connect_to(SOCK_STREAM, own, &e);
	ssize_t w = s >= 0 ? send_all(s, "abc", 3) : -1;
	if (s >= 0)
		close(s);                      /* without reading the echo */
	int s2 = connect_to(SOCK_STREAM, port, &e);   /* everything else is still fine */
	char buf[8];
	long n = -1;
	if (s2 >= 0) {
		send_all(s2, "ok", 2);
		shutdown(s2, SHUT_WR);
		n = read_eof(s2, buf, sizeof buf);
		close(s2);
	}
	report("client_close", w == 3 && n == 2, "\"echo_after\":%ld", n);
}

static void case_peek(unsigned port)
{
	int e, s = connect_to(SOCK_STREAM, port, &e);
	if (s < 0) {
		report("msg_peek", 0, "\"connect\":\"%s\"", ename(e));
		return;
	}
	send_all(s, "hello world", 11);
	char buf[64];
	ssize_t p = 0;
	double end = now() + 10;
	while (now() < end) {           /* the echo may arrive in pieces: peek until all is there */
		wait_in(s, 1000);
		p = recv(s, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
		if (p >= 11)
			break;
		msleep(20);
	}
	char small[8];
	ssize_t p5 = recv(s, small, 5, MSG_PEEK);
	ssize_t r = recv(s, buf, sizeof buf, 0);
	close(s);
	report("msg_peek", p == 11 && p5 == 5 && !memcmp(small, "hello", 5) && r == 11 &&
	       !memcmp(buf, "hello world", 11), "\"peek\":%zd,\"read\":%zd", p, r);
}

static void case_rcvtimeo(unsigned port)
{
	int e, s = connect_to(SOCK_STREAM, port, &e);
	struct timeval tv = {0, 300000};
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	char buf[8];
	double t = now();
	ssize_t r = recv(s, buf, sizeof buf, 0);
	int err = r < 0 ? errno : 0;
	double ms = (now() - t) * 1000;
	send_all(s, "x", 1);               /* still usable after the timeout */
	ssize_t r2 = recv(s, buf, sizeof buf, 0);
	close(s);
	report("rcvtimeo", r < 0 && err == EAGAIN && ms >= 250 && r2 == 1,
	       "\"errno\":\"%s\",\"waited_ms\":%.0f,\"after\":%zd", ename(err), ms, r2);
}

static void case_rcvlowat(unsigned port)
{
	int e, s = connect_to(SOCK_STREAM, port, &e);
	int lowat = 100;
	setsockopt(s, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof lowat);
	char buf[200];
	memset(buf, 'l', sizeof buf);
	send_all(s, buf, 10);
	msleep(500);                         /* the 10-byte echo is there now */
	int avail = -1;
	ioctl(s, FIONREAD, &avail);
	struct pollfd p = {s, POLLIN, 0};
	int early = poll(&p, 1, 500) > 0 && (p.revents & POLLIN);
	fd_set rd;
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	struct timeval stv = {0, 300000};
	int sel_early = select(s + 1, &rd, NULL, NULL, &stv) > 0 && FD_ISSET(s, &rd);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 77}, out[4];
	epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
	int ep_early = epoll_wait(ep, out, 4, 300) > 0 && (out[0].events & EPOLLIN);
	send_all(s, buf, 90);
	p.revents = 0;
	int late = poll(&p, 1, 10000) > 0 && (p.revents & POLLIN);
	FD_ZERO(&rd);
	FD_SET(s, &rd);
	stv.tv_sec = 10;
	int sel_late = select(s + 1, &rd, NULL, NULL, &stv) > 0 && FD_ISSET(s, &rd);
	int ep_late = epoll_wait(ep, out, 4, 10000) == 1 && (out[0].events & EPOLLIN) && out[0].data.u64 == 77;
	close(ep);
	msleep(300);
	struct timeval tv = {5, 0};
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	ssize_t r = recv(s, buf, sizeof buf, 0);
	close(s);
	/* upstream: no POLLIN below the low-water mark; guest 6.1 (and AF_UNIX): POLLIN at once */
	report("poll_rcvlowat", late && sel_late && ep_late && r == 100,
	       "\"queued\":%d,\"pollin_below_lowat\":%s,\"select_below_lowat\":%s,"
	       "\"epoll_below_lowat\":%s,\"read\":%zd", avail, early ? "true" : "false",
	       sel_early ? "true" : "false", ep_early ? "true" : "false", r);
}

static void case_shut_wr(unsigned port)
{
	int e, s = connect_to(SOCK_STREAM, port, &e);
	static char out[1000], in[2000];
	for (int i = 0; i < 1000; i++)
		out[i] = (char)('a' + i % 26);
	send_all(s, out, sizeof out);
	shutdown(s, SHUT_WR);
	ssize_t w = send(s, "x", 1, MSG_NOSIGNAL);
	int werr = w < 0 ? errno : 0;
	long n = read_eof(s, in, sizeof in);
	close(s);
	report("shut_wr", n == 1000 && !memcmp(in, out, 1000) && w < 0 && werr == EPIPE,
	       "\"echoed\":%ld,\"send_after\":\"%s\"", n, ename(werr));
}

static void case_shut_rd(unsigned port)
{
	int e, s = connect_to(SOCK_STREAM, port, &e);
	shutdown(s, SHUT_RD);
	char buf[8];
	double t = now();
	ssize_t r = recv(s, buf, sizeof buf, 0);     /* returns 0 at once */
	double ms = (now() - t) * 1000;
	ssize_t w = send(s, "x", 1, MSG_NOSIGNAL);
	int werr = w < 0 ? errno : 0;
	close(s);
	report("shut_rd", r == 0 && ms < 1000, "\"recv\":%zd,\"send_after\":\"%s\"", r,
	       w < 0 ? ename(werr) : "sent");
}

static void case_many(unsigned port, int total, int wave)
{
	int ok = 0, bad = 0;
	for (int base = 0; base < total; base += wave) {
		int fds[64], n = 0;
		for (int i = 0; i < wave && base + i < total; i++) {
			int e;
			fds[n] = connect_to(SOCK_STREAM, port, &e);
			if (fds[n] < 0) {
				bad++;
				continue;
			}
			char msg[32];
			int len = snprintf(msg, sizeof msg, "conn %d", base + i);
			send_all(fds[n], msg, (size_t)len);
			shutdown(fds[n], SHUT_WR);
			n++;
		}
		for (int i = 0; i < n; i++) {
			char buf[64];
			long got = read_eof(fds[i], buf, sizeof buf);
			if (got > 5 && !memcmp(buf, "conn ", 5))
				ok++;
			else
				bad++;
			close(fds[i]);
		}
	}
	report("many_connections", ok == total && bad == 0, "\"passed\":%d,\"failed\":%d", ok, bad);
}

static void case_seqpacket(unsigned port)
{
	int e, s = connect_to(SOCK_SEQPACKET, port, &e);
	if (s < 0) {
		report("seqpacket_bounds", 0, "\"connect\":\"%s\"", ename(e));
		return;
	}
	size_t sizes[] = {1, 7, 4096, 65536, 100};
	static char out[65536], in[70000];
	int bounds_ok = 1;
	for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
		for (size_t i = 0; i < sizes[k]; i++)
			out[i] = (char)(k * 31 + i);
		if (send(s, out, sizes[k], MSG_NOSIGNAL) != (ssize_t)sizes[k])
			bounds_ok = 0;
	}
	for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
		for (size_t i = 0; i < sizes[k]; i++)
			out[i] = (char)(k * 31 + i);
		wait_in(s, 10000);
		ssize_t r = recv(s, in, sizeof in, 0);
		if (r != (ssize_t)sizes[k] || memcmp(in, out, sizes[k]))
			bounds_ok = 0;
	}
	/* MSG_TRUNC: a short buffer gets the head and the flag; the rest of that message is gone */
	send(s, "0123456789", 10, MSG_NOSIGNAL);
	send(s, "next", 4, MSG_NOSIGNAL);
	send(s, "abcdef", 6, MSG_NOSIGNAL);
	struct iovec iov = {in, 4};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	wait_in(s, 10000);
	ssize_t t1 = recvmsg(s, &mh, 0);
	int trunc_flag = !!(mh.msg_flags & MSG_TRUNC);
	int head_ok = t1 == 4 && !memcmp(in, "0123", 4);
	wait_in(s, 10000);
	ssize_t t2 = recv(s, in, sizeof in, 0);
	int next_ok = t2 == 4 && !memcmp(in, "next", 4);
	wait_in(s, 10000);
	ssize_t t3 = recv(s, in, 2, MSG_TRUNC);     /* returns the real length */
	close(s);
	report("seqpacket_bounds", bounds_ok && head_ok && trunc_flag && next_ok && t3 == 6,
	       "\"bounds\":%s,\"trunc_read\":%zd,\"msg_trunc_flag\":%s,\"next\":%zd,\"msg_trunc_len\":%zd",
	       bounds_ok ? "true" : "false", t1, trunc_flag ? "true" : "false", t2, t3);
}

/* MSG_EOR both ways: `peer` appends 'E'/'n' for what it saw and echoes with MSG_EOR iff it
 * got MSG_EOR; the last reply is read into a short buffer (MSG_TRUNC and MSG_EOR together) */
static void case_seqpacket_eor(unsigned port)
{
	int e, s = connect_to(SOCK_SEQPACKET, port, &e);
	if (s < 0) {
		report("seqpacket_eor", 0, "\"connect\":\"%s\"", ename(e));
		return;
	}
	const char *msgs[] = {"first", "second", "0123456789"};
	int eor[] = {1, 0, 1};
	char to_guest[4] = "???", to_host[4] = "???";
	int trunc = 0, lens_ok = 1;
	for (int k = 0; k < 3; k++) {
		struct iovec iov = {(void *)msgs[k], strlen(msgs[k])};
		struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
		if (sendmsg(s, &mh, MSG_NOSIGNAL | (eor[k] ? MSG_EOR : 0)) != (ssize_t)strlen(msgs[k]))
			lens_ok = 0;
		char in[64];
		struct iovec riov = {in, k == 2 ? 4 : sizeof in};
		struct msghdr rh = {.msg_iov = &riov, .msg_iovlen = 1};
		wait_in(s, 10000);
		ssize_t r = recvmsg(s, &rh, 0);
		size_t want = strlen(msgs[k]) + 1;
		if (k < 2 && (r != (ssize_t)want || memcmp(in, msgs[k], want - 1)))
			lens_ok = 0;
		if (k == 2 && (r != 4 || memcmp(in, "0123", 4)))
			lens_ok = 0;
		if (k < 2 && r > 0)
			to_guest[k] = in[r - 1] == 'E' ? '1' : in[r - 1] == 'n' ? '0' : '?';
		to_host[k] = rh.msg_flags & MSG_EOR ? '1' : '0';
		if (k == 2)
			trunc = !!(rh.msg_flags & MSG_TRUNC);
	}
	/* the third reply was truncated: ask again with the tag in the middle of a longer message */
	struct iovec iov = {"x", 1};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	sendmsg(s, &mh, MSG_NOSIGNAL | MSG_EOR);
	char in[8];
	wait_in(s, 10000);
	ssize_t r = recv(s, in, sizeof in, 0);
	to_guest[2] = r == 2 ? (in[1] == 'E' ? '1' : '0') : '?';
	close(s);
	report("seqpacket_eor", lens_ok && !strcmp(to_guest, "101") && !strcmp(to_host, "101") && trunc,
	       "\"to_guest\":\"%s\",\"to_host\":\"%s\",\"trunc_with_eor\":%s,\"lengths\":%s",
	       to_guest, to_host, trunc ? "true" : "false", lens_ok ? "true" : "false");
}

/* shutdown(SHUT_RD) reaches the peer: its next send fails with EPIPE (SHUTDOWN(RCV) arrived) */
static void case_shut_rd_told(unsigned port)
{
	int e, a = connect_to(SOCK_STREAM, port, &e);
	if (a < 0) {
		report("shut_rd_told", 0, "\"connect\":\"%s\"", ename(e));
		return;
	}
	msleep(200);                         /* the peer has accepted A before B comes */
	shutdown(a, SHUT_RD);
	int b = connect_to(SOCK_STREAM, port, &e);
	char res[32] = "";
	long n = -1;
	if (b >= 0) {
		send_all(b, "go", 2);
		n = read_eof(b, res, sizeof res - 1);
		close(b);
	}
	if (n >= 0)
		res[n] = 0;
	char buf[4];
	ssize_t r = recv(a, buf, sizeof buf, MSG_DONTWAIT);
	close(a);
	report("shut_rd_told", n > 0 && !strcmp(res, "EPIPE") && r == 0,
	       "\"peer_send\":\"%s\",\"recv\":%zd", n > 0 ? res : "none", r);
}

static void case_dgram(void)
{
	double t = now();
	int s = socket(AF_VSOCK, SOCK_DGRAM, 0);
	int err = s < 0 ? errno : 0;
	if (s >= 0)
		close(s);
	report("dgram_refused", s < 0 && now() - t < 5, "\"errno\":\"%s\"", ename(err));
}

static int client(unsigned echo, unsigned seq, unsigned closed)
{
	case_reset(closed);
	case_nonblocking_connect(echo);
	case_client_close(echo, echo + 50);
	case_peek(echo);
	case_rcvtimeo(echo);
	case_rcvlowat(echo);
	case_shut_wr(echo);
	case_many(echo, 64, 8);
	case_seqpacket(seq);
	case_dgram();
	case_shut_rd(echo + 51);
	case_seqpacket_eor(echo + 52);
	case_shut_rd_told(echo + 53);
	return failures ? 1 : 0;
}

/* ---- host as the server ------------------------------------------------------------------- */
static int listener(unsigned port, int do_listen)
{
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	int s = vsock(SOCK_STREAM);
	if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) {
		perror("bind");
		exit(2);
	}
	if (do_listen && listen(s, 64) != 0) {
		perror("listen");
		exit(2);
	}
	printf("{\"ready\":%u}\n", port);
	fflush(stdout);
	return s;
}

static int accept_one(int l)
{
	struct pollfd p = {l, POLLIN, 0};
	if (poll(&p, 1, 60000) <= 0)
		return -1;
	return accept(l, NULL, NULL);
}

static int listen_on(int type, unsigned port)
{
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	int s = vsock(type);
	if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) {
		perror("bind/listen");
		exit(2);
	}
	return s;
}

static void peer_eor_echo(unsigned port)
{
	int l = listen_on(SOCK_SEQPACKET, port);
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0)
			continue;
		for (;;) {
			char in[256];
			struct iovec iov = {in, sizeof in - 1};
			struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
			ssize_t r = recvmsg(c, &mh, 0);
			if (r <= 0)
				break;
			int eor = !!(mh.msg_flags & MSG_EOR);
			in[r] = eor ? 'E' : 'n';
			struct iovec oiov = {in, (size_t)r + 1};
			struct msghdr oh = {.msg_iov = &oiov, .msg_iovlen = 1};
			if (sendmsg(c, &oh, MSG_NOSIGNAL | (eor ? MSG_EOR : 0)) < 0)
				break;
		}
		close(c);
	}
}

static void peer_shut_rd(unsigned port)
{
	int l = listen_on(SOCK_STREAM, port);
	for (;;) {
		int a = accept(l, NULL, NULL), b = accept(l, NULL, NULL);
		char go[2];
		if (a >= 0 && b >= 0 && recv(b, go, 2, MSG_WAITALL) == 2) {
			ssize_t w = send(a, "x", 1, MSG_NOSIGNAL);
			const char *res = w < 0 ? ename(errno) : "sent";
			send_all(b, res, strlen(res));
		}
		if (a >= 0)
			close(a);
		if (b >= 0)
			close(b);
	}
}

static int push(unsigned port, long long total, int ms, unsigned long long bs)
{
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	int s = vsock(SOCK_STREAM);
	setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, &bs, sizeof bs);
	setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &bs, sizeof bs);
	if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
		report("credit_push", 0, "\"connect\":\"%s\"", ename(errno));
		return 1;
	}
	static char block[251 * 261];
	for (size_t i = 0; i < sizeof block; i++)
		block[i] = (char)(i % 251);
	fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
	long long sent = 0, in_flight = -1;
	double end = now() + ms / 1000.0;
	int err = 0;
	while (sent < total) {
		if (in_flight < 0 && now() >= end) {
			in_flight = sent;          /* what the peer's window took while it read nothing */
			fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK);
		}
		size_t off = (size_t)(sent % 251), n = sizeof block - off;
		if ((long long)n > total - sent)
			n = (size_t)(total - sent);
		ssize_t r = send(s, block + off, n, MSG_NOSIGNAL);
		if (r > 0) {
			sent += r;
			continue;
		}
		if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
			struct pollfd p = {s, POLLOUT, 0};
			poll(&p, 1, 20);
			continue;
		}
		err = r < 0 ? errno : EPIPE;
		break;
	}
	if (in_flight < 0)
		in_flight = sent;
	shutdown(s, SHUT_WR);
	char c;
	recv(s, &c, 1, 0);                 /* the peer closes once it has read everything */
	close(s);
	report("credit_push", sent == total && !err, "\"in_flight\":%lld,\"sent\":%lld,\"error\":\"%s\"",
	       in_flight, sent, ename(err));
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 6 && !strcmp(argv[1], "client")) {
		cid = (unsigned)strtoul(argv[2], NULL, 0);
		return client((unsigned)atoi(argv[3]), (unsigned)atoi(argv[4]), (unsigned)atoi(argv[5]));
	}
	if (argc < 3) {
		fprintf(stderr, "usage: see the comment at the top of vsock_conformance.c\n");
		return 2;
	}
	if (argc >= 7 && !strcmp(argv[1], "push")) {
		cid = (unsigned)strtoul(argv[2], NULL, 0);
		return push((unsigned)atoi(argv[3]), atoll(argv[4]), atoi(argv[5]), strtoull(argv[6], NULL, 0));
	}
	unsigned port = (unsigned)atoi(argv[2]);
	const char *cmd = argv[1];
	if (!strcmp(cmd, "peer")) {
		if (fork() == 0)
			peer_eor_echo(port);
		peer_shut_rd(port + 1);
		return 0;
	}
	if (!strcmp(cmd, "bind-only")) {
		int s = listener(port, 0);
		msleep(argc >= 4 ? atoi(argv[3]) * 1000 : 30000);
		close(s);
		report("bind_only_host", 1, NULL);
		return 0;
	}
	int l = listener(port, 1);
	if (!strcmp(cmd, "peer-close")) {
		int c = accept_one(l);
		char buf[256];
		long n = read_eof(c, buf, sizeof buf);
		ssize_t again = recv(c, buf, sizeof buf, 0);
		int werr = 0;
		for (int i = 0; i < 50 && !werr; i++) {  /* the peer's close reaches us as a reset */
			if (send(c, "x", 1, MSG_NOSIGNAL) < 0)
				werr = errno;
			else
				msleep(100);
		}
		report("peer_close", n > 0 && again == 0 && (werr == EPIPE || werr == ECONNRESET),
		       "\"read\":%ld,\"again\":%zd,\"send_after\":\"%s\"", n, again, ename(werr));
	} else if (!strcmp(cmd, "server-close")) {
		int c = accept_one(l);
		ssize_t w = send_all(c, "bye", 3);
		close(c);
		report("server_close", w == 3, NULL);
	} else if (!strcmp(cmd, "many") && argc >= 4) {
		int want = atoi(argv[3]), ok = 0;
		long total = 0;
		for (int i = 0; i < want; i++) {
			int c = accept_one(l);
			if (c < 0)
				break;
			char buf[256];
			long n = read_eof(c, buf, sizeof buf);
			if (n > 0) {
				ok++;
				total += n;
			}
			close(c);
		}
		report("many_from_guests", ok == want, "\"accepted\":%d,\"bytes\":%ld", ok, total);
	} else if (!strcmp(cmd, "stall") && argc >= 6) {
		long long want = atoll(argv[3]);
		unsigned long long bs = strtoull(argv[4], NULL, 0);
		int ms = atoi(argv[5]);
		setsockopt(l, AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, &bs, sizeof bs);
		setsockopt(l, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &bs, sizeof bs);
		int c = accept_one(l);
		unsigned long long got_bs = 0;
		socklen_t bl = sizeof got_bs;
		getsockopt(c, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &got_bs, &bl);
		msleep(ms);
		static char buf[65536];
		long long got = 0, bad = 0;
		double t = now();
		for (;;) {
			if (!wait_in(c, 30000))
				break;
			ssize_t r = recv(c, buf, sizeof buf, 0);
			if (r <= 0)
				break;
			for (ssize_t i = 0; i < r; i++)
				if ((unsigned char)buf[i] != (unsigned char)((got + i) % 251))
					bad++;
			got += r;
		}
		report("stalled_reader", got == want && bad == 0,
		       "\"bytes\":%lld,\"bad\":%lld,\"buffer_size\":%llu,\"read_seconds\":%.2f", got, bad,
		       got_bs, now() - t);
	} else {
		fprintf(stderr, "unknown command %s\n", cmd);
		return 2;
	}
	close(l);
	return failures ? 1 : 0;
}
