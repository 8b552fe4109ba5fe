/* Optional C accelerator for the vsock backend's data path (vmlab/vsock/accel.py builds it).
 *
 * fill_rx(): walk the rx ring's Linux-shaped chains (one INDIRECT descriptor ->
 * a 32-byte table: 44-byte device-writable header with NEXT, then one device-writable payload;
 * or, as Linux >= 6.2 posts them, one device-writable descriptor holding header and payload),
 * exactly as Virtqueue.pop_rx_linux(direct=True) does, and fill their payloads either with one readv() from
 * a socket or by copying from a list of source buffers; then write each filled buffer's header
 * (a 44-byte template with its len field set) and its used-ring element. No used idx, no
 * interrupt: Virtqueue.flush() publishes, as for every other used element.
 *
 * Every guest-written value is checked before use, as in the Python fast path; anything
 * unexpected ends the batch and Python's generic walk deals with the chain. Chains that get no
 * bytes are not consumed (the caller advances last_avail by the count returned).
 *
 * relay_stream(): the router's one-step VM->VM STREAM relay for a whole run of the sender's tx
 * chains (their shapes as Virtqueue.pop_tx_linux takes them) into the receiver's rx buffers,
 * with the checks Router._relay_stream makes; it stops at the first packet it does not take.
 *
 * send_stream(): guest->host STREAM data of one connection, a run of tx chains in one sendmsg.
 *
 * publish() and arm(): Virtqueue.flush()'s and enable_notification()'s EVENT_IDX steps (store,
 * full barrier, read the other side's index, the eventfd write), one call each.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio rings are little-endian; this accelerator assumes a little-endian host"
#endif

#define HDR_LEN 44
#define HDR_LEN_OFF 24              /* le32 len in virtio_vsock_hdr */
#define MAX_REGIONS 8
#define MAX_BUFS 1024               /* IOV_MAX */
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

typedef struct {
    uint64_t start, size;
    unsigned char *base;
} region_t;

static inline uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

/* [addr, addr+len) wholly inside one region, len > 0: its address; else NULL. */
static unsigned char *locate(const region_t *r, int n, int *last, uint64_t addr, uint64_t len)
{
    if (len == 0 || n == 0)
        return NULL;
    for (int k = 0; k < n; k++) {
        int i = (*last + k) % n;
        const region_t *g = &r[i];
        if (addr >= g->start) {
            uint64_t off = addr - g->start;
            if (off <= g->size && len <= g->size - off) {
                *last = i;
                return g->base + off;
            }
        }
    }
    return NULL;
}

typedef struct {
    Py_buffer views[2 * (MAX_REGIONS + 3) + 2];   /* two queues' rings and regions, templates */
    int n;
} buffers_t;

static int grab(buffers_t *b, PyObject *obj, int flags, Py_buffer **out)
{
    if (PyObject_GetBuffer(obj, &b->views[b->n], flags) < 0)
        return -1;
    *out = &b->views[b->n++];
    return 0;
}

static void drop_all(buffers_t *b)
{
    for (int i = 0; i < b->n; i++)
        PyBuffer_Release(&b->views[i]);
    b->n = 0;
}

/* fill_rx(desc, avail, used, regions, size, indirect, last_avail, have, used_pos, max_payload,
 *         want, hdr_last, hdr_mid, fd, src) -> (k, got, err, asked)
 *
 * regions: tuple of (gpa_start, writable buffer). indirect: INDIRECT_DESC negotiated (else
 * only the one-descriptor shape is taken). have: chains the driver made available
 * (already checked against the queue size), at most MAX_BUFS are looked at. used_pos: ring
 * index of the first used element to write. want: payload bytes wanted (> 0). fd >= 0: one
 * readv() from it; else src (a list of buffers) is copied from. hdr_mid goes on every buffer
 * except the one that completes `want`, which gets hdr_last.
 * asked: the payload bytes offered by the matching chains (0: no chain matched, nothing done).
 * k: buffers filled (and consumed), got: bytes moved, err: errno of a failed readv (then k = 0).
 */
/* One queue as the caller passes it: its three ring areas and its guest's memory regions. */
typedef struct {
    const unsigned char *desc, *avail;
    unsigned char *used;
    unsigned int size, mask;
    size_t avail_len, used_len;
    region_t regions[MAX_REGIONS];
    int nreg, last;                     /* last: the region locate() found last */
} ring_t;

