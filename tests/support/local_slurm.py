"""A single-node SLURM cluster from the distribution's packages (Debian: slurm-wlm, munge; slurmdbd and
mariadb-server for accounting), started by the tests as root in a folder of their own and stopped afterwards.

Everything lives under one folder: munge's key and socket, slurm.conf (``SLURM_CONF`` points the commands at
it), state, spool, logs, and with accounting a MariaDB data folder and slurmdbd.conf. The daemons listen on free
ports of 127.0.0.1, so nothing else on the machine is touched. ``.ci/cluster`` installs the packages and runs the
tests that use it (``pytest tests/cluster -m cluster``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = "slurm-wlm slurmdbd munge mariadb-server"
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")  # where Debian's SLURM commands look without SLURM_CONF


def missing_programs(accounting: bool = False) -> list[str]:
    needed = [*DAEMONS, "sbatch", "squeue", "scontrol", "sacct", "scancel"]
    if accounting:
        needed += ["slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "sacctmgr"]
    return [p for p in needed if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """``with LocalSlurm(folder) as cluster:`` a running cluster; ``cluster.env`` is the environment its commands
    need (``SLURM_CONF``)."""

    def __init__(self, folder: Path, *, accounting: bool = False, cpus: int | None = None, mem_mb: int = 8000,
                 partitions: str | None = None, min_job_age: int = 300, extra_conf: str = ""):
        self.dir = Path(folder).resolve()
        self.accounting = accounting
        self.cpus = cpus or os.cpu_count() or 1
        self.mem_mb = mem_mb
        self.host = socket.gethostname().split(".")[0]  # the daemons compare short host names
        # one partition by default; the tests' site file maps the profile's cpu/gpu partitions onto it
        self.partitions = partitions or f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP"
        self.min_job_age = min_job_age
        self.extra_conf = extra_conf
        self.procs: dict[str, int] = {}  # daemon -> pid
        self.linked = False  # whether we made /etc/slurm/slurm.conf

    # ------------------------------------------------------------------------------------------------ files
    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        d = self.dir
        accounting = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                      f"AccountingStoragePort={self.dbd_port}\nJobAcctGatherType=jobacct_gather/linux\n"
                      # the munge socket for talking to slurmdbd (AuthInfo is not used for it)
                      f"AccountingStoragePass={d}/munge/munge.sock\n"
                      if self.accounting else
                      "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n")
        self.conf.write_text(f"""# written by tests/support/local_slurm.py
