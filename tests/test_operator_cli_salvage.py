"""`tapgate journal salvage` as an operator runs it: out of a damaged journal (a page
turned to garbage, bytes overwritten blindly, a WAL a power cut left unmerged) it copies
what can still be read into a new file and says what was lost; an intact journal is
copied whole, with its remote management state; it refuses while the daemon runs,
without the schema, and to overwrite anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from daemon.journal import Journal
from protocol.entry import KIND_REFUSAL, REFUSED, Draft
from tests.cards import TERMINAL_ID
from tests.operator_cli_support import build_journal, config_for, digest, running_board, tapgate


# --- tapgate journal salvage -----------------------------------------------------------------
def table_page_of(path: Path, entry_id: int) -> tuple[int, int]:
    """The page holding entry ``entry_id``'s row (its hash is stored nowhere else but in
    the next entry's prev_hash, on the same or the next page)."""
    db = sqlite3.connect(path)
    (value,) = db.execute("SELECT hash FROM entry WHERE id = ?", (entry_id,)).fetchone()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return path.read_bytes().index(value) // page_size, page_size


def salvage_setup(tmp_path: Path, n: int = 2000) -> tuple[Path, Path]:
    journal = tmp_path / "journal.db"
    build_journal(journal, n)
    assert not Path(f"{journal}-wal").exists()
    return journal, config_for(tmp_path, journal)


def test_salvage_recovers_all_but_a_damaged_page(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path)
    page, size = table_page_of(journal, 1000)
    with journal.open("r+b") as fh:  # a page in the middle of the file turns to garbage
        fh.seek(page * size)
        fh.write(os.urandom(size))
    before = digest(journal)
    broken = tapgate("journal", "verify", "--config", str(config))
    assert broken.returncode == 1
    assert "`tapgate journal salvage` copies out what can still be read" in broken.stderr

    out = tmp_path / "salvaged.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 1, done.stderr  # some entries are lost
    assert digest(journal) == before  # the damaged file untouched
    lines = done.stdout.splitlines()
    lost = [line for line in lines if line.startswith("lost: ")]
    assert len(lost) == 1, done.stdout
    # "lost: ids 990-1004 (15 entries): unreadable"
    first, last = (int(x) for x in lost[0].split()[2].split("-"))
    assert first <= 1000 <= last and last - first < 40
    assert lines[0] == (f"salvaged {2000 - (last - first + 1):,} of 2,000 entries "
                        f"(ids 1-2000) from {journal} into {out}")

    config2 = config_for(tmp_path, out, "salvaged.toml")
    check = tapgate("journal", "verify", "--config", str(config2))
    assert check.returncode == 1
    assert check.stdout.splitlines() == [
        f"FAULT entry {last + 1}: prev_hash breaks the chain",
        f"FAULT entry {last + 1}: follows {first - 1}, entries missing",
        f"{2000 - (last - first + 1)} entries, FAULTS FOUND",
    ], check.stdout
    exported = tapgate("journal", "export", "--config", str(config2))
    ids = [json.loads(line)["id"] for line in exported.stdout.splitlines()]
    assert ids == [*range(1, first), *range(last + 1, 2001)]
    # the terminal sequence goes on above anything the lost entries may have used
    db = sqlite3.connect(out)
    (seq,) = db.execute("SELECT value FROM meta WHERE key = 'max_terminal_seq'").fetchone()
    db.close()
    assert int(seq) >= 1000 + (last - first + 1)


@pytest.mark.parametrize("where", [0.5, 0.33, -5000])
def test_salvage_of_bytes_overwritten_blindly(tmp_path: Path, where: float) -> None:
    """Blind damage: whatever it hits (inner pages, the last pages), what salvage reports
    lost is what the salvaged journal lacks, and everything in it is intact."""
    journal, config = salvage_setup(tmp_path)
    size = journal.stat().st_size
    with journal.open("r+b") as fh:
        fh.seek(int(size * where) if where > 0 else size + int(where))
        fh.write(b"\xa5" * 3000)
    out = tmp_path / "salvaged.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode in (0, 1), done.stderr
    lines = done.stdout.splitlines()
    span = lines[0].split("(ids ")[1].split()[0].rstrip(")")
    first, last = (int(x) for x in span.split("-"))
    lost: set[int] = set()
    for line in lines:
        if line.startswith("lost: ids "):
            a, b = (int(x) for x in line.split()[2].split("-"))
            lost.update(range(a, b + 1))
        elif line.startswith("lost: id "):
            lost.add(int(line.split()[2]))
    db = sqlite3.connect(out)
    kept = [row[0] for row in db.execute("SELECT id FROM entry ORDER BY id")]
    db.close()
    assert first == 1 and sorted(set(kept) | lost) == list(range(1, last + 1))
    assert not set(kept) & lost
    assert (done.returncode == 0) == (last == 2000 and not lost)
    check = tapgate("journal", "verify", "--config",
                    str(config_for(tmp_path, out, "salvaged.toml")))
    faults = [line for line in check.stdout.splitlines() if line.startswith("FAULT")]
    assert not any("hash does not match" in line for line in faults)
    assert (check.returncode == 0) == (not lost), check.stdout


