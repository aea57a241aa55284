//! Sparse prepares on real directories: a node asked which frames it lacks says so on stdout,
//! gets only those on stdin and makes the same release a whole fetch makes; a frame that is
//! not what the index says, frames cut short, or a file to link gone since the question:
//! refused, nothing left.
//!
//! Long on purpose: every scenario here packages with the same tree and prepares on the same
//! node helpers, and each half of a split would need them all.

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use super::share::read_kept;
use super::*;
use crate::archive::tests::noise;
use crate::archive::{self, CheckOptions, FrameScanner};

/// A tree to package: relative path → content (`bin/*` executable).
type Tree = BTreeMap<String, Vec<u8>>;

/// 120 files of 9 KiB (about 9 frames), one executable, a symlink and an empty file.
fn first() -> Tree {
    let mut tree: Tree = (0..120u64).map(|i| (format!("vendor/p{}/f{i}.php", i % 7), noise(i, 9000))).collect();
    tree.insert("bin/run".into(), b"#!/bin/sh\necho run".to_vec());
    tree.insert("storage/.gitkeep".into(), Vec::new());
    tree
}

/// The artifact's bytes, digest and index as ingest makes it (frames, skeleton).
fn package(tree: &Tree) -> (Vec<u8>, Digest, FileIndex) {
    let src = tempfile::tempdir().unwrap();
    for (path, content) in tree {
        let full = src.path().join(path);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(&full, content).unwrap();
        let mode = if path.starts_with("bin/") { 0o755 } else { 0o644 };
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::symlink("bin/run", src.path().join("run")).unwrap();
    let (_, bytes) = archive::pack_to_writer(src.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    indexed(bytes)
}

/// An artifact's bytes, digest and index as ingest makes it (frames, skeleton).
fn indexed(bytes: Vec<u8>) -> (Vec<u8>, Digest, FileIndex) {
    let digest = Digest::of(&bytes);
    let listing = archive::index(&bytes[..], &options()).unwrap();
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, digest);
    let index = FileIndex::new(digest, listing.files.unwrap()).with_frames(frames).with_skeleton(listing.skeleton);
    (bytes, digest, index)
}

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 100_000, shared: vec![], record_migrations: false }
}

fn request(base: &Path, digest: Digest, index: &FileIndex, ask_frames: bool) -> Prepare {
    Prepare {
        max_unpacked_bytes: 1 << 30,
        max_files: 100_000,
        index: Some(index.encode_wire()),
        ask_frames,
        ..Prepare::from_stdin(base, digest)
    }
}

/// A prepare asked which frames it lacks, answered as the server answers in the same call: the
/// node's first line of stdout read, and what `send` makes of the frames it names (`None`: it
/// asks for the whole artifact) put on its stdin. What it asked (`None`: it answered without
/// asking, a refusal), and its answer.
fn ask(
    p: &Prepare,
    send: impl FnOnce(Option<&[usize]>) -> Vec<u8> + Send,
) -> (Option<Lacking>, Result<Prepared, NodeError>) {
    let said = Arc::new(Mutex::new(Vec::new()));
    let mut input = Answering { said: said.clone(), send: Some(Box::new(send)), sent: io::Cursor::new(Vec::new()) };
    let answer = prepare(p, &mut input, &mut Said(said.clone()));
    let said = said.lock().unwrap();
    let first = said.split(|b| *b == b'\n').next().unwrap_or_default();
    let asked = serde_json::from_slice::<Asking>(first).ok().map(|asking| asking.lacking);
    (asked, answer)
}

/// The node's stdout.
struct Said(Arc<Mutex<Vec<u8>>>);

impl Write for Said {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the server sends for the frames a node asks for (`None`: the whole artifact).
type Sending<'a> = Box<dyn FnOnce(Option<&[usize]>) -> Vec<u8> + Send + 'a>;

/// The node's stdin: what the server sends once the node has asked (it panics when read
/// before: a node that reads stdin before it asks would wait for ever).
struct Answering<'a> {
    said: Arc<Mutex<Vec<u8>>>,
    send: Option<Sending<'a>>,
    sent: io::Cursor<Vec<u8>>,
}

