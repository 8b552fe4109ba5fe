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
 *       helper's echo exits when its peer is gone mid-echo)
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
	send_all(s, buf, 90);
	p.revents = 0;
	int late = poll(&p, 1, 10000) > 0 && (p.revents & POLLIN);
	msleep(300);
	struct timeval tv = {5, 0};
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	ssize_t r = recv(s, buf, sizeof buf, 0);
	close(s);
	/* upstream: no POLLIN below the low-water mark; guest 6.1 (and AF_UNIX): POLLIN at once */
	report("poll_rcvlowat", late && r == 100, "\"queued\":%d,\"pollin_below_lowat\":%s,\"read\":%zd",
	       avail, early ? "true" : "false", r);
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
	unsigned port = (unsigned)atoi(argv[2]);
	const char *cmd = argv[1];
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
