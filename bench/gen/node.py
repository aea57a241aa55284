#!/usr/bin/env python3
"""A Node-like tree (~25,000 files, ~150 MB): node_modules/ with ~900 packages (package.json,
README, LICENSE, lib/ and dist/ JavaScript, type declarations, source maps), the app's src/ and
dist/, and incompressible public/ images. Deterministic (fixed seed). Usage: bench/gen/node.py DIR"""
import json
import os
import random
import sys

root = sys.argv[1]
rng = random.Random(20261204)
vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_$") for _ in range(rng.randint(2, 12))) for _ in range(5000)]
kw = ["const", "let", "function", "return", "=>", "module.exports", "require(", "if (", "else", "new", "this.",
      "async", "await", "null", "undefined", "true", "false", "export", "import", "{", "}", "(", ");"]


def js(n_words):
    body = rng.choices(vocab + kw * 30, k=n_words)
    return "'use strict';\n" + "\n".join(" ".join(body[i:i + 10]) + ";" for i in range(0, len(body), 10)) + "\n"


def write(path, data):
    p = os.path.join(root, path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


files = 0
pkg = 0
while files < 24_000:
    name = f"pkg{pkg}" if pkg % 5 else f"@scope{pkg % 40}/pkg{pkg}"
    base = f"node_modules/{name}"
    write(f"{base}/package.json", json.dumps({"name": name, "version": f"1.{pkg % 17}.{pkg % 5}", "main": "lib/index.js"}, indent=2) + "\n")
    write(f"{base}/README.md", " ".join(rng.choices(vocab, k=rng.randint(50, 600))) + "\n")
    write(f"{base}/LICENSE", "MIT License\n\nPermission is hereby granted, free of charge, to any person...\n")
    files += 3
    for j in range(max(1, int(rng.lognormvariate(2.4, 0.9)))):
        sub = ["lib", "lib/internal", "dist", "dist/esm", "src"][j % 5]
        write(f"{base}/{sub}/m{j}.js", js(int(rng.lognormvariate(5.6, 1.0)) + 20))
        files += 1
        if j % 3 == 0:
            write(f"{base}/{sub}/m{j}.d.ts", "export declare " + " ".join(rng.choices(vocab, k=rng.randint(20, 200))) + ";\n")
            files += 1
        if j % 4 == 1:
            write(f"{base}/{sub}/m{j}.js.map", '{"version":3,"mappings":"' + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/;,", k=rng.randint(500, 8000))) + '"}\n')
            files += 1
    pkg += 1
for i in range(300):
    write(f"src/{['routes', 'models', 'services', 'lib', 'middleware'][i % 5]}/f{i}.js", js(rng.randint(100, 1200)))
for i in range(80):
    write(f"dist/chunk{i}.js", js(rng.randint(2000, 12000)))
for i in range(40):
    write(f"public/img/asset{i}.{['png', 'jpg', 'webp', 'woff2'][i % 4]}", rng.randbytes(rng.randint(100_000, 900_000)))
write("package.json", json.dumps({"name": "app", "private": True, "main": "src/server.js"}, indent=2) + "\n")
write("package-lock.json", json.dumps({"packages": {f"node_modules/pkg{i}": {"version": "1.0.0"} for i in range(pkg)}}, indent=2) + "\n")
write("src/server.js", js(400))
