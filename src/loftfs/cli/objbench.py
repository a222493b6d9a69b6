"""``loft objbench``: check that an object store behaves as loftfs needs, then measure it.

Everything happens under a fresh random prefix (``loft-objbench-<hex>/``) of the store the URL
names, and every object written there is deleted at the end, whatever happened. The checks cover
the operations loftfs relies on (whole and ranged reads, head, not-found errors, overwrites,
ordered listings with prefix, delimiter, start-after and pagination, single and batch deletes);
any failed check makes the exit status 1. The benchmark measures PUT, GET, HEAD, LIST and DELETE
with ``--threads`` concurrent requests: operations and bytes per second and latency
percentiles.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Annotated, Any

import typer
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from loftfs.cli.common import (
    cell,
    print_json,
    print_warning,
    redact_url,
    stderr_console,
    stdout_console,
)
from loftfs.errors import ConfigError, LoftError, ObjectNotFound, ObjectStoreError
from loftfs.object.interface import ObjectStore
from loftfs.utils import format_size, parse_size

PREFIX_BASE = "loft-objbench-"
# More keys than one page of an S3 listing (1,000) or of a batch delete (1,000), so that
# pagination and batching are exercised; written in parallel.
LIST_KEYS = 1_050
_DELETE_BATCH = 1_000


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Step:
    """One benchmark step: ``ops`` requests of ``size`` bytes each, with latencies."""

    name: str
    ops: int
    size: int
    threads: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile in seconds (0 when nothing was measured)."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.ops * self.size / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ops": self.ops,
            "size": self.size,
            "threads": self.threads,
            "seconds": round(self.seconds, 6),
            "ops_per_s": round(self.ops_per_s, 2),
            "bytes_per_s": round(self.bytes_per_s, 1),
            "p50_ms": round(self.percentile(0.50) * 1e3, 3),
            "p90_ms": round(self.percentile(0.90) * 1e3, 3),
            "p99_ms": round(self.percentile(0.99) * 1e3, 3),
            "errors": self.errors,
            "first_error": self.first_error,
        }


class _Bar:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr_console(),
            disable=not enabled,
            transient=False,
        )

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        task_id = self.progress.add_task(description, total=total)
        lock = threading.Lock()

        def advance() -> None:
            with lock:
                self.progress.advance(task_id)

        try:
            yield advance
        finally:
            self.progress.update(task_id, completed=total)


def _run(step: Step, jobs: Sequence[Callable[[], object]], bar: _Bar) -> Step:
    """Run ``jobs`` on ``step.threads`` workers, timing each; an exception counts as an
    error."""
    lock = threading.Lock()

    with bar.task(step.name, len(jobs)) as advance:

        def timed(job: Callable[[], object]) -> None:
            t0 = time.perf_counter()
            try:
                job()
            except Exception as e:
                with lock:
                    step.errors += 1
                    step.first_error = step.first_error or f"{type(e).__name__}: {e}"
            else:
                elapsed = time.perf_counter() - t0
                with lock:
                    step.latencies.append(elapsed)
            advance()

        start = time.perf_counter()
        with ThreadPoolExecutor(step.threads, thread_name_prefix="objbench") as pool:
            list(pool.map(timed, jobs))
        step.seconds = time.perf_counter() - start
    return step


# --- behaviour checks ----------------------------------------------------------------------


class _Checker:
    """Runs named checks; a check fails on a false condition or any exception."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.results: list[Check] = []

    def check(self, name: str, fn: Callable[[], str | None]) -> None:
        try:
            problem = fn()
        except Exception as e:
            problem = f"{type(e).__name__}: {e}"
        self.results.append(Check(name, problem is None, problem or ""))

    def key(self, name: str) -> str:
        return self.prefix + name


def _expect_not_found(fn: Callable[[], object], what: str) -> str | None:
    try:
        fn()
    except ObjectNotFound:
        return None
    except ObjectStoreError as e:
        return f"{what}: {type(e).__name__} instead of ObjectNotFound ({e})"
    return f"{what} succeeded on a missing key"


