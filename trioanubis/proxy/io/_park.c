/* A parked task's await, without the two Python frames of Trio's `wait_task_rescheduled`
 * (woken.py's `parking`, which says when this is used).
 *
 * `await wait_task_rescheduled(abort)` runs, at each park and again at each wake-up, Trio's
 * `wait_task_rescheduled` coroutine and its `_real_async_yield` generator, makes a
 * `WaitTaskRescheduled(abort)` message (an attrs-frozen object) and unwraps the outcome it is
 * woken with: four Python calls a task step. A `Park` holds the message, made once, and is the
 * await itself: its first step yields the message to Trio's run loop (as `_real_async_yield`
 * does), and the value Trio sends when it reschedules the task ends it, unwrapped (the shared
 * wake-up, `woken`, answers None without a call). It keeps no state between the two, so one
 * `Park` serves any number of tasks parked at once.
 *
 * The await protocol, each way CPython and mypyc drive an awaitable: `am_await` (the await
 * itself), `tp_iternext` (the first step), `am_send` (a resumption, PEP 380's send: None is the
 * first step again) and a `send` method (what the interpreter calls instead of `am_send` when a
 * trace function is set). An exception thrown into the awaiting coroutine is raised in it: no
 * `throw`, so the interpreter and mypyc raise it in the awaiting frame, as for any iterator
 * without one. A StopIteration the unwrap raises is a RuntimeError (PEP 479), as it is when it ends
 * Trio's coroutine.
 *
 * Keeping no state, it cannot tell a first step from a resumption with None: a task rescheduled
 * with None instead of an outcome (which Trio's `reschedule` never sends; Trio's function would
 * raise AttributeError) parks again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *message; /* what the first step yields: Trio's WaitTaskRescheduled(abort) */
    PyObject *woken;   /* the wake-up answered with None without unwrapping it */
} Park;

static PyObject *
park_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *message, *woken;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "Park() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO:Park", &message, &woken)) {
        return NULL;
    }
    Park *self = (Park *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(message);
    Py_INCREF(woken);
    self->message = message;
    self->woken = woken;
    return (PyObject *)self;
}

static int
park_traverse(Park *self, visitproc visit, void *arg)
{
    Py_VISIT(self->message);
    Py_VISIT(self->woken);
    return 0;
}

static int
park_clear(Park *self)
{
    Py_CLEAR(self->message);
    Py_CLEAR(self->woken);
    return 0;
}

static void
park_dealloc(Park *self)
{
    PyObject_GC_UnTrack(self);
    park_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
park_await(PyObject *self)
{
    Py_INCREF(self);
    return self;
}

static PyObject *
park_next(Park *self)
{
    if (self->message == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a cleared Park");
        return NULL;
    }
    Py_INCREF(self->message);
    return self->message;
}

static PyObject *unwrap_name; /* "unwrap", interned at import */

/* PEP 479, as at the end of Trio's `wait_task_rescheduled` coroutine: a StopIteration the unwrap
 * raises is a RuntimeError, never the await's return value (which the `send` method's callers, the
 * interpreter from 3.12 or under a trace function, and mypyc, would otherwise make of it). */
static void
stop_iteration_to_runtime_error(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *stop = PyErr_GetRaisedException();
    PyErr_SetString(PyExc_RuntimeError, "coroutine raised StopIteration");
    PyObject *error = PyErr_GetRaisedException();
    PyException_SetCause(error, Py_NewRef(stop));
    PyException_SetContext(error, stop);
    PyErr_SetRaisedException(error);
#else
    PyObject *type, *stop, *tb;
    PyErr_Fetch(&type, &stop, &tb);
    PyErr_NormalizeException(&type, &stop, &tb);
    if (tb != NULL) {
        PyException_SetTraceback(stop, tb);
    }
    Py_DECREF(type);
    Py_XDECREF(tb);
    PyErr_SetString(PyExc_RuntimeError, "coroutine raised StopIteration");
    PyObject *etype, *error, *etb;
    PyErr_Fetch(&etype, &error, &etb);
    PyErr_NormalizeException(&etype, &error, &etb);
    PyException_SetCause(error, Py_NewRef(stop));
    PyException_SetContext(error, stop);
    PyErr_Restore(etype, error, etb);
#endif
}

static PySendResult
park_am_send(Park *self, PyObject *arg, PyObject **result)
{
    if (arg == Py_None) {
        *result = park_next(self);
        return *result == NULL ? PYGEN_ERROR : PYGEN_NEXT;
    }
    if (arg == self->woken) {
        Py_INCREF(Py_None);
        *result = Py_None;
        return PYGEN_RETURN;
    }
    *result = PyObject_CallMethodNoArgs(arg, unwrap_name);
    if (*result == NULL) {
        if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
            stop_iteration_to_runtime_error();
        }
        return PYGEN_ERROR;
    }
    return PYGEN_RETURN;
}

static PyObject *
park_send(Park *self, PyObject *arg)
{
    PyObject *result;
    switch (park_am_send(self, arg, &result)) {
    case PYGEN_NEXT:
        return result;
    case PYGEN_RETURN:
        if (result == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        } else {
            /* StopIteration(result) made first, so a tuple or an exception is the value itself */
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
        }
        Py_DECREF(result);
        return NULL;
    default:
        return NULL;
    }
}

static PyMethodDef park_methods[] = {
    {"send", (PyCFunction)park_send, METH_O, "send(value): None yields Trio's message; else the wake-up's value"},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods park_async = {
    .am_await = park_await,
    .am_send = (sendfunc)park_am_send,
};

static PyTypeObject ParkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "trioanubis.proxy.io._park.Park",
    .tp_doc = "Park(message, woken): an await that parks the task with Trio's `message` (see _park.c)",
    .tp_basicsize = sizeof(Park),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = park_new,
    .tp_traverse = (traverseproc)park_traverse,
    .tp_clear = (inquiry)park_clear,
    .tp_dealloc = (destructor)park_dealloc,
    .tp_as_async = &park_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)park_next,
    .tp_methods = park_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_park",
    .m_doc = "A parked task's await without Trio's two Python frames (see woken.py's `parking`).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__park(void)
{
    unwrap_name = PyUnicode_InternFromString("unwrap");
    if (unwrap_name == NULL) {
        return NULL;
    }
    if (PyType_Ready(&ParkType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&ParkType);
    if (PyModule_AddObject(m, "Park", (PyObject *)&ParkType) < 0) {
        Py_DECREF(&ParkType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
