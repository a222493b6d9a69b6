"""The error wrapper every command runs under, and the small pure helpers of the CLI."""

from __future__ import annotations

import string
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from loftcli import check_clean_error, loft, loft_process, ok
from typer.testing import CliRunner

from loftfs import __version__
from loftfs.cli import mount as mount_cli
from loftfs.cli.child import child_args, launch_document, parse_launch
from loftfs.cli.common import LoftGroup, one_line, redact_url
from loftfs.cli.format import validate_block_size, validate_name
from loftfs.cli.mount import build_options, mountpoint_slug, size_text
from loftfs.errors import ConfigError, NotFormatted
from loftfs.object.encrypt import VolumeSecret
from loftfs.plane.mountspec import ControlSpec
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
    """The child gets what the parent validated, through the launch pipe: same options on
    both sides, the secret or the control-plane spec included, none of it on its command
    line."""
    opts = build_options(
        **_options(
            buffer_size="64M",
            upload_threads=3,
            attr_timeout=2.5,
            enable_xattr=True,
            read_only=True,
            fuse_options=["allow_other"],
            writeback=False,
            metrics="127.0.0.1:0",
        )
    )
    opts.max_fuse_tasks = 7  # not a flag: travels all the same
    args = child_args("sqlite3:///x.db", "relative/mnt", 7, 9)
    assert args[1:4] == ["-m", "loftfs.cli.child", "sqlite3:///x.db"]
    assert args[4].startswith("/") and args[4].endswith("relative/mnt")
    assert args[5:] == ["--ready-fd", "7", "--launch-fd", "9"]

    secret = VolumeSecret("passphrase", b"correct horse", "LOFT_ENCRYPT_PASSPHRASE")
    back = parse_launch(launch_document(opts, secret=secret, debug=True))
    assert back.opts == opts and back.debug is True and back.spec is None
    assert back.secret == secret
    plain = parse_launch(launch_document(opts))
    assert plain.secret is None and plain.spec is None and plain.debug is False

    spec = ControlSpec(
        label="control:acme/train",
        meta_url="redis://:pw@127.0.0.1:1/0",
        secret=VolumeSecret("key", bytes(32), "control plane"),
        storage_env={"LOFT_SECRET_KEY": "s3cret"},
        read_only=True,
    )
    got = parse_launch(launch_document(opts, secret=secret, spec=spec)).spec
    assert got == spec


@pytest.mark.parametrize(
    "doc", [b"", b"[]", b'{"options": {"no_such_option": 1}}', b'{"options": {}, "spec": "x"}']
)
def test_malformed_launch_document(doc: bytes) -> None:
    with pytest.raises(ConfigError, match="malformed"):
        parse_launch(doc)


def test_background_mount_process_loads_only_what_serving_needs(tmp_path: Path) -> None:
    """What the long-lived process of a mount imports stays resident: no CLI framework, no
    pyfuse3/trio on the default binding, no prometheus_client without --metrics, no
    cryptography for a volume without encryption, no S3 client for a local store."""
    code = (
        "import sys, loftfs.cli.child, loftfs.fuse.mount, loftfs.fuse.lowlevel\n"
        "from loftfs.object import open_storage_url\n"
        f"s = open_storage_url('file://{tmp_path}')\n"
        "s.put('k', b'v'); assert s.get('k') == b'v'\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "loftfs" in loaded
    heavy = {"typer", "click", "rich", "pydantic", "pyfuse3", "trio", "prometheus_client"}
    heavy |= {"cryptography", "obstore", "boto3", "botocore", "redis", "psycopg", "fastapi"}
    assert not loaded & heavy
