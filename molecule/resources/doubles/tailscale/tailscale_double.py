#!/usr/bin/python3
"""TEST DOUBLE of the tailscale CLI and the tailscaled daemon. Not Tailscale.

Installed as /usr/bin/tailscale and /usr/sbin/tailscaled (both links to this file) by the
`tailscale` .deb that molecule's prepare step builds, so a role installs, starts and drives
it exactly as it would the real package. It covers the subset the tailscale role uses:

  tailscaled --state=PATH --socket=PATH [--port=N] [--cleanup]
  tailscale status [--json]
  tailscale up [--auth-key=KEY|--auth-key=file:PATH] [--hostname=H] [--advertise-tags=T,..]
               [--reset] [--force-reauth] [--timeout=D] [other real `up` flags, stored only]
  tailscale ip [-4|-6]
  tailscale down | logout | version

The daemon owns the state file and answers the CLI over the real socket path; without it
the CLI fails like the real one. The node's "tailnet" IPv4 is the container's eth0 address,
so other simulated hosts can reach it. For the tests, every CLI call appends its argv to
/var/log/tailscale-double/calls.log, and `up` appends a `ps` snapshot taken while it runs
to ps-during-up.log: both let a test prove that an auth key never reaches a command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import time

VERSION = "1.90.0-double"
DEFAULT_SOCKET = "/run/tailscale/tailscaled.sock"
DEFAULT_STATE = "/var/lib/tailscale/tailscaled.state-double.json"
LOG_DIR = "/var/log/tailscale-double"
TAILNET = "tailnet-double.ts.net"
LOGIN_URL = "https://login.tailscale.com/a/0double0"
NOT_RUNNING = (
    "failed to connect to local tailscaled; it doesn't appear to be running "
    "(sudo systemctl start tailscaled ?)"
)

# `tailscale up` flags: value flags and boolean flags with their defaults. Preferences are
# the flags a node remembers; the others only steer one call.
VALUE_FLAGS = {
    "hostname": "",
    "advertise-tags": "",
    "advertise-routes": "",
    "login-server": "",
    "operator": "",
    "exit-node": "",
    "netfilter-mode": "on",
}
BOOL_FLAGS = {
    "accept-dns": True,
    "accept-routes": False,
    "advertise-exit-node": False,
    "exit-node-allow-lan-access": False,
    "shields-up": False,
    "snat-subnet-routes": True,
    "ssh": False,
}
ONE_SHOT_VALUE_FLAGS = {"auth-key", "authkey", "timeout"}
ONE_SHOT_BOOL_FLAGS = {"reset", "force-reauth", "json", "qr", "unattended"}


class CliError(Exception):
    """A failure the CLI reports on stderr with the given exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- daemon


