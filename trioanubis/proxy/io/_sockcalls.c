/* The data path's hottest system calls, without the socket module's wrapping: the relay's recv and
   send, and (Linux) the listener's accept.

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

Built with the compiled modules (setup.py) where there is a C compiler and
POSIX sockets; trioanubis/proxy/io/sockcalls.py chooses it at import, and the
socket methods everywhere else. Not a test of anything: what it returns is
tested against the socket module's behaviour (tests/test_io.py).
*/

#define _GNU_SOURCE  /* accept4 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

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

/* recv_into(sock, fd, buffer) -> int: bytes read into `buffer`, 0 at EOF, -1 when none are there
   (EAGAIN). `sock` is the socket object `fd` belongs to: only the fallback uses it (sockcalls.py). */
static PyObject *
recv_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, error;
    Py_buffer view;
    ssize_t received;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "recv_into(sock, fd, buffer) takes 3 arguments");
        return NULL;
    }
    if (as_fd(args[1], &fd) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    do {
        received = recv(fd, view.buf, (size_t)view.len, MSG_DONTWAIT);
    } while (received < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    error = errno;  /* before anything else may change it */
    PyBuffer_Release(&view);
    return answer(received, error, -1);
}

/* send(sock, fd, buffer, count) -> int: bytes of buffer[:count] the socket took, 0 when it took none
   (EAGAIN). */
static PyObject *
send_(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, error;
    Py_buffer view;
    Py_ssize_t count;
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
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (count < 0 || count > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "count must be within the buffer");
        return NULL;
    }
    do {
        sent = send(fd, view.buf, (size_t)count, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    error = errno;
    PyBuffer_Release(&view);
    return answer(sent, error, 0);
}

#ifdef __linux__
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

/* accept_inet(fd) -> (client_fd, (host, port)): accept4 on an IPv4 listening socket, the client's
   socket non-blocking and close-on-exec from the start (the socket module's accept makes it
   blocking, and setblocking(False) costs a system call more). Errors raise as the socket module's
   accept does (BlockingIOError for EAGAIN). Linux only: elsewhere the module has no accept_inet. */
static PyObject *
accept_inet(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int fd, client;
    struct sockaddr_in addr;
    socklen_t length = sizeof(addr);
    char host[16];
    PyObject *peer, *result;

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
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (addr.sin_family != AF_INET || length < (socklen_t)sizeof(addr)) {
        close(client);
        PyErr_SetString(PyExc_ValueError, "accept_inet: not an IPv4 socket");
        return NULL;
    }
    dotted((const unsigned char *)&addr.sin_addr.s_addr, host);
    peer = Py_BuildValue("(si)", host, (int)ntohs(addr.sin_port));
    result = peer == NULL ? NULL : Py_BuildValue("(iN)", client, peer);
    if (result == NULL) {
        close(client);
    }
    return result;
}
#endif

static PyMethodDef methods[] = {
    {"recv_into", (PyCFunction)(void (*)(void))recv_into, METH_FASTCALL,
     "recv_into(sock, fd, buffer) -> bytes read, 0 at EOF, -1 when none are there (EAGAIN)"},
    {"send", (PyCFunction)(void (*)(void))send_, METH_FASTCALL,
     "send(sock, fd, buffer, count) -> bytes of buffer[:count] sent, 0 when the socket took none (EAGAIN)"},
#ifdef __linux__
    {"accept_inet", (PyCFunction)(void (*)(void))accept_inet, METH_FASTCALL,
     "accept_inet(fd) -> (client_fd, (host, port)), the client's socket non-blocking"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sockcalls",
    .m_doc = "The relay's recv and send on non-blocking sockets, keeping the GIL (see sockcalls.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__sockcalls(void)
{
    return PyModule_Create(&module);
}