impl Read for Answering<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.fill_buf()?.read(buf)?;
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Answering<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if let Some(send) = self.send.take() {
            let said = self.said.lock().unwrap();
            let first = said.split(|b| *b == b'\n').next().unwrap_or_default();
            let asking: Asking = serde_json::from_slice(first).expect("the node asks before it reads stdin");
            assert_eq!(asking.protocol, crate::node::VERSION);
            self.sent = io::Cursor::new(send(asking.lacking.frames.as_deref()));
        }
        self.sent.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        self.sent.consume(amount);
    }
}

/// The bytes of `frames` of an artifact, in order: what the server sends.
fn frames_of(bytes: &[u8], index: &FileIndex, frames: &[usize]) -> Vec<u8> {
    let frame = |n: &usize| &index.frames[*n];
    frames
        .iter()
        .flat_map(|n| &bytes[frame(n).offset as usize..(frame(n).offset + frame(n).length) as usize])
        .copied()
        .collect()
}

/// Every entry under `dir`: path → (kind, content or target, executable).
fn listing(dir: &Path) -> BTreeMap<String, (char, Vec<u8>, bool)> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(next) = stack.pop() {
        for entry in fs::read_dir(&next).unwrap().flatten() {
            let path = entry.path();
            let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let item = if meta.is_dir() {
                stack.push(path.clone());
                ('d', Vec::new(), false)
            } else if meta.file_type().is_symlink() {
                ('l', fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes(), false)
            } else {
                ('f', fs::read(&path).unwrap(), meta.mode() & 0o111 != 0)
            };
            found.insert(relative, item);
        }
    }
    found
}

/// A base holding `first()` prepared (with its index): the release to link from.
fn base_with_first() -> (tempfile::TempDir, Digest) {
    let base = tempfile::tempdir().unwrap();
    let (bytes, digest, index) = package(&first());
    prepare(&request(base.path(), digest, &index, false), &mut &bytes[..], &mut io::sink()).unwrap();
    (base, digest)
}

/// What the prepare asks (nothing is sent: it then fails, leaving nothing).
fn lacking(base: &Path, digest: Digest, index: &FileIndex) -> Lacking {
    let (asked, answer) = ask(&request(base, digest, index, true), |_| Vec::new());
    let asked = asked.expect("it asks");
    assert!(answer.is_err() || asked.frames.as_ref().is_some_and(|f| f.is_empty()));
    asked
}

#[test]
fn a_node_asked_what_it_lacks_makes_the_same_release_from_those_frames_alone() {
    let (base, _) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(999, 9000));
    second.insert("vendor/new.php".into(), b"<?php new".to_vec());
    let (bytes, digest, index) = package(&second);
    assert!(index.frames.len() >= 8, "{} frames", index.frames.len());

    let mut sent = Vec::new();
    let (asked, answer) = ask(&request(base.path(), digest, &index, true), |frames| {
        sent = frames_of(&bytes, &index, frames.expect("some frames are not needed"));
        sent.clone()
    });
    let (asked, answer) = (asked.expect("it asks"), answer.unwrap());
    let frames = asked.frames.expect("some frames are not needed");
    assert_eq!(asked.of, index.frames.len());
    assert!(!frames.is_empty() && frames.len() <= 3, "the frames of two changed files: {frames:?}");
    assert!(
        answer.output.contains(&format!(
            "fetched {} of its {} frames, {} of {} bytes",
            frames.len(),
            index.frames.len(),
            sent.len(),
            bytes.len()
        )),
        "{}",
        answer.output
    );

    // The same tree a whole fetch makes, on another node.
    let other = tempfile::tempdir().unwrap();
    let whole = prepare(&request(other.path(), digest, &index, false), &mut &bytes[..], &mut io::sink()).unwrap();
    assert_eq!(listing(&answer.dir), listing(&whole.dir));
    // Unchanged files are the older release's inodes; the changed one is not.
    let older = base.path().join("releases").join(base_with_first().1.hex());
    assert_eq!(
        fs::metadata(answer.dir.join("vendor/p0/f0.php")).unwrap().ino(),
        fs::metadata(older.join("vendor/p0/f0.php")).unwrap().ino()
    );
    assert_eq!(fs::metadata(answer.dir.join("vendor/p3/f10.php")).unwrap().nlink(), 1);
    // So are the unchanged files fetched only as a changed one's neighbours in its frame:
    // linked from the older release, not written from the frame.
    let changed = ["vendor/p3/f10.php", "vendor/new.php"];
    let neighbours: Vec<&str> = (index.files.iter())
        .filter(|f| f.size > 0 && !changed.contains(&f.path.as_str()))
        .filter(|f| index.frames_of(f).any(|n| frames.contains(&n)))
        .map(|f| f.path.as_str())
        .collect();
    assert!(neighbours.len() >= 5, "{neighbours:?}");
    for path in neighbours {
        let ino = |dir: &Path| fs::metadata(dir.join(path)).unwrap().ino();
        assert_eq!(ino(&answer.dir), ino(&older), "{path}");
    }
    assert!(base.path().join(".release/ready").join(digest.hex()).exists());
    // It keeps the index's files only: the frame table and skeleton are the artifact's.
    let kept = read_kept(&base.path().join(".release/index").join(digest.hex()), digest).unwrap();
    assert_eq!((kept.files, kept.frames.len(), kept.skeleton), (index.files.clone(), 0, None));
    super::prepare::set_writable(base.path()).ok();
    super::prepare::set_writable(other.path()).ok();
}

