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
  set only while a compilation traces.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .runtime import autocast

__all__ = ["CompiledNetworks", "freeze_for_serving"]

logger = logging.getLogger(__name__)

# inductor's settings are process-wide: one compilation at a time sets and restores them
_COMPILE_LOCK = threading.Lock()


def freeze_for_serving(network: nn.Module) -> nn.Module:
    """Evaluation mode and no parameter requiring grad (see the module's docstring: serving
    must never fill autocast's weight-cast cache). Returns ``network``."""
    network.eval()
    network.requires_grad_(False)
    return network


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
    before, and for sizes it does not cover); :attr:`status` is ``"compiling"``, ``"ready"``
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

    def wait(self, timeout: float = 900.0) -> str:
        """Block until the compilation ends (or ``timeout`` seconds pass); returns :attr:`status`."""
        self._finished.wait(timeout)
        return self.status

    # ------------------------------------------------------------------------------ compiling
    def start(self) -> "CompiledNetworks":
        """Compile in a background thread; returns at once."""
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
                    compiled = self._compile_one(batch_size)
                self.seconds[batch_size] = round(time.perf_counter() - t0, 1)
                self._runners = {**self._runners, batch_size: compiled}  # one reference swap
                logger.info("compiled the network for batch %d in %.1f s", batch_size, self.seconds[batch_size])
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

    def _compile_one(self, batch_size: int) -> Callable:
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
        return compiled

    def example_input(self, batch_size: int) -> torch.Tensor:
        """An input built as requests build theirs (a normal tensor made outside inference mode,
        same layout), so the compiled guards match real requests."""
        x = torch.zeros((batch_size, 3, self.image_size, self.image_size), device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run(self, network: Callable, x: torch.Tensor):
        """``network(x)`` as served: inference mode, autocast in :attr:`dtype`."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return network(x)
