/* proxy._frames: the compiled build of proxy.frames.FrameParser.
 *
 * Same state machine, same results, same errors as the pure-Python parser in
 * proxy/frames.py, which stays the reference and the fallback; tests/test_frames.py
 * runs every test against both, plus a differential fuzz test of one against the
 * other.  Only the hot path lives here: splitting chunks into frames, counting,
 * size limits and the first-byte table.  Whatever is rare and carries policy
 * stays in Python and is called from here: the first-byte tables are built by
 * frames.py, close payloads are judged by frames._parse_close, errors are
 * described by frames._diagnose, and FrameHeader objects (on_frame) are built
 * by the Python class.  proxy.frames hands those over once, with _setup().
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEADER_SIZE 14
#define MAX_CONTROL_PAYLOAD 125

/* Frame classes, as in frames.py. */
#define K_INVALID 0
#define K_DATA_WHOLE 1
#define K_DATA_FIRST 2
#define K_CONT_LAST 3
#define K_CONT_MORE 4
#define K_PING 5
#define K_PONG 6
#define K_CLOSE 7

/* Set by _setup(). */
static unsigned char tables[8][512];
static int tables_ready = 0;
static PyObject *ProtocolError = NULL;  /* frames.ProtocolError */
static PyObject *diagnose = NULL;       /* frames._diagnose(buf, pos, n, in_message, msg_len, allowed_rsv, client_side, max_message_size) */
static PyObject *parse_close = NULL;    /* frames._parse_close(payload) -> (code, reason) */
static PyObject *FrameHeader = NULL;    /* frames.FrameHeader */

typedef struct {
    PyObject_HEAD
    /* public */
    char client_side;
    int allowed_rsv;
    PyObject *max_message_size; /* None or int, as given */
    PyObject *on_frame;         /* None or callable */
    long long messages;
    long long message_bytes;
    long long frames;
    long long pings;
    long long pongs;
    char close_seen;
    PyObject *close_code;       /* None or int */
    PyObject *close_reason;     /* str */
    PyObject *error;            /* None or ProtocolError */
    char in_message;
    /* private */
    char has_limit;
    char err_boundary;
    unsigned char kind;         /* class of the frame whose payload is pending */
    unsigned char hbuf_len;
    unsigned char close_len;
    char close_masked;
    unsigned long long limit;
    unsigned long long msg_len; /* saturates; only compared with the limit */
    long long skip;             /* payload bytes of the current frame still to come */
    long long frame_start;      /* stream offset of a close frame whose payload is pending */
    long long offset;           /* stream offset of the next chunk's first byte */
    unsigned char hbuf[MAX_HEADER_SIZE];
    unsigned char close_mask[4];
    unsigned char *close_buf;   /* MAX_CONTROL_PAYLOAD bytes, only while a close payload is split */
} Parser;

static int
set_limit(Parser *self, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete max_message_size");
        return -1;
    }
    if (value == Py_None) {
        self->has_limit = 0;
        self->limit = 0;
    } else {
        if (!PyLong_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "max_message_size must be an int or None");
            return -1;
        }
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (overflow < 0 || (overflow == 0 && v < 0)) {
            PyErr_SetString(PyExc_ValueError, "max_message_size must be >= 0 or None");
            return -1;
        }
        if (overflow > 0) {
            /* Above 2**63: no frame can be that long, so it never bites. */
            self->has_limit = 0;
            self->limit = 0;
        } else {
            self->has_limit = 1;
            self->limit = (unsigned long long)v;
        }
    }
    Py_INCREF(value);
    Py_XSETREF(self->max_message_size, value);
    return 0;
}

