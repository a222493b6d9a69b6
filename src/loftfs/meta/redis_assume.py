"""Write transactions that commit in one round trip: values assumed, checked on the server.

A write transaction on Redis reads what it depends on with a ``WATCH`` (one round trip) and
commits with ``MULTI``/``EXEC`` (a second). When this process already knows the values it is
about to read, because it wrote or read them itself a moment ago, the first round trip only
confirms what it knows. ``Known`` keeps those values for attribute and chunk keys; a
transaction may *assume* them instead of reading, and its commit then runs ``LUA_APPLY``: the
script compares every assumed key with the server's value and applies the queued writes only
if all match, atomically, as ``EXEC`` would have. A mismatch (another client changed the key,
or an assumption was wrong) applies nothing: the transaction runs again with real reads, as
after a failed ``WATCH``. So an assumption can cost a round trip, never correctness.

Used where the same client commits the same keys again and again: the slice commits of a file
being written (each finds the attributes and chunk its previous commit wrote), the first
commit of a file this client just created (chunk assumed absent), and a create in a
directory this client just created something in (the new name assumed absent: the kernel has
just looked it up). Measured through a mount on Redis + SeaweedFS (docs/PERFORMANCE.md): a
small file's slice commit 0.91 -> 0.65 ms, its create 0.64-0.77 -> 0.57 ms (medians).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Command = tuple[Any, ...]
#: What a transaction assumed: a string key, or (hash key, field); the value (None: absent).
Assumed = dict[str | tuple[str, bytes], bytes | None]

KNOWN_MAX = 4096  # keys remembered per process (an attribute record is 64 bytes)

# Reference counts of slices: HINCRBY each, a slice whose count drops to 0 goes to the dead
# set (for gc), one that comes back from 0 leaves it. args[first..]: id, size, delta triples.
SLICE_REFS_FN = """function(refs, dead, args, first)
  for i = first, #args, 3 do
    local id, size, delta = args[i], args[i + 1], tonumber(args[i + 2])
    local n = redis.call('HINCRBY', refs, id, delta)
    if n <= 0 then
      redis.call('ZADD', dead, id, id .. ':' .. size)
    elseif n - delta <= 0 then
      redis.call('ZREM', dead, id .. ':' .. size)
    end
  end
end"""

#: Pseudo-command of ``LUA_APPLY`` for ``SLICE_REFS_FN``: (REFS, refs key, dead key, *triples).
REFS = "@refs"

# KEYS: the assumed keys. ARGV: for each of them kind ('s' string, 'h' hash field; upper case:
# expected absent), field ('' for strings), expected value; then the commands, each as its
# argument count followed by its arguments. Returns 1 when applied, 0 when an assumption did
# not hold (nothing applied), {2, error} when a command failed (the others were applied, as
# EXEC does).
LUA_APPLY = (
    "local slice_refs = "
    + SLICE_REFS_FN
    + """
local n = #KEYS
for i = 1, n do
  local kind, field, want = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local v
  if kind == 's' or kind == 'S' then
    v = redis.call('GET', KEYS[i])
  else
    v = redis.call('HGET', KEYS[i], field)
  end
  if kind == 's' or kind == 'h' then
    if v ~= want then return 0 end
  elseif v then
    return 0
  end
end
local i, err = 3 * n + 1, nil
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  local cmd = {}
  for j = 1, argc do cmd[j] = ARGV[i + j] end
  if cmd[1] == '"""
    + REFS
    + """' then
    local ok, e = pcall(slice_refs, cmd[2], cmd[3], cmd, 4)
    if not ok and not err then err = tostring(e) end
  else
    local r = redis.pcall(unpack(cmd))
    if type(r) == 'table' and r.err and not err then err = r.err end
  end
  i = i + argc + 1
end
if err then return {2, err} end
return 1
"""
)


def apply_args(
    assumed: Assumed, queued: Sequence[Command], scripts: Mapping[str, str]
) -> tuple[list[str], list[Any]] | None:
    """KEYS and ARGV of ``LUA_APPLY`` for a commit of ``queued`` under ``assumed``, or None
    when a queued command cannot run inside it (a Lua script other than those ``scripts``
    maps to a pseudo-command: Redis scripts cannot call scripts)."""
    keys: list[str] = []
    argv: list[Any] = []
    for where, value in assumed.items():
        if isinstance(where, str):
            keys.append(where)
            argv += ("s" if value is not None else "S", "", value or b"")
        else:
            keys.append(where[0])
            argv += ("h" if value is not None else "H", where[1], value or b"")
    for cmd in queued:
        if cmd[0] == "EVAL":
            name = scripts.get(cmd[1])
            if name is None:
                return None
            cmd = (name, *cmd[3:])  # the script's keys, then its arguments
        argv.append(len(cmd))
        argv.extend(cmd)
    return keys, argv


#: What a queued Lua script changes among remembered keys: the heads (``P:cN_``) of the chunk
#: keys it deletes, from its command. A script missing from the table forgets everything.
ScriptEffects = Mapping[str, Callable[[Command], Sequence[str]]]


def changes_nothing_remembered(cmd: Command) -> Sequence[str]:
    return ()


