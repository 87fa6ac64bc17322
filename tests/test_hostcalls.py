"""The plugin's stream-ordered runner, with an in-order executor standing in for a CUDA stream."""

from __future__ import annotations

import threading

import pytest
import torch

from lvllm_cli import _lk_moe as lk
from lvllm_cli.moe import MoELayer, get_engine
from lvllm_cli.moe.hostcalls import HostCallRunner, InOrderExecutor, Staging
from lvllm_cli.moe.placement import Group
from moe_reference import as_f64, random_problem, reference_moe, rel_err


@pytest.fixture()
def stream():
    ex = InOrderExecutor()
    yield ex
    ex.close()


def _layers(n, E=16, H=96, I=64, seed=0):
    eng = get_engine(groups=[Group(-1, (-1, -1))], isa="scalar")
    probs = [random_problem(1, 1, E, H, I, seed=seed + i) for i in range(n)]
    return [(MoELayer(p[1], p[2], engine=eng), p[1], p[2]) for p in probs]


def _ref(x, w13, w2, ids, tw):
    return reference_moe(as_f64(x), as_f64(w13), as_f64(w2), ids.numpy(), tw.numpy())


def test_layers_back_to_back_share_one_staging(stream):
    """Several layers enqueued before anything runs: each sees its own input (stream order protects the staging)."""
    layers = _layers(3)
    runner = HostCallRunner(stream, Staging(64, 96, 4, torch.bfloat16, pin=False))
    x, _, _, ids, tw = random_problem(40, 4, 16, 96, 64, seed=9)
    outs = []
    h = x
    for layer, _, _ in layers:
        h = runner.run(layer, h, ids, tw)  # output of one layer feeds the next, like a model
        outs.append(h)
    stream.synchronize()
    h_ref = x
    for (layer, w13, w2), out in zip(layers, outs):
        ref = _ref(h_ref, w13, w2, ids, tw)
        assert rel_err(as_f64(out), ref) <= 1e-2
        h_ref = out  # compare layer by layer on the engine's own (bf16-rounded) input


def test_batches_larger_than_staging_are_chunked(stream):
    (layer, w13, w2), = _layers(1)
    runner = HostCallRunner(stream, Staging(16, 96, 2, torch.bfloat16, pin=False))
    x, _, _, ids, tw = random_problem(45, 2, 16, 96, 64, seed=3)
    out = runner.run(layer, x, ids, tw)
    stream.synchronize()
    assert runner.calls_enqueued == 3
    assert rel_err(as_f64(out), _ref(x, w13, w2, ids, tw)) <= 1e-2


def test_captured_calls_are_kept_per_layer_and_size(stream):
    """Under capture a call descriptor is made once per (layer, tokens) and reused; eager calls are not kept."""
    layers = _layers(2)
    runner = HostCallRunner(stream, Staging(32, 96, 2, torch.bfloat16, pin=False))
    x, _, _, ids, tw = random_problem(8, 2, 16, 96, 64, seed=4)
    for layer, _, _ in layers:
        runner.run(layer, x, ids, tw)
    stream.synchronize()
    assert runner._persistent == {}
    stream.capture = True
    for _ in range(3):  # e.g. FULL and PIECEWISE graphs of the same size, and a re-capture
        for layer, _, _ in layers:
            runner.run(layer, x[:4], ids[:4], tw[:4])
            out = runner.run(layer, x, ids, tw)
    stream.synchronize()
    assert len(runner._persistent) == 4
    layer, w13, w2 = layers[-1]
    assert rel_err(as_f64(out), _ref(x, w13, w2, ids, tw)) <= 1e-2
    runner.close()
    assert runner._persistent == {}


def test_host_functions_from_a_foreign_thread():
    """submit returns before the work is done; wait, on another thread, completes it (CUDA callback thread)."""
    (layer, w13, w2), = _layers(1)
    x, _, _, ids, tw = random_problem(30, 2, 16, 96, 64, seed=5)
    st = Staging(30, 96, 2, torch.bfloat16, pin=False)
    st.x.copy_(x), st.ids.copy_(ids), st.weights.copy_(tw)
    call = lk.make_host_call(layer.native, st.x.data_ptr(), "bfloat16", st.ids.data_ptr(), False,
                             st.weights.data_ptr(), 30, 2, st.out.data_ptr(), "bfloat16", True)
    t = threading.Thread(target=lambda: (lk.run_hostfn_submit(call), lk.run_hostfn_wait(call)))
    t.start()
    t.join()
    assert rel_err(as_f64(st.out), _ref(x, w13, w2, ids, tw)) <= 1e-2


def test_staging_mismatch_is_refused(stream):
    (layer, _, _), = _layers(1)
    runner = HostCallRunner(stream, Staging(8, 96, 4, torch.bfloat16, pin=False))
    x, _, _, ids, tw = random_problem(2, 2, 16, 96, 64, seed=1)
    with pytest.raises(ValueError, match="staging is for hidden=96, k=4"):
        runner.run(layer, x, ids, tw)
    with pytest.raises(ValueError, match="positive sizes"):
        Staging(0, 96, 4, torch.bfloat16, pin=False)


