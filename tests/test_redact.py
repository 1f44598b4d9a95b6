"""Secret-looking values kept out of a crash's stored metadata (:mod:`corevault.redact`)."""

from __future__ import annotations

import copy

import pytest

from corevault import redact
from corevault.redact import REDACTED


@pytest.mark.parametrize(
    "name",
    ["DB_PASSWORD", "db_passwd", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "API_KEY", "apikey", "KEY",
     "ssh-private-key", "SENTRY_DSN", "BASIC_AUTH", "session_id", "COOKIE", "key_file", "SIGNING_CERT"],
)  # fmt: skip
def test_secret_looking_names(name: str) -> None:
    assert redact.secret_name(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "LANG", "MONKEY", "HOSTNAME", "KEYBOARD", "PWD"])
def test_ordinary_names(name: str) -> None:
    assert not redact.secret_name(name)


def test_environment_values_of_secret_names_and_passwords_in_urls_are_replaced() -> None:
    env = {
        "DB_PASSWORD": "hunter2",
        "PATH": "/bin:/app",
        "DATABASE_URL": "postgresql://app:s3cr3t@db:5432/app?sslmode=require",
        "MIRROR": "https://anonymous@mirror.example/debian",
        "ODD": "p@ss://word",
    }
    assert redact.environ(env) == {
        "DB_PASSWORD": REDACTED,
        "PATH": "/bin:/app",
        "DATABASE_URL": f"postgresql://app:{REDACTED}@db:5432/app?sslmode=require",
        "MIRROR": "https://anonymous@mirror.example/debian",  # a user without a password stays
        "ODD": "p@ss://word",
    }


def test_a_password_holding_at_signs_and_colons_is_hidden_whole() -> None:
    url = "redis://user:p@ss:w@rd@cache:6379/0"
    assert redact.environ({"REDIS": url}) == {"REDIS": f"redis://user:{REDACTED}@cache:6379/0"}
    assert "p@ss" not in redact.cmdline([url])[0] and "w@rd" not in redact.cmdline([url])[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["app", "--password=hunter2", "-v"], ["app", f"--password={REDACTED}", "-v"]),
        (["app", "--token", "abc", "--port", "80"], ["app", "--token", REDACTED, "--port", "80"]),
        (["app", "-api-key", "abc"], ["app", "-api-key", REDACTED]),
        (["app", "--db-password"], ["app", "--db-password"]),  # nothing follows: nothing to hide
        (["app", "password", "hunter2"], ["app", "password", "hunter2"]),  # not an option
        (["app", "--url=mysql://u:pw@h/db"], ["app", f"--url=mysql://u:{REDACTED}@h/db"]),
        (["app", "mysql://u:pw@h/db"], ["app", f"mysql://u:{REDACTED}@h/db"]),
        ([], []),
    ],
)  # fmt: skip
def test_command_line(args: list[str], expected: list[str]) -> None:
    assert redact.cmdline(args) == expected


def test_meta_redacts_the_process_and_leaves_the_input_alone() -> None:
    doc = {
        "id": "x",
        "process": {"environ": {"TOKEN": "t"}, "cmdline": ["app", "--secret", "s"], "exe": "/app"},
    }
    before = copy.deepcopy(doc)
    out = redact.meta(doc)
    assert out["process"] == {
        "environ": {"TOKEN": REDACTED},
        "cmdline": ["app", "--secret", REDACTED],
        "exe": "/app",
    }
    assert doc == before and out["id"] == "x"


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"process": None},
        {"process": "not a dict"},
        {"process": {"environ": ["TOKEN=t"], "cmdline": "app --token t"}},  # wrong shapes: kept, not parsed
    ],
)
def test_meta_of_odd_shapes_is_returned_as_it_is(doc: dict) -> None:
    assert redact.meta(doc) == doc
