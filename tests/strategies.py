"""Hypothesis strategies for hostile input: config values and files, and the settings that fix
them in CI (derandomize, bounded) or let RAMSTAGE_FUZZ_EXAMPLES=N run long with fresh examples."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ramstage.config import TOP_KEYS
from ramstage.converters import key_name
from ramstage.errors import ConfigError

LONG_RUN = int(os.environ.get("RAMSTAGE_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=LONG_RUN or examples,
        derandomize=not LONG_RUN,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- values: what a YAML file can give, and what looks nearly right ---------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=8),
    st.dates(),
)
keys = st.one_of(
    st.sampled_from(
        [*TOP_KEYS, "name", "source", "priority", "digest", "validate", "path", "size", "mount"]
        + ["huge", "min_available", "resume_available", "psi", "cooldown", "settle", "rescan"]
        + ["workers", "users", "groups", "hf", "revision"]
    ),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.dates(),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=4,
)
number = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1.5", "0", "9" * 400, "1e400", "nan", "inf", "-1", " 2 "]),
)
size = st.one_of(
    st.builds(lambda n, unit: n + unit, number, st.sampled_from(["", "K", "M", "G", "T", "iB"])),
    st.builds(lambda n, unit: n + unit, number, st.sampled_from(["GiB", "MB", "b", "%", "X"])),
    junk,
)
duration_text = st.builds(
    lambda n, unit: n + unit, number, st.sampled_from(["", "ms", "s", "m", "h", "d"])
)
duration = st.one_of(duration_text, st.floats(), st.integers(), junk)
path = st.one_of(st.sampled_from(["/run/x", "/", "rel", "", "/a/../b", "/nul\0"]), junk)
word = st.one_of(st.sampled_from(["format", "torch", "none", "xxh3", "sha256", "links"]), junk)
psi = st.one_of(
    st.builds(
        lambda kind, stall, window: f"{kind} {stall} {window}",
        st.sampled_from(["some", "full", "most"]),
        duration_text,
        duration_text,
    ),
    junk,
)
digest = st.one_of(
    st.builds(
        lambda algorithm, digits: f"{algorithm}:{digits}",
        st.sampled_from(["sha256", "xxh3", "blake3", "md5"]),
        st.text(alphabet="0123456789abcdefABCDEF", min_size=30, max_size=66),
    ),
    junk,
)
ids = st.one_of(st.lists(st.one_of(st.sampled_from(["root", "nobody", "x\0"]), junk)), junk)
trust = st.one_of(st.fixed_dictionaries({}, optional={"users": ids, "groups": ids}), junk)


def section(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A mapping with any of these keys, now and then an unknown one, or something else."""
    mapping = st.fixed_dictionaries({}, optional=fields)
    with_unknown = st.builds(lambda m, k, v: {**m, k: v}, mapping, keys, junk)
    return st.one_of(mapping, mapping, with_unknown, junk)


model = section(
    name=st.one_of(st.sampled_from(["m", "m", "n", ".", "../x", "a" * 65]), junk),
    source=path,
    priority=st.one_of(st.integers(), junk),
    digest=digest,
    validate=word,
    trust=trust,
    hf=st.one_of(st.sampled_from(["org/name", "org", "../x/y", "a/b/c"]), junk),
    revision=st.one_of(st.sampled_from(["main", "0" * 40, "../x", ""]), junk),
    hf_cache=path,
)
config = section(
    store=section(path=path, size=size, mount=st.one_of(st.booleans(), junk), huge=word),
    links_dir=path,
    socket=path,
    checksum=word,
    ready=word,
    memory=section(min_available=size, resume_available=size, psi=psi, cooldown=duration),
    watch=section(settle=duration, rescan=duration),
    staging=section(workers=st.one_of(st.integers(), junk)),
    trust=trust,
    hf_cache=path,
    models=st.one_of(st.lists(model, max_size=3), junk),
)


def assert_names_where(error: ConfigError, data: Any, file: Path | None = None) -> None:
    """Every problem is one short line that starts with the file, or a key path whose first
    part is a key of the file's top level (as written, if unknown)."""
    assert error.problems
    roots = ["(top level)", *TOP_KEYS]
    if isinstance(data, dict):
        roots += [key_name(key) for key in data]
    if file is not None:
        roots.append(str(file))
    for problem in error.problems:
        assert len(problem) < 1000 and "\n" not in problem, problem
        assert any(problem.startswith(root) and problem[len(root)] in ":.[" for root in roots), (
            problem
        )


def damage(text: str, how: int, at: int, insert: str) -> bytes:
    raw = text.encode()
    at = at % (len(raw) + 1)
    if how == 0:
        return raw
    if how == 1:
        return raw[:at]
    if how == 2:
        return raw[:at] + insert.encode() + raw[at:]
    return raw[:at] + b"\xff" + raw[at + 1 :]


dumped = st.builds(
    damage,
    config.map(lambda data: yaml.safe_dump(data, allow_unicode=True)),
    st.integers(0, 3),
    st.integers(0, 1 << 16),
    st.sampled_from(
        ["{", "[", "]", ":", ": ", "\n  ", "- ", "&a ", "*a", "!!", "'", '"', "\t", "#"]
    ),
)
syntax = st.text(
    alphabet=string.ascii_letters[:6] + "0123456789{}[]:,-&*!|>'\"#%@?\n \t.", max_size=80
)
files = st.one_of(dumped, dumped, syntax.map(str.encode), st.binary(max_size=80))
