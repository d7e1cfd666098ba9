"""Baseline benchmark: ``bkr clone -@ BASE`` from a server against a plain local clone, the
bytes it moves over the network, and the disk ten clones on one filesystem use.

One command generates a repository (by default 10,000 csets and 2 GiB of BAM data in 10 MiB
files, plus small text files), serves it with ``bkr serve`` on 127.0.0.1 behind a TCP proxy
that counts bytes, makes BASE a local clone 10 csets behind (each of the last 10 csets adds
a BAM file), then measures side by side:

* ``bkr clone --checkout none -@ BASE URL DEST`` against ``bkr clone --checkout none BASE
  DEST2`` (target: at most 1.2x);
* the bytes the baseline clone moved over the proxy against the size of the 10 new csets'
  BAM data (target: at most 1.1x);
* the disk used by ten ``bkr clone --checkout none`` of a 2 GiB repository with a short history
  (200 csets) on one filesystem; the size of one clone's history database of the
  10,000-cset repository as information (history is not shared between clones)
  against one (target: at most 1.1x; BAM objects are hardlinked).

It prints a table and writes JSON to ``benchmarks/results/baseline-<timestamp>.json``; it
exits 1 when a target is missed.  See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
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
MIB = 1 << 20
START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {msg}", flush=True)


def generate(root: Path, csets: int, bam_bytes: int, bam_file: int, tail: int) -> dict[str, int]:
    """History written straight into a new repository (no working tree): text edits in every
    cset, BAM files spread over the history, one in each of the last ``tail`` csets."""
    from bkrepo import objects as ob
    from bkrepo import trees
    from bkrepo.ids import new_root_key
    from bkrepo.repo import Repo

    rng = random.Random(11)
    block = rng.randbytes(8 * MIB)
    repo = Repo.init(root, config={"checkout": "none"})
    pid = repo.project_id
    nbam = max(tail, bam_bytes // bam_file)
    early = nbam - tail
    at = {int(i * (csets - tail) / max(early, 1)) + 1: i for i in range(early)}
    at.update({csets - tail + j: early + j for j in range(tail)})
    tmp = root / ".bk" / "tmp" / "gen.bin"
    tree = tip = None
    tail_bytes = 0
    paths = [f"src/d{d}/f{f}.txt".encode() for d in range(20) for f in range(25)]
    rks = {p: new_root_key(pid, p, b"gen") for p in paths}
    for start in range(0, csets, 250):
        with repo.store.write() as txn:
            for i in range(start, min(start + 250, csets)):
                t = 1_700_000_000 + i * 60
                edits: dict[bytes, ob.TreeEntry | None] = {}
                targets = paths if i == 0 else rng.sample(paths, 3)
                for p in targets:
                    data = f"{p.decode()} at {i}: {rng.random()}\n".encode()
                    bid = txn.put_object(ob.BLOB, data)
                    edits[p] = ob.TreeEntry(b"", ob.K_FILE, 0o644, len(data), t, rks[p], bid)
                if i in at:
                    n = at[i]
                    with open(tmp, "wb") as f:
                        f.write(n.to_bytes(8, "big") + os.urandom(64))
                        left = bam_file - 72
                        while left > 0:
                            f.write(block[: min(left, len(block))])
                            left -= len(block)
                    hashed = repo.pool.ingest_file(tmp)
                    ptr, chunk_list = hashed.pointer()
                    txn.put_object(ob.CHNK, chunk_list)
                    pid_ = txn.put_object(ob.BAMP, ptr.encode())
                    path = f"art/a{n // 50}/asset{n}.bin".encode()
                    rk = new_root_key(pid, path, b"gen")
                    edits[path] = ob.TreeEntry(b"", ob.K_BAM, 0o644, hashed.size, t, rk, pid_)
                    if i >= csets - tail:
                        tail_bytes += hashed.size
                tree = trees.apply_edits(txn, tree, edits)
                cset = ob.Cset((tip,) if tip else (), tree, AUTHOR, t, f"cset {i}")
                tip = txn.put_object(ob.CSET, cset.encode())
                repo.record_cset(txn, tip, cset)
            txn.set_meta("tip", tip.hex() if tip else None)
        if start % 2000 == 0:
            log(f"  generated {min(start + 250, csets)}/{csets} csets")
    tmp.unlink(missing_ok=True)
    repo.close()
    return {"csets": csets, "bam_objects": nbam, "tail_bam_bytes": tail_bytes}


class Proxy:
    """A TCP proxy on 127.0.0.1 counting the bytes from the server to clients."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.down = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, True), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, count: bool) -> None:
        try:
            while data := a.recv(1 << 20):
                if count:
                    with self.lock:
                        self.down += len(data)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def timed(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")
    return time.monotonic() - start


def disk_blocks(*paths: Path) -> int:
    """Bytes of disk the files below ``paths`` use, each inode counted once (as ``du``)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def clone(env: dict[str, str], *args: str) -> None:
    subprocess.run([BKR, "clone", "-q", "--checkout", "none", *args], env=env, check=True)


def ten_clones(work: Path, env: dict[str, str], repo: Path, tag: str) -> tuple[int, int]:
    """Disk of one clone alone, and of ten clones together (each inode counted once)."""
    dests = [work / f"{tag}{i}" for i in range(10)]
    for d in dests:
        clone(env, str(repo), str(d))
    one, ten = disk_blocks(dests[0]), disk_blocks(*dests)
    for d in dests:
        shutil.rmtree(d)
    return one, ten


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--csets", type=int, default=10_000)
    ap.add_argument("--bam-gib", type=float, default=2.0)
    ap.add_argument("--bam-file-mib", type=int, default=10)
    ap.add_argument("--behind", type=int, default=10, help="csets BASE lacks")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scale", choices=("full", "small"), default="full")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    if a.scale == "small":
        a.csets, a.bam_gib = 1000, 0.2
    work = Path(tempfile.mkdtemp(prefix="bkr-bench-baseline-"))
    env = {**os.environ, "HOME": str(work), "XDG_CACHE_HOME": str(work / "c"), "BKR_USER": AUTHOR}
    server = proxy = None
    try:
        srv = work / "srv"
        srv.mkdir()
        src = srv / "game"
        log(f"generating {a.csets} csets with {a.bam_gib} GiB of BAM data in {work}")
        gen = generate(src, a.csets, int(a.bam_gib * (1 << 30)), a.bam_file_mib * MIB, a.behind)
        log(f"  done: {gen}")
        cmd = [BKR, "serve", str(srv), "--port", "0"]
        server = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        assert server.stdout is not None
        m = re.search(r"listening on http://[0-9.]+:(\d+)/", server.stdout.readline())
        if not m:
            raise SystemExit("bkr serve did not start")
        proxy = Proxy(int(m.group(1)))
        url = f"http://127.0.0.1:{proxy.port}/game"
        # The source has no BAM server, so every clone gets the data: BASE holds its own.
        base = work / "base"
        clone(env, "-r", f"+~{a.behind}", str(src), str(base))
        times: dict[str, list[float]] = {"baseline": [], "plain": []}
        moved: list[int] = []
        for rep in range(a.reps):
            for name in ("baseline", "plain") if rep % 2 == 0 else ("plain", "baseline"):
                dest = work / f"dest-{name}"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                before = proxy.down
                args = ["-@", str(base), url] if name == "baseline" else [str(base)]
                cmd = [BKR, "clone", "-q", "--checkout", "none", *args, str(dest)]
                times[name].append(timed(cmd, work, env))
                if name == "baseline":
                    moved.append(proxy.down - before)
                log(
                    f"  {name}: {times[name][-1]:.2f} s ({(proxy.down - before) / MIB:.1f} MiB down)"
                )
                shutil.rmtree(dest, ignore_errors=True)
        hist = disk_blocks(base / ".bk" / "db")
        assets = srv / "assets"
        log(f"generating a {a.bam_gib:g} GiB repository with a short history (200 csets)")
        generate(assets, 200, int(a.bam_gib * (1 << 30)), a.bam_file_mib * MIB, 1)
        one, ten = ten_clones(work, env, assets, "clone")
        tb, tp = statistics.median(times["baseline"]), statistics.median(times["plain"])
        mv = statistics.median(moved)
        tail = gen["tail_bam_bytes"]
        rows: list[dict[str, object]] = [
            {
                "metric": f"clone -@ BASE ({a.behind} csets behind) vs local clone of BASE",
                "bkr": f"{tb:.2f} s",
                "peer": f"{tp:.2f} s",
                "ratio": tb / tp,
                "target": 1.2,
            },
            {
                "metric": f"bytes over the network vs the {a.behind} new csets' BAM data",
                "bkr": f"{mv / MIB:.1f} MiB",
                "peer": f"{tail / MIB:.1f} MiB",
                "ratio": mv / tail,
                "target": 1.1,
            },
            {
                "metric": f"disk of ten clones of a {a.bam_gib:g} GiB repo (200 csets) vs one",
                "bkr": f"{ten / MIB:.0f} MiB",
                "peer": f"{one / MIB:.0f} MiB",
                "ratio": ten / one,
                "target": 1.1,
            },
            {
                "metric": f"information: one clone's history database ({a.csets} csets)",
                "bkr": f"{hist / MIB:.0f} MiB",
                "peer": "",
                "ratio": hist / one,
                "target": None,
            },
        ]
        print()
        for r in rows:
            t = r["target"]
            ratio = float(r["ratio"])  # type: ignore[arg-type]
            res = "info" if t is None else ("pass" if ratio <= float(t) else "FAIL")  # type: ignore[arg-type]
            tgt = f"<= {t}x" if t else ""
            print(f"{r['metric']:<66} {r['bkr']:>10} {r['peer']:>10} {ratio:6.2f}x  {tgt:<8} {res}")
        out_dir = HERE / "results"
        out_dir.mkdir(exist_ok=True)
        out = out_dir / f"baseline-{time.strftime('%Y%m%d-%H%M%S')}.json"
        disk = {"one": one, "ten": ten, "history_db": hist}
        out.write_text(
            json.dumps(
                {
                    "params": vars(a),
                    "generated": gen,
                    "times": times,
                    "moved": moved,
                    "disk": disk,
                    "rows": rows,
                    "load": os.getloadavg(),
                },
                indent=2,
            )
        )
        print(f"\nJSON: {out}")
        return (
            0
            if all(r["target"] is None or float(r["ratio"]) <= float(r["target"]) for r in rows)
            else 1
        )  # type: ignore[arg-type]
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.terminate()
            server.wait(10)
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
