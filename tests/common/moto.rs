//! moto's server (the AWS emulator from PyPI) on a free loopback port, and
//! reading back what it received through its AWS API with boto3.
//! `scripts/test` installs `moto[server]` into `target/test-tools/venv`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn venv_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("EDGEMETER_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv")
        });
    let p = dir.join("bin").join(name);
    assert!(
        p.exists(),
        "{} not found: run scripts/test (it installs moto[server] into target/test-tools/venv), \
         or set EDGEMETER_TEST_VENV to a venv with `pip install 'moto[server]==5.2.5'`",
        p.display()
    );
    p
}

pub struct Moto {
    pub port: u16,
    child: Option<Child>,
}

impl Moto {
    pub fn start() -> Moto {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let mut m = Moto { port, child: None };
        m.start_again();
        m
    }

    pub fn start_again(&mut self) {
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run scripts/cloudwatch-read against this emulator; its JSON output.
    pub fn read(&self, args: &[&str]) -> serde_json::Value {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cloudwatch-read");
        let out = Command::new(venv_bin("python"))
            .arg(script)
            .arg(format!("http://127.0.0.1:{}", self.port))
            .args(args)
            .output()
            .expect("run cloudwatch-read");
        assert!(
            out.status.success(),
            "cloudwatch-read failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("cloudwatch-read prints JSON")
    }

    /// The messages of one log stream, in order (the test fails if the
    /// stream does not exist).
    pub fn log_events(&self, group: &str, stream: &str) -> Vec<String> {
        let logs = self.read(&["logs", group]);
        logs[stream]
            .as_array()
            .unwrap_or_else(|| panic!("no stream {stream} in {logs}"))
            .iter()
            .map(|m| m.as_str().expect("message").to_owned())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
