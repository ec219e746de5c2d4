//! The control socket (`--control PATH`) and its client (`virtq-net ctl PATH COMMAND...`):
//! ports added and removed at run time, and what runs, as JSON.
//!
//! One request per connection: a line of words (`add-port path=/run/vm3.sock,queues=2`),
//! answered with one line of JSON, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`,
//! after which the server closes the connection. Commands:
//!
//! | command | does |
//! |---|---|
//! | `add-port SPEC` | adds a vhost-user port; SPEC as `--port` |
//! | `add-tap NAME` | attaches a host TAP to the switch, as `--tap` |
//! | `add-nic SPEC` | attaches a host interface to the switch, as `--nic` |
//! | `del-port NAME` | removes a port: a socket path, a TAP's or a NIC's name |
//! | `ports` | the ports: configuration, connection state, negotiated features |
//! | `stats` | `ports` with counters per queue, and per data-plane thread |
//!
//! The socket is created with mode 0600 (only its owner may change the switch), and served by
//! the main thread between its other chores, so commands are handled one at a time. A
//! request is at most [`MAX_REQUEST`] bytes and must arrive within a second.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virtq_vhost_user::limited;

use crate::manager::Manager;
use crate::nic::parse_nic;
use crate::port::{parse_port, PortSpec};

/// Longest request line, in bytes.
pub const MAX_REQUEST: usize = 4096;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The listening control socket; its file is removed when it is dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Listens on `path` with mode 0600. An existing socket file is replaced (a previous run
    /// that was killed leaves one); any other file is an error.
    pub fn bind(path: &Path) -> io::Result<ControlSocket> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        // The file is created with mode 0600 (umask 0177 around the bind), so no other user
        // can connect in the moment between bind and the chmod that makes it explicit.
        // SAFETY: umask only changes this process's file-creation mask; it is restored right
        // after the bind. virtq-net binds its control socket before it starts its threads.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlSocket { listener, path: path.to_path_buf() })
    }

    /// Answers the requests waiting to be accepted (at most 16 per call, so that the main
    /// thread gets back to its other chores); never blocks for more than a second per
    /// request.
    pub fn serve(&self, mgr: &mut Manager, defaults: &PortSpec) {
        for _ in 0..16 {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = answer(stream, mgr, defaults) {
                        limited!(warn, "virtq-net: control socket: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    limited!(warn, "virtq-net: control socket: accept: {e}");
                    return;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one request from `stream`, runs it and writes the answer.
fn answer(stream: UnixStream, mgr: &mut Manager, defaults: &PortSpec) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    // One deadline for the whole request, not per read: a client trickling bytes cannot hold
    // the main thread (and with it SIGTERM handling and other requests) for long.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() <= MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request not complete within a second"));
        }
        stream.set_read_timeout(Some(left))?;
        match (&stream).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let line_len = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let reply = if line_len > MAX_REQUEST {
        json!({ "ok": false, "error": format!("request longer than {MAX_REQUEST} bytes") })
    } else {
        match std::str::from_utf8(&buf[..line_len]) {
            Ok(line) => match execute(line.trim(), mgr, defaults) {
                Ok(v) => v,
                Err(e) => json!({ "ok": false, "error": e }),
            },
            Err(_) => json!({ "ok": false, "error": "request is not UTF-8" }),
        }
    };
    let mut w = &stream;
    w.write_all(format!("{reply}\n").as_bytes())
}

/// Runs one command line; the JSON answer, or the error.
pub fn execute(line: &str, mgr: &mut Manager, defaults: &PortSpec) -> Result<Value, String> {
    let mut words = line.split_whitespace();
    let cmd = words.next().ok_or("empty request")?;
    let args: Vec<&str> = words.collect();
    let one = |what: &str| -> Result<&str, String> {
        match args.as_slice() {
            [a] => Ok(*a),
            _ => Err(format!("{cmd} takes one argument: {what}")),
        }
    };
    match cmd {
        "add-port" => {
            let spec = parse_port(one("SPEC (as --port)")?, defaults)?;
            let id = mgr.add_port(&spec)?;
            Ok(json!({ "ok": true, "id": id, "name": spec.path.display().to_string() }))
        }
        "add-tap" => {
            let name = one("NAME")?;
            let id = mgr.add_switch_tap(name)?;
            Ok(json!({ "ok": true, "id": id, "name": name }))
        }
        "add-nic" => {
            let spec = parse_nic(one("SPEC (as --nic)")?)?;
            let id = mgr.add_nic(&spec)?;
            Ok(json!({ "ok": true, "id": id, "name": spec.ifname }))
        }
        "del-port" => {
            mgr.remove_port(one("NAME (socket path, TAP or NIC name)")?)?;
            Ok(json!({ "ok": true }))
        }
        "ports" if args.is_empty() => Ok(json!({ "ok": true, "ports": mgr.ports_json() })),
        "stats" if args.is_empty() => {
            let mut v = mgr.stats_json();
            v["ok"] = true.into();
            Ok(v)
        }
        "ports" | "stats" => Err(format!("{cmd} takes no argument")),
        _ => Err(format!("unknown command {cmd:?} (add-port, add-tap, add-nic, del-port, ports, stats)")),
    }
}

/// The client: sends `words` as one request to the control socket at `path` and returns the
/// answer line. `Err` if the socket cannot be reached or the answer is not JSON with
/// `"ok": true` (the answer itself, for an error the server gave).
pub fn request(path: &Path, words: &[String]) -> Result<String, String> {
    let line = words.join(" ");
    if line.len() > MAX_REQUEST || line.contains('\n') {
        return Err("request too long or with a line break".into());
    }
    let mut s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(reply.trim()).map_err(|e| format!("bad answer {reply:?}: {e}"))?;
    if v["ok"] == Value::Bool(true) {
        Ok(reply.trim().to_string())
    } else {
        Err(reply.trim().to_string())
    }
}
