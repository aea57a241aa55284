#!/usr/bin/env python3
"""What a release costs a node: its prepare, beside `zstd -dc | tar -x` of the same artifact on
the same file system, and what a release that changes 1%, 10% or 50% of the files costs after
a full one (issue 15, parts 1 and 2).

One `release serve` with a local store and one local node per service (`host = "local"`: the
agent is a child of the server, no SSH; the artifact reaches it on its stdin), all on one bench
file system of its own: a tmpfs (default) or, with --fs ext4, a journaled ext4 loop file (the
work disk of the dev machines is ext4 without a journal, where unpacking after deletes is
10-20x slower: node work never runs there). Each run r deploys, on a node that holds nothing:

  1. the full Laravel-like tree (v0): the prepare phase's time from the release's own record
     (`release show --json`, deployments[phase=prepare] finished_at - started_at: the agent
     started, the artifact streamed, unpacked and checked, shared paths linked, renamed into
     place); baseline: `zstd -dc ART | tar -x -C DIR` of the same artifact in a fresh directory
     on the same file system (wall time);
  2. then v0 with 1% of its files changed: prepare time (goal <= 0.2x the full one), the disk
     blocks it added (`du -s -B1` of the node's base before and after: st_blocks, a hard-linked
     inode counted once; goal <= 10% of the first release's) and the bytes the node was sent;
  3. then 10% and 50% changed (each against v0): bytes sent and prepare time;
  4. then 1% changed again, clustered (adjacent files in path order: a few directories, as a
     change to app code or one package is): bytes sent and prepare time.

Beside them, the link floor: `cp -al` of the first release (a directory made for each of its
directories, a hard link for each of its files), alone and followed by syncfs(2) of the copy
(durable, as a prepare's release is before it is marked ready); and the bare floor, the same
tree made here with nothing checked (mkdir(2) of each directory, link(2) of each file in two
threads, syncfs(2), a marker file and the fsync of its directory): what a release that shares
every file costs on this file system at the least, whatever makes it. The bench file system is
flushed (syncfs) before each deploy and each baseline (what one removes is flushed before the
next), so that a prepare's own flush pays for its own writes (and the server's registry and log
writes of that deploy, on the same file system), not for a baseline's files written or removed
just before.

Bytes sent to the node: the `wchar` (bytes passed to write(2)) of the server's threads over the
deploy (/proc/PID/task/TID/io, summed; not /proc/PID/io, which adds the reaped agent's own writes
of the unpacked files), which is what it wrote to the agent's stdin plus its own registry and log
writes. The same counter over a deploy that sends no artifact (a rollback to a release the node
holds) is printed beside it: that much of the figure is not artifact bytes. When nodes fetch
frames by range (issue 15 part 2) this counts what the server sent them.

Also, with --node-tree, the full prepare of the Node-like tree beside its `zstd -dc | tar -x`.

Usage: bench/prepare.py --binary PATH --tree DIR [--node-tree DIR] [--runs N] [--fs tmpfs|ext4]
                        [--json FILE]            (root: mount)
Everything it starts or mounts is removed on exit, also on SIGTERM.
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import threading
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
# Percent of the files changed: at random over the tree, or ("1c") clustered in path order.
CHANGES = ["1", "10", "50", "1c"]


def syncfs(path):
    """syncfs(2) of the file system holding `path`, in this process (no `sync -f` started)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            sys.exit(f"syncfs {path}: errno {ctypes.get_errno()}")
    finally:
        os.close(fd)


def say(msg):
    print(f"{time.strftime('%H:%M:%S')}  {msg}", file=sys.stderr, flush=True)


