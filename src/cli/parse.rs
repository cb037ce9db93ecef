//! Parsing and checking what users type: server URLs, seconds, sizes. clap calls the value
//! parsers, so a bad value is refused before anything runs, with the range it must be in.

use std::time::Duration;

use anyhow::{bail, Result};

/// Checks a server URL list as `init` takes it: comma-separated `[scheme://][user[:pass]@]host[:port]`,
/// scheme nats, tls, ws or wss, a port required when no scheme is given.
pub fn validate_server_urls(server: &str) -> Result<()> {
    let help = "write nats://HOST:PORT (e.g. nats://127.0.0.1:4222; several separated by commas)";
    if server.trim().is_empty() {
        bail!("--server is empty; {help}");
    }
    for url in server.split(',').map(str::trim) {
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, url),
        };
        if let Some(scheme) = scheme {
            if !["nats", "tls", "ws", "wss"].contains(&scheme.to_ascii_lowercase().as_str()) {
                bail!("server URL '{url}' has an unknown scheme '{scheme}'; {help}");
            }
        }
        let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, tail)) => (h, tail.strip_prefix(':')),
                None => bail!("server URL '{url}' has an unclosed IPv6 address; {help}"),
            }
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            }
        };
        let host_ok =
            !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !host_ok {
            bail!("server URL '{url}' has no valid host; {help}");
        }
        match port {
            Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => {}
            Some(p) => bail!("server URL '{url}' has an invalid port '{p}'; {help}"),
            None if scheme.is_none() => bail!("'{url}' is not a NATS server URL; {help}"),
            None => {}
        }
    }
    Ok(())
}

/// A clap value parser: seconds, greater than 0 and at most `MAX`.
pub fn parse_seconds<const MAX: u64>(s: &str) -> std::result::Result<Duration, String> {
    let range = format!("must be greater than 0 and at most {MAX} seconds");
    let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds; it {range}"))?;
    if v.is_finite() && v > 0.0 && v <= MAX as f64 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(range)
    }
}

/// Parses a byte count: a plain number, or one with a K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 0),
        Some((i, _)) => {
            let shift = match t[i..].trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 0,
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                other => return Err(format!("unknown size unit '{other}'; use K, M, G or T")),
            };
            (&t[..i], shift)
        }
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size; write e.g. 268435456, 256M or 1G"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

/// A clap value parser: `IP:PORT`, or `HOST:PORT` with a host name this machine resolves
/// (`localhost:8642`; its first address, IPv4 first).
pub fn parse_listen(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let help = "write HOST:PORT, e.g. 127.0.0.1:8642 or localhost:8642";
    let addrs: Vec<std::net::SocketAddr> = match s.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Err(format!("'{s}' is not an address to listen on ({e}); {help}")),
    };
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("'{s}' resolves to no address; {help}"))
}

/// A clap value parser: a size in bytes (K/M suffixes as [`parse_size`]) that fits a u32.
/// Its range is checked by the command, in one line ([`crate::server::check_chunk_size`]).
pub fn parse_chunk_size(s: &str) -> std::result::Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("chunk size '{s}' is far too large; use at most 1008K"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        for good in [
            "nats://127.0.0.1:4222",
            "tls://h.example:4443",
            "wss://h.example",
            "127.0.0.1:4222",
            "nats://u:p@h:1,nats://[::1]:4222",
        ] {
            assert!(validate_server_urls(good).is_ok(), "{good}");
        }
        for bad in ["notaurl", "", "http://h:1", "nats://:4222", "nats://h:0", "nats://h:x", "nats://h:1,", "[::1:4222"]
        {
            assert!(validate_server_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("127.0.0.1:8642"), Ok("127.0.0.1:8642".parse().unwrap()));
        assert_eq!(parse_listen("localhost:8642").map(|a| a.port()), Ok(8642));
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("nonsense:x").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds::<10>("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "11", "nan", "inf", "x"] {
            assert!(parse_seconds::<10>(bad).unwrap_err().contains("greater than 0 and at most 10 seconds"), "{bad}");
        }
    }
}
