"""The virtual TGP1 card: one card model, two transports (in-process and vpcd)."""
