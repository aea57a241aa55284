#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets: fuzz/corpus/<target>/.

    python3 fuzz/seed.py [--release PATH-TO-release-BINARY]

Archives: real ones (`release package` on a small Laravel-like and a Node-like tree) and the
hostile shapes the tests build (src/archive/tests.rs, tests/it/refusals.rs): absolute paths,
`..`, symlink escapes, setuid, devices, hard links, huge sizes, zstd bombs, duplicate paths,
a file then a directory of its name, long and deep paths. An archive seed is a plain tar
stream (the targets compress it, so mutations reach the headers) unless it has to be
compressed to stay small or is about zstd itself (a bomb, a wide window): then it is the
`.tar.zst` bytes, which the targets take as they are.

Every seed is rebuilt from this file, and the whole corpus stays well under 1 MB. The seeds
are deterministic (fixed mtimes, no randomness), so regenerating changes nothing unless this
file did. Needs the `zstd` command line; `--release` (default: target/debug/release, built
with cargo when missing) for the real archives.
"""

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

FUZZ = pathlib.Path(__file__).resolve().parent
REPO = FUZZ.parent
CORPUS = FUZZ / "corpus"
ARCHIVE_TARGETS = ["archive_check", "node_unpack"]
LIMIT = 1 << 20

REGULAR, HARDLINK, SYMLINK, CHAR, BLOCK, DIRECTORY, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"


# --- raw tar, header by header (as tests/it/support/archives.rs), so nothing "fixes" a path ---


def octal(value, width):
    return b"%0*o\0" % (width - 1, value)


def header(path, kind, mode=0o644, link=b"", size=0, magic=b"ustar\x0000"):
    path = path if isinstance(path, bytes) else path.encode()
    link = link if isinstance(link, bytes) else link.encode()
    assert len(path) <= 100 and len(link) <= 100, path
    h = bytearray(512)
    h[0 : len(path)] = path
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = octal(size, 12)
    h[136:148] = octal(1700000000, 12)
    h[156:157] = kind
    h[157 : 157 + len(link)] = link
    h[257:265] = magic
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def pad(data):
    return data + b"\0" * (-len(data) % 512)


class Tar:
    def __init__(self):
        self.bytes = b""

    def entry(self, path, kind, mode=0o644, link=b"", data=b"", size=None):
        self.bytes += header(path, kind, mode, link, len(data) if size is None else size) + pad(data)
        return self

    def file(self, path, data=b"", mode=0o644):
        return self.entry(path, REGULAR, mode, data=data)

    def dir(self, path, mode=0o755):
        return self.entry(path, DIRECTORY, mode)

    def symlink(self, path, target):
        return self.entry(path, SYMLINK, 0o777, target)

    def hardlink(self, path, target):
        return self.entry(path, HARDLINK, 0o644, target)

    def long_name(self, name, kind=b"L"):
        """A GNU long-name ('L') or long-link ('K') entry for the entry that follows."""
        name = name if isinstance(name, bytes) else name.encode()
        return self.entry("././@LongLink", kind, 0o644, data=name + b"\0")

    def pax(self, records, kind=b"x"):
        body = b""
        for key, value in records:
            value = value if isinstance(value, bytes) else value.encode()
            record = b" %s=%s\n" % (key.encode(), value)
            length = len(record) + 1
            while len(str(length).encode() + record) != length:
                length += 1
            body += str(length).encode() + record
        return self.entry("PaxHeaders/x", kind, 0o644, data=body)

    def finish(self):
        return self.bytes + b"\0" * 1024

    def unfinished(self):
        return self.bytes


def zstd(data, *flags):
    return subprocess.run(["zstd", "-q", "-c", "-19", *flags], input=data, capture_output=True, check=True).stdout


# --- the seeds ------------------------------------------------------------------------------


def hostile_archives():
    """(name, bytes): every refusal the tests make, and the shapes next to them that pass."""
    t = Tar
    yield "valid-small", t().dir("public").file("public/index.php", b"<?php echo 1;").finish()
    yield "valid-root-dir", t().dir("./").dir("./app").file("./app/x", b"x").finish()
    yield "valid-migrations", (
        t()
        .dir("database/migrations")
        .file("database/migrations/2024_01_01_000000_create_users.php", b"<?php")
        .file("database/migrations/2024_02_01_000000_create_posts.php", b"<?php")
        .file("database/migrations/nested/x.php", b"<?php")
        .finish()
    )
    yield "valid-links", (
        t()
        .dir("public")
        .file("public/index.php", b"<?php")
        .symlink("entry", "public/index.php")
        .symlink("public/up", "../public")
        .hardlink("copy.php", "public/index.php")
        .file("bin/run", b"#!/bin/sh\n", mode=0o755)
        .finish()
    )
    yield "absolute-path", t().file("/etc/cron.d/evil", b"* * * * * root sh").finish()
    yield "parent-dir", t().file("public/../../../etc/passwd", b"x").finish()
    yield "symlink-escape-then-write", t().symlink("evil", "../../../etc").file("evil/cron.d/x", b"boom").finish()
    yield "write-through-symlink", t().dir("real").symlink("alias", "real").file("alias/x", b"x").finish()
    yield "symlink-absolute", t().symlink("public/passwd", "/etc/passwd").finish()
    yield "symlink-dotdot-deep", t().dir("a").symlink("a/up", "../../x").finish()
    yield "symlink-self-loop", t().symlink("loop", "loop").file("loop/x", b"x").finish()
    yield "hardlink-absolute", t().hardlink("shadow", "/etc/shadow").finish()
    yield "hardlink-parent", t().hardlink("up", "../outside").finish()
    yield "hardlink-later-file", t().hardlink("b", "a").file("a", b"x").finish()
    yield "hardlink-to-symlink", t().symlink("s", "a").file("a", b"x").hardlink("h", "s").finish()
    yield "char-device", t().entry("dev/sda", CHAR, 0o600).finish()
    yield "block-device", t().entry("dev/sdb", BLOCK, 0o600).finish()
    yield "fifo", t().entry("pipe", FIFO, 0o644).finish()
    yield "sparse", t().entry("sparse", b"S", 0o644).finish()
    yield "setuid-file", t().file("bin/su", b"\x7fELF", mode=0o4755).finish()
    yield "setgid-dir", t().dir("shared-group", mode=0o2775).finish()
    yield "setuid-root-dir", t().dir("./", mode=0o4755).finish()
    yield "shared-env", t().file("public/index.php", b"<?php").file(".env", b"APP_KEY=secret").finish()
    yield "shared-storage", t().file("storage/logs/laravel.log").finish()
    yield "duplicate-path", t().file("a", b"one").file("a", b"two").finish()
    yield "file-then-dir", t().file("a", b"x").dir("a").file("a/b").finish()
    yield "dir-then-file", t().dir("a").file("a", b"x").finish()
    yield "symlink-then-file", t().symlink("a", "b").file("a", b"x").finish()
    yield "hardlink-over-file", t().file("a", b"x").file("b", b"y").hardlink("b", "a").finish()
    yield "huge-size-truncated", t().entry("big", REGULAR, 0o644, size=(8 << 30) - 1).unfinished()
    yield "size-over-limit", t().file("big", b"x" * 600).finish()  # header claims the real size
    yield "no-end-marker", t().file("a", b"x").unfinished()
    yield "cut-mid-data", t().file("a", b"x" * 1000).unfinished()[:700]
    yield "data-after-marker", t().file("a", b"x").finish() + b"\x07" * 512
    yield "zero-padding-after-marker", t().file("a", b"x").finish() + b"\0" * 4096
    yield "bad-checksum", t().file("a", b"x").finish()[:148] + b"0000000\0" + t().file("a", b"x").finish()[156:]
    yield "non-utf8-path", t().file(b"caf\xe9", b"x").finish()
    yield "empty-path", t().file(b"", b"x").finish()
    yield "gnu-long-name", t().long_name("d" * 120 + "/" + "f" * 120).file("short", b"x").finish()
    yield "gnu-long-link", t().long_name("l" * 150, b"K").symlink("link", "x").finish()
    yield "gnu-long-name-dangling", t().long_name("x" * 200).unfinished() + b"\0" * 1024
    yield "two-long-names", t().long_name("a" * 120).long_name("b" * 120).file("x").finish()
    yield "pax-absolute", t().pax([("path", "/etc/passwd")]).file("harmless", b"x").finish()
    yield "pax-linkpath-escape", t().pax([("linkpath", "../../etc")]).symlink("l", "ok").finish()
    yield "pax-size-mismatch", t().pax([("size", "9999999999")]).file("a", b"x").finish()
    yield "pax-size-not-a-number", t().pax([("size", "lots")]).file("a", b"x").finish()
    yield "pax-global", t().pax([("comment", "hello")], b"g").file("a", b"x").finish()
    yield "pax-malformed", t().entry("PaxHeaders/x", b"x", data=b"99 path=x\n").file("a").finish()
    yield "name-256-bytes", t().long_name("n" * 256).file("x").finish()
    yield "path-4097-bytes", t().long_name("/".join(["p" * 200] * 20) + "/" + "q" * 77).file("x").finish()
    yield "old-v7-header", t().entry("v7", REGULAR).finish().replace(b"ustar\x0000", b"\0" * 8, 1)


def compressed_archives():
    """(name, .tar.zst bytes): the ones that would be too large as plain tar, and zstd's own."""
    yield "zstd-bomb-64mib", zstd(Tar().file("zeros", b"\0" * (64 << 20)).finish())
    yield "long-name-8mib", zstd(Tar().entry("././@LongLink", b"L", data=b"a" * (8 << 20)).file("x").finish())
    deep = "/".join(["a"] * 30000)
    yield "deep-30000-components", zstd(b"".join(Tar().long_name(deep + f"/f{i}").file("x").bytes for i in range(20)) + b"\0" * 1024)
    links = Tar()
    for i in range(300):
        links.long_name(f"{i:04}" + "s" * 4000).symlink("x", "target")
    yield "symlinks-long-names", zstd(links.finish())
    many = Tar()
    for i in range(2100):
        many.file(f"f{i}")
    yield "too-many-files", zstd(many.finish())
    yield "window-128mib", zstd(Tar().file("a", b"x" * 100000).finish(), "--long=27", "--ultra")
    yield "two-frames", zstd(Tar().file("a", b"x").unfinished()) + zstd(b"\0" * 1024)
    yield "truncated-frame", zstd(Tar().file("a", bytes(range(256)) * 400).finish())[:-10]
    yield "skippable-frame", b"\x50\x2a\x4d\x18\x04\0\0\0abcd" + zstd(Tar().file("a").finish())


