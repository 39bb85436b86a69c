/* The data path's hottest system calls, without the socket module's wrapping: the relay's recv and
   send, the connect to a server, and (Linux) the listener's accept.

Theory of operation: the socket module's `recv_into` and `send` drop the GIL
around every call (a blocking socket may wait in it), parse their arguments
with a format string, and report EAGAIN by raising BlockingIOError. The
relay's sockets are non-blocking and only read or written after readiness
said so, so each call returns at once: here the GIL is kept, arguments come
as a vector (METH_FASTCALL), and EAGAIN is a return value, not an exception.
Errors are the socket module's: `PyErr_SetFromErrno(PyExc_OSError)` raises the
same OSError subclass (ConnectionResetError, BrokenPipeError, ...).

The listener's accept (Linux, IPv4) is `accept4` with SOCK_NONBLOCK: the
socket module's accept gives a blocking socket, and making it non-blocking
costs one system call more per connection. The listening socket is
non-blocking (Trio waits for it), so this returns at once too.

The epoll backend's `epoll_ctl` (Linux) is the system call with its four
numbers: `select.epoll`'s `register` and `modify` parse keyword arguments
and are called as methods, twice a connection. Its `epoll_ready` takes the
ready list as one int per descriptor, the descriptor and three bits.

The connect to an IPv4 server (`connect_inet`) is the socket's options, its
connect and, over loopback, the check that it finished inside connect, in
one call: through the socket module those were four method calls, each
parsing its arguments, `connect_ex` parsing the address and dropping the GIL,
and `getpeername` formatting the peer's address only to be thrown away.

Built with the compiled modules (setup.py) where there is a C compiler and
POSIX sockets; trioanubis/proxy/io/sockcalls.py chooses it at import, and the
socket methods everywhere else. Not a test of anything: what it returns is
tested against the socket module's behaviour (tests/test_io.py).
*/

#define _GNU_SOURCE  /* accept4 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0  /* macOS: Python ignores SIGPIPE anyway */
#endif

static int
as_fd(PyObject *arg, int *fd)
{
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < 0 || value > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "a file descriptor must be a non-negative int");
        return -1;
    }
    *fd = (int)value;
    return 0;
}

/* What a recv or send that returned `result` (errno `error`) answers: the count; `again` for EAGAIN;
   NULL when a signal handler raised (EINTR) or for the socket module's OSError subclass. */
static PyObject *
answer(ssize_t result, int error, long again)
{
    if (result >= 0) {
        return PyLong_FromSsize_t(result);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (error == EAGAIN || error == EWOULDBLOCK) {
        return PyLong_FromLong(again);
    }
    errno = error;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* The bytes of `obj`, a contiguous buffer (writable for `writable`), as (*data, *length), held until
   `put_bytes`. A memoryview (the relay's scratch and unsent bytes) is read in place: its own view
   is what a buffer request would copy out of it, and PyObject_GetBuffer and PyBuffer_Release
   around each call cost more than a loopback recv's Python side (about 190 instructions a call).
   Held as memory_getbuf holds it, by counting an export, so that a signal handler run while the
   call is retried after EINTR cannot release the view (and free its bytes) under it: release()
   then raises BufferError, as it does while any buffer is exported. Anything else, and a
   released, strided or read-only-for-a-write view, goes through the buffer protocol, which raises
   what the socket module's methods raise. *held: 1 for `view`, 2 for the memoryview's export. */
static int
get_bytes(PyObject *obj, int writable, char **data, Py_ssize_t *length, Py_buffer *view, int *held)
{
#ifdef _Py_MEMORYVIEW_RELEASED
    if (PyMemoryView_Check(obj)) {
        PyMemoryViewObject *memory = (PyMemoryViewObject *)obj;
        if (!(memory->flags & _Py_MEMORYVIEW_RELEASED) && (memory->flags & _Py_MEMORYVIEW_C)
            && !(writable && memory->view.readonly)) {
            memory->exports++;
            *data = (char *)memory->view.buf;
            *length = memory->view.len;
            *held = 2;
            return 0;
        }
    }
#endif
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        return -1;
    }
    *data = (char *)view->buf;
    *length = view->len;
    *held = 1;
    return 0;
}

/* Give back what get_bytes held. */
static void
put_bytes(PyObject *obj, Py_buffer *view, int held)
{
#ifdef _Py_MEMORYVIEW_RELEASED
    if (held == 2) {
        ((PyMemoryViewObject *)obj)->exports--;
        return;
    }
#endif
    PyBuffer_Release(view);
}

/* recv_into(sock, fd, buffer) -> int: bytes read into `buffer`, 0 at EOF, -1 when none are there
   (EAGAIN). `sock` is the socket object `fd` belongs to: only the fallback uses it (sockcalls.py). */
static PyObject *
recv_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, error, held;
    Py_buffer view;
    char *data;
    Py_ssize_t length;
    ssize_t received;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "recv_into(sock, fd, buffer) takes 3 arguments");
        return NULL;
    }
    if (as_fd(args[1], &fd) < 0) {
        return NULL;
    }
    if (get_bytes(args[2], 1, &data, &length, &view, &held) < 0) {
        return NULL;
    }
    do {
        received = recv(fd, data, (size_t)length, MSG_DONTWAIT);
    } while (received < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    error = errno;  /* before anything else may change it */
    put_bytes(args[2], &view, held);
    return answer(received, error, -1);
}

