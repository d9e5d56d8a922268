"""EngineSlot: a swap sends new requests to the new engine while requests in flight finish on the old
one, which closes only once its last request is done."""

import asyncio
import time

import pytest

from tracelearn.models import LoadedModel
from tracelearn.serving.engine import EngineClosedError, GenerationEngine
from tracelearn.serving.engine_slot import EngineSlot
from tracelearn.serving.sampling import SamplingParams

PROMPT = [5, 6, 7, 8]


def wait_closed(engine: GenerationEngine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            engine.submit(PROMPT, SamplingParams(max_tokens=1), lambda _: None).set()
        except EngineClosedError:
            return True
        time.sleep(0.01)
    return False


def test_in_flight_request_finishes_on_the_old_engine_which_then_closes(tiny_model: LoadedModel) -> None:
    old, new = GenerationEngine(tiny_model), GenerationEngine(tiny_model)
    slot = EngineSlot(old, following="tiny@production")
    params = SamplingParams(max_tokens=40, temperature=0.0)

    async def scenario() -> None:
        lease = slot.lease()
        stream = lease.engine.stream(PROMPT, params)
        first = await stream.__anext__()  # the request is running on the old engine
        assert slot.swap(new) is old
        with slot.lease() as fresh:
            assert fresh.engine is new
        assert slot.status().draining == 1
        assert not wait_closed(old, timeout=0.2), "the old engine closed under a running request"
        rest = [step async for step in stream]
        assert [first, *rest][-1].finish_reason is not None
        lease.release()
        lease.release()  # idempotent

    asyncio.run(scenario())
    assert wait_closed(old), "the drained engine was never closed"
    status = slot.status()
    assert (status.draining, status.swaps, status.following) == (0, 1, "tiny@production")
    slot.close()
    assert wait_closed(new)


def test_an_idle_engine_is_closed_at_once_and_failures_are_remembered_until_a_swap(tiny_model: LoadedModel) -> None:
    old, new = GenerationEngine(tiny_model), GenerationEngine(tiny_model)
    slot = EngineSlot(old)
    slot.record_swap_failure("calc-policy@3 was not swapped in: CorruptArtifactError")
    assert slot.status().last_swap_error == "calc-policy@3 was not swapped in: CorruptArtifactError"
    slot.swap(new)
    assert wait_closed(old)
    assert slot.status().last_swap_error is None
    slot.close()
    late = GenerationEngine(tiny_model)
    with pytest.raises(RuntimeError, match="closed"):
        slot.swap(late)
    late.close()


def test_a_lease_that_is_dropped_unreleased_still_lets_the_engine_close(tiny_model: LoadedModel) -> None:
    old, new = GenerationEngine(tiny_model), GenerationEngine(tiny_model)
    slot = EngineSlot(old)
    lease = slot.lease()
    slot.swap(new)
    del lease  # e.g. a streaming body that was never iterated
    assert wait_closed(old)
    slot.close()
