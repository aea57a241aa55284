//! The configuration: the embedded default, the example file, overrides, and every key a
//! wrong value is refused by name.

use std::io::Write;

use super::*;

fn load_text(text: &str) -> Result<Config, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    Config::load(Some(file.path()), &Overrides::default())
}

#[test]
fn embedded_default_is_spec_8() {
    let c = Config::embedded_default();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.data_dir, PathBuf::from("./release-data"));
    assert_eq!(c.registry_path(), PathBuf::from("./release-data/registry.db"));
    assert_eq!(c.storage, StorageConfig::Local { path: "./release-data/objects".into() });
    let names: Vec<_> = c.environments.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["staging", "production"]);
    assert!(c.environments[1].requires_approval);
    assert_eq!(c.environments[1].promote_from.as_deref(), Some("staging"));
    assert_eq!(c.limits, Limits::default());
}

#[test]
fn the_example_file_parses() {
    let c = load_text(EXAMPLE).unwrap();
    let api = c.service("api").unwrap();
    // The service `release init` makes runnable: two nodes on this machine, nothing to install.
    assert_eq!(api.kind, ServiceKind::Generic);
    assert_eq!(api.nodes.len(), 2);
    assert!(api.nodes.iter().all(|n| n.is_local()), "{:?}", api.nodes);
    assert_eq!(c.limits.max_upload_bytes, ByteSize(4 << 30));
    assert_eq!(c.environments[1].approval_ttl, Duration::from_secs(86400));
    // The example states every limit, at its default.
    assert_eq!(c.limits, Limits::default());
}

#[test]
fn overrides_win_over_the_file() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"[server]\nlisten = \"127.0.0.1:9000\"\ndata_dir = \"/tmp/a\"\n").unwrap();
    let from_file = Config::load(Some(file.path()), &Overrides::default()).unwrap();
    assert_eq!(from_file.listen.port(), 9000);
    assert_eq!(from_file.data_dir, PathBuf::from("/tmp/a"));
    let overridden = Config::load(
        Some(file.path()),
        &Overrides { listen: Some("127.0.0.1:9001".parse().unwrap()), data_dir: Some("/tmp/b".into()) },
    )
    .unwrap();
    assert_eq!(overridden.listen.port(), 9001);
    assert_eq!(overridden.data_dir, PathBuf::from("/tmp/b"));
    assert_eq!(overridden.storage, StorageConfig::Local { path: "/tmp/b/objects".into() });
}

#[test]
fn unknown_key_names_the_key_file_and_line() {
    let err = load_text("[limits]\nmax_files = 10\nmax_filez = 3\n").unwrap_err().to_string();
    assert!(err.contains("max_filez"), "{err}");
    assert!(err.contains(":3:"), "{err}");
    assert!(err.contains(".tmp"), "names the file: {err}");
}

#[test]
fn bad_value_names_the_key() {
    let err = load_text("[limits]\nmax_upload_bytes = \"4 gigs\"\n").unwrap_err().to_string();
    assert!(err.contains("limits.max_upload_bytes"), "{err}");
    assert!(err.contains("unknown size unit"), "{err}");

    let err = load_text("[server]\nlisten = \"localhost\"\n").unwrap_err().to_string();
    assert!(err.contains("server.listen"), "{err}");
}

#[test]
fn unknown_storage_key_is_refused() {
    let err = load_text(
        "[storage]\nkind = \"s3\"\nendpoint = \"http://x\"\nregion = \"r\"\nbucket = \"b\"\nbukket = \"c\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bukket"), "{err}");
}

#[test]
fn secrets_never_show_in_debug() {
    let c = load_text(
        "[storage]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\nregion = \"garage\"\nbucket = \"b\"\nsecret_access_key = \"hunter2hunter2\"\n",
    )
    .unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("hunter2"), "{dbg}");
    assert!(dbg.contains("<redacted>"));
}

