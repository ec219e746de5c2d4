//! Network namespaces and veth pairs for the tests (shared by `e2e.rs` and `nic.rs`): test
//! traffic stays on interfaces and in namespaces the tests create.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::thread;

/// Runs `cmd` with `sh -c`, output discarded; whether it succeeded.
pub fn run(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A veth pair between two namespaces: `a` in `ns_a` (the port's), `b` in `ns_b`. Both
/// namespaces (and so both ends) are deleted on drop.
pub struct Veth {
    pub ns_a: String,
    pub ns_b: String,
    pub a: String,
    pub b: String,
}

impl Drop for Veth {
    fn drop(&mut self) {
        run(&format!("ip -n {} link del {}", self.ns_a, self.a));
        run(&format!("ip netns del {}", self.ns_a));
        run(&format!("ip netns del {}", self.ns_b));
    }
}

/// Sets up a veth pair of MTU `mtu`, both ends up, IPv6 off (no router solicitations in the
/// way). `None` (test skipped) only outside CI when not root or without iproute2.
pub fn veth(tag: &str, mtu: u32) -> Option<Veth> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !run("ip netns list") {
        // CI runs as root with iproute2 installed: never skip there.
        assert!(std::env::var_os("CI").is_none(), "CI needs root and iproute2");
        eprintln!("skipped: needs root and iproute2");
        return None;
    }
    let id = std::process::id() % 10000;
    let v = Veth {
        ns_a: format!("virtq-nic-{tag}-{}-a", std::process::id()),
        ns_b: format!("virtq-nic-{tag}-{}-b", std::process::id()),
        a: format!("vqn{id}{tag}a"),
        b: format!("vqn{id}{tag}b"),
    };
    assert!(v.a.len() <= 15, "{} too long", v.a);
    for ns in [&v.ns_a, &v.ns_b] {
        assert!(run(&format!("ip netns add {ns}")), "ip netns add {ns}");
        run(&format!("ip netns exec {ns} sh -c 'sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1'"));
    }
    assert!(run(&format!(
        "ip link add {} mtu {mtu} netns {} type veth peer name {} mtu {mtu} netns {}",
        v.a, v.ns_a, v.b, v.ns_b
    )));
    assert!(run(&format!("ip -n {} link set {} up && ip -n {} link set {} up", v.ns_a, v.a, v.ns_b, v.b)));
    Some(v)
}

/// Runs `f` on a thread that joined the network namespace `ns` (`setns`): sockets it creates
/// live in that namespace, whichever thread uses them afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let nsfd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace fd; it moves only this short-lived thread.
        let rc = unsafe { libc::setns(nsfd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}
