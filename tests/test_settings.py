"""Settings that cannot work stop the process at start with one line naming them (exit
2); the values that do work keep starting it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from settings import ConfigError, load_settings
from tests.harness import ROOT


def _migrate(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, str(ROOT / "supervisor.py"), "migrate"],
                          env=full, capture_output=True, text=True, timeout=60, cwd=cwd)


def _refused(done: subprocess.CompletedProcess[str], setting: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"herald: configuration error: {setting}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("value", [
    "herald \u2039n\u00f6reply@example.com>",  # a lookalike bracket: all of it is the address
    "herald <n\u00f6reply@example.com>",
    "noreply@ex\u00e4mple.com",
])
def test_an_email_from_whose_address_is_not_ascii_stops_with_one_line(
    tmp_path: Path, value: str,
) -> None:
    line = _refused(_migrate({"EMAIL_FROM": value}, tmp_path), "EMAIL_FROM")
    assert "ASCII" in line


def test_an_email_from_with_a_non_ascii_display_name_is_accepted_and_renders(
    tmp_path: Path,
) -> None:
    from email.utils import formataddr, parseaddr

    value = "H\u00e9rald Benachrichtigungen <noreply@example.com>"
    settings = load_settings({"EMAIL_FROM": value})
    assert value == settings.EMAIL_FROM
    assert formataddr(parseaddr(value)).startswith("=?utf-8?")  # RFC 2047
    done = _migrate({"EMAIL_FROM": value}, tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("keys", ["cl\u00e9", "good-key,cl\u00e9", "tab\tbed", "\u20ac"])
def test_api_keys_that_no_header_can_carry_stop_with_one_line(
    tmp_path: Path, keys: str,
) -> None:
    line = _refused(_migrate({"HERALD_API_KEYS": keys}, tmp_path), "HERALD_API_KEYS")
    assert "printable ASCII" in line
    secret = keys.split(",")[-1]
    assert secret not in line  # a key is never printed


def test_printable_ascii_api_keys_are_accepted_as_before() -> None:
    keys = "k1-._~+/=, second key!\n"
    assert load_settings({"HERALD_API_KEYS": keys}).api_keys == ["k1-._~+/=", "second key!"]


@pytest.mark.parametrize(("url", "says"), [
    ("sqlite:////nonexistent/dir/h.db", "directory /nonexistent/dir does not exist"),
    ("sqlite:///missing/h.db", "directory missing does not exist"),
])
def test_a_sqlite_file_in_a_directory_that_does_not_exist_is_a_configuration_error(
    tmp_path: Path, url: str, says: str,
) -> None:
    line = _refused(_migrate({"DATABASE_URL": url}, tmp_path), "DATABASE_URL")
    assert says in line


def test_a_sqlite_file_under_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_settings({"DATABASE_URL": f"sqlite:///{tmp_path / 'plain' / 'h.db'}"})


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite:///h.db",
                                 "sqlite:///data/h.db", "sqlite:///./h.db"])
def test_sqlite_in_memory_and_relative_paths_keep_working(tmp_path: Path, url: str) -> None:
    (tmp_path / "data").mkdir()
    done = _migrate({"DATABASE_URL": url}, tmp_path)
    assert done.returncode == 0, done.stderr
    if url != "sqlite:///:memory:":
        assert (tmp_path / url[len("sqlite:///"):]).is_file()
