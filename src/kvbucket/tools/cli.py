"""The ``kvbucket`` command: inspect, check, repair and benchmark a store.

Commands (``kvbucket COMMAND --help`` for each):

* ``fsck DIR [--repair [--dry-run]] [--deep] [--quarantine]``: check a
  kvbucket or a Mooncake directory; with ``--repair``, fix exactly what was
  reported (``--dry-run``: only print what it would remove and drop).
* ``stats DIR [--prometheus]``, ``ls DIR [--bucket ID]``, ``get DIR KEY [-o FILE]``:
  read-only; they open the store with ``readonly=True`` (no lock, no write).
* ``rm DIR KEY...``: remove objects (takes the writer lock).
* ``import --from-mooncake SRC DST``: copy a Mooncake directory into a store.
* ``bench [DIR]``: the disk's raw speed, then kvbucket's on the same workload.

Conventions (the contract operators script against):

* exit status 0 = clean / done, 1 = problems found (or an unknown key),
  2 = usage or I/O error; an expected failure prints one ``kvbucket: error:``
  line on stderr, never a traceback;
* ``--json`` prints one JSON document on stdout (an error as
  ``{"error": ..., "exit_code": ...}``);
* a directory that is neither a kvbucket store (a ``LOCK`` with a kvbucket
  slot, or a kvbucket meta) nor a Mooncake directory is "not a kvbucket
  store" (exit 2) and no command creates anything in it; when the format
  cannot be told (both engines' files, or only unreadable metas), commands
  stop and ask for ``--format``;
* options may come before or after positional arguments;
* logging is quiet unless ``-v`` (INFO) or ``-vv`` (DEBUG) is given;
* progress bars go to stderr, only when it is a terminal and not ``--json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from tqdm import tqdm

from .. import mooncake
from .._core.arguments import is_int
from .._core.format import MAX_BUCKET_KEYS
from .._core.fs import FileSystem, stat_directory
from ..config import parse_size
from ..errors import CorruptionError, KeyNotFound, KvBucketError, StoreLocked
from ..store import BucketStore
from . import fsck
from .version import installed_version

__all__ = ["main", "cli", "escape_key", "unescape_key"]

log = logging.getLogger("kvbucket.tools.cli")  # also when run as `python -m kvbucket.tools.cli`

EXIT_OK, EXIT_PROBLEMS, EXIT_ERROR = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `yes | head`
FORMATS = ("auto", "kvbucket", "mooncake")

F = TypeVar("F", bound=Callable[..., Any])


class Failure(Exception):
    """An expected failure: a message for the operator and an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------
# Output, logging, errors
# ---------------------------------------------------------------------------


def _configure_logging(ctx: click.Context, _param: click.Parameter, count: int) -> None:
    """``-v`` = INFO, ``-vv`` = DEBUG, to stderr; otherwise kvbucket logs nothing."""
    logger = logging.getLogger("kvbucket")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    if not count:
        count = ctx.meta.get("kvbucket.verbosity", 0)
    ctx.meta["kvbucket.verbosity"] = count
    if count:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kvbucket: %(levelname)s %(name)s: %(message)s"))
        logger.setLevel(logging.DEBUG if count > 1 else logging.INFO)
    else:
        handler = logging.NullHandler()  # keeps logging's last-resort handler quiet
    logger.addHandler(handler)
    logger.propagate = False


def _verbose_option(fn: F) -> F:
    return click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_configure_logging,
        help="Log details to stderr (-vv for debug).",
    )(fn)


def _json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")(fn)


def _format_option(fn: F) -> F:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="auto",
        show_default=True,
        help="Directory format; auto detects it from LOCK and every meta, and stops when it cannot tell.",
    )(fn)


def _guarded(fn: F) -> F:
    """Turn expected failures into one stderr line (or a JSON error) and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            code = fn(*args, **kwargs)
        except BrokenPipeError:
            _broken_pipe()
        except Failure as exc:
            _fail(exc.message, exc.code, as_json)
        except KeyNotFound as exc:
            _fail(str(exc), EXIT_PROBLEMS, as_json)
        except CorruptionError as exc:
            _fail(f"corrupt data: {exc}", EXIT_PROBLEMS, as_json)
        except KvBucketError as exc:
            _fail(str(exc), EXIT_ERROR, as_json)
        except OSError as exc:
            _fail(_os_message(exc), EXIT_ERROR, as_json)
        sys.exit(code or EXIT_OK)

    return wrapper  # type: ignore[return-value]


def _broken_pipe() -> NoReturn:
    """The reader of stdout went away (``kvbucket ls DIR | head``): stop
    quietly with the status a process killed by SIGPIPE has."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def _os_message(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code}))
    click.echo(f"kvbucket: error: {message}", err=True)
    sys.exit(code)


