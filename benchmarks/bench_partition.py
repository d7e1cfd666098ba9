"""Partition benchmark: ``bkr partition`` of a generated repository, and a nested clone over
HTTP against a standalone clone of the same files.

One command generates a standalone repository (by default 10,000 csets and 20,000 files in 20
top-level directories, plus some files of the product's own; csets edit, add, rename within
a directory, move files between directories and delete files), then measures:

* ``bkr partition -j 2 -C COMPS`` into 20 components: wall time and peak memory (target:
  at most 60 s with ``-j 2`` on a 2-core machine); ``-j 1`` as an information row;
* ``bkr clone`` of the resulting product (21 repositories) from ``bkr serve`` on 127.0.0.1
  against ``bkr clone`` of the standalone source from the same server (target: at most 2x),
  both writing their working files.

It prints a table and writes JSON to ``benchmarks/results/partition-<timestamp>.json``; it
exits 1 when a target is missed.  See ``benchmarks/README.md``.

Generation writes history objects in-process (``bkrepo`` trees and csets, no working tree);
only the measured commands run through the real CLI in subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
BKR = str(VENV_BIN / "bkr") if (VENV_BIN / "bkr").exists() else shutil.which("bkr") or "bkr"
AUTHOR = "bench <bench@example.com>"


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {msg}", flush=True)


START = time.monotonic()


# -- generation ------------------------------------------------------------------------------
def generate(root: Path, csets: int, files: int, dirs: int, seed: int) -> dict[str, int]:
    """A standalone repository with ``csets`` csets over ``files`` files in ``dirs``
    top-level directories (two levels below each), written straight into its history."""
    from bkrepo import objects as ob
    from bkrepo import trees
    from bkrepo.ids import new_root_key
    from bkrepo.repo import Repo

    rng = random.Random(seed)
    repo = Repo.init(root, config={"checkout": "none"})
    pid = repo.project_id
    live: dict[bytes, tuple[bytes, ob.TreeEntry]] = {}  # root key -> (path, entry)
    counter = 0
    moves = deletes = 0

    def new_file(t: int) -> tuple[bytes, ob.TreeEntry]:
        nonlocal counter
        counter += 1
        d = rng.randrange(dirs)
        path = f"c{d:02d}/s{rng.randrange(10)}/f{counter}.txt".encode()
        return path, _entry(counter, t, new_root_key(pid, path, str(counter).encode()))

    def _entry(n: int, t: int, rk: bytes) -> ob.TreeEntry:
        data = f"file {n} version {rng.random()}\n".encode() * 4
        oid = txn.put_object(ob.BLOB, data)
        return ob.TreeEntry(b"", ob.K_FILE, 0o644, len(data), t, rk, oid)

    tree = None
    tip = None
    per_first = files // 2  # half the files in the first cset, the rest added over time
    adds_left = files - per_first
    t0 = 1_700_000_000
    batch = 250
    for start in range(0, csets, batch):
        with repo.store.write() as txn:
            for i in range(start, min(start + batch, csets)):
                t = t0 + i * 60
                edits: dict[bytes, ob.TreeEntry | None] = {}
                if i == 0:
                    for _ in range(per_first):
                        p, e = new_file(t)
                        live[e.rootkey] = (p, e)
                        edits[p] = e
                    for name in (b"README", b"Makefile", b"tools/build.sh"):
                        rk = new_root_key(pid, name, b"top")
                        e = _entry(0, t, rk)
                        live[rk] = (name, e)
                        edits[name] = e
                else:
                    keys = list(live)
                    for _ in range(3):  # edits
                        rk = rng.choice(keys)
                        p, e = live[rk]
                        e2 = _entry(rng.randrange(1 << 30), t, rk)
                        live[rk] = (p, e2)
                        edits[p] = e2
                    if adds_left and i % 2 == 0:
                        for _ in range(min(adds_left, max(1, files // csets * 2))):
                            p, e = new_file(t)
                            if p in edits:
                                continue
                            live[e.rootkey] = (p, e)
                            edits[p] = e
                            adds_left -= 1
                    if i % 50 == 0:  # a move between top-level directories (components)
                        rk = rng.choice(keys)
                        p, e = live[rk]
                        if p.startswith(b"c") and p not in edits:
                            q = f"c{rng.randrange(dirs):02d}/moved/{p.rsplit(b'/', 1)[1].decode()}"
                            q_b = q.encode()
                            if q_b not in edits and all(v[0] != q_b for v in live.values()):
                                edits[p] = None
                                edits[q_b] = e
                                live[rk] = (q_b, e)
                                moves += 1
                    if i % 40 == 0:  # a deletion
                        rk = rng.choice(keys)
                        p, _e = live[rk]
                        if p not in edits and not p.startswith((b"README", b"Makefile", b"tools")):
                            edits[p] = None
                            del live[rk]
                            deletes += 1
                tree = trees.apply_edits(txn, tree, edits)
                cset = ob.Cset((tip,) if tip else (), tree, AUTHOR, t, f"cset {i}")
                tip = txn.put_object(ob.CSET, cset.encode())
                repo.record_cset(txn, tip, cset)
            txn.set_meta("tip", tip.hex() if tip else None)
        if start % 2000 == 0:
            log(f"  generated {min(start + batch, csets)}/{csets} csets")
    repo.close()
    return {"csets": csets, "files": len(live), "moves": moves, "deletes": deletes}


# -- measurement -----------------------------------------------------------------------------
def peak_rss_kib(pid: int, done: threading.Event, out: list[int]) -> None:
    """Peak anonymous RSS summed over a process tree (the -j workers too), sampled every
    20 ms.  Anonymous: the memory the processes hold; their VmRSS also counts the pages of
    the LMDB files they map, which are page cache (shared, reclaimable) and would be counted
    once per process."""
    peak = 0
    while not done.is_set():
        total = 0
        for p in _tree(pid):
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        peak = max(peak, total)
        time.sleep(0.02)
    out.append(peak)


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for c in f.read().split():
                    out.extend(_tree(int(c)))
    except OSError:
        pass
    return out


def timed(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    done = threading.Event()
    peak: list[int] = []
    start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = threading.Thread(target=peak_rss_kib, args=(p.pid, done, peak), daemon=True)
    sampler.start()
    _out, err = p.communicate()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.decode()}")
    return wall, peak[0] if peak else 0


def start_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [BKR, "serve", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    m = re.search(r"listening on (http://[0-9.:]+)/", line)
    if not m:
        p.terminate()
        raise SystemExit(f"bkr serve did not start: {line!r}")
    return p, m.group(1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--csets", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--components", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each timed command")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    a = ap.parse_args(argv)
    if a.scale == "small":
        a.csets, a.files = 1000, 2000
    work = Path(tempfile.mkdtemp(prefix="bkr-bench-partition-"))
    env = {
        **os.environ,
        "HOME": str(work),
        "XDG_CACHE_HOME": str(work / "cache"),
        "BKR_USER": AUTHOR,
    }
    server = None
    try:
        srv = work / "srv"
        srv.mkdir()
        src = srv / "standalone"
        log(f"generating {a.csets} csets, {a.files} files in {a.components} directories in {work}")
        gen = generate(src, a.csets, a.files, a.components, seed=7)
        subprocess.run([BKR, "config", "checkout", "get"], cwd=src, check=True, env=env)
        log(f"  done: {gen}")
        comps = work / "COMPONENTS"
        comps.write_text("".join(f"c{d:02d}\n" for d in range(a.components)))
        results: dict[str, list[tuple[float, int]]] = {"j2": [], "j1": []}
        for rep in range(a.reps):
            for name, jobs in (
                (("j2", "2"), ("j1", "1")) if rep % 2 == 0 else (("j1", "1"), ("j2", "2"))
            ):
                dest = srv / f"product-{name}"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                r = timed(
                    [BKR, "partition", "-q", "-j", jobs, "-C", str(comps), str(src), str(dest)],
                    work,
                    env,
                )
                results[name].append(r)
                log(f"  partition -j {jobs}: {r[0]:.2f} s, peak anon RSS {r[1] / 1024:.0f} MiB")
        product = srv / "product-j2"
        shutil.rmtree(srv / "product-j1", ignore_errors=True)
        product_csets = len(
            subprocess.run(
                [BKR, "log", "--keys"],
                cwd=product,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
        )
        server, url = start_server(srv, env)
        clones: dict[str, list[tuple[float, int]]] = {"nested": [], "standalone": []}
        for rep in range(a.reps):
            order = (("nested", "product-j2"), ("standalone", "standalone"))
            for name, repo in order if rep % 2 == 0 else order[::-1]:
                dest = work / f"clone-{name}"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                r = timed([BKR, "clone", "-q", f"{url}/{repo}", str(dest)], work, env)
                clones[name].append(r)
                log(f"  clone {name}: {r[0]:.2f} s")
                shutil.rmtree(dest, ignore_errors=True)

        def med(xs: list[tuple[float, int]]) -> float:
            return statistics.median(x[0] for x in xs)

        def peak(xs: list[tuple[float, int]]) -> int:
            return max(x[1] for x in xs)

        j2, j1 = med(results["j2"]), med(results["j1"])
        nested, standalone = med(clones["nested"]), med(clones["standalone"])
        rows = [
            {
                "metric": f"partition -j 2 of {a.csets} csets, {gen['files']} files into {a.components} components",
                "value": f"{j2:.2f} s",
                "peer": "",
                "ratio": "",
                "target": "<= 60 s",
                "pass": j2 <= 60,
            },
            {
                "metric": "partition -j 1 (information)",
                "value": f"{j1:.2f} s",
                "peer": "",
                "ratio": f"{j1 / j2:.2f}x of -j 2",
                "target": "",
                "pass": None,
            },
            {
                "metric": "partition peak anonymous RSS (all processes), -j 2 / -j 1",
                "value": f"{peak(results['j2']) / 1024:.0f} / {peak(results['j1']) / 1024:.0f} MiB",
                "peer": "",
                "ratio": "",
                "target": "",
                "pass": None,
            },
            {
                "metric": f"nested clone over HTTP ({a.components} components + product) vs standalone clone",
                "value": f"{nested:.2f} s",
                "peer": f"{standalone:.2f} s",
                "ratio": f"{nested / standalone:.2f}x",
                "target": "<= 2x",
                "pass": nested / standalone <= 2,
            },
        ]
        widths = [
            max(len(str(r[k])) for r in rows)
            for k in ("metric", "value", "peer", "ratio", "target")
        ]
        print()
        for r in rows:
            res = "pass" if r["pass"] else ("FAIL" if r["pass"] is False else "info")
            print(
                "  ".join(
                    str(r[k]).ljust(w)
                    for k, w in zip(
                        ("metric", "value", "peer", "ratio", "target"), widths, strict=True
                    )
                )
                + "  "
                + res
            )
        out_dir = HERE / "results"
        out_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = out_dir / f"partition-{stamp}.json"
        out.write_text(
            json.dumps(
                {
                    "params": vars(a),
                    "generated": gen,
                    "product_csets": product_csets,
                    "partition": results,
                    "clone": clones,
                    "rows": rows,
                    "load": os.getloadavg(),
                },
                indent=2,
            )
        )
        print(f"\nJSON: {out}")
        return 0 if all(r["pass"] is not False for r in rows) else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
