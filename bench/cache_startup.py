"""Startup cost of the local disk block cache (src/loftfs/chunk/cache_disk.py) with many cached
blocks, and its eviction policy against exact LRU.

``.venv/bin/python bench/cache_startup.py [--blocks 1000000] [--workdir /var/tmp/loftbench-cache]
[--keep] [--policy] [--json results.json]``

Startup: fills a cache directory with ``--blocks`` tiny blocks (64 bytes each, through
``put_sync``, in a child process; ``--keep`` keeps them for the next run, which then skips this
step), then in a fresh child process measures what a mount would see:

- ``start()``: time until it returns (the mount can serve requests from then on);
- first ``get``: a block the background scan has not reached yet (found by opening its file);
- scan: time until the index holds every block;
- index memory: growth of the resident set from before the cache was made to after the scan,
  per indexed block;
- a ``get`` after the scan (index hit).

``--cold`` drops the page cache before the start (as after a reboot; needs root).

``--policy``: replays request traces against the cache's sampled LRU (``pick_victim``, with
8 to 64 samples) and an exact LRU of the same capacity, and prints the hit ratios. Traces
(blocks of one size, the cache holds a tenth of them): "zipf" (skewed popularity, s=0.9),
"zipf+scans" (the same with a third of the requests one-off sequential scans, as from a job
reading a data set once) and "shift" (the hot set moves four times during the trace). It also
times the choice of one victim among a million indexed blocks for each sample size.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator

from loftfs.chunk.cache_disk import SIZE_BITS, DiskCache, pick_victim
from loftfs.chunk.layout import block_key

VOLUME = "0b5e7a4c-3f1d-4e62-9a8b-cache00bench"
BLOCK = b"\x5a" * 64
PREPARED = "prepared.json"


def key_of(i: int) -> str:
    return block_key(VOLUME, i + 1, 0, len(BLOCK))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def new_cache(workdir: str) -> DiskCache:
    return DiskCache([os.path.join(workdir, "cache")], 1 << 50, volume_uuid=VOLUME)


# --- startup --------------------------------------------------------------------------------


def prepare(workdir: str, blocks: int) -> dict[str, float]:
    """Fill the cache (in this process: the caller runs it as a child)."""
    cache = new_cache(workdir)
    cache.start()
    start = time.perf_counter()
    for i in range(blocks):
        if not cache.put_sync(key_of(i), BLOCK):
            raise SystemExit(f"put_sync of block {i} failed: {cache.stats()}")
    elapsed = time.perf_counter() - start
    cache.close()
    with open(os.path.join(workdir, PREPARED), "w") as f:
        json.dump({"blocks": blocks}, f)
    return {"blocks": blocks, "fill_s": elapsed, "put_sync_us": elapsed / blocks * 1e6}


def measure(workdir: str, blocks: int) -> dict[str, float]:
    """Time a start on the prepared cache (in a fresh process, so that RSS is its own)."""
    gc.collect()
    rss_before = rss()
    t0 = time.perf_counter()
    cache = new_cache(workdir)
    cache.start()
    t_start = time.perf_counter() - t0
    probe = random.randrange(blocks)
    t1 = time.perf_counter()
    got = cache.get(key_of(probe), len(BLOCK))
    t_first_get = time.perf_counter() - t1
    if got != BLOCK:
        raise SystemExit(f"first get of block {probe} returned {got!r}")
    scanning_at_first_get = cache.stats()["scanning"]
    while cache.stats()["scanning"]:
        time.sleep(0.005)
    t_scan = time.perf_counter() - t0
    gc.collect()
    rss_after = rss()
    stats = cache.stats()
    if stats["blocks"] != blocks:
        raise SystemExit(f"scan indexed {stats['blocks']} blocks, expected {blocks}")
    probe = random.randrange(blocks)
    t2 = time.perf_counter()
    got = cache.get(key_of(probe), len(BLOCK))
    t_get = time.perf_counter() - t2
    if got != BLOCK:
        raise SystemExit(f"get of block {probe} after the scan returned {got!r}")
    cache.close()
    return {
        "blocks": blocks,
        "start_s": t_start,
        "first_get_ms": t_first_get * 1e3,
        "first_get_during_scan": scanning_at_first_get,
        "scan_s": t_scan,
        "scan_us_per_block": t_scan / blocks * 1e6,
        "index_rss_mib": (rss_after - rss_before) / 2**20,
        "index_bytes_per_block": (rss_after - rss_before) / blocks,
        "get_after_scan_us": t_get * 1e6,
        "used_bytes": stats["used_bytes"],
    }


def child(step: str, workdir: str, blocks: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, f"--_{step}", "--workdir", workdir, "--blocks", str(blocks)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def startup(workdir: str, blocks: int, keep: bool, cold: bool) -> dict[str, float]:
    marker = os.path.join(workdir, PREPARED)
    prepared = None
    if os.path.exists(marker):
        with open(marker) as f:
            prepared = json.load(f).get("blocks")
    if prepared != blocks:
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        print(f"filling the cache with {blocks:,} blocks ...", flush=True)
        fill = child("prepare", workdir, blocks)
        print(f"  {fill['fill_s']:.1f} s ({fill['put_sync_us']:.1f} us per put_sync)")
    try:
        subprocess.run(["sync"], check=False)
        if cold:
            drop_page_cache()
        result = child("measure", workdir, blocks)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"blocks cached:              {blocks:,}" + (" (cold: page cache dropped)" if cold else "")
    )
    print(f"start() returned after:     {result['start_s'] * 1e3:.1f} ms")
    during = "during the scan" if result["first_get_during_scan"] else "after the scan"
    print(f"first get ({during}): {result['first_get_ms']:.2f} ms")
    print(f"scan finished after:        {result['scan_s']:.2f} s")
    print(f"  per block:                {result['scan_us_per_block']:.2f} us")
    print(f"index memory (RSS growth):  {result['index_rss_mib']:.1f} MiB")
    print(f"  per block:                {result['index_bytes_per_block']:.0f} bytes")
    print(f"get after the scan:         {result['get_after_scan_us']:.0f} us")
    return result


# --- eviction policy --------------------------------------------------------------------------


def zipf_keys(n: int, s: float, count: int, rng: random.Random) -> list[int]:
    weights = list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))
    ranks = rng.choices(range(n), cum_weights=weights, k=count)
    perm = list(range(n))
    rng.shuffle(perm)  # popularity unrelated to key order
    return [perm[r] for r in ranks]


def trace(name: str, n: int, count: int, rng: random.Random) -> Iterator[int]:
    if name == "zipf":
        yield from zipf_keys(n, 0.9, count, rng)
    elif name == "zipf+scans":
        hot = iter(zipf_keys(n, 0.9, count, rng))
        scan_key = n  # scanned blocks are read once: keys beyond the popular ones
        produced = 0
        while produced < count:
            if rng.random() < 1 / 3 / 200:  # a scan of 200 blocks every ~400 requests
                for _ in range(200):
                    yield scan_key
                    scan_key += 1
                produced += 200
            else:
                yield next(hot)
                produced += 1
    elif name == "shift":
        phase = count // 4
        for p in range(4):
            offset = p * n // 8  # the popular keys move by an eighth of the key space
            for k in zipf_keys(n, 0.9, phase, rng):
                yield (k + offset) % n
    else:
        raise ValueError(name)


def hit_ratio_lru(keys: list[int], capacity: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in keys:
        if k in cache:
            cache.move_to_end(k)
            hits += 1
            continue
        if len(cache) >= capacity:
            cache.popitem(last=False)
        cache[k] = None
    return hits / len(keys)


def hit_ratio_sampled(keys: list[int], capacity: int, sample: int) -> float:
    """The cache's own victim choice (``pick_victim``) on the same index layout."""
    index: dict[int, int] = {}
    pool: list[int] = []
    hits = 0
    for clock, k in enumerate(keys):
        if k in index:
            index[k] = clock << SIZE_BITS | 1
            hits += 1
            continue
        if len(index) >= capacity:
            if len(pool) > 2 * len(index) + sample:
                pool = list(index)
            victim = pick_victim(index, pool, sample)
            if victim is None:
                pool = list(index)
                victim = pick_victim(index, pool, sample)
            assert victim is not None
            del index[victim]
        index[k] = clock << SIZE_BITS | 1
        pool.append(k)
    return hits / len(keys)


