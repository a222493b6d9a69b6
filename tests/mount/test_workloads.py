"""Real programs doing real work inside a mount: git, venv + pip, tar, make, a source-tree copy."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def sh(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a command; a non-zero exit fails the test with its output."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def tree_digest(root: Path, *, mtimes: bool = False) -> dict[str, tuple[object, ...]]:
    """Per relative path: type, permission bits, size, content hash or link target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                body: object = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = None
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
            extra = (
                (st.st_mtime_ns // 1_000_000_000,)
                if mtimes and not stat.S_ISLNK(st.st_mode)
                else ()
            )
            out[str(p.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), size, body, *extra)
    return out


GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


def test_git_init_add_commit_clone(workdir: Path) -> None:
    repo = workdir / "repo"
    repo.mkdir()
    rng = random.Random(2)
    sh("git", "init", "-q", "-b", "main", cwd=repo, env=GIT_ENV)
    for i in range(60):
        p = repo / f"pkg{i % 6}" / f"mod{i}.py"
        p.parent.mkdir(exist_ok=True)
        p.write_text(f"VALUE = {i}\n" + "# filler\n" * rng.randrange(0, 400))
    (repo / "blob.bin").write_bytes(rng.randbytes(2 << 20))
    sh("git", "add", "-A", cwd=repo, env=GIT_ENV)
    sh("git", "commit", "-q", "-m", "first", cwd=repo, env=GIT_ENV)
    (repo / "pkg0" / "mod0.py").write_text("VALUE = 'changed'\n")
    os.rename(repo / "pkg1", repo / "renamed")
    sh("git", "add", "-A", cwd=repo, env=GIT_ENV)
    sh("git", "commit", "-q", "-m", "second", cwd=repo, env=GIT_ENV)
    assert sh("git", "status", "--porcelain", cwd=repo, env=GIT_ENV) == ""
    assert sh("git", "log", "--format=%s", cwd=repo, env=GIT_ENV).split() == ["second", "first"]
    sh("git", "gc", "-q", cwd=repo, env=GIT_ENV)  # packs, renames, deletes loose objects
    sh("git", "fsck", "--strict", "--no-progress", cwd=repo, env=GIT_ENV)

    clone = workdir / "clone"  # a local clone hard-links the object files
    sh("git", "clone", "-q", str(repo), str(clone), cwd=workdir, env=GIT_ENV)
    assert tree_digest(clone / "renamed") == tree_digest(repo / "renamed")
    assert (clone / "blob.bin").read_bytes() == (repo / "blob.bin").read_bytes()
    sh("git", "fsck", "--strict", "--no-progress", cwd=clone, env=GIT_ENV)


def _build_wheel(dest: Path) -> Path:
    """A minimal pure-Python wheel, written by hand: no build tools or network needed."""
    name, version = "tinypkg", "1.0"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"def hello() -> str:\n    return 'hello from tinypkg'\n",
        f"{name}/data.txt": b"package data\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": b"[console_scripts]\ntinyhello = tinypkg:hello\n",
    }
    record = []
    for path, data in files.items():
        digest = hashlib.sha256(data).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={b64},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@pytest.mark.timeout(600)
def test_venv_and_pip_install(workdir: Path, tmp_path: Path) -> None:
    sh(sys.executable, "-m", "venv", workdir / "venv", cwd=workdir, timeout=300)
    py = workdir / "venv" / "bin" / "python"
    assert py.is_symlink()
    wheel = _build_wheel(tmp_path)
    sh(
        py, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
        "--no-cache-dir", wheel,
        cwd=workdir, timeout=300,
    )  # fmt: skip
    out = sh(py, "-c", "import tinypkg; print(tinypkg.hello())", cwd=workdir)
    assert out.strip() == "hello from tinypkg"
    assert (workdir / "venv" / "bin" / "tinyhello").exists()
    sh(py, "-m", "compileall", "-q", workdir / "venv" / "lib", cwd=workdir, timeout=300)
    sh(py, "-m", "pip", "uninstall", "-y", "tinypkg", cwd=workdir, timeout=300)
    proc = subprocess.run([py, "-c", "import tinypkg"], capture_output=True, check=False)
    assert proc.returncode != 0


