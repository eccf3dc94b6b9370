"""The GPU host's stack installs as it is: setup.py's bounds accept it, and pip resolves the install against it.

The host (issue 20): Python 3.12, torch 2.11, triton 3.6, transformers 5.17, numpy 2.2. The bounds must accept
that set and the CI pins (constraints.txt) alike. The resolution runs ``pip install --dry-run`` here (pip reads
wheel metadata only, nothing is installed; ~40 s) under this interpreter's Python, with the host's versions as
constraints; without the package registry it skips with pip's reason.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
HOST = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "numpy": "2.2.6"}
OFFLINE = (
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Could not fetch URL",
    "ConnectTimeout",
    "ProxyError",
)


def _install_requires() -> dict[str, Requirement]:
    """setup.py's install_requires, read by running setup.py with setuptools.setup swapped for a recorder."""
    import setuptools

    seen = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        code = compile((ROOT / "setup.py").read_text(), "setup.py", "exec")
        exec(code, {"__name__": "__main__", "__file__": str(ROOT / "setup.py")})  # noqa: S102 - our own setup.py
    finally:
        setuptools.setup = real
    reqs = [Requirement(r) for r in seen["install_requires"]]
    return {r.name.lower(): r for r in reqs}


def _ci_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.mark.parametrize("which", ["host", "ci"])
def test_bounds_accept_the_host_and_the_ci_set(which):
    reqs = _install_requires()
    versions = HOST if which == "host" else _ci_pins()
    for name, version in versions.items():
        if name.lower() in reqs:
            spec = reqs[name.lower()].specifier
            assert spec.contains(Version(version), prereleases=True), f"{name} {version} refused by {spec}"
    assert set(HOST) <= set(reqs), "the host's packages must each have a bound"


@pytest.mark.slow
def test_pip_resolves_the_install_against_the_host_set(tmp_path):
    constraints = tmp_path / "host.txt"
    constraints.write_text("".join(f"{k}=={v}\n" for k, v in HOST.items()))
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "--report",
        str(report),
        "-c",
        str(constraints),
        str(ROOT),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(s in log for s in OFFLINE):
        pytest.skip(f"the package registry is not reachable: {next(s for s in OFFLINE if s in log)}")
    assert proc.returncode == 0, log[-3000:]
    installs = json.loads(report.read_text())["install"]
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}
    print(next(line for line in log.splitlines() if line.startswith("Would install")))
    for name, version in HOST.items():
        assert chosen.get(name) == version, (name, chosen.get(name))
    assert "pill-train" in chosen


def test_interpreter_numpy_guard(monkeypatch):
    """Triton 3.6's interpreter with numpy >= 2.4 is refused by name; 2.2 (the host's) or a fixed Triton pass."""
    launch = pytest.importorskip("pill_kernels.launch")
    for np_version, old_interp, refused in (("2.4.6", True, True), ("2.2.6", True, False), ("2.4.6", False, False)):
        launch.check_interpreter_numpy.cache_clear()
        monkeypatch.setattr(launch.np, "__version__", np_version)
        monkeypatch.setattr(launch, "interpreter_needs_old_numpy", lambda old=old_interp: old)
        if refused:
            with pytest.raises(RuntimeError, match="needs numpy < 2.4"):
                launch.check_interpreter_numpy()
        else:
            launch.check_interpreter_numpy()
    launch.check_interpreter_numpy.cache_clear()
