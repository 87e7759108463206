"""Distributed runs with real processes (CPU, gloo): a rank killed mid-epoch stops the others within a
minute, naming it; two "nodes" whose ranks come from the environment train and score as one node does."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf

from captioning.rank_watchdog import EXIT_STATUS
from tests.conftest import PROJECT_ROOT
from tests.test_train import QUICK, TINY_OVERRIDES, TINY_SHAPES_OVERRIDES
import train

STOPPED_WITHIN_S = 60


def _common(tmp_path: Path, data_dir: Path) -> list[str]:
    return [*TINY_SHAPES_OVERRIDES, *TINY_OVERRIDES, "trainer=ddp", "trainer.accelerator=cpu", "logger=csv",
            "+trainer.enable_progress_bar=false", f"paths.data_dir={data_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}"]


class _Run:
    """``train.py`` in a process of its own, its output collected line by line with the time it came."""

    def __init__(self, overrides: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "train.py", *overrides], cwd=PROJECT_ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.process.poll() is None, f"exited before {text!r}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def _children(pid: int) -> list[int]:
    """The rank processes Lightning's launcher started (``train.py`` again), not the evaluator's Java."""
    listed = subprocess.run(["pgrep", "-P", str(pid), "-f", "train.py"], capture_output=True, text=True)
    return [int(child) for child in listed.stdout.split()]


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank 0", "rank 1"])
def test_a_rank_killed_mid_epoch_stops_the_other_within_a_minute_naming_it(tmp_path: Path, tiny_shapes: Path,
                                                                          victim: str) -> None:
    """Rank 0 is the process the user started, rank 1 the one Lightning's launcher started from it.

    Killing rank 0: rank 1's watchdog (captioning/rank_watchdog.py) finds the store gone and exits with
    EXIT_STATUS naming rank 0. Killing rank 1: Lightning's launcher sees its child die and stops rank 0,
    naming rank 1 and its pid (the watchdog would too, after trainer.strategy.peer_timeout_s).
    """
    run = _Run([*_common(tmp_path, tiny_shapes.parent), "trainer.devices=2", "trainer.max_epochs=100",
                "trainer.num_sanity_val_steps=0", f"hydra.run.dir={tmp_path / 'run'}"])
    ranks = [run.process.pid]
    try:
        run.wait_for("Trainable params", timeout=300)  # both ranks are set up and the first epoch starts
        time.sleep(4)
        children = _children(run.process.pid)
        assert len(children) == 1, children
        rank1 = children[0]
        ranks.append(rank1)
        killed, survivor = (run.process.pid, rank1) if victim == "rank 0" else (rank1, run.process.pid)
        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()
        while not _gone(survivor) and time.monotonic() - started < STOPPED_WITHIN_S + 30:
            time.sleep(0.2)
        took = time.monotonic() - started
        assert _gone(survivor), f"{victim} killed, the other rank still runs after {took:.0f} s"
        assert took < STOPPED_WITHIN_S
        if victim == "rank 1":
            assert run.finish(timeout=30) == -signal.SIGKILL
            assert f"[rank: 1] Child process with PID {rank1} terminated with code -9" in run.output
        else:
            run.finish(timeout=30)  # the output pipe stays open until rank 1, which shares it, is gone
            assert f"error: rank 0 (pid {killed} on {socket.gethostname()}), whose process holds the rendezvous " \
                   f"store, stopped answering" in run.output
            assert f"stopping rank 1 (pid {rank1}) too, with exit status {EXIT_STATUS}" in run.output
    finally:
        for pid in ranks:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


class FailOnRank(pl.Callback):
    """Raises on one rank at one training step: a rank's own error (a bad image, a full disk) mid-epoch."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise ValueError(f"injected failure on rank {self.rank}")