def test_salvage_of_an_intact_journal_copies_everything(tmp_path: Path) -> None:
    _, config = salvage_setup(tmp_path, 300)
    out = tmp_path / "copy.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("salvaged all 300 entries (ids 1-300)")
    original = tapgate("journal", "export", "--config", str(config))
    copied = tapgate("journal", "export", "--config",
                     str(config_for(tmp_path, out, "copy.toml")))
    assert copied.stdout == original.stdout


def test_salvage_keeps_the_remote_management_state(tmp_path: Path) -> None:
    """The replay high-water, the deny list and remote config travel with the entries:
    a salvaged gate must not accept an old signed command again."""
    journal, config = salvage_setup(tmp_path, 50)
    with Journal(journal):  # migrated: the v5 tables exist; fill them as commands would
        pass
    db = sqlite3.connect(journal)
    db.execute("INSERT INTO command_seq VALUES ('00AABBCCDDEEFF00', 41)")
    db.execute("INSERT INTO deny_list VALUES (?)", (bytes.fromhex("8801000000000007"),))
    db.execute("INSERT INTO remote_config VALUES ('gate.anti_passback_s', '60')")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('deny_list_version', '3')")
    db.commit()
    db.close()
    out = tmp_path / "copy.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    with Journal(out) as copy:
        assert copy.last_command_seq("00AABBCCDDEEFF00") == 41
        assert copy.deny_list() == (3, frozenset({bytes.fromhex("8801000000000007")}))
        assert copy.remote_config() == {"gate.anti_passback_s": 60}


def test_salvage_reads_the_wal_of_a_journal_that_died(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    writer = Journal(gate / "journal.db").open()
    for n in range(50):
        writer.append(Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID,
                            reason=f"r{n}"))
    crashed = tmp_path / "crashed"  # the files as a power cut leaves them: WAL unmerged
    crashed.mkdir()
    for name in ("journal.db", "journal.db-wal"):
        (crashed / name).write_bytes((gate / name).read_bytes())
    writer.close()
    sums = {p.name: digest(p) for p in crashed.iterdir()}
    config = config_for(tmp_path, crashed / "journal.db")
    done = tapgate("journal", "salvage", "--config", str(config), "--out",
                   str(tmp_path / "new.db"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("salvaged all 50 entries (ids 1-50)")
    assert {p.name: digest(p) for p in crashed.iterdir()} == sums  # nothing merged, nothing added


def test_salvage_refuses_while_the_daemon_runs(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path, 10)
    running_board().write(journal.with_name("status.json"))
    done = tapgate("journal", "salvage", "--config", str(config), "--out",
                   str(tmp_path / "new.db"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tapgate: the daemon is running (pid {os.getpid()}, up ")
    assert not (tmp_path / "new.db").exists()


def test_salvage_needs_the_schema(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path, 100)
    with journal.open("r+b") as fh:  # page 1 holds the schema: nothing says where rows are
        fh.seek(100)
        fh.write(b"\xa5" * 3000)
    out = tmp_path / "new.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tapgate: cannot read the schema of {journal}")
    assert done.stderr.endswith("nothing can be salvaged\n")
    assert not out.exists()


def test_salvage_never_overwrites(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path, 10)
    out = tmp_path / "new.db"
    out.write_text("precious\n")
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tapgate: {out} exists: salvage never overwrites")
    assert out.read_text() == "precious\n"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(journal))
    assert done.returncode == 1 and "never overwrites" in done.stderr
    assert [p.name for p in tmp_path.iterdir() if ".salvage-" in p.name] == []
