//! The web pages (SPEC 6) against a server with a seeded history: loaded in a real headless
//! Chromium (no console errors, the expected rows, a screenshot of each), signing in and out,
//! refusals, escaping of hostile labels, security headers, and the audit exports.

use std::fs;
use std::path::PathBuf;

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};
use crate::support::chromium::Browser;

const HOSTILE_VERSION: &str = "<script>alert(\"version\")</script>";
const HOSTILE_COMMIT: &str = "<b onmouseover=alert(1)>deadbeef</b>";
const HOSTILE_REASON: &str = "<img src=x onerror=alert(2)> not today";

/// A history worth browsing: staging (two local nodes) and production (one, with approval);
/// v1 live in both, v2 live in staging and rejected for production, v3 failed in staging.
struct Seeded {
    f: Fixture,
    bases: Vec<PathBuf>,
    v1: String,
    v2: String,
    v3: String,
    /// Release ids: v1's promotion (approved by bob), v2's rejected promotion, v3's failure.
    promoted: i64,
    rejected: i64,
    failed: i64,
}

fn seed() -> Seeded {
    let root = tempfile::Builder::new().prefix("release-pages-").tempdir().unwrap().keep();
    let mut config = "[service.shop]\nkind = \"generic\"\nshared = [\"config.txt\"]\n\
        hooks.finalize = [\"echo finalizing $RELEASE_DIGEST\", \"test ! -e $RELEASE_BASE/shared/broken\"]\n\
        [[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\npromote_from = \"staging\"\n\
        requires_approval = true\n"
        .to_owned();
    let mut bases = Vec::new();
    for (i, env) in ["staging", "staging", "production"].iter().enumerate() {
        let base = root.join(format!("node{}", i + 1));
        fs::create_dir_all(base.join("shared")).unwrap();
        fs::write(base.join("shared/config.txt"), "config").unwrap();
        config.push_str(&format!(
            "[[service.shop.node]]\nname = \"{env}-{}\"\nenvironment = \"{env}\"\nhost = \"local\"\nbase = \"{}\"\n",
            i + 1,
            base.display()
        ));
        bases.push(base);
    }
    let f = Fixture::with_config(&config);
    let upload = |content: &str, version: &str, git_sha: &str| -> String {
        let tar = RawTar::new().file("version.txt", content.as_bytes()).finish();
        let response = f
            .server
            .http()
            .post(format!("{}/v1/artifacts", f.server.url))
            .query(&[
                ("service", "shop"),
                ("version", version),
                ("git_sha", git_sha),
                ("build_url", "https://ci.example/build/7"),
            ])
            .bearer_auth(f.token("ci"))
            .body(zstd(&tar))
            .send()
            .unwrap();
        assert!(response.status().is_success());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    };
    let v1 = upload("v1", "1.0.0", "0123abcd");
    let v2 = upload("v2", HOSTILE_VERSION, HOSTILE_COMMIT);
    let v3 = upload("v3", "3.0.0", "3333");
    let deploy = |digest: &str| {
        let (status, r) =
            f.post("ci", "/v1/releases", json!({"service": "shop", "environment": "staging", "digest": digest}));
        assert!(status.is_success(), "{r}");
        f.settle(r["id"].as_i64().unwrap())
    };
    assert_eq!(deploy(&v1)["state"], "live");
    let (_, promoted) =
        f.post("alice", "/v1/releases/promote", json!({"service": "shop", "environment": "production"}));
    let promoted = promoted["id"].as_i64().unwrap();
    let (status, _) = f.post("bob", &format!("/v1/releases/{promoted}/approve"), json!({}));
    assert!(status.is_success());
    assert_eq!(f.settle(promoted)["state"], "live");
    assert_eq!(deploy(&v2)["state"], "live");
    let (_, rejected) =
        f.post("alice", "/v1/releases/promote", json!({"service": "shop", "environment": "production"}));
    let rejected = rejected["id"].as_i64().unwrap();
    let (status, _) = f.post("bob", &format!("/v1/releases/{rejected}/reject"), json!({"reason": HOSTILE_REASON}));
    assert!(status.is_success());
    fs::write(bases[1].join("shared/broken"), "").unwrap();
    let failed = deploy(&v3);
    assert_eq!(failed["state"], "failed");
    fs::remove_file(bases[1].join("shared/broken")).unwrap();
    Seeded { failed: failed["id"].as_i64().unwrap(), f, bases, v1, v2, v3, promoted, rejected }
}

