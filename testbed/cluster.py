"""The shards of a run on a Dask cluster: ``--cluster tcp://host:8786`` or ``--cluster local:N``.

Theory of operation. A run is split into shards exactly as ``--workers`` splits it
(:func:`testbed.shards.jobs_for`: devices ``i % N``, arrivals ``k % N``); this module is only a
different *executor* of those jobs (:class:`ClusterShards`, beside
:class:`testbed.shards.ShardProcesses`), driven by the same loop
(:func:`testbed.shards.run_shards`), which shows progress, stops the shards and merges
their results once.

- Placement: one shard per Dask worker, pinned with ``workers=[address]`` and
  ``allow_other_workers=False``, ``retries=0``; more shards than workers (``--workers N``)
  go round-robin. A pinned task is never moved to another worker, and a shard also refuses to
  start a second time (a claim :class:`distributed.Event`), so a load shard never runs twice.
- Fleet: the client ships each shard its slice (the run folder's shared files and only that
  shard's ``devices/<id>/`` folders) as one gzipped tar through ``client.scatter`` to its
  worker. Provisioning from the seed on the worker was the other choice; shipping works for
  any fleet, including a ``--fleet`` folder whose keys no seed can reproduce, and the slice
  is small (see the ``cluster.shards[].shipped_bytes`` figure in the run's meta). The worker
  unpacks it in its local directory, or with ``--keys-in-memory`` in a fresh 0700 folder on
  the RAM-backed ``/dev/shm``, and removes it when the shard ends.
- Start: each shard loads its devices and sets its ``ready`` event; when all have, the client
  sets ``go``; shards record the wall time they started (``start_epoch``) and the run's meta
  holds their spread as ``cluster.start_skew_s`` (across hosts, it includes their clock
  offsets).
- Results: a shard writes its results database on the worker as a local shard does; a thread
  beside it ships the rows added since last time every half second (a :class:`distributed.Queue`
  per shard, zlib-compressed JSON chunks of at most ``CHUNK_ROWS`` rows), then an end marker.
  The client writes them into ``RUN_DIR/shards/<k>-results.sqlite`` keyed by row id (a chunk
  seen twice adds nothing), so progress, step judging and :func:`testbed.results.merge_shards`
  read exactly what they read for local shards.
- Faults: a shard whose worker leaves the scheduler before the shard ended is *lost*: named
  with its worker in the meta (``cluster.lost_shards``), counted as a failed shard (the run
  does not pass), and the rows it streamed before are kept. Ctrl-C sets the ``stop`` event:
  every shard ends as a run does on Ctrl-C, streams what it has, and the report is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import socket
import sqlite3
import tarfile
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

INSTALL_HINT = "pip install 'mtls-testbed[cluster]' (Dask distributed)"
CHUNK_ROWS = 5000  # rows of one table per streamed chunk: a chunk stays well under a megabyte
STREAM_EVERY = 0.5  # seconds between a shard's chunks
PROBE_TIMEOUT = 5.0  # seconds a worker tries to reach the target
JOIN_TIMEOUT = 60.0  # seconds the client waits for stopped shards to hand in their last rows
TABLES = ("attempts", "dropped", "events")


class ClusterError(Exception):
    """A cluster that cannot be used for this run (the message says what to do)."""


def require_dask() -> None:
    """Raise :class:`ClusterError` with the install command when Dask is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ClusterError(f"--cluster needs Dask distributed: {INSTALL_HINT}") from None


