#!/usr/bin/env python3
"""Reference outputs of MLX's affine quantization (docs formats.md §7.1; ml-explore/mlx
mlx/backend/cpu/quantized.cpp `quantize`) for tests/test_quant.c, in pure Python 3 (no numpy).

MLX computes in float32: every arithmetic step below is rounded to float32 (struct), which is exact
emulation for +, -, *, / (a double holds the exact result of one float32 operation well enough that
rounding it again to float32 gives the correctly rounded float32 result). rint is ties-to-even
(Python's round). Writes tests/fixtures/quant/mlx_quant_ref.safetensors by hand:

  <name>.w       F32 [rows, cols]            the input
  <name>.b<B>.wq U32 [rows, cols * B / 32]   packed codes, LSB first
  <name>.b<B>.scales / .biases F32 [rows, cols / group]

for layouts <name> = c<cols>_g<group>, and mid<B>_g32 (values on exact rounding midpoints for
B bits; only B). The header's __metadata__ records each layout's group size.

  python3 tools/mlx_quant_ref.py [OUT.safetensors]
"""
import json
import math
import os
import random
import struct
import sys

BITS = (2, 3, 4, 5, 6, 8)


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def rint(x):
    """std::rint in the default rounding mode: to nearest, ties to even (x is a float32 value)."""
    if math.isinf(x) or math.isnan(x):
        return x
    r = float(round(x))
    return math.copysign(r, x) if r == 0 else r


def quantize_group(w, bits):
    """MLX's CPU kernel, one group: (codes, scale, bias)."""
    n_bins = f32((1 << bits) - 1)
    eps = f32(1e-7)
    w_min, w_max = math.inf, -math.inf
    for v in w:  # std::max(w_max, v), std::min(w_min, v)
        w_max = v if w_max < v else w_max
        w_min = v if v < w_min else w_min
    mask = abs(w_min) > abs(w_max)
    d = f32(f32(w_max - w_min) / n_bins)
    scale = eps if d < eps else d
    scale = scale if mask else -scale
    edge = w_min if mask else w_max
    q0 = rint(f32(edge / scale))
    bias = 0.0
    if q0 != 0:
        scale = f32(edge / q0)
        bias = edge
    codes = []
    for v in w:
        q = rint(f32(f32(v - bias) / scale))
        q = 0.0 if q < 0 else q  # std::max(q, 0.0f)
        q = n_bins if n_bins < q else q  # std::min(q, n_bins)
        codes.append(int(q))
    return codes, scale, bias


