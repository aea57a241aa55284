//! The sweep's choice: a deploy whose lease lapsed is resolved from its nodes only when no
//! task of this process runs it; one that does is left alone, lapsed or not. Retention comes
//! once `live` is recorded, never for a failed deploy. A block that lands between an approval
//! and the launch, or while the deploy runs, keeps the release from going live.

use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::*;
use crate::config::{Overrides, StorageConfig};
use crate::registry::{NewApproval, NewArtifact};

/// A deployer whose deploy waits for the test, and whose recover answers as the test says.
#[derive(Default)]
struct Scripted {
    deploying: Notify,
    finish_deploy: Notify,
    recovering: Notify,
    finish_recover: Notify,
    recovers: AtomicUsize,
    recover_fails: StdMutex<Option<String>>,
    deploy_fails: StdMutex<Option<String>>,
    /// Each clean-up asked for: the release and what to keep.
    cleanups: StdMutex<Vec<(i64, Vec<Digest>)>>,
    cleaned: Notify,
}

impl Deployer for Scripted {
    fn deploy<'a>(&'a self, plan: &'a Plan) -> futures::future::BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            self.deploying.notify_one();
            self.finish_deploy.notified().await;
            // As the node deployer does before the switch.
            plan.gate.check().await.map_err(Failure::new)?;
            match self.deploy_fails.lock().unwrap().clone() {
                Some(why) => Err(Failure::new(why)),
                None => Ok(()),
            }
        })
    }

    fn clean_up<'a>(&'a self, plan: &'a Plan, keep: &'a [Digest]) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            self.cleanups.lock().unwrap().push((plan.release.id, keep.to_vec()));
            self.cleaned.notify_one();
        })
    }

    fn recover<'a>(&'a self, _plan: &'a Plan) -> futures::future::BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            self.recovers.fetch_add(1, Ordering::SeqCst);
            self.recovering.notify_one();
            self.finish_recover.notified().await;
            match self.recover_fails.lock().unwrap().clone() {
                Some(why) => Err(Failure { reason: why, stranded: vec!["web-2".into()] }),
                None => Ok(()),
            }
        })
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    releases: Releases,
    deployer: Arc<Scripted>,
    /// The server's ingestor, shared with `releases`.
    ingestor: Ingestor,
}

fn setup() -> Setup {
    setup_with("")
}