/* Grab desc/avail/used and the (gpa_start, view) regions into `r`, checking the sizes. */
static int grab_ring(buffers_t *b, ring_t *r, PyObject *o_desc, PyObject *o_avail,
                     PyObject *o_used, PyObject *o_regions, unsigned int size)
{
    Py_buffer *desc, *avail, *used, *v;
    if (size == 0 || size > 32768 || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad queue size");
        return -1;
    }
    if (!PyTuple_Check(o_regions) || PyTuple_GET_SIZE(o_regions) > MAX_REGIONS) {
        PyErr_SetString(PyExc_ValueError, "regions must be a tuple of at most 8 (gpa, view)");
        return -1;
    }
    if (grab(b, o_desc, PyBUF_SIMPLE, &desc) < 0 || grab(b, o_avail, PyBUF_SIMPLE, &avail) < 0
        || grab(b, o_used, PyBUF_WRITABLE, &used) < 0)
        return -1;
    if ((size_t)desc->len < 16 * (size_t)size || (size_t)avail->len < 4 + 2 * (size_t)size
        || (size_t)used->len < 4 + 8 * (size_t)size) {
        PyErr_SetString(PyExc_ValueError, "ring view too short");
        return -1;
    }
    r->desc = desc->buf;
    r->avail = avail->buf;
    r->used = used->buf;
    r->avail_len = (size_t)avail->len;
    r->used_len = (size_t)used->len;
    r->size = size;
    r->mask = size - 1;
    r->last = 0;
    r->nreg = (int)PyTuple_GET_SIZE(o_regions);
    for (int i = 0; i < r->nreg; i++) {
        PyObject *item = PyTuple_GET_ITEM(o_regions, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "region must be (gpa_start, view)");
            return -1;
        }
        r->regions[i].start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        if (PyErr_Occurred())
            return -1;
        if (grab(b, PyTuple_GET_ITEM(item, 1), PyBUF_WRITABLE, &v) < 0)
            return -1;
        r->regions[i].base = v->buf;
        r->regions[i].size = (uint64_t)v->len;
    }
    return 0;
}

static inline uint16_t avail_head(const ring_t *r, unsigned int pos)
{
    return rd16(r->avail + 4 + 2 * (pos & r->mask));
}

static inline void put_used(ring_t *r, unsigned int pos, uint32_t id, uint32_t written)
{
    unsigned char *e = r->used + 4 + 8 * (size_t)(pos & r->mask);
    memcpy(e, &id, 4);
    memcpy(e + 4, &written, 4);
}

/* The rx chain at ring descriptor `head` (< queue size), if it has a Linux shape (the ones
 * Virtqueue.pop_rx_linux(direct=True) takes): one INDIRECT descriptor -> a 32-byte table of a
 * 44-byte device-writable header with NEXT -> 1, then one device-writable payload; or one
 * device-writable descriptor holding header then payload. 1 and the header and payload
 * addresses and the payload length; 0 for anything else. */
static int rx_chain(ring_t *r, uint16_t head, unsigned int indirect, uint64_t max_payload,
                    unsigned char **h, unsigned char **p, uint32_t *plen)
{
    const unsigned char *d = r->desc + 16 * (size_t)head;
    uint16_t dflags = rd16(d + 12);
    uint32_t dlen = rd32(d + 8);
    if (dflags == F_WRITE && dlen > HDR_LEN && (uint64_t)dlen - HDR_LEN <= max_payload) {
        *h = locate(r->regions, r->nreg, &r->last, rd64(d), dlen);
        if (*h == NULL)
            return 0;
        *p = *h + HDR_LEN;
        *plen = dlen - HDR_LEN;
        return 1;
    }
    if (!indirect || dflags != F_INDIRECT || dlen != 32)
        return 0;
    const unsigned char *t = locate(r->regions, r->nreg, &r->last, rd64(d), 32);
    if (t == NULL)
        return 0;
    uint64_t a0 = rd64(t), a1 = rd64(t + 16);
    uint32_t l0 = rd32(t + 8), l1 = rd32(t + 24);
    uint16_t f0 = rd16(t + 12), n0 = rd16(t + 14), f1 = rd16(t + 28);
    if (f0 != (F_WRITE | F_NEXT) || n0 != 1 || l0 != HDR_LEN || f1 != F_WRITE || l1 == 0
        || l1 > max_payload)
        return 0;
    *h = locate(r->regions, r->nreg, &r->last, a0, l0);
    *p = locate(r->regions, r->nreg, &r->last, a1, l1);
    *plen = l1;
    return *h != NULL && *p != NULL;
}

