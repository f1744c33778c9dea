//! Debian's real `chromium`, headless: load a page, keep a screenshot, and
//! report what the page logged to its console (errors, CSP refusals).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn chromium() -> &'static str {
    let found = Command::new("chromium").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "chromium is missing: install it with `apt-get install chromium` (scripts/test does)"
    );
    "chromium"
}

/// Where screenshots are kept: `target/screenshots/NAME.png`.
pub fn screenshot_path(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir.join(format!("{name}.png"))
}

/// What a page did in the browser.
pub struct Loaded {
    /// The DOM after scripts ran.
    pub dom: String,
    /// Console lines (errors, refused loads), empty for a clean page.
    pub console: Vec<String>,
    pub screenshot: PathBuf,
}

fn run(profile: &Path, size: &str, extra: &[&str], url: &str) -> (String, String) {
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--enable-logging=stderr",
            "--v=0",
            // Nothing but loopback: a page that tried to fetch elsewhere fails visibly.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={size}"))
        .args(extra)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chromium");
    let pid = child.id();
    // Bounded: a hung browser is killed by its pid after 60 s.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().expect("chromium output");
    drop(killer);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Load `url` at `width`x`height`: its DOM, its console, and a screenshot
/// kept as `target/screenshots/NAME.png`.
pub fn load(url: &str, name: &str, width: u32, height: u32) -> Loaded {
    let profile =
        std::env::temp_dir().join(format!("edgemeter-chromium-{}-{name}", std::process::id()));
    let size = format!("{width},{height}");
    let (dom, log) = run(&profile, &size, &["--dump-dom"], url);
    let screenshot = screenshot_path(name);
    let _ = std::fs::remove_file(&screenshot);
    let shot = format!("--screenshot={}", screenshot.display());
    let (_, log2) = run(&profile, &size, &[&shot], url);
    let _ = std::fs::remove_dir_all(&profile);
    let console = log
        .lines()
        .chain(log2.lines())
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    assert!(
        screenshot.exists(),
        "chromium wrote no screenshot of {url}:\n{log2}"
    );
    Loaded {
        dom,
        console,
        screenshot,
    }
}
