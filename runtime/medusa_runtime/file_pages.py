"""Resident pages of mapped weight files, dropped on request (ort-cpu: backends/ort.py).

ONNX Runtime maps external weights (model.onnx.data; private and writable, one mapping per tensor) and reads
some in place, like the 8-bit embedding table of a quantized artifact: each new token id faults its row in
(with its neighbours: the kernel's fault-around), so over many prompts the table's resident share only
grows. Dropping a page that was never written loses nothing: the next read maps it again from the page
cache. Linux only (/proc/self/maps, madvise); elsewhere FilePages finds nothing and releases nothing.

A fault may map more than its page. Around it the kernel maps whatever neighbours sit in the page cache (up
to 64 KiB), and on kernels with large page-cache folios (ext4 since Linux 6.16) a whole folio: a file written
in one large write, as an export writes its weights, sits in the cache in folios of up to 2 MiB. There a
688-token prefill left 123 MiB of gemma3-270m's 4-bit table resident instead of 8 (BENCHMARKS.md, round 10).
So `read_sparsely` drops the gathered tables' bytes from the page cache once (after writing back any not yet
written) and marks their mappings MADV_RANDOM: each row then comes back alone, in small folios, read on
demand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MADV_RANDOM, MADV_DONTNEED = 1, 4  # Linux


def _file_ids(paths) -> set[tuple[int, int, int]]:
    ids = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        ids.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    return ids


def _mapping_key(fields: list[str], ids) -> tuple | None:
    """(start, end, offset, inode) of a /proc/self/{maps,smaps} mapping line (split in 6 at most) when it
    privately maps one of the files `ids`, else None."""
    if len(fields) != 6 or fields[3].count(":") != 1 or not fields[4].isdigit() or fields[1][3:] != "p":
        return None
    major, minor = (int(x, 16) for x in fields[3].split(":"))
    if (major, minor, int(fields[4])) not in ids:
        return None
    start, end = (int(x, 16) for x in fields[0].split("-"))
    return start, end, fields[2], int(fields[4])


def _mapping_lines(text: str, ids):
    """(key, end of line) of each line of /proc/self/{maps,smaps} `text` that privately maps one of the
    files `ids` (only lines naming one of their inode numbers are split)."""
    for inode in {f" {i} " for _, _, i in ids}:
        at = text.find(inode)
        while at >= 0:
            start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
            end = len(text) if end < 0 else end
            key = _mapping_key(text[start:end].split(maxsplit=5), ids)
            if key:
                yield key, end
            at = text.find(inode, end)


def _mapped(ids) -> set[tuple]:
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return set()
    return {key for key, _ in _mapping_lines(text, ids)}


class FilePages:
    """The private mappings of some files that a session made in this process, whose resident pages can be
    dropped. On gemma3-270m's 4-bit artifact the 8-bit embedding table (160 MiB + 25 MiB of scales) grows
    resident row by row; other mapped tensors are read once, while the session prepacks them, and never again.

    Safety: only mappings that appeared while the sessions were made (`before`: the files' mappings until
    then, e.g. another runtime's), that hold no written page once they are made (smaps `Anonymous` 0), and,
    at each release, that /proc/self/maps still shows at the same addresses, offset and inode. No-op off Linux.
    """

    def __init__(self, paths, before: set | None = None):
        self.ids = _file_ids(paths)
        self.keys: set[tuple] = set()
        try:
            with open("/proc/self/smaps") as smaps:
                text = smaps.read()
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError, TypeError):
            return
        for key, end in _mapping_lines(text, self.ids):
            at = text.find("\nAnonymous:", end)
            next_mapping = text.find("\nVmFlags:", end)  # the last field of each mapping
            if key not in (before or ()) and 0 <= at < next_mapping:
                if text[at + 11 : text.find("\n", at + 1)].split()[0] == "0":
                    self.keys.add(key)

    @staticmethod
    def mapped(paths) -> set[tuple]:
        """Keys of the files' private mappings now (for `before`)."""
        return _mapped(_file_ids(paths))

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return sorted((start, end - start) for start, end, _, _ in self.keys)

    def release(self) -> int:
        """Drop the resident pages of those mappings still in place; returns how many mappings."""
        if not self.keys:
            return 0
        done = 0
        for start, end, _, _ in self.keys & _mapped(self.ids):
            self._madvise(start, end - start, MADV_DONTNEED)
            done += 1
        return done

    def read_sparsely(self, ranges) -> int:
        """Drop the file bytes `ranges` ((path, offset, length): tables read in place, a few rows at a time)
        from the page cache and advise random reads on the mappings that hold them; returns how many. Call it
        after release(): pages still mapped here stay in the cache."""
        if not self.keys or not hasattr(os, "posix_fadvise"):
            return 0
        by_file: dict[str, list[tuple[int, int]]] = {}
        for path, offset, length in ranges:
            by_file.setdefault(str(path), []).append((offset, offset + length))
        wanted = []  # (inode, first byte, end)
        for path, spans in by_file.items():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)  # dirty pages (a fresh export's) cannot be dropped
                for a, b in spans:
                    os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
                wanted += [(os.fstat(fd).st_ino, a, b) for a, b in spans]
            except OSError:
                pass
            finally:
                os.close(fd)
        advised = 0
        for start, end, offset, inode in self.keys & _mapped(self.ids):
            first = int(offset, 16)
            if any(i == inode and a < first + end - start and first < b for i, a, b in wanted):
                self._madvise(start, end - start, MADV_RANDOM)
                advised += 1
        return advised