static PyObject *fill_rx(PyObject *self, PyObject *args)
{
    PyObject *o_desc, *o_avail, *o_used, *o_regions, *o_hlast, *o_hmid, *o_src;
    unsigned int size, indirect, last_avail, have, used_pos;
    unsigned long long max_payload, want;
    int fd;
    if (!PyArg_ParseTuple(args, "OOOOIIIIIKKOOiO", &o_desc, &o_avail, &o_used, &o_regions,
                          &size, &indirect, &last_avail, &have, &used_pos, &max_payload, &want,
                          &o_hlast,
                          &o_hmid, &fd, &o_src))
        return NULL;
    buffers_t b = {.n = 0};
    ring_t ring;
    Py_buffer *hlast, *hmid;
    static struct iovec iov[MAX_BUFS];
    static unsigned char *hdrs[MAX_BUFS];
    static uint16_t heads[MAX_BUFS];
    static uint32_t lens[MAX_BUFS];
    if (grab_ring(&b, &ring, o_desc, o_avail, o_used, o_regions, size) < 0
        || grab(&b, o_hlast, PyBUF_SIMPLE, &hlast) < 0 || grab(&b, o_hmid, PyBUF_SIMPLE, &hmid) < 0)
        goto fail;
    if (hlast->len != HDR_LEN || hmid->len != HDR_LEN) {
        PyErr_SetString(PyExc_ValueError, "header template not 44 bytes");
        goto fail;
    }
    if (have > MAX_BUFS)
        have = MAX_BUFS;
    int n = 0;
    uint64_t asked = 0;
    for (unsigned int i = 0; i < have && asked < want; i++) {
        uint16_t head = avail_head(&ring, last_avail + i);
        unsigned char *h, *p;
        uint32_t l1;
        if (head >= size || !rx_chain(&ring, head, indirect, max_payload, &h, &p, &l1))
            break;
        uint64_t room = want - asked;
        heads[n] = head;
        hdrs[n] = h;
        iov[n].iov_base = p;
        iov[n].iov_len = l1 < room ? l1 : (size_t)room;
        asked += iov[n].iov_len;
        n++;
    }
    uint64_t got = 0;
    int err = 0;
    if (n > 0) {
        if (fd >= 0) {
            ssize_t r = readv(fd, iov, n);
            if (r < 0)
                err = errno;
            else
                got = (uint64_t)r;
        } else {
            if (!PyList_Check(o_src)) {
                PyErr_SetString(PyExc_TypeError, "src must be a list of buffers");
                goto fail;
            }
            Py_ssize_t ns = PyList_GET_SIZE(o_src);
            int di = 0;
            size_t doff = 0;
            for (Py_ssize_t si = 0; si < ns && di < n && got < asked; si++) {
                Py_buffer sb;
                if (PyObject_GetBuffer(PyList_GET_ITEM(o_src, si), &sb, PyBUF_SIMPLE) < 0)
                    goto fail;
                const unsigned char *s = sb.buf;
                size_t sleft = (size_t)sb.len;
                while (sleft && di < n) {
                    size_t k = iov[di].iov_len - doff;
                    if (k > sleft)
                        k = sleft;
                    memmove((unsigned char *)iov[di].iov_base + doff, s, k);
                    s += k;
                    sleft -= k;
                    doff += k;
                    got += k;
                    if (doff == iov[di].iov_len) {
                        di++;
                        doff = 0;
                    }
                }
                PyBuffer_Release(&sb);
            }
        }
    }
    int k = 0;
    uint64_t left = got;
    while (k < n && left > 0) {
        uint32_t len = (uint32_t)(iov[k].iov_len < left ? iov[k].iov_len : left);
        left -= len;
        lens[k] = len;
        k++;
    }
    uint64_t done = 0;
    for (int i = 0; i < k; i++) {
        done += lens[i];
        memcpy(hdrs[i], (done == want ? hlast : hmid)->buf, HDR_LEN);
        wr32(hdrs[i] + HDR_LEN_OFF, lens[i]);
        put_used(&ring, used_pos + i, heads[i], HDR_LEN + lens[i]);
    }
    drop_all(&b);
    return Py_BuildValue("iKiK", k, (unsigned long long)got, err, (unsigned long long)asked);
fail:
    drop_all(&b);
    return NULL;
}


/* The tx chain at ring descriptor `head` (< queue size), if it has a shape Linux posts (the
 * ones Virtqueue.pop_tx_linux takes): a readable 44-byte header and one readable payload, in a
 * 2-entry indirect table (`indirect`: INDIRECT_DESC negotiated and size >= 2) or chained in the
 * ring; or a lone readable 44-byte header. 1 with the header address, the payload address (NULL
 * for none) and length; 0 for anything else. */
