"""memory="offload": the hidden states a block saves for its backward wait in pinned CPU memory.

With the recompute in the graph (fxopt.recompute), a block's compiled backward needs only the block's inputs:
the weights, which stay where they are, and the hidden states, which are offloaded here through autograd's
saved-tensor hooks. The copies run on a side stream so they overlap the blocks' compute:
- forward: the copy to CPU starts when the block has saved its input; the GPU tensor is held until the next
  block's save, which makes the compute stream wait for the copy (one block later, so it has long finished)
  and lets the memory go;
- backward: when block i's input is brought back, block i-1's is prefetched, so it is there when the
  backward reaches block i-1.
Only the tensor passed as the block's hidden states is offloaded (matched by identity); every other saved
tensor is kept as is. On a device without streams (CPU) the copies are plain, for tests.
"""
from __future__ import annotations

import contextlib
import weakref

import torch


class _Offloaded:
    """One saved hidden-states tensor: its CPU copy, its GPU tensor while one is held or fetched, the event
    that copy waits on, and the save before it (weakly: a forward without a backward must not keep a chain)."""

    __slots__ = ("cpu", "gpu", "event", "prev", "device", "used", "__weakref__")

    def __init__(self, cpu, gpu, event, prev, device):
        self.cpu, self.gpu, self.event, self.device, self.used = cpu, gpu, event, device, False
        self.prev = weakref.ref(prev) if prev is not None else (lambda: None)


class _Hooks:
    """torch.autograd.graph.saved_tensors_hooks entered and left outside Dynamo: the block's forward, where
    they are entered, runs under the outer model's compile, which would otherwise trace them."""

    def __init__(self, pack, unpack):
        self.inner = torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    @torch._dynamo.disable
    def __enter__(self):
        self.inner.__enter__()

    @torch._dynamo.disable
    def __exit__(self, *exc):
        self.inner.__exit__(*exc)


class Offloader:
    """Saved-tensor hooks for one model's blocks (one instance per optimized model: it chains the blocks'
    saves in order so the backward can prefetch)."""

    def __init__(self):
        self.last: _Offloaded | None = None  # the latest save, whose GPU tensor is held until the next one
        self.stream = None
        self.offloaded = 0  # tensors and bytes offloaded so far (the tests read these)
        self.offloaded_bytes = 0

    @torch._dynamo.disable  # called in the block's forward, which runs under the outer model's compile
    def hooks(self, args, kwargs):
        """The context manager to run one block's forward under: offloads its hidden states (the first
        floating-point tensor argument, or the hidden_states keyword) when the block saves them."""
        hidden = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                      kwargs.get("hidden_states"))
        if not isinstance(hidden, torch.Tensor):
            return contextlib.nullcontext()

        @torch._dynamo.disable  # called from inside the compiled block's autograd function: never traced
        def pack(t):
            same = t is hidden or (t.data_ptr() == hidden.data_ptr() and t.shape == hidden.shape
                                   and t.stride() == hidden.stride() and t.dtype == hidden.dtype)
            # a non-contiguous one is kept: the compiled backward asserts its inputs' strides
            return self._pack(t) if same and t.is_contiguous() else t

        @torch._dynamo.disable
        def unpack(saved):
            return self._unpack(saved) if isinstance(saved, _Offloaded) else saved

        return _Hooks(pack, unpack)

    def _side_stream(self, device):
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def _pack(self, t: torch.Tensor) -> _Offloaded:
        self.offloaded += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        self._release_last()
        if not t.is_cuda:
            item = _Offloaded(t.detach().to("cpu", copy=True), None, None, self.last, t.device)
        else:
            side = self._side_stream(t.device)
            cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is complete
            with torch.cuda.stream(side):
                cpu.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            item = _Offloaded(cpu, t, event, self.last, t.device)  # t is held until the copy is waited for
        self.last = item
        return item

    def _release_last(self):
        """The compute stream waits for the latest save's copy to CPU; then its GPU tensor is let go."""
        last, self.last = self.last, None
        if last is not None and last.event is not None and not last.used:
            torch.cuda.current_stream(last.device).wait_event(last.event)
            last.gpu, last.event = None, None

    def _unpack(self, item: _Offloaded) -> torch.Tensor:
        if item is self.last:  # the backward follows the last block's forward: its tensor is still held
            self.last = None
        if item.device.type != "cuda":
            return item.cpu.to(item.device)
        if item.gpu is None:  # not prefetched (a backward out of the usual order)
            self._fetch(item)
        torch.cuda.current_stream(item.device).wait_event(item.event)
        out, item.gpu, item.used = item.gpu, None, True
        prev = item.prev()
        if prev is not None and not prev.used and prev.gpu is None:
            self._fetch(prev)  # the block before this one runs its backward next
        return out

    def _fetch(self, item: _Offloaded):
        main = torch.cuda.current_stream(item.device)
        side = self._side_stream(item.device)
        item.gpu = torch.empty(item.cpu.shape, dtype=item.cpu.dtype, device=item.device)
        side.wait_stream(main)  # the memory was allocated on the compute stream
        with torch.cuda.stream(side):
            item.gpu.copy_(item.cpu, non_blocking=True)
            item.event = torch.cuda.Event()
            item.event.record(side)
