"""Messages between the coordinator and the workers are typed: frozen dataclasses, each handled on its side,
an unknown one an error that names it."""
import dataclasses
import pickle

import pytest

from pdcli import SamplingParams
from pdcli.coordinator.central import CentralScheduler
from pdcli.coordinator.handoff_relay import HandoffRelay
from pdcli.messages import (TO_COORDINATOR, TO_WORKER, PeersConnected, Ready, StatsRequest, Submit, UnknownMessage, WorkerFailed,
                            WorkerStats, dispatch)


def test_every_message_is_a_frozen_dataclass_that_pickles():
    for kind in TO_WORKER + TO_COORDINATOR:
        assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen, kind
    msg = Submit("r1", [1, 2, 3], SamplingParams(temperature=0), 7, handoff=True)
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_an_unknown_message_is_an_error_that_names_it():
    with pytest.raises(UnknownMessage, match="tuple"):
        dispatch({Submit: lambda m: None}, ("add", "r1"), "a worker")


def test_each_side_handles_every_message_sent_to_it():
    coordinator = set(CentralScheduler.HANDLERS) | set(HandoffRelay.HANDLERS) | {Ready, WorkerFailed, PeersConnected}
    assert coordinator == set(TO_COORDINATOR)


class FakeConn:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def test_a_worker_handles_every_message_sent_to_it():
    from pdcli.config import EngineConfig
    from pdcli.engine.llm_engine import LLMEngine
    from pdcli.workers.layout import WorkerSpec
    from pdcli.workers.worker import Worker

    engine = LLMEngine(EngineConfig.from_kwargs("dummy:tiny-llama", device="cpu", num_kv_blocks=16))
    w = Worker(WorkerSpec(0, "collocated", "cpu"), engine, FakeConn())
    assert set(w.handlers) == set(TO_WORKER)
    assert w.handle(StatsRequest())
    assert isinstance(w.conn.sent[-1], WorkerStats) and w.conn.sent[-1].num_free_blocks == 16
    with pytest.raises(UnknownMessage, match="collocated worker 0 .*tuple"):
        w.handle(("stats",))