def eth0_addresses() -> tuple[str, str]:
    """The container's eth0 IPv4, and a Tailscale-style IPv6 derived from it."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    ipv4 = "100.64.0.1"
    with contextlib.suppress(ValueError, IndexError, KeyError):
        ipv4 = json.loads(out)[0]["addr_info"][0]["local"]
    a, b, c, d = (int(part) for part in ipv4.split("."))
    ipv6 = f"fd7a:115c:a1e0::{a << 8 | b:x}:{c << 8 | d:x}"
    return ipv4, ipv6


class Daemon:
    """The node's state, persisted in one JSON file that only this process writes."""

    def __init__(self, state_path: str) -> None:
        self.state_path = state_path
        self.state = self._load()

    def _load(self) -> dict:
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {"LoggedIn": False, "WantRunning": False, "Prefs": {}}

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.state_path), mode=0o700, exist_ok=True)
        tmp = f"{self.state_path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.state, handle, indent=2, sort_keys=True)
        os.replace(tmp, self.state_path)

    def backend_state(self) -> str:
        if not self.state["LoggedIn"]:
            return "NeedsLogin"
        return "Running" if self.state["WantRunning"] else "Stopped"

    def status(self) -> dict:
        backend = self.backend_state()
        prefs = self.state["Prefs"]
        host = prefs.get("hostname") or socket.gethostname()
        logged_in = self.state["LoggedIn"]
        ips = self.state.get("TailscaleIPs") if logged_in else None
        tags = [t for t in prefs.get("advertise-tags", "").split(",") if t]
        me = {
            "ID": self.state.get("NodeID", ""),
            "PublicKey": "nodekey:" + "0" * 64 if logged_in else "",
            "HostName": host,
            "DNSName": f"{host.lower()}.{TAILNET}." if logged_in else "",
            "OS": "linux",
            "UserID": 1 if logged_in else 0,
            "TailscaleIPs": ips,
            "Online": backend == "Running",
            "Active": False,
            "ExitNode": False,
        }
        if logged_in and tags:
            me["Tags"] = tags
        return {
            "Version": VERSION,
            "TUN": True,
            "BackendState": backend,
            "HaveNodeKey": logged_in,
            "AuthURL": "" if logged_in else LOGIN_URL,
            "TailscaleIPs": ips,
            "Self": me,
            "Health": [] if backend == "Running" else ["state=" + backend],
            "MagicDNSSuffix": TAILNET,
            "CurrentTailnet": (
                {"Name": "double@example.com", "MagicDNSSuffix": TAILNET, "MagicDNSEnabled": True}
                if logged_in
                else None
            ),
            "Peer": {},
            "User": {},
        }

    def up(self, req: dict) -> dict:
        prefs = self.state["Prefs"]
        flags = req["flags"]
        if self.state["LoggedIn"] and not req["reset"]:
            # Like the real CLI: settings not mentioned would silently reset, so refuse.
            missing = {k: v for k, v in prefs.items() if k not in flags and v != default_of(k)}
            if missing:
                wanted = {**prefs, **flags}
                cmd = " ".join(
                    format_flag(k, v) for k, v in sorted(wanted.items()) if v != default_of(k)
                )
                return {
                    "error": (
                        "Error: changing settings via 'tailscale up' requires mentioning all\n"
                        "non-default flags. To proceed, either re-run your command with --reset "
                        "or\nuse the command below to explicitly mention the current value of\n"
                        f"all non-default settings:\n\n\ttailscale up {cmd}\n"
                    )
                }
        if not self.state["LoggedIn"] or req["force_reauth"]:
            key = req.get("authkey")
            if not key:
                return {"needs_login": True}
            if not key.startswith("tskey-"):
                return {"error": "backend error: invalid key: API key does not exist"}
            ipv4, ipv6 = eth0_addresses()
            self.state.update(
                LoggedIn=True,
                NodeID="n" + hashlib.sha256(ipv4.encode()).hexdigest()[:12] + "CNTRL",
                TailscaleIPs=[ipv4, ipv6],
                AuthKeySHA256=hashlib.sha256(key.encode()).hexdigest(),
                Logins=self.state.get("Logins", 0) + 1,
            )
        self.state["Prefs"] = dict(flags) if req["reset"] else {**prefs, **flags}
        self.state["WantRunning"] = True
        self._save()
        return {}

    def down(self) -> dict:
        self.state["WantRunning"] = False
        self._save()
        return {}

    def logout(self) -> dict:
        self.state.update(LoggedIn=False, WantRunning=False, Prefs={}, TailscaleIPs=None)
        self._save()
        return {}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "status":
            return {"status": self.status()}
        if op == "up":
            return self.up(req)
        if op == "down":
            return self.down()
        if op == "logout":
            return self.logout()
        return {"error": f"unknown request {op!r}"}


def default_of(flag: str) -> object:
    return BOOL_FLAGS.get(flag, VALUE_FLAGS.get(flag, ""))


def format_flag(flag: str, value: object) -> str:
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--{flag}=false"
    return f"--{flag}={value}"


