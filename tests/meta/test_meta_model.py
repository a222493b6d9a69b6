"""The namespace against a reference model of a tree (hypothesis state machine).

Random sequences of create/mkdir/link/unlink/rmdir/rename (with its flags) run on the engine
and on a plain in-memory model; every outcome (success or errno) and the resulting tree,
link counts and parent pointers must agree.
"""

from __future__ import annotations

import errno

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from meta_helpers import Backend

from loftfs.errors import FSError
from loftfs.meta import Meta
from loftfs.meta.types import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_CTX,
    ROOT_INODE,
    FileType,
    VolumeSettings,
)

C = ROOT_CTX
NAMES = st.sampled_from([b"a", b"b", b"c"])
PICK = st.integers(0, 1 << 16)
FLAGS = st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])


class NamespaceModel(RuleBasedStateMachine):
    meta: Meta  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.meta.destroy_volume()
        self.meta.init_volume(VolumeSettings(name="model"))
        self.entries: dict[int, dict[bytes, int]] = {ROOT_INODE: {}}  # directories
        self.parent: dict[int, int] = {ROOT_INODE: ROOT_INODE}
        self.files: set[int] = set()

    # --- model helpers ------------------------------------------------------------------------

    def _dir(self, pick: int) -> int:
        dirs = sorted(self.entries)
        return dirs[pick % len(dirs)]

    def _is_dir(self, inode: int) -> bool:
        return inode in self.entries

    def _under(self, ancestor: int, inode: int) -> bool:
        while True:
            if inode == ancestor:
                return True
            if inode == ROOT_INODE:
                return False
            inode = self.parent[inode]

    def _links(self, inode: int) -> int:
        return sum(1 for ents in self.entries.values() for i in ents.values() if i == inode)

    def _drop(self, inode: int) -> None:
        if self._is_dir(inode):
            del self.entries[inode]
            del self.parent[inode]
        elif self._links(inode) == 0:
            self.files.discard(inode)

    def _run(self, expected: int | None, fn, *args):  # type: ignore[no-untyped-def]
        try:
            result = fn(*args)
        except FSError as e:
            assert expected is not None, (
                f"{fn.__name__}{args}: unexpected {errno.errorcode[e.errno]}"
            )
            assert e.errno == expected, (
                f"{fn.__name__}{args}: {errno.errorcode[e.errno]} != {errno.errorcode[expected]}"
            )
            return None
        assert expected is None, f"{fn.__name__}{args}: expected {errno.errorcode[expected]}"
        return result

    # --- rules --------------------------------------------------------------------------------

    @rule(d=PICK, name=NAMES)
    def create(self, d: int, name: bytes) -> None:
        parent = self._dir(d)
        exists = name in self.entries[parent]
        attr = self._run(
            errno.EEXIST if exists else None, self.meta.mknod, C, parent, name, FileType.FILE, 0o644
        )
        if attr is not None:
            self.entries[parent][name] = attr.inode
            self.files.add(attr.inode)

    @rule(d=PICK, name=NAMES)
    def mkdir(self, d: int, name: bytes) -> None:
        parent = self._dir(d)
        exists = name in self.entries[parent]
        attr = self._run(errno.EEXIST if exists else None, self.meta.mkdir, C, parent, name, 0o755)
        if attr is not None:
            self.entries[parent][name] = attr.inode
            self.entries[attr.inode] = {}
            self.parent[attr.inode] = parent

    @rule(f=PICK, d=PICK, name=NAMES)
    def link(self, f: int, d: int, name: bytes) -> None:
        if not self.files:
            return
        inode = sorted(self.files)[f % len(self.files)]
        parent = self._dir(d)
        exists = name in self.entries[parent]
        if self._run(errno.EEXIST if exists else None, self.meta.link, C, inode, parent, name):
            self.entries[parent][name] = inode

    @rule(d=PICK, name=NAMES)
    def unlink(self, d: int, name: bytes) -> None:
        parent = self._dir(d)
        inode = self.entries[parent].get(name)
        expected = None
        if inode is None:
            expected = errno.ENOENT
        elif self._is_dir(inode):
            expected = errno.EISDIR
        self._run(expected, self.meta.unlink, C, parent, name)
        if expected is None and inode is not None:
            del self.entries[parent][name]
            self._drop(inode)

    @rule(d=PICK, name=NAMES)
    def rmdir(self, d: int, name: bytes) -> None:
        parent = self._dir(d)
        inode = self.entries[parent].get(name)
        expected = None
        if inode is None:
            expected = errno.ENOENT
        elif not self._is_dir(inode):
            expected = errno.ENOTDIR
        elif self.entries[inode]:
            expected = errno.ENOTEMPTY
        self._run(expected, self.meta.rmdir, C, parent, name)
        if expected is None and inode is not None:
            del self.entries[parent][name]
            self._drop(inode)

    def _entry(self, pick: int) -> tuple[int, bytes] | None:
        """An existing (parent, name), so that most operations meet something."""
        all_entries = sorted((p, n) for p, ents in self.entries.items() for n in ents)
        return all_entries[pick % len(all_entries)] if all_entries else None

    @rule(e=PICK)
    def unlink_existing(self, e: int) -> None:
        entry = self._entry(e)
        if entry is not None:
            self.unlink(sorted(self.entries).index(entry[0]), entry[1])

    @rule(e=PICK)
    def rmdir_existing(self, e: int) -> None:
        entry = self._entry(e)
        if entry is not None:
            self.rmdir(sorted(self.entries).index(entry[0]), entry[1])

    @rule(e1=PICK, e2=PICK, flags=FLAGS)
    def rename_existing(self, e1: int, e2: int, flags: int) -> None:
        src, dst = self._entry(e1), self._entry(e2)
        if src is not None and dst is not None:
            dirs = sorted(self.entries)
            self.rename(dirs.index(src[0]), src[1], dirs.index(dst[0]), dst[1], flags)

    @rule(e=PICK, d=PICK, name=NAMES, flags=FLAGS)
    def rename_to_any(self, e: int, d: int, name: bytes, flags: int) -> None:
        src = self._entry(e)
        if src is not None:
            self.rename(sorted(self.entries).index(src[0]), src[1], d, name, flags)

    @rule(d1=PICK, n1=NAMES, d2=PICK, n2=NAMES, flags=FLAGS)
    def rename(self, d1: int, n1: bytes, d2: int, n2: bytes, flags: int) -> None:
        sp, dp = self._dir(d1), self._dir(d2)
        src = self.entries[sp].get(n1)
        dst = self.entries[dp].get(n2)
        exchange = bool(flags & RENAME_EXCHANGE)
        expected = None
        if src is None or (dst is None and exchange):
            expected = errno.ENOENT
        elif dst is not None and flags & RENAME_NOREPLACE:
            expected = errno.EEXIST
        elif self._is_dir(src) and self._under(src, dp):
            expected = errno.EINVAL
        elif dst is not None and self._is_dir(dst) and self._under(dst, sp):
            expected = errno.EINVAL if exchange else errno.ENOTEMPTY
        elif dst == src:
            expected = None
        elif dst is not None and not exchange:
            if self._is_dir(src) and not self._is_dir(dst):
                expected = errno.ENOTDIR
            elif not self._is_dir(src) and self._is_dir(dst):
                expected = errno.EISDIR
            elif self._is_dir(dst) and self.entries[dst]:
                expected = errno.ENOTEMPTY
        self._run(expected, self.meta.rename, C, sp, n1, dp, n2, flags)
        if expected is not None or src is None or dst == src:
            return
        if exchange:
            assert dst is not None
            self.entries[sp][n1], self.entries[dp][n2] = dst, src
            if self._is_dir(dst):
                self.parent[dst] = sp
        else:
            del self.entries[sp][n1]
            self.entries[dp][n2] = src
            if dst is not None:
                self._drop(dst)
        if self._is_dir(src):
            self.parent[src] = dp

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def tree_matches(self) -> None:
        for d, ents in self.entries.items():
            listing = self.meta.readdir(C, d)
            assert {e.name: e.attr.inode for e in listing} == ents
            attr = self.meta.getattr(d)
            subdirs = sum(1 for i in ents.values() if self._is_dir(i))
            assert attr.nlink == 2 + subdirs
            assert attr.parent == self.parent[d]
        for f in self.files:
            assert self.meta.getattr(f).nlink == self._links(f)
        assert self.meta.usage()[1] == len(self.entries) + len(self.files)


def test_namespace_model(backend: Backend) -> None:
    meta = backend.open()
    meta.init_volume(VolumeSettings(name="model"))

    class Machine(NamespaceModel):
        pass

    Machine.meta = meta
    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=100, stateful_step_count=50, deadline=None),
    )
