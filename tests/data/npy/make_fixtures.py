#!/usr/bin/env python3
"""Regenerates the .npy fixtures of tests/test_npy.cpp: run `python3 make_fixtures.py` in this folder."""
import io

import numpy as np


def save(name, array, version=None):
    with open(name, "wb") as f:
        np.lib.format.write_array(f, array, version=version, allow_pickle=False)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=(1, 0))
    return buffer.getvalue()


f4_3x4 = np.arange(12, dtype="<f4").reshape(3, 4)
save("f4_3x4.npy", f4_3x4)                                            # good float32 matrix, values 0..11
save("f4_0x8.npy", np.zeros((0, 8), dtype="<f4"))                     # good, an empty batch
save("f4_4.npy", np.array([0.5, -1.0, 2.25, 3.0], dtype="<f4"))       # 1-D: good vector, wrong rank for a matrix
save("i4_3.npy", np.array([-2**31, 7, 2**31 - 1], dtype="<i4"))       # good int32, its extremes
save("i8_3.npy", np.array([-2**31, 7, 2**31 - 1], dtype="<i8"))       # good int64 whose values fit int32
save("i8_too_big.npy", np.array([1, 2**40, 3], dtype="<i8"))          # int64 value that does not fit int32
save("f8_3x4.npy", f4_3x4.astype("<f8"))                              # float64: wrong dtype for float32
save("f4_big_endian.npy", f4_3x4.astype(">f4"))                       # big-endian '>f4'
save("f4_fortran.npy", np.asfortranarray(f4_3x4))                     # 'fortran_order': True
save("f4_v2.npy", f4_3x4, version=(2, 0))                             # format 2.0: uint32 header length
with open("f4_truncated.npy", "wb") as f:                             # last 4 data bytes cut off
    f.write(npy_bytes(f4_3x4)[:-4])
with open("f4_trailing.npy", "wb") as f:                              # 4 bytes after the data
    f.write(npy_bytes(f4_3x4) + b"\0\0\0\0")
with open("bad_magic.npy", "wb") as f:                                # not a .npy file at all
    f.write(b"0,1,2,3\n4,5,6,7\n8,9,10,11\n")
