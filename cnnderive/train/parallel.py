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
  its gradients, a FlatArrays laid out like the parameters.

The loss and control messages go through a pipe per worker; a process waiting for one
polls the pipe for a short while before it blocks (``_POLL_SECONDS``). Each worker holds
BLAS to one thread, as the parent does while the parts run: the parts already keep
every core busy.

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
from threadpoolctl import ThreadpoolController, threadpool_limits

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


def parallel_supported() -> bool:
    """Whether worker processes can be forked here (not on Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


# How long a process that waits for a message polls its pipe before it blocks on it.  A
# blocked process is woken by the kernel when the message arrives, which took about 50 us
# per message here; polling answers at once.  The waits inside a training step are shorter
# than this (the parent's update and the next batch, or the slower part), so a step never
# blocks; between epochs the wait ends in a blocking read after this long.  Measured on a
# 2-core AMD EPYC: 2-4 % more images/s for seed and lenet at batch 64.
_POLL_SECONDS = 2e-3


def _poll_seconds(processes: int) -> float:
    """The polling time for ``processes`` processes: none when they do not each have a
    core of their own, where polling would take time from the process it waits for."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return _POLL_SECONDS if cores >= processes else 0.0


def _await_message(connection, seconds: float) -> None:
    """Return when ``connection`` has a message to read, or after ``seconds`` of polling
    (the caller's recv() then blocks until one arrives)."""
    if seconds <= 0.0:
        return
    deadline = time.perf_counter() + seconds
    while not connection.poll(0):
        if time.perf_counter() > deadline:
            return


class WorkerFailed(RuntimeError):
    """A worker process raised an error or died."""


_LABELS = np.dtype(np.int64)  # class labels travel in shared memory as int64
_SHARED = "shared"  # in a message: the labels are in the worker's shared block


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
            for size in (self.image_bytes, self.output_bytes, self.label_bytes, self.grad_bytes)
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
    """NumPy views of the shared mapping: each worker's images, labels, outputs and gradients."""

    def __init__(self, buffer, layout: _Layout):
        self.images, self.labels, self.outputs, self.grads = [], [], [], []
        memory = memoryview(buffer)
        offset = 0

        def block(size):
            nonlocal offset
            piece = memory[offset : offset + size]
            offset += _aligned(size)
            return piece

        for _ in range(layout.workers):
            images = np.frombuffer(block(layout.image_bytes), dtype=layout.dtype)
            self.images.append(images.reshape(-1, *layout.image_shape))
            outputs = np.frombuffer(block(layout.output_bytes), dtype=layout.dtype)
            self.outputs.append(outputs.reshape(-1, layout.outputs))
            self.labels.append(np.frombuffer(block(layout.label_bytes), dtype=_LABELS))
            self.grads.append(FlatArrays(layout.shapes, layout.dtype, block(layout.grad_bytes)))


def _worker_main(
    connection, parent_ends, build_network, params, buffer, layout, index, poll_seconds
):
    """A worker's loop: one message in, one reply out, until the pipe closes."""
    # Ctrl-C and SIGTERM are the parent's to handle (it stops the run and keeps its
    # checkpoint); its exit closes the pipe, which ends this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The parent's ends of this worker's pipe and of earlier workers' pipes came along
    # with the fork: closed here, the parent is their only holder, and its exit (even by
    # SIGKILL) ends this loop with EOF instead of leaving the worker waiting forever.
    for end in parent_ends:
        end.close()
    threadpool_limits(1, user_api="blas")
    net = build_network()
    views = _Views(buffer, layout)
    # The parent's parameters, in the shared mapping it made them in: the optimiser
    # updates them in place, while this worker waits for its next message.
    net.params = params
    images, outputs, grads = views.images[index], views.outputs[index], views.grads[index]
    shared_labels = views.labels[index]
    while True:
        try:
            _await_message(connection, poll_seconds)
            message = connection.recv()
        except (EOFError, OSError):
            return
        kind, count, labels, errors = message
        if kind == "close":
            return
        if isinstance(labels, str):  # _SHARED: written into shared memory by the parent
            labels = shared_labels[:count]
        try:
            with np.errstate(**errors):
                if kind in ("forward", "step"):
                    loss, out = net.forward(images[:count], labels)
                    outputs[:count] = out
                    if kind == "step":
                        net.backward(out=grads)
                    reply = ("ok", loss)
                elif kind == "logits":
                    outputs[:count] = net.logits(images[:count])
                    reply = ("ok", None)
                elif kind == "backward":
                    net.backward(out=grads)
                    reply = ("ok", None)
                else:
                    reply = ("error", f"unknown message {kind!r}")
        except BaseException:
            reply = ("error", traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:  # the parent is gone or stopped listening (Ctrl-C): nothing to tell
            return


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
        self.buffer = None
        self.views: _Views | None = None
        self.pending: list[int] = []
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
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a multi-threaded process may deadlock.
            # The only other threads here are BLAS's (OpenBLAS re-initialises its
            # pool in the child through pthread_atfork) and the worker runs no
            # code that could wait on a lock held by them.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            for index in range(self.count):
                parent_end, child_end = context.Pipe()
                parent_ends = [*self.connections, parent_end]
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
                        self.poll_seconds,
                    ),
                    name=f"cnnderive-{self.name}-part{index + 1}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self.processes.append(process)
                self.connections.append(parent_end)

    def close(self) -> None:
        """Stop the workers and release the shared memory."""
        connections, processes, buffer = self.connections, self.processes, self.buffer
        self.processes, self.connections, self.pending = [], [], []
        self.views, self.buffer, self.layout = None, None, None
        for connection in connections:
            try:
                connection.send(("close", 0, None, {}))
            except (OSError, ValueError):
                pass
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

    def send(self, kind: str, counts: list[int], labels: list | None = None) -> None:
        """Ask worker i to run ``kind`` on its first ``counts[i]`` images (and labels)."""
        errors = np.geterr()
        self.pending = []
        for index, count in enumerate(counts):
            part_labels = None if labels is None else np.asarray(labels[index])
            if part_labels is not None and part_labels.dtype.kind in "iu":
                # Class labels go through shared memory: a pickled array in the message
                # took about 30 us a step.
                self.views.labels[index][:count] = part_labels
                part_labels = _SHARED
            try:
                self.connections[index].send((kind, count, part_labels, errors))
            except OSError:  # the worker is gone (killed between two calls, say)
                failure = self._death(index)
                self.close()
                raise WorkerFailed(
                    f"a worker of the {self.name} network failed:\n{failure}"
                ) from None
            self.pending.append(index)

    def _death(self, index: int) -> str:
        self.processes[index].join(timeout=5)  # its pipe closes just before it exits
        return f"worker process {index + 1} died (exit code {self.processes[index].exitcode})"

    def receive(self) -> list:
        """The replies of the last :meth:`send`, in the workers' order."""
        replies, failures = [], []
        for index in self.pending:
            try:
                _await_message(self.connections[index], self.poll_seconds)
                status, value = self.connections[index].recv()
            except (EOFError, OSError):
                status, value = "error", self._death(index)
            if status != "ok":
                failures.append(value)
            replies.append(value)
        self.pending = []
        if failures:
            self.close()  # a dead or confused worker: start afresh on the next call
            raise WorkerFailed(f"a worker of the {self.name} network failed:\n{failures[0]}")
        return replies
