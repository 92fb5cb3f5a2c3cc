"""Optimisers: SGD with momentum and Adam, updating parameter arrays in place.

The update rules live here (they are not gradients: the gradients come from the
generated backward passes). Every update is done in place with ``out=`` so the
parameters keep their dtype (float32 in training) and no array is re-allocated.

Both can shrink weights (parameters named ``*_w``, not biases) by
``lr(epoch) * weight_decay`` of themselves before each update: decoupled weight decay,
an update rule of the optimiser, not a gradient.

When the parameters and the gradients are :class:`train.flat.FlatArrays` of one layout
(as a network's are), the update runs once over their flat arrays, with the
optimiser's state joined the same way; otherwise array by array. The arithmetic on
each element is the same either way.

A step's part that reads no gradient (the decay of the momentum, or of Adam's moments)
can be run ahead with :meth:`Optimizer.prepare_step`: the training loop does so while
the gradients are being computed. The updates stay bit for bit the same.

Both optimisers follow a per-epoch learning-rate schedule,
``lr(epoch) = lr * lr_decay ** (epoch - 1)`` for epochs counted from 1; the training
loop calls :meth:`Optimizer.start_epoch` before each epoch. The schedule and the
state depend only on the epoch number and the step count, so
``state_dict()`` / ``load_state_dict()`` capture an optimiser exactly: a run resumed
from a checkpoint makes bit-for-bit the same updates as one that never stopped.
"""

from __future__ import annotations

import math

import numpy as np

from .flat import FlatArrays, joined

__all__ = ["OPTIMIZERS", "SGD", "Adam", "Optimizer", "build"]


