#!/usr/bin/env python3
"""QMP for ci/guest/run-matrix.sh (the live-migration cases). Standard library only.

  qmp.py [-t SECS] SOCK COMMAND [JSON-ARGUMENTS]
      Connects to QEMU's QMP unix socket (-qmp unix:SOCK,server=on,wait=off), runs one command
      and prints its return value flattened, one `key=value` a line: nested keys joined with
      `.`, lists joined with `; ` (`status=completed`, `ram.transferred=123`,
      `blocked-reasons=...`). An error reply: its `desc` on stderr, exit 1. No answer within
      SECS (default 10; the greeting too: QEMU answers only once its start-up is done): exit 2.

  qmp.py --ram-diff FILE-A FILE-B
      Compares two guest RAM images (a stopped QEMU's memfd through /proc/PID/fd/N, or a QMP
      pmemsave dump) 4 KiB page by page. Prints `pages=N` and
      `differ=M`, and up to 8 differing page ranges (`ranges=0x...-0x...; ...`); exit 1 if any
      page differs or the sizes differ.
"""

import json
import socket
import sys
import time

PAGE = 4096


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(value, list):
        parts = []
        for v in value:
            parts.append(json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else str(v))
        yield f"{prefix or 'return'}={'; '.join(parts)}"
    else:
        if isinstance(value, bool):
            value = "true" if value else "false"
        yield f"{prefix or 'return'}={value}"


class Qmp:
    def __init__(self, path, timeout):
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def read(self):
        """The next message that is not an event."""
        while True:
            while b"\n" not in self.buf:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("QMP connection closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            if not line.strip():
                continue
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def command(self, name, args=None):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        return self.read()


def ram_diff(a, b):
    differ = 0
    pages = 0
    ranges = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            pa = fa.read(PAGE * 256)
            pb = fb.read(PAGE * 256)
            if not pa and not pb:
                break
            if pa != pb:
                n = max(len(pa), len(pb))
                for off in range(0, n, PAGE):
                    if pa[off:off + PAGE] != pb[off:off + PAGE]:
                        addr = (pages + off // PAGE) * PAGE
                        differ += 1
                        if ranges and ranges[-1][1] == addr:
                            ranges[-1][1] = addr + PAGE
                        else:
                            ranges.append([addr, addr + PAGE])
            if len(pa) != len(pb):
                print(f"sizes differ: {a} and {b}", file=sys.stderr)
                differ += 1
            pages += (max(len(pa), len(pb)) + PAGE - 1) // PAGE
    print(f"pages={pages}")
    print(f"differ={differ}")
    if ranges:
        shown = "; ".join(f"{lo:#x}-{hi:#x}" for lo, hi in ranges[:8])
        print(f"ranges={shown}{'; ...' if len(ranges) > 8 else ''}")
    return 1 if differ else 0


def main(argv):
    if len(argv) == 3 and argv[0] == "--ram-diff":
        return ram_diff(argv[1], argv[2])
    timeout = 10.0
    if len(argv) >= 2 and argv[0] == "-t":
        timeout = float(argv[1])
        argv = argv[2:]
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    args = json.loads(argv[2]) if len(argv) == 3 else None
    try:
        q = Qmp(argv[0], timeout)
        greeting = q.read()
        if "QMP" not in greeting:
            print(f"not a QMP greeting: {greeting}", file=sys.stderr)
            return 2
        reply = q.command("qmp_capabilities")
        if "error" in reply:
            print(reply["error"].get("desc", reply), file=sys.stderr)
            return 2
        reply = q.command(argv[1], args)
    except (OSError, ConnectionError, ValueError) as e:
        print(f"QMP {argv[0]}: {e or type(e).__name__}", file=sys.stderr)
        return 2
    if "error" in reply:
        print(reply["error"].get("desc", json.dumps(reply["error"])), file=sys.stderr)
        return 1
    for line in flatten(reply.get("return", {})):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
