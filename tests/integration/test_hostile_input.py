"""Hypothesis against a real daemon: whatever arrives on the control socket gets an answer (a
result, or an error of a type the protocol names, never "internal error"), and whatever the
config file holds, a reload answers with the problems check-config lists; the daemon lives on
with its config. Fixed examples in CI; RAMSTAGE_FUZZ_EXAMPLES=N runs N fresh ones."""

from __future__ import annotations

import json
from typing import Any

from conftest import raw_request, write_random
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import files, fuzz_settings

from ramstage.config import load_config
from ramstage.errors import ConfigError, NotRunning
from ramstage.protocol import COMMANDS

ERROR_TYPES = {"BadRequest", "NotFound", "Failed", "ConfigError", "PermissionDenied", "Busy"}

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
names = st.one_of(st.lists(st.sampled_from(["m", "n", "", "../m"]) | json_value), json_value)


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """usual nine times in ten (one_of would pick odd's many simple forms as often)."""
    return st.integers(0, 9).flatmap(lambda i: usual if i else odd)


arguments = {
    "names": names,
    "name": st.one_of(st.sampled_from(["m", "n"]), json_value),
    "all": json_value,
    "wait": json_value,
}
# Mostly well-formed requests with odd arguments, so that most reach the commands.
message = st.fixed_dictionaries(
    {
        "v": mostly(st.just(1), json_value),
        "cmd": mostly(st.sampled_from(COMMANDS), json_value),
    },
    optional=arguments,
).map(lambda m: json.dumps(m).encode())
loose = st.fixed_dictionaries({}, optional={"v": json_value, "cmd": json_value, **arguments}).map(
    lambda m: json.dumps(m).encode()
)
payload = st.one_of(
    message,
    message,
    message,
    loose,
    st.binary(max_size=200),
    # What json.loads refuses past its own limits: deep nesting, integers of 5000 digits.
    st.integers(1, 30_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 30_000).map(lambda depth: b'{"v":' * depth),
    st.just(b'{"v": 1, "cmd": "status", "name": ' + b"9" * 5000 + b"}"),
    st.just(b'{"v": 1e999, "cmd": NaN}'),
)


def test_any_request_gets_a_protocol_answer_and_the_daemon_lives_on(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 64 << 10)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    seen: dict[str, int] = {}

    @fuzz_settings(600)
    @given(payload, st.booleans())
    def requests(data: bytes, newline: bool) -> None:
        request = data + b"\n" * newline
        assume(request)  # a client that closes having sent nothing asked nothing: no answer
        reply = raw_request(daemon.socket, request, timeout=30)
        if reply.get("ok") is True:
            key = "ok"
        else:
            assert reply.get("ok") is False and set(reply) == {"ok", "error"}, reply
            key = reply["error"]["type"]
            assert key in ERROR_TYPES, reply
            assert "internal error" not in reply["error"]["message"], reply
        seen[key] = seen.get(key, 0) + 1
        assert daemon.process.poll() is None, daemon.log()

    requests()
    print(f"answers by type: {seen}")
    assert seen.get("ok") and seen.get("BadRequest")
    assert daemon.request("status")["models"][0]["name"] == "m"
    assert "Traceback" not in daemon.log(), daemon.log()


def test_any_config_file_at_reload_is_answered_with_its_problems(tmp_path, make_daemon):
    source = write_random(tmp_path / "m.ckpt", 64 << 10)
    daemon = make_daemon([{"name": "m", "source": str(source)}]).start()
    daemon.wait_state("m", "staged")
    good = daemon.config_path.read_bytes()

    @fuzz_settings(300)
    @given(files)
    def reloads(content: bytes) -> None:
        daemon.config_path.write_bytes(content)
        try:
            load_config(daemon.config_path)
        except ConfigError as error:
            problems = error.problems
        else:
            assume(False)  # a valid file would replace the config under test
        try:
            daemon.request("reload", timeout=30)
        except ConfigError as refused:
            assert refused.problems == problems
        except NotRunning:
            raise AssertionError(daemon.log()) from None
        assert daemon.process.poll() is None, daemon.log()

    try:
        reloads()
    finally:
        daemon.config_path.write_bytes(good)
    # The running config was kept all along, and the CLI says so with exit 2.
    assert daemon.model("m")["state"] == "staged"
    daemon.config["models"][0]["validate"] = True
    daemon.write_config()
    result = daemon.cli("reload")
    assert result.returncode == 2, result.stderr
    assert "models[0].validate: expected one of format, torch, none" in result.stderr
    assert "Traceback" not in daemon.log()
