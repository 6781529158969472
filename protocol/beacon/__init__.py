"""BLE beacon frames (iBeacon, Eddystone UID/URL/TLM/EID) and the rotating EID."""
