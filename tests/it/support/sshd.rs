//! Nodes behind a real `sshd` (Debian's openssh-server), one per loopback address, each with
//! its own host key; the tests' client key is authorized on all of them and their host keys
//! go into a known_hosts file the server is configured to check.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// Where the test nodes keep the agent binaries the server ships: they all log in as root,
/// so this one directory (root's `~/.release/bin`) is shared by every node of every test.
pub fn agent_dir() -> PathBuf {
    let home = Command::new("sh").args(["-c", "getent passwd root | cut -d: -f6"]).output().unwrap();
    PathBuf::from(String::from_utf8(home.stdout).unwrap().trim()).join(".release/bin")
}

/// The tests' client key pair (made once per test process).
pub fn client_key() -> &'static Path {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("release-ssh-client-").tempdir().unwrap().keep();
        let key = dir.join("id_ed25519");
        keygen(&key);
        key
    })
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).output().unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
}

/// A loopback address of its own for each node: 127.x.y.z, away from other test processes.
fn next_address() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let block = 16 + std::process::id() % 200;
    format!("127.{block}.{}.{}", n / 200, n % 200 + 2)
}

pub struct SshNode {
    pub address: String,
    pub port: u16,
    pub dir: PathBuf,
    pid: Option<u32>,
}

impl SshNode {
    pub fn start() -> SshNode {
        SshNode::start_with("")
    }

    /// A compromised node: the node agent's command (`…/release-<build> node`) runs `agent`
    /// (a shell script) instead; every other command (shipping the binary) runs as usual. The
    /// script reads the request from stdin; `$SSH_ORIGINAL_COMMAND` runs the real agent.
    pub fn hostile(agent: &str) -> SshNode {
        let dir = tempfile::Builder::new().prefix("release-hostile-").tempdir().unwrap().keep();
        let (force, script) = (dir.join("force.sh"), dir.join("agent.sh"));
        std::fs::write(&script, agent).unwrap();
        std::fs::write(
            &force,
            format!(
                "case \"$SSH_ORIGINAL_COMMAND\" in\n  .release/bin/release-*\" node --protocol \"*) exec sh {} ;;\n  \
                 *) exec sh -c \"$SSH_ORIGINAL_COMMAND\" ;;\nesac\n",
                script.display()
            ),
        )
        .unwrap();
        SshNode::start_with(&format!("ForceCommand sh {}\n", force.display()))
    }

    /// With `extra` lines in its sshd_config.
    fn start_with(extra: &str) -> SshNode {
        assert!(Path::new(SSHD).exists(), "the SSH tests need {SSHD} (openssh-server): run `bash .ci/run`");
        std::fs::create_dir_all("/run/sshd").unwrap();
        let address = next_address();
        let port = TcpListener::bind((address.as_str(), 0)).unwrap().local_addr().unwrap().port();
        let dir = tempfile::Builder::new().prefix("release-sshd-").tempdir().unwrap().keep();
        keygen(&dir.join("host_key"));
        let public = std::fs::read_to_string(client_key().with_extension("pub")).unwrap();
        std::fs::write(dir.join("authorized_keys"), public).unwrap();
        // SHLVL: Debian's bash sources ~/.bashrc for a command sshd runs unless it is nested
        // (SHLVL >= 2). Root's .bashrc on these machines runs `pyenv init`, whose rehash takes
        // a lock: a session killed mid-rehash (the fault tests kill sshd) left the lock behind
        // and every later command of every node waited 60 s for it. The nodes' own user, not
        // root's Python set-up, is what the tests are about. SFTP, as Debian's sshd offers it:
        // scp speaks it (docs/migrating.md copies a .env with scp).
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "ListenAddress {address}:{port}\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 StrictModes no\nUsePAM no\nPidFile {dir}/sshd.pid\nMaxStartups 100\nMaxSessions 100\n\
                 SetEnv SHLVL=5\nSubsystem sftp internal-sftp\n{extra}",
                dir = dir.display()
            ),
        )
        .unwrap();
        let mut node = SshNode { address, port, dir, pid: None };
        node.run();
        node
    }

    fn run(&mut self) {
        let mut command = Command::new(SSHD);
        command.arg("-D").arg("-f").arg(self.dir.join("sshd_config")).arg("-E").arg(self.dir.join("sshd.log"));
        // A process group of its own, so that killing it ends every connection it serves too.
        command.process_group(0);
        self.pid = Some(super::spawn_tied_to_this_process(command));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.address.as_str(), self.port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// `[address]:port key` for known_hosts.
    pub fn known_hosts_line(&self) -> String {
        let key = std::fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        format!("[{}]:{} {}\n", self.address, self.port, key.join(" "))
    }

    /// Kills sshd and every connection it serves (its per-connection processes start sessions
    /// of their own, so the process group is not enough: the whole process tree goes), as a
    /// crashed or unplugged node would.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            for victim in descendants(pid).into_iter().chain([pid]) {
                // SAFETY: signals to processes of the sshd we started.
                unsafe { libc::kill(victim as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn start_again(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for SshNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every process below `root`, from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // The command name is in parentheses and may contain spaces: read after the last ')'.
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// Writes a known_hosts file for these nodes; returns its path.
pub fn known_hosts(nodes: &[&SshNode]) -> PathBuf {
    let dir = tempfile::Builder::new().prefix("release-known-hosts-").tempdir().unwrap().keep();
    let path = dir.join("known_hosts");
    std::fs::write(&path, nodes.iter().map(|n| n.known_hosts_line()).collect::<String>()).unwrap();
    path
}

/// Makes `dir` and its `authorized_keys` readable by every user, so that a node can log in a
/// user other than root (sshd reads the keys as that user).
pub fn open_to_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let keys = dir.join("authorized_keys");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// A system user for the hook-user tests (with a home directory when `home`: an SSH user's
/// agent lives there), added once with useradd when missing; its uid. `None` when the tests
/// are not root (they say so and skip): only root adds users and sudoes to any of them.
pub fn system_user(name: &str, home: bool) -> Option<u32> {
    static ADDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n") {
        eprintln!("skipped: not root, cannot add the user {name}");
        return None;
    }
    let _adding = ADDING.lock().unwrap_or_else(|e| e.into_inner());
    let uid = || Command::new("id").args(["-u", name]).output().ok().filter(|o| o.status.success());
    if uid().is_none() {
        let mut add = Command::new("useradd");
        add.args(["--system", "--shell", "/bin/sh"]);
        if home {
            add.arg("--create-home");
        } else {
            add.arg("--no-create-home");
        }
        assert!(add.arg(name).status().unwrap().success(), "useradd {name}");
    }
    if home {
        // Not locked (useradd's `!`): sshd without PAM refuses a locked account's keys. `*`:
        // no password either.
        assert!(Command::new("usermod").args(["-p", "*", name]).status().unwrap().success(), "usermod {name}");
    }
    let out = uid().expect("the user just added");
    Some(String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
}
