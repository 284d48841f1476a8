/* proxy._xmlframe: the XML stream framer's expat handlers in C (DESIGN §8, issue 13).
 *
 * The same libexpat the backends use (Prosody's lxp, ejabberd's fast_xml), driven exactly as
 * proxy/xmlstream.py's PyXmlStreamParser drives pyexpat: UTF-8 forced, namespace processing
 * with ' ' as separator, parameter entities never parsed, and the same handlers installed
 * (an expat handler's presence can change what expat reports).  Only the work per element is
 * moved here: depth, the byte span of each first-level element (expat's own token
 * positions: XML_GetCurrentByteIndex + XML_GetCurrentByteCount), its name and attributes.
 * Python sees one event per first-level element and nothing per nested element.
 *
 * Every rule of the Python framer is mirrored here, in the same order, with the same
 * buffer and limit arithmetic, so that both give the same events for any input and any
 * chunking (tests/test_xmlstream_differential.py checks that).  Texts of errors are made
 * by a Python callback (proxy.xmlstream._c_error) so both framers word them alike.  Elements
 * other than jabber:server stanzas get the same small tree as in Python (children and
 * grandchildren, no text; a child's byte span inside its element), built here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <expat.h>
#include <string.h>

#define NS_STREAMS "http://etherx.jabber.org/streams"
#define NS_SERVER "jabber:server"

enum { ST_OPEN = 0, ST_STOPPED, ST_CLOSED, ST_FAILED };

/* Depths of the kept tree: the first-level element (1) and two levels below it, as
 * proxy/xmlstream.py's _TREE_DEPTH. */
#define TREE_DEPTH 3

typedef struct {
    PyObject *ns, *name, *attrs, *children;   /* children: list */
    long long start;
} Builder;

/* Set once by configure(): the Python types and callbacks events are built with. */
static PyObject *g_element_type;   /* proxy.xmlstream.Element */
static PyObject *g_node_type;      /* proxy.xmlstream.Node */
static PyObject *g_opened_type;    /* StreamOpened */
static PyObject *g_closed_type;    /* StreamClosed */
static PyObject *g_make_error;     /* (kind, *args) -> XmlError */
static PyObject *s_ns, *s_name, *s_attrs, *s_children, *s_span, *s_raw, *s_empty_tuple;
static PyObject *s_open, *s_stopped, *s_closed, *s_failed;

typedef struct {
    PyObject_HEAD
    XML_Parser p;
    char *buf;                 /* bytes from offset `base` of the stream on */
    Py_ssize_t len, cap;
    /* During feed() only: `buf` is the caller's bytes, not ours (nothing was held back, so
     * they are parsed where they are: one copy less per read, issue 13), and `feed_obj` the
     * object they belong to.  Whatever is left when feed() returns is copied (unborrow). */
    int borrowed;
    PyObject *feed_obj;
    long long base;            /* absolute stream offset of buf[0] */
    long long consumed;        /* absolute offset just after the last complete event */
    long long el_start;        /* absolute offset of the open first-level element, or -1 */
    long depth;
    int flat;                  /* the open first-level element is a jabber:server stanza */
    int state;
    int halted;                /* a handler stopped the parser: ignore further callbacks */
    int py_error;              /* a Python exception is pending from a handler */
    int header_seen;
    Py_ssize_t max_stanza_bytes;
    Py_ssize_t max_header_bytes;
    /* Slow input, linear cost (Python's _may_complete): how far expat has been fed, where its
     * unfinished token starts (== fed when there is none), and the quote-aware scan of an
     * unfinished start tag (token start, scanned up to, open quote or 0). */
    long long fed, tok, scan_start, scan_at;
    char scan_quote;
    PyObject *stop_after;      /* callable or NULL */
    PyObject *events;          /* list, only during feed() */
    PyObject *pending_ns;      /* dict: namespace declarations before the header */
    PyObject *trailing;        /* bytes after a stop_after element */
    PyObject *el_ns, *el_name, *el_attrs;  /* the open first-level element */
    Builder tree[TREE_DEPTH];  /* [0]: its children; [1], [2]: the open child, grandchild */
    /* Idle streams (release_idle): the expat parser is freed between first-level elements and
     * made again when bytes arrive, by replaying the header's start tag.  `header` is that
     * tag as received; expat's byte index plus `index_delta` is the stream offset; expat's
     * line L and column C read as the stream's through `line_delta`, and on the replay's last
     * line (`replay_line`) with `col_delta` added. */
    PyObject *header;
    long long index_delta;
    unsigned long line_delta, replay_line;
    long col_delta;
    int replaying;             /* handlers ignore the header's replay */
    int released;              /* the parser is freed until the next bytes */
    /* Authorised stanzas (the `routes` attribute, see feed_routes below): the open stanza
     * passes (el_pass), and the run of passed stanzas not yet handed out as one bytes event
     * is [run_start, run_end) of the stream (run_start -1: none). */
    PyObject *routes;
    int el_pass;
    long long run_start, run_end;
    unsigned long resume_line, resume_col;   /* while released: where the stream stood */
} Framer;

/* ------------------------------------------------------------------ helpers */

static void halt(Framer *self)
{
    self->halted = 1;
    XML_StopParser(self->p, XML_FALSE);
}

static void py_fail(Framer *self)
{
    /* A Python exception (memory, a callback raising): propagate it out of feed(). */
    self->py_error = 1;
    halt(self);
}

static PyObject *buf_slice(Framer *self, long long start, long long end);

/* The run of passed stanzas becomes one bytes event (before any other event, and before the
 * buffer it lies in changes). */
