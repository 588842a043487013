"""Git objects without a process per object: read through one ``git cat-file --batch``, written
as one pack (+ ``.idx``) per batch, and a tree edited in memory.

Each batch becomes **one pack** (+ ``.idx``) rather than loose objects: creating a file costs
~0.5 ms on this disk and an event makes seven objects. A day's directory tree grows by ~70
bytes per event and is rewritten by every commit, so inside a pack each new version of it is an
``OFS_DELTA`` against the previous one (the splice is known, nothing is searched); the first
version in a pack is stored whole and not deflated (deflating 600 kB of mostly SHA-1 bytes takes
~10 ms). When there are more than
:attr:`~provisioning.audit_mirror.mirror.GitMirror.max_packs` packs, ``git repack -d
--geometric=2`` merges them (and deltifies those whole trees). A ``git cat-file --batch``
process reads existing trees and commits: at start, and when events move to another day.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import secrets
import struct
import subprocess
import zlib
from pathlib import Path
from typing import ClassVar

from provisioning.audit_mirror.durable import fsync_dir
from provisioning.core.errors import OperationFailed

__all__ = ["TMP_PREFIX", "Dir", "GitObjectReader", "PackWriter", "git_env"]

TMP_PREFIX = "tmp_mirror_"
_MAX_DELTA_DEPTH = 50  # as git's pack.depth: reading a version applies at most this many deltas
_DELTA_MIN_SIZE = 4096  # smaller trees are stored whole
_STORE_MIN_SIZE = 65536  # whole objects this big are not deflated


def git_env() -> dict[str, str]:
    """The environment for every git call: no prompts, no replace objects, C locale."""
    return {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "LC_ALL": "C",
        "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
    }


class GitObjectReader:
    """One ``git cat-file --batch`` process: reads objects, loose or packed, by id."""

    def __init__(self, git_dir: Path) -> None:
        self._git_dir = git_dir
        self._proc = subprocess.Popen(
            ["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=git_env(),
        )

    def read(self, object_id: str) -> tuple[str, bytes]:
        """``(type, content)`` of the object.

        Raises:
            OperationFailed: the object is missing (the message names it and the repository).
        """
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(object_id.encode("ascii") + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            raise OperationFailed(f"git cat-file stopped reading {self._git_dir}") from exc
        header = self._proc.stdout.readline().split()
        if len(header) != 3:
            raise OperationFailed(f"git object {object_id} is missing from {self._git_dir}")
        data = self._proc.stdout.read(int(header[2]) + 1)[:-1]
        return header[1].decode("ascii"), data

    def close(self) -> None:
        """Stop the process."""
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _entry_header(type_code: int, size: int) -> bytearray:
    out = bytearray()
    byte = (type_code << 4) | (size & 0x0F)
    size >>= 4
    while size:
        out.append(byte | 0x80)
        byte, size = size & 0x7F, size >> 7
    out.append(byte)
    return out


def _varint(n: int) -> bytearray:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return out


def _copy_op(offset: int, size: int) -> bytearray:
    out = bytearray()
    while size > 0:
        step = min(size, 0xFFFFFF)
        op, args = 0x80, bytearray()
        for i in range(4):
            if (offset >> (8 * i)) & 0xFF:
                op |= 1 << i
                args.append((offset >> (8 * i)) & 0xFF)
        for i in range(3):
            if (step >> (8 * i)) & 0xFF:
                op |= 0x10 << i
                args.append((step >> (8 * i)) & 0xFF)
        out.append(op)
        out += args
        offset, size = offset + step, size - step
    return out


def _splice_delta(base_size: int, at: int, removed: int, inserted: bytes) -> bytes:
    """A git delta turning a base into: base[:at] + inserted + base[at + removed:]."""
    out = _varint(base_size) + _varint(base_size - removed + len(inserted))
    out += _copy_op(0, at)
    for i in range(0, len(inserted), 0x7F):
        piece = inserted[i : i + 0x7F]
        out.append(len(piece))
        out += piece
    out += _copy_op(at + removed, base_size - at - removed)
    return bytes(out)


class PackWriter:
    """One batch's objects, written as one pack + ``.idx`` (v2) when the batch is complete.

    A new version of a large tree whose previous version is already in this pack is stored as
    an ``OFS_DELTA`` against it (the splice is known, so the delta is computed, not searched).
    """

    _TYPES: ClassVar[dict[bytes, int]] = {b"commit": 1, b"tree": 2, b"blob": 3}
    _OFS_DELTA = 6

    def __init__(self, pack_dir: Path, generation: int) -> None:
        self.pack_dir = pack_dir
        self.generation = generation
        self._body = bytearray()
        self._objects: dict[bytes, tuple[int, int]] = {}  # id -> (offset, crc32)
        self.parked: dict[bytes, Dir] = {}  # trees unloaded from the edit path this batch

    def add(
        self, kind: bytes, data: bytes, delta: tuple[int, bytes] | None = None
    ) -> tuple[bytes, int]:
        """Add an object (optionally as ``(base offset, delta)``); return its id and offset."""
        digest = hashlib.sha1(b"%b %d\x00" % (kind, len(data)))
        digest.update(data)
        object_id = digest.digest()
        if object_id in self._objects:
            return object_id, self._objects[object_id][0]
        offset = 12 + len(self._body)
        if delta is None:
            # A big day tree is mostly SHA-1 bytes: deflating 600 kB costs ~10 ms here and saves
            # a third. Store it as is; the next repack turns it into a deflated delta anyway.
            level = 0 if len(data) >= _STORE_MIN_SIZE else 1
            entry = _entry_header(self._TYPES[kind], len(data)) + zlib.compress(data, level)
        else:
            distance = offset - delta[0]
            rel = bytearray([distance & 0x7F])
            distance >>= 7
            while distance:
                distance -= 1
                rel.insert(0, 0x80 | (distance & 0x7F))
                distance >>= 7
            entry = _entry_header(self._OFS_DELTA, len(delta[1])) + rel
            entry += zlib.compress(delta[1], 1)
        self._body += entry
        self._objects[object_id] = (offset, zlib.crc32(entry))
        return object_id, offset

    def write(self) -> None:
        """Write the pack and its index durably (fsync, rename, fsync the directory)."""
        if not self._objects:
            return
        head = b"PACK" + struct.pack(">II", 2, len(self._objects))
        checksum = hashlib.sha1(head + self._body).digest()
        ids = sorted(self._objects)
        fanout, i = [], 0
        for first in range(256):
            while i < len(ids) and ids[i][0] <= first:
                i += 1
            fanout.append(i)
        offsets: list[int] = []
        large: list[int] = []
        for object_id in ids:
            offset = self._objects[object_id][0]
            if offset < 0x80000000:
                offsets.append(offset)
            else:
                offsets.append(0x80000000 | len(large))
                large.append(offset)
        idx = b"\xfftOc" + struct.pack(">I", 2) + struct.pack(">256I", *fanout) + b"".join(ids)
        idx += struct.pack(f">{len(ids)}I", *(self._objects[o][1] for o in ids))
        idx += struct.pack(f">{len(ids)}I", *offsets) + struct.pack(f">{len(large)}Q", *large)
        idx += checksum
        idx += hashlib.sha1(idx).digest()
        name = f"pack-{checksum.hex()}"
        token = secrets.token_hex(8)
        tmp_pack = self.pack_dir / f"{TMP_PREFIX}{token}.pack"
        tmp_idx = self.pack_dir / f"{TMP_PREFIX}{token}.idx"
        for tmp, data in ((tmp_pack, (head, self._body, checksum)), (tmp_idx, (idx,))):
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444), "wb") as f:
                for part in data:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
        # The pack before its index: git only looks at packs that have one.
        os.rename(tmp_pack, self.pack_dir / f"{name}.pack")
        os.rename(tmp_idx, self.pack_dir / f"{name}.idx")
        fsync_dir(self.pack_dir)


class Dir:
    """A tree being edited: its entries kept in git order, with at most one subdirectory loaded.

    ``keys`` are the sort keys (a subtree's name + ``/``, as git orders them), ``chunks`` the
    serialised entries, so writing the tree is one join however many entries it has. ``base``
    is where its last version was written (pack generation, offset, delta depth) and ``edits``
    the splices since, so the next version can be a delta against it.
    """

    __slots__ = ("base", "chunks", "edits", "keys", "loaded")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.chunks: list[bytes] = []
        self.loaded: tuple[bytes, Dir] | None = None
        self.base: tuple[int, int, int] | None = None
        self.edits: list[tuple[int, int, bytes]] = []

    @classmethod
    def parse(cls, data: bytes) -> Dir:
        tree, i = cls(), 0
        while i < len(data):
            space = data.index(b" ", i)
            nul = data.index(b"\x00", space)
            name = data[space + 1 : nul]
            tree.keys.append(name + b"/" if data[i:space] == b"40000" else name)
            tree.chunks.append(data[i : nul + 21])
            i = nul + 21
        return tree

    def _subtree_id(self, name: bytes) -> bytes | None:
        i = bisect.bisect_left(self.keys, name + b"/")
        if i < len(self.keys) and self.keys[i] == name + b"/":
            return self.chunks[i][-20:]
        return None

    def child(self, name: bytes, reader: GitObjectReader, pack: PackWriter) -> Dir:
        """The subdirectory ``name`` (empty if new), loaded in place of the one loaded before.

        The one unloaded is parked in ``pack`` (its version may not be on disk before the pack
        is written); the one loaded comes from there, else from the repository.
        """
        if self.loaded is not None:
            if self.loaded[0] == name:
                return self.loaded[1]
            parked = self._subtree_id(self.loaded[0])
            if parked is not None:
                pack.parked[parked] = self.loaded[1]
        object_id = self._subtree_id(name)
        sub = pack.parked.pop(object_id, None) if object_id is not None else Dir()
        if sub is None and object_id is not None:
            kind, data = reader.read(object_id.hex())
            if kind != "tree":
                raise OperationFailed(f"git object for directory {name!r} is a {kind}")
            sub = Dir.parse(data)
        assert sub is not None
        self.loaded = (name, sub)
        return sub

    def set(self, name: bytes, object_id: bytes, *, tree: bool) -> None:
        key = name + b"/" if tree else name
        chunk = (b"40000 " if tree else b"100644 ") + name + b"\x00" + object_id
        i = bisect.bisect_left(self.keys, key)
        replaced = i < len(self.keys) and self.keys[i] == key
        if self.base is not None and not self.edits:
            self.edits.append(
                (sum(map(len, self.chunks[:i])), len(self.chunks[i]) if replaced else 0, chunk)
            )
        else:
            self.edits.append((0, 0, b""))  # a second splice: the next version is written whole
        if replaced:
            self.chunks[i] = chunk
        else:
            self.keys.insert(i, key)
            self.chunks.insert(i, chunk)

    def write(self, pack: PackWriter) -> bytes:
        """Add this tree's current version to ``pack``; return its object id."""
        data = b"".join(self.chunks)
        delta = None
        depth = 0
        base = self.base
        if (
            base is not None
            and base[0] == pack.generation
            and base[2] < _MAX_DELTA_DEPTH
            and len(self.edits) == 1
            and len(data) >= _DELTA_MIN_SIZE
        ):
            at, removed, inserted = self.edits[0]
            delta = (
                base[1],
                _splice_delta(len(data) - len(inserted) + removed, at, removed, inserted),
            )
            depth = base[2] + 1
        object_id, offset = pack.add(b"tree", data, delta)
        self.base, self.edits = (pack.generation, offset, depth), []
        return object_id
