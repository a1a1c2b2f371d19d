"""Mount propagation as Kubernetes sets it up, emulated with real mount namespaces
(propagation_scenario.py): the store a privileged agent mounts under a Bidirectional
/run/ramstage reaches a consumer that mounted it HostToContainer (rslave) before the store
existed, and does not reach one mounted with no propagation (rprivate)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_random

SCENARIO = Path(__file__).with_name("propagation_scenario.py")


@pytest.mark.root
def test_only_a_hosttocontainer_consumer_sees_a_store_mounted_after_it_started(tmp_path):
    source = write_random(tmp_path / "ssd" / "m.bin", 4 << 20)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(SCENARIO)]
        + [str(tmp_path / "ns"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SCENARIO.parent)},
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    # Relative: the consumers' views are at other paths than the agent's.
    assert seen["link"].startswith("../store/m/")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    # The socket answers through a read-only mount in both; only rslave has the store.
    assert seen["rslave"]["sha256"] == digest and seen["rslave"]["state"] == "staged"
    assert seen["rprivate"] == {"error": "No such file or directory", "state": "staged"}
    # Nothing leaked into this namespace: the outer one was private.
    assert "ns/host" not in Path("/proc/self/mountinfo").read_text()