def laravel_tree(root):
    files = {
        "artisan": "#!/usr/bin/env php\n<?php\n",
        "composer.json": '{"require": {"laravel/framework": "^11.0"}}\n',
        "app/Http/Kernel.php": "<?php // kernel\n",
        "app/Models/User.php": "<?php // user\n",
        "bootstrap/app.php": "<?php return 1;\n",
        "config/app.php": "<?php return ['name' => 'api'];\n",
        "database/migrations/2024_01_01_000000_create_users.php": "<?php // users\n",
        "database/migrations/2024_02_01_000000_create_posts.php": "<?php // posts\n",
        "public/index.php": "<?php require __DIR__.'/../bootstrap/app.php';\n",
        "public/.htaccess": "RewriteEngine On\n",
        "resources/views/welcome.blade.php": "<h1>{{ $title }}</h1>\n",
        "routes/web.php": "<?php Route::get('/', fn () => view('welcome'));\n",
        "vendor/autoload.php": "<?php // composer\n",
        ".env": "APP_KEY=base64:secret\n",
        "storage/logs/laravel.log": "",
    }
    write_tree(root, files)
    os.chmod(root / "artisan", 0o755)
    os.symlink("../storage/app/public", root / "public/storage")


def node_tree(root):
    files = {
        "package.json": '{"name": "web", "main": "server.js"}\n',
        "server.js": "require('http').createServer((q, s) => s.end('ok')).listen(3000);\n",
        "ecosystem.config.js": "module.exports = {apps: [{name: 'web', script: 'server.js'}]};\n",
        "node_modules/left-pad/package.json": '{"name": "left-pad"}\n',
        "node_modules/left-pad/index.js": "module.exports = (s, n) => s.padStart(n);\n",
        "node_modules/.bin/.keep": "",
        "dist/app.js": "console.log(1);\n",
        "dist/app.js.map": "{}\n",
    }
    write_tree(root, files)
    os.symlink("../left-pad/index.js", root / "node_modules/.bin/left-pad")