#[test]
fn a_frame_not_as_the_index_says_or_cut_short_leaves_nothing() {
    let (base, _) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(998, 9000));
    let (bytes, digest, index) = package(&second);
    let asked = request(base.path(), digest, &index, true);

    let (frames, answer) = ask(&asked, |frames| {
        let mut flipped = frames_of(&bytes, &index, frames.unwrap());
        let middle = flipped.len() / 2;
        flipped[middle] ^= 1;
        flipped
    });
    let (frames, err) = (frames.unwrap().frames.unwrap(), answer.unwrap_err());
    assert_eq!(err.code, ErrorCode::DigestMismatch, "{}", err.message);
    assert!(
        err.message.contains(&format!("frame {} of the artifact is not what its index says", frames[0])),
        "{}",
        err.message
    );

    let (_, answer) = ask(&asked, |frames| {
        let sent = frames_of(&bytes, &index, frames.unwrap());
        sent[..sent.len() - 10].to_vec()
    });
    let err = answer.unwrap_err();
    assert_eq!(err.code, ErrorCode::Fetch, "{}", err.message);
    assert!(err.message.contains("stdin ended"), "{}", err.message);

    // Nothing of it was left: no directory, no marker, no temporary tree.
    let releases: Vec<_> =
        fs::read_dir(base.path().join("releases")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert!(!base.path().join(".release/ready").join(digest.hex()).exists());
    super::prepare::set_writable(base.path()).ok();
}

#[test]
fn a_file_to_link_gone_since_the_question_fails_the_prepare_naming_it() {
    let (base, first_digest) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(997, 9000));
    let (bytes, digest, index) = package(&second);
    let asked = request(base.path(), digest, &index, true);
    // Once the node reads its stdin (after the question), the older release's copy of a file in
    // a frame not asked for, past the first frame asked for, is removed (its index kept).
    let older = base.path().join("releases").join(first_digest.hex());
    let mut victim = None;
    let (_, answer) = ask(&asked, |frames| {
        let frames = frames.unwrap();
        let file = index
            .files
            .iter()
            .find(|f| f.size > 0 && index.frames_of(f).all(|n| n > frames[0] && !frames.contains(&n)));
        let file = file.expect("a file in a frame not asked for");
        let parent = older.join(&file.path).parent().unwrap().to_owned();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_file(older.join(&file.path)).unwrap();
        victim = Some(file.clone());
        frames_of(&bytes, &index, frames)
    });
    let (victim, err) = (victim.unwrap(), answer.unwrap_err());
    assert!(err.message.contains(&victim.path) && err.message.contains("deploy again"), "{}", err.message);
    assert!(!base.path().join("releases").join(digest.hex()).exists());
    // Asked again, the node now lacks that file's frame too, and the prepare goes through.
    let (frames, answer) = ask(&asked, |frames| frames_of(&bytes, &index, frames.unwrap()));
    assert!(index.frames_of(&victim).all(|n| frames.as_ref().unwrap().frames.as_ref().unwrap().contains(&n)));
    answer.unwrap();
    super::prepare::set_writable(base.path()).ok();
}

