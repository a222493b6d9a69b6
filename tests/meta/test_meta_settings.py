"""Generic settings on every engine: the ``Txn`` primitives ``put_setting``, ``del_setting``
and ``settings_with_prefix`` (what lazy-import bindings, import checkpoints and dumps use),
with names that sort next to each other and names holding Redis pattern characters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from loftfs.meta import Meta
from loftfs.meta.base import BaseMeta
from loftfs.meta.txn import SETTING_VOLUME, Txn

T = TypeVar("T")

# names that share prefixes or sort right next to one another (':' is followed by ';'), in
# both cases, with digits that sort before and after ':', unicode, and the characters Redis
# patterns give a meaning to (* ? [ ] \)
NAMES = {
    "lazy": "bare",
    "lazy:": "colon only",
    "lazy:1": '{"source": 1, "prefix": "a/"}',
    "lazy:10": '{"source": 2, "prefix": "b/"}',
    "lazy:2": "",
    "lazy:ü": "wert ✓",
    "lazy;": "semicolon",
    "lazy1": "digit",
    "lazx": "x",
    "LAZY:1": "upper case",
    "a*": "star",
    "a*b": "star b",
    "ab": "no star",
    "a?c": "question mark",
    "abc": "no question mark",
    "x[1]": "brackets",
    "x]": "closing bracket",
    "x1": "no bracket",
    "p\\q": "backslash",
    "pq": "no backslash",
    "p": "v" * 10_000,
}

PREFIXES = [
    "lazy:", "lazy:1", "lazy:10", "lazy:100", "lazy", "lazy;", "laz", "LAZY:", "lazy:ü",
    "a*", "a?", "a[", "ab", "x[", "x[1", "x]", "x", "p\\", "p", "z", "",
]  # fmt: skip


def _run(meta: Meta, fn: Callable[[Txn], T], write: bool = False) -> T:
    """``fn`` in one transaction of ``meta``'s engine (the runner every ``Txn`` user goes
    through)."""
    assert isinstance(meta, BaseMeta)
    return meta._transaction(fn, write)


def _put(meta: Meta, settings: dict[str, str]) -> None:
    def fn(tx: Txn) -> None:
        for name, value in settings.items():
            tx.put_setting(name, value)

    _run(meta, fn, True)


def _delete(meta: Meta, name: str) -> None:
    _run(meta, lambda tx: tx.del_setting(name), True)


def _with_prefix(meta: Meta, prefix: str) -> dict[str, str]:
    return _run(meta, lambda tx: tx.settings_with_prefix(prefix))


def _expected(stored: dict[str, str], prefix: str) -> dict[str, str]:
    return {n: v for n, v in stored.items() if n.startswith(prefix)}


def test_settings_with_prefix_matches_exactly_the_prefix(meta: Meta) -> None:
    """Exactly the names that start with the prefix, taken literally: no neighbour in sort
    order, no other case, no pattern character read as a pattern."""
    before = _with_prefix(meta, "")
    assert SETTING_VOLUME in before
    assert not set(before) & set(NAMES)
    _put(meta, NAMES)
    stored = {**before, **NAMES}
    assert _with_prefix(meta, "") == stored
    for prefix in PREFIXES:
        assert _with_prefix(meta, prefix) == _expected(stored, prefix), prefix
    assert set(_with_prefix(meta, "lazy:1")) == {"lazy:1", "lazy:10"}
    assert set(_with_prefix(meta, "a*")) == {"a*", "a*b"}
    assert set(_with_prefix(meta, "x[")) == {"x[1]"}
    assert _with_prefix(meta, "nothing") == {}


def test_settings_with_prefix_reads_many(meta: Meta) -> None:
    """More settings than one round of an incremental scan returns: every one comes back."""
    many = {f"bulk:{i}": f"value {i}" for i in range(1500)}
    _put(meta, {**many, "bulk": "not under 'bulk:'", "bulk;0": "neither"})
    assert _with_prefix(meta, "bulk:") == many
    assert _with_prefix(meta, "bulk:1") == _expected(many, "bulk:1")
    assert len(_with_prefix(meta, "bulk:1")) == 1 + 10 + 100 + 500


def test_put_setting_replaces_the_value(meta: Meta) -> None:
    _put(meta, {"lazy:7": "first"})
    _put(meta, {"lazy:7": "second"})
    assert _with_prefix(meta, "lazy:") == {"lazy:7": "second"}
    assert _run(meta, lambda tx: tx.get_setting("lazy:7")) == "second"


@pytest.mark.parametrize("name", ["lazy:1", "a*", "x[1]", "p\\q"])
def test_del_setting_removes_only_that_name(meta: Meta, name: str) -> None:
    """Deleting a present name removes it and nothing else; deleting a missing name (again,
    or a neighbour of present ones) is no error and changes nothing."""
    _put(meta, NAMES)
    everything = _with_prefix(meta, "")
    _delete(meta, name)
    assert _run(meta, lambda tx: tx.get_setting(name)) is None
    rest = {n: v for n, v in everything.items() if n != name}
    assert _with_prefix(meta, "") == rest
    for missing in (name, "lazy:3", "lazy:1?", "a", "x[", "nothing"):
        _delete(meta, missing)
        assert _with_prefix(meta, "") == rest
    assert meta.load_settings().name  # the volume's own setting is untouched


def test_del_setting_in_one_transaction_with_puts(meta: Meta) -> None:
    """Deletes and puts of one transaction commit together (as a lazy directory's listing
    drops its binding while binding its subdirectories)."""
    _put(meta, {"lazy:5": "parent"})

    def fn(tx: Txn) -> None:
        tx.put_setting("lazy:6", "child")
        tx.put_setting("lazy:60", "other child")
        tx.del_setting("lazy:5")

    _run(meta, fn, True)
    assert _with_prefix(meta, "lazy:") == {"lazy:6": "child", "lazy:60": "other child"}