def write_tree(root, files):
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.utime(os.path.join(dirpath, name), (1700000000, 1700000000))


def real_archives(release):
    """`release package` on the trees above: its .tar.zst bytes, and the tar inside."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        for name, make, exclude in [("laravel", laravel_tree, [".env", "storage"]), ("node", node_tree, [])]:
            tree = scratch / name
            tree.mkdir()
            make(tree)
            out = scratch / f"{name}.tar.zst"
            args = [release, "package", str(tree), "--output", str(out)]
            for path in exclude:
                args += ["--exclude", path]
            subprocess.run(args, check=True, capture_output=True)
            packed = out.read_bytes()
            yield f"package-{name}", packed
            yield f"package-{name}-tar", subprocess.run(["zstd", "-d", "-q", "-c"], input=packed, capture_output=True, check=True).stdout
        # The Laravel tree with its shared paths left in: refused.
        out = scratch / "laravel-all.tar.zst"
        subprocess.run([release, "package", str(scratch / "laravel"), "--output", str(out)], check=True, capture_output=True)
        yield "package-laravel-with-shared", out.read_bytes()


def configs():
    example = (REPO / "src/config/example.toml").read_text()
    webhook = example.split("# [[webhook]]")[1]
    uncommented = "\n".join(line.removeprefix("# ") for line in webhook.splitlines())
    yield "example", example
    yield "example-with-webhook", example + "\n[[webhook]]" + uncommented
    yield "empty", ""
    yield "server", '[server]\nlisten = "0.0.0.0:8443"\ndata_dir = "/var/lib/release"\nnode_url = "https://release.example:8443"\ntrusted_proxies = ["10.0.0.0/8", "::1"]\ntls_cert = "/etc/release/cert.pem"\ntls_key = "/etc/release/key.pem"\n'
    yield "s3", '[storage]\nkind = "s3"\nendpoint = "https://s3.example"\nregion = "eu-1"\nbucket = "artifacts"\nprefix = "release/"\naccess_key = "AK"\nsecret_key = "SK"\n'
    yield "limits", '[limits]\nmax_upload_bytes = "4GiB"\nmax_unpacked_bytes = "16 GiB"\nmax_files = 1000000\nheader_timeout = "10s"\nrequest_timeout = "100ms"\n[audit]\ncheckpoint_interval = "1h"\nrefusal_window = "60s"\n'
    yield "environments", '[[environment]]\nname = "staging"\n[[environment]]\nname = "production"\npromote_from = "staging"\nrequires_approval = true\napproval_ttl = "2d"\nparallel = 3\n'
    yield "service-generic", '[service.web]\nkind = "generic"\nshared = ["uploads"]\nwritable = ["cache"]\npm2_app = "web"\n[service.web.hooks]\nfinalize = ["npm ci"]\n[service.web.env]\nNODE_ENV = "production"\n[[service.web.node]]\nenvironment = "production"\nhost = "10.0.0.5"\nuser = "deploy"\nbase = "/srv/web"\n'
    yield "webhook-secret-env", '[service.api]\n[[webhook]]\nname = "monday"\nurl = "https://hooks.example/x"\nsecret_env = "PATH"\n'
    yield "bad-types", '[limits]\nmax_files = "many"\n[server]\nlisten = 8080\n'
    yield "bad-node", '[service.api]\n[[service.api.node]]\nenvironment = "production"\nhost = "-oProxyCommand=sh"\nuser = "root;rm"\nbase = "relative"\n'


DIGEST = "sha256:" + hashlib.sha256(b"artifact").hexdigest()


def requests():
    prepare = (
        '{"op":"prepare","base":"/srv/api","digest":"%s","source":"stdin","shared":[".env","storage"],'
        '"writable":["bootstrap/cache"],"finalize":["php artisan config:cache"],"env":{"APP_ENV":"production"},'
        '"max_unpacked_bytes":17179869184,"max_files":1000000,"adopt":false,"hook_timeout_ms":600000,"fence":7}' % DIGEST
    )
    yield "prepare-stdin", (prepare + "\n").encode() + Tar().file("a", b"x").finish()[:512]
    yield "prepare-url", prepare.replace('"stdin"', '{"url":"https://s3.example/o?X-Amz-Signature=ab"}')
    yield "prepare-server", prepare.replace('"stdin"', '{"server":"https://release.example/v1/node/artifact?sig=ab"}')
    yield "prepare-present", prepare.replace('"stdin"', '"present"').replace(',"adopt":false,"hook_timeout_ms":600000,"fence":7', "")
    yield "switch", '{"op":"switch","base":"/srv/api","digest":"%s","shared":[".env"],"adopt":true,"fence":3}\n' % DIGEST
    yield "switch-none", '{"op":"switch","base":"/srv/api","digest":null}\n'
    yield "adopt", '{"op":"adopt","base":"/srv/api","shared":[".env","storage"]}\n'
    yield "read-adopted", '{"op":"read_adopted","base":"/srv/api","offset":0,"len":1048576}\n'
    yield "status", '{"op":"status","base":"/srv/api"}\n'
    yield "cleanup", '{"op":"cleanup","base":"/srv/api","keep":["%s"],"fence":1}\n' % DIGEST[7:]
    yield "fence", '{"op":"fence","base":"/srv/api","fence":18446744073709551615}\n'
    yield "exec", '{"op":"exec","base":"/srv/api","digest":null,"commands":["php artisan migrate --force"],"env":{},"hook_timeout_ms":null}\n'
    yield "health", '{"op":"health","url":"http://127.0.0.1:8000/health","expect":"%s","timeout_ms":5000}\n' % DIGEST
    yield "pm2-cwd", '{"op":"pm2_cwd","base":"/srv/web","digest":"%s","app":"web","env":{"PM2_HOME":"/home/deploy/.pm2"}}\n' % DIGEST
    yield "unknown-op", '{"op":"format_disk","base":"/"}\n'
    yield "unknown-field", '{"op":"status","base":"/srv/api","extra":true}\n'
    yield "escaped", '{"op":"status","base":"/srv/\\u0061pi\\ud83d\\ude00"}\n'
    yield "empty", ""


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", help="the release binary (for `release package`)")
    args = parser.parse_args()
    release = args.release or str(REPO / "target/debug/release")
    if not args.release and not os.access(release, os.X_OK):
        subprocess.run(["cargo", "build", "--quiet", "--bin", "release"], cwd=REPO, check=True)

    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    archives = [*hostile_archives(), *compressed_archives(), *real_archives(release)]
    for target in ARCHIVE_TARGETS:
        for name, data in archives:
            write(target, name, data)
    for name, text in configs():
        write("config_parse", name + ".toml", text)
    for name, line in requests():
        write("node_request", name, line)

    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    print(f"{sum(1 for f in CORPUS.rglob('*') if f.is_file())} seeds, {total} bytes in {CORPUS}")
    if total > LIMIT:
        sys.exit(f"the corpus is {total} bytes, over the {LIMIT} this repository keeps")


if __name__ == "__main__":
    main()