def run_checks(store: ObjectStore, prefix: str, bar: _Bar, threads: int) -> list[Check]:
    """Every behaviour loftfs relies on, under ``prefix`` (left empty afterwards if all
    deletes work)."""
    c = _Checker(store, prefix)
    payload = os.urandom(100_000)

    def whole() -> str | None:
        store.put(c.key("whole"), payload)
        got = store.get(c.key("whole"))
        if got != payload:
            return f"read {len(got)} bytes back, not the {len(payload)} written"
        store.put(c.key("empty"), b"")
        if store.get(c.key("empty")) != b"":
            return "an empty object did not read back empty"
        return None

    def ranged() -> str | None:
        cases = [(0, 1), (0, -1), (10, 100), (99_990, -1), (99_999, 10), (50_000, 0), (100_000, 5)]
        for off, limit in cases:
            want = payload[off:] if limit < 0 else payload[off : off + limit]
            got = store.get(c.key("whole"), off, limit)
            if got != want:
                return f"get(offset={off}, limit={limit}) gave {len(got)} bytes, not {len(want)}"
        return None

    def head() -> str | None:
        info = store.head(c.key("whole"))
        if info.key != c.key("whole") or info.size != len(payload):
            return f"head gave key {info.key!r} size {info.size}, not {len(payload)}"
        if info.is_prefix:
            return "head reported an object as a prefix"
        if store.head(c.key("empty")).size != 0:
            return "head of an empty object reported a size"
        return None

    def missing() -> str | None:
        k = c.key("no/such/key")
        store.put(c.key("dir/obj"), b"x")  # "dir" is a prefix, not an object
        try:
            return (
                _expect_not_found(lambda: store.get(k), "get")
                or _expect_not_found(lambda: store.get(k, 5, 10), "ranged get")
                or _expect_not_found(lambda: store.head(k), "head")
                or _expect_not_found(lambda: store.get(c.key("dir")), "get of a prefix")
                or _expect_not_found(lambda: store.head(c.key("dir")), "head of a prefix")
            )
        finally:
            store.delete(c.key("dir/obj"))

    def overwrite() -> str | None:
        store.put(c.key("over"), b"first version, longer")
        store.put(c.key("over"), b"second")
        if (got := store.get(c.key("over"))) != b"second":
            return f"read {got[:40]!r} after an overwrite"
        if (size := store.head(c.key("over")).size) != 6:
            return f"head reports {size} bytes after an overwrite to 6"
        return None

    c.check("put + get", whole)
    c.check("ranged get", ranged)
    c.check("head", head)
    c.check("missing key: not found", missing)
    c.check("overwrite", overwrite)

    # listings: LIST_KEYS keys in one folder (pagination), and a small tree
    lp = c.key("list/")
    names = [f"many/{i:05d}" for i in range(LIST_KEYS)]
    tree = ["tree/a", "tree/b/1", "tree/b/2", "tree/c", "tree/d/x/y", "tree/e"]

    def put_list_keys() -> str | None:
        step = Step("put listing keys", len(names) + len(tree), 1, threads)
        jobs = [partial(store.put, lp + k, b"x") for k in names + tree]
        _run(step, jobs, bar)
        return f"{step.errors} puts failed: {step.first_error}" if step.errors else None

    def keys(infos: Iterator[Any]) -> list[tuple[str, bool]]:
        return [(i.key, i.is_prefix) for i in infos]

    def list_paged() -> str | None:
        got = [k for k, _ in keys(iter(store.list(lp + "many/")))]
        want = [lp + n for n in names]
        if got != want:
            return f"listed {len(got)} keys (in order: {got == sorted(got)}), expected {len(want)}"
        return None

    def list_delimiter() -> str | None:
        got = keys(iter(store.list(lp + "tree/", delimiter="/")))
        want = [
            (lp + "tree/a", False),
            (lp + "tree/b/", True),
            (lp + "tree/c", False),
            (lp + "tree/d/", True),
            (lp + "tree/e", False),
        ]
        return None if got == want else f"got {got}"

    def list_start_after() -> str | None:
        got = [k for k, _ in keys(iter(store.list(lp + "tree/", start_after=lp + "tree/b/1")))]
        want = [lp + k for k in ("tree/b/2", "tree/c", "tree/d/x/y", "tree/e")]
        if got != want:
            return f"got {got}"
        after = lp + f"many/{LIST_KEYS - 3:05d}"
        tail = [k for k, _ in keys(iter(store.list(lp + "many/", start_after=after)))]
        if tail != [lp + f"many/{i:05d}" for i in range(LIST_KEYS - 2, LIST_KEYS)]:
            return f"start-after near the end gave {tail}"
        got2 = keys(iter(store.list(lp + "tree/", start_after=lp + "tree/b/1", delimiter="/")))
        if (lp + "tree/a", False) in got2 or got2[-3:] != [
            (lp + "tree/c", False),
            (lp + "tree/d/", True),
            (lp + "tree/e", False),
        ]:
            return f"start-after with a delimiter gave {got2}"
        return None

    def list_limit() -> str | None:
        got = [k for k, _ in keys(iter(store.list(lp + "many/", limit=5)))]
        if got != [lp + n for n in names[:5]]:
            return f"limit=5 gave {got}"
        empty = list(store.list(c.key("nothing-here/")))
        return None if not empty else f"an empty prefix listed {len(empty)} entries"

    c.check("put (many keys)", put_list_keys)
    c.check("list: prefix, order, pages", list_paged)
    c.check("list: delimiter", list_delimiter)
    c.check("list: start-after", list_start_after)
    c.check("list: limit, empty prefix", list_limit)

    def delete_one() -> str | None:
        store.delete(c.key("over"))
        problem = _expect_not_found(lambda: store.get(c.key("over")), "get after delete")
        if problem:
            return problem
        store.delete(c.key("over"))  # already gone: not an error
        store.delete(c.key("never/written"))
        return None

    def delete_batch() -> str | None:
        store.delete_many([lp + k for k in names + tree] + [c.key("never/written/either")])
        left = list(store.list(lp))
        return f"{len(left)} objects left after a batch delete" if left else None

    c.check("delete, delete of a missing key", delete_one)
    c.check("batch delete", delete_batch)
    return c.results


