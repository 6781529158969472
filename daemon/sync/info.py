"""The gate's public info, retained on ``tapgate/v1/<gate>/info``: what the back office
shows a passenger whose phone heard this gate's beacon (its name, station, fares, the
beacon's public IDs), never a secret. The uplink publishes it when it says something new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daemon.beacon.config import BeaconConfig
from daemon.config import CARD_TYPES
from daemon.tap import TapProcessor

if TYPE_CHECKING:
    from daemon.beacon.controller import BeaconController


class PublicInfo:
    """The info as it is now (fares operators set, in or out of service), when called."""

    def __init__(self, *, processor: TapProcessor, beacon_config: BeaconConfig,
                 beacon: BeaconController | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._processor = processor
        self._beacon_config = beacon_config
        self._beacon = beacon
        self._clock = clock

    def __call__(self) -> dict[str, Any]:
        gate = self._processor.gate_config
        names = {code: name for name, code in CARD_TYPES.items()}
        beacon = self._beacon_config
        return {
            "v": 1, "gate": gate.gate_id, "name": gate.name, "station": gate.station,
            "ts_ms": int(self._clock() * 1000),
            "status": "out_of_service" if self._processor.out_of_service else "in_service",
            "fares": {names.get(code, str(code)): fare for code, fare in gate.fares.items()},
            "page_url": gate.page_url or beacon.url,
            "beacon": self._beacon_info() if beacon.enabled else None,
        }

    def _beacon_info(self) -> dict[str, Any]:
        from daemon.beacon.controller import info  # the beacon's modules: only with one

        return info(self._beacon_config, self._beacon.state() if self._beacon else None)
