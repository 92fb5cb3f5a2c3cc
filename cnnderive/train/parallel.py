"""Worker processes that run the other parts of a batch: data parallelism across cores.

A network built with ``threads=k`` (k > 1) cuts each batch into k contiguous parts and
computes part 0 itself while k - 1 worker processes compute the others, each through
its own copy of the network's generated layers. Processes rather than Python threads:
NumPy releases the GIL inside its loops, but the generated layers allocate large
arrays, and in one process the threads' page faults and mmap/munmap calls wait on one
another (measured here: two threads ran a LeNet step no faster than one). Separate
processes share nothing but the memory set up for them.

Shared memory, one anonymous mapping made before the workers are forked:

- the parameters, written by the parent before every forward pass;
- per worker: its part's images, its outputs (probabilities or logits) and its
  gradients, laid out like the parameters.

Labels, the loss and control messages go through a pipe per worker; a process waiting
for one polls the pipe for a short while before it blocks (``_POLL_SECONDS``). Each worker holds
BLAS to one thread, as the parent does while the parts run: the parts already keep
every core busy.

The workers are started with ``fork`` (POSIX), lazily, on the first call that needs
them, with room for the largest part seen so far; a larger part restarts them.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import time
import traceback
import warnings

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_limits

__all__ = ["PartWorkers", "WorkerFailed", "one_blas_thread", "parallel_supported"]

_BLAS = None  # a threadpoolctl controller, made on first use (it scans the loaded libraries)


def one_blas_thread():
    """A context in which BLAS uses one thread."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


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


class _Layout:
    """Where each array lives in the shared mapping (offsets in elements of ``dtype``)."""

    def __init__(self, params, dtype, workers, capacity, image_shape, outputs):
        self.dtype = np.dtype(dtype)
        self.names = list(params)
        self.shapes = {name: params[name].shape for name in self.names}
        self.param_size = sum(params[name].size for name in self.names)
        self.capacity, self.image_shape, self.outputs = capacity, tuple(image_shape), outputs
        self.image_size = capacity * int(np.prod(image_shape))
        self.output_size = capacity * outputs
        self.worker_size = self.image_size + self.output_size + self.param_size
        self.workers = workers
        self.total = self.param_size + workers * self.worker_size

    def fits(self, params, dtype, capacity, image_shape, outputs) -> bool:
        return (
            np.dtype(dtype) == self.dtype
            and list(params) == self.names
            and capacity <= self.capacity
            and tuple(image_shape) == self.image_shape
            and outputs == self.outputs
        )


class _Views:
    """NumPy views of the shared mapping, for the parent or for worker ``index``."""

    def __init__(self, buffer, layout: _Layout):
        flat = np.frombuffer(buffer, dtype=layout.dtype, count=layout.total)
        self.params = self._split(flat[: layout.param_size], layout)
        self.images, self.outputs, self.grads = [], [], []
        offset = layout.param_size
        for _ in range(layout.workers):
            block = flat[offset : offset + layout.worker_size]
            self.images.append(block[: layout.image_size].reshape(-1, *layout.image_shape))
            self.outputs.append(
                block[layout.image_size : layout.image_size + layout.output_size].reshape(
                    -1, layout.outputs
                )
            )
            self.grads.append(self._split(block[layout.image_size + layout.output_size :], layout))
            offset += layout.worker_size

    @staticmethod
    def _split(flat, layout):
        arrays, offset = {}, 0
        for name in layout.names:
            size = int(np.prod(layout.shapes[name]))
            arrays[name] = flat[offset : offset + size].reshape(layout.shapes[name])
            offset += size
        return arrays


def _worker_main(connection, parent_ends, build_network, buffer, layout, index, poll_seconds):
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
    # The network reads the parameters the parent writes before each call, in place.
    net.params = views.params
    images, outputs, grads = views.images[index], views.outputs[index], views.grads[index]
    while True:
        try:
            _await_message(connection, poll_seconds)
            message = connection.recv()
        except (EOFError, OSError):
            return
        kind, count, labels, errors = message
        if kind == "close":
            return
        try:
            with np.errstate(**errors):
                if kind in ("forward", "step"):
                    loss, out = net.forward(images[:count], labels)
                    outputs[:count] = out
                    if kind == "step":
                        for name, value in net.backward().items():
                            grads[name][...] = value
                    reply = ("ok", loss)
                elif kind == "logits":
                    outputs[:count] = net.logits(images[:count])
                    reply = ("ok", None)
                elif kind == "backward":
                    for name, value in net.backward().items():
                        grads[name][...] = value
                    reply = ("ok", None)
                else:
                    reply = ("error", f"unknown message {kind!r}")
        except BaseException:
            reply = ("error", traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:  # the parent is gone or stopped listening (Ctrl-C): nothing to tell
            return


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

    # -- life cycle ---------------------------------------------------------------------

    def ensure(self, params, dtype, capacity, image_shape, outputs) -> None:
        """Workers running with room for ``capacity`` images of ``image_shape`` per part."""
        if self.layout is not None and self.layout.fits(
            params, dtype, capacity, image_shape, outputs
        ):
            return
        if self.layout is not None:
            capacity = max(capacity, self.layout.capacity)
        self.close()
        self.layout = _Layout(params, dtype, self.count, capacity, image_shape, outputs)
        self.buffer = mmap.mmap(-1, max(1, self.layout.total * self.layout.dtype.itemsize))
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
        """Ask worker i to run ``kind`` on its first ``counts[i]`` images."""
        errors = np.geterr()
        self.pending = []
        for index, count in enumerate(counts):
            part_labels = None if labels is None else labels[index]
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
