"""tapgate's reference head-end (back office): stores every gate's journal entries once,
checks their hash chain, device signatures and TACs, acknowledges after storing, and signs
operator commands. The wire contract is protocol.contract, shared with the gate."""

__version__ = "0.1.0"
