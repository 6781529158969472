"""The TGP1 purse protocol (../shared/PURSE.md): crypto, commands and their answers."""
