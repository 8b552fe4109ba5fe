/* bench-blast: move bytes over AF_VSOCK or TCP with no per-byte work (no hashing, no pattern),
 * so the benchmark sees the transport, not the tool. Built by benchmarks/throughput.py with
 * `gcc -O2 -static` and put into the guest as /bin/bench-blast (VmSpec files).
 *
 *   bench-blast send vsock|tcp ADDR PORT BYTES   connect, write BYTES zero bytes in 64 KiB writes,
 *                                                half-close, wait for the peer's close
 *   bench-blast recv vsock|tcp PORT              listen (any address), accept one connection,
 *                                                read to EOF in 64 KiB reads, close
 *
 * ADDR is a CID for vsock (2 = host), an IPv4 address for tcp. Each prints one JSON line
 * ({"event":"listening"...} when recv is ready, then {"event":"done","bytes":N,"seconds":S})
 * and exits 0, or prints {"event":"error",...} and exits 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
static char buf[CHUNK];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *op)
{
	printf("{\"event\":\"error\",\"op\":\"%s\",\"errno\":%d}\n", op, errno);
	return 1;
}

static int make_addr(int vsock, const char *addr, unsigned port, struct sockaddr_storage *ss, socklen_t *len)
{
	memset(ss, 0, sizeof(*ss));
	if (vsock) {
		struct sockaddr_vm *vm = (struct sockaddr_vm *)ss;
		vm->svm_family = AF_VSOCK;
		vm->svm_cid = addr ? (unsigned)strtoul(addr, NULL, 0) : VMADDR_CID_ANY;
		vm->svm_port = port;
		*len = sizeof(*vm);
	} else {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		in->sin_addr.s_addr = htonl(INADDR_ANY);
		if (addr && inet_pton(AF_INET, addr, &in->sin_addr) != 1)
			return -1;
		*len = sizeof(*in);
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int vsock, fd, one = 1;

	if (argc < 4 || (strcmp(argv[2], "vsock") && strcmp(argv[2], "tcp"))) {
		fprintf(stderr, "usage: %s send vsock|tcp ADDR PORT BYTES | recv vsock|tcp PORT\n", argv[0]);
		return 2;
	}
	vsock = !strcmp(argv[2], "vsock");
	fd = socket(vsock ? AF_VSOCK : AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return fail("socket");

	if (!strcmp(argv[1], "send") && argc == 6) {
		long long total = atoll(argv[5]), left = total;
		if (make_addr(vsock, argv[3], (unsigned)atoi(argv[4]), &ss, &len) < 0)
			return fail("address");
		if (connect(fd, (struct sockaddr *)&ss, len) < 0)
			return fail("connect");
		double t0 = now();
		while (left > 0) {
			ssize_t n = write(fd, buf, left < CHUNK ? (size_t)left : CHUNK);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				return fail("write");
			}
			left -= n;
		}
		shutdown(fd, SHUT_WR);
		while (read(fd, buf, sizeof(buf)) > 0)
			;
		printf("{\"event\":\"done\",\"bytes\":%lld,\"seconds\":%.6f}\n", total, now() - t0);
		close(fd);
		return 0;
	}
	if (!strcmp(argv[1], "recv") && argc == 4) {
		long long got = 0;
		double t0 = 0;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		make_addr(vsock, NULL, (unsigned)atoi(argv[3]), &ss, &len);
		if (bind(fd, (struct sockaddr *)&ss, len) < 0)
			return fail("bind");
		if (listen(fd, 1) < 0)
			return fail("listen");
		printf("{\"event\":\"listening\",\"port\":%s}\n", argv[3]);
		fflush(stdout);
		int c = accept(fd, NULL, NULL);
		if (c < 0)
			return fail("accept");
		for (;;) {
			ssize_t n = read(c, buf, sizeof(buf));
			if (n < 0) {
				if (errno == EINTR)
					continue;
				return fail("read");
			}
			if (n == 0)
				break;
			if (!got)
				t0 = now();
			got += n;
		}
		printf("{\"event\":\"done\",\"bytes\":%lld,\"seconds\":%.6f}\n", got, got ? now() - t0 : 0.0);
		close(c);
		return 0;
	}
	fprintf(stderr, "usage: %s send vsock|tcp ADDR PORT BYTES | recv vsock|tcp PORT\n", argv[0]);
	return 2;
}