class Cluster:
    """A connection to a Dask scheduler (or a local cluster this process started)."""

    def __init__(self, address: str, *, keys_in_memory: bool = False) -> None:
        require_dask()
        from distributed import Client, LocalCluster

        self.address = address
        self.keys_in_memory = keys_in_memory
        self._local: Any = None
        try:
            if address.startswith("local:"):
                n = int(address.removeprefix("local:"))
                if n < 1:
                    raise ValueError
                self._local = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    silence_logs=logging.ERROR,  # its scheduler's INFO lines are not ours
                )
                self.client = Client(self._local)
            else:
                self.client = Client(address, timeout=10)
        except ValueError:
            raise ClusterError(
                f"--cluster {address}: expected tcp://HOST:PORT or local:N (N >= 1)"
            ) from None
        except OSError as exc:
            raise ClusterError(
                f"--cluster {address}: cannot reach the Dask scheduler ({exc}); start one with"
                " `dask scheduler` and workers with `dask worker ADDRESS`"
            ) from None
        self.workers = self._workers()
        if not self.workers:
            self.close()
            raise ClusterError(f"--cluster {address}: the scheduler has no workers")

    def _workers(self) -> list[str]:
        # Asked of the scheduler each time: ``Client.scheduler_info()`` returns a cache that
        # its periodic refresh can replace with one holding no workers at all, which would
        # look like every worker lost.
        identity = self.client.sync(self.client.scheduler.identity, n_workers=-1)
        return sorted(identity["workers"])

    @property
    def target_host(self) -> str:
        """The address of this host that the workers should use: the one facing the scheduler."""
        host = urlsplit(self.client.scheduler.address).hostname or "127.0.0.1"
        if host.startswith("127.") or host in ("localhost", "::1"):
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet: only picks the route
            return str(s.getsockname()[0])

    def check_reachable(self, host: str, port: int) -> None:
        """Raise :class:`ClusterError` naming every worker that cannot open ``host:port``."""
        futures = {
            w: self.client.submit(
                _probe, host, port, workers=[w], allow_other_workers=False, pure=False
            )
            for w in self.workers
        }
        problems = [f"{w}: {err}" for w, f in futures.items() if (err := f.result())]
        if problems:
            raise ClusterError(
                f"the target {host}:{port} is not reachable from every Dask worker ("
                + "; ".join(problems)
                + "); with --target embedded or nginx the target listens on this host's"
                " address facing the scheduler: run the client where the workers can reach it,"
                " or give a URL target they can reach"
            )

    def shards(self, jobs: Sequence[Any]) -> ClusterShards:
        """An executor of ``jobs`` on this cluster."""
        return ClusterShards(self, list(jobs))

    def close(self) -> None:
        """Disconnect (and stop a local cluster this process started)."""
        with contextlib.suppress(Exception):
            self.client.close()
        if self._local is not None:
            with contextlib.suppress(Exception):
                self._local.close()


def _probe(host: str, port: int) -> str | None:
    """On a worker: None if ``host:port`` accepts a TCP connection, else why not."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


# -- the fleet slice -------------------------------------------------------------------------------

_SKIP = {"shards", "repeats", "results.sqlite", "results.sqlite-wal", "results.sqlite-shm"}


def pack_job(job: Any) -> tuple[bytes, dict[str, str]]:
    """The files shard ``job`` needs, gzipped, and where each root goes (arcname -> path)."""
    roots = {"run": job.run_dir}
    for j, (_, fleet) in enumerate(job.fleet.fleets):
        if not fleet.root.is_relative_to(job.run_dir):
            roots[f"fleet{j}"] = fleet.root
    fleet_roots = {f.root for _, f in job.fleet.fleets}
    mine = {
        (m.fleet / m.device.cert_path).parent
        for i, m in enumerate(job.fleet.members())
        if i % job.shards == job.shard
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for arc, root in roots.items():
            for path in _walk(root, fleet_roots, mine, top=arc == "run"):
                tar.add(path, arcname=f"{arc}/{path.relative_to(root)}", recursive=False)
        if job.target is not None and job.target.ca_file is not None:
            tar.add(job.target.ca_file, arcname="target-ca.pem")
    return buf.getvalue(), {arc: str(root) for arc, root in roots.items()}


def _walk(root: Path, fleet_roots: set[Path], mine: set[Path], *, top: bool) -> Iterator[Path]:
    for path in sorted(root.iterdir()):
        if top and path.name in _SKIP:
            continue
        if path.is_dir():
            mine_or_shared = path in mine or not (
                path.parent.name == "devices" and path.parent.parent in fleet_roots
            )
            if not mine_or_shared:
                continue  # another shard's device
            yield path
            yield from _walk(path, fleet_roots, mine, top=False)
        elif path.suffix not in (".log",):
            yield path


def unpack_job(job: Any, blob: bytes, roots: dict[str, str], base: Path) -> Any:
    """``job`` with its paths moved to the slice unpacked under ``base``."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(base, filter="data")
    moved = {Path(path): base / arc for arc, path in roots.items()}

    def move(p: Path) -> Path:
        for old, new in moved.items():
            if p.is_relative_to(old):
                return new / p.relative_to(old)
        return p

    fleets = tuple(
        (spec, dataclasses.replace(fleet, root=move(fleet.root)))
        for spec, fleet in job.fleet.fleets
    )
    target = job.target
    if target is not None and target.ca_file is not None:
        target = dataclasses.replace(target, ca_file=base / "target-ca.pem")
    return dataclasses.replace(
        job,
        run_dir=move(job.run_dir),
        fleet=dataclasses.replace(job.fleet, fleets=fleets),
        target=target,
    )


