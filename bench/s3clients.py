"""S3 client libraries measured on loftfs's access pattern: boto3 (botocore over urllib3) and
obstore (Rust ``object_store``), side by side against the same S3 endpoint in the same run.

Steps, each on a fresh bucket per client, from ``--threads`` concurrent threads (as the data
path's upload and fetch pools do):

- ``put 4M`` / ``get 4M``: whole 4 MiB blocks (MiB/s; every GET is checked);
- ``put small`` / ``get small``: objects of 4-64 KiB (objects/s);
- ``get range``: 64 KiB ranges of the 4 MiB blocks (requests/s);
- ``list``: one paginated listing of ``--list-keys`` keys, 1000 per page (keys/s);
- ``delete``: batch deletion of those keys (keys/s).

Usage: ``.venv/bin/python bench/s3clients.py [--endpoint http://127.0.0.1:8333 --access-key K
--secret-key S] [--threads 16] [--big 64] [--small 2000] [--list-keys 10000] [--runs 1]``.
Without ``--endpoint`` it starts its own SeaweedFS (``weed``, from ``tests/servers.py``) on
loopback and stops it at the end. Prints one table: the median of ``--runs`` per step, and the
client CPU per item, and the ratios obstore / boto3 (rate above 1: obstore is faster; CPU below 1:
obstore is cheaper). The CPU figure counts this process only, so it holds even when the server
shares the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

BLOCK = 4 << 20
RANGE = 64 << 10
STEPS = ("put 4M", "get 4M", "put small", "get small", "get range", "list", "delete")
UNITS = {
    "put 4M": "MiB/s",
    "get 4M": "MiB/s",
    "put small": "obj/s",
    "get small": "obj/s",
    "get range": "req/s",
    "list": "keys/s",
    "delete": "keys/s",
}


class BenchError(RuntimeError):
    pass


class Client:
    """The operations measured, over one bucket."""

    name = ""

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def list_keys(self, prefix: str) -> int:
        """Number of keys under ``prefix``, walking every page."""
        raise NotImplementedError

    def delete_many(self, keys: Sequence[str]) -> None:
        raise NotImplementedError


class Boto3Client(Client):
    name = "boto3"

    def __init__(self, endpoint: str, key: str, secret: str, bucket: str, pool: int) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(
                max_pool_connections=pool,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
                tcp_keepalive=True,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        rng = f"bytes={offset}-{offset + length - 1}"
        body = self.s3.get_object(Bucket=self.bucket, Key=key, Range=rng)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def list_keys(self, prefix: str) -> int:
        n, token = 0, None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self.s3.list_objects_v2(**kw)
            n += len(page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return n
            token = page["NextContinuationToken"]

    def delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            out = self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if out.get("Errors"):
                raise BenchError(f"boto3: {len(out['Errors'])} keys not deleted")


class ObstoreClient(Client):
    name = "obstore"

    def __init__(self, endpoint: str, key: str, secret: str, bucket: str, pool: int) -> None:
        import obstore
        from obstore.store import S3Store

        self.ob = obstore
        self.store = S3Store(
            bucket,
            endpoint=endpoint,
            access_key_id=key,
            secret_access_key=secret,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={
                "allow_http": True,
                "connect_timeout": "5s",
                "timeout": "30s",
                "pool_max_idle_per_host": str(pool),
            },
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
        )

    def put(self, key: str, data: bytes) -> None:
        self.ob.put(self.store, key, data)

    def get(self, key: str) -> bytes:
        return bytes(self.ob.get(self.store, key).bytes())

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return bytes(self.ob.get_range(self.store, key, start=offset, length=length))

    def list_keys(self, prefix: str) -> int:
        return sum(len(chunk) for chunk in self.ob.list(self.store, prefix, chunk_size=1000))

    def delete_many(self, keys: Sequence[str]) -> None:
        self.ob.delete(self.store, list(keys))


CLIENTS: dict[str, type[Client]] = {"boto3": Boto3Client, "obstore": ObstoreClient}


def create_bucket(endpoint: str, key: str, secret: str, bucket: str) -> None:
    import boto3

    boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)


class Timer:
    """Wall seconds and this process's CPU seconds (all threads) of a step: the CPU figure is
    the client's own cost, whatever the server (maybe on the same machine) spends."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def parallel(threads: int, fn: Callable[[Any], object], items: Sequence[Any]) -> Timer:
    """Run ``fn`` over ``items`` from ``threads`` threads (errors propagate), timed."""
    with Timer() as timer, ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    return timer


Result = dict[str, tuple[float, float]]  # step -> (rate in UNITS[step], CPU µs per item)


