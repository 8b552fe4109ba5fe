/*
 * vmlab-guest: a small static helper for AF_VSOCK work inside vmlab guests.
 *
 * Every result is one JSON object per line on stdout (flushed per line) so the
 * host can parse what happened without guessing from free text. See
 * images/guest/README.md for the commands and events.
 *
 * Built by vmlab's image builder with: gcc -O2 -static (no other libraries).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef SO_VM_SOCKETS_CONNECT_TIMEOUT
#define SO_VM_SOCKETS_CONNECT_TIMEOUT 6
#endif

#define IO_CHUNK (64 * 1024)
#define SEQ_BUF (1024 * 1024)
#define DATA_SHOWN 4096
#define PATTERN_MOD 251

/* ------------------------------------------------------------------ SHA-256 */

struct sha256 {
	uint32_t h[8];
	uint64_t len;
	uint8_t buf[64];
	size_t fill;
};

static const uint32_t K256[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_init(struct sha256 *s)
{
	static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
				       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	memcpy(s->h, iv, sizeof(iv));
	s->len = 0;
	s->fill = 0;
}

static void sha256_block(struct sha256 *s, const uint8_t *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, h;
	int i;

	for (i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (i = 16; i < 64; i++) {
		uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
	e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
	for (i = 0; i < 64; i++) {
		uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
		uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		h = g; g = f; f = e; e = d + t1;
		d = c; c = b; b = a; a = t1 + t2;
	}
	s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
	s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha256_update(struct sha256 *s, const void *data, size_t n)
{
	const uint8_t *p = data;

	s->len += n;
	if (s->fill) {
		size_t take = 64 - s->fill < n ? 64 - s->fill : n;
		memcpy(s->buf + s->fill, p, take);
		s->fill += take;
		p += take;
		n -= take;
		if (s->fill < 64)
			return;
		sha256_block(s, s->buf);
		s->fill = 0;
	}
	for (; n >= 64; p += 64, n -= 64)
		sha256_block(s, p);
	memcpy(s->buf, p, n);
	s->fill = n;
}

static void sha256_hex(struct sha256 *s, char out[65])
{
	uint64_t bits = s->len * 8;
	uint8_t pad[72] = {0x80};
	size_t padlen = (s->fill < 56 ? 56 : 120) - s->fill;
	uint8_t lenbuf[8];
	int i;

	for (i = 0; i < 8; i++)
		lenbuf[i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(s, pad, padlen);
	sha256_update(s, lenbuf, 8);
	for (i = 0; i < 8; i++)
		snprintf(out + 8 * i, 9, "%08x", s->h[i]);
}

/* ------------------------------------------------------------------ output */

static const char *progname = "vmlab-guest";

static void emit(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

/* Report a failed system call as one JSON line and exit 1. */
static void __attribute__((noreturn)) fail(const char *op, int err)
{
	emit("{\"event\":\"error\",\"op\":\"%s\",\"errno\":%d,\"error\":\"%s\"}", op, err, strerror(err));
	exit(1);
}

static void __attribute__((noreturn)) usage_error(const char *fmt, const char *arg)
{
	char msg[256];

	snprintf(msg, sizeof(msg), fmt, arg);
	/* msg only holds our own text plus argv; escape quotes and backslashes. */
	printf("{\"event\":\"error\",\"op\":\"usage\",\"errno\":%d,\"error\":\"", EINVAL);
	for (const char *c = msg; *c; c++) {
		if (*c == '"' || *c == '\\')
			putchar('\\');
		if ((unsigned char)*c < 0x20)
			printf("\\u%04x", (unsigned char)*c);
		else
			putchar(*c);
	}
	printf("\"}\n");
	fflush(stdout);
	fprintf(stderr, "%s: %s (see %s --help)\n", progname, msg, progname);
	exit(2);
}

/* Bytes as a JSON string: printable ASCII as is, every other byte as \u00XX
 * (so the host recovers the bytes with .encode("latin-1")). */
static void emit_message(const uint8_t *data, size_t n, int truncated_msg)
{
	size_t shown = n < DATA_SHOWN ? n : DATA_SHOWN;
	size_t i;

	printf("{\"event\":\"message\",\"len\":%zu,\"data\":\"", n);
	for (i = 0; i < shown; i++) {
		uint8_t c = data[i];
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	printf("\"%s%s}\n", shown < n ? ",\"truncated\":true" : "",
	       truncated_msg ? ",\"message_truncated\":true" : "");
	fflush(stdout);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------ options */

#define MAX_SEND_MSGS 64

struct opts {
	const char *cmd;
	unsigned int cid, port;
	int seqpacket, once, echo, recv, shutdown_wr, no_read;
	unsigned int count;          /* flood: connections to open */
	double hold;                 /* flood: seconds to keep them open */
	size_t chunk;                /* 0: no per-recv message events (stream) */
	long long expect_bytes;      /* -1: until EOF */
	long long recv_bytes;        /* -1: until EOF */
	long long send_bytes;        /* -1: none */
	const char *send_msg[MAX_SEND_MSGS]; /* each --send is one send() (one message on SEQPACKET) */
	int n_send_msgs;
	const char *send_file, *ready_file;
	double timeout;              /* 0: none */
};

static unsigned long long parse_num(const char *s, const char *what, int allow_suffix)
{
	char *end;
	unsigned long long v;

	errno = 0;
	if (!s || !*s || *s == '-')
		usage_error("bad %s", what);
	v = strtoull(s, &end, 0);
	if (errno)
		usage_error("bad %s", what);
	if (allow_suffix && *end) {
		unsigned long long mul = 1;
		switch (*end) {
		case 'k': case 'K': mul = 1ULL << 10; break;
		case 'm': case 'M': mul = 1ULL << 20; break;
		case 'g': case 'G': mul = 1ULL << 30; break;
		default: usage_error("bad %s", what);
		}
		end++;
		if (*end == 'i' || *end == 'I')
			end++;
		if (*end == 'b' || *end == 'B')
			end++;
		v *= mul;
	}
	if (*end)
		usage_error("bad %s", what);
	return v;
}

static unsigned int parse_cid(const char *s)
{
	if (!s)
		usage_error("missing %s", "CID");
	if (!strcmp(s, "any"))
		return VMADDR_CID_ANY;
	if (!strcmp(s, "host"))
		return VMADDR_CID_HOST;
	if (!strcmp(s, "hypervisor"))
		return VMADDR_CID_HYPERVISOR;
	if (!strcmp(s, "local"))
		return 1; /* VMADDR_CID_LOCAL */
	unsigned long long v = parse_num(s, "CID", 0);
	if (v > UINT_MAX)
		usage_error("CID out of range: %s", s);
	return (unsigned int)v;
}

static unsigned int parse_port(const char *s)
{
	if (!s)
		usage_error("missing %s", "PORT");
	if (!strcmp(s, "any"))
		return VMADDR_PORT_ANY;
	unsigned long long v = parse_num(s, "PORT", 0);
	if (v > UINT_MAX)
		usage_error("PORT out of range: %s", s);
	return (unsigned int)v;
}

static const char USAGE[] =
	"usage:\n"
	"  vmlab-guest info\n"
	"  vmlab-guest listen PORT [--cid CID|any] [--seqpacket] [--once] [--echo] [--chunk N]\n"
	"                 [--expect-bytes N] [--send MSG] [--ready-file PATH] [--timeout SEC]\n"
	"  vmlab-guest connect CID PORT [--seqpacket] [--send MSG] [--send-file PATH]\n"
	"                 [--send-bytes N] [--recv] [--recv-bytes N] [--chunk N] [--timeout SEC]\n"
	"                 [--shutdown]\n"
	"  vmlab-guest listen PORT --no-read [--once] [--timeout SEC]\n"
	"  vmlab-guest flood CID PORT [--count N] [--hold SEC] [--timeout SEC]\n"
	"CID: number, any (-1), host (2), hypervisor (0), local (1). PORT: number or any (-1).\n"
	"Sizes accept K/M/G suffixes (powers of 1024). Output: one JSON object per line.\n";

static void parse(int argc, char **argv, struct opts *o)
{
	int i = 2;

	memset(o, 0, sizeof(*o));
	o->cid = VMADDR_CID_ANY;
	o->expect_bytes = o->recv_bytes = o->send_bytes = -1;
	if (argc < 2)
		usage_error("missing command%s", "");
	o->cmd = argv[1];
	if (!strcmp(o->cmd, "--help") || !strcmp(o->cmd, "-h") || !strcmp(o->cmd, "help")) {
		fputs(USAGE, stdout);
		exit(0);
	}
	if (!strcmp(o->cmd, "listen")) {
		o->port = parse_port(i < argc ? argv[i++] : NULL);
	} else if (!strcmp(o->cmd, "connect") || !strcmp(o->cmd, "flood")) {
		o->cid = parse_cid(i < argc ? argv[i++] : NULL);
		o->port = parse_port(i < argc ? argv[i++] : NULL);
	} else if (strcmp(o->cmd, "info")) {
		usage_error("unknown command '%s'", o->cmd);
	}
	int listen_cmd = !strcmp(o->cmd, "listen"), connect_cmd = !strcmp(o->cmd, "connect");
	int flood_cmd = !strcmp(o->cmd, "flood");
	o->count = 1000;
	o->hold = 30;
	for (; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDS_VALUE() do { if (!v) usage_error("option %s needs a value", a); i++; } while (0)
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			fputs(USAGE, stdout);
			exit(0);
		} else if (!strcmp(a, "--seqpacket") && (listen_cmd || connect_cmd)) {
			o->seqpacket = 1;
		} else if (!strcmp(a, "--chunk") && (listen_cmd || connect_cmd)) {
			NEEDS_VALUE();
			o->chunk = parse_num(v, "--chunk", 1);
			if (!o->chunk)
				usage_error("%s must be > 0", a);
		} else if (!strcmp(a, "--send") && (listen_cmd || connect_cmd)) {
			NEEDS_VALUE();
			if (o->n_send_msgs == MAX_SEND_MSGS)
				usage_error("too many --send options (at most %s)", "64");
			o->send_msg[o->n_send_msgs++] = v;
		} else if (!strcmp(a, "--timeout") && (listen_cmd || connect_cmd || flood_cmd)) {
			char *end;
			NEEDS_VALUE();
			o->timeout = strtod(v, &end);
			if (*end || o->timeout < 0)
				usage_error("bad --timeout %s", v);
		} else if (!strcmp(a, "--cid") && listen_cmd) {
			NEEDS_VALUE();
			o->cid = parse_cid(v);
		} else if (!strcmp(a, "--once") && listen_cmd) {
			o->once = 1;
		} else if (!strcmp(a, "--echo") && listen_cmd) {
			o->echo = 1;
		} else if (!strcmp(a, "--expect-bytes") && listen_cmd) {
			NEEDS_VALUE();
			o->expect_bytes = parse_num(v, "--expect-bytes", 1);
		} else if (!strcmp(a, "--ready-file") && listen_cmd) {
			NEEDS_VALUE();
			o->ready_file = v;
		} else if (!strcmp(a, "--send-file") && connect_cmd) {
			NEEDS_VALUE();
			o->send_file = v;
		} else if (!strcmp(a, "--send-bytes") && connect_cmd) {
			NEEDS_VALUE();
			o->send_bytes = parse_num(v, "--send-bytes", 1);
		} else if (!strcmp(a, "--recv") && connect_cmd) {
			o->recv = 1;
		} else if (!strcmp(a, "--recv-bytes") && connect_cmd) {
			NEEDS_VALUE();
			o->recv_bytes = parse_num(v, "--recv-bytes", 1);
			o->recv = 1;
		} else if (!strcmp(a, "--shutdown") && connect_cmd) {
			o->shutdown_wr = 1;
		} else if (!strcmp(a, "--no-read") && listen_cmd) {
			o->no_read = 1;
		} else if (!strcmp(a, "--count") && flood_cmd) {
			NEEDS_VALUE();
			o->count = (unsigned int)parse_num(v, "--count", 0);
			if (o->count < 1 || o->count > 65536)
				usage_error("--count %s: 1..65536", v);
		} else if (!strcmp(a, "--hold") && flood_cmd) {
			char *end;
			NEEDS_VALUE();
			o->hold = strtod(v, &end);
			if (*end || o->hold < 0)
				usage_error("bad --hold %s", v);
		} else {
			usage_error("unknown option '%s' for this command", a);
		}
#undef NEEDS_VALUE
	}
}

/* ------------------------------------------------------------------ I/O */

/* Wait until fd is ready; 0 on ready, ETIMEDOUT or errno on failure. */
static int wait_fd(int fd, short events, double timeout)
{
	struct pollfd p = {.fd = fd, .events = events};
	int ms = timeout > 0 ? (int)(timeout * 1000) : -1;

	for (;;) {
		int r = poll(&p, 1, ms);
		if (r > 0)
			return 0;
		if (r == 0)
			return ETIMEDOUT;
		if (errno != EINTR)
			return errno;
	}
}

/* Send all of buf (stream) or buf as one message (seqpacket); handles partial writes. */
static void send_all(int fd, const uint8_t *buf, size_t n, const struct opts *o)
{
	while (n > 0) {
		int err = wait_fd(fd, POLLOUT, o->timeout);
		if (err)
			fail("send", err);
		ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fail("send", errno);
		}
		if (o->seqpacket)
			return; /* a message is sent whole or not at all */
		buf += w;
		n -= (size_t)w;
	}
}

struct sender {
	struct sha256 sha;
	unsigned long long bytes;
	double start;
};

static void sender_put(struct sender *s, int fd, const uint8_t *buf, size_t n, const struct opts *o)
{
	send_all(fd, buf, n, o);
	sha256_update(&s->sha, buf, n);
	s->bytes += n;
}

static void sender_done(struct sender *s)
{
	char hex[65];

	sha256_hex(&s->sha, hex);
	emit("{\"event\":\"sent\",\"bytes\":%llu,\"sha256\":\"%s\",\"seconds\":%.6f}",
	     s->bytes, hex, now() - s->start);
}

/* Everything a connect/listen session sends, in order: --send, --send-file, --send-bytes. */
static void do_send(int fd, const struct opts *o)
{
	struct sender s;
	size_t chunk = o->chunk ? o->chunk : IO_CHUNK;

	if (!o->n_send_msgs && !o->send_file && o->send_bytes < 0)
		return;
	sha256_init(&s.sha);
	s.bytes = 0;
	s.start = now();
	for (int i = 0; i < o->n_send_msgs; i++)
		sender_put(&s, fd, (const uint8_t *)o->send_msg[i], strlen(o->send_msg[i]), o);
	if (o->send_file) {
		int in = open(o->send_file, O_RDONLY | O_CLOEXEC);
		if (in < 0)
			fail("open", errno);
		uint8_t *buf = malloc(chunk);
		if (!buf)
			fail("send", ENOMEM);
		for (;;) {
			ssize_t r = read(in, buf, chunk);
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0)
				fail("read", errno);
			if (r == 0)
				break;
			sender_put(&s, fd, buf, (size_t)r, o);
		}
		free(buf);
		close(in);
	}
	if (o->send_bytes >= 0) {
		/* Byte at stream offset i is i % 251; a buffer of chunk+251 lets every
		 * chunk start at the right phase without per-byte work in the loop. */
		size_t i, span = chunk + PATTERN_MOD;
		uint8_t *pat = malloc(span);
		unsigned long long off = 0, total = (unsigned long long)o->send_bytes;
		if (!pat)
			fail("send", ENOMEM);
		for (i = 0; i < span; i++)
			pat[i] = (uint8_t)(i % PATTERN_MOD);
		while (off < total) {
			size_t n = total - off < chunk ? (size_t)(total - off) : chunk;
			sender_put(&s, fd, pat + off % PATTERN_MOD, n, o);
			off += n;
		}
		free(pat);
	}
	sender_done(&s);
}

/* Receive until EOF or `limit` bytes (-1: no limit); optionally echo. */
static void do_recv(int fd, const struct opts *o, long long limit, int echo)
{
	size_t bufsize = o->seqpacket ? SEQ_BUF : (o->chunk ? o->chunk : IO_CHUNK);
	uint8_t *buf = malloc(bufsize);
	struct sha256 sha;
	unsigned long long total = 0;
	double start = now(), last = start;
	char hex[65];

	if (!buf)
		fail("recv", ENOMEM);
	sha256_init(&sha);
	while (limit < 0 || total < (unsigned long long)limit) {
		size_t want = bufsize;
		int trunc = 0;
		ssize_t r;

		if (!o->seqpacket && limit >= 0 && (unsigned long long)limit - total < want)
			want = (size_t)((unsigned long long)limit - total);
		int err = wait_fd(fd, POLLIN, o->timeout);
		if (err)
			fail("recv", err);
		if (o->seqpacket) {
			struct iovec iov = {.iov_base = buf, .iov_len = want};
			struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
			r = recvmsg(fd, &mh, 0);
			trunc = r >= 0 && (mh.msg_flags & MSG_TRUNC);
		} else {
			r = recv(fd, buf, want, 0);
		}
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			fail("recv", errno);
		}
		if (r == 0)
			break;
		last = now();
		sha256_update(&sha, buf, (size_t)r);
		total += (size_t)r;
		if (o->seqpacket || o->chunk)
			emit_message(buf, (size_t)r, trunc);
		if (echo)
			send_all(fd, buf, (size_t)r, o);
	}
	free(buf);
	sha256_hex(&sha, hex);
	double secs = last - start;
	emit("{\"event\":\"received\",\"bytes\":%llu,\"sha256\":\"%s\",\"seconds\":%.6f,\"mbps\":%.3f}",
	     total, hex, secs, secs > 0 ? total * 8 / secs / 1e6 : 0.0);
}

static int vsock_socket(const struct opts *o)
{
	int fd = socket(AF_VSOCK, (o->seqpacket ? SOCK_SEQPACKET : SOCK_STREAM) | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fail("socket", errno);
	return fd;
}

static long long local_cid(void)
{
	unsigned int cid;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int r = ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
	close(fd);
	return r < 0 ? -1 : (long long)cid;
}

/* VMADDR_CID_ANY / VMADDR_PORT_ANY print as -1, everything else as unsigned. */
static long long show(unsigned int v)
{
	return v == 0xFFFFFFFFu ? -1 : (long long)v;
}

/* ------------------------------------------------------------------ commands */

static int cmd_info(void)
{
	unsigned int cid;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		fail("open", errno);
	if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		fail("ioctl", errno);
	close(fd);
	/* The virtio transport answers VMADDR_CID_ANY while no vsock device is present. */
	if (cid == VMADDR_CID_ANY)
		fail("info", ENODEV);
	emit("{\"event\":\"info\",\"cid\":%lld}", show(cid));
	return 0;
}

static int cmd_listen(const struct opts *o)
{
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = o->cid, .svm_port = o->port};
	socklen_t len = sizeof(addr);
	int fd = vsock_socket(o);

	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		fail("bind", errno);
	if (listen(fd, 16) < 0)
		fail("listen", errno);
	if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
		fail("listen", errno);
	emit("{\"event\":\"listening\",\"cid\":%lld,\"port\":%lld,\"local_cid\":%lld}",
	     show(addr.svm_cid), show(addr.svm_port), local_cid());
	if (o->ready_file) {
		int rf = open(o->ready_file, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
		if (rf < 0)
			fail("open", errno);
		close(rf);
	}
	do {
		struct sockaddr_vm peer;
		socklen_t plen = sizeof(peer);
		int err = wait_fd(fd, POLLIN, o->timeout);
		if (err)
			fail("accept", err);
		int c = accept4(fd, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			fail("accept", errno);
		}
		emit("{\"event\":\"accepted\",\"peer_cid\":%lld,\"peer_port\":%lld}",
		     show(peer.svm_cid), show(peer.svm_port));
		do_send(c, o);
		if (o->no_read) {
			/* a peer that stops reading: hold the connection, never read it */
			emit("{\"event\":\"holding\"}");
			if (o->timeout > 0)
				usleep((useconds_t)(o->timeout * 1e6));
			else
				pause();
		} else {
			do_recv(c, o, o->expect_bytes, o->echo);
		}
		close(c);
		emit("{\"event\":\"closed\"}");
	} while (!o->once);
	close(fd);
	return 0;
}

static int cmd_connect(const struct opts *o)
{
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = o->cid, .svm_port = o->port};
	socklen_t len = sizeof(addr);
	int fd = vsock_socket(o);

	if (o->timeout > 0) {
		struct timeval tv = {.tv_sec = (time_t)o->timeout,
				     .tv_usec = (suseconds_t)((o->timeout - (time_t)o->timeout) * 1e6)};
		/* Best effort: the default connect timeout is 2 s in Linux. */
		setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv));
	}
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		fail("connect", errno);
	if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
		fail("connect", errno);
	emit("{\"event\":\"connected\",\"cid\":%lld,\"port\":%lld,\"local_port\":%lld}",
	     show(o->cid), show(o->port), show(addr.svm_port));
	do_send(fd, o);
	if (o->shutdown_wr && shutdown(fd, SHUT_WR) < 0)
		fail("send", errno);
	if (o->recv)
		do_recv(fd, o, o->recv_bytes, 0);
	close(fd);
	emit("{\"event\":\"closed\"}");
	return 0;
}

/* Open --count connections as fast as the guest can (non-blocking connects, all in flight at
 * once), keep every one that got through open for --hold seconds, never send or close early:
 * a guest flooding a host port. One "flood" event with the outcome counts, then "closed". */
static int cmd_flood(const struct opts *o)
{
	struct rlimit rl = {.rlim_cur = o->count + 64, .rlim_max = o->count + 64};
	struct pollfd *pf = calloc(o->count, sizeof(*pf));
	unsigned int n = 0, open_fds = 0, connected = 0, reset = 0, timedout = 0, other = 0;
	int first_errno = 0;
	double t0 = now();

	if (!pf)
		fail("flood", ENOMEM);
	setrlimit(RLIMIT_NOFILE, &rl);          /* best effort: the guest's root may raise it */
	for (n = 0; n < o->count; n++) {
		struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = o->cid, .svm_port = o->port};
		int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			if (!first_errno)
				first_errno = errno;
			other += o->count - n;
			break;
		}
		if (o->timeout > 0) {
			struct timeval tv = {.tv_sec = (time_t)o->timeout,
					     .tv_usec = (suseconds_t)((o->timeout - (time_t)o->timeout) * 1e6)};
			setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv));
		}
		pf[open_fds].fd = fd;
		pf[open_fds].events = POLLOUT;
		open_fds++;
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			pf[open_fds - 1].events = 0, connected++;
		else if (errno != EINPROGRESS) {
			if (!first_errno)
				first_errno = errno;
			if (errno == ECONNRESET || errno == ECONNREFUSED) reset++; else other++;
			close(fd);
			open_fds--;
		}
	}
	/* wait for every connect in flight: POLLOUT (connected) or an error */
	double limit = o->timeout > 0 ? o->timeout + 5 : 60;
	for (;;) {
		unsigned int pending = 0, i;
		for (i = 0; i < open_fds; i++)
			pending += pf[i].events != 0;
		if (!pending || now() - t0 > limit + o->count / 100.0) {
			timedout += pending;
			break;
		}
		if (poll(pf, open_fds, 1000) < 0 && errno != EINTR)
			fail("poll", errno);
		for (i = 0; i < open_fds; i++) {
			if (!pf[i].events || !pf[i].revents)
				continue;
			int err = 0;
			socklen_t el = sizeof(err);
			getsockopt(pf[i].fd, SOL_SOCKET, SO_ERROR, &err, &el);
			pf[i].events = 0;
			if (!err && !(pf[i].revents & (POLLERR | POLLHUP))) {
				connected++;
				continue;
			}
			if (!first_errno)
				first_errno = err ? err : ECONNRESET;
			if (!err || err == ECONNRESET || err == ECONNREFUSED) reset++;
			else if (err == ETIMEDOUT) timedout++;
			else other++;
			close(pf[i].fd);
			pf[i].fd = -1;
		}
	}
	emit("{\"event\":\"flood\",\"attempted\":%u,\"connected\":%u,\"reset\":%u,\"timedout\":%u,"
	     "\"other\":%u,\"first_errno\":%d,\"seconds\":%.3f}",
	     o->count, connected, reset, timedout, other, first_errno, now() - t0);
	if (o->hold > 0)
		usleep((useconds_t)(o->hold * 1e6));
	for (unsigned int i = 0; i < open_fds; i++)
		if (pf[i].fd >= 0)
			close(pf[i].fd);
	free(pf);
	emit("{\"event\":\"closed\"}");
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o;

	signal(SIGPIPE, SIG_IGN);
	parse(argc, argv, &o);
	if (!strcmp(o.cmd, "info"))
		return cmd_info();
	if (!strcmp(o.cmd, "listen"))
		return cmd_listen(&o);
	if (!strcmp(o.cmd, "flood"))
		return cmd_flood(&o);
	return cmd_connect(&o);
}