/* send(sock, fd, buffer, count) -> int: bytes of buffer[:count] the socket took, 0 when it took none
   (EAGAIN). */
static PyObject *
send_(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, error, held;
    Py_buffer view;
    char *data;
    Py_ssize_t length, count;
    ssize_t sent;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send(sock, fd, buffer, count) takes 4 arguments");
        return NULL;
    }
    if (as_fd(args[1], &fd) < 0) {
        return NULL;
    }
    count = PyLong_AsSsize_t(args[3]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (get_bytes(args[2], 0, &data, &length, &view, &held) < 0) {
        return NULL;
    }
    if (count < 0 || count > length) {
        put_bytes(args[2], &view, held);
        PyErr_SetString(PyExc_ValueError, "count must be within the buffer");
        return NULL;
    }
    do {
        sent = send(fd, data, (size_t)count, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    error = errno;
    put_bytes(args[2], &view, held);
    return answer(sent, error, 0);
}

/* connect_inet(sock, fd, sockaddr, delay_ack, at_once) -> int: set TCP_NODELAY (and TCP_QUICKACK off
   when `delay_ack`), then connect the non-blocking socket `fd` to `sockaddr`, an IPv4 (host, port)
   with a dotted host. Answers as connect_ex: 0 when connected, EINPROGRESS while it goes on, else
   the error's number; with `at_once`, a loopback connect that finished inside connect() answers 0
   (one getpeername: the kernel runs a loopback handshake within the call when it can). A failed
   option raises the socket module's OSError. */
static PyObject *
connect_inet(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, delay_ack, at_once, result, error, on = 1;
    long port;
    const char *host;
    Py_ssize_t host_length;
    struct sockaddr_in addr;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "connect_inet(sock, fd, sockaddr, delay_ack, at_once) takes 5 arguments");
        return NULL;
    }
    if (as_fd(args[1], &fd) < 0) {
        return NULL;
    }
    if (!PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 2) {
        PyErr_SetString(PyExc_TypeError, "connect_inet: sockaddr must be a (host, port) tuple");
        return NULL;
    }
    host = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(args[2], 0), &host_length);
    if (host == NULL) {
        return NULL;
    }
    if ((size_t)host_length != strlen(host)) {
        PyErr_SetString(PyExc_TypeError, "connect_inet: host name must not contain null character");
        return NULL;
    }
    port = PyLong_AsLong(PyTuple_GET_ITEM(args[2], 1));
    if (port == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "connect_inet: port must be 0-65535.");
        return NULL;
    }
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "connect_inet: %R is not a dotted IPv4 address", PyTuple_GET_ITEM(args[2], 0));
        return NULL;
    }
    if ((delay_ack = PyObject_IsTrue(args[3])) < 0 || (at_once = PyObject_IsTrue(args[4])) < 0) {
        return NULL;
    }
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
#ifdef TCP_QUICKACK
    if (delay_ack) {
        int off = 0;
        if (setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &off, sizeof(off)) < 0) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
#endif
    result = connect(fd, (struct sockaddr *)&addr, sizeof(addr));
    error = result < 0 ? errno : 0;
    if (error == EINTR) {
        /* A non-blocking connect interrupted goes on asynchronously (CPython's issue 23618). */
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
        error = EINPROGRESS;
    }
    if (error == EINPROGRESS && at_once && (ntohl(addr.sin_addr.s_addr) >> 24) == 127) {
        struct sockaddr_in peer;
        socklen_t length = sizeof(peer);
        if (getpeername(fd, (struct sockaddr *)&peer, &length) == 0) {
            error = 0;
        }
    }
    return PyLong_FromLong(error);
}

#ifdef __linux__
/* epoll_ctl(epfd, op, fd, events) -> None: the system call, for the epoll backend's `register` and
   `modify` (the event's data is `fd`, as select.epoll gives it). Errors raise as select.epoll's do
   (FileExistsError for EEXIST, ...). Linux only. */