#[test]
fn a_node_without_releases_or_an_index_without_skeleton_lacks_everything() {
    let (_, digest, index) = package(&first());
    let empty = tempfile::tempdir().unwrap();
    let asked = lacking(empty.path(), digest, &index);
    assert_eq!(asked.frames, None, "nothing to link: the whole artifact");
    let (base, _) = base_with_first();
    assert_eq!(lacking(base.path(), digest, &index).frames, Some(vec![]), "the release is here already");
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(994, 9000));
    let (_, digest, index) = package(&second);
    let without = index.clone().with_skeleton(None);
    assert_eq!(lacking(base.path(), digest, &without).frames, None, "no skeleton: the whole artifact");
    // Another artifact holding the same files (a rebuild): nothing lacking at all.
    let mut rebuilt = first();
    rebuilt.insert("vendor/p0/f0.php".into(), rebuilt["vendor/p1/f1.php"].clone());
    let (_, digest, index) = package(&rebuilt);
    assert_eq!(lacking(base.path(), digest, &index).frames, Some(vec![]), "every file is held");
    super::prepare::set_writable(base.path()).ok();
}

/// Frames cut anywhere (another tool's layout): inside tar headers, long-name records and file
/// data. A frame made from the skeleton is the real one with zeros for data, wherever it is cut,
/// so the sparse release is still exactly the artifact's.
#[test]
fn frames_cut_inside_headers_and_data_still_make_the_same_release() {
    /// Re-frames `bytes` (a `release package` artifact) into frames of `every` tar bytes.
    fn reframed(tree: &Tree, every: usize) -> (Vec<u8>, Digest, FileIndex) {
        let (bytes, _, _) = package(tree);
        let tar = zstd::decode_all(&bytes[..]).unwrap();
        let bytes: Vec<u8> = tar.chunks(every).flat_map(|chunk| zstd::bulk::compress(chunk, 3).unwrap()).collect();
        let (bytes, digest, index) = indexed(bytes);
        assert!(index.frames.len() >= 10, "{} frames", index.frames.len());
        (bytes, digest, index)
    }
    let mut one = first();
    let long = format!("deep/{}/{}.php", "d".repeat(150), "n".repeat(120));
    one.insert(long.clone(), noise(5, 700));
    for every in [7_777usize, 512 * 3 + 100, 100_003] {
        let base = tempfile::tempdir().unwrap();
        let (bytes, digest, index) = reframed(&one, every);
        prepare(&request(base.path(), digest, &index, false), &mut &bytes[..], &mut io::sink()).unwrap();
        let mut two = one.clone();
        two.insert("vendor/p3/f10.php".into(), noise(996, 9000));
        two.insert(long.clone(), noise(6, 700));
        let (bytes, digest, index) = reframed(&two, every);
        let (asked, sparse) = ask(&request(base.path(), digest, &index, true), |frames| {
            frames_of(&bytes, &index, frames.expect("some frames not needed"))
        });
        let frames = asked.unwrap().frames.unwrap();
        assert!(frames.len() < index.frames.len() / 2, "{} of {}", frames.len(), index.frames.len());
        let sparse = sparse.unwrap();
        let other = tempfile::tempdir().unwrap();
        let whole = prepare(&request(other.path(), digest, &index, false), &mut &bytes[..], &mut io::sink()).unwrap();
        assert_eq!(listing(&sparse.dir), listing(&whole.dir), "frames of {every} tar bytes");
        super::prepare::set_writable(base.path()).ok();
        super::prepare::set_writable(other.path()).ok();
    }
}

