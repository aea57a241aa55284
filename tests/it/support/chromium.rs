//! A real headless Chromium (Debian's `chromium`), driven over the DevTools protocol: the
//! pages are loaded as a browser loads them, with every console message and uncaught error
//! collected, and screenshots taken.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    pid: u32,
    _profile: tempfile::TempDir,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Console messages and errors of the current page: (level, text).
    pub console: Vec<(String, String)>,
    /// The HTTP status of the last document loaded.
    pub status: Option<u64>,
    /// A load event came (perhaps while waiting for another answer).
    loaded: bool,
}

impl Browser {
    pub fn start() -> Browser {
        assert!(Path::new(CHROMIUM).exists(), "the page tests need {CHROMIUM} (Debian chromium): run `bash .ci/run`");
        let profile = tempfile::Builder::new().prefix("release-chromium-").tempdir().unwrap();
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // A group of its own: the renderers go with it.
            .process_group(0);
        let mut child = command.spawn().expect("start chromium");
        let pid = child.id();
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let browser_url = rx.recv_timeout(Duration::from_secs(30)).expect("chromium did not start its DevTools");
        std::mem::forget(child); // killed by pid on drop
        let port = browser_url.split(':').nth(2).unwrap().split('/').next().unwrap().to_owned();
        let targets: Value =
            reqwest::blocking::get(format!("http://127.0.0.1:{port}/json/list")).unwrap().json().unwrap();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target")["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_owned();
        let (socket, _) = tungstenite::connect(page).expect("connect to the page's DevTools");
        let mut browser =
            Browser { pid, _profile: profile, socket, next_id: 0, console: Vec::new(), status: None, loaded: false };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable", "Network.enable"] {
            browser.call(domain, json!({}));
        }
        browser
    }

    /// Sends a command and waits for its answer, collecting the events that come meanwhile.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.socket.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let message = self.read();
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method}: {message}");
                return message["result"].clone();
            }
        }
    }

    fn read(&mut self) -> Value {
        loop {
            match self.socket.read().expect("DevTools socket") {
                Message::Text(text) => {
                    let message: Value = serde_json::from_str(&text).unwrap();
                    self.observe(&message);
                    return message;
                }
                Message::Close(_) => panic!("chromium closed the DevTools socket"),
                _ => {}
            }
        }
    }

    fn observe(&mut self, message: &Value) {
        let params = &message["params"];
        match message["method"].as_str() {
            Some("Runtime.consoleAPICalled") => {
                let text: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a["value"].as_str().map(str::to_owned).unwrap_or_else(|| a.to_string()))
                    .collect();
                self.console.push((params["type"].as_str().unwrap_or("").to_owned(), text.join(" ")));
            }
            Some("Runtime.exceptionThrown") => {
                self.console.push(("exception".into(), params["exceptionDetails"].to_string()));
            }
            Some("Log.entryAdded") => {
                let entry = &params["entry"];
                self.console.push((
                    entry["level"].as_str().unwrap_or("").to_owned(),
                    entry["text"].as_str().unwrap_or("").to_owned(),
                ));
            }
            Some("Page.loadEventFired") => self.loaded = true,
            Some("Network.responseReceived") if params["type"] == "Document" => {
                self.status = params["response"]["status"].as_u64();
            }
            _ => {}
        }
    }

    /// Loads `url` and waits for its load event.
    pub fn goto(&mut self, url: &str) {
        self.console.clear();
        self.status = None;
        self.loaded = false;
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for_load();
    }

    fn wait_for_load(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.loaded {
            assert!(Instant::now() < deadline, "the page did not load");
            self.read();
        }
    }

    /// Evaluates JavaScript in the page (the harness's, not the page's: the pages have none).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}));
        result["result"]["value"].clone()
    }

    /// Runs `expression` that submits a form, and waits for the next page to load.
    pub fn submit(&mut self, expression: &str) {
        self.console.clear();
        self.status = None;
        self.loaded = false;
        self.eval(expression);
        self.wait_for_load();
    }

    pub fn url(&mut self) -> String {
        self.eval("location.href").as_str().unwrap_or_default().to_owned()
    }

    pub fn text(&mut self) -> String {
        self.eval("document.body.innerText").as_str().unwrap_or_default().to_owned()
    }

    /// Errors of the current page: console errors, uncaught exceptions, CSP violations.
    pub fn errors(&self) -> Vec<String> {
        self.console
            .iter()
            .filter(|(level, _)| matches!(level.as_str(), "error" | "exception" | "assert"))
            .map(|(level, text)| format!("{level}: {text}"))
            .collect()
    }

    /// Saves a PNG of the whole page under the tests' artifact directory; its path.
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}));
        let bytes = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of the chromium we started.
        unsafe {
            libc::kill(-(self.pid as i32), libc::SIGKILL);
        }
    }
}
