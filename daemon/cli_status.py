"""`tapgate status`: is the daemon running, how is its reader, what is it owed?

What only the running daemon knows comes from its status file (daemon.status); what the
journal knows (the last taps, pending recoveries, entries not yet synced) is read from
the journal, read-only. Exit 0 when the daemon runs and raises no alarm; 1 otherwise
(not running, hung, an alarm, or a journal that cannot be read), as `systemctl status`
does for a unit that is not active.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from daemon.cli_journal import TAP_OUTCOMES_SQL, JournalView, local_time, money
from daemon.config import Config
from daemon.status import Liveness, ago, liveness, read_status
from protocol.entry import KIND_PASS, KIND_RECOVERY, KIND_REFUSAL, TORN, Entry
from protocol.errors import JournalError

EXIT_FAULT = 1
_WIDTH = 21


def _outcome(entry: Entry) -> str:
    if entry.kind == KIND_REFUSAL:
        return "refused"
    if entry.kind == KIND_PASS:
        return "pass"
    if entry.kind == KIND_RECOVERY:
        return "recovered" if entry.state == "recovered" else \
            f"recovery: {entry.state.replace('_', ' ')}"
    return TORN if entry.state == TORN else "completed"


def _journal_facts(config: Config, taps: int, now: float) -> dict[str, Any]:
    facts: dict[str, Any] = {"path": str(config.journal.path), "error": None}
    uplink = config.mqtt
    facts["uplink"] = f"{uplink.host}:{uplink.port}" if uplink.enabled else None
    try:
        with JournalView(config.journal.path) as view:
            facts["entries"] = view.count()
            facts["pending_sync"] = view.pending_sync()
            facts["pending_recoveries"] = [
                {"entry": e.id, "card_serial": (e.card_serial or b"").hex().upper(),
                 "amount": e.amount, "torn_at": e.created_ms / 1000,
                 "age_s": round(now - e.created_ms / 1000, 1)}
                for e in view.pending_recoveries()]
            facts["last_taps"] = [
                {"entry": e.id, "at": e.created_ms / 1000,
                 "card_serial": e.card_serial.hex().upper() if e.card_serial else None,
                 "outcome": _outcome(e), "amount": e.amount, "reason": e.reason}
                for e in map(view.entry, view.last_rows(taps, TAP_OUTCOMES_SQL))] \
                if taps > 0 else []
    except JournalError as err:
        facts["error"] = str(err)
    return facts


def gather(config: Config, *, taps: int = 10, now: float | None = None) -> dict[str, Any]:
    """Everything `tapgate status` shows, as the --json document."""
    now = time.time() if now is None else now
    doc = read_status(config.journal.status_path)
    alive = liveness(doc, now, config.service.status_interval_s)
    if doc is None and config.journal.status_path.exists():
        alive = Liveness(False, "not running (unreadable status file)")
    alarms = [str(a) for a in doc.get("alarms", [])] if doc is not None and alive.running \
        else []
    journal = _journal_facts(config, taps, now)
    return {
        "ok": alive.running and not alarms and journal["error"] is None,
        "daemon": {"running": alive.running, "summary": alive.summary, "pid": alive.pid,
                   "status_age_s": round(alive.age_s, 1) if alive.age_s is not None else None,
                   "status_file": str(config.journal.status_path)},
        "alarms": alarms,
        "status": doc,
        "journal": journal,
    }


def _line(label: str, value: str) -> str:
    return f"{label + ':':<{_WIDTH}}{value}"


def render(facts: dict[str, Any], now: float) -> list[str]:
    daemon, doc, journal = facts["daemon"], facts["status"], facts["journal"]
    out = [_line("tapgate", daemon["summary"])]
    if doc is not None:
        stale = "" if daemon["running"] else f" (last known, {ago(now - doc['updated_at'])} ago)"
        reader = doc.get("reader", {})
        taps = ", ".join(f"{n} {outcome.replace('_', ' ')}"
                         for outcome, n in doc.get("taps", {}).items() if n) or "none"
        out += [
            _line("terminal", f"{doc.get('terminal_id')} (tapgate {doc.get('version')})"),
            _line("reader", f"{reader.get('name') or '?'}: {reader.get('state')}{stale}"),
            _line("broker link", f"{doc.get('broker_link')}{stale}"),
            _line("beacon", f"{doc.get('beacon')}{stale}"),
            _line("taps since start", taps + stale),
        ]
        if doc.get("out_of_service"):
            out.append(_line("gate", "OUT OF SERVICE" + stale))
    else:
        out.append(_line("reader", "unknown (no status from the daemon)"))
    out.append(_line("alarms", ", ".join(facts["alarms"]) or "none"))
    if journal["error"] is not None:
        out.append(_line("journal", journal["error"]))
        return out
    pending = f"{journal['pending_sync']:,}"
    out += [
        _line("journal", f"{journal['path']}, {journal['entries']:,} entries"),
        _line("pending sync", pending if journal["uplink"] else
              f"{pending} (no uplink configured)"),
        _line("pending recoveries", str(len(journal["pending_recoveries"]))),
    ]
    out += [f"  {r['card_serial']}  {money(r['amount']):>8}  torn {ago(r['age_s'])} ago "
            f"(entry #{r['entry']})" for r in journal["pending_recoveries"]]
    if journal["last_taps"]:
        out.append(f"last {len(journal['last_taps'])} taps:")
        for tap in journal["last_taps"]:
            amount = "-" if tap["outcome"] == "refused" else money(tap["amount"])
            reason = f" ({tap['reason']})" if tap["reason"] else ""
            out.append(f"  {local_time(int(tap['at'] * 1000))}  {tap['card_serial'] or '?':16}"
                       f"  {amount:>8}  {tap['outcome']}{reason}")
    else:
        out.append(_line("last taps", "none"))
    return out


def status(config: Config, *, taps: int = 10, as_json: bool = False) -> int:
    now = time.time()
    facts = gather(config, taps=taps, now=now)
    if as_json:
        sys.stdout.write(json.dumps(facts, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(render(facts, now)) + "\n")
    return 0 if facts["ok"] else EXIT_FAULT
