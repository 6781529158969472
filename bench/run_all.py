"""Every benchmark, one after the other, each in a process of its own, output as it comes.

Modest sizes by default (a few minutes in all); ``--big`` for the full sizes, or set each:

    python -m bench.run_all [--big] [--latency-taps N] [--throughput-taps N]
                            [--throughput-cards N]

tap_latency needs pcscd and vsmartcard-vpcd (it starts pcscd if none runs), drain
mosquitto, beacon dbus-daemon and python-dbusmock (`make test` installs them); the exit
status is non-zero if a benchmark failed to run (a missed target is no failure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODEST = {"latency_taps": 100, "throughput_taps": 10_000, "throughput_cards": 1_000}
BIG = {"latency_taps": 300, "throughput_taps": 100_000, "throughput_cards": 5_000}


def run(title: str, module: str, *args: str) -> int:
    command = [sys.executable, "-m", module, *args]
    print(f"=== {title}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    rc = subprocess.run(command, check=False).returncode
    print(f"=== {title}: exit {rc} after {time.monotonic() - started:.0f} s\n", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all")
    parser.add_argument("--big", action="store_true",
                        help=f"full sizes ({BIG}) instead of modest ones ({MODEST})")
    parser.add_argument("--latency-taps", type=int)
    parser.add_argument("--throughput-taps", type=int)
    parser.add_argument("--throughput-cards", type=int)
    args = parser.parse_args(argv)
    sizes = dict(BIG if args.big else MODEST)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)

    failed = []
    if run("tap latency (pcscd + vpcd)", "bench.tap_latency",
           "--taps", str(sizes["latency_taps"])):
        failed.append("tap_latency")
    if run("tap throughput (sim reader)", "bench.tap_throughput",
           "--taps", str(sizes["throughput_taps"]), "--cards", str(sizes["throughput_cards"])):
        failed.append("tap_throughput")
    if run("journal drain over MQTT (mosquitto)", "bench.drain",
           "--entries", "100000" if args.big else "30000"):
        failed.append("drain")
    if run("beacon (BlueZ mock on D-Bus)", "bench.beacon"):
        failed.append("beacon")
    if failed:
        print(f"failed to run: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
