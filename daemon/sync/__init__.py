"""Sync with the back office over MQTT: the journal as outbox, signed remote management."""
