"""Worker processes that run the other parts of a batch: data parallelism across cores.

A network built with ``threads=k`` (k > 1) cuts each batch into k contiguous parts and
computes part 0 itself while k - 1 worker processes compute the others, each through
its own copy of the network's generated layers. Processes rather than Python threads:
NumPy releases the GIL inside its loops, but the generated layers allocate large
arrays, and in one process the threads' page faults and mmap/munmap calls wait on one
another (measured here: two threads ran a LeNet step no faster than one). Separate
processes share nothing but the memory set up for them.

Shared memory, anonymous mappings made before the workers are forked:

- the parameters: the network's own (a :class:`train.flat.FlatArrays` that it keeps
  in a shared mapping from the start), which the optimiser updates in place between
  steps, so nothing is copied to the workers;
- per worker: its part's images and labels, its outputs (probabilities or logits) and
  its gradients (multiplied by its part's weight), a FlatArrays laid out like the
  parameters.

Each request and each reply is a few numbers in the worker's control block in that
memory, announced by releasing a semaphore: the request's (kind of pass, images, the
parent's floating-point error settings, the part's weight) by the parent, the reply's
(status, loss) by the worker. A process that waits tries the semaphore for a short
while before it blocks on it (``_POLL_SECONDS``). A pipe per worker carries what does
not fit in numbers: an error's traceback, and labels that are not integers. Each worker
holds BLAS to one thread, as the parent does while the parts run: the parts already keep
every core busy. The workers are forked with that limit already set, so that they never
start a BLAS thread pool (see _blas_at_one_thread_here).

The workers are started with ``fork`` (POSIX), lazily, on the first call that needs
them, with room for the largest part seen so far; a larger part restarts them.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import mmap
import multiprocessing
import multiprocessing.util
import os
import signal
import time
import traceback
import warnings
import weakref

import numpy as np
from threadpoolctl import ThreadpoolController

from .flat import FlatArrays

__all__ = ["PartWorkers", "WorkerFailed", "one_blas_thread", "parallel_supported"]

_BLAS = None  # a threadpoolctl controller, made on first use (it scans the loaded libraries)


_blas_depth = 0  # how many one_blas_thread() contexts this process is in


@contextlib.contextmanager
def one_blas_thread():
    """A context in which BLAS uses one thread.

    Nested in another, it leaves the limit alone: setting it and putting it back takes
    about 10 us, which the training loop's steps would otherwise pay every time."""
    global _BLAS, _blas_depth
    if _blas_depth:
        limit = contextlib.nullcontext()
    else:
        if _BLAS is None:
            _BLAS = ThreadpoolController()
        limit = _BLAS.limit(limits=1, user_api="blas")
    with limit:
        _blas_depth += 1
        try:
            yield
        finally:
            _blas_depth -= 1


def _blas_at_one_thread_here() -> None:
    """BLAS at one thread for the rest of this (worker) process, set only if it is not
    already: the worker is forked at one thread (PartWorkers.ensure), and setting the
    limit again would start OpenBLAS's thread pool, emptied by the fork.  Its thread
    then spins, waiting for work that never comes, for about 0.1 s before it sleeps,
    on one of the cores the two processes compute on: measured on a 2-core AMD EPYC,
    LeNet's first 10 steps at 64 images took 8-15 ms instead of about 4."""
    blas = (_BLAS or ThreadpoolController()).select(user_api="blas")
    # threadpoolctl reports None where it cannot read the count: then the limit is set.
    if any(
        library.num_threads is None or library.num_threads > 1 for library in blas.lib_controllers
    ):
        blas.limit(limits=1)


def parallel_supported() -> bool:
    """Whether worker processes can be forked here (not on Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


# How long a waiting process keeps trying to take the semaphore of the message it waits
# for (a try is a few hundred nanoseconds, without a system call) before it blocks on it.
# A blocked process is woken by the kernel when the semaphore is released, which took
# about 30 us here, as did a message through a pipe (which the exchange used before,
# polled: about 30 us to send and 30 us to receive each message, measured on a 2-core
# AMD EPYC).  A tried semaphore answers within a microsecond.  The waits inside a training
# step are shorter than this (the parent's update and the next batch, or the slower
# part), so a step never blocks; between epochs the wait blocks after this long.
_POLL_SECONDS = 2e-3
# A blocked wait wakes this often to see whether the other process is still there.
_CHECK_SECONDS = 0.1


def _poll_seconds(processes: int) -> float:
    """The polling time for ``processes`` processes: none when they do not each have a
    core of their own, where polling would take time from the process it waits for."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return _POLL_SECONDS if cores >= processes else 0.0


