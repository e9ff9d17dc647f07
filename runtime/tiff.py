"""Read the image file directories (IFDs) of a TIFF from its bytes, without decoding: classic TIFF (version
42) and BigTIFF (version 43), either byte order.

The one reader for what mrkd looks up before OpenCV decodes a file (a TIFF's declared size, colour space,
pages and alpha) and in the TIFF-structured EXIF block of a JPEG, PNG or WebP (its orientation). Files come
from factory folders and may be damaged: nothing here raises on any bytes. What lies out of reach reads as
None, and the directory chain is walked at most MAX_DIRECTORIES steps, never twice through one directory.
struct only (the runtime never imports torch).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Set, Tuple

# Field types whose values are unsigned integers, and their struct codes; other types (RATIONAL, ASCII...)
# are listed with their count but without values, since no caller reads them.
SHORT, LONG, LONG8 = 3, 4, 16
INTEGER_FIELD_CODES = {SHORT: "H", LONG: "I", LONG8: "Q"}

# A corrupt chain may loop or run on; more directories (pages) than this are counted as this many.
MAX_DIRECTORIES = 100000

TIFF_BYTE_ORDERS = {b"II": "<", b"MM": ">"}
CLASSIC_VERSION, BIG_VERSION = 42, 43


@dataclass(frozen=True)
class TiffHeader:
    """What the first bytes say: byte order, classic or Big, and where the first directory lies."""
    byte_order: str           # struct's "<" (II, little-endian) or ">" (MM, big-endian)
    big: bool                 # BigTIFF: 8-byte counts and offsets, 20-byte entries
    first_directory: int      # byte offset of the first IFD (0: none)

    @property
    def count_code(self) -> str:
        return "Q" if self.big else "H"

    @property
    def offset_code(self) -> str:
        return "Q" if self.big else "I"

    @property
    def entry_size(self) -> int:
        return 20 if self.big else 12


@dataclass(frozen=True)
class TiffEntry:
    """One directory entry (a tag)."""
    tag: int
    field_type: int
    count: int
    values: Optional[Tuple[int, ...]]   # SHORT, LONG or LONG8 values; None for other types or out of reach


@dataclass(frozen=True)
class TiffDirectory:
    """One image file directory (one page) and where the next one lies."""
    offset: int
    entries: Tuple[TiffEntry, ...]
    next_directory: Optional[int]       # 0 for the last page; None when the bytes end before the pointer

    def values(self, tag: int) -> Optional[Tuple[int, ...]]:
        """The integer values of the first entry with ``tag``; None when there is none or they are unreadable."""
        for entry in self.entries:
            if entry.tag == tag:
                return entry.values
        return None

    def value(self, tag: int) -> Optional[int]:
        """The first integer value of ``tag`` (a tag such as ImageWidth holds one); None as for values."""
        values = self.values(tag)
        return values[0] if values else None


def read_header(data) -> Optional[TiffHeader]:
    """The header of ``data`` (bytes, bytearray or memoryview); None when it is not a classic or Big TIFF."""
    order = TIFF_BYTE_ORDERS.get(bytes(data[:2]))
    if order is None or len(data) < 8:
        return None
    version = struct.unpack_from(order + "H", data, 2)[0]
    if version == CLASSIC_VERSION:
        return TiffHeader(order, False, struct.unpack_from(order + "I", data, 4)[0])
    if version == BIG_VERSION and len(data) >= 16:
        return TiffHeader(order, True, struct.unpack_from(order + "Q", data, 8)[0])
    return None


def _unpack(data, header: TiffHeader, code: str, at: int) -> Optional[int]:
    """One unsigned integer at ``at``; None when it lies past the end."""
    if at < 0 or at + struct.calcsize(code) > len(data):
        return None
    return struct.unpack_from(header.byte_order + code, data, at)[0]


def _span(data, header: TiffHeader, offset: int) -> Optional[Tuple[int, Optional[int]]]:
    """(entries, next directory or None) of the directory at ``offset``; None when its entries do not lie
    wholly in ``data``. Reads the count and the pointer only, so walking a long chain stays cheap."""
    entries = _unpack(data, header, header.count_code, offset)
    if entries is None:
        return None
    end = offset + struct.calcsize(header.count_code) + entries * header.entry_size
    if end > len(data):
        return None
    return entries, _unpack(data, header, header.offset_code, end)


def _entry(data, header: TiffHeader, at: int) -> TiffEntry:
    """The entry at ``at`` (lying in ``data``): its values inline when they fit the value field, else at
    the offset that field holds."""
    tag, field_type = struct.unpack_from(header.byte_order + "HH", data, at)
    count = struct.unpack_from(header.byte_order + header.offset_code, data, at + 4)[0]
    code = INTEGER_FIELD_CODES.get(field_type)
    if code is None:
        return TiffEntry(tag, field_type, count, None)
    field = at + 4 + struct.calcsize(header.offset_code)
    size = count * struct.calcsize(code)
    where = field if size <= struct.calcsize(header.offset_code) else _unpack(data, header, header.offset_code, field)
    if where is None or where + size > len(data):       # a count or offset past the end: a damaged entry
        return TiffEntry(tag, field_type, count, None)
    return TiffEntry(tag, field_type, count, struct.unpack_from(f"{header.byte_order}{count}{code}", data, where))


def read_directory(data, header: TiffHeader, offset: int) -> Optional[TiffDirectory]:
    """The directory at ``offset``; None when its entries do not lie wholly in ``data``."""
    span = _span(data, header, offset)
    if span is None:
        return None
    entries, following = span
    first = offset + struct.calcsize(header.count_code)
    return TiffDirectory(offset, tuple(_entry(data, header, first + index * header.entry_size)
                                       for index in range(entries)), following)


def directory_offsets(data, header: TiffHeader, limit: int = MAX_DIRECTORIES) -> Tuple[int, ...]:
    """Offsets of the directories (pages) of the chain from the first: it stops at a zero pointer, at a
    directory seen before (a loop), at ``limit`` directories, or at one whose entries or pointer to the next
    lie past the end of ``data`` (that one not counted)."""
    offsets: List[int] = []
    seen: Set[int] = set()
    at = header.first_directory
    while at and at not in seen and len(offsets) < limit:
        span = _span(data, header, at)
        if span is None or span[1] is None:
            break
        seen.add(at)
        offsets.append(at)
        at = span[1]
    return tuple(offsets)


def first_directory(data) -> Optional[TiffDirectory]:
    """The first directory of a classic or Big TIFF in ``data``; None when there is none in reach."""
    header = read_header(data)
    return None if header is None or not header.first_directory else read_directory(data, header,
                                                                                    header.first_directory)