fn no_redirects() -> Client {
    Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[test]
fn every_page_loads_in_chromium_with_no_console_errors_and_the_expected_rows() {
    let s = seed();
    let url = &s.f.server.url;
    let mut browser = Browser::start();

    // Not signed in: every page sends you to the sign-in page, and back afterwards.
    browser.goto(&format!("{url}/audit"));
    assert!(browser.url().starts_with(&format!("{url}/login?next=/audit")), "{}", browser.url());
    assert!(browser.errors().is_empty(), "{:?}", browser.errors());
    browser.screenshot("login");
    let token = s.f.token("carol").to_owned();
    browser.submit(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('form[action=\"/login\"]').submit()",
        json!(token)
    ));
    assert_eq!(browser.url(), format!("{url}/audit"), "back where it started");

    browser.goto(&format!("{url}/"));
    assert_eq!(browser.status, Some(200));
    let text = browser.text();
    for expected in ["What is live where", "shop", "staging", "production", "1.0.0", HOSTILE_VERSION, "carol (carol)"] {
        assert!(text.contains(expected), "matrix lacks {expected:?}:\n{text}");
    }
    assert_eq!(browser.eval("document.querySelectorAll('#matrix tbody tr').length"), json!(1));
    assert!(browser.errors().is_empty(), "{:?}", browser.errors());
    browser.screenshot("matrix");

    browser.goto(&format!("{url}/services/shop"));
    let rows = browser.eval("Array.from(document.querySelectorAll('#timeline tbody tr')).map(r => r.innerText)");
    let rows: Vec<String> = rows.as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().any(|r| r.contains(&format!("#{}", s.failed)) && r.contains("failed")), "{rows:?}");
    assert!(
        rows.iter().any(|r| r.contains(&format!("#{}", s.rejected)) && r.contains("rejected") && r.contains("bob"))
    );
    assert!(rows.iter().any(|r| r.contains(&format!("#{}", s.promoted)) && r.contains("bob (approved)")));
    assert!(browser.errors().is_empty(), "{:?}", browser.errors());
    browser.screenshot("timeline");

    browser.goto(&format!("{url}/releases/{}", s.promoted));
    let text = browser.text();
    for expected in
        ["approved by bob (bob)", "0123abcd", "https://ci.example/build/7", "production-3", "prepare", "switch"]
    {
        assert!(text.contains(expected), "release page lacks {expected:?}:\n{text}");
    }
    assert!(browser.errors().is_empty(), "{:?}", browser.errors());
    browser.screenshot("release");

    browser.goto(&format!("{url}/releases/{}", s.failed));
    let text = browser.text();
    assert!(text.contains("failed") && text.contains("staging-2") && text.contains("finalizing"), "{text}");
    browser.screenshot("release-failed");

    browser.goto(&format!("{url}/artifacts/{}", s.v1));
    let live = browser.eval("Array.from(document.querySelectorAll('#live tbody tr')).map(r => r.innerText)");
    let live: Vec<&str> = live.as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.iter().any(|r| r.contains("production") && r.contains("live now")), "{live:?}");
    assert!(live.iter().any(|r| r.contains("staging") && !r.contains("live now")), "{live:?}");
    assert!(browser.errors().is_empty(), "{:?}", browser.errors());
    browser.screenshot("artifact");

    browser.goto(&format!("{url}/audit"));
    let banner = browser.eval("document.querySelector('#chain').innerText");
    let banner = banner.as_str().unwrap();
    assert!(banner.contains("intact") || banner.contains("Checking"), "{banner}");
    assert!(browser.text().contains("release.live"));
    // Details one field a line, readable: not one long line of JSON.
    let details = browser.eval("Array.from(document.querySelectorAll('pre.details')).map(p => p.innerText)");
    let details: Vec<&str> = details.as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert!(details.iter().any(|d| d.lines().any(|l| l == "service: shop")), "{details:?}");
    assert!(details.iter().all(|d| !d.starts_with('{') || d == &"{}"), "{details:?}");
    assert!(browser.errors().is_empty(), "{:?}", browser.errors());
    browser.screenshot("audit");

    // Filtered by actor: only bob's events.
    browser.goto(&format!("{url}/audit?actor=bob"));
    let actors =
        browser.eval("Array.from(document.querySelectorAll('#events tbody tr td:nth-child(3)')).map(c => c.innerText)");
    let actors = actors.as_array().unwrap();
    assert!(!actors.is_empty());
    assert!(actors.iter().all(|a| a.as_str().unwrap().starts_with("bob")), "{actors:?}");
    assert_eq!(
        browser.eval("document.querySelector('#export-csv').getAttribute('href')"),
        json!("/audit/export.csv?actor=bob")
    );
    browser.screenshot("audit-filtered");

    // Signing out ends the session: the pages send you to sign in again.
    browser.submit("document.querySelector('form[action=\"/logout\"]').submit()");
    assert!(browser.url().starts_with(&format!("{url}/login")), "{}", browser.url());
    browser.goto(&format!("{url}/"));
    assert!(browser.url().starts_with(&format!("{url}/login")), "{}", browser.url());
    let _ = (&s.bases, &s.v2, &s.v3);
}

