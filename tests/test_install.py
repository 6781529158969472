"""`make install` and `make uninstall`, staged with DESTDIR into a temporary root: every file
where the unit and its companions say it goes, with its mode and owner; the tapgate user
made by the real systemd-sysusers and the directories by the real systemd-tmpfiles (both
with --root); an operator's config never overwritten; config and journal kept on
uninstall unless PURGE=1.

To stay fast the staged venv gets the project without its dependencies (PIP_ARGS=--no-deps;
building pyscard alone takes minutes) and is made from this test's own interpreter, whose
site-packages then lend the dependencies when the installed code is run. Everything else
is the path a real `make install` takes, and the dry run below checks that the real
install uses none of these knobs.
"""

from __future__ import annotations

import marshal
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
VENV = "opt/tapgate/venv"
TIMEOUT_S = 300.0  # generous: pip builds the wheel; only a hang should get near it

# installed path (under the root) -> source file, all root:root 0644
COMPANIONS = {
    "etc/systemd/system/tapgate.service": SYSTEMD / "tapgate.service",
    "usr/lib/sysusers.d/tapgate.conf": SYSTEMD / "tapgate.sysusers",
    "usr/lib/tmpfiles.d/tapgate.conf": SYSTEMD / "tapgate.tmpfiles",
    "etc/polkit-1/rules.d/50-tapgate-pcscd.rules": SYSTEMD / "50-tapgate-pcscd.rules",
    "etc/dbus-1/system.d/tapgate-bluez.conf": SYSTEMD / "tapgate-bluez.conf",
}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="make install sets owners: needs root"),
    pytest.mark.skipif(not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
                       reason="needs systemd-sysusers and systemd-tmpfiles (apt install systemd)"),
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]


def _make(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DESTDIR", "PREFIX", "PURGE", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def restrictive_umask() -> None:
        os.umask(umask)

    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT_S,
                          preexec_fn=restrictive_umask, check=False)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{done.args}: exit {done.returncode}\n{output[-4000:]}"
    return output


def _base_python() -> str:
    """The interpreter this test's venv was made from: the staged venv is made from it too,
    so that this venv's compiled dependencies fit it."""
    return str(getattr(sys, "_base_executable", sys.executable))


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int


def _tapgate_ids(root: Path) -> Ids:
    """The tapgate user as systemd-sysusers --root made it in the staged /etc."""
    passwd = {line.split(":")[0]: line.split(":")
              for line in (root / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":")
             for line in (root / "etc/group").read_text().splitlines()}
    assert "tapgate" in passwd, "systemd-sysusers made no tapgate user"
    user = passwd["tapgate"]
    assert user[5:7] == ["/var/lib/tapgate", "/usr/sbin/nologin"], user
    assert int(user[3]) == int(group["tapgate"][2])
    return Ids(int(user[2]), int(group["tapgate"][2]))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def _install(root: Path, *extra: str, umask: int = 0o022) -> str:
    return _ok(_make("install", f"DESTDIR={root}", "PIP_ARGS=--no-deps",
                     f"INSTALL_PYTHON={_base_python()}", *extra, umask=umask))