@pytest.mark.slow
def test_a_rank_failing_mid_epoch_stops_the_other_naming_it_and_its_error(tmp_path: Path, tiny_shapes: Path) -> None:
    """Rank 0 raises while rank 1 waits for it in the gradient all-reduce: rank 1 is told the error through
    the store and stops (exit 75) naming rank 0 and the error, instead of waiting for the timeout."""
    run = _Run([*_common(tmp_path, tiny_shapes.parent), "trainer.devices=2", "trainer.max_epochs=100",
                "trainer.num_sanity_val_steps=0", f"hydra.run.dir={tmp_path / 'run'}",
                f"+callbacks.fail._target_={__name__}.FailOnRank", "+callbacks.fail.rank=0", "+callbacks.fail.step=3"])
    run.wait_for("Trainable params", timeout=300)
    rank1 = _children(run.process.pid)
    assert len(rank1) == 1, rank1
    assert run.finish(timeout=120) != 0
    started = time.monotonic()
    while not _gone(rank1[0]) and time.monotonic() - started < STOPPED_WITHIN_S:
        time.sleep(0.2)
    assert _gone(rank1[0]), "rank 1 still runs a minute after rank 0 failed"
    time.sleep(1)  # the last lines of rank 1, which shares the output
    assert "ValueError: injected failure on rank 0" in run.output
    assert (f"error: rank 0 (pid {run.process.pid} on {socket.gethostname()}) stopped on an error: ValueError: "
            "injected failure on rank 0") in run.output
    assert f"stopping rank 1 (pid {rank1[0]}) too, with exit status {EXIT_STATUS}" in run.output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _best_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_two_nodes_ranked_by_the_environment_train_and_score_as_one_node(tmp_path: Path, tiny_shapes: Path) -> None:
    """A cluster starts one process per node and tells each its place through the environment
    (MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE, LOCAL_RANK: what Lightning's LightningEnvironment
    reads; it then starts no process itself). Two such "nodes" with one device each are the same
    2-process job as one node with two devices: the same weights and the same scores."""
    common = [*_common(tmp_path, tiny_shapes.parent), *QUICK]
    # one CPU thread per process in both jobs: Lightning gives each process cores / processes-per-node threads
    # (1 on one node with two processes, 2 on two nodes of one), and other threads sum in another order
    threads = {"OMP_NUM_THREADS": "1"}
    one_node = _Run([*common, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'one_node'}"], env=threads)
    assert one_node.finish(timeout=600) == 0, one_node.output[-3000:]
    port = str(_free_port())
    nodes = [_Run([*common, "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={tmp_path / f'node{rank}'}"],
                  env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": "0", **threads})
             for rank in (0, 1)]
    for node in nodes:
        assert node.finish(timeout=600) == 0, node.output[-3000:]
    assert "Starting with 2 processes" in nodes[0].output
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in nodes[1].output
    assert "rank_watchdog" not in one_node.output + nodes[0].output + nodes[1].output  # a normal end is no death
    assert _children(nodes[0].process.pid) == []  # each node ran its own rank only

    expected = json.loads((tmp_path / "one_node" / "metrics.json").read_text())
    assert expected["test/CIDEr"] >= 0 and "val/best_CIDEr" in expected
    got = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    # the scores exactly; the loss, a float32 mean all-reduced over the ranks, to its rounding (as tests/test_train.py)
    assert got.pop("test/loss") == pytest.approx(expected.pop("test/loss"), rel=1e-6, abs=1e-6)
    assert got == expected
    assert not (tmp_path / "node1" / "metrics.json").exists()  # written by global rank 0 alone
    weights, reference = _best_weights(tmp_path / "node0"), _best_weights(tmp_path / "one_node")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


# ---- the watchdog alone: two plain processes and a store, no Lightning ----

RANK = """
import sys, time
from captioning.rank_watchdog import RankWatchdog
rank, port, action = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
watchdog = RankWatchdog(rank, 2, "127.0.0.1", port, peer_timeout_s=3.0, generation=1)
watchdog.start()
print("started", flush=True)
if action == "fail":
    time.sleep(2)
    watchdog.failed(ValueError("images/7.png: cannot decode"))
elif action == "finish":
    time.sleep(2)
    watchdog.finish()
else:
    time.sleep(60)  # blocked, as in a collective waiting for the other rank
"""


def _rank(rank: int, port: int, action: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(port), action], cwd=PROJECT_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture
def store_port() -> int:
    """A rendezvous store as the ranks would find at MASTER_ADDR:MASTER_PORT (held here instead of by rank 0)."""
    import torch.distributed as dist

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    yield port
    del store


@pytest.mark.slow
@pytest.mark.parametrize(("other", "expected"), [
    ("fail", "rank 1 (pid {pid} on {host}) stopped on an error: ValueError: images/7.png: cannot decode"),
    ("killed", "rank 1 (pid {pid} on {host}) stopped answering"),
])
def test_the_watchdog_names_a_rank_that_failed_or_vanished(store_port: int, other: str, expected: str) -> None:
    waiting = _rank(0, store_port, "wait")
    lost = _rank(1, store_port, "fail" if other == "fail" else "wait")
    for process in (waiting, lost):
        assert process.stdout.readline().strip() == "started"
    if other == "killed":
        time.sleep(1)  # it has beaten a few times
        lost.kill()
    started = time.monotonic()
    output, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == EXIT_STATUS, output
    assert time.monotonic() - started < 15
    assert expected.format(pid=lost.pid, host=socket.gethostname()) in output
    assert "stopping rank 0" in output
    lost.communicate(timeout=30)


@pytest.mark.slow
def test_ranks_that_finish_are_never_taken_for_dead(store_port: int) -> None:
    ranks = [_rank(rank, store_port, "finish") for rank in (0, 1)]
    for rank in ranks:
        output, _ = rank.communicate(timeout=30)
        assert rank.returncode == 0 and "error" not in output, output


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "3", "SLURM_NTASKS": "8"}, "slurm-812.3"),
    ({"SLURM_JOB_ID": "812", "SLURM_NTASKS": "8"}, None),  # salloc's shell: two runs there must not share
    ({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, None),  # one task: its own folder
    ({"TORCHELASTIC_RUN_ID": "none"}, None),
    ({"TORCHELASTIC_RUN_ID": "b7f3"}, "torchrun-b7f3"),
])
def test_the_ranks_of_one_cluster_job_share_one_run_folder(environ: dict[str, str], expected: str | None) -> None:
    assert train.cluster_run_name(environ) == expected
    setup_globals()  # Hydra's ${now:} resolver
    hydra_config = OmegaConf.load(PROJECT_ROOT / "conf" / "hydra" / "default.yaml")
    hydra_config.paths, hydra_config.task_name = {"log_dir": "logs"}, "train"
    run_dir = OmegaConf.to_container(hydra_config)["run"]["dir"]  # unresolved
    if expected is not None:  # every rank composes the same folder, at whatever second it starts
        os.environ["CAPTIONING_RUN_NAME"] = expected
        try:
            assert hydra_config.run.dir == f"logs/train/runs/{expected}"
        finally:
            del os.environ["CAPTIONING_RUN_NAME"]
    assert "${oc.env:CAPTIONING_RUN_NAME," in run_dir
