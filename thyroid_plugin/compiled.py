"""``torch.compile`` of a served network, built beside the requests and never in their way.

:class:`CompiledNetworks` compiles (inductor, frozen weights) a network for a few fixed batch
sizes, one after the other, in a background thread or synchronously, and hands each compiled
network over once it has been traced and warmed up. Until then, and for batch sizes it does not
cover, the caller runs its eager network: no request ever waits for a compilation.

Why it is safe beside eager forwards of the same model in another thread:

- the compilation traces, freezes and warms up a private copy of the network, so no tensor is
  touched by two threads;
- served parameters never require grad (:func:`freeze_for_serving`). With gradients on,
  autocast keeps a process-wide cache of the low-precision copies of leaf tensors that require
  grad, guarded by one mutex; freeing that cache at ``autocast.__exit__`` drops tensors whose
  grad accumulators need the GIL, while a tracing thread that holds the GIL waits on the same
  mutex to cast: a lock-order inversion that hung the server (the issue's thread dump). Without
  gradients the cache is never filled, and its mutex is never held while the GIL is wanted;
- one compilation at a time in a process: inductor's ``freezing`` setting is process-wide and is
  set only while a compilation traces;
- no plain ``torch.fx`` symbolic trace runs in the compiling thread. While an FX tracer traces,
  ``torch.nn.Module.__call__`` and ``__getattr__`` are replaced process-wide by its hooks. The
  tracers of AOT autograd and of inductor's pattern matcher (``make_fx``) pass the calls of
  modules they do not trace straight through, but the plain ``torch.fx.Tracer`` raises
  ``NameError: module is not installed as a submodule`` in every other thread's forward:
  inductor symbolically traces a placeholder function once per process, at its first code
  generation, and an eager forward at that moment answered HTTP 500 (CI, a cold start).
  :meth:`CompiledNetworks.start` runs that one-time trace before the thread starts, on the
  thread that serves the eager forwards (:func:`prepare_for_background_compilation`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .runtime import autocast

__all__ = ["CompiledNetworks", "freeze_for_serving", "prepare_for_background_compilation"]

logger = logging.getLogger(__name__)

# inductor's settings are process-wide: one compilation at a time sets and restores them
_COMPILE_LOCK = threading.Lock()


def freeze_for_serving(network: nn.Module) -> nn.Module:
    """Evaluation mode and no parameter requiring grad (see the module's docstring: serving
    must never fill autocast's weight-cast cache). Returns ``network``."""
    network.eval()
    network.requires_grad_(False)
    return network


def prepare_for_background_compilation() -> None:
    """Run, here and now, the one-time work of a first compilation in this process that would
    break forwards running in other threads during a background compilation: inductor's
    placeholder module, built by a plain ``torch.fx`` symbolic trace (cached for the process) at
    its first code generation (see the module's docstring). Call it where no forward runs
    concurrently. A ``torch`` without that helper has nothing to prepare."""
    try:
        from torch._inductor.loop_body import InterpreterShim
    except ImportError:
        return
    dummy = getattr(InterpreterShim, "_dummy_gm", None)
    if callable(dummy):
        dummy()


class CompiledNetworks:
    """Compiled copies of ``network`` for inputs ``(B, 3, size, size)``, ``B`` in ``batch_sizes``.

    Args:
        network: the served network (evaluation mode, no grad); it is copied, never changed.
        device: where it runs.
        dtype: autocast dtype (``None``: fp32).
        image_size: the network's input size ``size``.
        batch_sizes: batch sizes to compile, in this order (the first is served first).
        channels_last: inputs are NHWC-contiguous, as requests make theirs.

    :meth:`runner` returns the compiled network for a batch size once it is ready (``None``
    before, and for sizes it does not cover); :meth:`costs` says what an image costs in each
    ready size, measured after its warm-up against the eager batch-1 forward of the same weights
    in the same rounds (a ratio, so the machine's drift cancels); :attr:`status` is ``"compiling"``, ``"ready"``
    (all sizes), ``"off"`` or ``"failed: <reason>"`` (the sizes compiled before the failure stay
    in use). A compiled network must be called from one thread at a time (the predictor's model
    thread); it needs ``torch.inference_mode`` and the same autocast as its warm-up.
    """

    def __init__(self, network: nn.Module, device: torch.device, dtype: Optional[torch.dtype], image_size: int,
                 batch_sizes: Sequence[int] = (1,), channels_last: bool = True) -> None:
        self._network = network
        self.device = device
        self.dtype = dtype
        self.image_size = int(image_size)
        self.batch_sizes = tuple(dict.fromkeys(int(b) for b in batch_sizes))
        self.channels_last = channels_last
        self._runners: dict[int, Callable] = {}
        self.status = "compiling" if self.batch_sizes else "off"
        self.seconds: dict[int, float] = {}
        self.ms_per_image: dict[int, float] = {}
        self._costs: dict[int, float] = {}
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        if not self.batch_sizes:
            self._finished.set()

    # -------------------------------------------------------------------------------- reading
    def runner(self, batch_size: int) -> Optional[Callable]:
        """The compiled network for ``batch_size`` if it is ready, else ``None``."""
        return self._runners.get(batch_size)

    def ready_sizes(self) -> list[int]:
        """Batch sizes served by a compiled network now, ascending."""
        return sorted(self._runners)

    def costs(self) -> dict[int, float]:
        """Per-image time of each ready batch size relative to the eager batch-1 forward
        (``0.6``: an image costs 60 % of an eager batch-1 call); sizes not measured are absent."""
        return {b: c for b, c in self._costs.items() if b in self._runners}

    def wait(self, timeout: float = 900.0) -> str:
        """Block until the compilation ends (or ``timeout`` seconds pass); returns :attr:`status`."""
        self._finished.wait(timeout)
        return self.status

    # ------------------------------------------------------------------------------ compiling
    def start(self) -> "CompiledNetworks":
        """Compile in a background thread; returns at once. Call it from the thread that runs the
        eager forwards (or where none runs): it first does, in the caller's thread, what must not
        happen beside a forward (:func:`prepare_for_background_compilation`)."""
        if self.batch_sizes and not self._cancelled.is_set():
            prepare_for_background_compilation()
        threading.Thread(target=self.compile_all, name="compile-model", daemon=True).start()
        return self

    def cancel(self) -> None:
        """Stop after the batch size being compiled (the model was replaced); drop the copy."""
        self._cancelled.set()

    def compile_all(self) -> str:
        """Compile every batch size in turn (synchronously); returns :attr:`status`."""
        try:
            for batch_size in self.batch_sizes:
                if self._cancelled.is_set():
                    self.status = "cancelled"
                    break
                t0 = time.perf_counter()
                with _COMPILE_LOCK:
                    if self._cancelled.is_set():
                        self.status = "cancelled"
                        break
                    compiled, eager = self._compile_one(batch_size)
                self.seconds[batch_size] = round(time.perf_counter() - t0, 1)
                self._measure(compiled, eager, batch_size)
                self._runners = {**self._runners, batch_size: compiled}  # one reference swap
                logger.info("compiled the network for batch %d in %.1f s: %.1f ms per image, %.2f x eager batch 1",
                            batch_size, self.seconds[batch_size], self.ms_per_image[batch_size], self._costs[batch_size])
            else:
                self.status = "ready"
        except Exception as e:  # the eager network keeps serving
            first_line = str(e).splitlines()[0] if str(e) else ""
            self.status = f"failed: {type(e).__name__}: {first_line}"[:300]
            logger.warning("torch.compile failed, serving eagerly: %s", e)
        finally:
            self._network = None  # the copy is held by the compiled networks alone
            self._finished.set()
        return self.status

    def _compile_one(self, batch_size: int) -> tuple[Callable, nn.Module]:
        """The compiled network for ``batch_size``, traced and warmed, and the private eager copy
        it was compiled from."""
        import torch._inductor.config as inductor_config

        # a private copy: the served eager network's tensors are never touched by this thread
        network = freeze_for_serving(copy.deepcopy(self._network))
        compiled = torch.compile(network, dynamic=False)
        x = self.example_input(batch_size)
        # freezing (weights as constants: batch norms folded into the convolutions, weights
        # prepacked for oneDNN, conv+activation fused) must be set while the first call traces:
        # dynamo reads the process-wide setting to treat parameters as constants, and
        # ``torch.compile(options={"freezing": True})`` alone is silently ignored (torch 2.14)
        with inductor_config.patch(freezing=True):
            self.run(compiled, x)
        self.run(compiled, x.clone())  # a second input: warmed, and no recompilation
        return compiled, network

    def _measure(self, compiled: Callable, eager: nn.Module, batch_size: int, rounds: int = 3) -> None:
        """Time ``compiled`` on a batch and the private ``eager`` copy on one image, alternating
        (``rounds`` calls of each, medians): :attr:`ms_per_image` and the cost ratio of
        :meth:`costs`, which chooses how batches are split (:func:`thyroid_plugin.inference.batch_plan`).
        Both run in this thread on private objects, beside whatever the model thread serves."""
        xb, x1 = self.example_input(batch_size), self.example_input(1)
        self.run(eager, x1)  # oneDNN builds its eager primitives on the first call
        compiled_s, eager_s = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            self.run(compiled, xb)
            t1 = time.perf_counter()
            self.run(eager, x1)
            eager_s.append(time.perf_counter() - t1)
            compiled_s.append(t1 - t0)
        per_image = statistics.median(compiled_s) / batch_size
        self.ms_per_image[batch_size] = round(per_image * 1e3, 2)
        self._costs[batch_size] = round(per_image / statistics.median(eager_s), 3)

    def example_input(self, batch_size: int) -> torch.Tensor:
        """An input built as requests build theirs (a normal tensor made outside inference mode,
        same layout), so the compiled guards match real requests."""
        x = torch.zeros((batch_size, 3, self.image_size, self.image_size), device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run(self, network: Callable, x: torch.Tensor):
        """``network(x)`` as served: inference mode, autocast in :attr:`dtype`."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return network(x)
