"""A real, private SLURM cluster for the tests: munged + slurmctld + two slurmd on this host.

Use the ``slurm_cluster`` fixture (one per pytest run). Where the Debian packages are missing,
it installs them with apt-get if MLPS_SLURM_APT=1 (.ci/run sets it; root needed), else the
tests are skipped with the reason. It writes a slurm.conf whose state/spool/log/pid paths all
live in a temporary folder, starts the daemons and waits until both nodes are idle. The nodes ``node1`` and
``node2`` are two ``slurmd -N`` processes on 127.0.0.1; they run in a mount namespace
with a private /etc/hosts so that node names resolve inside jobs (they become the
torchrun rendezvous host). Teardown cancels the jobs, then stops exactly the processes
this module started, by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("node1", "node2")
CPUS_PER_NODE = 4  # claimed (SlurmdParameters=config_overrides): lets the test jobs run side by side
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ensure_installed() -> None:
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (to run munged, slurmctld and slurmd)")
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged") and shutil.which("sbatch"):
        return
    # Installing system packages is the caller's choice, never a side effect of running pytest.
    if os.environ.get("MLPS_SLURM_APT") != "1":
        pytest.skip(
            "SLURM is not installed (slurmctld, slurmd, munged, sbatch): set MLPS_SLURM_APT=1 to install "
            "SLURM with apt-get, or install slurm-wlm"
        )
    if not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is missing: install slurmctld slurmd slurm-client munge")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not install SLURM ({' '.join(cmd)}): {done.stderr.strip()[-300:]}")


def _slurm_conf(root: Path, munge_socket: Path, ports: list[int]) -> str:
    ctld_port, *node_ports = ports
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""\
ClusterName=mlpstest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]  # client environment (SLURM_CONF); jobs inherit it through sbatch
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", out))

    def wait(self, job_ids: list[int], timeout_s: float, poll_s: float = 1.0) -> dict[int, dict[str, str]]:
        """Poll until every job has ended (COMPLETED, FAILED, ...); return their records."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        deadline = time.monotonic() + timeout_s
        while True:
            jobs = {j: self.job(j) for j in job_ids}
            if all(info.get("JobState") in final for info in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                states = {j: (i.get("JobState"), i.get("Reason")) for j, i in jobs.items()}
                raise TimeoutError(f"SLURM jobs not finished after {timeout_s}s: {states}\n{self.logs()}")
            time.sleep(poll_s)

    def jobcomp(self) -> str:
        """The job completion log: one line per job end, requeues included."""
        path = self.root / "log" / "jobcomp.txt"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def cancel_all(self) -> None:
        self.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-t", "RUNNING,COMPLETING", check=False).stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(cluster: SlurmCluster, *cmd: str) -> None:
    log = open(cluster.root / "log" / f"{Path(cmd[0]).name}-{len(cluster.procs)}.out", "w")
    cluster.procs.append(subprocess.Popen(list(cmd), env=cluster.env, stdout=log, stderr=subprocess.STDOUT))


def _wait_idle(cluster: SlurmCluster, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        if all(states.get(n) == "idle" for n in NODES):
            return
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}\n{cluster.logs()}")
        time.sleep(0.3)
    raise RuntimeError(f"SLURM nodes not idle after {timeout_s}s: {states}\n{cluster.logs()}")


def start_cluster() -> SlurmCluster:
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="mlps-slurm-"))
    root.chmod(0o755)  # munged insists on a socket folder others may traverse
    for sub in ("state", "spool", "run", "log", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "plugstack.conf").write_text("")
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket, _free_ports(1 + len(NODES))))
    (root / "hosts").write_text(f"127.0.0.1 localhost {' '.join(NODES)} {socket.gethostname()}\n")
    cluster = SlurmCluster(root=root, conf=conf, env=dict(os.environ, SLURM_CONF=str(conf)))
    try:
        _start(
            cluster,
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge_socket}",
            f"--pid-file={root}/run/munged.pid",
            f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/seed",
        )
        deadline = time.monotonic() + 10
        while not munge_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _start(cluster, "slurmctld", "-D", "-i", "-f", str(conf))
        for name in NODES:
            # exec keeps the pid ours; the bind mount is private to this slurmd and its jobs.
            _start(
                cluster,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'mount --bind "{root}/hosts" /etc/hosts && exec slurmd -D -N {name} -f "{conf}"',
            )
        _wait_idle(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()
        if not os.environ.get("MLPS_KEEP_SLURM_LOGS"):
            shutil.rmtree(cluster.root, ignore_errors=True)