static int
Parser_init(Parser *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client_side", "max_message_size", "allowed_rsv", "on_frame", NULL};
    int client_side = -1;
    PyObject *max_size = Py_None, *on_frame = Py_None;
    int allowed_rsv = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$pOiO", kwlist,
                                     &client_side, &max_size, &allowed_rsv, &on_frame))
        return -1;
    if (client_side < 0) {
        PyErr_SetString(PyExc_TypeError,
                        "FrameParser() missing required keyword-only argument: 'client_side'");
        return -1;
    }
    if (allowed_rsv < 0 || allowed_rsv > 7) {
        PyErr_Format(PyExc_ValueError, "allowed_rsv must be a 3-bit value, got %d", allowed_rsv);
        return -1;
    }
    if (set_limit(self, max_size) < 0)
        return -1;
    self->client_side = (char)client_side;
    self->allowed_rsv = allowed_rsv;
    Py_INCREF(on_frame);
    Py_XSETREF(self->on_frame, on_frame);
    self->messages = self->message_bytes = self->frames = self->pings = self->pongs = 0;
    self->close_seen = 0;
    Py_INCREF(Py_None);
    Py_XSETREF(self->close_code, Py_None);
    PyObject *empty = PyUnicode_FromStringAndSize("", 0);
    if (empty == NULL)
        return -1;
    Py_XSETREF(self->close_reason, empty);
    Py_INCREF(Py_None);
    Py_XSETREF(self->error, Py_None);
    self->in_message = 0;
    self->err_boundary = 1;
    self->kind = K_INVALID;
    self->hbuf_len = 0;
    self->close_len = 0;
    self->close_masked = 0;
    self->msg_len = 0;
    self->skip = 0;
    self->frame_start = 0;
    self->offset = 0;
    if (self->close_buf != NULL) {
        PyMem_Free(self->close_buf);
        self->close_buf = NULL;
    }
    return 0;
}

static PyObject *
Parser_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Parser *self = (Parser *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(Py_None); self->max_message_size = Py_None;
    Py_INCREF(Py_None); self->on_frame = Py_None;
    Py_INCREF(Py_None); self->close_code = Py_None;
    Py_INCREF(Py_None); self->error = Py_None;
    self->close_reason = PyUnicode_FromStringAndSize("", 0);
    if (self->close_reason == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->err_boundary = 1;
    return (PyObject *)self;
}

static int
Parser_traverse(Parser *self, visitproc visit, void *arg)
{
    Py_VISIT(self->max_message_size);
    Py_VISIT(self->on_frame);
    Py_VISIT(self->close_code);
    Py_VISIT(self->close_reason);
    Py_VISIT(self->error);
    return 0;
}

static int
Parser_clear(Parser *self)
{
    Py_CLEAR(self->max_message_size);
    Py_CLEAR(self->on_frame);
    Py_CLEAR(self->close_code);
    Py_CLEAR(self->close_reason);
    Py_CLEAR(self->error);
    return 0;
}

static void
Parser_dealloc(Parser *self)
{
    PyObject_GC_UnTrack(self);
    Parser_clear(self);
    if (self->close_buf != NULL)
        PyMem_Free(self->close_buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* --- calls into Python (rare paths) ------------------------------------- */

static PyObject *
limit_object(Parser *self)
{
    /* What _diagnose compares against: the limit, or None. */
    if (!self->has_limit)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(self->limit);
}

/* frames._diagnose over buf[pos:n]: a ProtocolError, None, or NULL on failure. */
static PyObject *
call_diagnose(Parser *self, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t n,
              int in_message, unsigned long long msg_len)
{
    PyObject *chunk = PyBytes_FromStringAndSize((const char *)buf + pos, n - pos);
    if (chunk == NULL)
        return NULL;
    PyObject *limit = limit_object(self);
    if (limit == NULL) {
        Py_DECREF(chunk);
        return NULL;
    }
    PyObject *result = PyObject_CallFunction(
        diagnose, "OnnOKiOO", chunk, (Py_ssize_t)0, n - pos, in_message ? Py_True : Py_False,
        msg_len, self->allowed_rsv, self->client_side ? Py_True : Py_False, limit);
    Py_DECREF(chunk);
    Py_DECREF(limit);
    return result;
}

/* Close code and reason of an unmasked payload through frames._parse_close.
 * 0: stored; 1: a ProtocolError, returned in *err (new reference); -1: failure. */
static int
judge_close(Parser *self, const unsigned char *payload, Py_ssize_t len, PyObject **err)
{
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)payload, len);
    if (bytes == NULL)
        return -1;
    PyObject *result = PyObject_CallOneArg(parse_close, bytes);
    Py_DECREF(bytes);
    if (result == NULL) {
        if (PyErr_ExceptionMatches(ProtocolError)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL) {
                PyException_SetTraceback(value, tb);
                Py_DECREF(tb);
            }
            Py_DECREF(type);
            *err = value;
            return 1;
        }
        return -1;
    }
    if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_TypeError, "_parse_close must return (code, reason)");
        return -1;
    }
    PyObject *code = PyTuple_GET_ITEM(result, 0);
    PyObject *reason = PyTuple_GET_ITEM(result, 1);
    Py_INCREF(code);
    Py_XSETREF(self->close_code, code);
    Py_INCREF(reason);
    Py_XSETREF(self->close_reason, reason);
    Py_DECREF(result);
    self->close_seen = 1;
    return 0;
}