#[test]
fn semantic_errors_name_the_key() {
    let cases = [
        ("[[environment]]\nname = \"prod\"\npromote_from = \"staging\"\n", "environment[0].promote_from"),
        ("[[environment]]\nname = \"Prod\"\n", "environment[0].name"),
        ("[limits]\nmax_files = 0\n", "limits.max_files"),
        ("[limits]\nmax_body_bytes = 0\n", "limits.max_body_bytes"),
        ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
        ("[limits]\nmax_connections_per_source = 0\n", "limits.max_connections_per_source"),
        ("[limits]\nheader_timeout = \"0s\"\n", "limits.header_timeout"),
        ("[limits]\nrequest_timeout = \"10ms\"\n", "limits.request_timeout"),
        ("[limits]\nupload_stall_timeout = \"0s\"\n", "limits.upload_stall_timeout"),
        ("[limits]\nupload_rate_window = \"0s\"\n", "limits.upload_rate_window"),
        ("[limits]\nnode_fetch_stall_timeout = \"0s\"\n", "limits.node_fetch_stall_timeout"),
        ("[service.api]\nkind = \"node\"\nshared = [\"../x\"]\n", "service.api.shared"),
        (
            "[service.api]\nkind = \"laravel\"\n[[service.api.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"/srv/a\"\n",
            "service.api.node",
        ),
        (
            "[service.api]\nkind = \"node\"\n[[service.api.node]]\nenvironment = \"qa\"\nhost = \"local\"\nbase = \"/srv/a\"\n",
            "service.api.node[0].environment",
        ),
        ("[server]\ntls_cert = \"/x\"\n", "server.tls_key"),
        ("[server]\nnode_url = \"10.0.0.5:8080\"\n", "server.node_url"),
        ("[server]\nnode_url = \"ftp://10.0.0.5/\"\n", "server.node_url"),
        ("[server]\nnode_url = \"http://10.0.0.5:8080/?x=1\"\n", "server.node_url"),
        ("[server]\nnode_url = \"https://user@10.0.0.5\"\n", "server.node_url"),
        ("[server]\nnode_url = \"https://:secret@10.0.0.5\"\n", "server.node_url"),
        ("[server]\nnode_url = \"https://gw.internal/release\"\n", "server.node_url"),
        ("[storage]\nkind = \"s3\"\nendpoint = \"s3.example\"\nregion = \"r\"\nbucket = \"b\"\n", "storage.endpoint"),
        ("[server]\ntrusted_proxies = [\"nginx.internal\"]\n", "server.trusted_proxies"),
        ("[server]\ntrusted_proxies = [\"10.0.0.0/40\"]\n", "server.trusted_proxies"),
        ("[audit]\nrefusal_window = \"0s\"\n", "audit.refusal_window"),
        ("[audit]\nrefusal_window = \"2h\"\n", "audit.refusal_window"),
    ];
    for (text, key) in cases {
        let err = load_text(text).unwrap_err().to_string();
        assert!(err.contains(key), "expected {key} in: {err}");
    }
}

/// A node of `web` in staging with these extra lines (host, user, base, port).
fn node_config(lines: &str) -> String {
    format!("[service.web]\nkind = \"generic\"\n\n[[service.web.node]]\nenvironment = \"staging\"\n{lines}")
}

#[test]
fn node_ssh_inputs_are_checked_at_load_naming_file_line_and_key() {
    // Line 6 is the first of `lines`, after the five the node's table takes.
    let cases = [
        ("host = \"-oProxyCommand=touch /tmp/pwned\"\nbase = \"/srv/web\"\n", ":6:", "service.web.node[0].host"),
        ("host = \"10.0.0.5\"\nuser = \"deploy user\"\nbase = \"/srv/web\"\n", ":7:", "service.web.node[0].user"),
        ("host = \"10.0.0.5\"\nuser = \"-oProxyCommand=x\"\nbase = \"/srv/web\"\n", ":7:", "service.web.node[0].user"),
        ("host = \"web-1\"\nbase = \"/srv/../etc\"\n", ":7:", "service.web.node[0].base"),
        ("host = \"web-1\"\nbase = \"srv/web\"\n", ":7:", "service.web.node[0].base"),
        ("host = \"web-1\"\nbase = \"/\"\n", ":7:", "service.web.node[0].base"),
        ("host = \"web-1\"\nport = 0\nbase = \"/srv/web\"\n", ":7:", "service.web.node[0].port"),
        ("host = \"web-1\"\nport = 70000\nbase = \"/srv/web\"\n", ":7:", "service.web.node[0].port"),
        ("host = \"\"\nbase = \"/srv/web\"\n", ":6:", "service.web.node[0].host"),
    ];
    for (lines, line, key) in cases {
        let err = load_text(&node_config(lines)).unwrap_err().to_string();
        assert!(err.contains(".tmp") && err.contains(line) && err.contains(key), "expected file{line} {key} in: {err}");
    }
    let err = load_text(&node_config(cases[0].0)).unwrap_err().to_string();
    assert!(err.contains("is not a host"), "{err}");

    let c = load_text(&node_config("host = \"::1\"\nuser = \"deploy\"\nport = 2222\nbase = \"/srv//web/\"\n")).unwrap();
    let node = &c.service("web").unwrap().nodes[0];
    assert_eq!((node.host.as_str(), node.user.as_deref(), node.port), ("::1", Some("deploy"), 2222));
    assert_eq!(node.base, PathBuf::from("/srv/web"), "slashes normalized");
}

