//! The address `--listen` takes: loopback unless the user typed another.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    str::FromStr,
};

use anyhow::{Context, Result};

/// Where to serve: `:PORT` is `127.0.0.1:PORT`; `IP:PORT` and
/// `[IPv6]:PORT` as typed; `localhost:PORT` is loopback too. Host names are
/// refused rather than resolved, so a name never binds a public address the
/// user did not write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let loopback = |port: &str| {
            port.parse::<u16>()
                .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
                .map_err(|_| format!("'{port}' is not a port (0 to 65535)"))
        };
        let addr = if let Some(port) = s.strip_prefix(':') {
            loopback(port)?
        } else if let Some(port) = s.strip_prefix("localhost:") {
            loopback(port)?
        } else {
            SocketAddr::from_str(s)
                .map_err(|_| format!("'{s}' is not ADDR:PORT (e.g. :9464, 127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464)"))?
        };
        Ok(ListenAddr(addr))
    }
}

impl ListenAddr {
    /// Binds the socket now; the one line on failure says what to change.
    pub fn bind(&self) -> Result<TcpListener> {
        let listener = TcpListener::bind(self.0).with_context(|| {
            format!("--listen {}: cannot listen there (a port in use? pick another, or :0 for any free one)", self.0)
        })?;
        listener.set_nonblocking(true).context("--listen: making the socket non-blocking")?;
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_is_loopback() {
        assert_eq!(":9464".parse::<ListenAddr>().unwrap().0, "127.0.0.1:9464".parse().unwrap());
        assert_eq!("localhost:80".parse::<ListenAddr>().unwrap().0, "127.0.0.1:80".parse().unwrap());
        assert_eq!("0.0.0.0:9464".parse::<ListenAddr>().unwrap().0, "0.0.0.0:9464".parse().unwrap());
        assert_eq!("[::1]:1".parse::<ListenAddr>().unwrap().0, "[::1]:1".parse().unwrap());
    }

    #[test]
    fn names_and_bad_ports_are_refused() {
        assert!(":70000".parse::<ListenAddr>().unwrap_err().contains("not a port"));
        assert!("example.com:80".parse::<ListenAddr>().unwrap_err().contains("not ADDR:PORT"));
        assert!("9464".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn a_port_in_use_fails_with_one_line() {
        let taken = ":0".parse::<ListenAddr>().unwrap().bind().unwrap();
        let again = ListenAddr(taken.local_addr().unwrap()).bind().unwrap_err();
        let line = format!("{again:#}");
        assert!(line.contains("port in use") && !line.contains('\n'), "{line}");
    }
}
