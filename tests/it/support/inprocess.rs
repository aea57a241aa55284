//! A server started inside the test process, with a deploy seam of the test's choosing (to
//! hold a release in flight for as long as a test needs). Everything else is the real thing:
//! real registry, real store, real HTTP on a loopback port.

use std::path::PathBuf;
use std::sync::Arc;

use release::config::{Config, Overrides};
use release::releases::Deployer;
use release::server::{self, Opened};

pub struct InProcessServer {
    pub url: String,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessServer {
    pub fn start(extra: &str, deployer: Arc<dyn Deployer>) -> InProcessServer {
        let dir = tempfile::Builder::new().prefix("release-inproc-").tempdir().unwrap();
        InProcessServer::start_in(dir, extra, deployer)
    }

    /// Starts on an existing directory (and so the registry and store a stopped server left).
    pub fn start_in(dir: tempfile::TempDir, extra: &str, deployer: Arc<dyn Deployer>) -> InProcessServer {
        let config_path = dir.path().join("release.toml");
        let extra = extra.replace("@NODES@", &dir.path().join("nodes").display().to_string());
        std::fs::write(
            &config_path,
            format!("[server]\ndata_dir = \"{}\"\n{extra}", dir.path().join("data").display()),
        )
        .unwrap();
        let config = Config::load(Some(&config_path), &Overrides::default()).unwrap();
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let opened = Opened::open(config, move |_, _| deployer).await.unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                url_tx.send(format!("http://{}", listener.local_addr().unwrap())).unwrap();
                let limits = opened.state.config.limits;
                server::serve(listener, server::router(opened.state.clone()), limits, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let url = url_rx.recv().expect("the in-process server starts");
        InProcessServer { url, dir, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn token(&self, name: &str, roles: &str, owner: &str) -> String {
        let mut cmd = super::TestCommand::new();
        cmd.env("RELEASE_DATA_DIR", self.data_dir());
        let out = cmd.args(["token", "create", name, "--role", roles, "--owner", owner, "--json"]).assert_success();
        out.json()["token"].as_str().unwrap().to_owned()
    }
}

impl InProcessServer {
    /// Stops the server at once, as a crash would for whatever it was doing (its runtime and
    /// every task on it are dropped), and hands back its directory.
    pub fn crash(mut self) -> tempfile::TempDir {
        self.stop_now();
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}
