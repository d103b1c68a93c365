"""POSIX access control lists, to let ONE other account (the scratch servers' `regal_pg`) reach a file or pass
through a directory without widening it for anybody else.

The ACL is read and written as the kernel's `system.posix_acl_access` extended attribute (the format of
linux/posix_acl_xattr.h: a little-endian version 2 header, then (tag u16, permissions u16, id u32) entries
sorted by tag and id), so no `setfacl` program is needed. A named-user entry needs a mask entry; the mask is
the union of the group-class entries, so the owning group's effective permissions (its own AND the mask) stay
what they were: `ls -l` then shows the mask as the group bits, and a `+`.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

_XATTR = "system.posix_acl_access"
_VERSION = 2
_HEADER, _ENTRY = struct.Struct("<I"), struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF
READ, WRITE, EXECUTE = 4, 2, 1


class AclUnsupportedError(OSError):
    """The filesystem holding the path keeps no ACLs."""


def read_acl(path: Path) -> dict[tuple[int, int], int]:
    """The access ACL of `path` as {(tag, id): permissions}; the one its mode bits make when it has none."""
    try:
        data = os.getxattr(path, _XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        mode = path.lstat().st_mode
        return {(USER_OBJ, _UNDEFINED_ID): (mode >> 6) & 7, (GROUP_OBJ, _UNDEFINED_ID): (mode >> 3) & 7,
                (OTHER, _UNDEFINED_ID): mode & 7}
    (version,) = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise OSError(errno.EINVAL, f"ACL of {path} has version {version}")
    return {(tag, uid): perm for tag, perm, uid in _ENTRY.iter_unpack(data[_HEADER.size:])}


def _write_acl(path: Path, entries: dict[tuple[int, int], int]) -> None:
    body = b"".join(_ENTRY.pack(tag, perm, uid) for (tag, uid), perm in sorted(entries.items()))
    data = _HEADER.pack(_VERSION) + body
    try:
        os.setxattr(path, _XATTR, data, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise AclUnsupportedError(exc.errno, f"the filesystem of {path} keeps no ACLs") from None
        raise


def grant_user(path: Path, uid: int, permissions: int) -> bool:
    """Give user `uid` `permissions` (READ | EXECUTE ...) on `path` through a named-user ACL entry; nobody
    else's access changes. False when it already had them (nothing written)."""
    entries = read_acl(path)
    key = (USER, uid)
    if entries.get(key, 0) & permissions == permissions and entries.get((MASK, _UNDEFINED_ID), 7) & permissions \
            == permissions:
        return False
    entries[key] = entries.get(key, 0) | permissions
    group_class = [perm for (tag, _), perm in entries.items() if tag in (USER, GROUP_OBJ, GROUP)]
    entries[(MASK, _UNDEFINED_ID)] = entries.get((MASK, _UNDEFINED_ID), 0) | permissions | _union(group_class)
    _write_acl(path, entries)
    return True


def _union(permissions: list[int]) -> int:
    result = 0
    for perm in permissions:
        result |= perm
    return result


def user_may(path: Path, uid: int, gids: set[int], permissions: int) -> bool:
    """Whether user `uid` (in groups `gids`) has `permissions` on `path` by its mode bits and ACL (as the kernel
    decides: owner, named user, owning or named group, others; named and group entries limited by the mask)."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return False
    entries = read_acl(path)
    mask = entries.get((MASK, _UNDEFINED_ID), 7)
    if info.st_uid == uid:
        return entries[(USER_OBJ, _UNDEFINED_ID)] & permissions == permissions
    if (USER, uid) in entries:
        return entries[(USER, uid)] & mask & permissions == permissions
    groups = [perm for (tag, gid), perm in entries.items()
              if (tag == GROUP_OBJ and info.st_gid in gids) or (tag == GROUP and gid in gids)]
    if groups:
        return any(perm & mask & permissions == permissions for perm in groups)
    return entries[(OTHER, _UNDEFINED_ID)] & permissions == permissions