#[test]
fn trusted_proxies_and_the_refusal_window() {
    let c = Config::embedded_default();
    assert!(c.trusted_proxies.is_empty(), "no proxy is trusted unless named");
    assert_eq!(c.audit.refusal_window.0, Duration::from_secs(60));
    let c =
        load_text("[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n[audit]\nrefusal_window = \"10s\"\n")
            .unwrap();
    assert_eq!(c.trusted_proxies.iter().map(ToString::to_string).collect::<Vec<_>>(), ["127.0.0.1/32", "10.0.0.0/8"]);
    assert_eq!(c.audit.refusal_window.0, Duration::from_secs(10));
}

#[test]
fn shared_paths_are_normalized() {
    let c =
        load_text("[service.api]\nkind = \"laravel\"\nshared = [\"storage/\", \"config//secrets.php\", \".env\"]\n")
            .unwrap();
    assert_eq!(c.service("api").unwrap().shared, ["storage", "config/secrets.php", ".env"]);
    assert!(load_text("[service.api]\nshared = [\"./.env\"]\n").is_err());
}

const WEBHOOK: &str =
    "[service.api]\n[[webhook]]\nname = \"monday\"\nurl = \"https://hooks.example/x?token=hunter2hunter2\"\n";

#[test]
fn the_example_webhook_parses_once_uncommented() {
    // The commented [[webhook]] of the example, switched on (with a secret from a variable that
    // is always set).
    let block = EXAMPLE.split("# [[webhook]]").nth(1).expect("the example has a webhook");
    let uncommented: String = block.lines().map(|l| l.strip_prefix("# ").unwrap_or(l)).collect::<Vec<_>>().join("\n");
    let text = format!("{EXAMPLE}\n[[webhook]]{}", uncommented.replace("MONDAY_WEBHOOK_SECRET", "PATH"));
    let c = load_text(&text).unwrap();
    let w = &c.webhooks[0];
    assert_eq!(w.name, "monday");
    assert_eq!(w.secret.as_ref().unwrap().expose(), std::env::var("PATH").unwrap());
    assert_eq!(w.events.as_deref(), Some(&["release.live".to_owned(), "release.failed".to_owned()][..]));
    assert_eq!((w.timeout, w.retry_base, w.max_attempts), (Duration::from_secs(10), Duration::from_secs(1), 8));
    assert!(w.wants("release.live", "api", "production"));
    assert!(!w.wants("release.live", "api", "staging"));
    assert!(!w.wants("release.deploying", "api", "production"));
}

#[test]
fn webhook_defaults_and_backoff() {
    let c = load_text(&format!("{WEBHOOK}secret = \"0123456789abcdef\"\nretry_base = \"100ms\"\nretry_max = \"1s\"\n"))
        .unwrap();
    let w = &c.webhooks[0];
    assert!(w.events.is_none() && w.services.is_none() && w.environments.is_none());
    assert!(w.wants("release.requested", "anything", "anywhere"));
    let waits: Vec<u128> = (2..=8).map(|n| w.backoff(n).as_millis()).collect();
    assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
    assert_eq!(w.backoff(u32::MAX), Duration::from_secs(1));
}

#[test]
fn webhook_secrets_and_urls_never_show_in_debug() {
    let c = load_text(&format!("{WEBHOOK}secret = \"s3cr3t-s3cr3t-s3cr3t\"\n")).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("s3cr3t") && !dbg.contains("hunter2"), "{dbg}");
}