static int tx_chain(ring_t *r, uint16_t head, unsigned int indirect, uint64_t max_payload,
                    const unsigned char **h, const unsigned char **p, uint32_t *plen)
{
    const unsigned char *d = r->desc + 16 * (size_t)head;
    uint64_t a0, a1;
    uint32_t l0 = rd32(d + 8), l1;
    uint16_t flags = rd16(d + 12), f1;
    if (flags == F_INDIRECT && l0 == 32 && indirect) {
        const unsigned char *t = locate(r->regions, r->nreg, &r->last, rd64(d), 32);
        if (t == NULL)
            return 0;
        a0 = rd64(t);
        l0 = rd32(t + 8);
        if (rd16(t + 12) != F_NEXT || rd16(t + 14) != 1)
            return 0;
        a1 = rd64(t + 16);
        l1 = rd32(t + 24);
        f1 = rd16(t + 28);
    } else if (flags == F_NEXT) {
        uint16_t nxt = rd16(d + 14);
        if (nxt >= r->size || nxt == head)
            return 0;
        const unsigned char *d1 = r->desc + 16 * (size_t)nxt;
        a0 = rd64(d);
        a1 = rd64(d1);
        l1 = rd32(d1 + 8);
        f1 = rd16(d1 + 12);
    } else if (flags == 0 && l0 == HDR_LEN) {
        *h = locate(r->regions, r->nreg, &r->last, rd64(d), HDR_LEN);
        *p = NULL;
        *plen = 0;
        return *h != NULL;
    } else {
        return 0;
    }
    if (f1 != 0 || l0 != HDR_LEN || l1 == 0 || l1 > max_payload)
        return 0;
    *h = locate(r->regions, r->nreg, &r->last, a0, l0);
    *p = locate(r->regions, r->nreg, &r->last, a1, l1);
    *plen = l1;
    return *h != NULL && *p != NULL;
}

#define TYPE_STREAM 1
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define MAX_PKT_PAYLOAD (64 * 1024)
#define MAX_FLOWS 8

/* need_event(): did [old, new) cross the index the other side asked about? (vring_need_event) */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* EVENT_IDX publish of one ring whose used elements are written: used idx = old + n (one
 * 16-bit store), avail_event, a full barrier, then the driver's used_event decides (always
 * the first time: signalled_valid 0) whether to write 1 to call_fd (>= 0; EAGAIN: a signal is
 * pending anyway). The caller checked the lengths (used 6 + 8 * size, avail 6 + 2 * size) and
 * the alignment (ring_publishable). Returns the new idx; *signal, *err (errno or 0) set. */