class Optimizer:
    kind = ""
    _hyper: tuple[str, ...] = ("lr", "lr_decay", "weight_decay")

    def __init__(
        self,
        params: dict[str, np.ndarray],
        *,
        lr: float,
        lr_decay: float = 1.0,
        weight_decay: float = 0.0,
    ):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"the learning rate must be a positive number, got {lr}")
        if not (0 < lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if not (weight_decay >= 0):
            raise ValueError(f"weight_decay must be at least 0, got {weight_decay}")
        self.lr = float(lr)
        self.lr_decay = float(lr_decay)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.epoch = 0
        self.buffers: dict[str, np.ndarray] = {}
        self._joined: dict[str, FlatArrays] = {}  # see _joined_buffer
        self._works: dict[tuple, np.ndarray] = {}  # see _work
        self._names = list(params)
        self._prepared = False  # prepare_step() has run the next step's first part

    def _work(self, shape: tuple[int, ...], dtype, slot: int = 0) -> np.ndarray:
        """A work array of ``shape`` and ``dtype``, kept from step to step (not state: its
        contents mean nothing between steps).  Each one holds the result of the expression
        the update wrote before, in that expression's dtype, so the arithmetic is the same.

        A new temporary of a LeNet's size (250 KB) at every step costs more than the
        arithmetic on it: the C library returns the freed memory to the system, and the
        next step's temporary faults its pages in again (measured: the SGD update took
        0.12 ms with one, 0.04 ms without).
        """
        key = (slot, tuple(shape), np.dtype(dtype))
        work = self._works.get(key)
        if work is None:
            work = self._works[key] = np.empty(shape, dtype)
        return work

    def _buffer(self, key: str, like: np.ndarray) -> np.ndarray:
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = np.zeros_like(like)
        return buf

    def start_epoch(self, epoch: int) -> None:
        """Set the epoch (from 1) whose learning rate the following steps use."""
        self.epoch = int(epoch)

    @property
    def current_lr(self) -> float:
        return self.lr * self.lr_decay ** max(self.epoch - 1, 0)

    def _joined_buffer(self, prefix: str, params: FlatArrays) -> np.ndarray:
        """The state ``prefix + name`` of every parameter as one flat array (a FlatArrays
        laid out like ``params``, whose views are the entries of ``buffers``)."""
        state = self._joined.get(prefix)
        fits = state is not None and state.layout == params.layout
        if fits:
            fits = all(self.buffers.get(prefix + name) is view for name, view in state.items())
        if not fits:
            # First use, or the entries were replaced (load_state_dict): joined afresh.
            state = FlatArrays(params.shapes(), params.flat.dtype)
            for name in params:
                kept = self.buffers.get(prefix + name)
                if kept is not None:
                    state[name] = kept
                self.buffers[prefix + name] = dict.__getitem__(state, name)
            self._joined[prefix] = state
        return state.flat

    def prepare_step(self, params: dict[str, np.ndarray]) -> None:
        """Run now the part of the next :meth:`step` that reads no gradient (SGD: the
        momentum's decay, ``v *= mu``; Adam: ``m *= b1`` and ``v *= b2``); that step then
        does the rest.  The same operations in the same order: the updates are bit for bit
        those of step() alone.

        A training loop calls it while the gradients are being computed (with worker
        processes, while it waits for theirs), where the optimiser's state would
        otherwise be read and written after they are in.  It touches the optimiser's
        state only, never ``params`` (the passes may still be reading them); a state
        saved between the two calls would be half a step (state_dict() refuses it).
        """
        if self._prepared:
            raise RuntimeError("prepare_step() was called twice without a step() between")
        self._each(params, None, self._decay)
        self._prepared = True

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        if not self._prepared:
            self._each(params, None, self._decay)
        self._prepared = False
        self.step_count += 1
        if self.weight_decay:
            shrink = 1.0 - self.current_lr * self.weight_decay
            for name in self._names:
                if name.endswith("_w"):
                    params[name] *= params[name].dtype.type(shrink)
        self._each(params, grads, self._update)

    def _each(self, params, grads, rule) -> None:
        """``rule(state, param, grad)`` on every parameter (grad None when ``grads`` is)."""
        flats = joined(params) if grads is None else joined(params, grads)
        if flats is not None:
            # One update of all the parameters at once: the same arithmetic on every
            # element as the update of each array below, in a few calls instead of a
            # few per array (train.flat).
            param = flats[0]
            grad = None if grads is None else flats[1]
            rule(lambda prefix: self._joined_buffer(prefix, params), param, grad)
            return
        for name in self._names:
            param = params[name]
            rule(
                lambda prefix, name=name, param=param: self._buffer(prefix + name, param),
                param,
                # any array-like, as the written-out rules took
                None if grads is None else np.asarray(grads[name]),
            )

    def _decay(self, state, param, grad):  # pragma: no cover - abstract
        """The part of the update of ``param`` that reads no gradient (``grad`` is None):
        it changes the state ``state(prefix)`` only."""
        raise NotImplementedError

    def _update(self, state, param, grad):  # pragma: no cover - abstract
        """The rest of the update (after _decay): ``param`` in place, from ``grad`` and its
        optimiser state ``state(prefix)``."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self._hyper}

    def state_dict(self) -> dict:
        """``{"kind", "hyper", "step", "epoch", "buffers"}``; buffers are copies."""
        if self._prepared:
            raise RuntimeError(
                "the optimiser is between prepare_step() and step(): its state is half a "
                "step; save it after the step"
            )
        return {
            "kind": self.kind,
            "hyper": self.hyperparameters(),
            "step": self.step_count,
            "epoch": self.epoch,
            "buffers": {key: buf.copy() for key, buf in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"optimiser state is for {state.get('kind')!r}, not {self.kind!r}")
        for name, value in state["hyper"].items():
            if name not in self._hyper:
                raise ValueError(f"unknown {self.kind} hyperparameter {name!r} in the state")
            setattr(self, name, float(value))
        self.step_count = int(state["step"])
        self.epoch = int(state["epoch"])
        self._prepared = False
        self.buffers = {key: np.array(buf, copy=True) for key, buf in state["buffers"].items()}


class SGD(Optimizer):
    """SGD with momentum: ``v = mu v - lr g``, ``p += v``.

    The momentum ``mu`` rises linearly from ``momentum_start`` to ``momentum`` over the
    first ``momentum_steps`` steps (0.5 -> 0.95 by default): a small momentum while
    the gradients are large and erratic, a large one later. With the default
    ``lr_decay = 0.5`` the learning rate halves every epoch.
    """

    kind = "sgd"
    _hyper = ("lr", "lr_decay", "weight_decay", "momentum", "momentum_start", "momentum_steps")

    def __init__(
        self,
        params,
        *,
        lr: float = 0.1,
        lr_decay: float = 0.5,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        momentum_start: float = 0.5,
        momentum_steps: float = 500,
    ):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay)
        if not (0 <= momentum_start <= 1 and 0 <= momentum < 1):
            raise ValueError("momentum must be in [0, 1)")
        self.momentum = float(momentum)
        self.momentum_start = float(momentum_start)
        self.momentum_steps = float(momentum_steps)

    @property
    def current_momentum(self) -> float:
        if self.momentum_steps <= 0:
            return self.momentum
        t = min(self.step_count / self.momentum_steps, 1.0)
        return self.momentum_start + (self.momentum - self.momentum_start) * t

    def step(self, params, grads):
        self._lr_now = self.current_lr
        super().step(params, grads)

    def _decay(self, state, param, grad):
        v = state("")
        # mu rises with the count of steps taken before this one.
        v *= param.dtype.type(self.current_momentum)

    def _update(self, state, param, grad):
        v = state("")
        lr = param.dtype.type(self._lr_now)
        # lr * grad, in its own dtype (a NumPy scalar of the parameters' type times grad).
        v -= np.multiply(grad, lr, out=self._work(grad.shape, np.result_type(lr, grad)))
        param += v


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr_t m / (sqrt(v) + eps_t)`` with ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)``
    and ``eps_t = eps sqrt(1 - b2^t)`` (the same update as ``p -= lr m^ / (sqrt(v^) + eps)``
    with the bias-corrected moments m^ and v^).
    """

    kind = "adam"
    _hyper = ("lr", "lr_decay", "weight_decay", "beta1", "beta2", "eps")

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        lr_decay: float = 1.0,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def step(self, params, grads):
        t = self.step_count + 1
        c2 = math.sqrt(1.0 - self.beta2**t)
        self._lr_t = self.current_lr * c2 / (1.0 - self.beta1**t)
        self._eps_t = self.eps * c2
        super().step(params, grads)

    def _decay(self, state, param, grad):
        f = param.dtype.type
        m, v = state("m/"), state("v/")
        m *= f(self.beta1)
        v *= f(self.beta2)

    def _update(self, state, param, grad):
        f = param.dtype.type
        m = state("m/")
        v = state("v/")
        # (1 - b) * grad and (1 - b) * grad**2 in the dtype those expressions have.
        term = self._work(grad.shape, np.result_type(f(1.0), grad))
        square = self._work(grad.shape, grad.dtype, slot=1)
        m += np.multiply(grad, f(1.0 - self.beta1), out=term)
        np.multiply(grad, grad, out=square)
        v += np.multiply(square, f(1.0 - self.beta2), out=term)
        denom = np.sqrt(v, out=self._work(v.shape, v.dtype, slot=2))
        denom += f(self._eps_t)
        np.divide(m, denom, out=denom)
        denom *= f(self._lr_t)
        param -= denom


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam}


def build(kind: str, params: dict[str, np.ndarray], **hyper) -> Optimizer:
    try:
        cls = OPTIMIZERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown optimiser {kind!r}; choose one of: {', '.join(OPTIMIZERS)}"
        ) from None
    return cls(params, **hyper)
