"""Training batches fetched one thread ahead of the step that uses them.

    loader = BackgroundLoader(create_torch_loader(...), background=True, device=device)
    for batch in loader: ...     # next() takes a ready batch off a queue

Both back ends hand their batches over at a cost the training step pays in full: a torch
DataLoader with worker processes passes every tensor of a batch through shared memory and a
pipe (a few ms per batch, however far ahead the workers are), and DALI's ``run()`` plus the
copy into torch tensors is about as long. On small CPU models that is several percent of a
step. A thread that takes the batches off the loader while the step computes (the step's
kernels release the GIL) leaves ``next()`` only a queue read.

The first batch is fetched in the caller's thread, inside ``iter()``: a torch DataLoader
draws its base seed from the global RNG when its iteration starts, and the engine keeps that
draw out of the resumable RNG stream by calling ``iter()`` under ``fork_rng`` (see
engine.train_step). A loader whose ``__iter__`` is a generator would otherwise defer the draw
to the first ``next()``. The thread never touches the RNG: batch order and contents are
those of the wrapped loader, whatever the timing.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading

import torch

_BATCH, _END, _ERROR = "batch", "end", "error"

# Threads still pumping, with their channels. DALI shuts its pipelines down in an atexit
# handler; a thread still running one then aborts the process ("terminate called without an
# active exception"). So at exit every thread is told to stop and joined first: it finishes
# its batch and closes its loader. atexit runs handlers last-registered first, and DALI
# registers its own on import, so ours is registered again whenever a thread starts.
_LIVE: dict[threading.Thread, _Channel] = {}
_LIVE_LOCK = threading.Lock()


def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE.items())
    for _, channel in live:
        channel.stop.set()
    for thread, _ in live:
        thread.join(timeout=60)


class BackgroundLoader:
    """Wraps a loader (``len()`` and ``iter()``); ``background=False`` keeps loading in the
    caller's thread (``data.num_workers: 0`` means loading inside the rank's own loop)."""

    def __init__(self, loader, background: bool, device=None, depth: int = 2):
        self.loader, self.background, self.device, self.depth = loader, background, device, depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        first = next(batches, None)
        if first is None:
            return iter(())
        if not self.background:
            return itertools.chain([first], batches)
        return _Prefetcher(first, batches, self.depth, self.device)


class _Channel:
    """What the thread shares with its consumer; holds no reference back to the consumer, so
    an abandoned iterator (a preemption or a rollback mid-epoch) is collected and stops it."""

    def __init__(self, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _pump(channel: _Channel, batches, device) -> None:
    try:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))  # a new thread starts on GPU 0
        for batch in batches:
            if not channel.put((_BATCH, batch)):
                return
        channel.put((_END, None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        channel.put((_ERROR, exc))
    finally:
        try:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a generator's cleanup (DataLoader workers, the DALI pipeline) runs here
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(threading.current_thread(), None)


class _Prefetcher:
    def __init__(self, first, batches, depth: int, device):
        self._first, self._done = first, False
        self._channel = _Channel(depth)
        self._thread = threading.Thread(
            target=_pump, args=(self._channel, batches, device), daemon=True, name="mlps-prefetch"
        )
        with _LIVE_LOCK:
            _LIVE[self._thread] = self._channel
        atexit.unregister(_stop_all)
        atexit.register(_stop_all)  # after any handler registered since (DALI's), so it runs before them
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._first is not None:
            batch, self._first = self._first, None
            return batch
        if self._done:
            raise StopIteration
        kind, value = self._channel.queue.get()
        if kind == _BATCH:
            return value
        self._done = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (it closes the wrapped loader's iteration) and wait for it."""
        self._channel.stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def __del__(self):
        self._channel.stop.set()