ClusterName=mcibitest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
{accounting}JobCompType=jobcomp/none
MinJobAge={self.min_job_age}
KillWait=5
OverTimeLimit=0
InactiveLimit=0
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
{self.extra_conf}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
{self.partitions}
""")

    # ---------------------------------------------------------------------------------------------- daemons
    def _run(self, *cmd: str, env: dict | None = None, check: bool = True, timeout: float = 60):
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env or self.env, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                               + self.logs())
        return proc

    def _pid(self, name: str, pidfile: Path, timeout: float = 30) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pidfile.is_file() and pidfile.read_text().strip():
                return int(pidfile.read_text().split()[0])
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start\n" + self.logs())

    def start(self) -> LocalSlurm:
        try:
            return self._start()
        except BaseException:
            self.stop()  # what did start
            raise

    def _start(self) -> LocalSlurm:
        missing = missing_programs(self.accounting)
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)} (apt-get install {PACKAGES}; .ci/cluster "
                               "does it)")
        if os.geteuid() != 0:
            raise RuntimeError("the local SLURM cluster runs its daemons as root (SlurmUser=root)")
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").chmod(0o711)
        self.ctld_port, self.slurmd_port, self.dbd_port = _free_port(), _free_port(), _free_port()
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m = self.dir / "munge"
        self._run(_exe("munged"), "--force", f"--socket={m}/munge.sock", f"--key-file={key}",
                  f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed", f"--log-file={self.dir}/log/munged.log")
        self.procs["munged"] = self._pid("munged", m / "munged.pid")
        if self.accounting:
            self._start_accounting()
        self._write_conf()
        self._link_default_conf()
        self._run(_exe("slurmctld"), "-i", "-f", str(self.conf))
        self.procs["slurmctld"] = self._pid("slurmctld", self.dir / "slurmctld.pid")
        self._run(_exe("slurmd"), "-f", str(self.conf))
        self.procs["slurmd"] = self._pid("slurmd", self.dir / "slurmd.pid")
        self.wait_idle()
        return self

    def _start_accounting(self) -> None:
        """MariaDB on a free port of 127.0.0.1 with a data folder of its own, then slurmdbd on another."""
        db = self.dir / "mariadb"
        db.mkdir(exist_ok=True)
        self.db_port = _free_port()
        self._run("mariadb-install-db", f"--datadir={db}/data", "--user=root",
                  "--auth-root-authentication-method=normal", "--skip-test-db", timeout=180)
        subprocess.Popen([_exe("mariadbd"), f"--datadir={db}/data", "--user=root", f"--port={self.db_port}",
                          "--bind-address=127.0.0.1", f"--socket={db}/mysqld.sock", f"--pid-file={db}/mariadbd.pid",
                          f"--log-error={self.dir}/log/mariadb.log", "--skip-name-resolve"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs["mariadbd"] = self._pid("mariadbd", db / "mariadbd.pid", timeout=120)
        deadline = time.time() + 120
        while self._run("mariadb", f"--socket={db}/mysqld.sock", "-uroot", "-e", "select 1", check=False).returncode:
            if time.time() > deadline:
                raise RuntimeError("MariaDB does not answer\n" + self.logs())
            time.sleep(0.5)
        self._run("mariadb", f"--socket={db}/mysqld.sock", "-uroot", "-e",
                  "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
                  "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        self.dbd_port = _free_port()
        dbd = self.dir / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
AuthInfo=socket={self.dir}/munge/munge.sock
DbdHost={self.host}
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={self.dir}/slurmdbd.pid
LogFile={self.dir}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)
        env = dict(self.env, SLURM_CONF=str(self.conf))
        self._write_conf()  # slurmdbd reads slurm.conf too (ClusterName, auth)
        self._run(_exe("slurmdbd"), env=dict(env, SLURMDBD_CONF=str(dbd)), timeout=120)
        self.procs["slurmdbd"] = self._pid("slurmdbd", self.dir / "slurmdbd.pid", timeout=60)
        deadline = time.time() + 120
        while self._run("sacctmgr", "-i", "add", "cluster", "mcibitest", check=False).returncode:
            if time.time() > deadline:
                raise RuntimeError("slurmdbd does not answer\n" + self.logs())
            time.sleep(1)

    def _link_default_conf(self) -> None:
        """/etc/slurm/slurm.conf -> our slurm.conf: the SLURM executor's job step starts `srun` inside each job
        with every SLURM_* variable but a few removed (SLURM_CONF too), so that srun reads the default path.
        An existing file that is not our link is left alone and the cluster refuses to start."""
        if DEFAULT_CONF.is_symlink() and not DEFAULT_CONF.exists():
            DEFAULT_CONF.unlink()  # a dangling link of an earlier run
        if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
            if DEFAULT_CONF.resolve() != self.conf.resolve():
                raise RuntimeError(f"{DEFAULT_CONF} exists: this machine has a SLURM configuration of its own, "
                                   "which the local test cluster will not replace")
            return
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self.conf)
        self.linked = True

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the node takes jobs."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self._run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            if out and all(s in ("idle", "mix", "alloc") for s in out):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not come up: {self._run('sinfo', check=False).stdout}\n" + self.logs())

    def stop(self) -> None:
        """Stop the daemons this object started (by pid), newest first, and remove our /etc/slurm link."""
        if self.linked and DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == self.conf.resolve():
            DEFAULT_CONF.unlink()
        self.linked = False
        for name in reversed(list(self.procs)):
            pid = self.procs.pop(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- commands
    def sbatch(self, *args: str) -> str:
        return self._run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (squeue --states=all): id, name, state, comment, restarts."""
        fmt = "%i|%j|%T|%k|%r|%S|%e|%l"
        out = self._run("squeue", "--states=all", "--noheader", f"--format={fmt}", check=False).stdout
        keys = ["id", "name", "state", "comment", "reason", "start", "end", "limit"]
        return [dict(zip(keys, line.split("|"), strict=False)) for line in out.splitlines() if line.strip()]

    def scontrol(self, *args: str, check: bool = True):
        return self._run("scontrol", *args, check=check)


# ------------------------------------------------------------------------------------- Snakemake's view of it
def finished_times(log: str) -> dict[str, datetime]:
    """Snakemake job id -> when the main process saw it finish ('[Sun Dec  6 16:23:10 2026]' then 'Finished')."""
    out, stamp = {}, None
    for line in log.splitlines():
        if m := re.match(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$", line.strip()):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif (m := re.match(r"^Finished jobid: (\d+)", line.strip())) and stamp:
            out[m.group(1)] = stamp
    return out


def snakemake_latencies(log: str, jobs: dict[str, dict[str, str]]) -> dict[str, float]:
    """SLURM job id -> seconds from its end (squeue's EndTime) to Snakemake noticing, for completed jobs."""
    submitted = dict(re.findall(r"Job (\S+) has been submitted with SLURM jobid (\d+)", log))
    finished = finished_times(log)
    out = {}
    for snake_id, slurm_id in submitted.items():
        job = jobs.get(slurm_id)
        if job and job["state"] == "COMPLETED" and snake_id in finished:
            out[slurm_id] = (finished[snake_id] - datetime.fromisoformat(job["end"])).total_seconds()
    # a group job is reported under its group id: its members' 'Finished' lines follow the end of the SLURM job
    for group_id, slurm_id in submitted.items():
        if not group_id.isdigit() and slurm_id in jobs and jobs[slurm_id]["state"] == "COMPLETED":
            end = datetime.fromisoformat(jobs[slurm_id]["end"])
            later = [t for t in finished.values() if t >= end]
            if later:
                out[slurm_id] = (min(later) - end).total_seconds()
    return out
