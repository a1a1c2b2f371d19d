"""The node labeler: which label for which state, the merge patches it sends, and its requests
through the official client to a recorded-API fake, checked against the API's shapes."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import kubernetes_validate
import pytest
from conftest import wait_for
from kubeapi import FakeApiServer
from kubernetes import client

from ramstage.converters import NAME_RE
from ramstage.nodelabels import (
    MERGE_PATCH,
    KubernetesNodes,
    Labeler,
    label_key,
    merge_patch,
    ours,
    wanted,
)

# k8s.io/apimachinery/pkg/util/validation: a qualified name is an optional DNS-1123 subdomain
# prefix and `/`, then a name part; a label value is empty or a name part.
NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = re.compile(rf"^({SUBDOMAIN}/)?{NAME_PART}$")
LABEL_VALUE = re.compile(rf"^({NAME_PART})?$")
NODE = "gpu-node-1"


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("lama", "ramstage.io/lama"),
        ("sd-1.5_fp16", "ramstage.io/sd-1.5_fp16"),
        ("x" * 63, "ramstage.io/" + "x" * 63),
        # Not label names: cut, stripped, and told apart by 8 hex digits of their SHA-256.
        ("x" * 64, "ramstage.io/" + "x" * 53 + "-########"),
        ("lama-", "ramstage.io/lama-########"),
        ("lama.", "ramstage.io/lama-########"),
        ("a" * 52 + "._x" + "y" * 9, "ramstage.io/" + "a" * 52 + "-########"),
    ],
)
def test_label_keys(model, key):
    got = label_key(model)
    assert re.fullmatch(re.escape(key).replace("\\#", "#").replace("#", "[0-9a-f]"), got), got
    assert LABEL_KEY.match(got) and len(got.split("/")[1]) <= 63


def test_every_model_name_gets_a_valid_key_of_its_own():
    names = ["a", "A9", "a" * 64, "a" * 63 + "_", "a.", "a-", "a_", "a._-", "a--", "a-b"]
    names += [f"m{i}" + "." * (i % 3) for i in range(200)]
    assert all(NAME_RE.match(name) for name in names)
    keys = [label_key(name) for name in names]
    assert all(LABEL_KEY.match(key) and len(key.split("/")[1]) <= 63 for key in keys), keys
    assert len(set(keys)) == len(names)


@pytest.mark.parametrize(
    ("state", "value"),
    [
        ("staged", "staged"),
        ("pending", "fallback"),
        ("staging", "fallback"),
        ("fallback", "fallback"),
        ("missing", "missing"),
    ],
)
def test_each_state_has_its_label(state, value):
    assert wanted({"models": [{"name": "m", "state": state}]}) == {"ramstage.io/m": value}
    assert LABEL_VALUE.match(value)


def test_no_daemon_means_no_labels():
    assert wanted(None) == {}


@pytest.mark.parametrize(
    ("current", "labels", "patch"),
    [
        ({}, {}, None),
        ({"ramstage.io/a": "staged"}, {"ramstage.io/a": "staged"}, None),
        ({}, {"ramstage.io/a": "fallback"}, {"ramstage.io/a": "fallback"}),
        ({"ramstage.io/a": "fallback"}, {"ramstage.io/a": "staged"}, {"ramstage.io/a": "staged"}),
        (
            {"ramstage.io/a": "staged", "ramstage.io/b": "missing"},
            {},
            {"ramstage.io/a": None, "ramstage.io/b": None},
        ),
        (
            {"ramstage.io/gone": "staged", "ramstage.io/a": "staged"},
            {"ramstage.io/a": "staged", "ramstage.io/new": "missing"},
            {"ramstage.io/gone": None, "ramstage.io/new": "missing"},
        ),
    ],
)
def test_merge_patches_carry_only_the_changes(current, labels, patch):
    body = merge_patch(current, labels)
    assert body == (None if patch is None else {"metadata": {"labels": patch}})


def test_only_our_prefix_is_ours():
    assert ours({"kubernetes.io/hostname": "n", "ramstage.io/a": "staged"}) == {
        "ramstage.io/a": "staged"
    }
    assert ours(None) == {}


@pytest.fixture
def api():
    with FakeApiServer() as fake:
        configuration = client.Configuration(host=fake.url)
        yield fake, KubernetesNodes(client.ApiClient(configuration))


def check_request_shapes(fake: FakeApiServer) -> None:
    """Every request is a GET or a JSON merge patch of the Node's labels, with valid keys and
    values or null, and the Node it leaves is a valid v1 Node of Kubernetes 1.30."""
    for recorded in fake.requests:
        assert recorded.path == f"/api/v1/nodes/{NODE}"
        if recorded.method == "GET":
            continue
        assert (recorded.method, recorded.content_type) == ("PATCH", MERGE_PATCH)
        assert list(recorded.body) == ["metadata"] and list(recorded.body["metadata"]) == ["labels"]
        for key, value in recorded.body["metadata"]["labels"].items():
            assert LABEL_KEY.match(key) and key.startswith("ramstage.io/")
            assert value is None or LABEL_VALUE.match(value)
    kubernetes_validate.validate(fake.nodes[NODE], "1.30.0", strict=True)


def test_the_labeler_sets_changes_and_removes_its_labels_and_no_others(api, tmp_path):
    fake, nodes = api
    labeler = Labeler(nodes, NODE, tmp_path / "no.sock")
    others = {k: v for k, v in fake.labels(NODE).items() if not k.startswith("ramstage.io/")}

    labeler.sync({"ramstage.io/a": "fallback", "ramstage.io/b": "missing"})
    assert fake.labels(NODE) == {**others, "ramstage.io/a": "fallback", "ramstage.io/b": "missing"}
    # The stale label a former config left (ramstage.io/retired) went in the same patch.
    assert fake.patches()[0].body["metadata"]["labels"]["ramstage.io/retired"] is None

    labeler.sync({"ramstage.io/a": "staged", "ramstage.io/b": "missing"})
    assert fake.patches()[-1].body == {"metadata": {"labels": {"ramstage.io/a": "staged"}}}
    requests = len(fake.requests)
    labeler.sync({"ramstage.io/a": "staged", "ramstage.io/b": "missing"})
    assert len(fake.requests) == requests  # nothing changed, nothing sent

    labeler.sync({})
    assert fake.labels(NODE) == others
    assert [r.method for r in fake.requests] == ["GET", "PATCH", "PATCH", "PATCH"]
    check_request_shapes(fake)


def test_without_a_daemon_the_labeler_removes_its_labels_and_again_when_stopped(api, tmp_path):
    fake, nodes = api
    stop = threading.Event()
    labeler = Labeler(nodes, NODE, tmp_path / "no.sock")
    thread = threading.Thread(target=labeler.run, args=(stop, 0.05))
    thread.start()
    try:
        wait_for(lambda: fake.patches())
    finally:
        stop.set()
        thread.join(10)
    assert not any(k.startswith("ramstage.io/") for k in fake.labels(NODE))
    assert len(fake.patches()) == 1  # the stop found nothing left to remove
    check_request_shapes(fake)


def test_an_api_error_is_retried_after_reading_the_node_again(api, tmp_path, caplog):
    fake, nodes = api
    labeler = Labeler(nodes, NODE, tmp_path / "no.sock")
    labeler.sync({"ramstage.io/a": "staged"})
    fake.fail_next = 1
    with pytest.raises(client.ApiException):
        labeler.sync({"ramstage.io/a": "fallback"})
    labeler.sync({"ramstage.io/a": "fallback"})
    assert [r.method for r in fake.requests] == ["GET", "PATCH", "PATCH", "GET", "PATCH"]
    assert fake.labels(NODE)["ramstage.io/a"] == "fallback"
    check_request_shapes(fake)


def test_an_unknown_node_is_an_error_that_names_it(api, tmp_path):
    _, nodes = api
    with pytest.raises(client.ApiException, match="not found"):
        Labeler(nodes, "no-such-node", tmp_path / "no.sock").sync({})


def test_the_daemon_and_the_cli_never_import_the_kubernetes_client():
    code = (
        "import sys, ramstage.cli, ramstage.daemon, ramstage.nodelabels\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