def ts(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, args):
        self.args = args
        self.binary = os.path.abspath(args.binary)
        self.root = None
        self.mounted = False
        self.image = None
        self.server = None

    # --- set-up and clean-up -------------------------------------------------------------
    def mount(self):
        self.root = tempfile.mkdtemp(prefix="release-bench-prepare-", dir="/tmp")
        if self.args.fs == "ext4":
            fd, self.image = tempfile.mkstemp(prefix="release-bench-prepare-", suffix=".img", dir="/var/tmp")
            os.close(fd)
            os.truncate(self.image, 6 << 30)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "has_journal", self.image], check=True)
            subprocess.run(["mount", "-o", "loop", self.image, self.root], check=True)
            self.fs = f"journaled ext4 loop file ({self.image}, 6 GiB)"
        else:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6g,mode=755", "release-bench-prepare", self.root], check=True)
            self.fs = "tmpfs (6 GiB)"
        self.mounted = True

    def cleanup(self):
        if self.server and self.server.poll() is None:
            try:
                os.killpg(self.server.pid, signal.SIGTERM)
                self.server.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.server.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.mounted:
            if subprocess.run(["umount", self.root]).returncode != 0:
                subprocess.run(["umount", "-l", self.root])
            self.mounted = False
        if self.image and os.path.exists(self.image):
            os.remove(self.image)
        if self.root and os.path.isdir(self.root):
            os.rmdir(self.root)

    # --- helpers ---------------------------------------------------------------------------
    def cli(self, *argv):
        out = subprocess.run([self.binary, *argv, "--json"], capture_output=True, text=True, env=self.env, timeout=300)
        if out.returncode != 0:
            sys.exit(f"release {' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()} {out.stdout.strip()}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wchar(self):
        """wchar of each of the server's live threads (/proc/PID/task/TID/io): not its whole
        /proc/PID/io, which also adds the reaped agents' own writes (the unpacked files)."""
        counts = {}
        for tid in os.listdir(f"/proc/{self.server.pid}/task"):
            try:
                with open(f"/proc/{self.server.pid}/task/{tid}/io") as f:
                    counts[tid] = int(re.search(r"^wchar: (\d+)", f.read(), re.M).group(1))
            except FileNotFoundError:
                pass  # the thread ended meanwhile
        return counts

    @staticmethod
    def written(before, after):
        # a thread that ended during the deploy is lost (the blocking pool's: file reads and
        # registry work, not the pipe to the agent, which the runtime's workers write)
        return sum(n - before.get(tid, 0) for tid, n in after.items())

    def blocks(self, path):
        return int(subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True).stdout.split()[0])

    def deploy(self, service, digest, rollback=False):
        """Deploys (or rolls back); the prepare phase's seconds (None if none) and the wchar delta.
        The file system is flushed first: the prepare's own flush pays for its own work only."""
        self.settle()
        before = self.wchar()
        if rollback:
            release = self.cli("rollback", service, "--env", "staging", "--wait")
        else:
            release = self.cli("deploy", service, "--env", "staging", digest, "--wait")
        sent = self.written(before, self.wchar())
        shown = self.cli("show", str(release["id"]))
        if shown["state"] != "live":
            sys.exit(f"release {release['id']} of {service} ended {shown['state']}: {json.dumps(shown)[:2000]}")
        prep = [d for d in shown["deployments"] if d["phase"] == "prepare"]
        seconds = ts(prep[0]["finished_at"]) - ts(prep[0]["started_at"]) if prep else None
        return seconds, sent

    def settle(self):
        """Flushes the bench file system (syncfs): what a baseline wrote and removed is not left
        for the next prepare's own flush to pay for (on ext4, a journal commit of ~13,000 unlinks).
        The server's data and log are on it too: what it writes during a deploy still is."""
        syncfs(self.root)

    def link_floor(self, release):
        """Wall times of `cp -al` of a prepared release (mkdir of every directory, a hard link of
        every file), and of it followed by syncfs(2) of the copy (as `sync -f` does): what linking every
        file costs on this file system whatever the unpacker, and that made durable, as a
        prepare makes its release before marking it ready."""
        dest = os.path.join(self.root, "link-floor")
        self.settle()
        start = time.perf_counter()
        subprocess.run(["cp", "-al", release, dest], check=True)
        linked = time.perf_counter() - start
        syncfs(dest)
        durable = time.perf_counter() - start
        subprocess.run(["rm", "-rf", dest], check=True)
        return linked, durable

    def bare_floor(self, release):
        """Wall time of the least a durable tree of links takes, with nothing checked: mkdir(2)
        of each directory of the release, link(2) of each file (by names in directories held
        open) in two threads, syncfs(2), then a marker created and its directory fsync'd (as a
        prepare marks a release ready). What any unpacker sharing every file pays on this file
        system, give or take Python's own time per call."""
        # (directory relative to the release, the names to link in it: files, and symbolic
        # links, to directories too, linked as links as cp -al does), parents first
        tree = []
        for root, ds, fs in os.walk(release):
            links = [d for d in ds if os.path.islink(os.path.join(root, d))]
            tree.append((os.path.relpath(root, release), fs + links))
        dest = os.path.join(self.root, "bare-floor")
        made = [os.path.normpath(os.path.join(dest, rel)) for rel, _ in tree]
        count, half, before = sum(len(fs) for _, fs in tree), 0, 0
        while half < len(tree) and before < count // 2:
            before += len(tree[half][1])
            half += 1
        failed = []
        self.settle()
        start = time.perf_counter()
        for path in made:
            os.mkdir(path)

        def link(part):
            try:
                for rel, fs in part:
                    src = os.open(os.path.join(release, rel), os.O_RDONLY | os.O_DIRECTORY)
                    dst = os.open(os.path.join(dest, rel), os.O_RDONLY | os.O_DIRECTORY)
                    for f in fs:
                        os.link(f, f, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
                    os.close(src)
                    os.close(dst)
            except OSError as e:
                failed.append(e)
        other = threading.Thread(target=link, args=(tree[half:],))
        other.start()
        link(tree[:half])
        other.join()
        if failed:
            sys.exit(f"the bare floor's links failed: {failed[0]}")
        syncfs(dest)
        open(os.path.join(self.root, "bare-floor-ready"), "w").close()
        fd = os.open(self.root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - start
        os.unlink(os.path.join(self.root, "bare-floor-ready"))
        subprocess.run(["rm", "-rf", dest], check=True)
        return seconds

    def untar(self, artifact):
        dest = os.path.join(self.root, "baseline")
        os.makedirs(dest)
        self.settle()
        start = time.perf_counter()
        subprocess.run(f"zstd -dcq '{artifact}' | tar -x -C '{dest}'", shell=True, check=True)
        seconds = time.perf_counter() - start
        shutil.rmtree(dest)
        return seconds

    # --- the bench ---------------------------------------------------------------------------
    def run(self):
        a = self.args
        self.mount()
        say(f"bench root {self.root} on {self.fs}")
        art = os.path.join(self.root, "art")
        os.makedirs(art)
        trees = {"laravel": a.tree}
        if a.node_tree:
            trees["node"] = a.node_tree
        arts, sizes, changed = {}, {}, {}
        for name, tree in trees.items():
            arts[name] = os.path.join(art, f"{name}.tar.zst")
            subprocess.run([self.binary, "package", tree, "-o", arts[name]], check=True, capture_output=True)
        for pct in CHANGES:
            tree = os.path.join(self.root, f"changed{pct}")
            out = subprocess.run([sys.executable, os.path.join(HERE, "gen", "change.py"), a.tree, tree, pct, pct.rstrip("c"), f"changed-{pct}"],
                                 check=True, capture_output=True, text=True).stdout.split()
            changed[pct] = {"files": int(out[0]), "bytes": int(out[1])}
            arts[f"c{pct}"] = os.path.join(art, f"c{pct}.tar.zst")
            subprocess.run([self.binary, "package", tree, "-o", arts[f"c{pct}"]], check=True, capture_output=True)
            shutil.rmtree(tree)
        sizes = {k: os.path.getsize(v) for k, v in arts.items()}
        files = {name: sum(len(f) for _, _, f in os.walk(tree)) for name, tree in trees.items()}

        data = os.path.join(self.root, "server")
        os.makedirs(data)
        services = [f"s{r}" for r in range(1, a.runs + 1)] + ([f"n{r}" for r in range(1, a.runs + 1)] if a.node_tree else [])
        with open(os.path.join(self.root, "release.toml"), "w") as f:
            f.write(f'[server]\nlisten = "127.0.0.1:0"\ndata_dir = "{data}"\n\n[[environment]]\nname = "staging"\n')
            for s in services:
                os.makedirs(os.path.join(self.root, "nodes", s))
                f.write(f'\n[service.{s}]\nkind = "generic"\nkeep = 10\n[[service.{s}.node]]\nenvironment = "staging"\n'
                        f'host = "local"\nbase = "{self.root}/nodes/{s}"\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELEASE_")}
        token = json.loads(subprocess.run([self.binary, "token", "create", "bench", "--role", "admin", "--owner", "bench",
                                           "--data-dir", data, "--json"], check=True, capture_output=True, env=self.env).stdout)["token"]
        log = open(os.path.join(self.root, "server.log"), "w")
        self.server = subprocess.Popen([self.binary, "serve", "--config", os.path.join(self.root, "release.toml")],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                       env={**self.env, "RELEASE_LOG": "warn,release::cli=info"}, start_new_session=True)
        url = None
        for _ in range(200):
            m = re.search(r"listening on (http://[0-9.]+:\d+)", open(os.path.join(self.root, "server.log")).read())
            if m:
                url = m.group(1)
                break
            time.sleep(0.05)
        if not url:
            # listening is logged at info: read the port from /proc if the log level hides it
            sys.exit("the server did not start: " + open(os.path.join(self.root, "server.log")).read())
        self.env.update(RELEASE_SERVER=url, RELEASE_TOKEN=token)
        digests = {}
        for s in services:
            kinds = ["laravel"] + [f"c{p}" for p in CHANGES] if s.startswith("s") else ["node"]
            for k in kinds:
                digests[k] = self.cli("upload", arts[k], "--service", s, "--version", k)["digest"]
        say(f"server up at {url}; {len(services)} services; artifacts uploaded")

        res = {"full": [], "full_untar": [], "node_full": [], "node_untar": [], "blocks_full": [],
               "rollback_wchar": [], "link_floor": [], "durable_link_floor": [], "bare_floor": []}
        for p in CHANGES:
            res[f"c{p}"], res[f"c{p}_wchar"], res[f"c{p}_blocks"] = [], [], []
        res["full_wchar"] = []
        for r in range(1, a.runs + 1):
            s, base = f"s{r}", os.path.join(self.root, "nodes", f"s{r}")
            b0 = self.blocks(base)
            t, sent = self.deploy(s, digests["laravel"])
            res["full"].append(t)
            res["full_wchar"].append(sent)
            res["blocks_full"].append(self.blocks(base) - b0)
            res["full_untar"].append(self.untar(arts["laravel"]))
            linked, durable = self.link_floor(os.path.join(base, "releases", digests["laravel"].split(":")[1]))
            res["link_floor"].append(linked)
            res["durable_link_floor"].append(durable)
            res["bare_floor"].append(self.bare_floor(os.path.join(base, "releases", digests["laravel"].split(":")[1])))
            for p in CHANGES:
                b0 = self.blocks(base)
                t, sent = self.deploy(s, digests[f"c{p}"])
                res[f"c{p}"].append(t)
                res[f"c{p}_wchar"].append(sent)
                res[f"c{p}_blocks"].append(self.blocks(base) - b0)
            _, sent = self.deploy(s, None, rollback=True)
            res["rollback_wchar"].append(sent)
            if a.node_tree:
                t, _ = self.deploy(f"n{r}", digests["node"])
                res["node_full"].append(t)
                res["node_untar"].append(self.untar(arts["node"]))
            say(f"run {r}: full {res['full'][-1]:.3f} s (untar {res['full_untar'][-1]:.3f}), "
                + ", ".join(f"{p}% {res[f'c{p}'][-1]:.3f} s" for p in CHANGES))
        return {"fs": self.fs, "runs": a.runs, "files": files, "artifact_bytes": sizes, "changed": changed,
                "source": "release show --json: deployments[phase=prepare] (local node, artifact on the agent's stdin)",
                **res}


def report(r):
    med = statistics.median
    print(f"\nrelease node prepare bench, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, "
          f"node work on {r['fs']}, medians of {r['runs']}")
    print(f"laravel-like tree: {r['files']['laravel']} files, artifact {r['artifact_bytes']['laravel'] / 1e6:.1f} MB")
    print(f"{'full prepare (release show)':<40} {med(r['full']):8.3f} s   runs {['%.3f' % x for x in r['full']]}")
    print(f"{'zstd -dc | tar -x (same artifact)':<40} {med(r['full_untar']):8.3f} s")
    print(f"{'cp -al of the first release (link floor)':<40} {med(r['link_floor']):8.3f} s   "
          f"{med(r['link_floor']) / med(r['full']):.2f}x full")
    if r.get("durable_link_floor"):
        print(f"{'cp -al && sync -f (durable link floor)':<40} {med(r['durable_link_floor']):8.3f} s   "
              f"{med(r['durable_link_floor']) / med(r['full']):.2f}x full")
    if r.get("bare_floor"):
        print(f"{'mkdir, link x2, syncfs, marker (bare)':<40} {med(r['bare_floor']):8.3f} s   "
              f"{med(r['bare_floor']) / med(r['full']):.2f}x full")
    for p in CHANGES:
        print(f"{f'{p}% changed prepare':<40} {med(r[f'c{p}']):8.3f} s   {med(r[f'c{p}']) / med(r['full']):.2f}x full; "
              f"added {med(r[f'c{p}_blocks']) / 1e6:.1f} MB of blocks ({med(r[f'c{p}_blocks']) / med(r['blocks_full']):.0%} of the first's "
              f"{med(r['blocks_full']) / 1e6:.1f} MB); server wrote {med(r[f'c{p}_wchar']) / 1e6:.2f} MB "
              f"({med(r[f'c{p}_wchar']) / r['artifact_bytes'][f'c{p}']:.0%} of its {r['artifact_bytes'][f'c{p}'] / 1e6:.1f} MB artifact)")
    print(f"{'server writes on a rollback (no artifact)':<40} {med(r['rollback_wchar']) / 1e3:8.1f} kB")
    if r["node_full"]:
        print(f"node-like tree: {r['files']['node']} files, artifact {r['artifact_bytes']['node'] / 1e6:.1f} MB")
        print(f"{'full prepare (release show)':<40} {med(r['node_full']):8.3f} s")
        print(f"{'zstd -dc | tar -x (same artifact)':<40} {med(r['node_untar']):8.3f} s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.environ.get("RELEASE_BIN", "target/release/release"))
    p.add_argument("--tree", required=True)
    p.add_argument("--node-tree")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--fs", choices=["tmpfs", "ext4"], default=os.environ.get("BENCH_FS", "tmpfs"))
    p.add_argument("--json")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (mount)")
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = bench.run()
    finally:
        bench.cleanup()
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
