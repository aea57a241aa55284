//! Test certificates made with the openssl command: throwaway CAs and leaves for 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, script: &str) {
    let out = Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A CA in `dir`: `<name>.pem` (give it to clients) and `<name>.key`.
pub fn ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &format!(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key \
             -out {name}.pem -subj /CN={name} -days 2 2>/dev/null"
        ),
    );
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 signed by the CA `ca` (made by [`ca`] in `dir`):
/// `<name>.pem` and `<name>.key`, returned in that order.
pub fn leaf(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -out {name}.csr \
             -subj /CN=127.0.0.1 2>/dev/null && \
             printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' \
             > {name}.ext && \
             openssl x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem \
             -days 2 -extfile {name}.ext 2>/dev/null"
        ),
    );
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}