def _emit(as_json: bool, payload: Any, text: Callable[[], str]) -> None:
    """Print ``payload`` as JSON, or the human-readable ``text()``."""
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=False))
    else:
        click.echo(text())


def _bar(as_json: bool, **kwargs: Any) -> tqdm[Any]:
    """A progress bar on stderr; disabled with ``--json`` or when stderr is not a terminal."""
    return tqdm(file=sys.stderr, disable=as_json or not sys.stderr.isatty(), leave=False, **kwargs)


def _each(as_json: bool, **kwargs: Any) -> Callable[[Iterable[Any]], Iterable[Any]]:
    """Wrap an iteration in a progress bar (see :func:`_bar`)."""

    def wrap(items: Iterable[Any]) -> Iterable[Any]:
        items = list(items)
        return _bar(as_json, iterable=items, total=len(items), **kwargs)

    return wrap


def _size(n: int) -> str:
    """``1,048,576 bytes (1.0 MiB)``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n:,} bytes ({n / (1 << shift):.1f} {unit})"
    return f"{n:,} bytes"


_ESCAPE_RE = re.compile(r"\\(\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def escape_key(key: str) -> str:
    """A key as one printable line: backslash and non-printable characters as
    ``\\\\``, ``\\xNN``, ``\\uNNNN`` (the form ``get -e`` and ``rm -e`` accept)."""
    out = []
    for ch in key:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def unescape_key(text: str) -> str:
    """Undo :func:`escape_key`; other backslashes are kept as they are."""

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        return "\\" if body == "\\" else chr(int(body[1:], 16))

    return _ESCAPE_RE.sub(replace, text)


# ---------------------------------------------------------------------------
# Directories, formats, stores
# ---------------------------------------------------------------------------


def _existing_dir(path: str) -> Path:
    """``path``, which must be a directory (a link to one counts)."""
    try:
        stat_directory(FileSystem(), path)
    except FileNotFoundError:
        raise Failure(f"no such directory: {path}") from None
    except NotADirectoryError:
        raise Failure(f"not a directory: {path}") from None
    return Path(path)


def _directory_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the directory ``path``; None when there is none."""
    try:
        st = stat_directory(FileSystem(), os.fspath(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _resolve_format(path: Path, requested: str) -> str:
    """``requested``, or the format detected from all the evidence; fails
    (exit 2) on a directory that is neither engine's, or both, or that no
    meta identifies."""
    if requested != "auto":
        log.info("%s: %s format (--format)", path, requested)
        return requested
    evidence = mooncake.format_evidence(path)
    if evidence.format == "none":
        raise Failure(_not_a_store(path))
    if evidence.format == "unknown":
        raise Failure(
            f"cannot tell whether {path} is a kvbucket store or a Mooncake directory ({evidence.describe()}); "
            "nothing was read or changed. Pass --format kvbucket or --format mooncake to choose."
        )
    log.info("%s: %s format (detected from LOCK and the metas)", path, evidence.format)
    return evidence.format


def _not_a_store(path: Path) -> str:
    return (
        f"{path} is not a kvbucket store (no LOCK with a kvbucket slot, no kvbucket bucket) "
        "nor a Mooncake directory; nothing was read or changed."
    )


def _refuse_mooncake_writer(path: Path, what: str) -> None:
    """Opening a Mooncake directory as a kvbucket writer would treat its
    files as broken kvbucket files; refuse instead."""
    if _directory_identity(path) is not None and mooncake.detect_format(path) == "mooncake":
        raise Failure(
            f"{path} looks like a Mooncake directory; {what} would treat its files as broken "
            "kvbucket files. Use --format mooncake to check it, or "
            "'kvbucket import --from-mooncake' to copy it into a kvbucket store."
        )


def _require_store(path: Path, what: str) -> None:
    """A command that changes an existing store (``rm``, ``fsck --repair``)
    creates nothing in a directory that is not one."""
    _refuse_mooncake_writer(path, what)
    if mooncake.detect_format(path) == "none":
        raise Failure(_not_a_store(path))


def _open_readonly(path: Path) -> BucketStore:
    log.info("opening %s read-only (no lock, no writes)", path)
    store = BucketStore.open(os.fspath(path), readonly=True)
    _log_opened(store)
    return store


def _open_writer(path: Path, action: str, **fields: Any) -> BucketStore:
    log.info("opening %s as its writer to %s it (takes the lock; recovery runs)", path, action)
    try:
        store = BucketStore.open(os.fspath(path), **fields)
    except StoreLocked as exc:
        log.info("%s", exc)
        raise Failure(f"cannot {action} {path}: another process holds its writer lock; stop that process first") from None
    _log_opened(store)
    return store


def _log_opened(store: BucketStore) -> None:
    report = store.recovery_report
    log.info("%s: %d bucket(s), %d object(s)", store.path, report.buckets, report.keys)
    if report.foreign_files:
        log.info("%s: foreign entries, never touched: %s", store.path, ", ".join(report.foreign_files))
    log.debug("%s: recovery report %s", store.path, report)


def _plain(obj: Any) -> Any:
    """A dataclass (or object) as a JSON-ready dict."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, Path):
        return os.fspath(obj)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------------
# The command group
# ---------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(installed_version(), prog_name="kvbucket")
@_verbose_option
def cli() -> None:
    """Inspect, check, repair and benchmark kvbucket stores and Mooncake
    bucket directories.

    Exit status: 0 clean, 1 problems found, 2 usage or I/O error.
    """


# ---------------------------------------------------------------------------
# fsck
# ---------------------------------------------------------------------------


@cli.command(name="fsck")
@click.argument("directory")
@click.option("--repair", is_flag=True, help="Fix what is reported (takes the writer lock).")
@click.option("--deep", is_flag=True, help="Also verify every object's checksum (reads all data).")
@click.option("--quarantine", is_flag=True, help="With --repair: move broken files to quarantine/ instead of deleting them.")
@click.option("--dry-run", is_flag=True, help="With --repair: print what the repair would remove and which keys it would drop; change nothing.")
@_format_option
@_json_option
@_verbose_option
@_guarded
def fsck_cmd(directory: str, repair: bool, deep: bool, quarantine: bool, dry_run: bool, fmt: str, as_json: bool) -> int:
    """Check DIRECTORY; with --repair, fix exactly what is reported.

    Reports orphaned data files, metas without data, unreadable or invalid
    metas, data files shorter than recorded, temporary files, and with
    --deep every object whose checksum fails. Foreign files (listed, never
    touched) and dead bytes are not problems. A data file shorter or longer
    than recorded keeps every object whose checksum verifies. A repair first
    prints the files it removes and the keys it drops; --dry-run prints only
    that. Without --repair (or with --dry-run) nothing is changed, not even a
    lock file. Exit 0 clean (or all fixed), 1 problems.
    """
    if quarantine and not repair:
        raise click.UsageError("--quarantine only applies with --repair")
    if dry_run and not repair:
        raise click.UsageError("--dry-run only applies with --repair")
    path = _existing_dir(directory)
    log.info("fsck %s%s%s", path, " --deep" if deep else "", " --repair" if repair else " (read-only)")
    bars: fsck.Progress = functools.partial(_bar, as_json)
    fs = FileSystem()
    if _resolve_format(path, fmt) == "mooncake":
        report = fsck.check_mooncake(path, deep=deep, progress=bars, fs=fs)
        plan = _repair_plan(report.to_json()["problems"], quarantine)
        if repair and not dry_run:
            _announce(as_json, plan)
            with _repair_errors(path):
                fsck.repair_mooncake(report, quarantine=quarantine, fs=fs)
    elif repair and not dry_run:
        _require_store(path, "repairing it as a kvbucket store")
        report = fsck.check(path, progress=bars, fs=fs)  # --deep verifies after recovery, under the lock
        plan = _repair_plan(report.to_json()["problems"], quarantine)
        _announce(as_json, plan)
        with _repair_errors(path), _open_writer(path, "repair", quarantine=quarantine, filesystem=fs) as store:
            fsck.repair(store, report, deep=deep, progress=bars, fs=fs)
    else:
        report = fsck.check(path, deep=deep, progress=bars, fs=fs)
        plan = _repair_plan(report.to_json()["problems"], quarantine)
    payload = {**report.to_json(), "exit_code": EXIT_OK if report.clean else EXIT_PROBLEMS}
    log.info("fsck %s: %d problem(s), %d foreign entries", path, len(payload["problems"]), len(payload["foreign"]))
    if repair:
        payload["plan"] = plan
        payload["dry_run"] = dry_run
    _emit(as_json, payload, lambda: _fsck_text(payload))
    return int(payload["exit_code"])


@contextlib.contextmanager
def _repair_errors(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` in the middle of a repair into a :class:`Failure`
    that says what state the directory is in and what to do."""
    try:
        yield
    except OSError as exc:
        raise Failure(
            f"the repair of {path} stopped: {_os_message(exc)}. Each file it removed is gone and every other "
            f"file is as it was; fix the cause, then run 'kvbucket fsck --repair {path}' again to finish."
        ) from None


def _repair_plan(problems: list[dict[str, Any]], quarantine: bool) -> dict[str, Any]:
    """What a repair of ``problems`` does: the files it removes (or moves to
    quarantine/), the buckets whose meta it rewrites to keep the objects that
    verify, and the keys it drops (a broken bucket's, a corrupt object's)."""
    return {
        "files": [name for p in problems for name in p["files"]],
        "bytes": sum(p["bytes"] for p in problems if p["files"]),
        "quarantine": quarantine,
        "salvaged_buckets": [p["bucket"] for p in problems if p.get("salvaged")],
        "dropped_keys": [key for p in problems for key in p.get("dropped_keys", [p["key"]] if "key" in p else [])],
    }


def _plan_text(plan: dict[str, Any], dry_run: bool) -> str:
    verb = ("would move" if dry_run else "moves") if plan["quarantine"] else ("would remove" if dry_run else "removes")
    where = " to quarantine/" if plan["quarantine"] else ""
    text = f"{'dry run: ' if dry_run else ''}the repair {verb} {len(plan['files'])} file(s) ({_size(plan['bytes'])}){where}"
    if plan["salvaged_buckets"]:
        kept = "would keep" if dry_run else "keeps"
        text += f", {kept} the objects that verify in bucket(s) {', '.join(map(str, plan['salvaged_buckets']))}"
    dropped = plan["dropped_keys"]
    text += f", and {'would drop' if dry_run else 'drops'} {len(dropped)} key(s)" + (":" if dropped else ".")
    return "\n".join([text, *(f"  {escape_key(key)!r}" for key in dropped)])


def _announce(as_json: bool, plan: dict[str, Any]) -> None:
    """Print what a repair is about to do, before it does it (text mode)."""
    if not as_json and (plan["files"] or plan["dropped_keys"] or plan["salvaged_buckets"]):
        click.echo(_plan_text(plan, dry_run=False))


def _fsck_text(report: dict[str, Any]) -> str:
    lines = [f"fsck {report['path']} ({report['format']} format{', deep' if report['deep'] else ''})"]
    if report.get("writer_active"):
        lines.append("  note: a writer holds the lock; its in-progress files may show up below")
    lines += [
        f"  valid buckets   {report['valid_buckets']:,}",
        f"  valid objects   {report['valid_objects']:,}",
        f"  logical bytes   {_size(report['logical_bytes'])}",
        f"  dead bytes      {_size(report['dead_bytes'])}",
    ]
    if report.get("duplicate_keys"):
        lines.append(f"  duplicate keys  {report['duplicate_keys']:,} (in more than one bucket; not a problem)")
    lines.append(f"problems: {len(report['problems'])}")
    for p in report["problems"]:
        where = f"key {escape_key(p['key'])!r} in bucket {p['bucket']}" if "key" in p else ", ".join(p["files"]) or f"bucket {p['bucket']}"
        lines.append(f"  {p['kind']:<20} {where}  {_size(p['bytes'])}  ({p['detail']})")
    if report["foreign"]:
        lines.append(f"foreign entries (never touched): {len(report['foreign'])}")
        for f in report["foreign"]:
            lines.append(f"  {f['name']}  ({f['type']}, {_size(f['bytes'])})")
    lines.append(_fsck_verdict(report))
    return "\n".join(lines)


def _fsck_verdict(report: dict[str, Any]) -> str:
    repair = report["repair"]
    if report.get("dry_run"):
        if not report["problems"]:
            return "clean; nothing to repair."
        return _plan_text(report["plan"], dry_run=True) + "\nnothing was changed (run without --dry-run to repair)."
    if repair is None:
        if not report["problems"]:
            return "clean."
        return f"{len(report['problems'])} problem(s) found; nothing was changed (run with --repair to fix them)."
    if not report["problems"] and report["clean"]:
        return "clean; nothing to repair."
    removed = repair["removed"]
    if repair.get("quarantined"):
        text = f"repair: quarantined {len(removed)} file(s) ({_size(repair['quarantined_bytes'])} moved to quarantine/, not freed)"
        if repair["freed_bytes"]:
            text += f", {_size(repair['freed_bytes'])} freed"
    else:
        text = f"repair: removed {len(removed)} file(s), {_size(repair['freed_bytes'])} freed"
    if repair.get("salvaged_buckets"):
        text += f", kept the objects that verify in {len(repair['salvaged_buckets'])} damaged bucket(s)"
    if repair.get("dropped_keys"):
        text += f", dropped {len(repair['dropped_keys'])} key(s) of broken buckets"
    if repair.get("removed_keys"):
        text += f", removed {len(repair['removed_keys'])} corrupt object(s)"
    if repair.get("rewritten_buckets"):
        text += f", rewrote {len(repair['rewritten_buckets'])} meta(s)"
    for skipped in repair.get("skipped", []):
        text += f"\n  left {skipped['file']}: {skipped['reason']}"
    if report["clean"]:
        return text + "\nall problems fixed."
    return text + f"\n{len(repair['remaining_problems']) or 'some'} problem(s) remain; run fsck again."


# ---------------------------------------------------------------------------
# stats, ls, get
# ---------------------------------------------------------------------------


@cli.command()
@click.argument("directory")
@click.option("--prometheus", is_flag=True, help="Print the metrics in the Prometheus text format instead.")
@_format_option
@_json_option
@_verbose_option
@_guarded
def stats(directory: str, prometheus: bool, fmt: str, as_json: bool) -> int:
    """Show key, bucket and byte counts of DIRECTORY (read-only), and the
    limits its last writer recorded ("unknown" for a store last written by a
    kvbucket that recorded none). ``--prometheus`` prints one scrape of the
    metrics instead (the counters start at 0: they count this open)."""
    path = _existing_dir(directory)
    log.info("stats of %s", path)
    if prometheus:
        return _prometheus_stats(path, fmt, as_json)
    if _resolve_format(path, fmt) == "mooncake":
        payload = _mooncake_stats(path, as_json)
    else:
        with _open_readonly(path) as store:
            payload = {"path": os.fspath(path), "format": "kvbucket", **_plain(store.stats())}
    known = payload.get("limits_known", True)
    _emit(as_json, payload, lambda: "\n".join(f"{k:<20} {_stat_value(k, v, known)}" for k, v in payload.items()))
    return EXIT_OK


def _prometheus_stats(path: Path, fmt: str, as_json: bool) -> int:
    """``stats --prometheus``: one exposition of a readonly open."""
    from ..metrics import exposition  # prometheus_client is needed only here

    if as_json:
        raise Failure("--prometheus and --json are two output formats; give one of them")
    if _resolve_format(path, fmt) == "mooncake":
        raise Failure(f"{path} is a Mooncake directory; --prometheus reads kvbucket stores (import it first)")
    with _open_readonly(path) as store:
        click.echo(exposition(store), nl=False)
    return EXIT_OK


def _stat_value(name: str, value: Any, limits_known: bool = True) -> str:
    """One ``stats`` value in words; a limit of 0 is unlimited, or unknown
    when the store's writer recorded none (an older kvbucket)."""
    if name in ("max_total_size", "max_physical_bytes", "total_keys_limit") and value == 0:
        return "unlimited" if limits_known else "unknown"
    if is_int(value) and name.endswith("bytes"):
        return _size(value)
    if is_int(value):
        return f"{value:,}"
    return str(value)


def _mooncake_stats(path: Path, as_json: bool) -> dict[str, Any]:
    fs = FileSystem()
    scan = mooncake.scan_mooncake(path, fs, progress=_each(as_json, desc="checking buckets", unit="bucket"))
    physical = 0
    for bucket in scan.buckets:
        for identity in (bucket.data, bucket.meta_file):
            with contextlib.suppress(OSError):
                physical += fs.stat(os.fspath(path / identity.name)).st_blocks * 512
    return {
        "path": os.fspath(path),
        "format": "mooncake",
        "keys": scan.valid_objects,
        "buckets": len(scan.buckets),
        "logical_bytes": scan.logical_bytes,
        "physical_bytes": physical,
        "dead_bytes": scan.dead_bytes,
        "problems": len(scan.findings),
    }


@cli.command(name="ls")
@click.argument("directory")
@click.option("--bucket", "bucket_id", type=int, default=None, help="List only this bucket's objects.")
@_format_option
@_json_option
@_verbose_option
@_guarded
def ls_cmd(directory: str, bucket_id: int | None, fmt: str, as_json: bool) -> int:
    """List objects: one line per object, BUCKET<TAB>SIZE<TAB>KEY.

    Keys with backslashes or non-printable characters are escapes
    (\\\\, \\xNN, \\uNNNN); pass them to get/rm with -e."""
    path = _existing_dir(directory)
    log.info("listing %s%s", path, "" if bucket_id is None else f", bucket {bucket_id}")
    if _resolve_format(path, fmt) == "mooncake":
        _print_rows(path, _mooncake_rows(path, bucket_id), as_json)
    else:
        with _open_readonly(path) as store:
            _print_rows(path, _kv_rows(store, bucket_id), as_json)
    return EXIT_OK


def _print_rows(path: Path, rows: Iterator[dict[str, Any]], as_json: bool) -> None:
    """One JSON document, or one line per object as it is read (a long
    listing piped into ``head`` stops early)."""
    if as_json:
        objects = list(rows)
        click.echo(json.dumps({"path": os.fspath(path), "count": len(objects), "objects": objects}, indent=2))
        return
    for row in rows:
        click.echo(f"{row['bucket']}\t{row['size']}\t{escape_key(row['key'])}")


def _kv_rows(store: BucketStore, bucket_id: int | None) -> Iterator[dict[str, Any]]:
    if bucket_id is not None:
        keys = store.bucket_keys(bucket_id)
        metas = store.batch_query(keys) if keys else {}
        pages: Iterable[list[tuple[str, Any]]] = [[(k, metas[k]) for k in keys]]
    else:
        pages = store.scan_meta()
    for page in pages:
        for key, meta in page:
            yield {"key": key, "bucket": meta.bucket_id, "offset": meta.offset, "size": meta.size, "checksum": meta.checksum}


def _mooncake_rows(path: Path, bucket_id: int | None) -> Iterator[dict[str, Any]]:
    scan = mooncake.scan_mooncake(path)
    buckets = [b for b in scan.buckets if bucket_id is None or b.bucket_id == bucket_id]
    if bucket_id is not None and not buckets:
        raise KeyNotFound(f"no valid bucket {bucket_id} in {path}")
    for bucket in buckets:
        for key, obj in zip(bucket.meta.keys, bucket.meta.metadatas):
            yield {"key": mooncake.source_key(key), "bucket": bucket.bucket_id, "offset": obj.value_offset, "size": obj.data_size}


@cli.command()
@click.argument("directory")
@click.argument("key")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    help="Write the value to this file instead of stdout ('-': stdout)."
)
@click.option("-e", "--escaped", is_flag=True, help="KEY uses ls's escapes (\\\\, \\xNN, \\uNNNN).")
@_format_option
@_verbose_option
@_guarded
def get(directory: str, key: str, output: str | None, escaped: bool, fmt: str) -> int:
    """Write the value of KEY to stdout (raw bytes, nothing added).

    An unknown key or a value that fails its checksum exits 1."""
    path = _existing_dir(directory)
    key = unescape_key(key) if escaped else key
    log.info("reading key %r from %s", escape_key(key), path)
    if _resolve_format(path, fmt) == "mooncake":
        value = _mooncake_get(path, key)
    else:
        with _open_readonly(path) as store:
            value = store.batch_get([key])[key]
    if output is None or output == "-":
        log.info("writing %d byte(s) to stdout", len(value))
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
    else:
        log.info("writing %d byte(s) to %s", len(value), output)
        with open(output, "wb") as f:
            f.write(value)
    return EXIT_OK


def _mooncake_get(path: Path, key: str) -> bytes:
    """The value of ``key``: the exact stored key, else ``default\\0KEY``."""
    wanted = key.encode("utf-8", "surrogateescape")
    scan = mooncake.scan_mooncake(path)
    for candidate in (wanted, b"default" + mooncake.TENANT_SEPARATOR + wanted):
        for bucket in reversed(scan.buckets):
            if candidate in bucket.meta.keys:
                return mooncake.read_object(path, bucket, candidate)
    raise KeyNotFound(f"key {escape_key(key)!r} not found in {path}")


# ---------------------------------------------------------------------------
# rm
# ---------------------------------------------------------------------------


@cli.command()
@click.argument("directory")
@click.argument("keys", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Ignore keys that are not stored.")
@click.option("-e", "--escaped", is_flag=True, help="KEYS use ls's escapes (\\\\, \\xNN, \\uNNNN).")
@_json_option
@_verbose_option
@_guarded
def rm(directory: str, keys: tuple[str, ...], force: bool, escaped: bool, as_json: bool) -> int:
    """Remove KEYS from the store (takes the writer lock).

    If any key is not stored, nothing is removed and the exit status is 1,
    unless --force. Refuses while another process holds the writer lock."""
    path = _existing_dir(directory)
    _require_store(path, "opening it as a kvbucket store")
    wanted = list(dict.fromkeys(unescape_key(k) if escaped else k for k in keys))
    log.info("removing %d key(s) from %s", len(wanted), path)
    with _open_writer(path, "remove keys from") as store:
        present = store.batch_exists(wanted)
        missing = [k for k, ok in zip(wanted, present) if not ok]
        log.info("%d of them stored, %d not", len(wanted) - len(missing), len(missing))
        if missing and not force:
            raise KeyNotFound(f"not stored, nothing removed: {', '.join(repr(escape_key(k)) for k in missing)}")
        removed = [k for k, ok in zip(wanted, present) if ok]
        if removed:
            store.batch_remove(removed)
    payload = {"path": os.fspath(path), "removed": removed, "missing": missing}
    _emit(as_json, payload, lambda: f"removed {len(removed)} key(s)" + (f"; {len(missing)} not stored" if missing else ""))
    return EXIT_OK


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------


@cli.command(name="import")
@click.argument("source")
@click.argument("destination")
@click.option("--from-mooncake", is_flag=True, help="SOURCE is a Mooncake bucket directory (required).")
@click.option("--keep-tenant", is_flag=True, help="Keep Mooncake's tenant prefix ('default\\0') in keys.")
@_json_option
@_verbose_option
@_guarded
def import_cmd(source: str, destination: str, from_mooncake: bool, keep_tenant: bool, as_json: bool) -> int:
    """Copy every valid object of SOURCE into the kvbucket store DESTINATION.

    DESTINATION is created when missing; keys already there are skipped and
    reported; SOURCE is never modified. Exit 0 when everything in SOURCE was
    imported, 1 when anything was skipped (broken buckets, invalid or
    duplicate keys, keys already in DESTINATION)."""
    if not from_mooncake:
        raise click.UsageError("only Mooncake sources are supported; add --from-mooncake")
    src = _existing_dir(source)
    dst = Path(destination)
    log.info("importing the Mooncake directory %s into %s", src, dst)
    if _directory_identity(src) == _directory_identity(dst):
        raise Failure("SOURCE and DESTINATION are the same directory")
    if mooncake.detect_format(src) == "kvbucket":
        raise Failure(f"{src} looks like a kvbucket store, not a Mooncake directory")
    _refuse_mooncake_writer(dst, "importing into it")
    scan = mooncake.scan_mooncake(src, progress=_each(as_json, desc="checking source", unit="bucket"))
    log.info("%s: %d valid bucket(s), %d object(s), %d broken bucket(s)", src, len(scan.buckets), scan.valid_objects, len(scan.findings))
    with _open_writer(dst, "import into") as store, _bar(
        as_json, desc="importing", total=scan.logical_bytes, unit="B", unit_scale=True
    ) as bar:
        report = mooncake.import_mooncake(src, store, keep_tenant=keep_tenant, scan=scan, progress=bar.update)
    payload = report.to_json()
    _emit(as_json, payload, lambda: _import_text(report))
    return EXIT_OK if report.complete else EXIT_PROBLEMS


def _import_text(report: mooncake.ImportReport) -> str:
    lines = [
        f"imported {report.imported:,} object(s), {_size(report.imported_bytes)}, "
        f"from {report.source} into {report.destination} ({report.buckets_written} bucket(s) written)"
    ]
    if report.skipped_buckets:
        lines.append(f"skipped {len(report.skipped_buckets)} broken source bucket(s):")
        lines.extend(
            f"  bucket {f.bucket} ({', '.join(i.name for i in f.files)}): {f.kind.description}: {f.detail}"
            for f in report.skipped_buckets
        )
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} object(s):")
        lines.extend(f"  {escape_key(s.key)!r} (bucket {s.bucket}): {s.reason}" for s in report.skipped)
    lines.append("complete." if report.complete else "incomplete: see the skipped entries above.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


def _size_param(_ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None
    if size <= 0:
        raise click.BadParameter("must be positive", param=param)
    return size


def _optional_size_param(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else _size_param(ctx, param, value)


@cli.command()
@click.argument("directory", required=False)
@click.option("--object-size", default="1MiB", show_default=True, callback=_size_param, help="Bytes per object (e.g. 64KiB, 1MiB).")
@click.option("--total", default="1GiB", show_default=True, callback=_size_param, help="Bytes written and read per pass.")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(min=1), help="Reader threads (queue depth).")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1), help="Objects per batch_load.")
@click.option("--depth", default=4, show_default=True, type=click.IntRange(min=1), help="Batches in flight in the submit_load pass.")
@click.option("--bucket-size", default=None, callback=_optional_size_param, help="Most bytes per bucket [default: the store's].")
@click.option("--bucket-keys", default=None, type=click.IntRange(min=1, max=MAX_BUCKET_KEYS), help="Most objects per bucket [default: the store's].")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Runs; the median is reported.")
@click.option("--durability", type=click.Choice(["strict", "relaxed"]), default="strict", show_default=True)
@_json_option
@_verbose_option
@_guarded
def bench(
    directory: str | None,
    object_size: int,
    total: int,
    threads: int,
    batch: int,
    depth: int,
    bucket_size: int | None,
    bucket_keys: int | None,
    repeats: int,
    durability: str,
    as_json: bool,
) -> int:
    """Measure the disk under DIRECTORY (default: the temp dir), then
    kvbucket on the same workload, and print both with their ratio.

    kvbucket runs in every io_mode, the default configuration otherwise;
    besides batch_load, the submit_load pass keeps --depth batches in flight
    against a raw read that keeps --threads reads in flight. Only a scratch
    sub-directory is written, and it is removed afterwards."""
    from . import bench as bench_module

    log.info("benchmarking the disk under %s: %d-byte objects, %d bytes a pass", directory or "the temp dir", object_size, total)
    try:
        result = bench_module.run(
            directory,
            object_size=object_size,
            total_bytes=total,
            threads=threads,
            batch=batch,
            depth=depth,
            bucket_size=bucket_size,
            bucket_keys=bucket_keys,
            repeats=repeats,
            durability=durability,
            progress=not as_json and sys.stderr.isatty(),
        )
    except (ValueError, RuntimeError) as exc:
        raise Failure(f"bench: {exc}") from None
    _emit(as_json, result, lambda: bench_module.format_report(result))
    return EXIT_OK


# ---------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------

REPLAY_DEFAULT_CAPACITIES = ("5%", "10%", "15%", "20%", "25%", "30%")


@cli.command()
@click.argument("trace", required=False)
@click.option("--capacity", "capacities", multiple=True, help="Tier size: bytes (200G) or a share of the trace's distinct blocks (10%). Repeatable.")
@click.option("--capacity-blocks", "capacity_blocks", multiple=True, type=click.IntRange(min=1), help="Tier size in blocks. Repeatable.")
@click.option("--object-size", default="4KiB", show_default=True, callback=_size_param, help="Bytes per block (KV-cache page).")
@click.option("--l2", "l2_blocks", default=0, show_default=True, type=click.IntRange(min=0), help="Blocks of host-memory LRU in front of the tier.")
@click.option("--overlap", is_flag=True, help="Land each write-back after the next request's lookup (background write-back).")
@click.option("--simulate", is_flag=True, help="Run the store in memory (data files keep only their length): fast, no disk used.")
@click.option("--dir", "directory", default=None, help="Where the real store runs (a temporary sub-directory, removed afterwards).")
@click.option("--plot", "plot_path", default=None, help="Also draw hit rate against capacity into this PNG file.")
@click.option(
    "--eviction-policy", "eviction_policy", default=None, type=click.Choice(["2q", "lru", "fifo"], case_sensitive=False),
    help="The store's eviction policy.  [default: the store's, 2q]",
)
@_json_option
@_verbose_option
@_guarded
def replay(
    trace: str | None,
    capacities: tuple[str, ...],
    capacity_blocks: tuple[int, ...],
    object_size: int,
    l2_blocks: int,
    overlap: bool,
    simulate: bool,
    directory: str | None,
    plot_path: str | None,
    eviction_policy: str | None,
    as_json: bool,
) -> int:
    """Replay a KV-cache trace through kvbucket, an ideal per-object LRU and
    the offline optimum (Belady), at each capacity, and report hit rates,
    write amplification and I/O rates: size a tier from real traffic.

    TRACE is a Mooncake-format JSONL file (.xz and .gz too); without it,
    the Mooncake synthetic trace shipped with kvbucket. Without a capacity,
    5% to 30% of the trace's distinct blocks. See docs/CAPACITY_PLANNING.md."""
    from .. import replay as replay_module
    from ..replay.report import MissingPlotLibrary, format_report, plot_reports

    loaded = replay_module.read_trace(trace or replay_module.default_trace_path())
    distinct = loaded.distinct_blocks
    texts = capacities if capacities or capacity_blocks else REPLAY_DEFAULT_CAPACITIES
    blocks = [replay_module.parse_capacity(text, object_size, distinct) for text in texts] + list(capacity_blocks)
    fields = {} if eviction_policy is None else {"eviction_policy": eviction_policy.lower()}
    options = replay_module.ReplayOptions(
        object_size=object_size, l2_blocks=l2_blocks, overlap=overlap, simulate=simulate, directory=directory, store_fields=fields
    )
    report = replay_module.replay(loaded, blocks, options)
    if plot_path is not None:
        try:
            plot_reports([report], plot_path)
        except MissingPlotLibrary as exc:
            raise Failure(str(exc)) from None
    _emit(as_json, report.to_json(), lambda: format_report(report))
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``kvbucket`` command."""
    try:
        cli.main(args=argv, prog_name="kvbucket")
    except BrokenPipeError:  # e.g. `kvbucket --help | head -1`
        _broken_pipe()


if __name__ == "__main__":
    main()