/// A node asked which frames it lacks: without an index it asks for the whole artifact; with
/// another artifact's index it refuses before asking (nothing is read, nothing left); an
/// artifact with a frame too large to make alone (a plain `zstd` stream is one frame) is
/// asked for whole.
#[test]
fn a_node_asks_for_the_whole_artifact_or_refuses_when_frames_cannot_be_told() {
    let (base, first_digest) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(995, 9000));
    let (bytes, digest, index) = package(&second);
    let mut bare = request(base.path(), digest, &index, true);
    bare.index = None;
    let (asked, answer) = ask(&bare, |frames| {
        assert_eq!(frames, None);
        bytes.clone()
    });
    assert_eq!(asked.unwrap().frames, None, "without an index: the whole artifact");
    answer.unwrap();

    let other = Digest::of(b"another artifact");
    let (asked, answer) = ask(&request(base.path(), other, &index, true), |_| unreachable!("it does not ask"));
    assert_eq!(asked, None);
    let err = answer.unwrap_err();
    assert_eq!(err.code, ErrorCode::IndexMismatch, "{}", err.message);
    assert!(err.message.contains(&format!("describes {digest}, not {other}")), "{}", err.message);

    // One frame of 9 MiB of tar stream: never fetched alone.
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("big.bin"), noise(7, 9 << 20)).unwrap();
    let (_, packed) = archive::pack_to_writer(src.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let bytes = zstd::stream::encode_all(&zstd::decode_all(&packed[..]).unwrap()[..], 3).unwrap();
    let (_, big, index) = indexed(bytes);
    assert_eq!(index.frames.len(), 1, "a plain zstd stream is one frame");
    assert_eq!(lacking(base.path(), big, &index).frames, None, "too large to make alone: fetched whole");
    for digest in [big, other] {
        assert!(!base.path().join("releases").join(digest.hex()).exists());
    }
    assert!(base.path().join("releases").join(first_digest.hex()).exists());
    super::prepare::set_writable(base.path()).ok();
}

/// A tar hard link whose target is a file of a frame not fetched: that file is linked from the
/// older release by the sparse unpack's linking thread while the walk reads on, and the hard
/// link entry after it is made only once it exists (the walk waits for the thread).
#[test]
fn a_tar_hard_link_to_a_file_linked_from_an_older_release_is_made_after_it() {
    /// A tar of `tree` with `link` a hard link to `target` after every file, in frames of
    /// about 20 KiB of tar stream.
    fn framed(tree: &Tree, link: &str, target: &str) -> (Vec<u8>, Digest, FileIndex) {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in tree {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, path, &content[..]).unwrap();
        }
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Link);
        header.set_size(0);
        header.set_mode(0o644);
        builder.append_link(&mut header, link, target).unwrap();
        let tar = builder.into_inner().unwrap();
        indexed(tar.chunks(20_000).flat_map(|chunk| zstd::bulk::compress(chunk, 3).unwrap()).collect())
    }
    let one: Tree = (0..40u64).map(|i| (format!("vendor/p{}/f{i}.php", i % 3), noise(i, 9000))).collect();
    let (link, target) = ("public/same.php", "vendor/p0/f0.php");
    let base = tempfile::tempdir().unwrap();
    let (bytes, first_digest, index) = framed(&one, link, target);
    prepare(&request(base.path(), first_digest, &index, false), &mut &bytes[..], &mut io::sink()).unwrap();
    let mut two = one.clone();
    two.insert("vendor/p2/f38.php".into(), noise(1000, 9000));
    let (bytes, digest, index) = framed(&two, link, target);
    let (asked, answer) = ask(&request(base.path(), digest, &index, true), |frames| {
        frames_of(&bytes, &index, frames.expect("some frames not needed"))
    });
    let frames = asked.unwrap().frames.unwrap();
    let at = index.files.iter().position(|f| f.path == target).unwrap();
    assert!(index.frames_of(&index.files[at]).all(|n| !frames.contains(&n)), "{target} is linked, not fetched");
    let dir = answer.unwrap().dir;
    let ino = |path: &Path| fs::symlink_metadata(path).unwrap().ino();
    assert_eq!(fs::read(dir.join(link)).unwrap(), one[target]);
    assert_eq!(ino(&dir.join(link)), ino(&dir.join(target)));
    let older = base.path().join("releases").join(first_digest.hex());
    assert_eq!(ino(&dir.join(target)), ino(&older.join(target)), "shared with the older release");
    super::prepare::set_writable(base.path()).ok();
}