static int
emit_header(Parser *self, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t hs, long long ln)
{
    unsigned char b0 = buf[pos];
    int masked = (buf[pos + 1] & 0x80) != 0;
    PyObject *mask;
    if (masked) {
        mask = PyBytes_FromStringAndSize((const char *)buf + pos + hs - 4, 4);
        if (mask == NULL)
            return -1;
    } else {
        Py_INCREF(Py_None);
        mask = Py_None;
    }
    PyObject *header = PyObject_CallFunction(
        FrameHeader, "OiiOOLn", (b0 & 0x80) ? Py_True : Py_False, (b0 >> 4) & 7, b0 & 0x0F,
        masked ? Py_True : Py_False, mask, ln, hs);
    Py_DECREF(mask);
    if (header == NULL)
        return -1;
    PyObject *r = PyObject_CallOneArg(self->on_frame, header);
    Py_DECREF(header);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static void
unmask(unsigned char *payload, Py_ssize_t n, const unsigned char *key)
{
    for (Py_ssize_t i = 0; i < n; i++)
        payload[i] ^= key[i & 3];
}

/* Whether the (possibly incomplete) header at buf[pos:n] already shows a
 * violation: the same questions frames._diagnose asks, without building the
 * error (that is left to _diagnose itself, once something is wrong). */
static int
problem_at(Parser *self, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t n, int im,
           unsigned long long msg_len)
{
    Py_ssize_t avail = n - pos;
    unsigned char b0 = buf[pos];
    if (!tables[self->allowed_rsv][b0 | im])
        return 1;
    if (avail < 2)
        return 0;
    unsigned char b1 = buf[pos + 1];
    if (((b1 & 0x80) != 0) != (self->client_side != 0))
        return 1;
    int opcode = b0 & 0x0F;
    unsigned long long ln = b1 & 0x7F;
    if (opcode >= 8)
        return ln > MAX_CONTROL_PAYLOAD || (opcode == 8 && ln == 1);
    if (ln == 126) {
        if (avail < 4)
            return 0;
        ln = ((unsigned long long)buf[pos + 2] << 8) | buf[pos + 3];
    } else if (ln == 127) {
        if (avail < 10)
            return 0;
        ln = 0;
        for (int i = 2; i < 10; i++)
            ln = (ln << 8) | buf[pos + i];
        if (ln >> 63)
            return 1;
    }
    if (!self->has_limit)
        return 0;
    unsigned long long total = ln;
    if (opcode == 0)
        total = (msg_len > ULLONG_MAX - ln) ? ULLONG_MAX : msg_len + ln;
    return total > self->limit;
}

/* Parse buf[pos:n], buf[0] being at stream offset `base`.
 * Returns -1, the stream offset (>= 0) of an invalid frame with self->error
 * set, or -2 with a Python exception set. */
static long long
run(Parser *self, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t n, long long base)
{
    /* 1. Finish the payload of a frame that started in an earlier buffer. */
    long long skip = self->skip;
    if (skip) {
        long long avail = n - pos;
        long long take = skip <= avail ? skip : avail;
        skip -= take;
        self->skip = skip;
        int kind = self->kind;
        if (kind <= K_CONT_MORE) {
            self->message_bytes += take;
        } else if (kind == K_CLOSE) {
            memcpy(self->close_buf + self->close_len, buf + pos, (size_t)take);
            self->close_len += (unsigned char)take;
        }
        pos += (Py_ssize_t)take;
        if (skip)
            return -1;
        if (kind <= K_CONT_MORE) {
            if (kind & 1)
                self->messages += 1;
        } else if (kind == K_CLOSE) {
            unsigned char payload[MAX_CONTROL_PAYLOAD];
            Py_ssize_t len = self->close_len;
            memcpy(payload, self->close_buf, (size_t)len);
            PyMem_Free(self->close_buf);
            self->close_buf = NULL;
            self->close_len = 0;
            if (self->close_masked)
                unmask(payload, len, self->close_mask);
            PyObject *err = NULL;
            int r = judge_close(self, payload, len, &err);
            if (r < 0)
                return -2;
            if (r > 0) {
                Py_XSETREF(self->error, err);
                return self->frame_start;
            }
        }
        if (pos >= n)
            return -1;
    }

    /* 2. Whole frames, state in locals, written back once. */
    const unsigned char *table = tables[self->allowed_rsv];
    const int want_mask = self->client_side ? 0x80 : 0;
    const Py_ssize_t hs0 = want_mask ? 6 : 2;
    const int has_limit = self->has_limit;
    const unsigned long long limit = self->limit;
    PyObject *on_frame = self->on_frame == Py_None ? NULL : self->on_frame;
    int im = self->in_message ? 256 : 0;
    unsigned long long msg_len = self->msg_len;
    long long frames = self->frames;
    long long messages = self->messages;
    long long message_bytes = self->message_bytes;
    long long pings = self->pings;
    long long pongs = self->pongs;
    Py_ssize_t err_pos = -1;
    PyObject *error = NULL;

    while (pos < n) {
        Py_ssize_t left = n - pos;
        if (left < MAX_HEADER_SIZE) {
            if (left < 2)
                break;
            unsigned char b1 = buf[pos + 1];
            Py_ssize_t need = (b1 & 0x80) ? 6 : 2;
            int l7 = b1 & 0x7F;
            if (l7 == 126)
                need += 2;
            else if (l7 == 127)
                need += 8;
            if (left < need)
                break;
        }
        unsigned char b0 = buf[pos];
        unsigned char b1 = buf[pos + 1];
        int cls = table[b0 | im];
        if (!cls || (b1 & 0x80) != want_mask) {
            err_pos = pos;
            break;
        }
        unsigned long long ln = b1 & 0x7F;
        Py_ssize_t hs;
        if (ln < 126) {
            hs = hs0;
        } else if (cls > K_CONT_MORE) { /* control frames carry <= 125 bytes */
            err_pos = pos;
            break;
        } else if (ln == 126) {
            ln = ((unsigned long long)buf[pos + 2] << 8) | buf[pos + 3];
            hs = hs0 + 2;
        } else {
            ln = 0;
            for (int i = 2; i < 10; i++)
                ln = (ln << 8) | buf[pos + i];
            if (ln >> 63) {
                err_pos = pos;
                break;
            }
            hs = hs0 + 8;
        }
        /* ln < 2**63 and pos + hs <= n, so this cannot overflow a signed 64-bit. */
        long long end = (long long)pos + hs + (long long)ln;

        if (cls <= K_CONT_MORE) {
            unsigned long long total = ln;
            if (cls > K_DATA_FIRST)
                total = (msg_len > ULLONG_MAX - ln) ? ULLONG_MAX : msg_len + ln;
            if (has_limit && total > limit) {
                err_pos = pos;
                break;
            }
            msg_len = total;
            im = (cls == K_DATA_FIRST || cls == K_CONT_MORE) ? 256 : 0;
            frames += 1;
            if (on_frame != NULL && emit_header(self, buf, pos, hs, (long long)ln) < 0)
                return -2;
            if (end <= n) {
                message_bytes += (long long)ln;
                if (cls & 1)
                    messages += 1;
                pos = (Py_ssize_t)end;
                continue;
            }
            message_bytes += n - pos - hs;
            self->skip = end - n;
            self->kind = (unsigned char)cls;
            pos = n;
            break;
        }

        if (cls == K_CLOSE) {
            if (ln == 1) {
                err_pos = pos;
                break;
            }
            if (end <= n) {
                unsigned char payload[MAX_CONTROL_PAYLOAD];
                memcpy(payload, buf + pos + hs, (size_t)ln);
                if (want_mask)
                    unmask(payload, (Py_ssize_t)ln, buf + pos + hs - 4);
                PyObject *err = NULL;
                int r = judge_close(self, payload, (Py_ssize_t)ln, &err);
                if (r < 0)
                    return -2;
                if (r > 0) {
                    error = err;
                    err_pos = pos;
                    break;
                }
                frames += 1;
                if (on_frame != NULL && emit_header(self, buf, pos, hs, (long long)ln) < 0)
                    return -2;
                pos = (Py_ssize_t)end;
                continue;
            }
            frames += 1;
            if (on_frame != NULL && emit_header(self, buf, pos, hs, (long long)ln) < 0)
                return -2;
            if (self->close_buf == NULL) {
                self->close_buf = PyMem_Malloc(MAX_CONTROL_PAYLOAD);
                if (self->close_buf == NULL) {
                    PyErr_NoMemory();
                    return -2;
                }
            }
            self->close_len = (unsigned char)(n - pos - hs);
            memcpy(self->close_buf, buf + pos + hs, self->close_len);
            self->close_masked = want_mask != 0;
            if (want_mask)
                memcpy(self->close_mask, buf + pos + hs - 4, 4);
            self->skip = end - n;
            self->kind = K_CLOSE;
            self->frame_start = base + pos;
            pos = n;
            break;
        }

        /* Ping or pong: payload skipped like data but not counted. */
        if (cls == K_PING)
            pings += 1;
        else
            pongs += 1;
        frames += 1;
        if (on_frame != NULL && emit_header(self, buf, pos, hs, (long long)ln) < 0)
            return -2;
        if (end <= n) {
            pos = (Py_ssize_t)end;
            continue;
        }
        self->skip = end - n;
        self->kind = (unsigned char)cls;
        pos = n;
        break;
    }

    self->in_message = im != 0;
    self->msg_len = msg_len;
    self->frames = frames;
    self->messages = messages;
    self->message_bytes = message_bytes;
    self->pings = pings;
    self->pongs = pongs;

    if (err_pos < 0 && pos < n) {
        /* A header cut short by the end of the buffer: refuse it now if the bytes
         * at hand prove it invalid, else keep it for the next chunk. */
        if (!problem_at(self, buf, pos, n, im, msg_len)) {
            memcpy(self->hbuf + self->hbuf_len, buf + pos, (size_t)(n - pos));
            self->hbuf_len += (unsigned char)(n - pos);
            return -1;
        }
        err_pos = pos;
    }
    if (err_pos < 0)
        return -1;
    if (error == NULL) {
        error = call_diagnose(self, buf, err_pos, n, im != 0, msg_len);
        if (error == NULL)
            return -2;
        if (error == Py_None) {
            Py_DECREF(error);
            PyErr_Format(PyExc_AssertionError, "frame at offset %lld rejected without a reason",
                         base + err_pos);
            return -2;
        }
    }
    Py_XSETREF(self->error, error);
    return base + err_pos;
}

static PyObject *
fail(Parser *self, long long err_offset, long long base)
{
    if (err_offset < base) {
        self->err_boundary = 0;
        self->offset = base;
        return PyLong_FromLong(0);
    }
    self->err_boundary = 1;
    self->offset = err_offset;
    return PyLong_FromLongLong(err_offset - base);
}

static PyObject *
Parser_feed(Parser *self, PyObject *data)
{
    if (self->error != Py_None) {
        PyErr_SetObject((PyObject *)Py_TYPE(self->error), self->error);
        return NULL;
    }
    if (self->allowed_rsv < 0 || self->allowed_rsv > 7) {
        PyErr_Format(PyExc_ValueError, "allowed_rsv must be a 3-bit value, got %d",
                     self->allowed_rsv);
        return NULL;
    }
    if (!tables_ready) {
        PyErr_SetString(PyExc_RuntimeError, "proxy._frames used before proxy.frames set it up");
        return NULL;
    }
    Py_buffer view;
    PyObject *copy = NULL;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        /* A non-contiguous memoryview, say: read a contiguous copy. */
        PyErr_Clear();
        copy = PyBytes_FromObject(data);
        if (copy == NULL)
            return NULL;
        if (PyObject_GetBuffer(copy, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(copy);
            return NULL;
        }
    }
    const unsigned char *buf = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    long long base = self->offset;
    Py_ssize_t pos = 0;
    PyObject *result = NULL;
    long long err;

    while (self->hbuf_len && pos < n) {
        /* Complete a header split across chunks: glue the buffered bytes to just
         * enough of this chunk and run the normal loop on that small buffer. */
        unsigned char glued[2 * MAX_HEADER_SIZE];
        Py_ssize_t k = self->hbuf_len;
        Py_ssize_t take = MAX_HEADER_SIZE - k;
        if (take > n - pos)
            take = n - pos;
        memcpy(glued, self->hbuf, (size_t)k);
        memcpy(glued + k, buf + pos, (size_t)take);
        self->hbuf_len = 0;
        err = run(self, glued, 0, k + take, base + pos - k);
        if (err == -2)
            goto done;
        if (err >= 0) {
            result = fail(self, err, base);
            goto done;
        }
        pos += take;
    }
    if (pos < n) {
        err = run(self, buf, pos, n, base);
        if (err == -2)
            goto done;
        if (err >= 0) {
            result = fail(self, err, base);
            goto done;
        }
    }
    self->offset = base + n;
    result = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(copy);
    return result;
}

static PyObject *
Parser_get_at_boundary(Parser *self, void *closure)
{
    if (self->error != Py_None)
        return PyBool_FromLong(self->err_boundary);
    return PyBool_FromLong(!self->skip && !self->hbuf_len);
}

static PyObject *
Parser_get_frame_remaining(Parser *self, void *closure)
{
    if (self->error != Py_None)
        return PyLong_FromLong(0);
    return PyLong_FromLongLong(self->skip);
}

static PyObject *
Parser_get_max_message_size(Parser *self, void *closure)
{
    Py_INCREF(self->max_message_size);
    return self->max_message_size;
}

static int
Parser_set_max_message_size(Parser *self, PyObject *value, void *closure)
{
    return set_limit(self, value);
}

static PyObject *
Parser_get_client_side(Parser *self, void *closure)
{
    return PyBool_FromLong(self->client_side);
}

static PyObject *
Parser_get_close_seen(Parser *self, void *closure)
{
    return PyBool_FromLong(self->close_seen);
}

static PyObject *
Parser_get_in_message(Parser *self, void *closure)
{
    return PyBool_FromLong(self->in_message);
}

static PyGetSetDef Parser_getset[] = {
    {"at_boundary", (getter)Parser_get_at_boundary, NULL,
     "True iff the bytes accepted so far end exactly between two frames.", NULL},
    {"frame_remaining", (getter)Parser_get_frame_remaining, NULL,
     "Payload bytes of the frame in progress still to come.", NULL},
    {"max_message_size", (getter)Parser_get_max_message_size,
     (setter)Parser_set_max_message_size, NULL, NULL},
    {"client_side", (getter)Parser_get_client_side, NULL, NULL, NULL},
    {"close_seen", (getter)Parser_get_close_seen, NULL, NULL, NULL},
    {"in_message", (getter)Parser_get_in_message, NULL, NULL, NULL},
    {NULL}
};

static PyMemberDef Parser_members[] = {
    {"allowed_rsv", T_INT, offsetof(Parser, allowed_rsv), 0, NULL},
    {"on_frame", T_OBJECT, offsetof(Parser, on_frame), READONLY, NULL},
    {"messages", T_LONGLONG, offsetof(Parser, messages), READONLY, NULL},
    {"message_bytes", T_LONGLONG, offsetof(Parser, message_bytes), READONLY, NULL},
    {"frames", T_LONGLONG, offsetof(Parser, frames), READONLY, NULL},
    {"pings", T_LONGLONG, offsetof(Parser, pings), READONLY, NULL},
    {"pongs", T_LONGLONG, offsetof(Parser, pongs), READONLY, NULL},
    {"close_code", T_OBJECT, offsetof(Parser, close_code), READONLY, NULL},
    {"close_reason", T_OBJECT, offsetof(Parser, close_reason), READONLY, NULL},
    {"error", T_OBJECT, offsetof(Parser, error), READONLY, NULL},
    {NULL}
};

static PyMethodDef Parser_methods[] = {
    {"feed", (PyCFunction)Parser_feed, METH_O,
     "Consume a chunk; return how many leading bytes are safe to forward."},
    {NULL}
};

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._frames.FrameParser",
    .tp_doc = "Watches one direction of a WebSocket stream, header by header (compiled build "
              "of proxy.frames.PyFrameParser).",
    .tp_basicsize = sizeof(Parser),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Parser_new,
    .tp_init = (initproc)Parser_init,
    .tp_dealloc = (destructor)Parser_dealloc,
    .tp_traverse = (traverseproc)Parser_traverse,
    .tp_clear = (inquiry)Parser_clear,
    .tp_methods = Parser_methods,
    .tp_members = Parser_members,
    .tp_getset = Parser_getset,
};