def _take(semaphore, poll_seconds: float, alive) -> bool:
    """Take ``semaphore``: True once it is taken, False if ``alive()`` (the process that
    would release it is still there) turns False first.

    Tries without blocking for ``poll_seconds``, then blocks, waking every
    ``_CHECK_SECONDS`` to ask ``alive()``.
    """
    deadline = time.perf_counter() + poll_seconds
    while time.perf_counter() < deadline:
        if semaphore.acquire(False):
            return True
    while True:
        if semaphore.acquire(timeout=_CHECK_SECONDS):
            return True
        if not alive():
            # One last try: it may have released the semaphore just before it went.
            return semaphore.acquire(False)


class WorkerFailed(RuntimeError):
    """A worker process raised an error or died."""


_LABELS = np.dtype(np.int64)  # class labels travel in shared memory as int64

# A request in the control block: _REQUEST_SLOTS int64 numbers.
_KINDS = ("forward", "step", "logits", "backward", "close")
_NO_LABELS, _SHARED_LABELS, _PIPED_LABELS = 0, 1, 2  # where the request's labels are
# np.seterr's settings, in the order of the request's last four slots.
_ERROR_CATEGORIES = ("divide", "over", "under", "invalid")
_ERROR_MODES = ("ignore", "warn", "raise", "call", "print", "log")
_KIND, _COUNT, _LABEL_PLACE, _ERRORS = 0, 1, 2, 3
# Then the factor the part's gradients are multiplied by (a float64's bits).
_WEIGHT = _ERRORS + len(_ERROR_CATEGORIES)
_REQUEST_SLOTS = _WEIGHT + 1
# A reply: its status (int64), then the part's mean loss (float64).
_OK, _FAILED = 0, 1
# Request and reply each have a cache line of their own: the parent writes one, the
# worker the other.
_CONTROL_BYTES = 128
# The request's int64 slots fill the first half at most, the reply starts at the second.
assert _REQUEST_SLOTS * 8 <= _CONTROL_BYTES // 2


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


class _Layout:
    """Where each worker's arrays live in the shared mapping (offsets in bytes)."""

    def __init__(self, params, dtype, workers, capacity, image_shape, outputs):
        self.dtype = np.dtype(dtype)
        self.params_layout = params.layout
        self.shapes = dict(params.layout)
        self.capacity, self.image_shape, self.outputs = capacity, tuple(image_shape), outputs
        item = self.dtype.itemsize
        self.image_bytes = capacity * math.prod(image_shape) * item
        self.output_bytes = capacity * outputs * item
        self.label_bytes = capacity * _LABELS.itemsize
        self.grad_bytes = FlatArrays.size_of(self.shapes) * item
        # Each block starts on a multiple of 64 bytes: aligned for NumPy's and BLAS's
        # vector loads, and no cache line is shared by two blocks.
        self.worker_bytes = sum(
            _aligned(size)
            for size in (
                _CONTROL_BYTES,
                self.image_bytes,
                self.output_bytes,
                self.label_bytes,
                self.grad_bytes,
            )
        )
        self.workers = workers
        self.total = workers * self.worker_bytes

    def fits(self, params, dtype, capacity, image_shape, outputs) -> bool:
        return (
            np.dtype(dtype) == self.dtype
            and params.layout == self.params_layout
            and capacity <= self.capacity
            and tuple(image_shape) == self.image_shape
            and outputs == self.outputs
        )


