"""Replication lag of each replica, sampled in the background, never on a request's path.

Every ``interval`` seconds one thread per process asks the primary for its WAL position
(``pg_current_wal_lsn()``), then each replica for the position it has replayed
(``pg_last_wal_replay_lsn()``) and the age of the last commit it replayed
(``clock_timestamp() - pg_last_xact_replay_timestamp()``): one small message per server, on a
connection of the app's own pools (no connection of its own). Requests, ``/metrics`` and
``/readyz`` read the last sample.

How far behind, honestly
    ``bytes`` is the primary's position minus the replica's; 0 when the replica has replayed
    everything the primary had written when it was asked (it is asked first). ``seconds`` is
    0 then too. Otherwise it is an upper bound: the smaller of the age of the last replayed
    commit (everything committed before it is replayed) and the time since this sampler last
    saw the replica caught up (everything written before that is replayed). The first alone
    would call a healthy replica minutes behind when an idle primary commits once and the
    sample falls before the replay; the second caps that at one interval. A replica held back
    for real (``recovery_min_apply_delay``) shows its lag within one interval.

Unknown
    A server that does not answer leaves its replicas' lag unknown (``None``): without the
    primary's position there is nothing to compare with. Unknown is not "too far": reads then
    follow the existing fallbacks (``app.db``), which already try replicas while the primary
    is down.

A replica whose lag exceeds ``max_seconds`` is stale: ``Database.read`` skips it (a "lagging"
fallback) until a later sample finds it within the bound, and ``/readyz/replication``
answers 503. The bound holds up to one interval late, so it should be several intervals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lag:
    """How far one replica was behind the primary at the last sample."""

    seconds: float | None
    bytes: int | None


UNKNOWN = Lag(None, None)


@dataclass(frozen=True)
class Replayed:
    """A replica's answer: the position it has replayed and the age of its last replayed
    commit (None before it replayed any)."""

    position: int
    commit_age: float | None


class ReplicationLag:
    """The last sample of every replica's lag, refreshed by a daemon thread.

    ``primary_position()`` returns the primary's WAL position; ``replayed(name)`` a replica's
    ``Replayed``. Either raises when its server does not answer or is not what it should be
    (a "primary" in recovery, a "replica" that is not). ``start()`` is idempotent (call it
    where the lag is needed); ``stop()`` ends the thread.
    """

    def __init__(self, replicas: Sequence[str], *, primary_position: Callable[[], int],
                 replayed: Callable[[str], Replayed], interval: float,
                 max_seconds: float) -> None:
        self.replicas = tuple(replicas)
        self.interval = interval
        self.max_seconds = max_seconds
        self._primary_position = primary_position
        self._replayed = replayed
        self._lag = dict.fromkeys(self.replicas, UNKNOWN)
        self._caught_up_at: dict[str, float] = {}
        self._sampled = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failing: set[str] = set()

    def start(self) -> None:
        """Start the thread unless it runs (in this process: a fork leaves it behind)."""
        if not self.replicas or (self._thread is not None and self._thread.is_alive()):
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="replication-lag",
                                                daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._thread = None

    def wait_sampled(self, timeout: float) -> bool:
        """Start if needed and wait up to ``timeout`` for a first sample; True once there is
        one (or there is no replica)."""
        self.start()
        return not self.replicas or self._sampled.wait(timeout)

    def of(self, name: str) -> Lag:
        return self._lag.get(name, UNKNOWN)

    def stale(self, name: str) -> bool:
        """Whether the replica lags past the bound (unknown is not stale)."""
        seconds = self.of(name).seconds
        return seconds is not None and seconds > self.max_seconds

    def as_json(self, name: str) -> dict[str, object]:
        """The replica's last sample and whether it is stale, as `/readyz` shows them."""
        lag = self.of(name)
        return {"seconds": lag.seconds, "bytes": lag.bytes, "stale": self.stale(name)}

    def sample(self) -> None:
        """One round: the primary's position, then each replica's."""
        asked_at = time.monotonic()
        try:
            primary = self._primary_position()
        except Exception as exc:  # noqa: BLE001 - any failure means "not measured"
            self._report("primary", exc)
            primary = None
        else:
            self._report("primary", None)
        for name in self.replicas:
            self._lag[name] = self._measure(name, primary, asked_at)
        self._sampled.set()

    def _measure(self, name: str, primary: int | None, asked_at: float) -> Lag:
        try:
            replayed = self._replayed(name)
        except Exception as exc:  # noqa: BLE001
            self._report(name, exc)
            return UNKNOWN
        self._report(name, None)
        if primary is None:
            return UNKNOWN
        behind = max(primary - replayed.position, 0)
        if behind == 0:
            self._caught_up_at[name] = asked_at
            return Lag(0.0, 0)
        bounds = [time.monotonic() - self._caught_up_at[name]] if name in self._caught_up_at \
            else []
        if replayed.commit_age is not None:
            bounds.append(max(replayed.commit_age, 0.0))
        return Lag(round(min(bounds), 3) if bounds else None, behind)

    def _report(self, name: str, error: Exception | None) -> None:
        """Log a server's failure once, and its recovery."""
        if error is not None and name not in self._failing:
            self._failing.add(name)
            log.warning("replication lag: %s did not answer: %s", name, error)
        elif error is None and name in self._failing:
            self._failing.discard(name)
            log.warning("replication lag: %s answers again", name)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.sample()
            self._stopping.wait(self.interval)
