"""BLE advertising (the gate's beacon): the contract in :mod:`hal.ble.base`, backends
``sim`` (:mod:`hal.ble.sim`) and ``bluez`` (:mod:`hal.ble.bluez`), chosen through
:mod:`hal.registry`; :mod:`hal.ble.scan` looks for phones and for the gate's own beacon."""