class _Views:
    """NumPy views of the shared mapping: each worker's control block (request and reply),
    images, labels, outputs and gradients."""

    def __init__(self, buffer, layout: _Layout):
        self.requests, self.replies = [], []
        self.images, self.labels, self.outputs, self.grads = [], [], [], []
        memory = memoryview(buffer)
        offset = 0

        def block(size):
            nonlocal offset
            piece = memory[offset : offset + size]
            offset += _aligned(size)
            return piece

        for _ in range(layout.workers):
            control = np.frombuffer(block(_CONTROL_BYTES), dtype=np.int64)
            self.requests.append(control[:_REQUEST_SLOTS])
            self.replies.append(control[_CONTROL_BYTES // 16 :])
            images = np.frombuffer(block(layout.image_bytes), dtype=layout.dtype)
            self.images.append(images.reshape(-1, *layout.image_shape))
            outputs = np.frombuffer(block(layout.output_bytes), dtype=layout.dtype)
            self.outputs.append(outputs.reshape(-1, layout.outputs))
            self.labels.append(np.frombuffer(block(layout.label_bytes), dtype=_LABELS))
            self.grads.append(FlatArrays(layout.shapes, layout.dtype, block(layout.grad_bytes)))


def _request_errors(request) -> dict[str, str]:
    """The np.seterr settings a request carries."""
    return {
        category: _ERROR_MODES[int(request[_ERRORS + i])]
        for i, category in enumerate(_ERROR_CATEGORIES)
    }


def _weighted_backward(net, grads, request) -> None:
    """The part's gradients times the request's weight, into ``grads``.

    The parent adds the parts' weighted gradients; the product made here, while the
    parent is still busy with its own part, is one pass less between its receiving the
    replies and its next request (the same multiplication, so the same bits)."""
    net.backward(out=grads)
    weight = float(request[_WEIGHT : _WEIGHT + 1].view(np.float64)[0])
    np.multiply(grads.flat, weight, out=grads.flat)


def _worker_main(
    connection,
    parent_ends,
    build_network,
    params,
    buffer,
    layout,
    index,
    semaphores,
    poll_seconds,
):
    """A worker's loop: one request in, one reply out, until a close request or until
    the parent is gone."""
    # Ctrl-C and SIGTERM are the parent's to handle (it stops the run and keeps its
    # checkpoint); it then closes the workers, or its exit leaves them without a parent,
    # which ends this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    # The parent's ends of this worker's pipe and of earlier workers' pipes came along
    # with the fork: closed here, the parent is their only holder.
    for end in parent_ends:
        end.close()
    _blas_at_one_thread_here()
    net = build_network()
    views = _Views(buffer, layout)
    # The parent's parameters, in the shared mapping it made them in: the optimiser
    # updates them in place, while this worker waits for its next request.
    net.params = params
    images, outputs, grads = views.images[index], views.outputs[index], views.grads[index]
    request, reply, shared_labels = views.requests[index], views.replies[index], views.labels[index]
    loss_slot = reply[1:2].view(np.float64)
    asked, answered = semaphores

    def parent_alive():
        return os.getppid() == parent

    while True:
        if not _take(asked, poll_seconds, parent_alive):
            return
        kind = _KINDS[int(request[_KIND])]
        if kind == "close":
            return
        count, place = int(request[_COUNT]), int(request[_LABEL_PLACE])
        status, loss = _OK, 0.0
        try:
            labels = None
            if place == _SHARED_LABELS:
                labels = shared_labels[:count]
            elif place == _PIPED_LABELS:
                labels = connection.recv()
            with np.errstate(**_request_errors(request)):
                if kind in ("forward", "step"):
                    loss, out = net.forward(images[:count], labels)
                    outputs[:count] = out
                    if kind == "step":
                        _weighted_backward(net, grads, request)
                elif kind == "logits":
                    outputs[:count] = net.logits(images[:count])
                else:  # backward
                    _weighted_backward(net, grads, request)
        except BaseException:
            status = _FAILED
            try:
                # Through the pipe before the reply is announced: the parent reads it then.
                connection.send(traceback.format_exc())
            except OSError:  # the parent is gone: nothing to tell
                return
        loss_slot[0] = loss
        reply[0] = status
        answered.release()


# Every PartWorkers not yet garbage-collected, stopped by _close_all() when Python exits.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _close_all() -> None:
    """Stop every set of workers still running.

    Registered after multiprocessing.util's exit function (imported above), so it runs
    first (atexit runs the last registered first).  That function would otherwise
    terminate() the daemonic workers and join them, but a worker ignores SIGTERM (the
    parent handles it) and waits on its pipe, which the waiting parent still holds open:
    a script that used a network with threads > 1 and did not close it never exited.
    """
    for workers in list(_LIVE):
        workers.close()


atexit.register(_close_all)


class PartWorkers:
    """``count`` worker processes, each running one part of every batch for a network.

    ``build_network()`` makes the worker's own network (one thread) in the worker.
    """

    def __init__(self, build_network, count: int, name: str):
        self.build_network, self.count, self.name = build_network, count, name
        self.layout: _Layout | None = None
        self.processes, self.connections = [], []
        self.semaphores = []  # per worker: (request announced, reply announced)
        self.buffer = None
        self.views: _Views | None = None
        self.pending: list[int] = []
        self.pending_kind = ""
        self.poll_seconds = _poll_seconds(count + 1)
        _LIVE.add(self)

    # -- life cycle ---------------------------------------------------------------------

    def ensure(self, params, dtype, capacity, image_shape, outputs) -> None:
        """Workers running with room for ``capacity`` images of ``image_shape`` per part.

        ``params`` is a FlatArrays in memory that forked processes share (its values are
        read by the workers, in place, at every call)."""
        if self.layout is not None and self.layout.fits(
            params, dtype, capacity, image_shape, outputs
        ):
            return
        if self.layout is not None:
            capacity = max(capacity, self.layout.capacity)
        self.close()
        self.layout = _Layout(params, dtype, self.count, capacity, image_shape, outputs)
        self.buffer = mmap.mmap(-1, max(1, self.layout.total))
        self.views = _Views(self.buffer, self.layout)
        context = multiprocessing.get_context("fork")
        # Forked with BLAS at one thread, which the workers keep (_blas_at_one_thread_here).
        with one_blas_thread(), warnings.catch_warnings():
            # Python 3.12+ warns that forking a multi-threaded process may deadlock.
            # The only other threads here are BLAS's (OpenBLAS re-initialises its
            # pool in the child through pthread_atfork) and the worker runs no
            # code that could wait on a lock held by them.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            for index in range(self.count):
                parent_end, child_end = context.Pipe()
                parent_ends = [*self.connections, parent_end]
                semaphores = (context.Semaphore(0), context.Semaphore(0))
                # Forked, not pickled: the child inherits the mapping itself.
                process = context.Process(
                    target=_worker_main,
                    args=(
                        child_end,
                        parent_ends,
                        self.build_network,
                        params,
                        self.buffer,
                        self.layout,
                        index,
                        semaphores,
                        self.poll_seconds,
                    ),
                    name=f"cnnderive-{self.name}-part{index + 1}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self.processes.append(process)
                self.connections.append(parent_end)
                self.semaphores.append(semaphores)

    def close(self) -> None:
        """Stop the workers and release the shared memory."""
        connections, processes, buffer = self.connections, self.processes, self.buffer
        views, semaphores = self.views, self.semaphores
        self.processes, self.connections, self.semaphores, self.pending = [], [], [], []
        self.views, self.buffer, self.layout = None, None, None
        for index, connection in enumerate(connections):
            # A worker busy with a part reads this once it has answered.
            views.requests[index][_KIND] = _KINDS.index("close")
            semaphores[index][0].release()
            connection.close()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        if buffer is not None:
            try:
                buffer.close()
            except BufferError:
                # A view of the mapping is still alive (say, in the traceback of the
                # exception that brought us here): the memory goes when the view does.
                pass

    # -- one round ------------------------------------------------------------------------

    def send(
        self,
        kind: str,
        counts: list[int],
        labels: list | None = None,
        weights: list[float] | None = None,
    ) -> None:
        """Ask worker i to run ``kind`` on its first ``counts[i]`` images (and labels).

        ``weights[i]``: the factor worker i multiplies its gradients by, for the kinds
        that compute them ("step", "backward"); 1 if None."""
        errors = np.geterr()
        error_modes = [_ERROR_MODES.index(errors[category]) for category in _ERROR_CATEGORIES]
        self.pending, self.pending_kind = [], kind
        for index, count in enumerate(counts):
            request = self.views.requests[index]
            part_labels = None if labels is None else np.asarray(labels[index])
            if part_labels is None:
                place = _NO_LABELS
            elif part_labels.dtype.kind in "iu":
                # Class labels go through shared memory: a pickled array in a message
                # took about 30 us a step.
                self.views.labels[index][:count] = part_labels
                place = _SHARED_LABELS
            else:
                place = _PIPED_LABELS
                try:
                    self.connections[index].send(part_labels)
                except OSError:  # the worker is gone (killed between two calls, say)
                    failure = self._death(index)
                    self.close()
                    raise WorkerFailed(
                        f"a worker of the {self.name} network failed:\n{failure}"
                    ) from None
            request[_KIND], request[_COUNT], request[_LABEL_PLACE] = (
                _KINDS.index(kind),
                count,
                place,
            )
            request[_ERRORS:_WEIGHT] = error_modes
            request[_WEIGHT : _WEIGHT + 1].view(np.float64)[0] = (
                1.0 if weights is None else weights[index]
            )
            # Released last: the worker reads the request once it takes the semaphore.
            self.semaphores[index][0].release()
            self.pending.append(index)

    def _death(self, index: int) -> str:
        self.processes[index].join(timeout=5)
        return f"worker process {index + 1} died (exit code {self.processes[index].exitcode})"

    def receive(self) -> list:
        """The replies of the last :meth:`send`, in the workers' order: each part's mean
        loss for a forward pass or a step, else None."""
        replies, failures = [], []
        for index in self.pending:
            reply = self.views.replies[index]
            if not _take(
                self.semaphores[index][1], self.poll_seconds, self.processes[index].is_alive
            ):
                failures.append(self._death(index))
                replies.append(None)
                continue
            if reply[0] != _OK:
                try:
                    failures.append(self.connections[index].recv())
                except (EOFError, OSError):
                    failures.append(self._death(index))
                replies.append(None)
                continue
            with_loss = self.pending_kind in ("forward", "step")
            replies.append(float(reply[1:2].view(np.float64)[0]) if with_loss else None)
        self.pending = []
        if failures:
            self.close()  # a dead or confused worker: start afresh on the next call
            raise WorkerFailed(f"a worker of the {self.name} network failed:\n{failures[0]}")
        return replies