def test_cuda_driver_detection_matches_the_loader():
    """The engine opens libcuda.so.1 at run time: absent, enqueueing says why instead of crashing."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        present = True
    except OSError:
        present = False
    problem = lk.cuda_driver_problem()
    assert (problem == "") == present
    if not present:
        with pytest.raises(RuntimeError, match="CUDA driver"):
            lk.enqueue_submit(0, 0)


def test_callback_thread_is_kept_off_worker_cores():
    """CUDA's callback thread submits and waits; it must not share a core with a pinned worker."""
    import os

    allowed = sorted(os.sched_getaffinity(0))
    worker_cpu = allowed[0]
    eng = lk.Engine([(-1, [worker_cpu])], 200, "scalar")
    x, w13, w2, ids, tw = random_problem(3, 2, 8, 64, 32, seed=2)
    layer = MoELayer(w13, w2, engine=eng)
    st = Staging(3, 64, 2, torch.bfloat16, pin=False)
    st.x.copy_(x), st.ids.copy_(ids), st.weights.copy_(tw)
    seen = {}

    def callback_thread():
        call = lk.make_host_call(layer.native, st.x.data_ptr(), "bfloat16", st.ids.data_ptr(), False,
                                 st.weights.data_ptr(), 3, 2, st.out.data_ptr(), "bfloat16", True)
        lk.run_hostfn_submit(call)
        lk.run_hostfn_wait(call)
        seen["affinity"] = os.sched_getaffinity(0)

    t = threading.Thread(target=callback_thread)
    t.start()
    t.join()
    if len(allowed) > 1:
        assert seen["affinity"] == set(allowed) - {worker_cpu}
    else:  # nowhere else to go: left as it was
        assert seen["affinity"] == set(allowed)
    assert rel_err(as_f64(st.out), _ref(x, w13, w2, ids, tw)) <= 1e-2


def _doorbell_run(spin_us, replays=4, host_latency_s=0.0):
    """Three layers captured with LVLLM_STREAM_SYNC=memops, replayed like a graph, each output against the reference."""
    eng = lk.Engine([(-1, [-1, -1])], spin_us, "scalar")
    probs = [random_problem(1, 1, 16, 96, 64, seed=30 + i) for i in range(3)]
    layers = [(MoELayer(p[1], p[2], engine=eng), p[1], p[2]) for p in probs]
    stream = InOrderExecutor(host_latency_s)
    stream.capture = True
    runner = HostCallRunner(stream, Staging(32, 96, 4, torch.bfloat16, pin=False), "memops")
    lk.reset_hostfn_times()
    try:
        for r in range(replays):
            x, _, _, ids, tw = random_problem(1 + r % 2 * 6, 4, 16, 96, 64, seed=40 + r)
            h, outs = x, []
            for layer, _, _ in layers:
                h = runner.run(layer, h, ids, tw)
                outs.append(h)
            stream.synchronize()
            h_ref = x
            for (layer, w13, w2), out in zip(layers, outs):
                assert rel_err(as_f64(out), _ref(h_ref, w13, w2, ids, tw)) <= 1e-2
                h_ref = out
        assert len(runner._persistent) == 6  # (3 layers) x (1 and 7 tokens)
        return lk.hostfn_times()
    finally:
        runner.close()
        stream.close()


def test_doorbell_calls_posted_by_the_spinning_worker():
    # Workers spin throughout and the backstop comes 20 ms after the bell: worker 0 claims (nearly) every bell.
    t = _doorbell_run(spin_us=2_000_000, host_latency_s=0.02)
    assert t["doorbell_worker"] + t["doorbell_backstop"] == 12
    assert t["doorbell_worker"] >= 9


def test_doorbell_calls_posted_by_the_backstop_when_workers_sleep():
    t = _doorbell_run(spin_us=0)  # workers sleep at once: nobody watches the bell
    assert t["doorbell_worker"] + t["doorbell_backstop"] == 12
    assert t["doorbell_backstop"] >= 1


def test_eager_calls_keep_the_host_functions_under_memops(stream):
    (layer, w13, w2), = _layers(1)
    runner = HostCallRunner(stream, Staging(16, 96, 2, torch.bfloat16, pin=False), "memops")
    lk.reset_hostfn_times()
    x, _, _, ids, tw = random_problem(5, 2, 16, 96, 64, seed=8)
    out = runner.run(layer, x, ids, tw)
    stream.synchronize()
    assert rel_err(as_f64(out), _ref(x, w13, w2, ids, tw)) <= 1e-2
    t = lk.hostfn_times()
    assert t["doorbell_worker"] + t["doorbell_backstop"] == 0 and runner._persistent == {}


def test_stream_sync_setting_and_doorbell_arguments_are_checked(stream):
    from lvllm_cli.moe.hostcalls import stream_sync

    assert stream_sync({}) == "hostfn" and stream_sync({"LVLLM_STREAM_SYNC": "memops"}) == "memops"
    with pytest.raises(ValueError, match="LVLLM_STREAM_SYNC='graph'.*hostfn.*memops"):
        stream_sync({"LVLLM_STREAM_SYNC": "graph"})
    with pytest.raises(ValueError, match="stream sync must be one of"):
        HostCallRunner(stream, Staging(8, 96, 4, torch.bfloat16, pin=False), "spin")
    (layer, _, _), = _layers(1)
    st = Staging(4, 96, 2, torch.bfloat16, pin=False)
    args = (layer.native, st.x.data_ptr(), "bfloat16", st.ids.data_ptr(), False, st.weights.data_ptr(), 4, 2,
            st.out.data_ptr(), "bfloat16")
    with pytest.raises(ValueError, match="needs both the bell and the done flag"):
        lk.make_host_call(*args, False, st.bell_address, 0)
    with pytest.raises(ValueError, match="not owned by the stream"):
        lk.make_host_call(*args, True, st.bell_address, st.done_address)