# --- benchmark -----------------------------------------------------------------------------


def run_bench(
    store: ObjectStore,
    prefix: str,
    bar: _Bar,
    *,
    threads: int,
    small_size: int,
    big_size: int,
    count: int,
    big_count: int,
) -> list[Step]:
    small = os.urandom(small_size)
    big = os.urandom(big_size)
    small_keys = [f"{prefix}small/{i:06d}" for i in range(count)]
    big_keys = [f"{prefix}big/{i:06d}" for i in range(big_count)]
    steps: list[Step] = []

    def get_checked(key: str, want: bytes) -> None:
        got = store.get(key)
        if got != want:
            raise LoftError(f"{key}: read {len(got)} bytes back, wrote {len(want)}")

    def add(step: Step, jobs: Sequence[Callable[[], object]]) -> None:
        steps.append(_run(step, jobs, bar))

    add(
        Step("PUT small", count, small_size, threads),
        [partial(store.put, k, small) for k in small_keys],
    )
    add(
        Step("GET small", count, small_size, threads),
        [partial(get_checked, k, small) for k in small_keys],
    )
    add(
        Step("HEAD small", count, 0, threads),
        [partial(store.head, k) for k in small_keys],
    )
    add(
        Step("PUT big", big_count, big_size, threads),
        [partial(store.put, k, big) for k in big_keys],
    )
    add(
        Step("GET big", big_count, big_size, threads),
        [partial(get_checked, k, big) for k in big_keys],
    )
    # LIST: full listings of the small objects, one at a time (a listing is sequential)
    listings = max(3, min(50, 20_000 // max(1, count)))

    def list_all() -> None:
        n = sum(1 for _ in store.list(prefix + "small/"))
        if n != count:
            raise LoftError(f"listed {n} small objects, wrote {count}")

    add(Step(f"LIST {count} keys (1 thread)", listings, 0, 1), [list_all] * listings)
    add(
        Step("DELETE", count + big_count, 0, threads),
        [partial(store.delete, k) for k in small_keys + big_keys],
    )
    return steps


# --- command -------------------------------------------------------------------------------


def _cleanup(store: ObjectStore, prefix: str) -> int:
    """Delete whatever is left under ``prefix``; returns how many objects could not be."""
    try:
        left = [i.key for i in store.list(prefix) if not i.is_prefix]
        for start in range(0, len(left), _DELETE_BATCH):
            store.delete_many(left[start : start + _DELETE_BATCH])
        return sum(1 for i in store.list(prefix) if not i.is_prefix)
    except ObjectStoreError as e:
        print_warning(f"cleaning up {prefix} failed: {e}")
        return -1


def _checks_table(checks: list[Check]) -> Table:
    table = Table(title="Behaviour", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for c in checks:
        table.add_row(
            cell(c.name), "[green]ok[/]" if c.ok else "[bold red]FAILED[/]", cell(c.detail)
        )
    return table


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _bench_table(steps: list[Step]) -> Table:
    table = Table(title="Performance", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("step", no_wrap=True)
    for name in ("ops", "size", "ops/s", "MiB/s", "p50 ms", "p90 ms", "p99 ms", "errors"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in steps:
        table.add_row(
            cell(s.name),
            cell(s.ops),
            cell(format_size(s.size) if s.size else "-"),
            cell(f"{s.ops_per_s:,.1f}"),
            cell(f"{s.bytes_per_s / (1 << 20):,.1f}" if s.size else "-"),
            cell(_ms(s.percentile(0.5))),
            cell(_ms(s.percentile(0.9))),
            cell(_ms(s.percentile(0.99))),
            cell(s.errors),
        )
    return table


def _positive(value: int, option: str) -> int:
    if value < 1:
        raise ConfigError(f"{option} must be at least 1, not {value}")
    return value


def objbench_cmd(
    storage_url: Annotated[
        str,
        typer.Argument(
            metavar="STORAGE_URL",
            help="file:///DIR, s3://BUCKET/PREFIX or http(s)://HOST:PORT/BUCKET/PREFIX "
            "(the prefix is optional)",
        ),
    ],
    threads: Annotated[int, typer.Option("--threads", "-t", help="Concurrent requests")] = 4,
    small_size: Annotated[
        str, typer.Option("--small-size", help="Size of the small objects")
    ] = "128K",
    big_size: Annotated[str, typer.Option("--big-size", help="Size of the big objects")] = "4M",
    count: Annotated[int, typer.Option("--count", help="Number of small objects")] = 200,
    big_count: Annotated[int, typer.Option("--big-count", help="Number of big objects")] = 25,
    access_key: Annotated[
        str | None,
        typer.Option(
            "--access-key", help="S3 access key id (default: the AWS chain, e.g. AWS_ACCESS_KEY_ID)"
        ),
    ] = None,
    secret_key: Annotated[
        str | None,
        typer.Option(
            "--secret-key",
            help="S3 secret key (better from the environment: AWS_SECRET_ACCESS_KEY)",
            show_default=False,
        ),
    ] = None,
    region: Annotated[str | None, typer.Option("--region", help="S3 region")] = None,
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", help="S3 endpoint for s3:// URLs, e.g. http://host:8333"),
    ] = None,
    skip_bench: Annotated[
        bool, typer.Option("--checks-only", help="Only check behaviour, measure nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON")] = False,
) -> None:
    """Check that an object store does what loftfs needs, then measure it (in a random prefix,
    removed afterwards). Exits 1 when a check fails."""
    from loftfs.object import open_storage_url

    _positive(threads, "--threads")
    _positive(count, "--count")
    _positive(big_count, "--big-count")
    small = parse_size(small_size)
    big = parse_size(big_size)
    if small < 1 or big < 1:
        raise ConfigError("--small-size and --big-size must be at least 1 byte")
    # only what was given: the file backend takes no options, s3 falls back to the AWS chain
    given = {"access_key": access_key, "secret_key": secret_key, "region": region}
    options: dict[str, object] = {k: v for k, v in given.items() if v}
    if endpoint:
        options["endpoint"] = endpoint
    store = open_storage_url(storage_url, **options)
    prefix = f"{PREFIX_BASE}{secrets.token_hex(6)}/"
    where = f"{redact_url(store.describe())}{prefix}"
    bar = _Bar(stderr_console().is_terminal and not as_json)
    checks: list[Check] = []
    steps: list[Step] = []
    try:
        try:
            store.put(prefix + "probe", b"probe")
            store.delete(prefix + "probe")
        except (ObjectStoreError, OSError) as e:
            raise LoftError(f"cannot write to {where}: {e}") from e
        with bar.progress:
            checks = run_checks(store, prefix, bar, threads)
            if not skip_bench:
                steps = run_bench(
                    store,
                    prefix,
                    bar,
                    threads=threads,
                    small_size=small,
                    big_size=big,
                    count=count,
                    big_count=big_count,
                )
    finally:
        left = _cleanup(store, prefix)
        store.close()
    if left > 0:
        print_warning(f"{left} objects could not be deleted under {where}")
    failed = [c for c in checks if not c.ok]
    step_errors = sum(s.errors for s in steps)
    if as_json:
        print_json(
            {
                "storage": redact_url(store.describe()),
                "prefix": prefix,
                "checks": [asdict(c) for c in checks],
                "bench": [s.as_dict() for s in steps],
                "left_over": left,
            }
        )
    else:
        console = stdout_console()
        if not console.is_terminal:
            console.width = max(console.width, 120)  # a log or a pipe: do not squeeze columns
        console.print(f"Object store {where} (threads: {threads})", markup=False)
        console.print(_checks_table(checks))
        if steps:
            console.print()
            console.print(_bench_table(steps))
    if failed:
        raise LoftError(
            f"{len(failed)} of {len(checks)} behaviour checks failed: "
            + ", ".join(c.name for c in failed)
        )
    if step_errors:
        first = next(s for s in steps if s.errors)
        raise LoftError(
            f"{step_errors} benchmark operations failed (first, in {first.name}: "
            f"{first.first_error})"
        )