# -- on the worker ---------------------------------------------------------------------------------


class _Start:
    """A shard's side of the start barrier: say ready, wait for ``go``."""

    def __init__(self, run: str, shard: int) -> None:
        from distributed import Event

        self.ready = Event(f"{run}-ready-{shard}")
        self.go = Event(f"{run}-go")
        self.abort_event = Event(f"{run}-abort")

    def wait(self, timeout: float | None = None) -> int:
        """Mark this shard ready and return once every shard is (as a Barrier's wait)."""
        self.ready.set()
        if not self.go.wait(timeout) or self.abort_event.is_set():
            raise threading.BrokenBarrierError
        return 0


def _stream(db_path: Path, queue: Any, last: dict[str, int], *, end: bool = False) -> int:
    """Put what the shard's database gained since ``last`` on ``queue``; return rows sent."""
    sent = 0
    if not db_path.exists():
        if end:
            queue.put(zlib.compress(json.dumps({"end": True}).encode()))
        return 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        while True:
            chunk: dict[str, Any] = {}
            for table in TABLES:
                cur = db.execute(
                    f"SELECT rowid AS _rowid_, * FROM {table} WHERE rowid > ?"
                    " ORDER BY rowid LIMIT ?",
                    (last[table], CHUNK_ROWS),
                )
                rows = cur.fetchall()
                if rows:
                    chunk[table] = {"cols": [d[0] for d in cur.description], "rows": rows}
                    last[table] = rows[-1][0]
                    sent += len(rows)
            more = any(len(t["rows"]) == CHUNK_ROWS for t in chunk.values())
            chunk["run"] = db.execute("SELECT key, value FROM run").fetchall()
            chunk["end"] = end and not more
            queue.put(zlib.compress(json.dumps(chunk).encode()))
            if not more:
                return sent
    finally:
        db.close()


def shard_task(
    run: str, packed: tuple[bytes, dict[str, str]], job: Any, keys_in_memory: bool
) -> dict[str, Any]:
    """Run one shard on this Dask worker and stream its results back (the shard's task)."""
    import trio
    from distributed import Event, Queue, get_worker

    from testbed.results import shard_results
    from testbed.runner import Run
    from testbed.shards import run_job

    claim = Event(f"{run}-claimed-{job.shard}")
    if claim.is_set():
        raise RuntimeError(f"shard {job.shard} already ran: a load shard never runs twice")
    claim.set()
    stop = Event(f"{run}-stop")
    queue = Queue(f"{run}-results-{job.shard}")
    worker = get_worker()
    if keys_in_memory:
        if not Path("/dev/shm").is_dir():
            raise RuntimeError(f"--keys-in-memory: worker {worker.address} has no /dev/shm")
        base = Path(tempfile.mkdtemp(prefix="testbed-shard-", dir="/dev/shm"))
    else:
        base = Path(tempfile.mkdtemp(prefix="testbed-shard-", dir=worker.local_directory))
    os.chmod(base, 0o700)
    try:
        blob, roots = packed
        job = unpack_job(job, blob, roots, base)
        job = dataclasses.replace(job, ready=_Start(run, job.shard) if job.ready else None)
        db_path = shard_results(job.run_dir, job.shard)

        class ClusterRun(Run):
            async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
                # A worker thread gets no signals: the client's ``stop`` event is Ctrl-C.
                while not await trio.to_thread.run_sync(
                    stop.wait, STREAM_EVERY, abandon_on_cancel=True
                ):
                    pass
                self.interrupted = True
                scope.cancel()

        last = dict.fromkeys(TABLES, 0)
        done = threading.Event()
        sent = [0]

        def streamer() -> None:
            while not done.wait(STREAM_EVERY):
                with contextlib.suppress(sqlite3.Error):
                    sent[0] += _stream(db_path, queue, last)

        thread = threading.Thread(target=streamer, name=f"stream-{job.shard}", daemon=True)
        thread.start()
        try:
            run_job(job, ClusterRun)
        finally:
            done.set()
            thread.join()
            sent[0] += _stream(db_path, queue, last, end=True)
        return {"shard": job.shard, "worker": worker.address, "rows": sent[0]}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- on the client ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
    job: Any
    worker: str
    future: Any = None
    queue: Any = None
    ended: bool = False  # its end marker arrived
    lost: bool = False
    error: str | None = None
    rows: int = 0
    chunks: int = 0
    shipped_bytes: int = 0


