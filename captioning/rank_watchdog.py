"""Stop every DDP rank within seconds of one dying, naming it, instead of waiting for the collective timeout.

A rank that dies mid-epoch leaves the others inside a collective (a gradient all-reduce, the
broadcast of the validation scores) that only the process-group timeout ends: 30 minutes by
default, and with NCCL not even an error message saying which rank is gone. Here each rank runs a
thread that bumps a counter of its own in the rendezvous key-value store (the TCP store at
``MASTER_ADDR:MASTER_PORT`` that every rank reaches anyway) and reads the others'. A rank whose
counter stops for ``peer_timeout_s`` (killed, out of memory, its node gone), a rank that records an
exception, or the store itself stopping to answer (it lives in rank 0's process) makes the thread
log which rank and leave the process with ``EXIT_STATUS``: the main thread may be blocked in a
collective that nothing else would end. Ranks that finish tell the others first, so a normal end is
never taken for a death.

What else notices, and when: Lightning's own launcher kills rank 0 within 5 s when a rank it
started exits non-zero (its log names the rank), and gloo fails a collective at once when a peer's
socket closes; a rank that is alive but hangs is ended only by the process-group timeout
(``DDPStrategy(timeout=...)``, conf/trainer/ddp.yaml).
"""

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy

log = logging.getLogger(__name__)

EXIT_STATUS = 75  # EX_TEMPFAIL: another rank failed, not this one; resume from last.ckpt
_PREFIX = "captioning/rank_watchdog"


class RankWatchdog:
    """The heartbeat thread of one rank in one ``generation`` (a fit or test call) of a run."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, peer_timeout_s: float,
                 generation: int) -> None:
        self.rank, self.world_size, self.peer_timeout_s = rank, world_size, peer_timeout_s
        self.interval = min(1.0, peer_timeout_s / 10)
        self._keys = f"{_PREFIX}/{generation}"
        # a client of its own, whose timeout bounds every call: a store on a vanished node must not block it
        self._store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=peer_timeout_s),
                                    wait_for_workers=False)
        self._stop = threading.Event()
        self._whos: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="rank-watchdog", daemon=True)

    def start(self) -> None:
        self._store.set(f"{self._keys}/who/{self.rank}", f"pid {os.getpid()} on {socket.gethostname()}")
        self._thread.start()

    def finish(self) -> None:
        """A normal end: stop watching, then say so; rank 0 (whose process holds the store) waits until
        every rank has, so that none of them finds the store gone and takes it for rank 0's death."""
        self._halt()
        try:
            self._store.set(f"{self._keys}/done/{self.rank}", "1")
            if self.rank == 0:
                deadline = time.monotonic() + self.peer_timeout_s
                while time.monotonic() < deadline and not self._store.check(
                        [f"{self._keys}/done/{peer}" for peer in range(1, self.world_size)]):
                    time.sleep(self.interval / 4)
        except (RuntimeError, OSError) as error:  # the work is done: a store gone now only costs the hand-over
            log.warning("rank %d finished, but could not tell the other ranks: %s", self.rank, error)

    def failed(self, exception: BaseException) -> None:
        """This rank stops on an exception: tell the others (they may be waiting for it in a collective).

        When the exception is a collective failing because a peer went away, the watchdog names that
        peer first: it keeps watching for up to ``peer_timeout_s`` and ends the process when it finds it.
        """
        if _lost_peer(exception) and self._thread.is_alive():
            self._thread.join(self.peer_timeout_s + 2 * self.interval)
        self._halt()
        try:
            self._store.set(f"{self._keys}/failed/{self.rank}", f"{type(exception).__name__}: {exception}"[:500])
        except (RuntimeError, OSError):  # the store went with rank 0: the others notice that instead
            return
        if self.rank == 0:  # the store ends with this process: let every rank read why before it does
            time.sleep(2 * self.interval)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        peers = [rank for rank in range(self.world_size) if rank != self.rank]
        last_seen = {peer: (None, time.monotonic()) for peer in peers}  # counter, when it last changed
        beat = 0
        while not self._stop.wait(self.interval):
            try:
                beat += 1
                self._store.set(f"{self._keys}/beat/{self.rank}", str(beat))
                self._learn_who(peers)
                for peer in peers:
                    problem = self._check(peer, last_seen)
                    if problem:
                        self._stop_process(f"rank {peer} ({self._who(peer)}) {problem}")
            except (RuntimeError, OSError) as error:  # DistStoreError, DistNetworkError, a timeout
                if not self._stop.is_set():  # on rank 0 (torchrun's agent holds the store) name the store alone
                    reason = str(error).splitlines()[0]
                    self._stop_process(f"rank 0 ({self._who(0)}), whose process holds the rendezvous store, stopped "
                                       f"answering ({reason})" if self.rank else
                                       f"the rendezvous store stopped answering ({reason})")

    def _check(self, peer: int, last_seen: dict[int, tuple[str | None, float]]) -> str | None:
        """Why ``peer`` is lost, or None while it beats, has finished, or is still within the timeout."""
        if self._store.check([f"{self._keys}/done/{peer}"]):
            return None
        if self._store.check([f"{self._keys}/failed/{peer}"]):
            reason = self._store.get(f"{self._keys}/failed/{peer}").decode(errors="replace")
            self._stop.wait(min(10.0, self.peer_timeout_s))  # this rank may be failing the same way: its own
            return None if self._stop.is_set() else f"stopped on an error: {reason}"  # error is the better message
        key = f"{self._keys}/beat/{peer}"
        counter = self._store.get(key).decode() if self._store.check([key]) else None
        previous, since = last_seen[peer]
        now = time.monotonic()
        if counter != previous:
            last_seen[peer] = (counter, now)
            return None
        if now - since > self.peer_timeout_s:
            state = "stopped answering" if counter is not None else "never answered"
            return f"{state}: no heartbeat for {now - since:.0f} s (killed, out of memory, or its node lost)"
        return None

    def _learn_who(self, peers: list[int]) -> None:
        """Each peer's pid and host, read once (the store may be gone by the time a peer needs naming)."""
        for peer in peers:
            key = f"{self._keys}/who/{peer}"
            if peer not in self._whos and self._store.check([key]):
                self._whos[peer] = self._store.get(key).decode(errors="replace")

    def _who(self, peer: int) -> str:
        return self._whos.get(peer, "pid unknown")

    def _stop_process(self, lost: str) -> None:
        message = (f"error: {lost}: stopping rank {self.rank} (pid {os.getpid()}) too, with exit status "
                   f"{EXIT_STATUS}. The run can be resumed from its last checkpoint (ckpt_path=.../last.ckpt).")
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_STATUS)  # the main thread may be inside a collective that would wait for the timeout


