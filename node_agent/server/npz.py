"""A fast path for the ``.npz`` archives (and single ``.npy`` arrays) of the inference API.

``np.load`` on a request body costs ~0.25 ms before any byte of data is touched (a
``ZipFile``, a file object per member, ``ast.literal_eval`` of each header): more than a
small model's whole inference. What ``np.savez`` writes is simple: stored (uncompressed)
zip members holding ``.npy`` files whose header is one fixed-format dict literal. This
module reads exactly that, zero-copy (``np.frombuffer`` on the body), with every offset
and size bounds-checked and the member's CRC-32 verified, and answers ``None`` for
anything else (compressed members, zip64, unusual headers), so that the caller falls back
to ``np.load(allow_pickle=False)``. Object dtypes are never materialized on either path.

:func:`write` is the mirror image: one stored member per array, written with ``struct``
instead of ``zipfile``, readable by ``np.load``. :func:`read_npy` and :func:`write_npy` do
the same for one bare ``.npy`` array (what ``np.save`` writes).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping

import numpy as np

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory, 22 bytes
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory header, 46 bytes
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes
Body = bytes | memoryview  # a request body: its own bytes, or a view of a connection buffer

_EOCD_SIG = b"PK\x05\x06"
_CENTRAL_SIG = b"PK\x01\x02"
_LOCAL_SIG = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=]?[a-zA-Z]\d{0,2})', "
    r"'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>(?:\d+, ?)*\d*)\), ?\}\s*"
)
_SIMPLE_KINDS = "biuf"


class NotSimple(Exception):
    """Not the plain layout of the fast path: use ``np.load``."""


def read(body: Body, *, max_members: int) -> dict[str, np.ndarray] | None:
    """The arrays of a plain, stored ``.npz``; ``None`` if the fast path does not apply.
    Raises ``ValueError`` for an archive that is recognisably broken (CRC mismatch,
    truncated data)."""
    try:
        return _read(memoryview(body), body, max_members)
    except NotSimple:
        return None


def _read(view: memoryview, body: Body, max_members: int) -> dict[str, np.ndarray]:
    size = len(body)
    if size < _EOCD.size or body[-_EOCD.size : -_EOCD.size + 4] != _EOCD_SIG:
        raise NotSimple  # a comment after the EOCD, or not a zip at all
    _sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, comment = _EOCD.unpack_from(
        body, size - _EOCD.size
    )
    if disk or cd_disk or n_here != n_total or comment or n_total > max_members:
        raise NotSimple
    if cd_offset + cd_size > size - _EOCD.size or 0xFFFFFFFF in (cd_size, cd_offset):
        raise NotSimple
    arrays: dict[str, np.ndarray] = {}
    pos = cd_offset
    for _ in range(n_total):
        if pos + _CENTRAL.size > size:
            raise NotSimple
        fields = _CENTRAL.unpack_from(body, pos)
        (sig, _vm, _vn, flags, method, _t, _d, crc, csize, usize, nlen, xlen, clen) = fields[:13]
        offset = fields[-1]
        if sig != _CENTRAL_SIG or method != 0 or flags & 0x1 or csize != usize:
            raise NotSimple  # compressed or encrypted
        if 0xFFFFFFFF in (csize, usize, offset):
            raise NotSimple  # zip64
        name_raw = bytes(body[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen])
        pos += _CENTRAL.size + nlen + xlen + clen
        if offset + _LOCAL.size > size:
            raise NotSimple
        local = _LOCAL.unpack_from(body, offset)
        if local[0] != _LOCAL_SIG:
            raise NotSimple
        start = offset + _LOCAL.size + local[9] + local[10]
        end = start + csize
        if end > size:
            raise ValueError("npz member data runs past the end of the body")
        if zlib.crc32(view[start:end]) != crc:
            raise ValueError("npz member fails its CRC-32 check")
        try:
            name = name_raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError as exc:
            raise NotSimple from exc
        if not name.endswith(".npy"):
            raise NotSimple
        arrays[name[:-4]] = _npy(body, start, end)
    return arrays


def read_npy(body: Body) -> np.ndarray | None:
    """The array of a plain ``.npy`` file (what ``np.save`` writes), zero-copy; ``None``
    if the fast path does not apply (then use ``np.load(allow_pickle=False)``). Raises
    ``ValueError`` when the data does not match the header's shape and dtype."""
    try:
        return _npy(body, 0, len(body))
    except NotSimple:
        return None


