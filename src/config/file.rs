//! The configuration file as written (its raw TOML sections, every key checked by name) and
//! its resolution, with defaults, `RELEASE_*` variables and flags, into a [`Config`].

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    server: ServerSection,
    storage: Option<StorageSection>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    ssh: SshConfig,
    #[serde(default)]
    audit: AuditConfig,
    #[serde(default)]
    backup: BackupConfig,
    #[serde(default)]
    environment: Vec<EnvironmentSection>,
    #[serde(default)]
    service: BTreeMap<String, ServiceSection>,
    #[serde(default)]
    webhook: Vec<webhook::WebhookSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerSection {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    node_url: Option<String>,
    public_url: Option<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum StorageSection {
    Local { path: Option<PathBuf> },
    S3(S3Config),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnvironmentSection {
    name: String,
    promote_from: Option<String>,
    #[serde(default)]
    requires_approval: bool,
    approval_ttl: Option<HumanDuration>,
    parallel: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    #[serde(default = "default_kind")]
    kind: ServiceKind,
    shared: Option<Vec<String>>,
    keep: Option<u32>,
    health: Option<HealthCheck>,
    #[serde(default)]
    hooks: Hooks,
    #[serde(default)]
    env: BTreeMap<String, String>,
    pm2_app: Option<String>,
    hook_user: Option<String>,
    umask: Option<String>,
    #[serde(default)]
    node: Vec<Node>,
}

pub(super) fn default_kind() -> ServiceKind {
    ServiceKind::Generic
}

pub(super) fn parse_file(path: &Path, text: &str) -> Result<File, ConfigError> {
    let parse_error = |line: Option<usize>, key: String, message: String| ConfigError::Parse {
        path: path.to_owned(),
        line,
        key,
        message,
    };
    let line_of =
        |span: Option<std::ops::Range<usize>>| span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let de = toml::de::Deserializer::parse(text)
        .map_err(|e| parse_error(line_of(e.span()), String::new(), e.message().trim().to_owned()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        parse_error(line_of(inner.span()), key, inner.message().trim().to_owned())
    })
}

/// `env` looks up an environment variable (what a webhook's `secret_env` names).
pub(super) fn resolve(
    file: Option<&Path>,
    parsed: File,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let origin = file.map_or_else(|| "built-in default".to_owned(), |p| p.display().to_string());
    let invalid =
        |key: &str, message: String| ConfigError::Invalid { path: origin.clone(), key: key.to_owned(), message };

    let listen =
        overrides.listen.or(parsed.server.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
    let data_dir =
        overrides.data_dir.clone().or(parsed.server.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let tls = match (parsed.server.tls_cert, parsed.server.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("server.tls_key", "tls_cert is set, so tls_key is needed too".into())),
        (None, Some(_)) => return Err(invalid("server.tls_cert", "tls_key is set, so tls_cert is needed too".into())),
    };
    let node_url = match parsed.server.node_url {
        None => None,
        Some(url) => Some(node_url(&url).map_err(|why| invalid("server.node_url", why))?),
    };
    let public_url = match parsed.server.public_url {
        None => None,
        Some(url) => Some(public_url(&url).map_err(|why| invalid("server.public_url", why))?),
    };
    let trusted_proxies = parsed
        .server
        .trusted_proxies
        .iter()
        .map(|p| IpRange::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|why| invalid("server.trusted_proxies", why))?;
    let storage = match parsed.storage {
        None | Some(StorageSection::Local { path: None }) => StorageConfig::Local { path: data_dir.join("objects") },
        Some(StorageSection::Local { path: Some(path) }) => StorageConfig::Local { path },
        Some(StorageSection::S3(s3)) => {
            if !(s3.endpoint.starts_with("https://") || s3.endpoint.starts_with("http://")) {
                return Err(invalid(
                    "storage.endpoint",
                    format!("{:?} must start with https:// or http://", s3.endpoint),
                ));
            }
            if s3.bucket.is_empty() {
                return Err(invalid("storage.bucket", "must not be empty".into()));
            }
            if !(s3.prefix.is_empty() || s3.prefix.ends_with('/')) || s3.prefix.starts_with('/') {
                return Err(invalid("storage.prefix", format!("{:?} must be empty or like \"release/\"", s3.prefix)));
            }
            StorageConfig::S3(s3)
        }
    };

    let limits = parsed.limits;
    for (key, value) in [
        ("limits.max_upload_bytes", limits.max_upload_bytes.0),
        ("limits.max_unpacked_bytes", limits.max_unpacked_bytes.0),
        ("limits.max_files", limits.max_files),
        ("limits.max_concurrent_uploads", limits.max_concurrent_uploads.into()),
        ("limits.max_body_bytes", limits.max_body_bytes.0),
        ("limits.max_connections", limits.max_connections.into()),
        ("limits.max_connections_per_source", limits.max_connections_per_source.into()),
    ] {
        if value == 0 {
            return Err(invalid(key, "must be greater than zero".into()));
        }
    }
    for (key, value) in [
        ("limits.header_timeout", limits.header_timeout),
        ("limits.request_timeout", limits.request_timeout),
        ("limits.send_timeout", limits.send_timeout),
        ("limits.upload_stall_timeout", limits.upload_stall_timeout),
        ("limits.upload_rate_window", limits.upload_rate_window),
        ("limits.node_fetch_stall_timeout", limits.node_fetch_stall_timeout),
    ] {
        if value.0 < Duration::from_millis(100) {
            return Err(invalid(key, "must be at least 100ms".into()));
        }
    }

    if parsed.audit.checkpoint_interval.0.is_zero() {
        return Err(invalid("audit.checkpoint_interval", "must be longer than zero".into()));
    }
    let window = parsed.audit.refusal_window.0;
    if window < Duration::from_secs(1) || window > Duration::from_secs(3600) {
        return Err(invalid("audit.refusal_window", "must be from 1s to 1h".into()));
    }
    if parsed.backup.keep == 0 {
        return Err(invalid("backup.keep", "must be at least 1 (the newest backup is never deleted)".into()));
    }
    let environments = resolve_environments(parsed.environment, &invalid)?;
    let mut services = BTreeMap::new();
    for (name, section) in parsed.service {
        let service = resolve_service(name.clone(), section, &environments, &invalid)?;
        services.insert(name, service);
    }
    let webhooks = webhook::resolve(parsed.webhook, &environments, &services, env, &invalid)?;

    Ok(Config {
        source: file.map(Path::to_owned),
        listen,
        data_dir,
        node_url,
        public_url,
        trusted_proxies,
        tls,
        storage,
        limits,
        ssh: parsed.ssh,
        audit: parsed.audit,
        backup: parsed.backup,
        environments,
        services,
        webhooks,
    })
}

pub(super) fn resolve_environments(
    sections: Vec<EnvironmentSection>,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Vec<Environment>, ConfigError> {
    if sections.is_empty() {
        return Ok(default_environments());
    }
    let mut environments: Vec<Environment> = Vec::new();
    for (i, section) in sections.into_iter().enumerate() {
        let key = |field: &str| format!("environment[{i}].{field}");
        if !is_valid_name(&section.name) {
            return Err(invalid(&key("name"), format!("{:?} must match [a-z0-9][a-z0-9-]*", section.name)));
        }
        if environments.iter().any(|e| e.name == section.name) {
            return Err(invalid(&key("name"), format!("environment {:?} is defined twice", section.name)));
        }
        if let Some(from) = &section.promote_from
            && !environments.iter().any(|e| &e.name == from)
        {
            return Err(invalid(
                &key("promote_from"),
                format!("{from:?} is not an environment defined before {:?}", section.name),
            ));
        }
        if section.parallel == Some(0) {
            return Err(invalid(&key("parallel"), "must be at least 1".into()));
        }
        environments.push(Environment {
            name: section.name,
            promote_from: section.promote_from,
            requires_approval: section.requires_approval,
            approval_ttl: section.approval_ttl.map_or(Duration::from_secs(24 * 3600), |d| d.0),
            parallel: section.parallel.unwrap_or(10),
        });
    }
    Ok(environments)
}

pub(super) fn default_environments() -> Vec<Environment> {
    vec![
        Environment {
            name: "staging".into(),
            promote_from: None,
            requires_approval: false,
            approval_ttl: Duration::from_secs(24 * 3600),
            parallel: 10,
        },
        Environment {
            name: "production".into(),
            promote_from: Some("staging".into()),
            requires_approval: true,
            approval_ttl: Duration::from_secs(24 * 3600),
            parallel: 10,
        },
    ]
}

pub(super) fn resolve_service(
    name: String,
    section: ServiceSection,
    environments: &[Environment],
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Service, ConfigError> {
    let key = |field: &str| format!("service.{name}.{field}");
    if !is_valid_name(&name) {
        return Err(invalid(
            &format!("service.{name}"),
            format!("service name {name:?} must match [a-z0-9][a-z0-9-]*"),
        ));
    }
    let shared = section.shared.unwrap_or_else(|| match section.kind {
        ServiceKind::Laravel => vec![".env".into(), "storage".into()],
        ServiceKind::Node => vec![".env".into()],
        ServiceKind::Generic => vec![],
    });
    // Normalized (`storage/` → `storage`), so that the archive check compares like with like.
    let shared = shared
        .iter()
        .map(|path| normalize_relative_path(path).map_err(|why| invalid(&key("shared"), format!("{path:?} {why}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if section.keep == Some(0) {
        return Err(invalid(&key("keep"), "must be at least 1".into()));
    }
    let pm2_app = match (section.kind, section.pm2_app) {
        (ServiceKind::Node, None) => Some(name.clone()),
        (ServiceKind::Node, Some(app)) if is_valid_pm2_app(&app) => Some(app),
        (ServiceKind::Node, Some(app)) => {
            return Err(invalid(
                &key("pm2_app"),
                format!(
                    "{app:?} must be 1 to 128 of A-Z a-z 0-9 . _ - and not start with - \
                     (it goes into the command `pm2 reload <app>`)"
                ),
            ));
        }
        (_, Some(_)) => return Err(invalid(&key("pm2_app"), "only node services run under PM2".into())),
        (_, None) => None,
    };
    for (i, node) in section.node.iter().enumerate() {
        let node_key = |field: &str| format!("service.{name}.node[{i}].{field}");
        if !environments.iter().any(|e| e.name == node.environment) {
            return Err(invalid(
                &node_key("environment"),
                format!("{:?} is not a configured environment", node.environment),
            ));
        }
        if node.migrate && section.kind != ServiceKind::Laravel {
            return Err(invalid(&node_key("migrate"), "only laravel services run migrations".into()));
        }
        if node.host == "local" && (node.user.is_some() || node.port != 22) {
            let field = if node.user.is_some() { "user" } else { "port" };
            return Err(invalid(
                &node_key(field),
                "a local node runs as the server's own user, without SSH: no user or port".into(),
            ));
        }
        // One directory on one machine is one node: two entries for it (two environments,
        // say) would deploy over each other.
        if let Some(j) =
            section.node[..i].iter().position(|n| n.host == node.host && n.port == node.port && n.base == node.base)
        {
            return Err(invalid(
                &node_key("base"),
                format!(
                    "{} on {} is node[{j}]'s too (environment {:?}): each node needs a base of its own",
                    node.base.display(),
                    node.host,
                    section.node[j].environment
                ),
            ));
        }
    }
    if section.kind == ServiceKind::Laravel {
        for env in environments {
            let in_env: Vec<_> = section.node.iter().filter(|n| n.environment == env.name).collect();
            let migrators = in_env.iter().filter(|n| n.migrate).count();
            if !in_env.is_empty() && migrators != 1 {
                return Err(invalid(
                    &key("node"),
                    format!(
                        "a laravel service needs exactly one node with migrate = true per environment; {:?} has {migrators}",
                        env.name
                    ),
                ));
            }
        }
    }
    if let Some(health) = &section.health {
        check_health(health).map_err(|(field, why)| invalid(&key(&format!("health.{field}")), why))?;
    }
    if let Some(user) = &section.hook_user {
        node::check_user(user).map_err(|why| invalid(&key("hook_user"), why))?;
    }
    let umask = match &section.umask {
        None => None,
        Some(text) => Some(
            u32::from_str_radix(text, 8).ok().filter(|m| (3..=4).contains(&text.len()) && *m <= 0o777).ok_or_else(
                || invalid(&key("umask"), format!("{text:?} is not a umask: 3 or 4 octal digits, e.g. \"0002\"")),
            )?,
        ),
    };
    Ok(Service {
        name,
        kind: section.kind,
        shared,
        keep: section.keep.unwrap_or(5),
        health: section.health,
        hooks: section.hooks,
        env: section.env,
        nodes: section.node,
        pm2_app,
        hook_user: section.hook_user,
        umask,
    })
}

/// Bounds on a health check's numbers: `(field, why)` for the first out of them.
pub(super) fn check_health(h: &HealthCheck) -> Result<(), (&'static str, String)> {
    use std::time::Duration;
    if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&h.timeout.0) {
        return Err(("timeout", format!("{} is not between 1s and 10m", h.timeout)));
    }
    if !(Duration::from_millis(50)..=h.timeout.0).contains(&h.interval.0) {
        return Err(("interval", format!("{} is not between 50ms and the timeout ({})", h.interval, h.timeout)));
    }
    for (field, n) in [("healthy_after", h.healthy_after), ("unhealthy_after", h.unhealthy_after)] {
        if !(1..=100).contains(&n) {
            return Err((field, format!("{n} is not between 1 and 100")));
        }
    }
    Ok(())
}

/// A PM2 app name the default reload command can carry without quoting.
pub(super) fn is_valid_pm2_app(app: &str) -> bool {
    (1..=128).contains(&app.len())
        && !app.starts_with('-')
        && app.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Service and environment names: `[a-z0-9][a-z0-9-]*`, at most 64 characters.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_lowercase() | bytes[0].is_ascii_digit()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A path inside a release, normalized: relative, no `..` or `.`, single slashes, no
/// trailing slash.
pub(super) fn normalize_relative_path(path: &str) -> Result<String, &'static str> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() {
        return Err("must be a relative path inside the release");
    }
    let mut parts = Vec::new();
    for component in p.components() {
        match component {
            std::path::Component::Normal(part) => parts.push(part.to_str().ok_or("must be UTF-8")?),
            _ => return Err("must not contain `..` or `.` components"),
        }
    }
    Ok(parts.join("/"))
}

/// `[server] public_url`: an http(s) URL with a host (a path prefix allowed, as behind a
/// proxy), without user, query or fragment; kept without a trailing `/`.
pub(super) fn public_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?}: an http:// or https:// URL with a host, please"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{text:?}: the pages' address only, without user, password, query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// `[server] node_url`: an http(s) URL with a host and nothing after its path, kept without
/// a trailing `/`.
pub(super) fn node_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?}: nodes fetch over http or https, not {}", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{text:?}: give the server's address only, without user, password, query or fragment"));
    }
    if url.path() != "/" {
        return Err(format!(
            "{text:?}: nodes fetch from {}/node/artifacts/…, so give no path (a proxy must pass /node/ on as it is)",
            url.origin().ascii_serialization()
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}