#[test]
fn webhook_errors_name_the_key() {
    let secret = "secret = \"0123456789abcdef\"\n";
    let cases = [
        ("[[webhook]]\nname = \"x\"\nsecret = \"0123456789abcdef\"\n".to_owned(), "webhook[0].url"),
        ("[[webhook]]\nurl = \"https://h/\"\n".to_owned(), "webhook[0].name"),
        (format!("{WEBHOOK}{secret}events = [\"release.liv\"]\n"), "webhook[0].events"),
        (format!("{WEBHOOK}{secret}events = []\n"), "webhook[0].events"),
        (format!("{WEBHOOK}{secret}services = [\"nope\"]\n"), "webhook[0].services"),
        (format!("{WEBHOOK}{secret}environments = [\"qa\"]\n"), "webhook[0].environments"),
        (format!("{WEBHOOK}{secret}max_attempts = 0\n"), "webhook[0].max_attempts"),
        (format!("{WEBHOOK}{secret}timeout = \"soon\"\n"), "webhook[0].timeout"),
        (format!("{WEBHOOK}{secret}retry_base = \"2s\"\nretry_max = \"1s\"\n"), "webhook[0].retry_max"),
        (format!("{WEBHOOK}{secret}colour = \"red\"\n"), "colour"),
        (WEBHOOK.to_owned(), "webhook[0].secret"),
        (format!("{WEBHOOK}secret = \"short\"\n"), "webhook[0].secret"),
        (format!("{WEBHOOK}{secret}secret_env = \"PATH\"\n"), "webhook[0].secret"),
        (format!("{WEBHOOK}secret_env = \"RELEASE_TEST_VARIABLE_NOBODY_SETS\"\n"), "webhook[0].secret_env"),
        (format!("{WEBHOOK}{secret}[[webhook]]\nname = \"monday\"\nurl = \"https://h/\"\n{secret}"), "webhook[1].name"),
        ("[[webhook]]\nname = \"x\"\nurl = \"ftp://h/\"\nsecret = \"0123456789abcdef\"\n".to_owned(), "webhook[0].url"),
        (
            "[[webhook]]\nname = \"x\"\nurl = \"not a url\"\nsecret = \"0123456789abcdef\"\n".to_owned(),
            "webhook[0].url",
        ),
    ];
    for (text, key) in cases {
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains(key), "expected {key} in: {err}\n--- config ---\n{text}");
    }
    // The URL is never echoed, not even in an error.
    let err = load_text("[[webhook]]\nname = \"x\"\nurl = \"ftp://tok3n@h/\"\nsecret = \"0123456789abcdef\"\n")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("tok3n"), "{err}");
}

#[test]
fn node_url_is_kept_without_its_trailing_slash() {
    let config = load_text("[server]\nnode_url = \"https://release.internal:8443/\"\n").unwrap();
    assert_eq!(config.node_url.as_deref(), Some("https://release.internal:8443"));
    assert_eq!(load_text("").unwrap().node_url, None);
}

#[test]
fn a_node_service_names_its_pm2_app_or_defaults_to_its_own_name() {
    let c =
        load_text("[service.web]\nkind = \"node\"\n[service.shop]\nkind = \"node\"\npm2_app = \"shop-frontend.v2\"\n")
            .unwrap();
    let (web, shop) = (c.service("web").unwrap(), c.service("shop").unwrap());
    assert_eq!(web.pm2_app.as_deref(), Some("web"));
    assert_eq!(shop.pm2_app.as_deref(), Some("shop-frontend.v2"));
    // It is part of what a release runs with.
    let renamed = load_text("[service.web]\nkind = \"node\"\npm2_app = \"other\"\n").unwrap();
    let staging = &c.environments[0];
    assert_ne!(web.config_digest(staging), renamed.service("web").unwrap().config_digest(staging));
    // Other kinds have none.
    let c = load_text("[service.api]\nkind = \"laravel\"\n[service.job]\n").unwrap();
    assert_eq!((c.service("api").unwrap().pm2_app.as_ref(), c.service("job").unwrap().pm2_app.as_ref()), (None, None));
}