def _npy(body: Body, start: int, end: int) -> np.ndarray:
    if end - start < 10 or body[start : start + 6] != _NPY_MAGIC:
        raise NotSimple
    major = body[start + 6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", body, start + 8)
        hstart = start + 10
    elif major in (2, 3):
        if end - start < 12:
            raise NotSimple
        (hlen,) = struct.unpack_from("<L", body, start + 8)
        hstart = start + 12
    else:
        raise NotSimple
    data_start = hstart + hlen
    if data_start > end:
        raise NotSimple
    match = _HEADER.fullmatch(str(body[hstart:data_start], "latin-1"))
    if match is None:
        raise NotSimple
    try:
        dtype = np.dtype(match["descr"])
    except TypeError as exc:
        raise NotSimple from exc
    if dtype.kind not in _SIMPLE_KINDS or dtype.hasobject:
        raise NotSimple
    shape = tuple(int(d) for d in match["shape"].replace(" ", "").split(",") if d)
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != end - data_start:
        raise ValueError(
            f"npy data is {end - data_start} bytes, shape {shape} of {dtype} needs "
            f"{count * dtype.itemsize}"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=data_start)
    array = array.reshape(shape, order="F" if match["fortran"] == "True" else "C")
    if not array.flags.aligned:
        array = array.copy()
    return array


def _npy_header(array: np.ndarray) -> bytes:
    """The npy format 1.0 header of a C-ordered ``array`` (data aligned to 64 bytes)."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    shape = tuple(int(d) for d in array.shape)
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = -(10 + len(header) + 1) % 64
    return (
        _NPY_MAGIC
        + b"\x01\x00"
        + struct.pack("<H", len(header) + pad + 1)
        + header.encode("latin-1")
        + b" " * pad
        + b"\n"
    )


def write_npy(array: np.ndarray) -> bytes:
    """One ``.npy`` file (format 1.0, C order) that ``np.load`` reads."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise ValueError("dtype object is not representable in npy")
    return b"".join((_npy_header(array), np.ascontiguousarray(array).data))


def write(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A ``.npz`` (stored members, npy format 1.0) that ``np.load`` reads."""
    parts: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        array = np.asarray(value)  # tobytes() below is C order whatever the layout
        if array.dtype.hasobject:
            raise ValueError(f"output {name!r} has dtype object: not representable in npz")
        npy_header = _npy_header(array)
        data = array.tobytes()
        crc = zlib.crc32(data, zlib.crc32(npy_header))
        member_size = len(npy_header) + len(data)
        if member_size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF:
            raise ValueError("output too large for the npz fast path")
        filename = f"{name}.npy".encode()
        flags = 0x800  # names are UTF-8
        parts.append(
            _LOCAL.pack(
                _LOCAL_SIG, 20, flags, 0, 0, 0x21, crc, member_size, member_size, len(filename), 0
            )
        )
        parts += [filename, npy_header, data]
        central.append(
            _CENTRAL.pack(
                _CENTRAL_SIG,
                20,
                20,
                flags,
                0,
                0,
                0x21,
                crc,
                member_size,
                member_size,
                len(filename),
                0,
                0,
                0,
                0,
                0o600 << 16,
                offset,
            )
            + filename
        )
        offset += _LOCAL.size + len(filename) + member_size
    directory = b"".join(central)
    end = _EOCD.pack(_EOCD_SIG, 0, 0, len(central), len(central), len(directory), offset, 0)
    return b"".join(parts) + directory + end