static int flush_run(Framer *self)
{
    if (self->run_start < 0)
        return 0;
    PyObject *data;
    if (self->borrowed && self->feed_obj != NULL && PyBytes_CheckExact(self->feed_obj)
        && self->run_start == self->base && self->run_end == self->base + self->len
        && PyBytes_GET_SIZE(self->feed_obj) == self->len) {
        /* The read was nothing but passed stanzas: forward the very bytes object. */
        Py_INCREF(self->feed_obj);
        data = self->feed_obj;
    } else {
        data = buf_slice(self, self->run_start, self->run_end);
    }
    self->run_start = -1;
    if (data == NULL || self->events == NULL || PyList_Append(self->events, data) < 0) {
        Py_XDECREF(data);
        py_fail(self);
        return -1;
    }
    Py_DECREF(data);
    return 0;
}

static void append_event(Framer *self, PyObject *event)
{
    if (event == NULL) {
        py_fail(self);
        return;
    }
    if (flush_run(self) < 0 || PyList_Append(self->events, event) < 0)
        py_fail(self);
    Py_DECREF(event);
}

/* _fail(): an XmlError event (if the stream is neither failed nor closed), buffer dropped. */
static void fail_with(Framer *self, PyObject *args)
{
    if (args == NULL) {
        py_fail(self);
        return;
    }
    if (self->state == ST_FAILED || self->state == ST_CLOSED) {
        Py_DECREF(args);
        return;
    }
    self->state = ST_FAILED;
    PyObject *err = PyObject_CallObject(g_make_error, args);
    Py_DECREF(args);
    append_event(self, err);
    self->len = 0;
    if (!self->borrowed)
        PyMem_Free(self->buf);
    self->buf = NULL;
    self->borrowed = 0;
    self->cap = 0;
}

static PyObject *decode(const char *s)
{
    return PyUnicode_DecodeUTF8(s, (Py_ssize_t)strlen(s), "strict");
}

/* "uri local" -> (ns, local) as str; no separator -> ("", name).  Like Python's
 * qname.rpartition(" "): expat refuses a separator inside a namespace URI anyway. */
static int split_qname(const char *qname, PyObject **ns, PyObject **local)
{
    const char *sep = strrchr(qname, ' ');
    if (sep == NULL) {
        *ns = PyUnicode_FromStringAndSize("", 0);
        *local = decode(qname);
    } else {
        *ns = PyUnicode_DecodeUTF8(qname, sep - qname, "strict");
        *local = decode(sep + 1);
    }
    if (*ns == NULL || *local == NULL) {
        Py_CLEAR(*ns);
        Py_CLEAR(*local);
        return -1;
    }
    return 0;
}

static int split_is(const char *qname, const char *ns, const char *local)
{
    size_t n = strlen(ns);
    return strncmp(qname, ns, n) == 0 && qname[n] == ' ' && strcmp(qname + n + 1, local) == 0;
}

/* Attributes as a dict: plain names for unqualified ones, "{uri}local" for namespaced ones
 * (the Python framer's _attrs: Clark notation). */
