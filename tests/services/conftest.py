"""Fixtures of the serving tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def loop():
    """Runs a coroutine on one event loop for the module's engines (an engine serves the loop it first generated
    on): `loop(coro)` returns its result."""
    from models.engine import BlockingRunner

    runner = BlockingRunner()
    yield lambda coro: runner(coro, timeout=300)
    runner.close()