#[test]
fn hostile_labels_and_reasons_render_as_text() {
    let s = seed();
    let url = &s.f.server.url;
    let get = |path: &str| {
        let response = Client::new().get(format!("{url}{path}")).bearer_auth(s.f.token("carol")).send().unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        response.text().unwrap()
    };
    for path in [
        "/".to_owned(),
        "/services/shop".into(),
        format!("/releases/{}", s.rejected),
        format!("/artifacts/{}", s.v2),
        "/audit".into(),
    ] {
        let html = get(&path);
        assert!(!html.contains("<script") && !html.contains("<img") && !html.contains("<b "), "{path} leaks markup");
    }
    assert!(get(&format!("/artifacts/{}", s.v2)).contains("&lt;script&gt;alert(&quot;version&quot;)&lt;/script&gt;"));
    assert!(get(&format!("/releases/{}", s.rejected)).contains("&lt;img src=x onerror=alert(2)&gt; not today"));

    // And a browser shows them as the text they are, running nothing.
    let mut browser = Browser::start();
    browser.goto(&format!("{url}/login"));
    browser.submit(&format!(
        "document.querySelector('#token').value = {}; document.querySelector('form[action=\"/login\"]').submit()",
        json!(s.f.token("carol"))
    ));
    for path in [format!("/releases/{}", s.rejected), format!("/artifacts/{}", s.v2)] {
        browser.goto(&format!("{url}{path}"));
        assert_eq!(browser.eval("document.querySelectorAll('script, img').length"), json!(0), "{path}");
        let text = browser.text();
        assert!(text.contains(HOSTILE_VERSION) || text.contains(HOSTILE_REASON), "{path}: {text}");
        assert!(browser.errors().is_empty(), "{path}: {:?}", browser.errors());
    }
    browser.screenshot("hostile-labels");
}

#[test]
fn signing_in_needs_the_auditor_role_and_sessions_end_with_their_token() {
    let f = Fixture::new();
    let url = &f.server.url;
    let client = no_redirects();

    // Nothing presented: to the sign-in page.
    let response = client.get(format!("{url}/services/api?env=staging")).send().unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/login?next=/services/api%3Fenv%3Dstaging");

    // A deployer's token is refused, by form and by bearer header, and both are on record.
    let response = client.post(format!("{url}/login")).form(&[("token", f.token("alice"))]).send().unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.headers().get("set-cookie").is_none());
    assert!(response.text().unwrap().contains("auditor"));
    let response = client.get(format!("{url}/")).bearer_auth(f.token("alice")).send().unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    f.assert_refusal_recorded("alice", 403, "forbidden");
    // A made-up token too.
    let response = client.post(format!("{url}/login")).form(&[("token", "rls_0000000000000000_00")]).send().unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // An auditor signs in: an HttpOnly, SameSite=Strict cookie (Secure behind an HTTPS proxy).
    let auditor = f.server.token_with("dave", "auditor", &["--owner", "dave"]);
    let response =
        client.post(format!("{url}/login")).form(&[("token", auditor.as_str()), ("next", "/audit")]).send().unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/audit");
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains("Secure"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let behind_https = client
        .post(format!("{url}/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", auditor.as_str()), ("next", "//evil.example/")])
        .send()
        .unwrap();
    assert!(behind_https.headers()["set-cookie"].to_str().unwrap().contains("; Secure"));
    assert_eq!(behind_https.headers()["location"], "/", "only paths of this server");

    let page = client.get(format!("{url}/audit")).header("cookie", &session).send().unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(page.text().unwrap().contains("web.login"), "the sign-in is on record");

    // Revoking the token ends its sessions at once.
    let data_dir = f.server.data_dir().display().to_string();
    f.server.cli().args(["token", "revoke", "dave", "--data-dir", &data_dir]).assert_success();
    let page = client.get(format!("{url}/audit")).header("cookie", &session).send().unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    f.assert_refusal_recorded("dave", 303, "session_token_refused");
}

