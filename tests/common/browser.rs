//! Debian's real `chromium`, headless, driven over the DevTools protocol
//! (a websocket, by tungstenite): open pages, fill forms, read the DOM and
//! what the page logged (console errors, exceptions, CSP refusals, failed
//! loads), and keep screenshots in `target/screenshots/`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

pub fn chromium() -> &'static str {
    super::tool("chromium", "chromium")
}

/// Where screenshots are kept: `target/screenshots/NAME.png`.
pub fn screenshot_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir.join(format!("{name}.png"))
}

/// What a page did.
pub struct Loaded {
    /// The DOM once loaded.
    pub dom: String,
    /// What the page logged: console errors and warnings, exceptions, CSP
    /// refusals, failed loads. Empty for a clean page.
    pub problems: Vec<String>,
    /// The page's final URL (after redirects).
    pub url: String,
}

pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    profile: PathBuf,
    /// Problems logged since the last navigation.
    problems: Vec<String>,
    loaded: bool,
}

const WAIT: Duration = Duration::from_secs(30);

impl Browser {
    pub fn start() -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "edgemeter-chromium-{}-{}",
            std::process::id(),
            super::now_ms()
        ));
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                // Nothing but loopback: a page that reached elsewhere fails visibly.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Its own process group, so that drop can end all of it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let deadline = Instant::now() + WAIT;
        let mut line = String::new();
        let port = loop {
            line.clear();
            if Instant::now() > deadline || stderr.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!("chromium did not open its DevTools port");
            }
            if let Some(rest) = line
                .trim()
                .strip_prefix("DevTools listening on ws://127.0.0.1:")
            {
                break rest
                    .split('/')
                    .next()
                    .unwrap()
                    .parse::<u16>()
                    .expect("port");
            }
        };
        // Keep draining stderr so chromium never blocks on it.
        std::thread::spawn(move || for _ in stderr.lines() {});
        let list: Value = ureq::get(format!("http://127.0.0.1:{port}/json/list"))
            .call()
            .expect("devtools target list")
            .body_mut()
            .read_to_string()
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("the target list");
        let url = list
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (ws, _) = tungstenite::connect(url).expect("devtools websocket");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        }
        let mut b = Browser {
            child,
            ws,
            next_id: 0,
            profile,
            problems: Vec::new(),
            loaded: false,
        };
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b.call("Log.enable", json!({}));
        b
    }

    fn note(&mut self, event: &Value) {
        let p = &event["params"];
        match event["method"].as_str().unwrap_or("") {
            "Page.loadEventFired" => self.loaded = true,
            "Runtime.consoleAPICalled" => {
                let kind = p["type"].as_str().unwrap_or("");
                if matches!(kind, "error" | "warning" | "assert") {
                    self.problems.push(format!("console.{kind}: {}", p["args"]));
                }
            }
            "Runtime.exceptionThrown" => {
                self.problems
                    .push(format!("exception: {}", p["exceptionDetails"]));
            }
            "Log.entryAdded" => {
                let e = &p["entry"];
                if matches!(e["level"].as_str(), Some("error" | "warning")) {
                    self.problems.push(format!(
                        "{}: {} {}",
                        e["source"].as_str().unwrap_or(""),
                        e["text"].as_str().unwrap_or(""),
                        e["url"].as_str().unwrap_or("")
                    ));
                }
            }
            _ => {}
        }
    }

    /// Send a command and wait for its answer, noting events meanwhile.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params) {
            Ok(result) => result,
            Err(error) => panic!("{method}: {error}"),
        }
    }

    /// [`Browser::call`], with chromium's error as an `Err`.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.ws
            .send(Message::text(
                json!({"id": id, "method": method, "params": params}).to_string(),
            ))
            .expect("send to chromium");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let msg = match self.ws.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => panic!("chromium's websocket: {e}"),
            };
            let v: Value = serde_json::from_str(&msg).expect("devtools JSON");
            if v["id"] == id {
                return match v.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
            self.note(&v);
        }
        panic!("chromium did not answer {method} within {WAIT:?}");
    }

    /// Wait (bounded) for the page's load event.
    fn wait_loaded(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.loaded {
            assert!(
                Instant::now() < deadline,
                "the page did not load within {WAIT:?}"
            );
            // A cheap round trip that lets events arrive. While the page
            // navigates, chromium may answer it "Inspected target navigated
            // or closed" (CI saw it after a form's submit): the load event
            // still comes, so that answer is only a reason to ask again.
            let _ = self.try_call("Runtime.evaluate", json!({"expression": "1"}));
        }
    }

    /// Run `js` in the page; its value.
    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{js}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Open `url` at `width`×`height` and wait for it to load.
    pub fn open(&mut self, url: &str, width: u32, height: u32) -> Loaded {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}),
        );
        self.problems.clear();
        self.loaded = false;
        self.call("Page.navigate", json!({"url": url}));
        self.wait_loaded();
        self.loaded_state()
    }

    /// Submit the form `form` (a CSS selector) after setting fields, and
    /// wait for the next page to load.
    pub fn submit(&mut self, form: &str, fields: &[(&str, &str)]) -> Loaded {
        let mut js = String::new();
        for (name, value) in fields {
            js += &format!(
                "document.querySelector({} + ' [name={}]').value = {};",
                serde_json::to_string(form).unwrap(),
                name,
                serde_json::to_string(value).unwrap()
            );
        }
        js += &format!(
            "document.querySelector({}).submit(); true",
            serde_json::to_string(form).unwrap()
        );
        self.problems.clear();
        self.loaded = false;
        self.eval(&js);
        self.wait_loaded();
        self.loaded_state()
    }

    fn loaded_state(&mut self) -> Loaded {
        let dom = self.eval("document.documentElement.outerHTML");
        let url = self.eval("location.href");
        Loaded {
            dom: dom.as_str().unwrap_or("").to_owned(),
            problems: std::mem::take(&mut self.problems),
            url: url.as_str().unwrap_or("").to_owned(),
        }
    }

    /// The whole page as PNG in `target/screenshots/NAME.png`.
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("png data"))
            .expect("base64");
        let path = screenshot_path(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// The cookies the browser holds for `url`, as DevTools reports them.
    pub fn cookies(&mut self, url: &str) -> Vec<Value> {
        let r = self.call("Network.getCookies", json!({"urls": [url]}));
        r["cookies"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromium's helpers (renderer, GPU, zygote) kept
        // writing to the profile after the browser alone was killed, and
        // left it behind in the temp dir (53 of them here).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