static PyObject *
epoll_ctl_(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int epfd, fd, op;
    long operation;
    unsigned long events;
    struct epoll_event event;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "epoll_ctl(epfd, op, fd, events) takes 4 arguments");
        return NULL;
    }
    if (as_fd(args[0], &epfd) < 0 || as_fd(args[2], &fd) < 0) {
        return NULL;
    }
    operation = PyLong_AsLong(args[1]);
    if (operation == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (operation != EPOLL_CTL_ADD && operation != EPOLL_CTL_MOD) {
        PyErr_SetString(PyExc_ValueError, "epoll_ctl: op must be EPOLL_CTL_ADD or EPOLL_CTL_MOD");
        return NULL;
    }
    op = (int)operation;
    events = PyLong_AsUnsignedLong(args[3]);
    if (events == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (events > 0xffffffffUL) {
        PyErr_SetString(PyExc_OverflowError, "epoll_ctl: events must fit in 32 bits");
        return NULL;
    }
    event.events = (uint32_t)events;
    event.data.u64 = 0;
    event.data.fd = fd;
    if (epoll_ctl(epfd, op, fd, &event) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* What epoll_ready packs beside a descriptor, and the epoll events behind each: Linux's values. */
#define READY_READ 1     /* EPOLLIN, EPOLLRDHUP, EPOLLHUP, EPOLLERR: a read will not wait */
#define READY_WRITE 2    /* EPOLLOUT, EPOLLHUP, EPOLLERR: a send will not wait */
#define READY_HUNG_UP 4  /* EPOLLRDHUP, EPOLLHUP, EPOLLERR: the peer closed or the socket failed */
#define READY_SHIFT 3
#define READY_MAX_EVENTS 1024

/* epoll_ready(epfd, maxevents) -> list[int]: the ready list, taken without waiting (timeout 0), an
   int per descriptor: fd << 3 | READY_READ | READY_WRITE | READY_HUNG_UP (the bits its events
   set). select.epoll's poll builds a tuple of two ints per event with a format string, half of
   the dispatcher's cost for a keep-alive request; one int per event is what the dispatcher
   reads. `maxevents` is 1 to 1024. Errors raise as select.epoll's poll does. Linux only. */
static PyObject *
epoll_ready(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int epfd, count, i;
    long maxevents;
    struct epoll_event events[READY_MAX_EVENTS];
    PyObject *ready;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "epoll_ready(epfd, maxevents) takes 2 arguments");
        return NULL;
    }
    if (as_fd(args[0], &epfd) < 0) {
        return NULL;
    }
    maxevents = PyLong_AsLong(args[1]);
    if (maxevents == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (maxevents < 1 || maxevents > READY_MAX_EVENTS) {
        PyErr_SetString(PyExc_ValueError, "epoll_ready: maxevents must be 1 to 1024");
        return NULL;
    }
    do {
        count = epoll_wait(epfd, events, (int)maxevents, 0);
    } while (count < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    if (count < 0) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    ready = PyList_New(count);
    if (ready == NULL) {
        return NULL;
    }
    for (i = 0; i < count; i++) {
        uint32_t got = events[i].events;
        long bits = ((got & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) ? READY_READ : 0)
                    | ((got & (EPOLLOUT | EPOLLHUP | EPOLLERR)) ? READY_WRITE : 0)
                    | ((got & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) ? READY_HUNG_UP : 0);
        PyObject *entry = PyLong_FromLong(((long)events[i].data.fd << READY_SHIFT) | bits);
        if (entry == NULL) {
            Py_DECREF(ready);
            return NULL;
        }
        PyList_SET_ITEM(ready, i, entry);
    }
    return ready;
}

/* Dotted decimal, as inet_ntop writes it (the socket module's accept uses inet_ntop, which formats
   with sprintf: a fifth of the cost of an accept's Python side). `out` holds at least 16 bytes. */
static void
dotted(const unsigned char *octets, char *out)
{
    for (int i = 0; i < 4; i++) {
        unsigned int value = octets[i];
        if (value >= 100) {
            *out++ = (char)('0' + value / 100);
        }
        if (value >= 10) {
            *out++ = (char)('0' + value / 10 % 10);
        }
        *out++ = (char)('0' + value % 10);
        *out++ = i < 3 ? '.' : '\0';
    }
}

/* accept_inet(fd) -> (client_fd, (host, port)), or None when no client is waiting (EAGAIN):
   accept4 on an IPv4 listening socket, the client's socket non-blocking and close-on-exec from the
   start (the socket module's accept makes it blocking, and setblocking(False) costs a system call
   more). An empty backlog is an answer, not an exception: the accept loop ends on it at every
   wake-up, and a raised BlockingIOError cost ~5,000 instructions there. Other errors raise as the
   socket module's accept does. Linux only: elsewhere the module has no accept_inet. */
static PyObject *
accept_inet(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, client;
    struct sockaddr_in addr;
    socklen_t length = sizeof(addr);
    char host[16];
    PyObject *peer, *result, *item;

    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "accept_inet(fd) takes 1 argument");
        return NULL;
    }
    if (as_fd(args[0], &fd) < 0) {
        return NULL;
    }
    do {
        client = accept4(fd, (struct sockaddr *)&addr, &length, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (client < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    if (client < 0) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            Py_RETURN_NONE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (addr.sin_family != AF_INET || length < (socklen_t)sizeof(addr)) {
        close(client);
        PyErr_SetString(PyExc_ValueError, "accept_inet: not an IPv4 socket");
        return NULL;
    }
    /* The tuples built directly: Py_BuildValue parses its format string at every call, 1,175
       instructions of a connection's 87,000 for these two. */
    dotted((const unsigned char *)&addr.sin_addr.s_addr, host);
    peer = PyTuple_New(2);
    result = PyTuple_New(2);
    if (peer == NULL || result == NULL) {
        goto fail;
    }
    PyTuple_SET_ITEM(result, 1, peer);  /* the result owns it from here: freeing the result frees it */
    item = PyUnicode_DecodeASCII(host, (Py_ssize_t)strlen(host), NULL);
    if (item == NULL) {
        goto fail_result;
    }
    PyTuple_SET_ITEM(peer, 0, item);
    item = PyLong_FromLong((long)ntohs(addr.sin_port));
    if (item == NULL) {
        goto fail_result;
    }
    PyTuple_SET_ITEM(peer, 1, item);
    item = PyLong_FromLong((long)client);
    if (item == NULL) {
        goto fail_result;
    }
    PyTuple_SET_ITEM(result, 0, item);
    return result;
fail:
    Py_XDECREF(peer);
fail_result:
    Py_XDECREF(result);
    close(client);
    return NULL;
}

/* listen_backlog(sock, fd) -> the clients waiting in a TCP listening socket's accept queue, -1 when
   `fd` is no TCP listening socket (or the kernel will not say). Linux's TCP_INFO on a listening
   socket puts the queue's length in tcpi_unacked. The listener counts before it accepts, because
   an accept into an empty queue is the dearest call it makes: the kernel makes the new socket's
   file before it looks at the queue, and frees it again (3.8 us of system time here, against
   0.5 for this). `sock` is the socket object `fd` belongs to: only the fallback uses it
   (sockcalls.py). Linux only: elsewhere the module has no listen_backlog. */
static PyObject *
listen_backlog(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    struct tcp_info info;
    socklen_t length = sizeof(info);

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "listen_backlog(sock, fd) takes 2 arguments");
        return NULL;
    }
    if (as_fd(args[1], &fd) < 0) {
        return NULL;
    }
    memset(&info, 0, sizeof(info));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) < 0
        || length < (socklen_t)(offsetof(struct tcp_info, tcpi_unacked) + sizeof(info.tcpi_unacked))
        || info.tcpi_state != TCP_LISTEN) {
        return PyLong_FromLong(-1);
    }
    return PyLong_FromUnsignedLong((unsigned long)info.tcpi_unacked);
}
#endif