static uint16_t publish_ring(unsigned char *u, const unsigned char *a, unsigned int size,
                             unsigned int old_idx, unsigned int n, unsigned int avail_event,
                             int signalled_valid, int call_fd, int *signal, int *err)
{
    uint16_t old = (uint16_t)old_idx, idx = (uint16_t)(old_idx + n);
    __atomic_store_n((uint16_t *)(u + 2), idx, __ATOMIC_RELEASE);
    __atomic_store_n((uint16_t *)(u + 4 + 8 * (size_t)size), (uint16_t)avail_event,
                     __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t used_event = __atomic_load_n((const uint16_t *)(a + 4 + 2 * (size_t)size),
                                          __ATOMIC_RELAXED);
    *signal = !signalled_valid || need_event(used_event, idx, old);
    *err = 0;
    if (*signal && call_fd >= 0) {
        uint64_t one = 1;
        if (write(call_fd, &one, sizeof one) < 0 && errno != EAGAIN)
            *err = errno;
    }
    return idx;
}

/* The EVENT_IDX fields fit (used_event after the avail ring, avail_event after the used ring)
 * and the 16-bit stores are aligned. */
static int ring_publishable(const unsigned char *used, size_t used_len, const unsigned char *avail,
                            size_t avail_len, unsigned int size)
{
    return used_len >= 6 + 8 * (size_t)size && avail_len >= 6 + 2 * (size_t)size
           && !((uintptr_t)used & 3) && !((uintptr_t)avail & 1);
}

/* relay_stream(tx_desc, tx_avail, tx_used, tx_regions, tx_size, tx_indirect, tx_last_avail,
 *              tx_have, tx_used_pos, tx_max_payload,
 *              rx_desc, rx_avail, rx_used, rx_regions, rx_size, rx_indirect, rx_last_avail,
 *              rx_have, rx_used_pos, rx_max_payload, src_cid, dst_cid)
 *   -> (chains, tx_bytes, data_packets, data_bytes, rx_data_buffers, control_packets, flows)
 *
 * The router's one-step VM->VM STREAM relay (Router._relay_stream) for a run of tx chains, in
 * one call: the sender's leading Linux-shaped tx chains whose header says src_cid, dst_cid,
 * STREAM, and either RW with 0 < len <= min(payload, 64 KiB) or a credit update/request with
 * len 0, go into the receiver's Linux-shaped rx buffers: an RW packet only whole (its bytes
 * split over as many buffers as it takes, each with the sender's header and that piece's len),
 * a control packet into one buffer as it is. Each taken tx chain gets a used element (len 0),
 * each filled rx buffer one; no used idx, no interrupt (Virtqueue.flush() publishes). It stops,
 * having done nothing more, at the first chain that is anything else, that does not fit the
 * receiver's ring, or that starts a ninth flow: the caller's general path takes that one.
 * The header is copied out of guest memory before it is checked, so what is checked is what
 * the receiver gets. flows: the (src_port, dst_port) pairs seen, in order of first appearance.
 * tx_bytes: the taken chains' payload descriptor bytes (the device's tx_bytes counts those).
 */
static PyObject *relay_core(PyObject *args, int with_publish)
{
    PyObject *t_desc, *t_avail, *t_used, *t_regions, *r_desc, *r_avail, *r_used, *r_regions;
    unsigned int t_size, t_indirect, t_last, t_have, t_pos;
    unsigned int r_size, r_indirect, r_last, r_have, r_pos;
    unsigned long long t_maxp, r_maxp, src_cid, dst_cid;
    unsigned int t_idx = 0, t_event_ahead = 0, r_idx = 0, r_event_ahead = 0;
    int t_valid = 0, t_fd = -1, r_valid = 0, r_fd = -1;
    if (with_publish ? !PyArg_ParseTuple(args, "OOOOIIIIIKOOOOIIIIIKKKIIpiIIpi",
                          &t_desc, &t_avail, &t_used, &t_regions, &t_size, &t_indirect, &t_last,
                          &t_have, &t_pos, &t_maxp,
                          &r_desc, &r_avail, &r_used, &r_regions, &r_size, &r_indirect, &r_last,
                          &r_have, &r_pos, &r_maxp, &src_cid, &dst_cid,
                          &t_idx, &t_event_ahead, &t_valid, &t_fd,
                          &r_idx, &r_event_ahead, &r_valid, &r_fd)
                     : !PyArg_ParseTuple(args, "OOOOIIIIIKOOOOIIIIIKKK",
                          &t_desc, &t_avail, &t_used, &t_regions, &t_size, &t_indirect, &t_last,
                          &t_have, &t_pos, &t_maxp,
                          &r_desc, &r_avail, &r_used, &r_regions, &r_size, &r_indirect, &r_last,
                          &r_have, &r_pos, &r_maxp, &src_cid, &dst_cid))
        return NULL;
    buffers_t b = {.n = 0};
    ring_t tx, rx;
    static uint16_t rheads[MAX_BUFS];
    static unsigned char *rhdrs[MAX_BUFS], *rpays[MAX_BUFS];
    static uint32_t rcaps[MAX_BUFS];
    uint32_t flows[MAX_FLOWS][2];
    int nflows = 0;
    if (grab_ring(&b, &tx, t_desc, t_avail, t_used, t_regions, t_size) < 0
        || grab_ring(&b, &rx, r_desc, r_avail, r_used, r_regions, r_size) < 0) {
        drop_all(&b);
        return NULL;
    }
    if (with_publish
        && (!ring_publishable(tx.used, tx.used_len, tx.avail, tx.avail_len, t_size)
            || !ring_publishable(rx.used, rx.used_len, rx.avail, rx.avail_len, r_size))) {
        drop_all(&b);
        PyErr_SetString(PyExc_ValueError, "ring view too short or misaligned");
        return NULL;
    }
    if (t_have > t_size)
        t_have = t_size;
    if (r_have > MAX_BUFS)
        r_have = MAX_BUFS;
    unsigned int chains = 0, parsed = 0, taken = 0, data_pkts = 0, rx_data = 0, control = 0;
    int rx_end = r_size < 2;            /* as fill_rx: no rx fast path in a 1-entry queue */
    uint64_t cap = 0, tx_bytes = 0, data_bytes = 0;   /* cap: room in parsed, untaken buffers */
    unsigned char hdr[HDR_LEN];
    for (; chains < t_have; chains++) {
        uint16_t head = avail_head(&tx, t_last + chains);
        const unsigned char *h, *p;
        uint32_t plen;
        if (head >= t_size || !tx_chain(&tx, head, t_indirect, t_maxp, &h, &p, &plen))
            break;
        memcpy(hdr, h, HDR_LEN);       /* checked and delivered from this copy only */
        uint32_t sport = rd32(hdr + 16), dport = rd32(hdr + 20), len = rd32(hdr + 24);
        uint16_t type = rd16(hdr + 28), op = rd16(hdr + 30);
        if (rd64(hdr) != src_cid || rd64(hdr + 8) != dst_cid || type != TYPE_STREAM)
            break;
        int fi = 0;
        while (fi < nflows && (flows[fi][0] != sport || flows[fi][1] != dport))
            fi++;
        if (fi == MAX_FLOWS)
            break;
        if (op == OP_RW) {
            if (len == 0 || len > MAX_PKT_PAYLOAD || len > plen)
                break;
            while (cap < len && !rx_end) {      /* look at more rx buffers, taking none yet */
                uint16_t rh = parsed < r_have ? avail_head(&rx, r_last + parsed) : r_size;
                if (rh >= r_size || !rx_chain(&rx, rh, r_indirect, r_maxp, &rhdrs[parsed],
                                              &rpays[parsed], &rcaps[parsed])) {
                    rx_end = 1;
                    break;
                }
                rheads[parsed] = rh;
                cap += rcaps[parsed++];
            }
            if (cap < len)
                break;
            for (uint32_t left = len; left; taken++) {
                uint32_t piece = rcaps[taken] < left ? rcaps[taken] : left;
                memmove(rpays[taken], p + (len - left), piece);
                memcpy(rhdrs[taken], hdr, HDR_LEN);
                wr32(rhdrs[taken] + HDR_LEN_OFF, piece);
                put_used(&rx, r_pos + taken, rheads[taken], HDR_LEN + piece);
                cap -= rcaps[taken];
                left -= piece;
                rx_data++;
            }
            data_pkts++;
            data_bytes += len;
        } else if ((op == OP_CREDIT_UPDATE || op == OP_CREDIT_REQUEST) && len == 0) {
            if (taken == parsed) {
                uint16_t rh = parsed < r_have ? avail_head(&rx, r_last + parsed) : r_size;
                if (rx_end || rh >= r_size || !rx_chain(&rx, rh, r_indirect, r_maxp,
                                                        &rhdrs[parsed], &rpays[parsed],
                                                        &rcaps[parsed])) {
                    rx_end = 1;
                    break;
                }
                rheads[parsed] = rh;
                cap += rcaps[parsed++];
            }
            memcpy(rhdrs[taken], hdr, HDR_LEN);
            put_used(&rx, r_pos + taken, rheads[taken], HDR_LEN);
            cap -= rcaps[taken];
            taken++;
            control++;
        } else {
            break;
        }
        if (fi == nflows) {
            flows[fi][0] = sport;
            flows[fi][1] = dport;
            nflows++;
        }
        put_used(&tx, t_pos + chains, head, 0);
        tx_bytes += plen;
    }
    /* with_publish: the receiver's ring at once (t_idx etc. as publish() takes them; n: what
     * the caller staged before plus what was taken here), the sender's only when every chain
     * it had was taken (else its drain goes on and publishes at its end) */
    int r_sig = 0, r_err = 0, t_sig = 0, t_err = 0;
    uint16_t r_new = (uint16_t)r_idx, t_new = (uint16_t)t_idx;
    if (with_publish && chains) {
        r_new = publish_ring(rx.used, rx.avail, r_size, r_idx,
                             (uint16_t)(r_pos + taken - r_idx), r_last + taken + r_event_ahead,
                             r_valid, r_fd, &r_sig, &r_err);
        if (chains == t_have)
            t_new = publish_ring(tx.used, tx.avail, t_size, t_idx,
                                 (uint16_t)(t_pos + chains - t_idx),
                                 t_last + chains + t_event_ahead, t_valid, t_fd, &t_sig, &t_err);
    }
    drop_all(&b);
    PyObject *fl = PyTuple_New(nflows);
    if (fl == NULL)
        return NULL;
    for (int i = 0; i < nflows; i++) {
        PyObject *pair = Py_BuildValue("(II)", flows[i][0], flows[i][1]);
        if (pair == NULL) {
            Py_DECREF(fl);
            return NULL;
        }
        PyTuple_SET_ITEM(fl, i, pair);
    }
    if (with_publish)
        return Py_BuildValue("IKIKIINIiiIii", chains, (unsigned long long)tx_bytes, data_pkts,
                             (unsigned long long)data_bytes, rx_data, control, fl,
                             (unsigned int)t_new, t_sig, t_err, (unsigned int)r_new, r_sig, r_err);
    return Py_BuildValue("IKIKIIN", chains, (unsigned long long)tx_bytes, data_pkts,
                         (unsigned long long)data_bytes, rx_data, control, fl);
}

static PyObject *relay_stream(PyObject *self, PyObject *args) { return relay_core(args, 0); }

/* relay_publish(relay_stream's arguments...,
 *               tx_used_idx, tx_kick_ahead, tx_signalled_valid, tx_call_fd,
 *               rx_used_idx, rx_kick_ahead, rx_signalled_valid, rx_call_fd)
 *   -> relay_stream's result + (tx_new_idx, tx_signalled, tx_errno, rx_new_idx, rx_signalled,
 *                               rx_errno)
 *
 * relay_stream, then, if it took a chain, Virtqueue.flush()'s EVENT_IDX step (publish()) for
 * the receiver's rx ring, and for the sender's tx ring when it took every chain the sender
 * had (tx_have): one call per relayed run instead of three. *_used_idx: the ring's published
 * used idx (the used positions given count the elements staged after it); the avail_event
 * stored is the ring's next avail + kick_ahead. A ring not published keeps its idx (signalled
 * 0). Both rings need the EVENT_IDX fields and alignment (ValueError before anything is done).
 */
static PyObject *relay_publish(PyObject *self, PyObject *args) { return relay_core(args, 1); }

#define CID_HOST 2

/* send_stream(tx_desc, tx_avail, tx_used, tx_regions, tx_size, tx_indirect, tx_last_avail,
 *             tx_have, tx_used_pos, tx_max_payload, src_cid, src_port, dst_port, max_bytes, fd)
 *   -> (chains, tx_bytes, data_bytes, sent, rest, buf_alloc, fwd_cnt, errno)
 *
 * Guest -> host STREAM data of one connection in one call: the guest's leading Linux-shaped
 * tx chains whose header (copied out of guest memory, then checked) says src_cid:src_port ->
 * 2:dst_port, STREAM, RW, 0 < len <= min(payload, 64 KiB), while their data fits max_bytes
 * (the credit the connection gave), go to the host socket `fd` in one sendmsg(MSG_DONTWAIT).
 * What the socket did not take comes back as `rest` (bytes, copied), else None. Each taken
 * chain gets a used element (len 0). buf_alloc/fwd_cnt: the last taken header's. A send
 * error other than EAGAIN takes nothing (errno set): the caller's general path meets it.
 */
static PyObject *send_stream(PyObject *self, PyObject *args)
{
    PyObject *t_desc, *t_avail, *t_used, *t_regions;
    unsigned int t_size, t_indirect, t_last, t_have, t_pos, sport_want, dport_want;
    unsigned long long t_maxp, src_cid, max_bytes;
    int fd;
    if (!PyArg_ParseTuple(args, "OOOOIIIIIKKIIKi", &t_desc, &t_avail, &t_used, &t_regions,
                          &t_size, &t_indirect, &t_last, &t_have, &t_pos, &t_maxp, &src_cid,
                          &sport_want, &dport_want, &max_bytes, &fd))
        return NULL;
    buffers_t b = {.n = 0};
    ring_t tx;
    static struct iovec iov[MAX_BUFS];
    static uint16_t heads[MAX_BUFS];
    if (grab_ring(&b, &tx, t_desc, t_avail, t_used, t_regions, t_size) < 0) {
        drop_all(&b);
        return NULL;
    }
    if (t_have > t_size)
        t_have = t_size;
    if (t_have > MAX_BUFS)
        t_have = MAX_BUFS;
    unsigned int chains = 0;
    uint64_t total = 0, tx_bytes = 0;
    uint32_t buf_alloc = 0, fwd_cnt = 0;
    unsigned char hdr[HDR_LEN];
    for (; chains < t_have; chains++) {
        uint16_t head = avail_head(&tx, t_last + chains);
        const unsigned char *h, *p;
        uint32_t plen;
        if (head >= t_size || !tx_chain(&tx, head, t_indirect, t_maxp, &h, &p, &plen))
            break;
        memcpy(hdr, h, HDR_LEN);
        uint32_t len = rd32(hdr + 24);
        if (rd64(hdr) != src_cid || rd64(hdr + 8) != CID_HOST || rd32(hdr + 16) != sport_want
            || rd32(hdr + 20) != dport_want || rd16(hdr + 28) != TYPE_STREAM
            || rd16(hdr + 30) != OP_RW || len == 0 || len > MAX_PKT_PAYLOAD || len > plen
            || total + len > max_bytes)
            break;
        iov[chains].iov_base = (void *)p;
        iov[chains].iov_len = len;
        heads[chains] = head;
        total += len;
        tx_bytes += plen;
        buf_alloc = rd32(hdr + 36);
        fwd_cnt = rd32(hdr + 40);
    }
    uint64_t sent = 0;
    PyObject *rest = NULL;
    if (chains) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = chains};
        ssize_t r = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            int err = errno;
            drop_all(&b);
            return Py_BuildValue("IKKKOIIi", 0u, 0ull, 0ull, 0ull, Py_None, 0u, 0u, err);
        }
        sent = r < 0 ? 0 : (uint64_t)r;
        if (sent < total) {
            rest = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total - sent));
            if (rest == NULL) {
                drop_all(&b);
                return NULL;                /* nothing consumed: used elements not written */
            }
            unsigned char *out = (unsigned char *)PyBytes_AS_STRING(rest);
            uint64_t skip = sent;
            for (unsigned int i = 0; i < chains; i++) {
                size_t n = iov[i].iov_len;
                if (skip >= n) {
                    skip -= n;
                    continue;
                }
                memcpy(out, (unsigned char *)iov[i].iov_base + skip, n - skip);
                out += n - skip;
                skip = 0;
            }
        }
        for (unsigned int i = 0; i < chains; i++)
            put_used(&tx, t_pos + i, heads[i], 0);
    }
    drop_all(&b);
    PyObject *res = Py_BuildValue("IKKKOIIi", chains, (unsigned long long)tx_bytes,
                                  (unsigned long long)total, (unsigned long long)sent,
                                  rest ? rest : Py_None, buf_alloc, fwd_cnt, 0);
    Py_XDECREF(rest);
    return res;
}

