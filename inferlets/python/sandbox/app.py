"""Probes what a Python inferlet can reach of the host through WASI and
sends a JSON report: files, directories, environment, arguments, sockets.
The runtime's WASI sandbox should grant none of them. Also prints a line,
which should reach the client as a log event. Used by the runtime's tests.
"""

import json
import os
import sys

import wit_world

import pie_inferlet as pie


def attempt(f):
    """`"ok: VALUE"` if `f()` succeeded, else `"denied: ExceptionType"`."""
    try:
        return f"ok: {f()!r}"
    except BaseException as e:  # noqa: BLE001 - any refusal is an answer
        return f"denied: {type(e).__name__}"


def read_passwd():
    with open("/etc/passwd") as f:
        return f.read(64)


def write_file():
    with open("/tmp/pie-sandbox-probe", "w") as f:
        f.write("x")
    return "written"


def connect():
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    s.connect(("127.0.0.1", 22))
    return "connected"


def main() -> None:
    print("hello from the sandbox probe")
    report = {
        "listdir_root": attempt(lambda: os.listdir("/")),
        "listdir_cwd": attempt(lambda: os.listdir(".")),
        "read_passwd": attempt(read_passwd),
        "write_tmp": attempt(write_file),
        "environ": dict(os.environ),
        "argv": list(sys.argv),
        "connect": attempt(connect),
        "args": pie.args(),
    }
    pie.send(json.dumps(report, sort_keys=True))


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        pie.run(main)
