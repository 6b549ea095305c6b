"""One extended-XYZ frame through libextxyz's C parser (PyPI ``extxyz``), as the ``Atoms`` ASE would make.

ASE's reader spends most of a small frame in Python loops over the comment line and the atom lines;
libextxyz parses both in C. Its dicts become ``Atoms`` by the steps of ``ase.io.extxyz._read_xyz_frame``:
``Lattice`` transposed is the cell, ``pbc`` defaults to periodic when there is a lattice, columns are
renamed as ASE renames them, and calculator properties (``energy``, ``forces``, ...) go to a
``SinglePointCalculator`` (``set_calc_and_arrays``). Where the two parsers differ, ASE's result is kept: a
flat 9-number value of a key other than ``Lattice``/``stress``/``virial`` stays flat (libextxyz makes it a
3x3 matrix) and string values are converted by ASE's rules (``nan``, ``"T F T"``, JSON). The C parser reads
a ``FILE *``, so the frame's bytes are opened with ``fmemopen``.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
from ase import Atoms
from ase.io.extxyz import REV_PROPERTY_NAME_MAP, SPECIAL_3_3_KEYS, key_val_str_to_dict, set_calc_and_arrays
from extxyz import cextxyz

_fmemopen = ctypes.CDLL(None, use_errno=True).fmemopen
_fmemopen.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p]
_fmemopen.restype = cextxyz.FILE_ptr
_WORD = re.compile(r"[^\s,]+")
_BOOLS = {"T", "F", "true", "false", "True", "False", "TRUE", "FALSE"}


def _ase_string_value(key: str, value: str) -> object:
    """ASE's value for a string libextxyz left as is: unchanged unless ASE reads numbers, bools or JSON."""
    if _WORD.fullmatch(value) and value not in _BOOLS:
        try:
            float(value)
        except ValueError:
            return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return key_val_str_to_dict(f'{key}="{escaped}"')[key]


def parse(data: bytes) -> Atoms:
    """The frame in ``data`` (count line, comment line, atom lines); raises on anything it cannot read.

    The C parser crashes the process on a count of 0 (and on counts far beyond the text), so the count is
    checked against the lines first."""
    count_line, _, rest = data.partition(b"\n")
    n_atoms = int(count_line)
    n_lines = rest.count(b"\n") + (bool(rest) and not rest.endswith(b"\n"))  # comment and atom lines
    if not 0 < n_atoms <= n_lines - 1:
        raise ValueError(f"atom count {n_atoms} with {max(n_lines - 1, 0)} atom lines")
    fp = _fmemopen(data, len(data), b"r")
    if not fp.value:
        raise OSError(ctypes.get_errno(), "fmemopen failed")
    try:
        _, info, arrays = cextxyz.read_frame_dicts(fp, use_cleri=False)
    finally:
        cextxyz.cfclose(fp)
    info.pop("Properties", None)
    for key, value in info.items():
        if isinstance(value, str):
            info[key] = _ase_string_value(key, value)
        elif key not in SPECIAL_3_3_KEYS and np.shape(value) == (3, 3):
            info[key] = value.ravel(order="F")
    pbc = info.pop("pbc") if "pbc" in info else "Lattice" in info
    cell = info.pop("Lattice").T if "Lattice" in info else None
    arrays = {REV_PROPERTY_NAME_MAP.get(name, name): value for name, value in arrays.items()}
    if "move_mask" in arrays:
        raise NotImplementedError("move_mask constraints are left to ASE")
    numbers = arrays.pop("numbers", None)
    symbols = arrays.pop("symbols", None)
    atoms = Atoms(
        numbers if numbers is not None else [s.capitalize() for s in symbols],
        positions=arrays.pop("positions", None),
        charges=arrays.pop("initial_charges", None),
        cell=cell,
        pbc=pbc,
        info=info,
    )
    set_calc_and_arrays(atoms, arrays)
    return atoms
