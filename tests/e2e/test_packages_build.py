"""The packages build with the distribution tools and pass their checkers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.e2e


def test_lintian_finds_no_errors_or_warnings_in_the_deb(deb: Path) -> None:
    result = subprocess.run(["lintian", "--no-tag-display-limit", str(deb)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    problems = [line for line in result.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert not problems, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


# Generated at build time from the parser and the config schema (scripts/build_docs.py).
GENERATED = (
    "/usr/share/man/man8/ramstage.8",
    "/usr/share/man/man5/ramstage.yaml.5",
    "/usr/share/bash-completion/completions/ramstage",
    "/ramstage",  # zsh: vendor-completions (Debian) or site-functions (RPM)
    "/usr/share/ramstage/config.schema.json",
    "/design.md",
    "/examples/ramstage-dashboard.json",
    "/examples/ramstage-alerts.yml",
)


def test_the_deb_holds_man_pages_completion_schema_and_docs(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    files = [line.split()[-1].lstrip(".") for line in listing.splitlines()]
    for path in GENERATED:
        assert any(f.startswith(path) or f.endswith((path, path + ".gz")) for f in files), path
    assert "/usr/share/zsh/vendor-completions/_ramstage" in files
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "python3-prometheus-client" in fields


def test_the_deb_holds_the_gpu_loader_subpackage(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    for module in ("__init__", "formats", "pipeline", "shard"):
        assert f"/ramstage/fastload/{module}.py" in listing


def test_rpmbuild_builds_the_rpm_with_the_unit_and_its_scriptlets(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO / "packaging" / "build-rpm.sh"), str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    (rpm,) = tmp_path.glob("ramstage-0.1.0-*.noarch.rpm")

    def query(*options: str) -> str:
        return subprocess.run(["rpm", "-qp", *options, str(rpm)],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    files = query("-l").split()
    for path in (
        "/usr/bin/ramstage",
        "/usr/lib/systemd/system/ramstage.service",
        "/usr/lib/sysusers.d/ramstage.conf",
        "/usr/lib/tmpfiles.d/ramstage.conf",
    ):
        assert path in files
    assert any(path.endswith("/ramstage/fastload/pipeline.py") for path in files)
    for path in GENERATED:
        assert any(f.startswith(path) or f.endswith(path) for f in files), path
    assert "python3-prometheus_client" in query("--requires")
    assert query("-c").split() == ["/etc/ramstage/ramstage.yaml"]
    scripts = query("--scripts")
    assert "preset ramstage.service" in scripts
    assert "ramstage.service" in scripts.split("preuninstall scriptlet")[1]
    assert "systemd-sysusers" in scripts and "g ramstage" in scripts