#[test]
fn pm2_app_is_refused_off_node_services_and_when_the_shell_would_need_quoting() {
    for kind in ["laravel", "generic"] {
        let err = load_text(&format!("[service.api]\nkind = \"{kind}\"\npm2_app = \"api\"\n")).unwrap_err().to_string();
        assert!(err.contains("service.api.pm2_app") && err.contains("only node services run under PM2"), "{err}");
    }
    // A generic service is what a service without `kind` is.
    let err = load_text("[service.api]\npm2_app = \"api\"\n").unwrap_err().to_string();
    assert!(err.contains("service.api.pm2_app"), "{err}");
    for bad in ["", "web; rm -rf /", "-web", "web app", "wéb", &"x".repeat(129)] {
        let err = load_text(&format!("[service.web]\nkind = \"node\"\npm2_app = {bad:?}\n")).unwrap_err().to_string();
        assert!(err.contains("service.web.pm2_app") && err.contains("pm2 reload <app>"), "{bad:?}: {err}");
    }
}

#[test]
fn the_example_laravel_service_parses_once_uncommented() {
    let block = EXAMPLE.split("\n# [service.shop]\n").nth(1).expect("the example has a Laravel service");
    let lines: Vec<&str> = block
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| l.strip_prefix("# ").or_else(|| l.strip_prefix('#')).unwrap())
        .collect();
    let c = load_text(&format!("{EXAMPLE}\n[service.shop]\n{}\n", lines.join("\n"))).unwrap();
    let shop = c.service("shop").unwrap();
    assert_eq!(shop.kind, ServiceKind::Laravel);
    assert_eq!(shop.shared, [".env", "storage"]);
    assert_eq!(shop.nodes.len(), 2);
    assert!(!shop.nodes[1].is_local());
}

#[test]
fn the_example_node_service_parses_once_uncommented() {
    let block = EXAMPLE.split("\n# [service.web]\n").nth(1).expect("the example has a node service");
    let lines: Vec<&str> = block.lines().take_while(|l| !l.is_empty()).map(|l| l.strip_prefix("# ").unwrap()).collect();
    let c = load_text(&format!("{EXAMPLE}\n[service.web]\n{}\n", lines.join("\n"))).unwrap();
    let web = c.service("web").unwrap();
    assert_eq!((web.kind, web.pm2_app.as_deref()), (ServiceKind::Node, Some("storefront")));
}

/// README's "Limits" section names every key of `[limits]` (the example states them all, at
/// their defaults: see `the_example_file_parses`).
#[test]
fn the_readme_states_every_limit() {
    let readme = include_str!("../../README.md");
    let section = readme.split("\n## Limits\n").nth(1).expect("README.md has a Limits section");
    let section = section.split("\n## ").next().unwrap();
    let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
    let keys: Vec<&String> = example["limits"].as_table().unwrap().keys().collect();
    assert_eq!(keys.len(), 16, "{keys:?}");
    for key in keys {
        assert!(section.contains(&format!("`{key}`")), "README's Limits section does not name `{key}`");
    }
}

#[test]
fn from_toml_reads_the_text_alone() {
    // The same configuration as from a file, with no file named as its source.
    let from_text = Config::from_toml(EXAMPLE).unwrap();
    let from_file = load_text(EXAMPLE).unwrap();
    assert_eq!(from_text.source, None);
    assert_eq!(format!("{:?}", Config { source: None, ..from_file }), format!("{from_text:?}"));
    // The environment is not read: a variable that is always set counts as unset.
    let text = format!("{WEBHOOK}secret_env = \"PATH\"\n");
    load_text(&text).unwrap();
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("webhook[0].secret_env") && err.contains("PATH is not set"), "{err}");
    // Errors name the text, and the line.
    let err = Config::from_toml("[limits]\nmax_filez = 3\n").unwrap_err().to_string();
    assert!(err.starts_with("(TOML text):2:"), "{err}");
}

#[test]
fn backups_are_daily_keeping_30_unless_told_and_keep_is_at_least_one() {
    let c = load_text("").unwrap();
    assert_eq!(c.backup, BackupConfig { interval: HumanDuration(Duration::from_secs(24 * 3600)), keep: 30 });
    let c = load_text("[backup]\ninterval = \"0s\"\nkeep = 3\n").unwrap();
    assert!(c.backup.interval.0.is_zero());
    assert_eq!(c.backup.keep, 3);
    let e = load_text("[backup]\nkeep = 0\n").unwrap_err().to_string();
    assert!(e.contains("backup.keep"), "{e}");
}