def bench_client(client: Client, args: argparse.Namespace) -> Result:
    out: Result = {}
    rnd = random.Random(7)
    run = uuid.uuid4().hex[:6]
    t = args.threads

    def record(step: str, timer: Timer, items: int, volume: float | None = None) -> None:
        amount = items if volume is None else volume
        out[step] = (amount / timer.wall, timer.cpu / items * 1e6)

    # the server's first writes to a bucket allocate its storage: keep that out of the figures
    parallel(t, lambda i: client.put(f"{run}/warm/{i}", os.urandom(BLOCK)), range(t))
    client.delete_many([f"{run}/warm/{i}" for i in range(t)])

    blocks = [(f"{run}/big/{i:05d}", os.urandom(BLOCK)) for i in range(args.big)]
    mib = args.big * BLOCK / (1 << 20)
    record("put 4M", parallel(t, lambda kv: client.put(*kv), blocks), args.big, mib)

    def check_get(kv: tuple[str, bytes]) -> None:
        if client.get(kv[0]) != kv[1]:
            raise BenchError(f"{client.name}: {kv[0]} read back wrong")

    record("get 4M", parallel(t, check_get, blocks), args.big, mib)

    ranges = [(rnd.randrange(args.big), rnd.randrange(BLOCK // RANGE)) for _ in range(args.small)]

    def check_range(item: tuple[int, int]) -> None:
        key, data = blocks[item[0]]
        off = item[1] * RANGE
        if client.get_range(key, off, RANGE) != data[off : off + RANGE]:
            raise BenchError(f"{client.name}: range of {key} read back wrong")

    record("get range", parallel(t, check_range, ranges), len(ranges))
    blocks.clear()  # free the memory before the next steps

    pool = os.urandom(64 << 10)
    small = [
        (f"{run}/small/{i:06d}", pool[: rnd.randrange(4 << 10, (64 << 10) + 1)])
        for i in range(args.small)
    ]
    record("put small", parallel(t, lambda kv: client.put(*kv), small), len(small))
    record("get small", parallel(t, check_get, small), len(small))

    # the listing: --list-keys empty objects (put untimed, from every thread)
    listed = [f"{run}/list/{i:07d}" for i in range(args.list_keys)]
    parallel(t, lambda k: client.put(k, b""), listed)
    with Timer() as timer:
        n = client.list_keys(f"{run}/list/")
    if n != len(listed):
        raise BenchError(f"{client.name}: listed {n} keys, expected {len(listed)}")
    record("list", timer, n)

    everything = listed + [k for k, _ in small] + [f"{run}/big/{i:05d}" for i in range(args.big)]
    with Timer() as timer:
        client.delete_many(everything)
    record("delete", timer, len(everything))
    if client.list_keys(f"{run}/"):
        raise BenchError(f"{client.name}: keys left after the batch delete")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start a SeaweedFS)")
    parser.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", ""))
    parser.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    parser.add_argument("--threads", type=int, default=16, help="concurrent requests")
    parser.add_argument("--big", type=int, default=64, help="number of 4 MiB objects")
    parser.add_argument("--small", type=int, default=2000, help="number of 4-64 KiB objects")
    parser.add_argument("--list-keys", type=int, default=10_000, help="keys to list")
    parser.add_argument("--runs", type=int, default=1, help="runs; the median is shown")
    parser.add_argument("--clients", default="boto3,obstore", help="comma-separated")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.clients.split(",") if c.strip()]
    for name in names:
        if name not in CLIENTS:
            parser.error(f"unknown client {name!r} (choose from {', '.join(CLIENTS)})")

    # SIGTERM unwinds like Ctrl-C, so the server below is stopped and its directory removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = None
    if not args.endpoint:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from servers import SeaweedServer

        server = SeaweedServer(Path(tempfile.mkdtemp(prefix="loft-s3bench-")))
        print(f"starting SeaweedFS on {server.endpoint} ...", file=sys.stderr)
        server.start()
        args.endpoint, args.access_key, args.secret_key = (
            server.endpoint,
            server.access_key,
            server.secret_key,
        )
    results: dict[str, list[Result]] = {n: [] for n in names}
    try:
        for run in range(args.runs):
            for name in names:
                bucket = f"loft-bench-{name}-{uuid.uuid4().hex[:8]}"
                create_bucket(args.endpoint, args.access_key, args.secret_key, bucket)
                client = CLIENTS[name](
                    args.endpoint, args.access_key, args.secret_key, bucket, args.threads * 2
                )
                res = bench_client(client, args)
                results[name].append(res)
                shown = ", ".join(f"{s} {res[s][0]:.0f}" for s in STEPS)
                print(f"run {run + 1} {name}: {shown}", file=sys.stderr)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()

    print(
        f"threads {args.threads}, {args.big} x 4 MiB, {args.small} small objects and ranges, "
        f"{args.list_keys} keys listed, median of {args.runs} run(s), endpoint {args.endpoint}"
    )
    print("rate: higher is better; cpu: client CPU µs per object/request/key, lower is better")
    header = f"{'step':<10} {'unit':<7}"
    for n in names:
        header += f"{n + ' rate':>14}{n + ' cpu':>13}"
    pair = names == ["boto3", "obstore"]
    if pair:
        header += f"{'rate ob/b3':>12}{'cpu ob/b3':>11}"
    print(header)
    for s in STEPS:
        rate = {n: statistics.median(r[s][0] for r in results[n]) for n in names}
        cpu = {n: statistics.median(r[s][1] for r in results[n]) for n in names}
        line = f"{s:<10} {UNITS[s]:<7}"
        for n in names:
            line += f"{rate[n]:>14.0f}{cpu[n]:>13.0f}"
        if pair:
            line += (
                f"{rate['obstore'] / rate['boto3']:>12.2f}{cpu['obstore'] / cpu['boto3']:>11.2f}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