class ClusterShards:
    """The shards of a run as tasks on a Dask cluster (an executor for ``run_shards``)."""

    def __init__(self, cluster: Cluster, jobs: list[Any]) -> None:
        from distributed import Event

        self.cluster = cluster
        self.client = cluster.client
        self.run = f"testbed-{uuid.uuid4().hex[:12]}"
        self.shards = [
            _Shard(job, cluster.workers[k % len(cluster.workers)]) for k, job in enumerate(jobs)
        ]
        self.real_clock = jobs[0].ready is not None
        self.go = Event(f"{self.run}-go", client=self.client)
        self.abort_event = Event(f"{self.run}-abort", client=self.client)
        self.stop_event = Event(f"{self.run}-stop", client=self.client)
        self.started = False
        self.pack_seconds = 0.0
        self.stopped_at: float | None = None

    def start(self) -> None:
        """Ship each shard its slice and submit it to its worker."""
        from distributed import Queue

        from testbed.results import ResultsWriter, shard_results

        for s in self.shards:
            # The client's copy of the shard's database: the streamed rows land here.
            ResultsWriter(shard_results(s.job.run_dir, s.job.shard)).close()
            began = time.perf_counter()
            packed = pack_job(s.job)
            self.pack_seconds += time.perf_counter() - began
            s.shipped_bytes = len(packed[0])
            data = self.client.scatter(packed, workers=[s.worker], broadcast=False)
            s.queue = Queue(f"{self.run}-results-{s.job.shard}", client=self.client)
            job = dataclasses.replace(s.job, ready=True if s.job.ready is not None else None)
            s.future = self.client.submit(
                shard_task,
                self.run,
                data,
                job,
                self.cluster.keys_in_memory,
                key=f"{self.run}-shard-{s.job.shard}",
                workers=[s.worker],
                allow_other_workers=False,
                retries=0,
                pure=False,
            )

    def _pending(self) -> list[_Shard]:
        return [s for s in self.shards if not (s.ended or s.lost or s.error)]

    def poll(self) -> None:
        """Take in streamed rows, start the shards once all are ready, notice lost workers."""
        from distributed import Event

        for s in self.shards:
            self._drain(s)
        if self.real_clock and not self.started:
            ready = [
                Event(f"{self.run}-ready-{s.job.shard}", client=self.client) for s in self.shards
            ]
            if all(e.is_set() for e in ready):
                self.go.set()
                self.started = True
        present = set(self.cluster._workers())
        for s in self._pending():
            if s.future.status == "finished":
                # Its end marker was put before it returned (the queue lives on the
                # scheduler, so its worker may even be gone by now).
                self._drain(s)
            elif s.future.status == "error":
                s.error = repr(s.future.exception())
            elif s.worker not in present:
                s.lost = True
                s.future.cancel()

    def _drain(self, s: _Shard) -> None:
        from testbed.results import shard_results

        if s.queue is None or s.ended:
            return
        try:
            n = s.queue.qsize()
            items = s.queue.get(batch=n) if n else []
        except Exception:
            return  # the scheduler is busy: next poll
        if not items:
            return
        db = sqlite3.connect(str(shard_results(s.job.run_dir, s.job.shard)), isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            for item in items:
                chunk = json.loads(zlib.decompress(item))
                s.chunks += 1
                for table in TABLES:
                    if table not in chunk:
                        continue
                    cols, rows = chunk[table]["cols"], chunk[table]["rows"]
                    if "id" in cols[1:]:  # attempts: its id is the row id
                        body, rows = cols[1:], [r[1:] for r in rows]
                    else:
                        body = ["rowid", *cols[1:]]
                    marks = ", ".join("?" * len(body))
                    cur = db.executemany(
                        f"INSERT OR IGNORE INTO {table} ({', '.join(body)}) VALUES ({marks})",
                        rows,
                    )
                    s.rows += max(cur.rowcount, 0)
                db.executemany(
                    "INSERT OR REPLACE INTO run (key, value) VALUES (?, ?)", chunk["run"]
                )
                s.ended = s.ended or bool(chunk.get("end"))
            db.execute("COMMIT")
        finally:
            db.close()

    def running(self) -> bool:
        """Whether any shard has yet to end (or be lost)."""
        return bool(self._pending())

    def crashed(self) -> bool:
        """Whether a shard failed or was lost."""
        return any(s.lost or s.error for s in self.shards)

    def abort_start(self) -> None:
        """Release the shards still waiting to start, so they stop (a shard failed)."""
        if not self.started:
            self.abort_event.set()
            self.go.set()

    def stop(self) -> None:
        """Ask every shard to stop as a run stops on Ctrl-C."""
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self.stop_event.set()
        self.abort_start()

    async def join(self) -> None:
        """Wait for every shard's last rows (or its loss), then clean up."""
        import trio

        deadline = time.monotonic() + JOIN_TIMEOUT
        while self._pending() and time.monotonic() < deadline:
            await trio.to_thread.run_sync(self.poll)
            if self._pending():
                await trio.sleep(0.2)
        for s in self._pending():
            s.error = f"did not stop within {JOIN_TIMEOUT:.0f} s of being asked"
            s.future.cancel()

    def failed(self) -> list[tuple[int, int | None]]:
        """The shards that crashed or were lost, as (shard, None)."""
        return [(s.job.shard, None) for s in self.shards if s.lost or s.error]

    def report(self, run_dir: Path) -> dict[str, Any]:
        """What the cluster did, for the run's meta (skew, shipping, lost shards)."""
        from testbed.results import shard_results
        from testbed.shards import _meta

        epochs = [
            _meta(shard_results(run_dir, s.job.shard)).get("start_epoch") for s in self.shards
        ]
        known = [float(e) for e in epochs if e is not None]
        return {
            "address": self.cluster.address,
            "workers": self.cluster.workers,
            "keys_in_memory": self.cluster.keys_in_memory,
            "start_skew_s": (max(known) - min(known)) if len(known) > 1 else 0.0,
            "pack_s": self.pack_seconds,
            "shards": [
                {
                    "shard": s.job.shard,
                    "worker": s.worker,
                    "shipped_bytes": s.shipped_bytes,
                    "chunks": s.chunks,
                    "rows": s.rows,
                    "state": "lost" if s.lost else "failed" if s.error else "done",
                    **({"error": s.error} if s.error else {}),
                }
                for s in self.shards
            ],
            "lost_shards": [
                {"shard": s.job.shard, "worker": s.worker, "attempts_received": s.rows}
                for s in self.shards
                if s.lost
            ],
        }

    def messages(self) -> list[str]:
        """What the cluster did (one line), then one line per shard that did not end well."""
        report = self.report(self.shards[0].job.run_dir)
        shipped = sum(s.shipped_bytes for s in self.shards)
        out = [
            f"cluster {self.cluster.address}: {len(self.shards)} shards on"
            f" {len({s.worker for s in self.shards})} workers, start skew"
            f" {report['start_skew_s'] * 1000:.1f} ms, fleet slices {shipped / 1024:.0f} KiB"
            f" shipped (packed in {self.pack_seconds:.2f} s)"
        ]
        for s in self.shards:
            if s.lost:
                out.append(
                    f"shard {s.job.shard} lost: its worker {s.worker} left the cluster; the"
                    f" {s.rows} rows it streamed before are kept, the rest of its schedule is lost"
                )
            elif s.error:
                out.append(f"shard {s.job.shard} on {s.worker} failed: {s.error}")
        return out


# -- the command line ------------------------------------------------------------------------------


def add_cluster_options(p: Any) -> None:
    """Add ``--cluster`` and ``--keys-in-memory`` to a ``testbed`` subcommand's parser."""
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run the shards on a Dask cluster: tcp://HOST:8786 (a `dask scheduler`) or local:N"
        " (N worker processes here); one shard per worker unless --workers says how many;"
        f" needs {INSTALL_HINT}",
    )
    p.add_argument(
        "--keys-in-memory",
        action="store_true",
        help="--cluster: workers unpack their fleet slice (device keys) in RAM (/dev/shm),"
        " never on disk",
    )


def open_cluster(args: Any) -> tuple[Cluster | None, int]:
    """The cluster ``--cluster`` names (or None) and the number of shards to run."""
    if args.cluster is None:
        if args.keys_in_memory:
            raise ClusterError("--keys-in-memory: only with --cluster")
        return None, 1 if args.workers is None else args.workers
    if args.workers is not None and args.workers < 1:
        raise ClusterError(f"--workers: expected 1 or more, got {args.workers}")
    cluster = Cluster(args.cluster, keys_in_memory=args.keys_in_memory)
    return cluster, len(cluster.workers) if args.workers is None else args.workers
