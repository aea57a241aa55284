#!/usr/bin/env python3
"""Copies a tree and changes PERCENT of its regular files (by count, chosen at random with SEED;
with PERCENT ending in "c", clustered: that many files next to each other in path order from a
random start, as a change to a few directories of app code or one package is):
a text file gets a line appended, a binary one new random bytes of the same size; VERSION is
(re)written with TAG. Prints the number of files changed and their bytes.
Usage: bench/gen/change.py SRC DST PERCENT SEED TAG"""
import os
import random
import shutil
import sys

src, dst, percent, seed, tag = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
clustered = percent.endswith("c")
percent = float(percent.rstrip("c"))
shutil.copytree(src, dst, symlinks=True)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(dst) for f in fs
               if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
rng = random.Random(seed)
count = max(1, round(len(files) * percent / 100))
if clustered:
    start = rng.randrange(len(files) - count + 1)
    chosen = files[start:start + count]
else:
    chosen = rng.sample(files, count)
changed_bytes = 0
for path in chosen:
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:4096] or path.endswith((".png", ".jpg", ".webp", ".woff2", ".bin")):
        data = rng.randbytes(len(data))
    else:
        data += f"\n// changed: {tag}\n".encode()
    with open(path, "wb") as f:
        f.write(data)
    changed_bytes += len(data)
with open(os.path.join(dst, "VERSION"), "w") as f:
    f.write(tag + "\n")
print(len(chosen), changed_bytes)