#[test]
fn signing_out_ends_the_session_and_the_exports_follow_the_filter() {
    let s = seed();
    let url = &s.f.server.url;
    let client = no_redirects();
    let response = client.post(format!("{url}/login")).form(&[("token", s.f.token("carol"))]).send().unwrap();
    let session = response.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();

    let csv =
        client.get(format!("{url}/audit/export.csv?action=release.live")).header("cookie", &session).send().unwrap();
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("seq,at,actor,owner,action,subject,details,prev_hash,hash"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 3, "v1 in staging, v1 in production, v2 in staging: {csv}");
    assert!(rows.iter().all(|r| r.contains(",release.live,")));

    let jsonl = client
        .get(format!("{url}/audit/export.jsonl?actor=bob"))
        .header("cookie", &session)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let events: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!events.is_empty() && events.iter().all(|e| e["actor"] == "bob"), "{jsonl}");
    assert!(events.windows(2).all(|w| w[0]["seq"].as_u64() > w[1]["seq"].as_u64()), "newest first");

    let out = client.post(format!("{url}/logout")).header("cookie", &session).send().unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let after = client.get(format!("{url}/audit/export.csv")).header("cookie", &session).send().unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER, "the session is over on the server too");
    let _ = (&s.bases, &s.v1, &s.v3);
}

#[test]
fn the_audit_log_needs_an_unscoped_token_and_its_filters_find_every_release_event() {
    let s = seed();
    let url = &s.f.server.url;
    let client = no_redirects();
    let get = |token: &str, path: &str| client.get(format!("{url}{path}")).bearer_auth(token).send().unwrap();

    // An auditor limited to some services sees their pages, never the whole log.
    let scoped = s.f.server.token_with("erin", "auditor", &["--owner", "erin", "--services", "shop"]);
    assert_eq!(get(&scoped, "/services/shop").status(), StatusCode::OK);
    let staging_only = s.f.server.token_with("frank", "auditor", &["--owner", "frank", "--envs", "staging"]);
    assert_eq!(get(&staging_only, &format!("/releases/{}", s.failed)).status(), StatusCode::OK);
    let hidden = get(&staging_only, &format!("/releases/{}", s.promoted));
    assert_eq!(hidden.status(), StatusCode::NOT_FOUND, "a production release is not even said to exist");
    for path in ["/audit", "/audit/export.csv", "/audit/export.jsonl", "/v1/audit/events"] {
        let response = get(&scoped, path);
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(response.text().unwrap().contains("limited to some services"), "{path}");
    }

    // Filtering by service finds every state change of its releases, not only the requests.
    let jsonl = get(s.f.token("carol"), "/audit/export.jsonl?service=shop").text().unwrap();
    let actions: Vec<String> = jsonl
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["action"].as_str().unwrap().to_owned())
        .collect();
    for action in ["release.deploy", "release.approve", "release.reject", "release.live", "release.failed"] {
        assert!(actions.iter().any(|a| a == action), "no {action} for service=shop: {actions:?}");
    }

    // Sign-in never sends anyone off this server, and another site cannot post it.
    for next in ["//evil.example/", "/\t/evil.example", "/\\evil.example", "https://evil.example/"] {
        let response =
            client.post(format!("{url}/login")).form(&[("token", s.f.token("carol")), ("next", next)]).send().unwrap();
        assert_eq!(response.headers()["location"], "/", "next = {next:?}");
    }
    let response = client
        .post(format!("{url}/login"))
        .header("origin", "https://evil.example")
        .form(&[("token", s.f.token("carol"))])
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.headers().get("set-cookie").is_none());
}