def pack_row(codes, bits):
    """The row as one little-endian bit stream, LSB first, read as little-endian uint32 words."""
    acc = 0
    for i, q in enumerate(codes):
        acc |= q << (i * bits)
    nbytes = len(codes) * bits // 8
    raw = acc.to_bytes(nbytes, "little")
    return list(struct.unpack("<%dI" % (nbytes // 4), raw))


def quantize(rows, cols, group, bits):
    wq, scales, biases = [], [], []
    for row in rows:
        codes = []
        for g in range(cols // group):
            c, s, b = quantize_group(row[g * group:(g + 1) * group], bits)
            codes += c
            scales.append(s)
            biases.append(b)
        wq += pack_row(codes, bits)
    return wq, scales, biases


# ---- inputs: random groups and the edge cases, one case per group, rotating over the rows ----

def group_cases(rng, group):
    g = lambda: [f32(rng.gauss(0, 0.05)) for _ in range(group)]
    cases = []
    cases.append(g())                                           # random
    c = f32(rng.uniform(-1, 1))
    cases.append([c] * group)                                   # constant, nonzero
    cases.append([0.0] * group)                                 # constant zero
    cases.append([f32(-0.75)] * group)                          # constant negative
    w = [f32(rng.gauss(0, 0.01)) for _ in range(group)]
    w[rng.randrange(group)] = f32(1000.0)                       # one huge positive outlier
    cases.append(w)
    w = [f32(rng.gauss(0, 0.01)) for _ in range(group)]
    w[rng.randrange(group)] = f32(-3.0e4)                       # one huge negative outlier
    cases.append(w)
    cases.append([f32(rng.uniform(-1, 0.1)) for _ in range(group)])   # negative-dominant
    cases.append([f32(rng.uniform(-0.1, 1)) for _ in range(group)])   # positive-dominant
    cases.append([f32(1.0 + rng.uniform(0, 1e-7)) for _ in range(group)])  # range below eps * n_bins
    cases.append([f32(rng.uniform(-1e-30, 1e-30)) for _ in range(group)])  # tiny
    w = [f32(rng.uniform(0.1, 0.9)) for _ in range(group)]
    w[0], w[1] = f32(0.0), f32(1.0)                             # |min| == |max| ties: w_max wins
    w[2] = f32(-1.0)
    cases.append(w)
    cases.append([f32(rng.uniform(-2, 2)) for _ in range(group)])  # wide, mixed sign
    return cases


def layout_rows(rng, rows, cols, group):
    cases = []
    while len(cases) < rows * cols // group:
        cases += group_cases(rng, group)
    out = []
    for r in range(rows):
        row = []
        for gi in range(cols // group):
            row += cases[r * (cols // group) + gi]
        out.append(row)
    return out


def midpoint_rows(rng, bits, group):
    """Groups whose (w - bias) / scale land exactly on k + 0.5 (ties to even), scale +-0.25."""
    n = (1 << bits) - 1
    step = 0.25
    pos = [0.0, n * step] + [(rng.randrange(n) + 0.5) * step for _ in range(group - 2)]  # edge w_max
    neg = [-n * step, 0.0] + [-(rng.randrange(n) + 0.5) * step for _ in range(group - 2)]  # edge w_min
    shift = [v + 1.0 for v in pos]  # offset: bias 1 + n/4, still exact in float32
    return [[f32(v) for v in r] for r in (pos, neg, shift)]


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    off = 0
    blobs = []
    for name, dtype, shape, values in tensors:
        fmt = {"F32": "f", "U32": "I"}[dtype]
        raw = struct.pack("<%d%s" % (len(values), fmt), *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "tests", "fixtures", "quant",
                                                            "mlx_quant_ref.safetensors")
    rng = random.Random(20240607)
    tensors, meta = [], {}
    layouts = [("c64_g32", 12, 64, 32), ("c128_g64", 6, 128, 64), ("c128_g128", 12, 128, 128)]
    for name, rows, cols, group in layouts:
        w = layout_rows(rng, rows, cols, group)
        meta[name] = str(group)
        tensors.append((name + ".w", "F32", [rows, cols], sum(w, [])))
        for bits in BITS:
            wq, s, b = quantize(w, cols, group, bits)
            p = "%s.b%d" % (name, bits)
            tensors.append((p + ".wq", "U32", [rows, cols * bits // 32], wq))
            tensors.append((p + ".scales", "F32", [rows, cols // group], s))
            tensors.append((p + ".biases", "F32", [rows, cols // group], b))
    for bits in BITS:
        name = "mid%d_g32" % bits
        w = midpoint_rows(rng, bits, 32)
        meta[name] = "32"
        tensors.append((name + ".w", "F32", [len(w), 32], sum(w, [])))
        wq, s, b = quantize(w, 32, 32, bits)
        p = "%s.b%d" % (name, bits)
        tensors.append((p + ".wq", "U32", [len(w), bits], wq))
        tensors.append((p + ".scales", "F32", [len(w), 1], s))
        tensors.append((p + ".biases", "F32", [len(w), 1], b))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_safetensors(out, tensors, meta)
    print("wrote %s (%d tensors, %d bytes)" % (out, len(tensors), os.path.getsize(out)))


if __name__ == "__main__":
    main()
