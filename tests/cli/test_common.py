"""The error wrapper every command runs under, and the small pure helpers of the CLI."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from loftcli import check_clean_error, loft, loft_process, ok
from typer.testing import CliRunner

from loftfs import __version__
from loftfs.cli import mount as mount_cli
from loftfs.cli.common import LoftGroup, one_line, redact_url
from loftfs.cli.format import validate_block_size, validate_name
from loftfs.cli.mount import build_options, child_args, mountpoint_slug, size_text
from loftfs.errors import ConfigError, NotFormatted
from loftfs.utils import parse_size


def _toy_app() -> typer.Typer:
    """A two-command app under the same group class as ``loft``."""
    toy = typer.Typer(cls=LoftGroup, pretty_exceptions_enable=False)

    @toy.command()
    def boom(kind: str) -> None:
        if kind == "loft":
            raise NotFormatted("no volume here\n(second line)")
        if kind == "os":
            raise FileNotFoundError(2, "No such file or directory", "/x/y")
        raise ValueError("something odd")

    @toy.command()
    def fine() -> None:
        typer.echo("fine")

    return toy


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("loft", "loft: error: no volume here (second line)"),
        ("os", "loft: error: No such file or directory: /x/y"),
    ],
)
def test_wrapper_prints_one_line(kind: str, expected: str) -> None:
    result = CliRunner().invoke(_toy_app(), ["boom", kind])
    assert result.exit_code == 1
    assert result.stderr == expected + "\n"


def test_wrapper_hides_tracebacks_of_unexpected_errors() -> None:
    result = CliRunner().invoke(_toy_app(), ["boom", "bug"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "unexpected ValueError: something odd" in result.stderr
    assert "LOFT_DEBUG=1" in result.stderr
    assert "Traceback" not in result.stderr
    debug = CliRunner().invoke(_toy_app(), ["boom", "bug"], env={"LOFT_DEBUG": "1"})
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("loft: error: unexpected ValueError")


def test_verbose_flag_shows_tracebacks(tmp_path: object) -> None:
    run = loft_process("--verbose", "status", "nope://x")
    assert run.code == 1
    assert "Traceback" in run.stderr
    assert run.stderr.rstrip().splitlines()[-1].startswith("loft: error: ")


def test_version() -> None:
    assert __version__ in ok(loft("--version")).stdout
    assert __version__ in ok(loft("version")).stdout
    assert __version__ in ok(loft_process("--version")).stdout


def test_help_and_unknown_command() -> None:
    run = ok(loft("--help"))
    for command in ("format", "mount", "umount", "status", "info", "config", "destroy", "gc"):
        assert command in run.stdout
    assert "No such command" in check_clean_error(loft("fromat"), code=2)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:s3cret@host:6379/1", "redis://user:****@host:6379/1"),
        (
            "postgres://u:p%40ss@db/loft?sslmode=require",
            "postgres://u:****@db/loft?sslmode=require",
        ),
        ("sqlite3:///var/lib/loftfs/v.db", "sqlite3:///var/lib/loftfs/v.db"),
        (
            "s3://bucket/prefix?secret_key=abc&region=x",
            "s3://bucket/prefix?secret_key=****&region=x",
        ),
        ("redis://host:6379/1", "redis://host:6379/1"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@given(st.text(alphabet=string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=40))
def test_redacted_urls_never_show_the_password(password: str) -> None:
    redacted = redact_url(f"redis://admin:{password}@10.0.0.1:6379/2")
    assert f":{password}@" not in redacted or password == "****"
    assert redacted.endswith("@10.0.0.1:6379/2")


@given(st.text(alphabet=string.ascii_lowercase + string.digits + "-_A.", max_size=70))
def test_volume_names(name: str) -> None:
    valid = (
        3 <= len(name) <= 63
        and all(c in string.ascii_lowercase + string.digits + "-" for c in name)
        and name[0] != "-"
        and name[-1] != "-"
    )
    if valid:
        assert validate_name(name) == name
    else:
        with pytest.raises(ConfigError):
            validate_name(name)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_size_text_round_trips(n: int) -> None:
    assert parse_size(size_text(n)) == n


@given(st.integers(min_value=10, max_value=30))
def test_block_sizes(shift: int) -> None:
    size = 1 << shift
    if 16 <= shift <= 26:
        assert validate_block_size(size_text(size)) == size
        with pytest.raises(ConfigError):
            validate_block_size(str(size + 4096))
    else:
        with pytest.raises(ConfigError):
            validate_block_size(size_text(size))


def test_one_line() -> None:
    assert one_line("a\n  b\tc\n") == "a b c"


def test_mountpoint_slug() -> None:
    assert mountpoint_slug("/mnt/loft/demo") == "mnt-loft-demo"
    assert mountpoint_slug("/mnt/loft/demo/") == "mnt-loft-demo"
    assert mountpoint_slug("/") == "root"


def test_default_log_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount_cli, "SYSTEM_LOG_DIR", str(tmp_path / "log"))
    assert mount_cli.default_log_path("/mnt/loft/a") == str(tmp_path / "log" / "mnt-loft-a.log")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(mount_cli, "SYSTEM_LOG_DIR", str(blocker / "log"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mount_cli.default_log_path("/mnt/loft/a") == str(
        tmp_path / "home" / ".loftfs" / "log" / "mnt-loft-a.log"
    )


def _options(**over: object) -> dict:
    base: dict = {
        "buffer_size": "300M",
        "upload_threads": 16,
        "fetch_threads": 16,
        "readahead_blocks": 4,
        "attr_timeout": 1.0,
        "entry_timeout": 1.0,
        "dir_entry_timeout": 1.0,
        "enable_xattr": True,
        "read_only": False,
        "heartbeat": 12.0,
        "gc_interval": 30.0,
        "fuse_options": [],
    }
    base.update(over)
    return base


def test_mount_options() -> None:
    opts = build_options(**_options(fuse_options=["allow_other,ro", "default_permissions"]))
    assert opts.buffer_size == 300 << 20
    assert opts.read_only is True
    assert opts.fuse_options == ["allow_other", "ro", "default_permissions"]
    assert build_options(**_options(enable_xattr=False)).enable_xattr is False


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"buffer_size": "10K"}, "--buffer-size"),
        ({"buffer_size": "huge"}, "invalid size"),
        ({"upload_threads": 0}, "--upload-threads"),
        ({"attr_timeout": -1.0}, "--attr-timeout"),
        ({"heartbeat": 0.0}, "--heartbeat"),
    ],
)
def test_bad_mount_options(over: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_options(**_options(**over))


def test_background_child_gets_every_option() -> None:
    """The child re-parses what the parent validated: same options on both sides."""
    opts = build_options(
        **_options(
            buffer_size="64M",
            upload_threads=3,
            attr_timeout=2.5,
            enable_xattr=True,
            read_only=True,
            fuse_options=["allow_other"],
        )
    )
    args = child_args("sqlite3:///x.db", "relative/mnt", opts, 7)
    assert args[1:3] == ["-m", "loftfs.cli.main"]
    assert args[3:5] == ["mount", "sqlite3:///x.db"]
    assert args[5].startswith("/") and args[5].endswith("relative/mnt")
    for pair in (["--buffer-size", str(64 << 20)], ["--upload-threads", "3"], ["--ready-fd", "7"]):
        i = args.index(pair[0])
        assert args[i + 1] == pair[1]
    assert "--enable-xattr" in args and "--read-only" in args
    assert args[args.index("-o") + 1] == "allow_other"
    assert "-d" not in args and "--background" not in args