def sd_notify(message: str) -> None:
    """Tell systemd we are ready (the real unit is Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def tailscaled(argv: list[str]) -> int:
    opts = {"state": DEFAULT_STATE, "socket": DEFAULT_SOCKET}
    for arg in argv:
        name, _, value = arg.lstrip("-").partition("=")
        if name == "cleanup":
            return 0
        opts[name] = value
    daemon = Daemon(opts["state"])
    sock_path = opts["socket"]
    os.makedirs(os.path.dirname(sock_path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            req = json.loads(self.rfile.readline())
            self.wfile.write(json.dumps(daemon.handle(req)).encode() + b"\n")

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with socketserver.UnixStreamServer(sock_path, Handler) as server:
        os.chmod(sock_path, 0o666)
        print(f"tailscaled (test double {VERSION}) listening on {sock_path}", flush=True)
        sd_notify("READY=1")
        try:
            server.serve_forever()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock_path)
    return 0


# -------------------------------------------------------------------------------- CLI


def ask(req: dict) -> dict:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.environ.get("TS_DOUBLE_SOCKET", DEFAULT_SOCKET))
            sock.sendall(json.dumps(req).encode() + b"\n")
            reply = sock.makefile("rb").readline()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CliError(NOT_RUNNING) from exc
    return json.loads(reply)


def record(name: str, entry: dict) -> None:
    with contextlib.suppress(OSError):
        os.makedirs(LOG_DIR, exist_ok=True)
        with open(os.path.join(LOG_DIR, name), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), "pid": os.getpid(), **entry}) + "\n")


def parse_up(args: list[str]) -> tuple[dict, dict]:
    """Go-style flags: --name=value, --name value, -name; booleans take =true/=false."""
    flags: dict = {}
    one_shot: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            raise CliError(f"too many non-flag arguments: {args[i:]!r}", 2)
        name, has_value, value = arg.lstrip("-").partition("=")
        if name in BOOL_FLAGS or name in ONE_SHOT_BOOL_FLAGS:
            if has_value and value not in ("true", "false"):
                raise CliError(f'invalid boolean value "{value}" for -{name}', 2)
            parsed = value != "false"
            (flags if name in BOOL_FLAGS else one_shot)[name] = parsed
        elif name in VALUE_FLAGS or name in ONE_SHOT_VALUE_FLAGS:
            if not has_value:
                i += 1
                if i == len(args):
                    raise CliError(f"flag needs an argument: -{name}", 2)
                value = args[i]
            (flags if name in VALUE_FLAGS else one_shot)[name] = value
        else:
            raise CliError(f"flag provided but not defined: -{name}", 2)
        i += 1
    return flags, one_shot


def read_authkey(spec: str) -> str:
    if not spec.startswith("file:"):
        return spec
    path = spec[len("file:") :]
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise CliError(f"reading auth key from {path}: {exc.strerror.lower()}") from exc


def cmd_up(args: list[str]) -> int:
    record(
        "ps-during-up.log",
        {
            "ps": subprocess.run(
                ["ps", "-eww", "-o", "pid=,args="],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        },
    )
    flags, one_shot = parse_up(args)
    for tag in filter(None, flags.get("advertise-tags", "").split(",")):
        if not tag.startswith("tag:"):
            raise CliError(f"tailscale: tag: \"{tag}\": tags must start with 'tag:'")
    if os.geteuid() != 0:
        raise CliError("Access denied: prefs write access denied\n\nUse 'sudo tailscale up'")
    key_spec = one_shot.get("auth-key", one_shot.get("authkey", ""))
    reply = ask(
        {
            "op": "up",
            "flags": flags,
            "authkey": read_authkey(key_spec) if key_spec else "",
            "reset": one_shot.get("reset", False),
            "force_reauth": one_shot.get("force-reauth", False),
        }
    )
    if reply.get("needs_login"):
        print(f"\nTo authenticate, visit:\n\n\t{LOGIN_URL}\n", file=sys.stderr)
        raise CliError("(test double: an interactive login can never complete here)")
    if reply.get("error"):
        raise CliError(reply["error"])
    return 0


def cmd_status(args: list[str]) -> int:
    status = ask({"op": "status"})["status"]
    if "--json" in args or "-json" in args or "--json=true" in args:
        print(json.dumps(status, indent=2))
        return 0
    state = status["BackendState"]
    if state == "NeedsLogin":
        print(f"Logged out.\nLog in at: {LOGIN_URL}")
        return 1
    if state == "Stopped":
        print("Tailscale is stopped.")
        return 1
    me = status["Self"]
    owner = "tagged-devices" if me.get("Tags") else "double@"
    print(f"{me['TailscaleIPs'][0]:<15} {me['HostName']:<20} {owner:<15} linux   -")
    return 0


def cmd_ip(args: list[str]) -> int:
    status = ask({"op": "status"})["status"]
    ips = status["TailscaleIPs"]
    if not ips:
        raise CliError(f"no current Tailscale IPs; state: {status['BackendState']}")
    if "-4" in args:
        ips = [ip for ip in ips if ":" not in ip]
    elif "-6" in args:
        ips = [ip for ip in ips if ":" in ip]
    print("\n".join(ips))
    return 0


def cmd_simple(op: str) -> int:
    if os.geteuid() != 0:
        raise CliError(f"Access denied: {op} access denied")
    reply = ask({"op": op})
    if reply.get("error"):
        raise CliError(reply["error"])
    return 0


def tailscale(argv: list[str]) -> int:
    record("calls.log", {"argv": ["tailscale", *argv], "uid": os.getuid()})
    if not argv:
        raise CliError("tailscale: subcommand required (test double)", 2)
    sub, args = argv[0], argv[1:]
    if sub in ("version", "--version", "-version"):
        print(f"{VERSION}\n  tailscale commit: 0000000 (test double)\n  go version: none")
        return 0
    if sub == "up":
        return cmd_up(args)
    if sub == "status":
        return cmd_status(args)
    if sub == "ip":
        return cmd_ip(args)
    if sub in ("down", "logout"):
        return cmd_simple(sub)
    raise CliError(f"tailscale: unknown subcommand: {sub} (not covered by the test double)", 2)


def main() -> int:
    prog = os.path.basename(sys.argv[0])
    try:
        if prog == "tailscaled":
            return tailscaled(sys.argv[1:])
        return tailscale(sys.argv[1:])
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