static PyObject *attr_dict(const XML_Char **atts)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int i = 0; atts[i] != NULL; i += 2) {
        const char *key = atts[i];
        const char *sep = strrchr(key, ' ');
        PyObject *k, *v;
        if (sep == NULL) {
            k = decode(key);
        } else {
            PyObject *uri = PyUnicode_DecodeUTF8(key, sep - key, "strict");
            PyObject *local = decode(sep + 1);
            k = uri && local ? PyUnicode_FromFormat("{%U}%U", uri, local) : NULL;
            Py_XDECREF(uri);
            Py_XDECREF(local);
        }
        v = decode(atts[i + 1]);
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

/* Bytes [start, end) of the stream, which must still be buffered.  The framing arithmetic
 * guarantees that; if it ever did not, this fails closed (an exception out of feed) rather
 * than read outside the buffer. */
static PyObject *buf_slice(Framer *self, long long start, long long end)
{
    if (start < self->base || end < start || end > self->base + self->len) {
        PyErr_Format(PyExc_RuntimeError, "xml framer: bytes %lld..%lld are not buffered (%lld..%lld)",
                     start, end, self->base, self->base + (long long)self->len);
        return NULL;
    }
    return PyBytes_FromStringAndSize(self->buf + (start - self->base), (Py_ssize_t)(end - start));
}

static long long token_start(Framer *self)
{
    return (long long)XML_GetCurrentByteIndex(self->p) + self->index_delta;
}

static long long token_end(Framer *self)
{
    return (long long)XML_GetCurrentByteIndex(self->p) + self->index_delta + XML_GetCurrentByteCount(self->p);
}

/* expat's line and column of a position, as the stream's (see Framer.line_delta). */
static unsigned long stream_line(Framer *self, unsigned long line)
{
    return line + self->line_delta;
}

static unsigned long stream_column(Framer *self, unsigned long line, unsigned long column)
{
    return line == self->replay_line ? (unsigned long)((long)column + self->col_delta) : column;
}

static void builder_clear(Builder *b)
{
    Py_CLEAR(b->ns);
    Py_CLEAR(b->name);
    Py_CLEAR(b->attrs);
    Py_CLEAR(b->children);
}

static void tree_clear(Framer *self)
{
    for (int i = 0; i < TREE_DEPTH; i++)
        builder_clear(&self->tree[i]);
}

/* A Node or Element (frozen dataclasses) with its fields set as object.__setattr__ would:
 * no __init__ call per element.  `raw` NULL makes a Node. */
static PyObject *make_node(PyObject *ns, PyObject *name, PyObject *attrs, PyObject *children,
                           PyObject *span, PyObject *raw)
{
    PyTypeObject *tp = (PyTypeObject *)(raw ? g_element_type : g_node_type);
    PyObject *el = tp->tp_new(tp, s_empty_tuple, NULL);
    if (el == NULL)
        return NULL;
    if (PyObject_GenericSetAttr(el, s_ns, ns) < 0
        || PyObject_GenericSetAttr(el, s_name, name) < 0
        || PyObject_GenericSetAttr(el, s_attrs, attrs) < 0
        || PyObject_GenericSetAttr(el, s_children, children) < 0
        || PyObject_GenericSetAttr(el, s_span, span) < 0
        || (raw && PyObject_GenericSetAttr(el, s_raw, raw) < 0)) {
        Py_DECREF(el);
        return NULL;
    }
    return el;
}

/* The complete first-level element: flat (a stanza, no children) or with its kept tree. */
static PyObject *first_level_element(Framer *self, PyObject *raw)
{
    PyObject *children = s_empty_tuple;
    Py_INCREF(children);
    if (!self->flat && self->tree[0].children != NULL) {
        Py_DECREF(children);
        children = PyList_AsTuple(self->tree[0].children);
        if (children == NULL)
            return NULL;
    }
    PyObject *el = make_node(self->el_ns, self->el_name, self->el_attrs, children, Py_None, raw);
    Py_DECREF(children);
    return el;
}

/* ------------------------------------------------------------------ expat handlers */

static void restricted(Framer *self, PyObject *what_args)
{
    /* RFC 6120 §11.1: comments, PIs, DTDs, entity declarations and references. */
    fail_with(self, what_args);
    halt(self);
}

static void h_ns_decl(void *ud, const XML_Char *prefix, const XML_Char *uri)
{
    Framer *self = ud;
    if (self->replaying || self->halted || self->header_seen)
        return;   /* only the header's declarations are reported (StreamOpened.namespaces) */
    PyObject *k = prefix ? decode(prefix) : (Py_INCREF(Py_None), Py_None);
    PyObject *v = uri ? decode(uri) : (Py_INCREF(Py_None), Py_None);
    if (k == NULL || v == NULL || PyDict_SetItem(self->pending_ns, k, v) < 0)
        py_fail(self);
    Py_XDECREF(k);
    Py_XDECREF(v);
}

static void h_xml_decl(void *ud, const XML_Char *version, const XML_Char *encoding, int standalone)
{
    Framer *self = ud;
    (void)version;
    (void)standalone;
    if (self->halted || encoding == NULL)
        return;
    /* RFC 6120 §11.6 / §4.9.3.22: UTF-8 only.  expat allows only [A-Za-z0-9._-] in an
     * encoding name, so an ASCII lower() is Python's str.lower() here. */
    char low[16];
    size_t n = strlen(encoding);
    if (n < sizeof low) {
        for (size_t i = 0; i <= n; i++) {
            char c = encoding[i];
            low[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : (c == '_' ? '-' : c);
        }
        if (strcmp(low, "utf-8") == 0 || strcmp(low, "utf8") == 0)
            return;
    }
    fail_with(self, Py_BuildValue("(sN)", "encoding", decode(encoding)));
    halt(self);
}

static void h_comment(void *ud, const XML_Char *data)
{
    Framer *self = ud;
    (void)data;
    if (!self->halted)
        restricted(self, Py_BuildValue("(s)", "comment"));
}

static void h_pi(void *ud, const XML_Char *target, const XML_Char *data)
{
    Framer *self = ud;
    (void)data;
    if (!self->halted)
        restricted(self, Py_BuildValue("(sN)", "pi", decode(target)));
}

static void h_doctype(void *ud, const XML_Char *name, const XML_Char *sysid,
                      const XML_Char *pubid, int has_internal_subset)
{
    Framer *self = ud;
    (void)sysid; (void)pubid; (void)has_internal_subset;
    if (!self->halted)
        restricted(self, Py_BuildValue("(sN)", "doctype", decode(name)));
}

static void h_entity_decl(void *ud, const XML_Char *name, int is_pe, const XML_Char *value,
                          int value_len, const XML_Char *base, const XML_Char *sysid,
                          const XML_Char *pubid, const XML_Char *notation)
{
    Framer *self = ud;
    (void)is_pe; (void)value; (void)value_len; (void)base; (void)sysid; (void)pubid; (void)notation;
    if (!self->halted)
        restricted(self, Py_BuildValue("(sN)", "entity-decl", decode(name)));
}

static void h_skipped_entity(void *ud, const XML_Char *name, int is_pe)
{
    Framer *self = ud;
    (void)is_pe;
    if (!self->halted)
        restricted(self, Py_BuildValue("(sN)", "skipped-entity", decode(name)));
}

static int h_external_entity(XML_Parser p, const XML_Char *context, const XML_Char *base,
                             const XML_Char *sysid, const XML_Char *pubid)
{
    Framer *self = XML_GetUserData(p);
    (void)context; (void)base; (void)sysid; (void)pubid;
    if (!self->halted)
        restricted(self, Py_BuildValue("(s)", "external-entity"));
    return XML_STATUS_ERROR;
}

static void open_stream(Framer *self, const XML_Char *qname, const XML_Char **atts)
{
    PyObject *ns, *local;
    if (split_qname(qname, &ns, &local) < 0) {
        py_fail(self);
        return;
    }
    PyObject *namespaces = self->pending_ns;
    self->pending_ns = PyDict_New();
    self->header_seen = 1;
    /* RFC 6120 §4.8.1: the root element is <stream> in the stream namespace. */
    if (PyUnicode_CompareWithASCIIString(local, "stream") != 0) {
        fail_with(self, Py_BuildValue("(sO)", "header-name", local));
        halt(self);
    } else if (PyUnicode_CompareWithASCIIString(ns, NS_STREAMS) != 0) {
        fail_with(self, Py_BuildValue("(sO)", "header-ns", ns));
        halt(self);
    } else if (token_end(self) > self->max_header_bytes) {
        fail_with(self, Py_BuildValue("(sLni)", "header-too-big", token_end(self), self->max_header_bytes, 0));
        halt(self);
    } else {
        long long start = token_start(self), end = token_end(self);
        self->consumed = end;
        PyObject *raw = buf_slice(self, start, end);
        PyObject *attrs = attr_dict(atts);
        if (raw == NULL || attrs == NULL || namespaces == NULL || self->pending_ns == NULL) {
            Py_XDECREF(raw);
            Py_XDECREF(attrs);
            py_fail(self);
        } else {
            Py_INCREF(raw);
            Py_XSETREF(self->header, raw);   /* replayed after release_idle() */
            append_event(self, PyObject_CallFunctionObjArgs(g_opened_type, attrs, namespaces, raw, NULL));
            Py_DECREF(raw);
            Py_DECREF(attrs);
        }
    }
    Py_DECREF(ns);
    Py_DECREF(local);
    Py_XDECREF(namespaces);
}

/* The domainpart of a JID as written (policy.domain_reading.domainpart): cut at the first
 * '/', then what follows the first '@' if any.  Byte-wise on UTF-8 is the same as on the
 * text: '/' and '@' are ASCII, and no other character's bytes contain them. */
static PyObject *domainpart(const char *jid)
{
    size_t n = strcspn(jid, "/");
    const char *at = memchr(jid, '@', n);
    const char *d = at ? at + 1 : jid;
    return PyUnicode_DecodeUTF8(d, (Py_ssize_t)(n - (size_t)(d - jid)), "strict");
}

/* Whether the stanza starting here is in `routes`: its local name and the domainparts of its
 * own (unqualified) 'from' and 'to' -- all the inbound session reads of a stanza to pass it
 * (proxy/inbound_session.py _on_stanza).  1 yes, 0 no, -1 Python error. */
static int stanza_passes(Framer *self, const XML_Char *qname, const XML_Char **atts)
{
    const char *from = NULL, *to = NULL;
    for (int i = 0; atts[i] != NULL; i += 2) {
        if (strcmp(atts[i], "from") == 0)
            from = atts[i + 1];
        else if (strcmp(atts[i], "to") == 0)
            to = atts[i + 1];
    }
    if (from == NULL || to == NULL)
        return 0;
    const char *local = strrchr(qname, ' ');
    PyObject *key = Py_BuildValue("(sNN)", local ? local + 1 : qname, domainpart(from), domainpart(to));
    if (key == NULL)
        return -1;
    int found = PyDict_Contains(self->routes, key);
    Py_DECREF(key);
    return found;
}

static void h_start(void *ud, const XML_Char *qname, const XML_Char **atts)
{
    Framer *self = ud;
    if (self->replaying || self->halted)
        return;
    long depth = self->depth++;
    if (depth == 0) {
        open_stream(self, qname, atts);
        return;
    }
    if (depth == 1) {
        self->el_start = token_start(self);
        /* Stanzas are routed by their own from/to alone: their children are never built (as
         * in Python, where that was half the framing cost of a small message). */
        self->flat = split_is(qname, NS_SERVER, "message") || split_is(qname, NS_SERVER, "presence")
                     || split_is(qname, NS_SERVER, "iq");
        Py_CLEAR(self->el_ns);
        Py_CLEAR(self->el_name);
        Py_CLEAR(self->el_attrs);
        tree_clear(self);
        self->el_pass = 0;
        if (self->flat && self->routes != NULL) {
            int pass = stanza_passes(self, qname, atts);
            if (pass < 0) {
                py_fail(self);
                return;
            }
            if (pass) {
                self->el_pass = 1;   /* nothing of it is built: it leaves as bytes */
                return;
            }
        }
        if (split_qname(qname, &self->el_ns, &self->el_name) < 0
            || (self->el_attrs = attr_dict(atts)) == NULL
            || (!self->flat && (self->tree[0].children = PyList_New(0)) == NULL))
            py_fail(self);
        return;
    }
    if (depth > TREE_DEPTH || self->flat)
        return;   /* deeper content is relayed but not inspected */
    Builder *b = &self->tree[depth - 1];   /* depth 2 -> tree[1], 3 -> tree[2] */
    builder_clear(b);
    b->start = token_start(self);
    if (split_qname(qname, &b->ns, &b->name) < 0 || (b->attrs = attr_dict(atts)) == NULL
        || (b->children = PyList_New(0)) == NULL)
        py_fail(self);
}

static void h_end(void *ud, const XML_Char *qname)
{
    Framer *self = ud;
    (void)qname;
    if (self->replaying || self->halted)
        return;
    long depth = --self->depth;
    if (depth == 0) {
        self->state = ST_CLOSED;
        append_event(self, PyObject_CallNoArgs(g_closed_type));
        halt(self);
        return;
    }
    if (depth > TREE_DEPTH || (depth >= 2 && self->flat))
        return;
    if (depth >= 2) {
        /* A kept child (depth 2, with its byte range inside the first-level element) or
         * grandchild (3) is complete: it joins its parent's children. */
        Builder *b = &self->tree[depth - 1];
        PyObject *span = Py_None, *children = PyList_AsTuple(b->children);
        if (children == NULL) {
            py_fail(self);
            return;
        }
        Py_INCREF(span);
        if (depth == 2) {
            Py_DECREF(span);
            span = Py_BuildValue("(LL)", b->start - self->el_start, token_end(self) - self->el_start);
        }
        PyObject *node = span ? make_node(b->ns, b->name, b->attrs, children, span, NULL) : NULL;
        Py_DECREF(children);
        Py_XDECREF(span);
        if (node == NULL || PyList_Append(self->tree[depth - 2].children, node) < 0)
            py_fail(self);
        Py_XDECREF(node);
        builder_clear(b);
        return;
    }
    /* depth 1: a first-level element is complete.  In an end handler expat's current token
     * is the end tag `</x>` -- or, for `<x/>`, nothing just past the tag: either way the
     * element ends at index + count. */
    long long start = self->el_start, end = token_end(self);
    if (end - start > self->max_stanza_bytes) {
        fail_with(self, Py_BuildValue("(sLni)", "too-big", end - start, self->max_stanza_bytes, 0));
        halt(self);
        return;
    }
    if (self->el_pass) {
        /* Adjacent passed stanzas (no byte between them) leave as one buffer. */
        self->el_pass = 0;
        if (self->run_start >= 0 && self->run_end == start) {
            self->run_end = end;
        } else {
            if (flush_run(self) < 0)
                return;
            self->run_start = start;
            self->run_end = end;
        }
        self->el_start = -1;
        self->consumed = end;
        return;
    }
    PyObject *raw = buf_slice(self, start, end);
    if (raw == NULL) {
        py_fail(self);
        return;
    }
    PyObject *el = first_level_element(self, raw);
    Py_CLEAR(self->el_ns);
    Py_CLEAR(self->el_name);
    Py_CLEAR(self->el_attrs);
    tree_clear(self);
    Py_DECREF(raw);
    if (el == NULL) {
        py_fail(self);
        return;
    }
    self->el_start = -1;
    self->consumed = end;
    Py_INCREF(el);
    append_event(self, el);
    if (self->py_error) {
        Py_DECREF(el);
        return;
    }
    if (self->stop_after != NULL) {
        PyObject *r = PyObject_CallOneArg(self->stop_after, el);
        int stop = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
        if (stop < 0) {
            py_fail(self);
        } else if (stop) {
            self->state = ST_STOPPED;
            Py_XSETREF(self->trailing, buf_slice(self, end, self->base + self->len));
            if (self->trailing == NULL)
                py_fail(self);
            halt(self);
        }
    }
    Py_DECREF(el);
}

/* ------------------------------------------------------------------ the type */

static int setup_parser(Framer *self)
{
    /* RFC 6120 §11.6: XMPP is UTF-8 only; forcing it also keeps byte offsets meaningful. */
    /* expat's many small allocations (names, bindings, hash tables) go to Python's allocator,
     * as pyexpat's do: denser than malloc's for small blocks (memory per idle stream), and
     * visible to tracemalloc.  Every expat call happens with the GIL held. */
    static const XML_Memory_Handling_Suite memsuite = {PyObject_Malloc, PyObject_Realloc, PyObject_Free};
    self->p = XML_ParserCreate_MM("UTF-8", &memsuite, " ");
    if (self->p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    XML_SetUserData(self->p, self);
    /* Parameter entities (and with them external DTD subsets) are never read. */
    XML_SetParamEntityParsing(self->p, XML_PARAM_ENTITY_PARSING_NEVER);
    XML_SetElementHandler(self->p, h_start, h_end);
    XML_SetStartNamespaceDeclHandler(self->p, h_ns_decl);
    XML_SetXmlDeclHandler(self->p, h_xml_decl);
    /* RFC 6120 §11.1: none of these may appear in an XML stream. */
    XML_SetCommentHandler(self->p, h_comment);
    XML_SetProcessingInstructionHandler(self->p, h_pi);
    XML_SetStartDoctypeDeclHandler(self->p, h_doctype);
    XML_SetEntityDeclHandler(self->p, h_entity_decl);
    XML_SetSkippedEntityHandler(self->p, h_skipped_entity);
    XML_SetExternalEntityRefHandler(self->p, h_external_entity);
    return 0;
}

static int Framer_init(Framer *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_stanza_bytes", "stop_after", "max_header_bytes", NULL};
    Py_ssize_t max_bytes, max_header = PY_SSIZE_T_MAX;
    PyObject *stop_after = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|On", kwlist, &max_bytes, &stop_after, &max_header))
        return -1;
    if (g_element_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "proxy._xmlframe.configure() was not called");
        return -1;
    }
    if (self->p != NULL || self->released) {
        PyErr_SetString(PyExc_RuntimeError, "Framer is initialised once");
        return -1;
    }
    self->max_stanza_bytes = max_bytes;
    self->max_header_bytes = max_header < max_bytes ? max_header : max_bytes;
    self->scan_start = -1;
    if (stop_after != Py_None) {
        Py_INCREF(stop_after);
        self->stop_after = stop_after;
    }
    self->el_start = -1;
    self->run_start = -1;
    self->pending_ns = PyDict_New();
    self->trailing = PyBytes_FromStringAndSize("", 0);
    if (self->pending_ns == NULL || self->trailing == NULL)
        return -1;
    return setup_parser(self);
}

static void Framer_dealloc(Framer *self)
{
    PyObject_GC_UnTrack(self);
    if (self->p != NULL)
        XML_ParserFree(self->p);
    PyMem_Free(self->buf);
    Py_CLEAR(self->header);
    Py_CLEAR(self->routes);
    Py_CLEAR(self->stop_after);
    Py_CLEAR(self->events);
    Py_CLEAR(self->pending_ns);
    Py_CLEAR(self->trailing);
    Py_CLEAR(self->el_ns);
    Py_CLEAR(self->el_name);
    Py_CLEAR(self->el_attrs);
    tree_clear(self);
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int Framer_traverse(Framer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->stop_after);
    Py_VISIT(self->events);
    Py_VISIT(self->pending_ns);
    Py_VISIT(self->routes);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int Framer_clear(Framer *self)
{
    Py_CLEAR(self->routes);
    Py_CLEAR(self->stop_after);
    Py_CLEAR(self->events);
    Py_CLEAR(self->pending_ns);
    return 0;
}

static int buf_append(Framer *self, const char *data, Py_ssize_t n)
{
    if (self->len + n > self->cap) {
        Py_ssize_t cap = self->cap ? self->cap : 4096;
        while (cap < self->len + n)
            cap *= 2;
        char *nb = PyMem_Realloc(self->buf, (size_t)cap);
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->buf = nb;
        self->cap = cap;
    }
    memcpy(self->buf + self->len, data, (size_t)n);
    self->len += n;
    return 0;
}

/* ------------------------------------------------------------------ slow input
 *
 * expat re-tokenises an unfinished token from its start on every XML_Parse call, so a peer
 * dripping a long attribute value a few bytes at a time would cost quadratic CPU.  Bytes are
 * held back from expat until they contain what ends the token expat stopped in -- exactly
 * the Python framer's rule (PyXmlStreamParser._may_complete, which explains it), so both
 * report every event after the same feed. */

static const char *find_bytes(const char *hay, Py_ssize_t from, Py_ssize_t n, const char *needle, size_t k)
{
    if (from < 0)
        from = 0;
    if (from >= n)
        return NULL;
    return memmem(hay + from, (size_t)(n - from), needle, k);
}

static int reference_stop(unsigned char c)
{
    /* _REFERENCE_STOP = [^A-Za-z0-9._:#\-\x80-\xff] */
    return !((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.'
             || c == '_' || c == ':' || c == '#' || c == '-' || c >= 0x80);
}

static int tag_may_end(Framer *self, Py_ssize_t tok)
{
    long long at;
    char quote;
    if (self->scan_start != tok + self->base) {
        at = tok + self->base + 1;
        quote = 0;
    } else {
        at = self->scan_at;
        quote = self->scan_quote;
    }
    Py_ssize_t i = (Py_ssize_t)(at - self->base), n = self->len;
    int found = 0;
    while (i < n) {
        if (quote) {
            const char *j = memchr(self->buf + i, quote, (size_t)(n - i));
            if (j == NULL) {
                i = n;
                break;
            }
            quote = 0;
            i = (j - self->buf) + 1;
        } else {
            Py_ssize_t m = i;
            while (m < n && self->buf[m] != '\'' && self->buf[m] != '"' && self->buf[m] != '>')
                m++;
            if (m == n) {
                i = n;
                break;
            }
            char c = self->buf[m];
            i = m + 1;
            if (c == '>') {
                found = 1;
                break;
            }
            quote = c;
        }
    }
    self->scan_start = tok + self->base;
    self->scan_at = i + self->base;
    self->scan_quote = quote;
    return found;
}

static int may_complete(Framer *self)
{
    if (self->tok < self->base || self->fed < self->tok || self->fed > self->base + self->len) {
        /* Cannot happen (compaction never drops what expat has not finished with); fail
         * closed rather than scan outside the buffer. */
        PyErr_SetString(PyExc_RuntimeError, "xml framer: unfinished token outside the buffer");
        return -1;
    }
    Py_ssize_t tok = (Py_ssize_t)(self->tok - self->base), fresh = (Py_ssize_t)(self->fed - self->base);
    Py_ssize_t n = self->len, have = n - tok < 4 ? n - tok : 4;
    const char *head = self->buf + tok;
    if (have >= 1 && head[0] == '&') {
        for (Py_ssize_t i = fresh < 0 ? 0 : fresh; i < n; i++)
            if (reference_stop((unsigned char)self->buf[i]))
                return 1;
        return 0;
    }
    if (have < 2 || head[0] != '<')
        return 1;
    if (head[1] == '/')
        return find_bytes(self->buf, fresh, n, ">", 1) != NULL;
    if (head[1] == '?')
        return find_bytes(self->buf, tok + 2 > fresh - 1 ? tok + 2 : fresh - 1, n, "?>", 2) != NULL;
    if (head[1] == '!') {
        if (have == 4 && memcmp(head, "<!--", 4) == 0)
            return find_bytes(self->buf, tok + 4 > fresh - 2 ? tok + 4 : fresh - 2, n, "-->", 3) != NULL;
        return 1;   /* '<!-' so far, CDATA opener, or a DTD (restricted, and pre-header) */
    }
    return tag_may_end(self, tok);
}

/* The caller's bytes are about to go away: keep what follows the first `drop` of them in a
 * buffer of our own (nothing if that is empty). */
static int unborrow(Framer *self, Py_ssize_t drop)
{
    Py_ssize_t rest = self->len - drop;
    char *owned = NULL;
    if (rest > 0) {
        owned = PyMem_Malloc((size_t)rest);
        if (owned == NULL) {
            self->buf = NULL;
            self->len = self->cap = 0;
            self->borrowed = 0;
            PyErr_NoMemory();
            self->py_error = 1;   /* outside XML_Parse: nothing to stop */
            self->halted = 1;
            return -1;
        }
        memcpy(owned, self->buf + drop, (size_t)rest);
    }
    self->buf = owned;
    self->len = self->cap = rest;
    self->base += drop;
    self->borrowed = 0;
    return 0;
}

static void compact_and_check(Framer *self)
{
    long long keep;
    if (self->depth >= 2) {
        keep = self->el_start;
    } else if (self->depth == 1) {
        /* Between first-level elements only whitespace (keepalives) is meaningful;
         * everything up to the next '<' can go, so idle pings never accumulate. */
        long long from = self->consumed - self->base;
        if (from < 0)
            from = 0;
        const char *lt = from < self->len ? memchr(self->buf + from, '<', (size_t)(self->len - from)) : NULL;
        keep = lt == NULL ? self->base + self->len : self->base + (lt - self->buf);
        if (keep > self->tok)
            keep = self->tok;   /* never bytes expat has not finished with */
        self->consumed = keep;
    } else {
        keep = self->base;   /* header not complete yet */
    }
    Py_ssize_t drop = (Py_ssize_t)(keep - self->base);
    if (self->borrowed) {
        if (unborrow(self, drop) < 0)
            return;
    } else if (drop > 0) {
        memmove(self->buf, self->buf + drop, (size_t)(self->len - drop));
        self->len -= drop;
        self->base = keep;
    }
    if (self->len == 0 && self->cap > 0) {
        /* An idle stream holds no buffer (memory per idle stream, issue 13). */
        PyMem_Free(self->buf);
        self->buf = NULL;
        self->cap = 0;
    }
    Py_ssize_t pending = self->len;
    if (self->depth == 0) {
        if (self->base + pending > self->max_header_bytes)
            fail_with(self, Py_BuildValue("(sLni)", "header-too-big", self->base + pending, self->max_header_bytes, 1));
    } else if (pending > self->max_stanza_bytes) {
        fail_with(self, Py_BuildValue("(snni)", "too-big", pending, self->max_stanza_bytes, 1));
    }
}

/* ------------------------------------------------------------------ idle streams
 *
 * Between first-level elements an expat parser holds only what the stream header set up (its
 * namespace bindings, the open <stream:stream>) -- in ~8 KiB of name pools, hash tables and
 * input buffer (grown to the largest read it was ever given).  An idle stream does not need
 * them: release_idle() frees the parser, and the next feed() makes a new one and replays the
 * header's start tag (as received, with events off), which puts expat in the same state.
 * Offsets, lines and columns are carried over, so events and error texts are the same as
 * without the release (tests/test_xmlstream_differential.py releases at every chance). */

static int revive(Framer *self)
{
    if (setup_parser(self) < 0)
        return -1;
    const char *h = PyBytes_AS_STRING(self->header);
    Py_ssize_t n = PyBytes_GET_SIZE(self->header);
    self->replaying = 1;
    int rc = XML_Parse(self->p, h, (int)n, XML_FALSE);
    self->replaying = 0;
    if (rc != XML_STATUS_OK || (long long)XML_GetCurrentByteIndex(self->p) != (long long)n) {
        /* It parsed once; a second reading of the same bytes that differs would be a bug: fail
         * closed (an exception out of feed) rather than frame with a parser in another state. */
        PyErr_SetString(PyExc_RuntimeError, "xml framer: the stream header did not parse again");
        return -1;
    }
    unsigned long line = (unsigned long)XML_GetCurrentLineNumber(self->p);
    unsigned long column = (unsigned long)XML_GetCurrentColumnNumber(self->p);
    self->index_delta = self->fed - (long long)n;
    self->replay_line = line;
    self->line_delta = self->resume_line - line;
    self->col_delta = (long)self->resume_col - (long)column;
    self->released = 0;
    return 0;
}

static PyObject *Framer_release_idle(Framer *self, PyObject *noargs)
{
    (void)noargs;
    if (self->p == NULL || self->state != ST_OPEN || self->depth != 1 || self->len != 0
        || self->tok != self->fed || self->header == NULL || self->events != NULL)
        Py_RETURN_FALSE;
    unsigned long line = (unsigned long)XML_GetCurrentLineNumber(self->p);
    unsigned long column = (unsigned long)XML_GetCurrentColumnNumber(self->p);
    self->resume_line = stream_line(self, line);
    self->resume_col = stream_column(self, line, column);
    XML_ParserFree(self->p);
    self->p = NULL;
    self->released = 1;
    Py_RETURN_TRUE;
}

static PyObject *Framer_feed(Framer *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL;
    int borrowed_here = 0;
    if (self->p == NULL && !self->released) {
        PyErr_SetString(PyExc_RuntimeError, "Framer not initialised");
        goto done;
    }
    if (self->state == ST_STOPPED) {
        PyObject *t = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(self->trailing) + view.len);
        if (t == NULL)
            goto done;
        memcpy(PyBytes_AS_STRING(t), PyBytes_AS_STRING(self->trailing), PyBytes_GET_SIZE(self->trailing));
        memcpy(PyBytes_AS_STRING(t) + PyBytes_GET_SIZE(self->trailing), view.buf, view.len);
        Py_SETREF(self->trailing, t);
        result = PyList_New(0);
        goto done;
    }
    if (self->state != ST_OPEN || view.len == 0) {
        result = PyList_New(0);
        goto done;
    }
    if (self->events != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Framer.feed is not reentrant");
        goto done;
    }
    if (self->len == 0) {
        PyMem_Free(self->buf);
        self->buf = (char *)view.buf;
        self->len = self->cap = view.len;
        self->borrowed = borrowed_here = 1;
        self->feed_obj = arg;
    } else if (buf_append(self, view.buf, view.len) < 0) {
        goto done;
    }
    self->events = PyList_New(0);
    if (self->events == NULL)
        goto done;
    int complete = self->tok >= self->fed ? 1 : may_complete(self);
    if (complete < 0) {
        Py_CLEAR(self->events);
        goto done;
    }
    if (complete) {
        /* What expat has not seen yet: `data`, after the bytes held back before it if any.
         * Those are copied out of self->buf, which a failing handler frees. */
        PyObject *chunk = NULL;
        const char *s = view.buf;
        Py_ssize_t n = view.len;
        if (self->tok < self->fed) {
            Py_ssize_t from = (Py_ssize_t)(self->fed - self->base);
            chunk = PyBytes_FromStringAndSize(self->buf + from, self->len - from);
            if (chunk == NULL) {
                Py_CLEAR(self->events);
                goto done;
            }
            s = PyBytes_AS_STRING(chunk);
            n = PyBytes_GET_SIZE(chunk);
        }
        if (self->released && revive(self) < 0) {
            Py_XDECREF(chunk);
            Py_CLEAR(self->events);
            goto done;
        }
        self->fed = self->base + self->len;
        int rc = XML_STATUS_OK;
        /* pyexpat hands expat at most 1 MiB per call; so do we (XML_Parse takes an int). */
        while (rc == XML_STATUS_OK && n > 0) {
            int part = n > (1 << 20) ? (1 << 20) : (int)n;
            rc = XML_Parse(self->p, s, part, XML_FALSE);
            s += part;
            n -= part;
        }
        Py_XDECREF(chunk);
        if (!self->py_error)
            flush_run(self);
        if (self->py_error) {
            self->run_start = -1;
            Py_CLEAR(self->events);
            goto done;
        }
        if (rc != XML_STATUS_OK && !self->halted) {
            enum XML_Error code = XML_GetErrorCode(self->p);
            unsigned long line = (unsigned long)XML_GetErrorLineNumber(self->p);
            unsigned long column = (unsigned long)XML_GetErrorColumnNumber(self->p);
            fail_with(self, Py_BuildValue("(siLkk)", "expat", (int)code,
                                          (long long)XML_GetErrorByteIndex(self->p) + self->index_delta,
                                          stream_line(self, line), stream_column(self, line, column)));
        }
        if (self->state == ST_OPEN) {
            /* After XML_Parse returns, expat's current index is the start of the token it
             * could not finish (the end of the input if there is none). */
            long long index = (long long)XML_GetCurrentByteIndex(self->p);
            self->tok = index >= 0 ? index + self->index_delta : self->fed;
        }
    }
    if (self->state == ST_OPEN)
        compact_and_check(self);
    if (self->py_error) {
        Py_CLEAR(self->events);
        goto done;
    }
    result = self->events;
    self->events = NULL;
done:
    if (borrowed_here) {
        if (self->borrowed && unborrow(self, 0) < 0)
            Py_CLEAR(result);
        self->feed_obj = NULL;
    }
    PyBuffer_Release(&view);
    return result;
}

static PyObject *Framer_get_state(Framer *self, void *closure)
{
    (void)closure;
    PyObject *s = self->state == ST_OPEN ? s_open : self->state == ST_STOPPED ? s_stopped
                  : self->state == ST_CLOSED ? s_closed : s_failed;
    Py_INCREF(s);
    return s;
}

static PyObject *Framer_get_buffered(Framer *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->len);
}

static PyObject *Framer_get_trailing(Framer *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->trailing);
    return self->trailing;
}

static PyObject *Framer_get_routes(Framer *self, void *closure)
{
    (void)closure;
    PyObject *r = self->routes ? self->routes : Py_None;
    Py_INCREF(r);
    return r;
}

static int Framer_set_routes(Framer *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value != NULL && value != Py_None && !PyDict_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "routes must be a dict or None");
        return -1;
    }
    PyObject *r = (value == NULL || value == Py_None) ? NULL : value;
    Py_XINCREF(r);
    Py_XSETREF(self->routes, r);
    return 0;
}

