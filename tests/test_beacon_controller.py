"""The beacon task on the sim advertiser: triggered windows (and their extension),
continuous advertising, EID rotation and TLM refresh in place, triggers from other
threads, ignored sources, TX power only where settable, a radio that fails or goes away.

No sleeps as assertions of speed: state is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from daemon.beacon.config import BeaconConfig
from daemon.beacon.controller import BeaconController, info
from daemon.config import validate
from hal.ble.base import BeaconEvent
from hal.ble.sim import SimAdvertiser
from protocol.beacon.eid import EidSchedule
from protocol.beacon.frames import EidFrame, TlmFrame, parse_advertisement
from protocol.errors import HardwareUnavailable
from tests.configs import raw_config

KEY = "000102030405060708090a0b0c0d0e0f"
DEADLINE_S = 15.0


def beacon(**extra: Any) -> BeaconConfig:
    raw = raw_config()
    raw["beacon"] = {"enabled": True, "uuid": "e2c56db5-dffb-48d2-b060-d0f5a71096e0",
                     "major": 1, "minor": 7, "namespace": "8b0ca750e7a74e14bd99",
                     "eid_key": KEY, **extra}
    return validate(raw).beacon


async def until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run_with(config: BeaconConfig, body: Callable[[BeaconController, SimAdvertiser],
                                                   Awaitable[None]],
             sim: SimAdvertiser | None = None) -> BeaconController:
    sim = sim or SimAdvertiser()
    controller = BeaconController(config=config, advertiser=sim, temperature=lambda: 41.5)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(stop))
        try:
            await body(controller, sim)
        finally:
            stop.set()
            await asyncio.wait_for(task, DEADLINE_S)
        assert not sim.on_air()  # closing took everything off air

    asyncio.run(main())
    return controller


def test_a_trigger_puts_every_frame_on_air_for_the_window_then_off() -> None:
    config = beacon(window_s=1)
    events: list[tuple[str, BeaconEvent]] = []

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        sim.subscribe(lambda slot, event: events.append((slot, event)))
        await until("the adapter", lambda: c.adapter is not None)
        assert not sim.on_air()  # triggered mode: nothing until a trigger
        assert c.trigger("tap")["accepted"]
        await until("on air", lambda: len(sim.on_air()) == len(config.frames))
        assert set(sim.on_air()) == set(config.frames)
        assert {r.timeout_s for r in sim.on_air().values()} == {1}
        assert c.state()["on_air"] == sorted(config.frames)
        await until("the window to end", lambda: not sim.on_air())
        await until("the task to see it", lambda: c.state()["window_left_s"] is None)

    c = run_with(config, body)
    assert c.stats.triggers == {"tap": 1}
    assert c.stats.registrations == 1
    assert [e for _, e in events].count(BeaconEvent.EXPIRED) == len(config.frames)


def test_a_new_trigger_extends_the_window_in_place() -> None:
    config = beacon(window_s=2, frames=["ibeacon"])

    events: list[BeaconEvent] = []

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        sim.subscribe(lambda slot, event: events.append(event))
        c.trigger("command")
        await until("on air", lambda: "ibeacon" in sim.on_air())
        started = time.monotonic()
        await asyncio.sleep(1.2)
        c.trigger("button", window_s=3)  # a longer window, asked for by an operator
        await until("the update", lambda: sim.updates["ibeacon"] == 1)
        assert sim.on_air()["ibeacon"].timeout_s == 3
        await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
        assert "ibeacon" in sim.on_air()  # past the first window: still on air
        await until("the longer window to end", lambda: not sim.on_air())

    c = run_with(config, body)
    # registered once, changed in place, ended once: never re-registered
    assert events == [BeaconEvent.REGISTERED, BeaconEvent.UPDATED, BeaconEvent.EXPIRED]
    assert c.stats.registrations == 1 and c.stats.updates == 1
    assert c.stats.triggers == {"command": 1, "button": 1}


def test_continuous_rotates_the_eid_in_place_at_the_period_boundary() -> None:
    config = beacon(mode="continuous", eid_exponent=0, frames=["eddystone-eid", "ibeacon"])
    schedule = EidSchedule(identity_key=bytes.fromhex(KEY), exponent=0, epoch=0)

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        await until("on air", lambda: len(sim.on_air()) == 2)
        assert all(r.timeout_s is None for r in sim.on_air().values())
        await until("two rotations", lambda: sim.updates["eddystone-eid"] >= 2)
        frame = parse_advertisement(sim.on_air()["eddystone-eid"].advertisement)
        assert isinstance(frame, EidFrame)
        now = time.time()
        assert frame.eid in {schedule.eid_at(now), schedule.eid_at(now - 1)}
        assert sim.updates["ibeacon"] == 0  # only what changed is touched

    sim = SimAdvertiser()
    c = run_with(config, body, sim)
    registered = [slot for slot, _ in sim.requests]
    assert registered.count("ibeacon") == 1  # registered once, never again
    eids = {parse_advertisement(r.advertisement).eid  # type: ignore[union-attr]
            for slot, r in sim.requests if slot == "eddystone-eid"}
    assert len(eids) >= 3  # a new EID each period
    assert c.stats.rotations >= 2
    assert c.stats.triggers == {}


def test_telemetry_frame_refreshes_with_uptime_and_count() -> None:
    config = beacon(mode="continuous", tlm_interval_s=1, frames=["ibeacon", "eddystone-tlm"],
                    interval_ms=100)

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        await until("a refresh", lambda: sim.updates["eddystone-tlm"] >= 1)

    sim = SimAdvertiser()
    run_with(config, body, sim)
    tlm = [parse_advertisement(r.advertisement) for slot, r in sim.requests
           if slot == "eddystone-tlm"]
    assert all(isinstance(t, TlmFrame) for t in tlm)
    first, last = tlm[0], tlm[-1]
    assert isinstance(first, TlmFrame) and isinstance(last, TlmFrame)
    assert last.uptime_s >= first.uptime_s + 0.9
    assert last.adv_count >= 9  # ~1 s on air at 100 ms
    assert last.temperature_c == 41.5 and last.battery_mv == 0


def test_triggers_from_other_threads_and_ignored_sources() -> None:
    config = beacon(window_s=5, triggers=["button"], frames=["ibeacon"])

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        await until("the adapter", lambda: c.adapter is not None)
        answer = c.trigger("tap")
        assert answer == {"accepted": False,
                          "reason": "beacon.triggers does not include 'tap'"}
        await asyncio.sleep(0.2)
        assert not sim.on_air()
        thread = threading.Thread(target=c.trigger, args=("button",))
        thread.start()
        thread.join()
        await until("on air", lambda: "ibeacon" in sim.on_air())

    c = run_with(config, body)
    assert c.stats.ignored == 1 and c.stats.triggers == {"button": 1}


@pytest.mark.parametrize("settable", [True, False])
def test_tx_power_only_where_the_adapter_can_set_it(settable: bool) -> None:
    config = beacon(mode="continuous", tx_power_dbm=-4, frames=["ibeacon"])

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        await until("on air", lambda: "ibeacon" in sim.on_air())
        assert sim.on_air()["ibeacon"].tx_power_dbm == (-4 if settable else None)
        assert c.state()["tx_power_settable"] is settable
        published = info(config, c.state())
        assert published["tx_power_dbm"] == (-4 if settable else None)

    run_with(config, body, SimAdvertiser(can_set_tx_power=settable))


def test_a_refused_advertisement_loses_the_trigger_not_the_task() -> None:
    config = beacon(window_s=5, frames=["ibeacon"])

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        await until("the adapter", lambda: c.adapter is not None)
        sim.fail_next(HardwareUnavailable("ble", "advertisement refused: Failed"))
        c.trigger("tap")
        await until("the error", lambda: "refused" in c.state()["last_error"])
        assert not sim.on_air()
        c.trigger("tap")  # the next trigger works
        await until("on air", lambda: "ibeacon" in sim.on_air())
        assert c.state()["last_error"] == ""

    run_with(config, body)


def test_radio_lost_and_restored() -> None:
    config = beacon(mode="continuous", frames=["ibeacon"])

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        await until("on air", lambda: "ibeacon" in sim.on_air())
        sim.lose_radio()
        assert c.state()["last_error"] == "bluetoothd or the adapter went away"
        assert c.stats.lost == 1
        sim.restore_radio()
        assert c.state()["last_error"] == ""
        assert "ibeacon" in sim.on_air()

    run_with(config, body)


def test_published_info_names_the_ids_and_never_the_key() -> None:
    config = beacon(url="https://tg.example/a7")
    published = info(config)
    assert published["ibeacon"] == {"uuid": "e2c56db5-dffb-48d2-b060-d0f5a71096e0",
                                    "major": 1, "minor": 7}
    assert published["eddystone_uid"] == {"namespace": "8b0ca750e7a74e14bd99",
                                          "instance": "000000a00001"}
    assert published["eddystone_url"] == "https://tg.example/a7"
    assert published["eid"] == {"exponent": 10, "epoch": 0}
    assert published["rssi_threshold"] == -65
    assert KEY not in repr(published).lower()


class DeafRadio(SimAdvertiser):
    """A bluetoothd that takes the Timeout and never ends the window (no Release)."""

    def _arm(self, slot: str, request: Any) -> None:
        pass


def test_the_task_ends_a_window_the_radio_does_not() -> None:
    config = beacon(window_s=1, frames=["ibeacon"])

    async def body(c: BeaconController, sim: SimAdvertiser) -> None:
        c.trigger("tap")
        await until("on air", lambda: "ibeacon" in sim.on_air())
        await until("withdrawn by the task", lambda: not sim.on_air())
        assert c.state()["window_left_s"] is None

    run_with(config, body, DeafRadio())