def _check_layout(root: Path) -> None:
    ids = _tapgate_ids(root)

    for rel, source in COMPANIONS.items():
        path = root / rel
        assert path.is_file(), f"{rel} not installed"
        assert (_mode(path), _owner(path)) == (0o644, (0, 0)), rel
        assert path.read_bytes() == source.read_bytes(), f"{rel} differs from {source.name}"

    conf_dir, conf = root / "etc/tapgate", root / "etc/tapgate/tapgate.toml"
    assert (_mode(conf_dir), _owner(conf_dir)) == (0o750, (0, ids.gid))
    assert (_mode(conf), _owner(conf)) == (0o640, (0, ids.gid))
    assert conf.read_bytes() == (ROOT / "config/gate.example.toml").read_bytes()
    state = root / "var/lib/tapgate"
    assert (_mode(state), _owner(state)) == (0o750, (ids.uid, ids.gid))

    venv = root / VENV
    script = venv / "bin/tapgate"
    assert _mode(script) == 0o755
    # staged, but naming where it will run
    assert script.read_text().splitlines()[0] == "#!/opt/tapgate/venv/bin/python"
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            assert str(root) not in path.read_text(errors="replace"), f"{path} names DESTDIR"
    # the service reads the venv as tapgate: everything in it readable by others,
    # even though make ran with umask 077
    unreadable = [p for p in venv.rglob("*")
                  if not p.is_symlink() and not _mode(p) & stat.S_IROTH]
    assert not unreadable, f"not world-readable: {unreadable[:5]}"

    # byte-compiled at install time (the unit forbids writing bytecode), under final paths
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv),
                                                    "platbase": str(venv)}))
    assert (site / "daemon/cli.py").is_file(), f"the project is not in {site}"
    for package in ("daemon", "hal"):
        for source in (site / package).rglob("*.py"):
            compiled = list(source.parent.glob(f"__pycache__/{source.stem}.*.pyc"))
            assert compiled, f"{source.relative_to(site)} has no bytecode"
    pyc = next((site / "daemon/__pycache__").glob("cli.*.pyc"))
    code = marshal.loads(pyc.read_bytes()[16:])
    assert code.co_filename == f"/{VENV}/{site.relative_to(venv)}/daemon/cli.py"

    # the installed code runs from the staged venv and accepts the installed config
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": sysconfig.get_path("purelib")}  # lends the dependencies only
    python = str(venv / "bin/python")
    where = subprocess.run([python, "-c", "import daemon.cli; print(daemon.cli.__file__)"],
                           capture_output=True, text=True, env=env, cwd=root, timeout=60,
                           check=False)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(site / "daemon/cli.py")
    # staged under DESTDIR: the files it names are not where it says yet (--no-files)
    check = subprocess.run([python, "-m", "daemon.cli", "config", "check", "--no-files",
                            str(conf)],
                           capture_output=True, text=True, env=env, cwd=root, timeout=60,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_install_reinstall_uninstall_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"

    output = _install(root, umask=0o077)
    _check_layout(root)
    assert "apt-get" not in output and "system packages skipped (DESTDIR is set)" in output
    assert "systemctl daemon-reload skipped (DESTDIR is set)" in output
    assert "systemctl enable --now tapgate.service" in output  # the next steps

    # the operator's config survives a second install, contents, mode and owner
    conf = root / "etc/tapgate/tapgate.toml"
    ids = _tapgate_ids(root)
    mine = conf.read_text() + '\n# the operator was here\n[metrics]\nlisten = "127.0.0.1:9464"\n'
    conf.write_text(mine)
    os.chown(conf, 0, ids.gid)
    conf.chmod(0o600)
    (root / "var/lib/tapgate/journal.db").write_bytes(b"the gate's record")
    output = _install(root)
    assert "keeping /etc/tapgate/tapgate.toml" in output
    assert conf.read_text() == mine
    assert (_mode(conf), _owner(conf)) == (0o600, (0, ids.gid))
    assert _tapgate_ids(root) == ids  # sysusers again: the same user, not a second one

    # uninstall: the venv, unit and companions go; config and journal stay
    output = _ok(_make("uninstall", f"DESTDIR={root}"))
    assert not (root / "opt/tapgate").exists()
    for rel in COMPANIONS:
        assert not (root / rel).exists(), f"{rel} left behind"
    assert conf.read_text() == mine
    assert (root / "var/lib/tapgate/journal.db").read_bytes() == b"the gate's record"
    assert "PURGE=1 removes them" in output

    # uninstall again with PURGE=1: config and state go too
    _ok(_make("uninstall", f"DESTDIR={root}", "PURGE=1"))
    assert not (root / "etc/tapgate").exists()
    assert not (root / "var/lib/tapgate").exists()


def test_real_install_uses_no_test_knobs() -> None:
    """`make -n install` (nothing runs): with no knob given, the real thing happens."""
    plan = _ok(_make("-n", "install"))
    assert re.search(r"apt-get install .*\$missing", plan)
    for package in ("pcscd", "libpcsclite1", "bluez", "python3-venv", "swig",
                    "libpcsclite-dev", "build-essential", "python3-dev"):
        assert re.search(rf"for p in [^;]*\b{re.escape(package)}\b", plan), package
    assert re.search(r"/usr/bin/python3 -m venv +/opt/tapgate/venv\b", plan)
    pip = re.search(r"/opt/tapgate/venv/bin/python -m pip install (.*?)\"\$src\[pcsc,ble\]\"",
                    plan, re.S)
    assert pip and "--no-deps" not in pip.group(1), plan
    assert re.search(r"compileall -q -j0 +/opt/tapgate/venv/lib", plan)
    assert re.search(r"systemd-sysusers +tapgate\.conf", plan)
    assert re.search(r"systemd-tmpfiles --create +tapgate\.conf", plan)
    assert "[ -d /run/systemd/system ]" in plan and "systemctl daemon-reload" in plan
    assert "--root=" not in plan and "DESTDIR" not in plan.replace("DESTDIR is set", "")
