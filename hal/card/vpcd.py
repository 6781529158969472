"""The vpcd transport: a :class:`VirtualPurse` presented to a real pcscd.

vsmartcard's vpcd driver gives pcscd a reader ("Virtual PCD 00 00") whose card is a
program connected to it over TCP (../shared/PURSE.md, "A virtual card over vpcd").
Connecting puts the card in the field, closing the socket takes it out. A card that
tears (the model raises :class:`CardTorn`) leaves without answering, exactly as a card
pulled out mid-exchange would.

While inserted, the card stays in the field: when pcscd goes away (a restart), the card
reconnects as soon as vpcd listens again, like a card lying on a reader whose service
was restarted.

Run ``python -m hal.card.vpcd --serial HEX --balance N --purchase-key HEX --tac-key HEX``
to keep one card on the reader until Ctrl-C (demos, manual tests with pcsc_scan).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

from hal.card.model import CardTorn, VirtualPurse

log = logging.getLogger("tapgate.vpcd")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 35963  # the first vpcd reader, "Virtual PCD 00 00"

_POWER_OFF = 0x00
_POWER_ON = 0x01
_RESET = 0x02
_GET_ATR = 0x04

_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_BACKOFF_FIRST_S = 0.02
_BACKOFF_MAX_S = 0.25  # a restarted pcscd is used again within this much of listening


class _Left(Exception):
    """The connection ended: vpcd closed it (``torn`` False), or the card left the field
    in the middle of an exchange (``torn`` True)."""

    def __init__(self, torn: bool) -> None:
        self.torn = torn
        super().__init__("card left mid-exchange" if torn else "connection closed")


class VpcdCard:
    """One virtual card that can be put on (``insert``) and taken off (``remove``) a vpcd
    reader. Thread-safe; the exchange with vpcd runs on a background thread."""

    def __init__(self, *, card: VirtualPurse, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT) -> None:
        self.card = card
        self.host = host
        self.port = port
        self._cond = threading.Condition()
        self._want_in = False  # the card is meant to be in the field
        self._sock: socket.socket | None = None  # set while connected to vpcd
        self._closed = False
        self._thread: threading.Thread | None = None
        self.connections = 0  # how many times vpcd had this card (diagnostics, tests)
        self.tears = 0

    def __repr__(self) -> str:
        return f"VpcdCard(serial={self.card.serial.hex().upper()}, port={self.port})"

    # -- the field ---------------------------------------------------------------------
    @property
    def inserted(self) -> bool:
        """True while connected to vpcd, i.e. while the reader can see the card."""
        with self._cond:
            return self._sock is not None

    def insert(self, timeout: float | None = 30.0) -> None:
        """Put the card in the field; return once vpcd took the connection.

        Retries while nothing listens (pcscd starting or restarting). Raises
        :class:`TimeoutError` if vpcd did not listen within ``timeout`` seconds; the card
        then keeps trying in the background until :meth:`remove` or :meth:`close`.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the card is closed")
            self._want_in = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"vpcd-{self.port}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._sock is not None or self._closed,
                                       timeout):
                raise TimeoutError(f"vpcd does not listen on {self.host}:{self.port}")

    def remove(self, timeout: float = 10.0) -> None:
        """Take the card out of the field; return once the connection is closed."""
        with self._cond:
            self._want_in = False
            self._drop_locked()
            self._cond.wait_for(lambda: self._sock is None, timeout)

    def wait_removed(self, timeout: float) -> bool:
        """Block until the card is out of the field (removed or torn); True if it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._sock is None, timeout)

    def close(self) -> None:
        """Remove the card for good and stop the background thread."""
        with self._cond:
            self._closed = True
            self._want_in = False
            self._drop_locked()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10.0)

    def __enter__(self) -> VpcdCard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the background thread ---------------------------------------------------------
    def _drop_locked(self) -> None:
        # shutdown() wakes the thread blocked in recv(); that thread closes the socket
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._want_in or self._closed)
                if self._closed:
                    return
            sock = self._connect()
            if sock is None:
                continue
            torn = False
            try:
                self._serve(sock)
            except _Left as left:
                torn = left.torn
            except OSError as err:
                log.debug("vpcd connection ended: %s", err)
            finally:
                with self._cond:
                    self._sock = None
                    if torn:
                        self.tears += 1
                        self._want_in = False  # a torn card is out of the field
                    self._cond.notify_all()
                with contextlib.suppress(OSError):
                    sock.close()

    def _connect(self) -> socket.socket | None:
        """Connect with a short backoff; None when the card was removed meanwhile."""
        delay = _BACKOFF_FIRST_S
        while True:
            with self._cond:
                if not self._want_in or self._closed:
                    return None
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2.0)
            except OSError:
                with self._cond:
                    self._cond.wait_for(lambda: not self._want_in or self._closed, delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if not self._want_in or self._closed:
                    sock.close()
                    return None
                self._sock = sock
                self.connections += 1
                self._cond.notify_all()
            return sock

    def _serve(self, sock: socket.socket) -> None:
        while True:
            payload = _recv_frame(sock)
            if len(payload) == 1:
                answer = self._control(payload[0])
            else:
                try:
                    answer = self.card.process(payload)
                except CardTorn as torn:
                    log.debug("card %s torn (applied=%s)", self.card.serial.hex(), torn.applied)
                    raise _Left(torn=True) from torn
                if not 0 < len(answer) <= 0xFFFF:
                    # vpcd cannot carry an empty answer (it would wait for it forever):
                    # a card that answers nothing has gone silent, i.e. left the field
                    raise _Left(torn=True)
            if answer is not None:
                sock.sendall(len(answer).to_bytes(2, "big") + answer)

    def _control(self, code: int) -> bytes | None:
        if code in (_POWER_ON, _RESET):
            self.card.power_on()
            return None
        if code == _GET_ATR:
            return self.card.atr
        if code == _POWER_OFF:
            return None
        log.debug("unknown vpcd control %02X", code)
        return None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        # Linux leaves quick-ack mode on its own: without this before every recv, each
        # APDU waits for a delayed ACK (about 40 ms) on top of Nagle.
        if _TCP_QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise _Left(torn=False)
        data += chunk
    return bytes(data)


def _recv_frame(sock: socket.socket) -> bytes:
    size = int.from_bytes(_recv_exact(sock, 2), "big")
    return _recv_exact(sock, size) if size else b""


# -- python -m hal.card.vpcd -----------------------------------------------------------
def _parse_hex(size: int, what: str) -> Callable[[str], bytes]:
    def parse(text: str) -> bytes:
        try:
            value = bytes.fromhex(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{what} must be hex digits") from err
        if len(value) != size:
            raise argparse.ArgumentTypeError(f"{what} must be {size * 2} hex digits")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hal.card.vpcd",
                                     description="Keep a virtual TGP1 card on a vpcd reader.")
    parser.add_argument("--serial", required=True, type=_parse_hex(8, "--serial"))
    parser.add_argument("--balance", required=True, type=int)
    parser.add_argument("--purchase-key", required=True, type=_parse_hex(16, "--purchase-key"))
    parser.add_argument("--tac-key", required=True, type=_parse_hex(16, "--tac-key"))
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    purse = VirtualPurse(serial=args.serial, balance=args.balance,
                         master_key=args.purchase_key, master_tac_key=args.tac_key)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with VpcdCard(card=purse, host=args.host, port=args.port) as vpcd:
        log.info("waiting for vpcd on %s:%d", args.host, args.port)
        while not stop.is_set():
            try:
                vpcd.insert(timeout=1.0)
            except TimeoutError:
                continue  # pcscd not up yet: the card keeps trying
            log.info("card %s in the field (balance %d); Ctrl-C to remove it",
                     args.serial.hex().upper(), purse.balance)
            stop.wait()
    log.info("card removed; balance %d, counter %d", purse.balance, purse.counter)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