def _make_source_tree(root: Path, files: int, rng: random.Random) -> None:
    for i in range(files):
        p = root / f"d{i % 50:02}" / f"s{i % 7}" / f"file{i:05}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 100, 1000, 4096, 5000, 20000])
        p.write_bytes(rng.randbytes(size))
        p.chmod(rng.choice([0o644, 0o600, 0o755]))
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i * 1000))
    os.symlink("d00/s0/file00000.dat", root / "link")
    os.link(root / "d01" / "s1" / "file00001.dat", root / "hardlink")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("files", [2_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_tar_extract(workdir: Path, tmp_path: Path, files: int) -> None:
    src = tmp_path / "src"
    _make_source_tree(src, files, random.Random(9))
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src, arcname="tree")
    sh("tar", "-xf", archive, "-C", workdir, cwd=workdir, timeout=800)
    extracted = workdir / "tree"
    assert tree_digest(extracted, mtimes=True) == tree_digest(src, mtimes=True)
    assert os.stat(extracted / "hardlink").st_nlink == 2
    sh("diff", "-r", "--no-dereference", src, extracted, cwd=workdir, timeout=800)
    shutil.rmtree(extracted)
    assert os.listdir(workdir) == []


MAKEFILE = """\
CFLAGS = -O1 -Wall -Werror
OBJS = main.o util.o math2.o

app: $(OBJS)
\t$(CC) -o $@ $(OBJS)

%.o: %.c util.h
\t$(CC) $(CFLAGS) -c -o $@ $<

clean:
\trm -f app $(OBJS)
"""


def test_make_c_project(workdir: Path) -> None:
    (workdir / "util.h").write_text("int twice(int);\nint square(int);\n")
    (workdir / "util.c").write_text('#include "util.h"\nint twice(int x) { return 2 * x; }\n')
    (workdir / "math2.c").write_text('#include "util.h"\nint square(int x) { return x * x; }\n')
    (workdir / "main.c").write_text(
        '#include <stdio.h>\n#include "util.h"\n'
        'int main(void) { printf("%d %d\\n", twice(21), square(12)); return 0; }\n'
    )
    (workdir / "Makefile").write_text(MAKEFILE)
    sh("make", "-j2", cwd=workdir)
    assert sh(workdir / "app", cwd=workdir) == "42 144\n"
    assert "up to date" in sh("make", cwd=workdir)  # nothing to do: mtimes are right
    (workdir / "math2.c").write_text('#include "util.h"\nint square(int x) { return x * x + 1; }\n')
    out = sh("make", cwd=workdir)
    assert "-o math2.o" in out and "-o main.o" not in out  # only the changed file is rebuilt
    assert sh(workdir / "app", cwd=workdir) == "42 145\n"
    sh("make", "clean", cwd=workdir)
    assert sorted(os.listdir(workdir)) == ["Makefile", "main.c", "math2.c", "util.c", "util.h"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_copy_python_stdlib_in_and_out(workdir: Path, tmp_path: Path) -> None:
    """``cp -a`` of the Python standard library (thousands of files) in and out, byte-identical."""
    if not STDLIB.is_dir():
        pytest.skip(f"{STDLIB} not found")
    src = tmp_path / "stdlib"
    shutil.copytree(STDLIB, src, symlinks=True, ignore=shutil.ignore_patterns("site-packages"))
    inside = workdir / "stdlib"
    sh("cp", "-a", src, inside, cwd=workdir, timeout=1500)
    out = tmp_path / "back"
    sh("cp", "-a", inside, out, cwd=workdir, timeout=1500)
    expected = tree_digest(src, mtimes=True)
    assert len(expected) > 5000
    assert tree_digest(inside, mtimes=True) == expected
    assert tree_digest(out, mtimes=True) == expected