/* publish(used, avail, size, old_idx, n, avail_event, signalled_valid, call_fd)
 *   -> (new_idx, signalled, errno)
 *
 * Virtqueue.flush() for EVENT_IDX rings, once the used elements are in the ring (staged):
 * store used idx = old_idx + n (one 16-bit store), then avail_event, a full barrier, read the
 * driver's used_event and decide, as vring_need_event, whether the driver wants an interrupt
 * (always the first time: signalled_valid false); if so write 1 to call_fd (>= 0; EAGAIN: a
 * signal is pending anyway). errno: of a failed eventfd write, else 0.
 */
static PyObject *publish(PyObject *self, PyObject *args)
{
    Py_buffer used, avail;
    unsigned int size, old_idx, n, avail_event;
    int signalled_valid, call_fd;
    if (!PyArg_ParseTuple(args, "w*y*IIIIpi", &used, &avail, &size, &old_idx, &n,
                          &avail_event, &signalled_valid, &call_fd))
        return NULL;
    PyObject *res = NULL;
    if (size == 0 || size > 32768 || (size & (size - 1))
        || !ring_publishable(used.buf, (size_t)used.len, avail.buf, (size_t)avail.len, size)) {
        PyErr_SetString(PyExc_ValueError, "ring view too short or misaligned");
        goto out;
    }
    int signal, err;
    uint16_t idx = publish_ring(used.buf, avail.buf, size, old_idx, n, avail_event,
                                signalled_valid, call_fd, &signal, &err);
    res = Py_BuildValue("Iii", (unsigned int)idx, signal, err);
out:
    PyBuffer_Release(&used);
    PyBuffer_Release(&avail);
    return res;
}

