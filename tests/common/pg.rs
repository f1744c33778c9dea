//! A real PostgreSQL server for tests: its own cluster in a temporary
//! directory, listening on a free loopback port, stopped when dropped.
//! Shared by the crate's unit tests (included by path) and `tests/`.
//!
//! As root it runs the server as the `postgres` system user (PostgreSQL
//! refuses to run as root); `scripts/test` installs the `postgresql`
//! package when it is missing. Nothing is skipped: without the server
//! binaries the test fails saying what to install.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const SUPERUSER_PASSWORD: &str = "test-superuser-secret";

pub struct PgServer {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    run_as: Option<String>,
    /// Extra `-c name=value` server settings.
    extra: String,
}

fn server_bin_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.into_iter().rev().find(|b| b.join("initdb").exists() && b.join("pg_ctl").exists()).unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (initdb and pg_ctl under /usr/lib/postgresql/*/bin). \
             Install them with `sudo apt-get install postgresql` (scripts/test does this when run as root)."
        )
    })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

impl PgServer {
    pub fn start(tag: &str) -> PgServer {
        PgServer::start_with(tag, "")
    }

    /// Start with extra server settings, e.g. `-c shared_buffers=256MB`.
    pub fn start_with(tag: &str, extra: &str) -> PgServer {
        let bin = server_bin_dir();
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let run_as = is_root.then(|| "postgres".to_owned());
        let dir = std::env::temp_dir().join(format!(
            "edgemeter-pg-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("create pg dir");
        std::fs::write(dir.join("pw"), SUPERUSER_PASSWORD).expect("write pwfile");
        if let Some(user) = &run_as {
            let ok = Command::new("chown")
                .args(["-R", &format!("{user}:")])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(
                ok.success(),
                "chown {} to {user} failed (does the `postgres` user exist?)",
                dir.display()
            );
        }
        let server = PgServer {
            dir,
            port: free_port(),
            bin,
            run_as,
            extra: extra.to_owned(),
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.path("data"),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--pwfile",
                &server.path("pw"),
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        );
        server.start_again();
        server
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A PostgreSQL tool, run as the cluster's owner.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:\n{}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// (Re)start the server on the same port and data.
    pub fn start_again(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off \
             -c full_page_writes=off -c max_connections=40 {}",
            self.port,
            self.dir.display(),
            self.extra
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.path("data"),
                "-l",
                &self.path("log"),
                "-w",
                "-t",
                "30",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    /// Stop at once, as a crash or a restart would look to a client.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.path("data"), "-w", "-m", "immediate", "stop"],
        );
    }

    pub fn connect(&self, user: &str, password: &str, db: &str) -> postgres::Client {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to test PostgreSQL as {user}: {e}"))
    }

    pub fn superuser(&self, db: &str) -> postgres::Client {
        self.connect("postgres", SUPERUSER_PASSWORD, db)
    }

    /// An xx gateway's database as GORM's AutoMigrate creates it (the
    /// reference DDL), with `states.Period` set, and a login role `ro` with
    /// password `pw-ro` that may only SELECT. Returns a superuser client on it.
    pub fn gateway_db(&self, period_ms: i64) -> postgres::Client {
        let mut su = self.superuser("postgres");
        su.batch_execute("CREATE ROLE ro LOGIN PASSWORD 'pw-ro'")
            .expect("role ro");
        su.batch_execute("CREATE DATABASE cmix_gateway")
            .expect("database");
        let mut gw = self.superuser("cmix_gateway");
        gw.batch_execute(
            r#"CREATE TABLE "client_bloom_filters" (
                 "id" bigserial, "recipient_id" bigint NOT NULL, "epoch" bigint NOT NULL,
                 "first_round" bigint NOT NULL, "round_range" bigint NOT NULL, "filter" bytea NOT NULL,
                 "uses" bigint NOT NULL DEFAULT 0, PRIMARY KEY ("id"));
               CREATE INDEX "idx_client_bloom_filters_recipient_id_epoch" ON "client_bloom_filters" ("recipient_id","epoch");
               CREATE INDEX "idx_client_bloom_filters_first_round" ON "client_bloom_filters" ("first_round");
               CREATE TABLE "states" ("key" text, "value" text NOT NULL, PRIMARY KEY ("key"));
               GRANT SELECT ON client_bloom_filters, states TO ro;"#,
        )
        .expect("gateway DDL");
        gw.execute(
            "INSERT INTO states VALUES ('Period', $1)",
            &[&(period_ms * 1_000_000).to_string()],
        )
        .expect("period");
        gw
    }

    /// The `gateway_db` with rows for the 8 epochs before now (5 to 11
    /// recipients each): a gateway that has been running a while.
    pub fn gateway_with_recent_rows(&self, period_ms: i64) -> postgres::Client {
        let mut gw = self.gateway_db(period_ms);
        let now_e = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64
            / period_ms;
        for e in now_e - 8..now_e {
            gw.execute(
                "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter)
                 SELECT g, $1::bigint, 1, 0, '\\x00'::bytea FROM generate_series(1, 5 + ($1::bigint % 7)) g",
                &[&e],
            )
            .expect("rows");
        }
        gw
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.path("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.as_str(), "-m", "immediate", "stop"])
            .output();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