#[test]
fn a_rewritten_last_event_shows_the_chain_broken_on_the_audit_page() {
    let s = seed();
    let url = &s.f.server.url;
    let page =
        || Client::new().get(format!("{url}/audit")).bearer_auth(s.f.token("carol")).send().unwrap().text().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !page().contains("The hash chain is intact") {
        assert!(std::time::Instant::now() < deadline, "never checked");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Someone with the database file rewrites the newest event (past the triggers).
    let conn = rusqlite::Connection::open(s.f.server.data_dir().join("registry.db")).unwrap();
    conn.execute_batch(
        "DROP TRIGGER audit_events_are_immutable;
         UPDATE audit_events SET actor = 'mallory' WHERE seq = (SELECT max(seq) FROM audit_events);",
    )
    .unwrap();
    let html = page();
    assert!(html.contains("The hash chain is broken"), "{html}");
    assert!(html.contains("the event was altered"), "{html}");
}

/// The event numbers of an audit page, and the link to the next (older) page if any.
fn audit_page(client: &Client, url: &str, token: &str, path: &str) -> (Vec<u64>, Option<String>) {
    let html = client.get(format!("{url}{path}")).bearer_auth(token).send().unwrap().text().unwrap();
    let seqs = html.split("<tr><td>").skip(1).filter_map(|row| row.split("</td>").next()?.parse().ok()).collect();
    let next = html
        .split("href=\"")
        .skip(1)
        .filter_map(|h| h.split('"').next())
        .find(|h| h.starts_with("/audit?") && h.contains("before="))
        .map(|h| h.replace("&amp;", "&"));
    (seqs, next)
}

/// Every page of `/audit?{query}`, following its links: the event numbers, page by page.
fn audit_pages(client: &Client, url: &str, token: &str, query: &str) -> Vec<Vec<u64>> {
    let mut pages = Vec::new();
    let mut path = Some(format!("/audit?{query}"));
    while let Some(p) = path {
        let (seqs, next) = audit_page(client, url, token, &p);
        pages.push(seqs);
        path = next;
        assert!(pages.len() < 50, "the pages do not end");
    }
    pages
}

#[test]
fn the_audit_pages_and_a_time_window_hold_exactly_the_events_of_the_export() {
    let f = Fixture::new();
    let url = &f.server.url;
    let client = no_redirects();
    // 133 refused requests, each one an audit event (a token's first 20 refusals of a window
    // are events of their own, so 7 tokens refused 19 times each): three pages of 50 and more.
    for i in 0..7 {
        let token = f.server.token(&format!("ci-{i}"), "ci");
        for _ in 0..19 {
            let refused = client.get(format!("{url}/v1/audit/events")).bearer_auth(&token).send().unwrap();
            assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        }
    }
    let carol = f.token("carol");
    let export = |query: &str| -> Vec<Value> {
        let text =
            client.get(format!("{url}/audit/export.jsonl?{query}")).bearer_auth(carol).send().unwrap().text().unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let all = export("");
    assert!(all.len() > 130, "{} events", all.len());
    let seqs = |events: &[Value]| -> Vec<u64> { events.iter().map(|e| e["seq"].as_u64().unwrap()).collect() };

    // The pages, one after the other, are the export: newest first, none twice, none left out.
    let pages = audit_pages(&client, url, carol, "");
    assert!(pages.len() >= 3 && pages.iter().all(|p| !p.is_empty() && p.len() <= 50), "{pages:?}");
    assert!(pages[..pages.len() - 1].iter().all(|p| p.len() == 50), "only the last page is short");
    // (The pages are read after the export, and reading them adds no event.)
    assert_eq!(pages.concat(), seqs(&all));

    // A window [from, until) holds exactly the events stamped in it, on the pages and in the
    // export; a filter on top of it narrows both alike.
    let (from, until) = (all[110]["at"].as_str().unwrap(), all[20]["at"].as_str().unwrap());
    let inside: Vec<Value> = all
        .iter()
        .filter(|e| {
            let at = e["at"].as_str().unwrap();
            at >= from && at < until
        })
        .cloned()
        .collect();
    assert!(inside.len() >= 80, "{} events in the window", inside.len());
    let window = format!("from={from}&until={until}");
    assert_eq!(audit_pages(&client, url, carol, &window).concat(), seqs(&inside));
    assert_eq!(seqs(&export(&window)), seqs(&inside));
    let refusals: Vec<Value> = inside.iter().filter(|e| e["actor"] == "ci").cloned().collect();
    let narrowed = format!("{window}&actor=ci");
    assert_eq!(audit_pages(&client, url, carol, &narrowed).concat(), seqs(&refusals));
    assert_eq!(seqs(&export(&narrowed)), seqs(&refusals));
}