class Known:
    """The values of attribute, chunk and entry keys as this process last read or committed
    them, most recent ``limit``; thread-safe. A value may be stale (another client changed
    it since): whoever assumes it has it checked at commit. ``families``: the key prefixes
    remembered (attributes ``P:i``, chunks ``P:c``, directories ``P:d``); ``chunk_family``:
    the one whose keys are ``<family><inode>_<index>``, forgotten by inode."""

    def __init__(
        self, families: tuple[str, ...], chunk_family: str, limit: int = KNOWN_MAX
    ) -> None:
        self._values: OrderedDict[str | tuple[str, bytes], bytes | None] = OrderedDict()
        self._fields: dict[str, set[tuple[str, bytes]]] = {}  # hash key -> its known fields
        self._chunks: dict[str, set[str]] = {}  # chunk head P:cN_ -> its known chunk keys
        self._lock = threading.Lock()
        self.families = families
        self.chunk_family = chunk_family
        self.limit = limit

    def __len__(self) -> int:
        return len(self._values)

    def get(self, where: str | tuple[str, bytes]) -> tuple[bool, bytes | None]:
        """(known, value)."""
        with self._lock:
            if where not in self._values:
                return False, None
            self._values.move_to_end(where)
            return True, self._values[where]

    def put(self, where: str | tuple[str, bytes], value: bytes | None) -> None:
        with self._lock:
            self._put_locked(where, value)

    def drop(self, keys: Iterable[str | tuple[str, bytes]]) -> None:
        with self._lock:
            for where in keys:
                self._pop_locked(where)

    def clear(self) -> None:
        with self._lock:
            self._clear_locked()

    def learn(
        self, queued: Sequence[Command], seen: Mapping[str, bytes | None], scripts: ScriptEffects
    ) -> None:
        """What a committed transaction wrote: ``SET``/``APPEND``/``DEL`` of remembered
        string keys and ``HSET``/``HDEL`` of single entries. ``seen``: the values the
        transaction read (an ``APPEND`` to a value it did not read leaves the key unknown).
        Any other command on a remembered key forgets it, a script what ``scripts`` says it
        changes (everything when it is not there)."""
        with self._lock:
            now: dict[str, bytes | None] = {}  # values as this transaction left them so far
            for cmd in queued:
                name = cmd[0]
                key = cmd[1] if len(cmd) > 1 else None
                if name == "EVAL":
                    self._forget_script_locked(cmd, scripts)
                    continue
                if not isinstance(key, str) or not key.startswith(self.families):
                    continue
                if name == "SET" and len(cmd) == 3:
                    now[key] = bytes(cmd[2])
                    self._put_locked(key, now[key])
                elif name == "APPEND" and (key in now or key in seen):
                    base = now[key] if key in now else seen[key]
                    now[key] = (base or b"") + bytes(cmd[2])
                    self._put_locked(key, now[key])
                elif name == "DEL" and len(cmd) == 2:
                    now[key] = None
                    self._put_locked(key, None)
                elif name == "HSET" and len(cmd) == 4:
                    self._put_locked((key, bytes(cmd[2])), bytes(cmd[3]))
                elif name == "HDEL" and len(cmd) == 3:
                    self._put_locked((key, bytes(cmd[2])), None)
                else:
                    now.pop(key, None)
                    self._forget_key_locked(key)

    def forget(self, queued: Sequence[Command], scripts: ScriptEffects) -> None:
        """Forget every remembered key ``queued`` may have changed (a commit of unknown
        outcome)."""
        with self._lock:
            for cmd in queued:
                if cmd[0] == "EVAL":
                    self._forget_script_locked(cmd, scripts)
                elif len(cmd) > 1 and isinstance(cmd[1], str):
                    self._forget_key_locked(cmd[1])

    # --- under the lock ---------------------------------------------------------------------

    def _clear_locked(self) -> None:
        self._values.clear()
        self._fields.clear()
        self._chunks.clear()

    def _chunk_head(self, key: str) -> str | None:
        if key.startswith(self.chunk_family) and "_" in key:
            return key[: key.rindex("_") + 1]
        return None

    def _put_locked(self, where: str | tuple[str, bytes], value: bytes | None) -> None:
        values = self._values
        if where not in values:
            if isinstance(where, tuple):
                self._fields.setdefault(where[0], set()).add(where)
            else:
                head = self._chunk_head(where)
                if head is not None:
                    self._chunks.setdefault(head, set()).add(where)
        values[where] = value
        values.move_to_end(where)
        while len(values) > self.limit:
            self._pop_locked(next(iter(values)))

    def _pop_locked(self, where: str | tuple[str, bytes]) -> None:
        if where not in self._values:
            return
        del self._values[where]
        if isinstance(where, tuple):
            fields = self._fields.get(where[0])
            if fields is not None:
                fields.discard(where)
                if not fields:
                    del self._fields[where[0]]
            return
        head = self._chunk_head(where)
        chunks = None if head is None else self._chunks.get(head)
        if head is not None and chunks is not None:
            chunks.discard(where)
            if not chunks:
                del self._chunks[head]

    def _forget_key_locked(self, key: str) -> None:
        self._pop_locked(key)
        for where in list(self._fields.get(key, ())):
            self._pop_locked(where)

    def _forget_script_locked(self, cmd: Command, scripts: ScriptEffects) -> None:
        effects = scripts.get(cmd[1])
        if effects is None:
            self._clear_locked()
            return
        for head in effects(cmd):
            for key in list(self._chunks.get(head, ())):
                self._pop_locked(key)
