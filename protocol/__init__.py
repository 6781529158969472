"""The ground floor: what tapgate's parts say to each other and to cards, phones and the
back office, byte for byte. It imports nothing else of tapgate's.

    errors     the one exception hierarchy
    tgp1/      the TGP1 purse protocol (PURSE.md): APDUs, crypto, TLV
    entry      the journal entry format: fields, canonical JSON, chain hash, signatures
    devicekey  the gate's Ed25519 device key on disk
    contract   the MQTT contract: topics, batches, acks, commands, replies, status
    command    signed commands: parsing, verification, refusal reasons
    mqtt       the MQTT v5 client both ends use: TLS, CONNECT and PUBLISH properties
    beacon/    BLE beacon frames and the Eddystone-EID rotating identifier
"""