static PyMethodDef Framer_methods[] = {
    {"feed", (PyCFunction)Framer_feed, METH_O,
     "feed(data) -> list of events completed by `data` (any split of the stream is fine)."},
    {"release_idle", (PyCFunction)Framer_release_idle, METH_NOARGS,
     "release_idle() -> whether the expat parser was freed until the next feed (only between "
     "first-level elements, with nothing buffered); events stay the same."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Framer_getset[] = {
    {"state", (getter)Framer_get_state, NULL, "open, stopped, closed or failed", NULL},
    {"buffered", (getter)Framer_get_buffered, NULL, "bytes held for an incomplete element", NULL},
    {"trailing", (getter)Framer_get_trailing, NULL, "bytes after a stop_after element", NULL},
    {"routes", (getter)Framer_get_routes, (setter)Framer_set_routes,
     "dict of (stanza name, from domainpart, to domainpart) whose stanzas leave as bytes, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Framer_members[] = {
    {"max_stanza_bytes", T_PYSSIZET, offsetof(Framer, max_stanza_bytes), 0,
     "size limit of one first-level element"},
    {"max_header_bytes", T_PYSSIZET, offsetof(Framer, max_header_bytes), 0,
     "size limit of the stream header, counted from the first byte"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Framer_slots[] = {
    {Py_tp_doc, "The expat side of XmlStreamParser (see proxy/xmlstream.py)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Framer_init},
    {Py_tp_dealloc, Framer_dealloc},
    {Py_tp_traverse, Framer_traverse},
    {Py_tp_clear, Framer_clear},
    {Py_tp_methods, Framer_methods},
    {Py_tp_getset, Framer_getset},
    {Py_tp_members, Framer_members},
    {0, NULL},
};

static PyType_Spec Framer_spec = {
    "proxy._xmlframe.Framer", sizeof(Framer), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, Framer_slots,
};

static PyObject *configure(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *node, *el, *opened, *closed, *make_error;
    if (!PyArg_ParseTuple(args, "OOOOO", &node, &el, &opened, &closed, &make_error))
        return NULL;
    if (!PyType_Check(el) || !PyType_Check(node)) {
        PyErr_SetString(PyExc_TypeError, "Node and Element must be types");
        return NULL;
    }
    Py_INCREF(node); Py_XSETREF(g_node_type, node);
    Py_INCREF(el); Py_XSETREF(g_element_type, el);
    Py_INCREF(opened); Py_XSETREF(g_opened_type, opened);
    Py_INCREF(closed); Py_XSETREF(g_closed_type, closed);
    Py_INCREF(make_error); Py_XSETREF(g_make_error, make_error);
    Py_RETURN_NONE;
}

static PyObject *expat_version(PyObject *module, PyObject *noargs)
{
    (void)module; (void)noargs;
    return PyUnicode_FromString(XML_ExpatVersion());
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Node, Element, StreamOpened, StreamClosed, make_error)"},
    {"expat_version", expat_version, METH_NOARGS, "the linked libexpat's version string"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "proxy._xmlframe",
    "XML stream framing over libexpat in C; use proxy.xmlstream, not this.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__xmlframe(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_ns, "ns");
    INTERN(s_name, "name");
    INTERN(s_attrs, "attrs");
    INTERN(s_children, "children");
    INTERN(s_span, "span");
    INTERN(s_raw, "raw");
    INTERN(s_open, "open");
    INTERN(s_stopped, "stopped");
    INTERN(s_closed, "closed");
    INTERN(s_failed, "failed");
#undef INTERN
    if ((s_empty_tuple = PyTuple_New(0)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    PyObject *tp = PyType_FromSpec(&Framer_spec);
    if (tp == NULL || PyModule_AddObject(m, "Framer", tp) < 0) {
        Py_XDECREF(tp);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
