"""BLE beacon advertising for the gate: frame building and parsing, Eddystone-EID rotation."""