static PyObject *
setup(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tables", "protocol_error", "diagnose", "parse_close", "frame_header", NULL};
    Py_buffer tb;
    PyObject *perr, *diag, *pclose, *fheader;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$y*OOOO", kwlist,
                                     &tb, &perr, &diag, &pclose, &fheader))
        return NULL;
    if (tb.len != (Py_ssize_t)sizeof(tables)) {
        PyBuffer_Release(&tb);
        PyErr_Format(PyExc_ValueError, "tables must be %zu bytes", sizeof(tables));
        return NULL;
    }
    memcpy(tables, tb.buf, sizeof(tables));
    PyBuffer_Release(&tb);
    Py_INCREF(perr); Py_XSETREF(ProtocolError, perr);
    Py_INCREF(diag); Py_XSETREF(diagnose, diag);
    Py_INCREF(pclose); Py_XSETREF(parse_close, pclose);
    Py_INCREF(fheader); Py_XSETREF(FrameHeader, fheader);
    tables_ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"_setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "Called once by proxy.frames: the first-byte tables and the Python helpers."},
    {NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy._frames",
    .m_doc = "Compiled build of proxy.frames.FrameParser (see proxy/frames.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__frames(void)
{
    if (PyType_Ready(&ParserType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ParserType);
    if (PyModule_AddObject(m, "FrameParser", (PyObject *)&ParserType) < 0) {
        Py_DECREF(&ParserType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