/* arm(used, avail, size, avail_event, last_avail) -> avail idx
 *
 * Virtqueue.enable_notification() for EVENT_IDX rings: store avail_event (one 16-bit store),
 * a full barrier, then read the driver's avail idx (the caller checks it: chains that arrived
 * meanwhile are processed without a kick).
 */
static PyObject *arm(PyObject *self, PyObject *args)
{
    Py_buffer used, avail;
    unsigned int size, avail_event;
    if (!PyArg_ParseTuple(args, "w*y*II", &used, &avail, &size, &avail_event))
        return NULL;
    PyObject *res = NULL;
    if (size == 0 || size > 32768 || (size & (size - 1))
        || (size_t)used.len < 6 + 8 * (size_t)size || (size_t)avail.len < 4
        || ((uintptr_t)used.buf & 3) || ((uintptr_t)avail.buf & 1)) {
        PyErr_SetString(PyExc_ValueError, "ring view too short or misaligned");
        goto out;
    }
    __atomic_store_n((uint16_t *)((unsigned char *)used.buf + 4 + 8 * (size_t)size),
                     (uint16_t)avail_event, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    res = PyLong_FromLong(__atomic_load_n((const uint16_t *)((const unsigned char *)avail.buf + 2),
                                          __ATOMIC_RELAXED));
out:
    PyBuffer_Release(&used);
    PyBuffer_Release(&avail);
    return res;
}

static PyMethodDef methods[] = {
    {"fill_rx", fill_rx, METH_VARARGS, "Fill Linux-shaped rx chains from a socket or buffers."},
    {"relay_stream", relay_stream, METH_VARARGS,
     "Relay a run of VM->VM STREAM tx chains into a peer's rx buffers."},
    {"relay_publish", relay_publish, METH_VARARGS,
     "relay_stream, then publish the peer's rx ring (and the sender's tx ring if drained)."},
    {"send_stream", send_stream, METH_VARARGS,
     "Send a run of one connection's guest->host STREAM tx chains to a host socket."},
    {"publish", publish, METH_VARARGS, "Publish staged used elements (EVENT_IDX), maybe signal."},
    {"arm", arm, METH_VARARGS, "Re-arm kicks (EVENT_IDX avail_event) and read avail idx."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vmlab_accel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__vmlab_accel(void) { return PyModule_Create(&module); }