static PyMethodDef methods[] = {
    {"recv_into", (PyCFunction)(void (*)(void))recv_into, METH_FASTCALL,
     "recv_into(sock, fd, buffer) -> bytes read, 0 at EOF, -1 when none are there (EAGAIN)"},
    {"send", (PyCFunction)(void (*)(void))send_, METH_FASTCALL,
     "send(sock, fd, buffer, count) -> bytes of buffer[:count] sent, 0 when the socket took none (EAGAIN)"},
    {"connect_inet", (PyCFunction)(void (*)(void))connect_inet, METH_FASTCALL,
     "connect_inet(sock, fd, (host, port), delay_ack, at_once) -> 0, EINPROGRESS or the error's number"},
#ifdef __linux__
    {"epoll_ctl", (PyCFunction)(void (*)(void))epoll_ctl_, METH_FASTCALL,
     "epoll_ctl(epfd, op, fd, events) -> None: EPOLL_CTL_ADD (1) or EPOLL_CTL_MOD (3), data = fd"},
    {"epoll_ready", (PyCFunction)(void (*)(void))epoll_ready, METH_FASTCALL,
     "epoll_ready(epfd, maxevents) -> [fd << 3 | read 1 | write 2 | hung up 4, ...], without waiting"},
    {"accept_inet", (PyCFunction)(void (*)(void))accept_inet, METH_FASTCALL,
     "accept_inet(fd) -> (client_fd, (host, port)), the client's socket non-blocking; None: none waiting"},
    {"listen_backlog", (PyCFunction)(void (*)(void))listen_backlog, METH_FASTCALL,
     "listen_backlog(sock, fd) -> clients waiting in a TCP listening socket's accept queue, -1: no such socket"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sockcalls",
    .m_doc = "The data path's socket calls on non-blocking sockets, keeping the GIL (see sockcalls.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__sockcalls(void)
{
    return PyModule_Create(&module);
}