def victim_cost(entries: int, samples: tuple[int, ...]) -> dict[int, float]:
    """Microseconds to choose one victim among ``entries`` indexed blocks, per sample size."""
    rng = random.Random(3)
    index: dict[int, int] = {}
    for _ in range(entries):
        index[rng.getrandbits(60)] = rng.getrandbits(30) << SIZE_BITS | 4096
    pool = list(index)
    costs = {}
    for k in samples:
        rounds = 20_000
        start = time.perf_counter()
        for _ in range(rounds):
            pick_victim(index, pool, k)
        costs[k] = (time.perf_counter() - start) / rounds * 1e6
    return costs


def policy(requests: int) -> dict[str, dict[str, float]]:
    n = 100_000
    capacity = n // 10
    results: dict[str, dict[str, float]] = {}
    print(f"\nhit ratio, {requests:,} requests over {n:,} blocks, cache of {capacity:,} blocks")
    print(f"{'trace':<12} {'exact LRU':>10} " + " ".join(f"{'K=' + str(k):>8}" for k in SAMPLES))
    for name in ("zipf", "zipf+scans", "shift"):
        keys = list(trace(name, n, requests, random.Random(42)))
        row = {"lru": hit_ratio_lru(keys, capacity)}
        for k in SAMPLES:
            random.seed(7)
            row[f"sampled_{k}"] = hit_ratio_sampled(keys, capacity, k)
        results[name] = row
        print(
            f"{name:<12} {row['lru']:>10.3f} "
            + " ".join(f"{row[f'sampled_{k}']:>8.3f}" for k in SAMPLES)
        )
    entries = 1_000_000
    costs = victim_cost(entries, SAMPLES)
    results["victim_us"] = {f"sampled_{k}": v for k, v in costs.items()}
    print(
        f"{'victim (us)':<12} {'':>10} "
        + " ".join(f"{costs[k]:>8.1f}" for k in SAMPLES)
        + f"   (choosing one victim among {entries:,} blocks)"
    )
    return results


SAMPLES = (8, 16, 32, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--workdir", default="/var/tmp/loftbench-cache")
    ap.add_argument("--keep", action="store_true", help="keep the filled cache for next time")
    ap.add_argument(
        "--cold", action="store_true", help="drop the page cache first (root): a reboot"
    )
    ap.add_argument("--policy", action="store_true", help="also compare eviction policies")
    ap.add_argument("--policy-only", action="store_true", help="only compare eviction policies")
    ap.add_argument("--requests", type=int, default=500_000, help="requests per policy trace")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--_prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._prepare:
        print(json.dumps(prepare(args.workdir, args.blocks)))
        return
    if args._measure:
        print(json.dumps(measure(args.workdir, args.blocks)))
        return
    results: dict[str, object] = {}
    if not args.policy_only:
        results["startup"] = startup(args.workdir, args.blocks, args.keep, args.cold)
    if args.policy or args.policy_only:
        results["policy"] = policy(args.requests)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
