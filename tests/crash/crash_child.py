"""The writer process of the kill -9 tests.

    crash_child.py --serve        fork server: reads one JSON spec per line on
                                  stdin, forks a child per spec, answers
                                  {"code": exit status} per line on stdout
    crash_child.py --run SPEC     run one spec in this process (no fork)
    crash_child.py --stream SPEC  write buckets until killed, printing the
                                  index of each acknowledged operation

A spec: {"path", "ackpath", "config", "ops", "kill_at", "mode", "write_chunk"}.
The child opens the store through a :class:`crash_fs.KillFS` and runs the
operations; every event (operation begun, acknowledged, keys evicted) is
appended to ``ackpath`` with one ``os.write`` after the call it reports
returned, so the parent knows exactly what was acknowledged when the process
died. Exit codes: 0 done (``{"ev": "calls"}`` lists the kill points), 137
killed at the kill point, 2 an unexpected exception (traceback in the ack
file), 3 wrong bytes read inside the writer.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.abspath(os.path.join(HERE, "..", "..", "src")), HERE]

import crash_fs  # noqa: E402
import crash_harness as H  # noqa: E402
import kvbucket._core.fs  # noqa: E402
from crash_fs import KillFS  # noqa: E402
from kvbucket import BucketStore  # noqa: E402


class Acks:
    def __init__(self, path: str, echo: bool = False) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.echo = echo

    def __call__(self, event: dict) -> None:
        os.write(self.fd, (json.dumps(event) + "\n").encode())
        if self.echo and event.get("ev") == "done":
            os.write(1, f"{event['i']}\n".encode())


def run_spec(spec: dict, echo: bool = False) -> int:
    acks = Acks(spec["ackpath"], echo)
    try:
        kvbucket._core.fs.WRITE_CHUNK = spec.get("write_chunk", H.SMALL_WRITE_CHUNK)
        inner = getattr(crash_fs, spec["wrap"])() if spec.get("wrap") else None
        fs = KillFS(inner, kill_at=spec.get("kill_at"), mode=spec.get("mode", "before"))
        store = BucketStore.open(spec["path"], filesystem=fs, **spec.get("config", {}))
        acks({"ev": "open"})
        H.run_ops(store, spec["ops"], acks)
        store.close()
        acks({"ev": "closed"})
        acks({"ev": "calls", "calls": fs.calls})
        return 0
    except H.WrongBytes:
        acks({"ev": "error", "tb": traceback.format_exc()})
        return 3
    except BaseException:  # noqa: BLE001 - reported to the parent
        acks({"ev": "error", "tb": traceback.format_exc()})
        return 2


def serve() -> None:
    for line in sys.stdin:
        spec = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                code = run_spec(spec)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


def main() -> None:
    if sys.argv[1] == "--serve":
        serve()
    elif sys.argv[1] == "--run":
        os._exit(run_spec(json.loads(sys.argv[2])))
    elif sys.argv[1] == "--stream":
        os._exit(run_spec(json.loads(sys.argv[2]), echo=True))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
