//! A real OpenSSH server (Debian `openssh-server`) on a 127.0.0.1 port of its own, with its
//! own config, host key and `authorized_keys` in a temp dir, for the ssh-agent tests.
//!
//! The port is bound by the fixture before anything connects, and each connection is handed to
//! `sshd -i` (inetd mode, as systemd's `ssh.socket` does it): the port accepts from the first
//! moment, so there is no readiness to wait for and no race for the port number. sshd logs each
//! connection to [`Sshd::log`] (`-e`, `LogLevel VERBOSE`: the key that was accepted).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Debian's sshd.
pub const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd; stopped (and its sessions killed) on drop.
#[derive(Debug)]
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    stop: Arc<AtomicBool>,
    sessions: Arc<Mutex<Vec<Child>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Sshd {
    /// Serve logins of root whose keys are the OpenSSH lines in `authorized_keys`.
    pub fn start(authorized_keys: &str) -> Sshd {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} missing: install openssh-server (scripts/deps)"
        );
        let dir = tempfile::Builder::new().prefix("sshd-").tempdir().unwrap();
        let d = dir.path();
        crate::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join("host_key")),
        );
        std::fs::write(d.join("authorized_keys"), authorized_keys).unwrap();
        let config = format!(
            "HostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\n\
             PidFile none\n\
             LogLevel VERBOSE\n",
            dir = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        // sshd's privilege-separation directory (Debian's tmpfiles.d creates it at boot).
        let privsep = Path::new("/run/sshd");
        if !privsep.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(privsep)
                .unwrap();
        }
        std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755)).unwrap();
        crate::run(
            Command::new(SSHD)
                .arg("-t")
                .arg("-f")
                .arg(d.join("sshd_config")),
        );

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, sessions) = (stop.clone(), sessions.clone());
            let config = d.join("sshd_config");
            let log = d.join("sshd.log");
            std::thread::spawn(move || accept(&listener, &config, &log, &stop, &sessions))
        };
        Sshd {
            dir,
            port,
            stop,
            sessions,
            acceptor: Some(acceptor),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What sshd logged, every connection appended.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The temp dir (config, host key, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ssh` to this server as root through the agent at `agent`, offering only the key in
    /// the public key file `identity` (so the login proves that key), with a known-hosts
    /// file of its own; then `command`.
    pub fn ssh(&self, agent: &Path, identity: &Path, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-p"])
            .arg(self.port.to_string())
            .arg("-o")
            .arg(format!("IdentityAgent={}", agent.display()))
            .arg("-o")
            .arg(format!("IdentityFile={}", identity.display()))
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .args(["-o", "PasswordAuthentication=no"])
            .args(["-o", "StrictHostKeyChecking=accept-new"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ))
            .arg("root@127.0.0.1")
            .arg(command)
            .env_remove("SSH_AUTH_SOCK");
        c
    }
}

/// Hand each connection to `sshd -i` until `stop`.
fn accept(
    listener: &TcpListener,
    config: &Path,
    log: &PathBuf,
    stop: &AtomicBool,
    sessions: &Mutex<Vec<Child>>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let fd = OwnedFd::from(stream);
        let (Ok(input), Ok(err)) = (
            fd.try_clone(),
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log),
        ) else {
            continue;
        };
        let child = Command::new(SSHD)
            .args(["-i", "-e", "-f"])
            .arg(config)
            .stdin(Stdio::from(input))
            .stdout(Stdio::from(fd))
            .stderr(Stdio::from(err))
            .spawn();
        if let Ok(child) = child {
            sessions.lock().unwrap().push(child);
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for mut child in self.sessions.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