#[test]
fn a_health_check_has_defaults_and_bounded_numbers() {
    let c = load_text("[service.web]\nhealth = { url = \"http://127.0.0.1/\" }\n").unwrap();
    let h = c.service("web").unwrap().health.clone().unwrap();
    assert_eq!((h.timeout.0, h.interval.0), (Duration::from_secs(15), Duration::from_millis(200)));
    assert_eq!((h.healthy_after, h.unhealthy_after), (1, 5));
    let c = load_text(
        "[service.web]\nhealth = { url = \"http://127.0.0.1/\", timeout = \"30s\", interval = \"1s\", healthy_after = 3, \
         unhealthy_after = 10 }\n",
    )
    .unwrap();
    let h = c.service("web").unwrap().health.clone().unwrap();
    assert_eq!(
        (h.timeout.0, h.interval.0, h.healthy_after, h.unhealthy_after),
        (Duration::from_secs(30), Duration::from_secs(1), 3, 10)
    );
    for (bad, key, why) in [
        ("timeout = \"100ms\"", "service.web.health.timeout", "between 1s and 10m"),
        ("timeout = \"1h\"", "service.web.health.timeout", "between 1s and 10m"),
        ("interval = \"10ms\"", "service.web.health.interval", "between 50ms"),
        ("timeout = \"2s\", interval = \"3s\"", "service.web.health.interval", "the timeout"),
        ("healthy_after = 0", "service.web.health.healthy_after", "between 1 and 100"),
        ("unhealthy_after = 1000", "service.web.health.unhealthy_after", "between 1 and 100"),
    ] {
        let text = format!("[service.web]\nhealth = {{ url = \"http://127.0.0.1/\", {bad} }}\n");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn a_local_node_takes_no_ssh_settings_and_a_base_is_one_nodes() {
    let envs = "[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n";
    let node = |env: &str, extra: &str| {
        format!("[[service.web.node]]\nenvironment = \"{env}\"\nhost = \"local\"\nbase = \"/srv/web\"\n{extra}")
    };
    let err = load_text(&format!("{envs}[service.web]\n{}", node("staging", "user = \"deploy\"\n"))).unwrap_err();
    assert!(err.to_string().contains("service.web.node[0].user") && err.to_string().contains("local node"), "{err}");
    let err = load_text(&format!("{envs}[service.web]\n{}", node("staging", "port = 2222\n"))).unwrap_err();
    assert!(err.to_string().contains("service.web.node[0].port"), "{err}");
    let err =
        load_text(&format!("{envs}[service.web]\n{}{}", node("staging", ""), node("production", ""))).unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("service.web.node[1].base") && err.contains("node[0]'s too") && err.contains("staging"),
        "{err}"
    );
    // The same base on two hosts is two nodes.
    let two_hosts = format!(
        "{envs}[service.web]\n{}[[service.web.node]]\nenvironment = \"production\"\nhost = \"10.0.0.5\"\nbase = \"/srv/web\"\n",
        node("staging", "")
    );
    load_text(&two_hosts).unwrap();
}

#[test]
fn the_packaged_configuration_loads() {
    // /etc/release/release.toml as the Debian package installs it: the server starts on it.
    let c = load_text(include_str!("../../systemd/release.toml")).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/release"));
    assert!(c.listen.ip().is_loopback());
    assert!(c.services.is_empty());
}

#[test]
fn hook_user_and_umask_are_checked() {
    let c = load_text("[service.shop]\nkind = \"laravel\"\nhook_user = \"www-data\"\numask = \"0002\"\n").unwrap();
    let shop = c.service("shop").unwrap();
    assert_eq!((shop.hook_user.as_deref(), shop.umask), (Some("www-data"), Some(0o002)));
    assert_eq!(load_text("[service.shop]\numask = \"027\"\n").unwrap().service("shop").unwrap().umask, Some(0o027));
    for (text, key) in [
        ("hook_user = \"root; rm -rf /\"", "service.shop.hook_user"),
        ("hook_user = \"WWW\"", "service.shop.hook_user"),
        ("umask = \"8\"", "service.shop.umask"),
        ("umask = \"0o22\"", "service.shop.umask"),
        ("umask = \"1777\"", "service.shop.umask"),
    ] {
        let err = load_text(&format!("[service.shop]\n{text}\n")).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}
