"""A real one-node SLURM on localhost for the scheduler tests: munge, MariaDB, slurmdbd,
slurmctld and slurmd, each a process started here with its config, state and logs in one
temporary dir, and stopped after.

Accounting (slurmdbd on MariaDB) is part of it because submitit reads a job's state with
`sacct`: without it a task that SLURM cancels or kills never reports an end state. Clients
(sbatch, squeue, scontrol, sacct) find the cluster through SLURM_CONF, which `env()` sets.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from debian import ensure, have

BINARIES = ["munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "mariadbd", "mariadb-install-db"]
PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server", "mariadb-client"]
HOW = "install Debian's slurm-wlm, slurmdbd, munge and mariadb-server (apt-get, as root) to run the SLURM tests"
KILL_WAIT_S = 10  # SIGTERM to SIGKILL when SLURM ends a task (scancel, requeue, time limit)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class Cluster:
    """Start with `Cluster.start()`; `env()` for commands that talk to it; `stop()` at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.node = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))
        self.conf = root / "etc" / "slurm.conf"

    # ---- set-up ---------------------------------------------------------------------------
    @classmethod
    def available(cls) -> str | None:
        """None when a cluster can be started here, else why not (one line)."""
        if os.geteuid() != 0:
            return f"the SLURM daemons run as root here; {HOW}"
        if not ensure(BINARIES, PACKAGES):
            return HOW
        return None

    @classmethod
    def start(cls) -> "Cluster":
        cluster = cls(Path(tempfile.mkdtemp(prefix="cv-slurm-")))  # short: unix socket paths
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self) -> None:
        r = self.root
        for d in ("etc", "munge", "db", "state", "spool", "log"):
            (r / d).mkdir(mode=0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.munge_socket = r / "munge" / "socket"
        self._spawn(
            [have("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={r / 'munge' / 'pid'}", f"--log-file={r / 'log' / 'munged.log'}",
             f"--seed-file={r / 'munge' / 'seed'}"],
            "munged",
        )  # fmt: skip
        self._wait(lambda: self.munge_socket.exists(), "munged")
        self.db_port, self.dbd_port = _port(), _port()
        subprocess.run(
            [have("mariadb-install-db"), f"--datadir={r / 'db'}", "--user=root", "--skip-test-db",
             "--auth-root-authentication-method=normal"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        self._spawn(
            [have("mariadbd"), "--no-defaults", f"--datadir={r / 'db'}", "--user=root", f"--port={self.db_port}",
             "--bind-address=127.0.0.1", f"--socket={r / 'db.sock'}", f"--pid-file={r / 'db.pid'}",
             "--skip-log-bin", "--innodb-buffer-pool-size=32M"],
            "mariadbd",
        )  # fmt: skip
        self._wait(lambda: self._connects(self.db_port), "mariadbd")
        self._write_configs()
        self._spawn([have("slurmdbd"), "-D"], "slurmdbd")
        self._wait(lambda: self._connects(self.dbd_port), "slurmdbd")
        self._spawn([have("slurmctld"), "-D", "-i"], "slurmctld")
        self._spawn([have("slurmd"), "-D", "-N", self.node], "slurmd")
        self._wait(self._idle, "the node to be idle", timeout=90)

    def _write_configs(self) -> None:
        r, auth = self.root, f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        dbd = r / "etc" / "slurmdbd.conf"
        dbd.write_text(
            f"{auth}DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={self.db_port}\n"
            f"StorageUser=root\nStorageLoc=slurm_acct_db\nPidFile={r / 'slurmdbd.pid'}\n"
            f"LogFile={r / 'log' / 'slurmdbd.log'}\n"
        )
        dbd.chmod(0o600)
        self.conf.write_text(
            f"ClusterName=corevital\nSlurmctldHost={self.node}(127.0.0.1)\n{auth}CredType=cred/munge\n"
            f"SlurmUser=root\nSlurmdUser=root\nSlurmctldPort={_port()}\nSlurmdPort={_port()}\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'slurmctld.pid'}\nSlurmdPidFile={r / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}\nSlurmdLogFile={r / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\nSchedulerType=sched/backfill\n"
            "ReturnToService=2\nJobAcctGatherType=jobacct_gather/none\nPlugStackConfig=/dev/null\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePass={self.munge_socket}\nAccountingStoragePort={self.dbd_port}\nKillWait={KILL_WAIT_S}\nMinJobAge=600\n"
            "SchedulerParameters=defer_batch\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb() - 1024} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )

    # ---- use ------------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        """The environment of a command that talks to this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    @contextmanager
    def releasing_requeued(self):
        """While in the block, a requeued task starts again at once: SLURM holds a requeued
        job for two minutes (reason BeginTime) before it may start, which a test need not wait."""
        done = threading.Event()

        def release():
            while not done.wait(1.0):
                held = self.run("squeue", "-h", "-t", "PD", "-o", "%i %r", check=False).split("\n")
                for job in [line.split()[0] for line in held if line.endswith(" BeginTime")]:
                    self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)

        thread = threading.Thread(target=release, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- internals ------------------------------------------------------------------------
    def _spawn(self, cmd: list, name: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")
        self.procs.append(
            subprocess.Popen(
                [str(c) for c in cmd], env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                name = Path(dead[0].args[0]).name
                raise RuntimeError(f"{name} exited while waiting for {what}:\n{self._tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"timed out waiting for {what}:\n" + "\n".join(self._tail(Path(str(p.args[0])).name) for p in self.procs)
        )

    def _tail(self, name: str, lines: int = 15) -> str:
        text = "".join(
            (self.root / "log" / f).read_text(errors="replace")
            for f in (f"{name}.out", f"{name}.log")
            if (self.root / "log" / f).exists()
        )
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def _connects(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True, timeout=30)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        shutil.rmtree(self.root, ignore_errors=True)
