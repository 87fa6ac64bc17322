"""Stream-ordered CPU expert calls: the part of the vLLM plugin that needs no vLLM.

One call of a CPU MoE layer inside a CUDA stream is

    D2H  x, topk_ids, topk_weights  -> pinned staging buffers
    host function: submit the job to the engine's workers (returns at once)
    ... the GPU goes on (shared experts on vLLM's side stream) ...
    host function: wait for the job
    H2D  staging out -> a fresh output tensor

Everything is enqueued on the current stream, so CUDA graphs capture it and
replay it without Python.  The staging buffers are shared by all layers: the
stream serialises layer after layer, so one set (sized for the largest batch)
suffices.  A call descriptor names the layer and the token count; eager calls
get a fresh one that the wait host function frees, captured calls get one per
(layer, tokens) that lives as long as the layer (a graph may replay it).

With LVLLM_STREAM_SYNC=memops, captured calls (CUDA graphs) skip the host
functions' round trips through CUDA's callback thread:

    D2H ...
    write 0 -> done flag, write call id -> bell     (stream memory operations)
    host function: backstop (posts the job if nobody claimed the bell)
    wait until done flag == 1                       (the GPU polls pinned memory)
    H2D ...

The engine's worker 0, spinning between jobs, sees the bell within a
microsecond and posts the job itself; the last worker stores 1 to the done
flag.  The backstop covers workers asleep after LK_SPIN_US idle.  Eager calls
always use the two host functions.

The stream itself is abstracted by `StreamOps`, so the same runner is tested
on the CPU with an in-order executor standing in for a CUDA stream.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Protocol

from lvllm_cli.moe import native

_TORCH_TO_ENGINE = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


def engine_dtype(dtype: Any) -> str:
    name = str(dtype)
    if name not in _TORCH_TO_ENGINE:
        raise TypeError(f"hidden states must be bfloat16, float16 or float32, got {name}")
    return _TORCH_TO_ENGINE[name]


STREAM_SYNC = ("hostfn", "memops")


def stream_sync(env) -> str:
    """LVLLM_STREAM_SYNC: how captured calls hand over to the CPU (module doc)."""
    v = env.get("LVLLM_STREAM_SYNC", "").strip() or "hostfn"
    if v not in STREAM_SYNC:
        raise ValueError(f"LVLLM_STREAM_SYNC={v!r}: use hostfn (two host functions per layer) or memops "
                         "(stream memory operations and a spinning worker)")
    return v


class StreamOps(Protocol):
    def copy(self, dst: Any, src: Any) -> None: ...
    def host_submit(self, call: int) -> None: ...
    def host_wait(self, call: int) -> None: ...
    def host_backstop(self, call: int) -> None: ...
    def device_address(self, host_address: int) -> int: ...
    def write_value(self, device_address: int, value: int) -> None: ...
    def wait_value(self, device_address: int, value: int) -> None: ...
    def capturing(self) -> bool: ...
    def empty_like(self, x: Any) -> Any: ...


class CudaStreamOps:
    """The real thing: torch's current CUDA stream and the driver's cuLaunchHostFunc."""

    def __init__(self):
        import torch

        self._torch = torch
        self._lk = native.load()
        problem = self._lk.cuda_driver_problem()
        if problem:
            raise RuntimeError(problem)

    def _stream(self) -> int:
        return self._torch.cuda.current_stream().cuda_stream

    def copy(self, dst, src) -> None:
        dst.copy_(src, non_blocking=True)

    def host_submit(self, call: int) -> None:
        self._lk.enqueue_submit(self._stream(), call)

    def host_wait(self, call: int) -> None:
        self._lk.enqueue_wait(self._stream(), call)

    def host_backstop(self, call: int) -> None:
        self._lk.enqueue_backstop(self._stream(), call)

    def device_address(self, host_address: int) -> int:
        return self._lk.host_device_pointer(host_address)

    def write_value(self, device_address: int, value: int) -> None:
        self._lk.enqueue_write_value32(self._stream(), device_address, value)

    def wait_value(self, device_address: int, value: int) -> None:
        self._lk.enqueue_wait_value32(self._stream(), device_address, value)

    def capturing(self) -> bool:
        return bool(self._torch.cuda.is_current_stream_capturing())

    def empty_like(self, x):
        return self._torch.empty_like(x)


class InOrderExecutor:
    """A CPU stand-in for a CUDA stream: one thread runs enqueued work in order.

    Host functions run on that thread, as CUDA runs them on its callback
    thread; `synchronize()` waits for everything enqueued so far.
    """

    def __init__(self, host_latency_s: float = 0.0):
        # CUDA runs a host function some microseconds after the stream reaches it; tests can make that visible.
        self.host_latency_s = host_latency_s
        self._q: "queue.Queue[Any]" = queue.Queue()
        self._errors: list[BaseException] = []
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self._lk = native.load()
        self.capture = False

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                item()
            except BaseException as exc:  # noqa: BLE001 - reported by synchronize()
                self._errors.append(exc)
            finally:
                self._q.task_done()

    def copy(self, dst, src) -> None:
        self._q.put(lambda: dst.copy_(src))

    def enqueue(self, fn) -> None:
        """Any other work in stream order (stands in for the GPU's kernels between layers)."""
        self._q.put(fn)

    def host_submit(self, call: int) -> None:
        self._q.put(lambda: self._lk.run_hostfn_submit(call))

    def host_wait(self, call: int) -> None:
        self._q.put(lambda: self._lk.run_hostfn_wait(call))

    def host_backstop(self, call: int) -> None:
        self._q.put(lambda: (time.sleep(self.host_latency_s), self._lk.run_hostfn_backstop(call)))

    def device_address(self, host_address: int) -> int:
        return host_address

    def write_value(self, device_address: int, value: int) -> None:
        self._q.put(lambda: self._lk.poke32(device_address, value))

    def wait_value(self, device_address: int, value: int) -> None:
        def spin():
            while self._lk.peek32(device_address) != value:
                time.sleep(0)

        self._q.put(spin)

    def capturing(self) -> bool:
        return self.capture

    def empty_like(self, x):
        import torch

        return torch.empty_like(x)

    def synchronize(self) -> None:
        self._q.join()
        if self._errors:
            raise self._errors.pop(0)

    def close(self) -> None:
        self._q.put(None)
        self._t.join()


class Staging:
    """Pinned host buffers for one batch of tokens, shared by every layer of a process."""

    def __init__(self, max_tokens: int, hidden: int, k: int, dtype: Any, *, pin: bool):
        import torch

        if max_tokens < 1 or hidden < 1 or k < 1:
            raise ValueError(f"staging needs positive sizes, got tokens={max_tokens} hidden={hidden} k={k}")
        self.max_tokens, self.hidden, self.k, self.dtype = max_tokens, hidden, k, dtype
        self.x = torch.empty(max_tokens, hidden, dtype=dtype, pin_memory=pin)
        self.ids = torch.empty(max_tokens, k, dtype=torch.int32, pin_memory=pin)
        self.weights = torch.empty(max_tokens, k, dtype=torch.float32, pin_memory=pin)
        self.out = torch.empty(max_tokens, hidden, dtype=dtype, pin_memory=pin)
        # Doorbell words for LVLLM_STREAM_SYNC=memops: the bell at [0], the done flag at [16] (own cache lines).
        self.sync = torch.zeros(32, dtype=torch.int32, pin_memory=pin)

    @property
    def bell_address(self) -> int:
        return self.sync.data_ptr()

    @property
    def done_address(self) -> int:
        return self.sync.data_ptr() + 16 * 4

    def fits(self, hidden: int, k: int, dtype: Any) -> bool:
        return hidden == self.hidden and k == self.k and dtype == self.dtype


class HostCallRunner:
    """Runs MoE layers on the CPU engine from a stream (see the module doc)."""

    def __init__(self, ops: StreamOps, staging: Staging, sync: str = "hostfn"):
        if sync not in STREAM_SYNC:
            raise ValueError(f"stream sync must be one of {STREAM_SYNC}, got {sync!r}")
        self.ops = ops
        self.staging = staging
        self.sync = sync
        self._lk = native.load()
        self._persistent: dict[tuple[int, int], tuple[int, int, Any]] = {}
        self.calls_enqueued = 0
        self._bell_dev = self._done_dev = None
        if sync == "memops":
            self._bell_dev = ops.device_address(staging.bell_address)
            self._done_dev = ops.device_address(staging.done_address)

    def _call(self, layer: Any, tokens: int) -> tuple[int, int]:
        """(call descriptor, doorbell id: 0 for a call run by the two host functions)."""
        st = self.staging
        args = (
            layer.native,
            st.x.data_ptr(), engine_dtype(st.dtype),
            st.ids.data_ptr(), False,
            st.weights.data_ptr(), tokens, st.k,
            st.out.data_ptr(), engine_dtype(st.dtype),
        )
        if not self.ops.capturing():
            return self._lk.make_host_call(*args, True), 0
        key = (id(layer.native), tokens)
        kept = self._persistent.get(key)
        if kept is None:
            doorbell = (st.bell_address, st.done_address) if self.sync == "memops" else (0, 0)
            call = self._lk.make_host_call(*args, False, *doorbell)
            kept = self._persistent[key] = (call, self._lk.host_call_id(call), layer)  # the layer lives as long as the call
        return kept[0], kept[1]

    def run(self, layer: Any, x: Any, topk_ids: Any, topk_weights: Any) -> Any:
        """Enqueue the layer for x [T, H] and return the (stream-ordered) output [T, H]."""
        st = self.staging
        T, H = int(x.shape[0]), int(x.shape[1])
        k = int(topk_ids.shape[1])
        if not st.fits(H, k, x.dtype):
            raise ValueError(
                f"staging is for hidden={st.hidden}, k={st.k}, {st.dtype}; this layer has hidden={H}, k={k}, {x.dtype}"
            )
        out = self.ops.empty_like(x)
        for s in range(0, T, st.max_tokens):
            e = min(T, s + st.max_tokens)
            n = e - s
            self.ops.copy(st.x[:n], x[s:e])
            self.ops.copy(st.ids[:n], topk_ids[s:e])
            self.ops.copy(st.weights[:n], topk_weights[s:e])
            call, call_id = self._call(layer, n)
            if call_id:
                self.ops.write_value(self._done_dev, 0)
                self.ops.write_value(self._bell_dev, call_id)
                self.ops.host_backstop(call)
                self.ops.wait_value(self._done_dev, 1)
            else:
                self.ops.host_submit(call)
                self.ops.host_wait(call)
            self.ops.copy(out[s:e], st.out[:n])
            self.calls_enqueued += 1
        return out

    def close(self) -> None:
        """Free the captured calls (only once no graph that uses them can replay)."""
        engines = {id(layer.engine): layer.engine for _call, _id, layer in self._persistent.values()}
        for engine in engines.values():
            self._lk.stop_doorbell(engine)
        for call, _id, _layer in self._persistent.values():
            self._lk.free_host_call(call)
        self._persistent.clear()
