import os
import sys

# Tests exercise the *installed* package (with its compiled engine), never a
# stray copy of the source tree on sys.path.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != ROOT]

import pytest  # noqa: E402


@pytest.fixture
def fake():
    """A running FakeVllm (tests/monitor_fakes.py): real HTTP, real Prometheus text."""
    from monitor_fakes import FakeVllm

    f = FakeVllm().start()
    yield f
    f.stop()
