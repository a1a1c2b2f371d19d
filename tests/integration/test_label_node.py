"""`ramstage label-node` against a real daemon and a recorded-API fake of the Kubernetes API
server, reached through a kubeconfig as the official client reads it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import yaml
from conftest import wait_for, write_random
from kubeapi import FakeApiServer

NODE = "gpu-node-1"


def ours(fake: FakeApiServer) -> dict[str, str]:
    return {k: v for k, v in fake.labels(NODE).items() if k.startswith("ramstage.io/")}


def test_labels_follow_the_models_and_are_removed_on_stop(tmp_path, make_daemon):
    small = write_random(tmp_path / "ssd" / "small.bin", 1 << 20)
    big = write_random(tmp_path / "ssd" / "big.bin", 1 << 20, seed=1)
    models = [
        {"name": "small", "source": str(small)},
        {"name": "big", "source": str(big)},  # evicted: fallback
        {"name": "gone", "source": str(tmp_path / "ssd" / "gone.bin")},  # missing
    ]
    daemon = make_daemon(models).start()
    daemon.wait_state("small", "staged")
    daemon.wait_state("big", "staged")
    daemon.cli("evict", "big", check=True)
    with FakeApiServer() as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": fake.url}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "NODE_NAME": NODE}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        command = [sys.executable, "-m", "ramstage", "label-node", "--config"]
        labeler = subprocess.Popen(
            [*command, str(daemon.config_path), "--interval", "0.1"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            expected = {
                "ramstage.io/small": "staged",
                "ramstage.io/big": "fallback",
                "ramstage.io/gone": "missing",
            }
            wait_for(lambda: ours(fake) == expected, context=lambda: str(ours(fake)))
            assert "ramstage.io/retired" not in fake.labels(NODE)  # a former config's

            daemon.config["models"] = models[:2]
            daemon.write_config()
            daemon.cli("reload", check=True)
            expected.pop("ramstage.io/gone")
            wait_for(lambda: ours(fake) == expected, context=lambda: str(ours(fake)))
            assert fake.labels(NODE)["kubernetes.io/hostname"] == NODE
        finally:
            labeler.send_signal(signal.SIGTERM)
            _, stderr = labeler.communicate(timeout=30)
        assert labeler.returncode == 0, stderr
        assert ours(fake) == {}
        assert {r.content_type for r in fake.patches()} == {"application/merge-patch+json"}


def test_without_a_node_name_it_says_how_to_give_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    result = subprocess.run(
        [sys.executable, "-m", "ramstage", "label-node", "--config", str(tmp_path / "none.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--node NAME, or NODE_NAME from the downward API" in result.stderr
