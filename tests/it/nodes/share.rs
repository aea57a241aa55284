//! A release costs what changed (issue 15): a node links the files a release already there
//! holds, from the index the server stored at upload, and writes only the rest; an index
//! the store lost costs the sharing, never the deploy; retention never touches what a newer
//! release shares.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Fleet, release_dirs};
use crate::support::archives::{fetched, letters};

/// Twenty files that stay the same from release to release, and one that changes.
fn tree(changed: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> =
        (0..20).map(|i| (format!("vendor/lib{i}.php"), format!("<?php // library {i}\n").into_bytes())).collect();
    files.push(("app/changed.php".into(), changed.as_bytes().to_vec()));
    files
}

fn upload(fleet: &Fleet, version: &str) -> String {
    let files = tree(&format!("<?php // {version}\n"));
    let extra: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
    fleet.upload(version, &extra)
}

fn file(base: &Path, digest: &str, path: &str) -> PathBuf {
    base.join("releases").join(&digest[7..]).join(path)
}

fn ino(path: &Path) -> u64 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).ino()
}

fn prepare_outputs(fleet: &Fleet, release: &serde_json::Value) -> Vec<String> {
    let shown = fleet.f.get("carol", &format!("/v1/releases/{}", release["id"]));
    shown["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["phase"] == "prepare")
        .map(|d| d["output_tail"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_second_release_links_what_the_first_holds_and_writes_only_what_changed() {
    let fleet = Fleet::new(2, "");
    let v1 = upload(&fleet, "v1");
    let v2 = upload(&fleet, "v2");
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    let second = fleet.deploy(&v2);
    assert_eq!(second["state"], "live", "{second}");
    fleet.assert_all_on(&v2);

    for base in &fleet.bases {
        for i in 0..20 {
            let path = format!("vendor/lib{i}.php");
            let (old, new) = (file(base, &v1, &path), file(base, &v2, &path));
            assert_eq!(ino(&old), ino(&new), "{path} is one inode in both releases");
            assert_eq!(fs::metadata(&new).unwrap().nlink(), 2);
        }
        // What changed is written: its own inode, its own content.
        for path in ["app/changed.php", "version.txt"] {
            assert_ne!(ino(&file(base, &v1, path)), ino(&file(base, &v2, path)), "{path}");
        }
        assert_eq!(fs::read_to_string(file(base, &v2, "app/changed.php")).unwrap(), "<?php // v2\n");
        assert_eq!(fs::read_to_string(file(base, &v1, "app/changed.php")).unwrap(), "<?php // v1\n");
        // The files the first finalize wrote are the release's own, never the older one's.
        assert_ne!(ino(&file(base, &v1, "FINALIZED")), ino(&file(base, &v2, "FINALIZED")));
    }
    // 20 vendor files and public/index.html ("hi" in both) of the 23 the index lists.
    for output in prepare_outputs(&fleet, &second) {
        assert!(output.contains("(21 of its 23 files linked to a release already here)"), "{output}");
    }
}

#[test]
fn an_index_the_store_lost_costs_the_sharing_never_the_deploy_and_retention_spares_what_is_shared() {
    let mut fleet = Fleet::new(1, "");
    let base = fleet.bases[0].clone();
    let base = &base;
    let versions: Vec<String> = ["v1", "v2", "v3", "v4"].iter().map(|v| upload(&fleet, v)).collect();
    let [v1, v2, v3, v4] = [&versions[0], &versions[1], &versions[2], &versions[3]];
    assert_eq!(fleet.deploy(v1)["state"], "live");

    // Lost from the store, and from the server's memory (where its upload left it ready).
    fleet.f.server.lose_index(v2);
    fleet.f.server.restart();
    let second = fleet.deploy(v2);
    assert_eq!(second["state"], "live", "{second}");
    let lib = "vendor/lib0.php";
    assert_ne!(ino(&file(base, v1, lib)), ino(&file(base, v2, lib)), "written, not linked, without an index");
    for output in prepare_outputs(&fleet, &second) {
        assert!(!output.contains("linked"), "{output}");
    }
    assert!(fleet.f.server.log().contains("deploying without the file index"), "{}", fleet.f.server.log());

    // v2 came without an index, so the node keeps none for it: v3 links v1's files, v4 those
    // of v3. keep = 3 then removes v1, and what it shared with the newer ones is untouched.
    assert_eq!(fleet.deploy(v3)["state"], "live");
    assert_eq!(fleet.deploy(v4)["state"], "live");
    let mut kept = vec![v2[7..].to_owned(), v3[7..].to_owned(), v4[7..].to_owned()];
    kept.sort();
    assert_eq!(release_dirs(base), kept);
    assert_eq!(ino(&file(base, v3, lib)), ino(&file(base, v4, lib)));
    assert_eq!(fs::metadata(file(base, v4, lib)).unwrap().nlink(), 2, "v1's link is gone, the file is not");
    assert_eq!(fs::metadata(file(base, v2, lib)).unwrap().nlink(), 1);
    for v in [v2, v3, v4] {
        assert_eq!(fs::read_to_string(file(base, v, lib)).unwrap(), "<?php // library 0\n");
    }
}

/// The index an upload made is kept in memory ready to send: the deploy that follows needs
/// no read of the store (here, which lost it), and a rollback to a release every node holds
/// reads no index at all (after a restart, with the store's copy gone too).
#[test]
fn the_deploy_after_an_upload_uses_the_index_it_made_and_a_rollback_reads_none() {
    let mut fleet = Fleet::new(1, "");
    let base = fleet.bases[0].clone();
    let (v1, v2) = (upload(&fleet, "v1"), upload(&fleet, "v2"));
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    fleet.f.server.lose_index(&v2);
    let second = fleet.deploy(&v2);
    assert_eq!(second["state"], "live", "{second}");
    let lib = "vendor/lib0.php";
    assert_eq!(ino(&file(&base, &v1, lib)), ino(&file(&base, &v2, lib)), "linked: the index was at hand");
    for output in prepare_outputs(&fleet, &second) {
        assert!(output.contains("(21 of its 23 files linked to a release already here)"), "{output}");
    }

    fleet.f.server.lose_index(&v1);
    fleet.f.server.restart();
    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(back["state"], "live", "{back}");
    fleet.assert_all_on(&v1);
    let log = fleet.f.server.log();
    assert!(!log.contains("deploying without the file index"), "{log}");
}

/// A rollback where one node lacks the release: the nodes that hold it read no index, the one
/// that fetches it gets the index all the same and links what it holds.
#[test]
fn a_rollback_sends_the_index_to_the_node_that_lacks_the_release_only() {
    let fleet = Fleet::new(2, "");
    let (v1, v2) = (upload(&fleet, "v1"), upload(&fleet, "v2"));
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    assert_eq!(fleet.deploy(&v2)["state"], "live");
    // Root (the tests' user) removes the read-only release as retention would.
    fs::remove_dir_all(fleet.bases[1].join("releases").join(&v1[7..])).unwrap();

    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(back["state"], "live", "{back}");
    fleet.assert_all_on(&v1);
    let lib = "vendor/lib0.php";
    let fetched = &fleet.bases[1];
    assert_eq!(ino(&file(fetched, &v1, lib)), ino(&file(fetched, &v2, lib)), "linked to what v2 holds");
    let outputs = prepare_outputs(&fleet, &back);
    assert_eq!(
        outputs.iter().filter(|o| o.contains("files linked to a release already here")).count(),
        1,
        "{outputs:?}"
    );
}

/// 1,000 files of ~12 KiB (about 95 frames once packed), those of `changed` holding other
/// bytes, and `version.txt`.
fn thousand_files(changed: &[usize]) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> =
        (0..1000usize).map(|i| (format!("vendor/p{}/f{i}.php", i % 20), content(i, changed))).collect();
    files.push(("version.txt".into(), format!("{changed:?}").into_bytes()));
    files
}

fn content(i: usize, changed: &[usize]) -> Vec<u8> {
    let seed = if changed.contains(&i) { 1_000_000 + i } else { i } as u64;
    letters(seed, 11_000 + i % 3000)
}

/// Part 2: the artifact rides the local node's stdin, and the server sends only the frames the
/// node said it lacks. A release changing 1% of 1,000 files (spread over the tree; and
/// version.txt) fetches at
/// most a fifth of its artifact, and makes exactly the tree a whole fetch makes.
#[test]
fn a_release_changing_one_percent_of_the_files_fetches_at_most_a_fifth_of_its_bytes() {
    let fleet = Fleet::new(2, "");
    let changed: Vec<usize> = (0..10).map(|k| (k * 97 + 7) % 1000).collect();
    let v1 = fleet.f.upload_packaged(thousand_files(&[]));
    let v2 = fleet.f.upload_packaged(thousand_files(&changed));
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    let second = fleet.deploy(&v2);
    assert_eq!(second["state"], "live", "{second}");
    fleet.assert_all_on(&v2);

    for output in prepare_outputs(&fleet, &second) {
        let [frames, of, bytes, size] = fetched(&output);
        assert!(of > 80 && (1..=11).contains(&frames), "{frames} of {of} frames: {output}");
        assert!(bytes * 5 <= size, "fetched {bytes} of {size} bytes: more than a fifth ({output})");
    }
    for base in &fleet.bases {
        for i in [0usize, 7, 104, 500, 999] {
            let path = format!("vendor/p{}/f{i}.php", i % 20);
            assert_eq!(fs::read(file(base, &v2, &path)).unwrap(), content(i, &changed), "{path}");
            if !changed.contains(&i) {
                assert_eq!(ino(&file(base, &v1, &path)), ino(&file(base, &v2, &path)), "{path} linked");
            }
        }
    }
}
