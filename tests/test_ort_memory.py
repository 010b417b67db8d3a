"""ort-cpu's resident memory: the mapped weights' pages that a sequence faulted in are dropped before the next
one (file_pages.py, used by backends/ort.py), without changing a token; mappings holding a written page are left alone."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest

from medusa_runtime.file_pages import FilePages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")

SIZE = 64 * mmap.PAGESIZE


def _smaps_field(address: int, field: str) -> list[str]:
    """Values of `field` ("Rss:", "VmFlags:") of the mapping starting at `address` (/proc/self/smaps)."""
    found = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                found = int(fields[0].split("-")[0], 16) == address
            elif found and fields[0] == field:
                return fields[1:]
    raise AssertionError(f"no mapping at {address:#x}")


def _resident_kib(address: int) -> int:
    return int(_smaps_field(address, "Rss:")[0])


def _flags(address: int) -> list[str]:
    """VmFlags of the mapping at `address` (rr: MADV_RANDOM)."""
    return _smaps_field(address, "VmFlags:")


def _map(path):
    """A private, writable mapping of the file, as ONNX Runtime maps external data, and its address."""
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return view, ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_file_pages_drops_clean_pages_and_keeps_written_ones(tmp_path):
    data = bytes(range(256)) * (SIZE // 256)
    clean_path, written_path = tmp_path / "clean.data", tmp_path / "written.data"
    clean_path.write_bytes(data)
    written_path.write_bytes(data)
    clean, clean_at = _map(clean_path)
    written, written_at = _map(written_path)
    assert clean[:] == data  # every page read: resident
    written[5] = 0  # one page copied on write: its contents live only in this process
    assert _resident_kib(clean_at) == SIZE // 1024

    paths = [clean_path, written_path, tmp_path / "missing.data"]
    assert not FilePages(paths, before=FilePages.mapped(paths)).ranges  # mapped before: another session's
    pages = FilePages(paths)
    assert pages.ranges == [(clean_at, SIZE)]
    assert pages.release() == 1
    assert _resident_kib(clean_at) == 0
    assert clean[:] == data  # read back from the file
    assert written[5] == 0 and written[6] == 6
    clean.close()  # unmapped: its addresses may serve something else now, never released again
    assert pages.release() == 0


def test_read_sparsely_advises_random_reads_on_the_mappings_of_the_ranges(tmp_path):
    data = bytes(range(256)) * (SIZE // 256)
    table_path, other_path = tmp_path / "table.data", tmp_path / "other.data"
    table_path.write_bytes(data)
    other_path.write_bytes(data)
    table, table_at = _map(table_path)
    other, other_at = _map(other_path)
    pages = FilePages([table_path, other_path])
    pages.release()
    ranges = [(table_path, mmap.PAGESIZE, 3 * mmap.PAGESIZE), (tmp_path / "missing.data", 0, 1)]
    assert pages.read_sparsely(ranges) == 1
    assert "rr" in _flags(table_at) and "rr" not in _flags(other_at)
    assert table[:] == data and other[:] == data  # read back from the file
    table.close()
    other.close()


def test_ort_cpu_reads_the_gathered_table_sparsely(tiny_artifact):
    from medusa_runtime.api import MedusaRuntime

    rt = MedusaRuntime.open(tiny_artifact("tiny-gemma3"))
    assert any("rr" in _flags(start) for start, _ in rt.backend.file_pages.ranges)  # the embedding's


def test_ort_cpu_releases_mapped_weights_without_changing_tokens(tiny_artifact):
    from conftest import PROMPTS
    from medusa_runtime.api import MedusaRuntime

    folder = tiny_artifact("tiny-gemma3")
    default = MedusaRuntime.open(folder)
    assert default.backend.file_pages is not None and default.backend.file_pages.ranges
    off = MedusaRuntime.open(folder, release_pages=False)
    assert off.backend.file_pages is None
    for prompt in PROMPTS:
        assert default.generate(prompt, 24).token_ids == off.generate(prompt, 24).token_ids
