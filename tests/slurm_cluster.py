"""A real, throwaway Slurm cluster on this machine for the `slurm`-marked tests.

    python tests/slurm_cluster.py start     # prints `export SLURM_CONF=…`; then sbatch/squeue work
    python tests/slurm_cluster.py stop

Debian's slurmctld + slurmd + munge (installed with apt-get when missing; needs root), one
slurmctld and one slurmd per fake node (Debian builds Slurm with multiple-slurmd support), no
systemd and no cgroups (proctrack/linuxproc, task/none). The fake nodes' names resolve through
/etc/hosts to their own loopback addresses (lmf-node1 → 127.0.0.2, …), so rendezvous and Ray
node addresses differ per node as on a real cluster. Two partitions: `debug` (default, every
node, no time limit) and `short` (one node, 5 minutes) for the limit checks. Everything lives
under one directory; stop() kills exactly the daemons start() started and removes its hosts lines.

Settings that matter here (measured, see ../shared/reference/slurm): MinJobAge=5 keeps `sbatch
--wait` polling every 2 s and lets finished jobs leave squeue quickly (their records stay
readable in jobcomp.txt); EnforcePartLimits=ALL makes impossible requests fail at submission;
KillWait=15 is the grace between SIGTERM and SIGKILL at a time limit (the ranks save within it);
cred_expire=10 lets a requeued job start again after 10 s instead of 120 s, and bf_interval=5 /
sched_interval=5 start it within 5 s of that.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("lmf-node1", "lmf-node2")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here: the tests skip with this message."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install() -> None:
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed and apt-get needs root: apt-get install {' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    policy = Path("/usr/sbin/policy-rc.d")  # keep the packages' postinst from starting system daemons
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {out.stderr.strip()[-500:]}")
    finally:
        if made:
            policy.unlink(missing_ok=True)


class LocalSlurm:
    def __init__(self, root: Path, cpus_per_node: int = 4, mem_mb: int = 8000):
        self.root = Path(root)
        self.cpus, self.mem = cpus_per_node, mem_mb
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.hosts_marker = f"# lmforge-test-slurm {self.root}"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- configuration -------------------------------------------------------------------
    def write_config(self) -> None:
        for d in ("etc", "state/ctld", "log", "run", *(f"state/slurmd-{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        port = _free_port()
        r = self.root
        lines = [
            "ClusterName=lmforge-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire is also how long Slurm holds a requeued job before it may start again
            # (default 120 s); starting it sooner (`scontrol update StartTime=now`) races the
            # revocation of its old credential ("Job credential revoked"), so shorten it instead.
            f"AuthInfo=socket={self.munge_dir}/munge.sock,cred_expire=10",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={port}",
            f"StateSaveLocation={r}/state/ctld", f"SlurmdSpoolDir={r}/state/slurmd-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r}/log/jobcomp.txt",
            "SchedulerType=sched/backfill",
            # a requeued job becomes startable when its begin time passes, which no event
            # announces: look every 5 s instead of the backfill default of 30
            "SchedulerParameters=bf_interval=5,sched_interval=5", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "ReturnToService=2", "EnforcePartLimits=ALL", "InactiveLimit=0",
            "KillWait=15", "MinJobAge=5", "SlurmdParameters=config_overrides",
        ]
        for i, node in enumerate(NODES, start=1):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
                         f"CPUs={self.cpus} RealMemory={self.mem} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        lines.append(f"PartitionName=short Nodes={NODES[0]} MaxTime=5 State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def add_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if self.hosts_marker not in text:
            entries = "".join(f"127.0.0.{i} {n} {self.hosts_marker}\n" for i, n in enumerate(NODES, start=2))
            hosts.write_text(text + ("" if text.endswith("\n") else "\n") + entries)

    def remove_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        lines = hosts.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if self.hosts_marker not in ln]
        if len(kept) != len(lines):
            hosts.write_text("".join(kept))

    # ---- daemons -------------------------------------------------------------------------
    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()[-800:]}")

    def start(self, timeout_s: float = 90) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm test cluster runs its daemons as root")
        install()
        self.write_config()
        self.add_hosts()
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
        m = self.munge_dir
        self._run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={m}/munge.sock",
                   f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                   f"--seed-file={m}/munged.seed"])
        self._run(["slurmctld", "-f", str(self.conf)])
        for node in NODES:
            self._run(["slurmd", "-f", str(self.conf), "-N", node])
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline, resumed, states = time.monotonic() + timeout_s, False, ""
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = out.stdout.strip()
            rows = [ln.split() for ln in states.splitlines()]
            if rows and {r[0] for r in rows} >= set(NODES) and all(r[1] in ("idle", "mix", "alloc") for r in rows):
                return
            if not resumed and any(r[1].startswith(("down", "drain", "drng")) for r in rows):
                for node in NODES:
                    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=self.env,
                                   capture_output=True)
                resumed = True
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-1500:] for p in sorted((self.root / "log").glob("*.log")))
        raise SlurmUnavailable(f"Slurm nodes not ready after {timeout_s:g} s (sinfo: {states!r})\n{logs}")

    def _pids(self) -> list[tuple[str, Path]]:
        run = self.root / "run"
        return ([("slurmd", p) for p in sorted(run.glob("slurmd-*.pid"))] + [("slurmctld", run / "slurmctld.pid")]
                + [("munged", self.munge_dir / "munged.pid")])

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-t", "R,CG"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                break
            time.sleep(0.5)
        for name, pidfile in self._pids():
            try:
                pid = int(pidfile.read_text().strip())
                if Path(f"/proc/{pid}/comm").read_text().strip() != name:
                    continue
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(40):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.25)
            else:
                os.kill(pid, signal.SIGKILL)
        self.remove_hosts()


def main(argv: list[str]) -> int:
    root = Path(os.environ.get("LMFORGE_SLURM_ROOT", "/tmp/lmforge-slurm"))
    cluster = LocalSlurm(root)
    if argv[1:] == ["start"]:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    elif argv[1:] == ["stop"]:
        cluster.stop()
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
