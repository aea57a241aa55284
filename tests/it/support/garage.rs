//! A real Garage S3 server for the tests: the one `.ci/run` started (named by
//! `RELEASE_TEST_S3_*`), or one started here, once per test binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Garage {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

static GARAGE: OnceLock<Garage> = OnceLock::new();

/// The shared Garage; panics loudly when none can be had (never a silent skip).
pub fn garage() -> Garage {
    GARAGE
        .get_or_init(|| match from_env() {
            Some(garage) => {
                wait_ready(&garage, None);
                garage
            }
            None => start(),
        })
        .clone()
}

fn from_env() -> Option<Garage> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Some(Garage {
        endpoint: var("RELEASE_TEST_S3_ENDPOINT")?,
        region: var("RELEASE_TEST_S3_REGION").unwrap_or_else(|| "garage".into()),
        bucket: var("RELEASE_TEST_S3_BUCKET")?,
        access_key: var("RELEASE_TEST_S3_ACCESS_KEY")?,
        secret_key: var("RELEASE_TEST_S3_SECRET_KEY")?,
    })
}

fn garage_binary() -> PathBuf {
    let candidates = [
        std::env::var_os("GARAGE_BIN").map(PathBuf::from),
        Some(PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/garage")),
        Some(PathBuf::from("/usr/local/bin/garage")),
    ];
    candidates.into_iter().flatten().find(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "the S3 tests need Garage and found none: run `bash .ci/run`, or `cargo install --locked garage --version 2.5.0`, \
             or name a running S3 server with RELEASE_TEST_S3_ENDPOINT/_BUCKET/_ACCESS_KEY/_SECRET_KEY"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn random_hex(bytes: usize) -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

fn start() -> Garage {
    let binary = garage_binary();
    let dir = tempfile::Builder::new().prefix("release-test-garage-").tempdir().unwrap().keep();
    let (rpc, api) = (free_port(), free_port());
    let config = dir.join("garage.toml");
    std::fs::write(
        &config,
        format!(
            "metadata_dir = \"{dir}/meta\"\ndata_dir = \"{dir}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{api}\"\n",
            dir = dir.display(),
            secret = random_hex(32),
        ),
    )
    .unwrap();
    let garage = Garage {
        endpoint: format!("http://127.0.0.1:{api}"),
        region: "garage".into(),
        bucket: "artifacts".into(),
        access_key: format!("GK{}", random_hex(12)),
        secret_key: random_hex(32),
    };
    let log = std::fs::File::create(dir.join("garage.log")).unwrap();
    let mut command = Command::new(&binary);
    command
        .args(["-c", config.to_str().unwrap(), "server", "--single-node", "--default-bucket"])
        .env("GARAGE_DEFAULT_ACCESS_KEY", &garage.access_key)
        .env("GARAGE_DEFAULT_SECRET_KEY", &garage.secret_key)
        .env("GARAGE_DEFAULT_BUCKET", &garage.bucket)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _ = super::spawn_tied_to_this_process(command);
    wait_ready(&garage, Some(&dir));
    garage
}

fn wait_ready(garage: &Garage, dir: Option<&std::path::Path>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = super::s3_store(garage, "readiness/");
    loop {
        match super::block_on(store.list_artifacts()) {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => {
                let log = dir.and_then(|d| std::fs::read_to_string(d.join("garage.log")).ok()).unwrap_or_default();
                panic!("Garage did not become ready in 30 s: {e}\n--- garage.log ---\n{log}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
