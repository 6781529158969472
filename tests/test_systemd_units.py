"""The files that make tapgate a service on a Pi, checked by the tools that will read them:
systemd-analyze (verify, security), systemd-sysusers and systemd-tmpfiles, dbus-daemon,
and a JavaScript engine for the polkit rule. The sandbox's MemoryDenyWriteExecute= is
checked by running the daemon itself with the kernel's equivalent switched on."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = UNITS / "tapgate.service"
INSTALLED_EXEC = "/opt/tapgate/venv/bin/tapgate"
MAX_EXPOSURE = 1.5
TIMEOUT_S = 60.0

# LC_ALL=C: numbers and messages as parsed below; no colours, no pager.
TOOL_ENV = {**os.environ, "LC_ALL": "C", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt install systemd)")
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=TOOL_ENV,
                          timeout=TIMEOUT_S, check=False)


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# --- tapgate.service ---------------------------------------------------------------------
def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    # The one thing verify must not see: the venv binary that exists only on an installed
    # gate. Point ExecStart at an executable that exists here and keep everything else.
    true = shutil.which("true")
    assert true is not None
    text = SERVICE.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED_EXEC} " in text
    unit = tmp_path / SERVICE.name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={true} "),
                    encoding="utf-8")

    result = _run(analyze, "verify", str(unit))

    # verify exits 0 even for unknown keys and unparsable values: any output is a finding.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify:\n{output}"


def test_unit_sandbox_exposure_is_at_most_1_5() -> None:
    analyze = _tool("systemd-analyze")
    result = _run(analyze, "security", "--offline=yes", str(SERVICE))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    exposure = float(match.group(1))
    gaps = "\n".join(line for line in result.stdout.splitlines() if line.startswith("✗"))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}; open items:\n{gaps}"


def test_unit_is_what_the_daemon_and_the_other_files_expect() -> None:
    unit = _directives(SERVICE)
    assert unit["Type"] == ["notify"]  # daemon/notify.py sends READY=1
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"{INSTALLED_EXEC} run --config /etc/tapgate/tapgate.toml"]
    assert unit["User"] == unit["Group"] == ["tapgate"]
    assert int(unit["WatchdogSec"][0]) > 0
    # exit status 2 is daemon.cli.EXIT_CONFIG: a restart cannot fix a bad config
    assert unit["RestartPreventExitStatus"] == ["2"]

    tmpfiles = {fields[1]: fields for fields in (
        line.split() for line in (UNITS / "tapgate.tmpfiles").read_text().splitlines()
        if line.strip() and not line.startswith("#"))}
    assert unit["StateDirectory"] == ["tapgate"]
    assert unit["StateDirectoryMode"] == [tmpfiles["/var/lib/tapgate"][2]]
    assert unit["ConfigurationDirectory"] == ["tapgate"]
    assert unit["ConfigurationDirectoryMode"] == [tmpfiles["/etc/tapgate"][2]]


# --- tapgate.sysusers, tapgate.tmpfiles --------------------------------------------------
def _colon_table(path: Path) -> dict[str, list[str]]:
    return {f[0]: f for f in (line.split(":") for line in path.read_text().splitlines())}


def test_sysusers_and_tmpfiles_make_the_user_and_its_directories(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)

    made = _run(sysusers, f"--root={root}", str(UNITS / "tapgate.sysusers"))
    assert made.returncode == 0, made.stderr
    users = _colon_table(root / "etc/passwd")
    groups = _colon_table(root / "etc/group")
    _, _, uid, gid, _, home, shell = users["tapgate"]
    assert 0 < int(uid) < 1000, "a system user"
    assert gid == groups["tapgate"][2]
    assert (home, shell) == ("/var/lib/tapgate", "/usr/sbin/nologin")

    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles can chown to tapgate only as root")
    made = _run(tmpfiles, f"--root={root}", "--create", str(UNITS / "tapgate.tmpfiles"))
    assert made.returncode == 0, made.stderr
    state = (root / "var/lib/tapgate").stat()
    config = (root / "etc/tapgate").stat()
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o750, int(uid), int(gid))
    assert (stat.S_IMODE(config.st_mode), config.st_uid, config.st_gid) == (0o750, 0, int(gid))


# --- 50-tapgate-pcscd.rules --------------------------------------------------------------
POLKIT_PROBE = r"""
const fs = require("fs");
const source = fs.readFileSync(process.argv[2], "utf8");
new Function(source);  // a syntax error throws here, before any rule runs
const rules = [];
// polkitd's own definitions (its init.js)
const polkit = {
    Result: { NO: "no", YES: "yes", AUTH_SELF: "auth_self", AUTH_SELF_KEEP: "auth_self_keep",
              AUTH_ADMIN: "auth_admin", AUTH_ADMIN_KEEP: "auth_admin_keep", NOT_HANDLED: null },
    addRule: function (rule) { rules.push(rule); },
    log: function () {},
};
new Function("polkit", source)(polkit);
function decide(actionId, user) {
    const action = { id: actionId, lookup: function () { return "ACS ACR122U 00 00"; } };
    const subject = { user: user, groups: [user], local: false, active: false,
                      isInGroup: function (g) { return g === user; },
                      isInNetGroup: function () { return false; } };
    for (const rule of rules) {
        const result = rule(action, subject);
        if (result !== undefined && result !== null) return result;
    }
    return null;
}
console.log(JSON.stringify({
    rules: rules.length,
    pcsc: decide("org.debian.pcsc-lite.access_pcsc", "tapgate"),
    card: decide("org.debian.pcsc-lite.access_card", "tapgate"),
    other_user: decide("org.debian.pcsc-lite.access_pcsc", "www-data"),
    other_action: decide("org.freedesktop.login1.reboot", "tapgate"),
}));
"""


def test_polkit_rule_lets_tapgate_and_nobody_else_use_pcscd(tmp_path: Path) -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: cannot run the polkit rule")
    rule = UNITS / "50-tapgate-pcscd.rules"
    probe = tmp_path / "probe.js"
    probe.write_text(POLKIT_PROBE, encoding="utf-8")

    result = _run(node, str(probe), str(rule))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "rules": 1, "pcsc": "yes", "card": "yes", "other_user": None, "other_action": None}


def test_polkit_rule_is_ecmascript_5() -> None:
    # polkitd's engine (duktape, or mozjs in older polkit) is not node: keep to ES5.
    code = "\n".join(line.split("//")[0]
                     for line in (UNITS / "50-tapgate-pcscd.rules").read_text().splitlines())
    assert not re.search(r"=>|`|\blet\b|\bconst\b|\bclass\b", code)


# --- tapgate-bluez.conf ------------------------------------------------------------------
BEACON_INTERFACES = {"org.bluez.LEAdvertisingManager1", "org.bluez.Adapter1",
                     "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.ObjectManager",
                     "org.freedesktop.DBus.Introspectable"}


def test_dbus_policy_opens_only_the_beacon_calls_and_owns_nothing() -> None:
    tree = ET.parse(UNITS / "tapgate-bluez.conf")  # not well-formed XML: ParseError
    root = tree.getroot()
    assert root.tag == "busconfig"
    policies = root.findall("policy")
    assert [p.attrib for p in policies] == [{"user": "tapgate"}]
    rules = list(policies[0])
    assert not [r for r in rules if r.tag == "allow" and {"own", "own_prefix"} & set(r.attrib)]
    assert any(r.tag == "deny" and r.attrib == {"own": "*"} for r in rules)
    # later rules win in a policy: the blanket deny must come before every allow
    deny_bluez = [i for i, r in enumerate(rules)
                  if r.tag == "deny" and r.attrib == {"send_destination": "org.bluez"}]
    allows = [i for i, r in enumerate(rules) if r.tag == "allow"]
    assert deny_bluez and allows and deny_bluez[0] < min(allows)
    for index in allows:
        attrib = rules[index].attrib
        assert attrib.get("send_destination") == "org.bluez", attrib
        assert attrib.get("send_interface") in BEACON_INTERFACES, attrib


def test_dbus_daemon_accepts_the_policy(tmp_path: Path) -> None:
    dbus_daemon = shutil.which("dbus-daemon")
    if dbus_daemon is None:
        pytest.skip("dbus-daemon is not installed (Debian: apt install dbus-daemon)")
    config = tmp_path / "bus.conf"
    config.write_text(f"""<busconfig>
  <type>session</type>
  <listen>unix:dir={tmp_path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><allow user="*"/></policy>
  <include>{UNITS / "tapgate-bluez.conf"}</include>
</busconfig>
""", encoding="utf-8")
    # dbus-daemon refuses to start on any element or attribute it does not know; started,
    # it prints its address.
    bus = subprocess.Popen([dbus_daemon, f"--config-file={config}", "--nofork",
                            "--print-address=1"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=TOOL_ENV)
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline()
    finally:
        bus.terminate()
        _, errors = bus.communicate(timeout=TIMEOUT_S)
    assert address.startswith("unix:"), errors


# --- MemoryDenyWriteExecute= ---------------------------------------------------------------
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
MDWE_LAUNCHER = f"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
from daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kernel_has_mdwe() -> bool:
    pr_get_mdwe = PR_SET_MDWE + 1  # only reads: harmless in the test process
    return int(ctypes.CDLL(None).prctl(pr_get_mdwe, 0, 0, 0, 0)) >= 0


def test_daemon_takes_taps_without_writable_executable_memory(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes; the kernel's PR_SET_MDWE (Linux 6.3+)
    refuses the same kind of mappings. cryptography, sqlite, pyscard and ctypes must not need them
    (cffi's ABI-mode ffi.callback() would, and would fail the daemon here)."""
    if not _kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    daemon = subprocess.Popen(
        [sys.executable, "-c", MDWE_LAUNCHER, "run", "--config", str(ROOT / "config/tapgate.toml"),
         "--set", f'journal.path="{tmp_path / "journal.db"}"',
         "--set", "reader.sim_interval_s=0.1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items()  # log lines to our pipe, not to journald
             if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")})
    lines: list[str] = []
    debited = threading.Event()

    def read() -> None:
        assert daemon.stderr is not None
        for line in daemon.stderr:
            lines.append(line)
            if re.search(r"tap \S+: (accepted|recovered)\b.*\bdebited\b", line):
                debited.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # a debit: CMAC session keys and MACs, the intent fsynced, the completion journaled
        debited.wait(TIMEOUT_S)
    finally:
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(TIMEOUT_S)
        reader.join(TIMEOUT_S)
    log = "".join(lines[-40:])
    assert debited.is_set(), f"no debit within {TIMEOUT_S:.0f} s:\n{log}"
    assert status == 0 and "stopped cleanly" in log, log
