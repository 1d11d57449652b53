#!/usr/bin/env bash
# Builds a small report from real runs (`parex bench --quick`, `parex analyze` and a traced
# `parex run` of one mainnet block), screenshots it
# with headless Chromium and checks that the PNG shows the charts. Not part of CI.
#
#   scripts/report-screenshot.sh [OUT_DIR]     (default: target/report-screenshot)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/report-screenshot}
mkdir -p "$out"
out=$(cd "$out" && pwd)

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "installing chromium (Debian package)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    browser=$(command -v chromium)
fi

cargo build --release --bin parex
parex=target/release/parex

# Real measurements: a quick bench at 1 and 2 threads (mainnet included, for the scatter),
# the analysis of a mainnet block, and a traced run of that block.
"$parex" bench --quick --threads 1,2 --repeat 1 --json "$out/bench.json" >/dev/null
"$parex" analyze --block 12244000 --json "$out/analyze.json" >/dev/null
"$parex" run --block 12244000 --engine block-stm --threads 2 --trace "$out/trace.json" >/dev/null
"$parex" report "$out/bench.json" --trace "$out/trace.json" --analyze "$out/analyze.json" \
    -o "$out/report.html"

shot() { # FILE WIDTH HEIGHT
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --force-device-scale-factor=1 --screenshot="$1" --window-size="$2,$3" \
        "file://$out/report.html" >/dev/null 2>&1
}
shot "$out/report.png" 1400 3000       # the top: speedup, throughput, mainnet charts
shot "$out/report-full.png" 1400 9000  # the whole page: timeline, dependencies, tables
echo "screenshots in $out"

# The PNG is not blank and shows the charts' colors (pure Python: no imaging library).
python3 - "$out/report.png" "$out/report-full.png" <<'PY'
import struct, sys, zlib

def pixels(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert depth == 8 and ctype in (2, 6), f"{path}: unexpected PNG format"
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), w * bpp
    prev, rows, i = bytearray(stride), [], 0
    for _ in range(h):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            if f == 1: line[x] = (line[x] + a) & 255
            elif f == 2: line[x] = (line[x] + b) & 255
            elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows

def count(path, colors):
    w, h, bpp, rows = pixels(path)
    want = {bytes.fromhex(c.lstrip("#")): c for c in colors}
    found = dict.fromkeys(colors, 0)
    non_white = 0
    for row in rows:
        for x in range(0, w * bpp, bpp):
            px = row[x:x + 3]
            if px != b"\xff\xff\xff":
                non_white += 1
            if px in want:
                found[want[px]] += 1
    return w, h, non_white, found

ok = True
for path, colors in [
    (sys.argv[1], ["#2563eb", "#d97706", "#059669", "#9333ea"]),   # engine bars and points
    (sys.argv[2], ["#3b82f6", "#22c55e", "#0d9488"]),               # spans, histogram
]:
    w, h, non_white, found = count(path, colors)
    share = non_white / (w * h)
    print(f"{path}: {w}x{h}, {share:.1%} non-white, chart colors {found}")
    if share < 0.01 or any(v < 200 for v in found.values()):
        ok = False
        print(f"{path}: looks blank or lacks a chart color")
sys.exit(0 if ok else 1)
PY