/// The size limit holds for the data a sparse unpack passes over (links, never reads) as for
/// the bytes it reads: a tar stream past `max_unpacked_bytes` inside a file linked, not
/// fetched, is refused, naming the limit, and nothing is left.
#[test]
fn the_size_limit_counts_the_data_passed_over() {
    let (base, _) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(995, 9000));
    let (bytes, digest, index) = package(&second);
    let frames = lacking(base.path(), digest, &index).frames.expect("some frames not needed");
    let last = index.files.iter().rfind(|f| f.size > 0 && index.frames_of(f).all(|n| !frames.contains(&n)));
    let last = last.expect("a file linked, not fetched");
    // Every byte before that file's data is read within the limit; its data passes it.
    let limit = last.offset + last.size / 2;
    let asked = Prepare { max_unpacked_bytes: limit, ..request(base.path(), digest, &index, true) };
    let (_, answer) = ask(&asked, |frames| frames_of(&bytes, &index, frames.expect("some frames not needed")));
    let err = answer.unwrap_err();
    assert!(err.message.contains(&limit.to_string()), "{}", err.message);
    assert!(!base.path().join("releases").join(digest.hex()).exists());
    assert!(!base.path().join("releases").join(format!(".tmp-{}", digest.hex())).exists());
    super::prepare::set_writable(base.path()).ok();
}

/// The frames to fetch come in artifact order, each once, each in the index. The node computes
/// that list itself, so only a bug would break it; one that does is refused before anything
/// is fetched or made.
#[test]
fn frames_out_of_order_twice_or_unknown_are_refused_before_anything_is_fetched() {
    use crate::archive::{Frame, Skeleton};
    use crate::node::sparse::FrameSource;
    struct Never;
    impl FrameSource for Never {
        fn frame(&mut self, number: usize, _: &Frame, _: &mut Vec<u8>) -> io::Result<()> {
            panic!("frame {number} was fetched")
        }
    }
    let (_, _, index) = package(&first());
    let last = index.frames.len() - 1;
    assert!(last >= 1, "several frames");
    let skeleton = Skeleton::of(&index).unwrap().unwrap();
    let candidates = std::collections::HashMap::new();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("release");
    let unknown = format!("no frame {} in the index", last + 1);
    for (needed, says) in [
        (vec![1, 0], "not in artifact order"),
        (vec![0, 0], "not in artifact order"),
        (vec![0, last + 1], &unknown[..]),
    ] {
        let sharing = Sharing { index: &index, candidates: &candidates, writable: &[], looked: None };
        let sparse = crate::node::Sparse { skeleton: &skeleton, needed: &needed, source: &mut Never };
        let err = crate::node::unpack_sparse(&dest, &options(), Modes::Writable, sharing, sparse).unwrap_err();
        assert!(err.to_string().contains(says), "{needed:?}: {err}");
        assert!(!dest.exists(), "{needed:?}: nothing made");
    }
}

/// A skeleton that does not make the tar stream the frames say (decompressed while the older
/// files are looked at, when a release here offers some) refuses the prepare that would unpack
/// from it, leaving nothing; a node with nothing to link fetches the whole artifact and never
/// reads it.
#[test]
fn a_skeleton_that_does_not_hold_together_fails_only_the_prepare_that_unpacks_from_it() {
    let (base, _) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(996, 9000));
    let (bytes, digest, index) = package(&second);
    let broken = index.clone().with_skeleton(Some(zstd::encode_all(&[0u8; 100][..], 3).unwrap()));
    let (asked, answer) = ask(&request(base.path(), digest, &broken, true), |frames| {
        frames_of(&bytes, &broken, frames.expect("frames, not the whole artifact"))
    });
    assert!(asked.unwrap().frames.is_some_and(|f| !f.is_empty()), "it asks for the frames it lacks");
    let err = answer.unwrap_err();
    assert_eq!(err.code, ErrorCode::IndexMismatch, "{}", err.message);
    assert!(err.message.contains("skeleton"), "{}", err.message);
    let releases = base.path().join("releases");
    assert!(!releases.join(digest.hex()).exists() && !releases.join(format!(".tmp-{}", digest.hex())).exists());
    let empty = tempfile::tempdir().unwrap();
    let (asked, answer) = ask(&request(empty.path(), digest, &broken, true), |frames| {
        assert_eq!(frames, None, "nothing to link: the whole artifact");
        bytes.clone()
    });
    assert_eq!(asked.unwrap().frames, None);
    answer.unwrap();
    super::prepare::set_writable(base.path()).ok();
    super::prepare::set_writable(empty.path()).ok();
}
