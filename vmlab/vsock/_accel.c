/* Optional C accelerator for the vsock backend's rx data path (vmlab/vsock/accel.py builds it).
 *
 * One function, fill_rx(): walk the rx ring's Linux-shaped chains (one INDIRECT descriptor ->
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

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
    Py_buffer views[MAX_REGIONS + 5];   /* rings, templates, regions */
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
    if (size == 0 || size > 32768 || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "bad queue size");
        return NULL;
    }
    if (!PyTuple_Check(o_regions) || PyTuple_GET_SIZE(o_regions) > MAX_REGIONS) {
        PyErr_SetString(PyExc_ValueError, "regions must be a tuple of at most 8 (gpa, view)");
        return NULL;
    }
    buffers_t b = {.n = 0};
    region_t regions[MAX_REGIONS];
    int nreg = (int)PyTuple_GET_SIZE(o_regions);
    Py_buffer *desc, *avail, *used, *hlast, *hmid, *v;
    static struct iovec iov[MAX_BUFS];
    static unsigned char *hdrs[MAX_BUFS];
    static uint16_t heads[MAX_BUFS];
    static uint32_t lens[MAX_BUFS];
    if (grab(&b, o_desc, PyBUF_SIMPLE, &desc) < 0 || grab(&b, o_avail, PyBUF_SIMPLE, &avail) < 0
        || grab(&b, o_used, PyBUF_WRITABLE, &used) < 0
        || grab(&b, o_hlast, PyBUF_SIMPLE, &hlast) < 0 || grab(&b, o_hmid, PyBUF_SIMPLE, &hmid) < 0)
        goto fail;
    if ((size_t)desc->len < 16 * (size_t)size || (size_t)avail->len < 4 + 2 * (size_t)size
        || (size_t)used->len < 4 + 8 * (size_t)size || hlast->len != HDR_LEN
        || hmid->len != HDR_LEN) {
        PyErr_SetString(PyExc_ValueError, "ring view or header template too short");
        goto fail;
    }
    for (int i = 0; i < nreg; i++) {
        PyObject *item = PyTuple_GET_ITEM(o_regions, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "region must be (gpa_start, view)");
            goto fail;
        }
        regions[i].start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        if (PyErr_Occurred())
            goto fail;
        if (grab(&b, PyTuple_GET_ITEM(item, 1), PyBUF_WRITABLE, &v) < 0)
            goto fail;
        regions[i].base = v->buf;
        regions[i].size = (uint64_t)v->len;
    }
    if (have > MAX_BUFS)
        have = MAX_BUFS;
    const unsigned char *dp = desc->buf, *ap = avail->buf;
    unsigned char *up = used->buf;
    unsigned int mask = size - 1;
    int last = 0, n = 0;
    uint64_t asked = 0;
    for (unsigned int i = 0; i < have && asked < want; i++) {
        uint16_t head = rd16(ap + 4 + 2 * ((last_avail + i) & mask));
        if (head >= size)
            break;
        const unsigned char *d = dp + 16 * (size_t)head;
        uint16_t dflags = rd16(d + 12);
        uint32_t dlen = rd32(d + 8);
        unsigned char *h, *p;
        uint32_t l1;
        if (dflags == F_WRITE && dlen > HDR_LEN && (uint64_t)dlen - HDR_LEN <= max_payload) {
            /* Linux >= 6.2: one device-writable descriptor, header then payload */
            h = locate(regions, nreg, &last, rd64(d), dlen);
            if (h == NULL)
                break;
            p = h + HDR_LEN;
            l1 = dlen - HDR_LEN;
            goto take;
        }
        if (!indirect || dflags != F_INDIRECT || dlen != 32)
            break;
        const unsigned char *t = locate(regions, nreg, &last, rd64(d), 32);
        if (t == NULL)
            break;
        uint64_t a0 = rd64(t), a1 = rd64(t + 16);
        uint32_t l0 = rd32(t + 8);
        uint16_t f0 = rd16(t + 12), n0 = rd16(t + 14), f1 = rd16(t + 28);
        l1 = rd32(t + 24);
        if (f0 != (F_WRITE | F_NEXT) || n0 != 1 || l0 != HDR_LEN || f1 != F_WRITE || l1 == 0
            || l1 > max_payload)
            break;
        h = locate(regions, nreg, &last, a0, l0);
        p = locate(regions, nreg, &last, a1, l1);
        if (h == NULL || p == NULL)
            break;
take:;
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
        unsigned char *e = up + 4 + 8 * (size_t)((used_pos + i) & mask);
        uint32_t id = heads[i], written = HDR_LEN + lens[i];
        memcpy(e, &id, 4);
        memcpy(e + 4, &written, 4);
    }
    drop_all(&b);
    return Py_BuildValue("iKiK", k, (unsigned long long)got, err, (unsigned long long)asked);
fail:
    drop_all(&b);
    return NULL;
}

static PyMethodDef methods[] = {
    {"fill_rx", fill_rx, METH_VARARGS, "Fill Linux-shaped rx chains from a socket or buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vmlab_accel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__vmlab_accel(void) { return PyModule_Create(&module); }
