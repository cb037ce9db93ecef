//! Choosing loopback ports for servers this program starts.
//!
//! A port kept in a file and listened on again later (the local deployment's nodes, a test's
//! server restarted on the same port) must not come from the kernel's ephemeral range
//! (`net.ipv4.ip_local_port_range`, 32768–60999 by default): that range is where every
//! outgoing connection takes its local port, so a port found free there can be taken by any
//! client connection the moment its listener is down, and a restart then fails with "address
//! in use". [`stable_free_port`] picks below that range instead.
//!
//! Tricky cases: a machine whose ephemeral range starts low (little or nothing below it) falls
//! back to a kernel-chosen port; a port is only free when checked, so a caller still reports
//! "in use" clearly if another program takes it before the server binds. A port is often
//! chosen well before anything listens on it (written into a config, then served), so this
//! process never hands out the same port twice: two servers set up at once in one process
//! (a cluster's nodes, parallel tests) cannot both get a port that is free only because
//! neither listens yet.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use rand::Rng as _;

/// Lowest port chosen: below are well-known and registered services people run by hand.
const LOWEST: u16 = 10_000;
/// Used when `/proc` does not say (the kernel's default low end).
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;
/// Candidates tried before falling back to a kernel-chosen port.
const ATTEMPTS: usize = 64;

/// Ports [`stable_free_port`] has handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The low end of the kernel's ephemeral port range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

/// Whether `port` can be listened on at loopback now.
pub fn loopback_port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A loopback port free now and outside the ephemeral range (see the module doc), for a
/// server that is to listen on it again after restarts.
pub fn stable_free_port() -> Result<u16> {
    let high = ephemeral_low();
    if high > LOWEST + 1 {
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..ATTEMPTS {
            let port = rand::thread_rng().gen_range(LOWEST..high);
            if !handed_out.contains(&port) && loopback_port_is_free(port) {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("cannot find a free loopback port; is the loopback interface up?")
}

/// `preferred` when it is free, else [`stable_free_port`].
pub fn preferred_or_stable_port(preferred: u16) -> Result<u16> {
    match loopback_port_is_free(preferred) {
        true => Ok(preferred),
        false => stable_free_port(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chosen_port_is_free_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        for _ in 0..20 {
            let port = stable_free_port().expect("a port");
            assert!(loopback_port_is_free(port), "{port} is not free");
            if low > LOWEST + 1 {
                assert!((LOWEST..low).contains(&port), "{port} not in {LOWEST}..{low}");
            }
        }
    }

    #[test]
    fn no_port_is_handed_out_twice_in_one_process() {
        if ephemeral_low() <= LOWEST + 1 {
            return; // no range of our own here: ports come from the kernel
        }
        let ports: Vec<u16> = (0..500).map(|_| stable_free_port().expect("a port")).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
    }

    #[test]
    fn a_taken_preferred_port_is_replaced() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let taken = held.local_addr().expect("addr").port();
        let port = preferred_or_stable_port(taken).expect("a port");
        assert_ne!(port, taken);
    }
}