/// [`setup`] with more configuration (`[limits]` …) after the service and environment.
fn setup_with(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("release.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\ndata_dir = \"{}\"\n[service.api]\nkind = \"generic\"\n[[environment]]\nname = \"staging\"\n{extra}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let config = Arc::new(Config::load(Some(&path), &Overrides::default()).unwrap());
    let registry = Arc::new(Registry::open(&config.registry_path()).unwrap());
    let store = Store::open(&StorageConfig::Local { path: dir.path().join("objects") }).unwrap();
    let deployer = Arc::new(Scripted::default());
    let seam: Arc<dyn Deployer> = deployer.clone();
    let metrics = Arc::new(Metrics::new());
    let ingestor =
        Ingestor::new(Arc::clone(&config), store, Arc::clone(&registry), Arc::clone(&metrics), Arc::default());
    let releases = Releases::new(config, Arc::clone(&registry), seam, ingestor.clone(), metrics);
    Setup { _dir: dir, registry, releases, deployer, ingestor }
}

/// An approved release of `api` in staging.
fn approved(registry: &Registry, content: &[u8]) -> Release {
    requested(registry, content, State::Approved)
}

/// A release of `api` in staging, recorded in `state` (pending or approved).
fn requested(registry: &Registry, content: &[u8], state: State) -> Release {
    try_requested(registry, content, state).unwrap()
}

/// As [`requested`], the registry's refusal kept.
fn try_requested(registry: &Registry, content: &[u8], state: State) -> Result<Release, RegistryError> {
    let digest = Digest::of(content);
    let artifact = NewArtifact {
        digest,
        size: content.len() as u64,
        unpacked_size: 1024,
        file_count: 1,
        migrations: vec![],
        shared_checked: vec![],
        service: "api".into(),
        version: None,
        git_sha: None,
        build_url: None,
        uploaded_by: "ci".into(),
        uploader_owner: "gitlab".into(),
        index: None,
        quiet_repeat: false,
    };
    registry
        .record_artifact(&artifact, &NewEvent::by_server(AuditAction::ArtifactUpload, "", serde_json::json!({})))
        .unwrap();
    let new = NewRelease {
        service: "api".into(),
        environment: "staging".into(),
        digest,
        kind: Kind::Deploy,
        state,
        requested_by: "ci".into(),
        requester_owner: "gitlab".into(),
        source_environment: None,
        replaces: None,
        expires_at: None,
        note: None,
        excluded: vec![],
        adopt: false,
        forced_past: vec![],
    };
    registry.create_release(&new, &NewEvent::by_server(AuditAction::ReleaseDeploy, "", serde_json::json!({})))
}

fn a_minute_ago() -> utc::Timestamp {
    utc::Timestamp::at(utc::now() - time::Duration::minutes(1))
}

fn state(registry: &Registry, id: i64) -> State {
    registry.release(id).unwrap().unwrap().state
}

async fn settle(registry: &Registry, id: i64) -> Release {
    for _ in 0..500 {
        let release = registry.release(id).unwrap().unwrap();
        if !release.state.in_flight() {
            return release;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("release {id} did not settle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_of_a_deploy_this_process_still_runs_is_left_to_its_run() {
    let s = setup();
    let release = approved(&s.registry, b"v1");
    s.releases.launch(release.clone());
    s.deployer.deploying.notified().await;
    // Its renewals failed long enough (a registry that stalled): the lease lapsed.
    assert!(s.registry.renew_lease(&release, &s.releases.instance, &a_minute_ago()).unwrap());
    assert_eq!(s.registry.lapsed_deploys().unwrap().len(), 1);
    s.releases.sweep().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.deployer.recovers.load(Ordering::SeqCst), 0, "not resolved behind its run's back");
    assert_eq!(state(&s.registry, release.id), State::Deploying);
    // The run goes on and records its outcome itself.
    s.deployer.finish_deploy.notify_one();
    assert_eq!(settle(&s.registry, release.id).await.state, State::Live);
    assert_eq!(s.deployer.recovers.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_deploy_no_task_runs_is_resolved_from_its_nodes_once() {
    let s = setup();
    let release = approved(&s.registry, b"v1");
    // Its run ended without recording an outcome (here: no run of this process ever had it).
    let event =
        NewEvent::by_server(AuditAction::ReleaseDeploying, format!("release/{}", release.id), serde_json::json!({}));
    s.registry.start_deploy(release.id, "a run that ended", &a_minute_ago(), &event).unwrap().deploying().unwrap();
    s.releases.sweep().await;
    s.deployer.recovering.notified().await;
    // While it is being resolved, later sweeps leave it alone: its lease is taken and renewed,
    // and this process runs it.
    assert!(s.registry.lapsed_deploys().unwrap().is_empty());
    s.releases.sweep().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.deployer.recovers.load(Ordering::SeqCst), 1);
    s.deployer.finish_recover.notify_one();
    assert_eq!(settle(&s.registry, release.id).await.state, State::Live, "every node on it: finished and live");
    assert_eq!(s.deployer.recovers.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_deploy_whose_nodes_are_elsewhere_fails_with_what_was_found() {
    let s = setup();
    let release = approved(&s.registry, b"v1");
    let event =
        NewEvent::by_server(AuditAction::ReleaseDeploying, format!("release/{}", release.id), serde_json::json!({}));
    s.registry.start_deploy(release.id, "a run that ended", &a_minute_ago(), &event).unwrap().deploying().unwrap();
    *s.deployer.recover_fails.lock().unwrap() = Some("node web-1 serves 0123456789ab, not the new release".into());
    s.deployer.finish_recover.notify_one();
    s.releases.sweep().await;
    let settled = settle(&s.registry, release.id).await;
    assert_eq!(settled.state, State::Failed);
    let detail = s.registry.release_detail(release.id).unwrap().unwrap();
    let reason = detail.transitions.last().unwrap().reason.clone().unwrap();
    assert_eq!(
        reason,
        "the deploy's run ended without recording its outcome; node web-1 serves 0123456789ab, not the new release; \
         not put back: web-2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_follows_live_with_what_the_registry_keeps_and_never_a_failed_deploy() {
    let s = setup();
    let first = approved(&s.registry, b"v1");
    s.releases.launch(first.clone());
    s.deployer.finish_deploy.notify_one();
    s.deployer.cleaned.notified().await;
    assert_eq!(state(&s.registry, first.id), State::Live, "cleaned up only once live was recorded");
    assert_eq!(*s.deployer.cleanups.lock().unwrap(), [(first.id, vec![first.digest])]);

    // A failed deploy cleans nothing up.
    *s.deployer.deploy_fails.lock().unwrap() = Some("node web-1: verify failed".into());
    let failing = approved(&s.registry, b"v2");
    s.releases.launch(failing.clone());
    s.deployer.finish_deploy.notify_one();
    assert_eq!(settle(&s.registry, failing.id).await.state, State::Failed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.deployer.cleanups.lock().unwrap().len(), 1);

    // The next one keeps itself (live now) and the one it replaced, read from the registry.
    *s.deployer.deploy_fails.lock().unwrap() = None;
    let second = approved(&s.registry, b"v3");
    s.releases.launch(second.clone());
    s.deployer.finish_deploy.notify_one();
    s.deployer.cleaned.notified().await;
    let mut keep = vec![first.digest, second.digest];
    keep.sort();
    assert_eq!(s.deployer.cleanups.lock().unwrap()[1], (second.id, keep), "the failed v2 is not kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_whose_outcome_cannot_be_recorded_is_resolved_again_later_not_at_every_sweep() {
    let s = setup();
    let release = approved(&s.registry, b"v1");
    let event =
        NewEvent::by_server(AuditAction::ReleaseDeploying, format!("release/{}", release.id), serde_json::json!({}));
    s.registry.start_deploy(release.id, "a run that ended", &a_minute_ago(), &event).unwrap().deploying().unwrap();
    // The registry refuses to record any release live, as a failing disk would.
    let sql = rusqlite::Connection::open(s.registry.path()).unwrap();
    sql.execute_batch(
        "CREATE TRIGGER refuse_live BEFORE UPDATE OF state ON releases WHEN NEW.state = 'live'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .unwrap();
    s.deployer.finish_recover.notify_one();
    s.releases.sweep().await;
    let pending = || s.releases.resolve_again.lock().unwrap().get(&release.id).copied();
    for _ in 0..1000 {
        if pending().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (tries, at) = pending().expect("the unrecorded resolution is scheduled again");
    assert_eq!(tries, 1);
    assert!(at > std::time::Instant::now() + Duration::from_secs(50), "a pause of twice the lease at least");
    assert_eq!(state(&s.registry, release.id), State::Deploying);

    // Its lease lapses again: the next sweep leaves it until its time comes.
    assert!(s.registry.renew_lease(&release, &s.releases.instance, &a_minute_ago()).unwrap());
    assert_eq!(s.registry.lapsed_deploys().unwrap().len(), 1);
    s.releases.sweep().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.deployer.recovers.load(Ordering::SeqCst), 1, "not resolved again at once");

    // Its time comes (brought forward here) and the registry writes again: resolved, live.
    sql.execute_batch("DROP TRIGGER refuse_live").unwrap();
    s.releases.resolve_again.lock().unwrap().insert(release.id, (tries, std::time::Instant::now()));
    s.deployer.finish_recover.notify_one();
    s.releases.sweep().await;
    assert_eq!(settle(&s.registry, release.id).await.state, State::Live);
    assert_eq!(s.deployer.recovers.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(pending().is_none(), "recorded: nothing left to try again");
}

fn block(registry: &Registry, digest: Digest) -> Vec<Release> {
    let block = crate::registry::Block {
        reason: "corrupts orders".into(),
        blocked_by: "root".into(),
        owner: "root".into(),
        blocked_at: crate::utc::Timestamp::now(),
    };
    let event = NewEvent::by_server(AuditAction::ArtifactBlock, digest.to_string(), serde_json::json!({}));
    registry.block_artifact(digest, &block, &event).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_between_the_approval_and_the_launch_cancels_the_release_before_it_starts() {
    let s = setup();
    let pending = requested(&s.registry, b"v1", State::PendingApproval);
    let decision = NewApproval { approve: true, decided_by: "bob".into(), decider_owner: "bob".into(), reason: None };
    let event =
        NewEvent::by_server(AuditAction::ReleaseApprove, format!("release/{}", pending.id), serde_json::json!({}));
    let approved = s.registry.decide(pending.id, &decision, &event).unwrap();
    // The block commits after the approval and before the launch's first step.
    let cancelled = block(&s.registry, approved.digest);
    assert_eq!(cancelled.iter().map(|r| r.id).collect::<Vec<_>>(), [approved.id]);
    // Were it started anyway, its deploy would end at once: a wrong outcome shows as a state.
    s.deployer.finish_deploy.notify_one();
    s.releases.run(approved.clone()).await.unwrap();
    let detail = s.registry.release_detail(approved.id).unwrap().unwrap();
    assert_eq!(detail.release.state, State::Cancelled, "{detail:?}");
    assert!(detail.transitions.iter().all(|t| t.state != State::Deploying), "never started: {detail:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_while_the_release_deploys_stops_it_before_the_switch() {
    let s = setup();
    let release = approved(&s.registry, b"v1");
    s.releases.launch(release.clone());
    s.deployer.deploying.notified().await;
    assert!(block(&s.registry, release.digest).is_empty(), "a running deploy is not cancelled");
    s.deployer.finish_deploy.notify_one();
    let settled = settle(&s.registry, release.id).await;
    assert_eq!(settled.state, State::Failed);
    let detail = s.registry.release_detail(release.id).unwrap().unwrap();
    let reason = detail.transitions.last().unwrap().reason.clone().unwrap();
    assert!(reason.contains("blocked by root (corrupts orders)"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_returns_while_a_deploy_a_stopped_server_left_is_resolved_and_its_cell_says_so() {
    let s = setup();
    let release = approved(&s.registry, b"v1");
    let event =
        NewEvent::by_server(AuditAction::ReleaseDeploying, format!("release/{}", release.id), serde_json::json!({}));
    s.registry.start_deploy(release.id, "a stopped server", &a_minute_ago(), &event).unwrap().deploying().unwrap();
    // The nodes have not answered yet (the deployer waits for the test), and the start is over.
    tokio::time::timeout(Duration::from_secs(10), s.releases.start())
        .await
        .expect("the start waits for no node")
        .unwrap();
    s.deployer.recovering.notified().await;
    assert!(s.releases.is_recovering(release.id));
    // Another release for its cell is refused as busy with the recovery, naming it.
    let other = try_requested(&s.registry, b"v2", State::Approved).expect_err("one release in flight per cell");
    let refused = s.releases.busy(other.into());
    assert!(matches!(&refused, ReleaseError::Recovering(r) if r.id == release.id), "{refused}");
    assert!(refused.to_string().contains("being recovered"), "{refused}");
    s.deployer.finish_recover.notify_one();
    assert_eq!(settle(&s.registry, release.id).await.state, State::Live);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.releases.is_recovering(release.id) {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once resolved, the same refusal is the plain one.
    let plain = s.releases.busy(ReleaseError::Conflict(RegistryError::InFlight(Box::new(release))));
    assert!(matches!(plain, ReleaseError::Conflict(_)));
}

/// Issue 13: `Releases` built an ingestor of its own, so a node's adopted tree was kept
/// outside `max_concurrent_uploads`, the limit that bounds what uploads hold in memory, and
/// any number at once. Since then the adoptions share the uploads' turns: one beyond the
/// clients', so that a deploy waits for no client's upload (N2: two CI tokens trickling once
/// held a deploy for hours), and adoptions wait for each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_takes_the_one_turn_beyond_the_uploads_and_the_next_waits_for_it() {
    use futures::StreamExt;

    use crate::ingest::{Pace, Piece, UploadRequest};
    use crate::model::access::Role;

    let s = setup_with("[limits]\nmax_concurrent_uploads = 1\n");
    let ci =
        Principal { name: "ci".into(), owner: "ci".into(), roles: vec![Role::Ci], services: None, environments: None };
    // An upload whose body has not ended holds the one turn.
    let (body, held) = futures::channel::mpsc::unbounded::<Result<Piece, std::io::Error>>();
    let upload = {
        let (ingestor, ci) = (s.ingestor.clone(), ci.clone());
        // A client's: paced (so that it takes a client's turn), never too slow here.
        let hour = crate::config::HumanDuration(Duration::from_secs(3600));
        let pace = Pace { stall: hour, min_rate: crate::config::ByteSize(0), window: hour };
        let request = UploadRequest { service: "api".into(), pace: Some(pace), ..UploadRequest::default() };
        tokio::spawn(async move { ingestor.ingest(&ci, request, held).await })
    };
    body.unbounded_send(Ok(Piece::Bytes(bytes::Bytes::from_static(b"not finished")))).unwrap();
    let ingestor = &s.ingestor;
    let running = |n| async move {
        for _ in 0..500 {
            if ingestor.uploads_running() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ingestor.uploads_running()
    };
    assert_eq!(running(1).await, 1, "the upload holds the turn");

    // Two nodes' legacy trees, packaged, to be kept as artifacts by two adoptions for one
    // release; the first one's bytes come through a channel, so that it holds its turn until
    // they end.
    let release = approved(&s.registry, b"v1");
    let adoption = |content: &[u8]| {
        let tree = tempfile::tempdir().unwrap();
        std::fs::write(tree.path().join("index.html"), content).unwrap();
        let (packed, package) = crate::archive::pack_to_writer(tree.path(), &[], Vec::new(), &mut |_| {}).unwrap();
        let adopter = adopt::ServerAdopter {
            ingestor: s.releases.ingestor.clone(),
            registry: Arc::clone(&s.registry),
            release: release.clone(),
        };
        (packed.digest, package, adopter)
    };
    let (first, first_package, first_adopter) = adoption(b"legacy one");
    let (feed, fed) = futures::channel::mpsc::unbounded();
    let first_kept = tokio::spawn(async move { first_adopter.keep(first, fed.boxed()).await });
    feed.unbounded_send(Ok(bytes::Bytes::from(first_package))).unwrap();
    assert_eq!(running(2).await, 2, "the adoption takes the turn beyond the upload's");
    let (second, second_package, second_adopter) = adoption(b"legacy two");
    let second_kept = tokio::spawn(async move {
        let bytes = futures::stream::iter([Ok(bytes::Bytes::from(second_package))]).boxed();
        second_adopter.keep(second, bytes).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second_kept.is_finished(), "the second adoption waits for the first");

    // The first adoption's bytes end: it is kept, and its turn goes to the second.
    drop(feed);
    first_kept.await.unwrap().expect("kept");
    second_kept.await.unwrap().expect("kept once it had the turn");
    for digest in [first, second] {
        assert!(s.registry.artifact(digest).unwrap().is_some(), "the adopted tree is an artifact");
    }
    assert_eq!(s.ingestor.uploads_running(), 1, "the upload holds its turn all along");
    drop(body);
    assert!(upload.await.unwrap().is_err(), "refused: not an archive");
    assert_eq!(s.ingestor.uploads_running(), 0);
}