_LOST_PEER = ("closed by peer", "reset by peer", "broken pipe", "remote worker crashing", "connection refused")


def _lost_peer(exception: BaseException) -> bool:
    """Whether ``exception`` is a collective or the store failing because another rank went away (gloo raises a
    plain ``RuntimeError`` saying "Connection closed by peer"), rather than this rank's own error."""
    return isinstance(exception, dist.DistError) or any(words in str(exception).lower() for words in _LOST_PEER)


class WatchedDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with a ``RankWatchdog`` on every rank while it fits, validates or tests.

    ``peer_timeout_s``: how long a rank may stop answering before the others stop (0: no watchdog).
    The other arguments are ``DDPStrategy``'s (``timeout``: the process-group timeout, a ``timedelta``).
    """

    def __init__(self, *args: Any, peer_timeout_s: float = 30.0, **kwargs: Any) -> None:
        if peer_timeout_s < 0:
            raise ValueError(f"trainer.strategy.peer_timeout_s must be >= 0 (0: off), got {peer_timeout_s}")
        super().__init__(*args, **kwargs)
        self.peer_timeout_s = peer_timeout_s
        self._generation = 0
        self._watchdog: RankWatchdog | None = None

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self._generation += 1
        if self.world_size > 1 and self.peer_timeout_s > 0:
            assert self.cluster_environment is not None
            self._watchdog = RankWatchdog(self.global_rank, self.world_size, self.cluster_environment.main_address,
                                          self.cluster_environment.main_port, self.peer_timeout_s, self._generation)
            self._watchdog.start()

    def on_exception(self, exception: BaseException) -> None:
        if self._watchdog is not None:
            self._watchdog.failed(exception)
            self._watchdog = None
        super().on_exception(exception)

    def teardown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.finish()
            self._watchdog = None
        super().teardown()
