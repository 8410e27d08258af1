//! A client that asks for a credential exactly as systemd does for `LoadCredential=ID:SOCKET`:
//! bind the abstract address `\0<random hex>/unit/<unit>/<id>`, connect, shut down the write
//! side, read to EOF.

use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{
    bind, connect, shutdown, socket, AddressFamily, Shutdown, SockFlag, SockType, UnixAddr,
};

/// Fetch credential `id` for `unit` from the socket at `socket`, the way PID 1 does. An empty
/// answer is systemd's "nothing" (denied or unknown).
///
/// # Errors
/// Socket errors.
pub fn fetch(socket: &Path, unit: &str, id: &str) -> std::io::Result<Vec<u8>> {
    let fd = socket_fd()?;
    let mut nonce = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("{nonce}/unit/{unit}/{id}");
    bind(fd.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(socket)?)?;
    shutdown(fd.as_raw_fd(), Shutdown::Write)?;
    let mut stream = UnixStream::from(fd);
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

fn socket_fd() -> std::io::Result<std::os::fd::OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}
