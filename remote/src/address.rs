//! Worker addresses: `quic://host:port#sha256=<64 hex digits>` (pinned certificate) or
//! `quic://host:port` (certificate checked against CA roots).

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerAddress {
    pub host: String,
    pub port: u16,
    pub pin: Option<[u8; 32]>,
}

impl WorkerAddress {
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |detail: &str| Error::Address {
            address: text.to_string(),
            detail: detail.to_string(),
        };
        let rest = text
            .strip_prefix("quic://")
            .ok_or_else(|| bad("expected quic://host:port[#sha256=FINGERPRINT]"))?;
        let (hostport, fragment) = match rest.split_once('#') {
            Some((h, f)) => (h, Some(f)),
            None => (rest, None),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = port.parse().map_err(|_| bad("the port is not a number from 0 to 65535"))?;
        let pin = fragment
            .map(|f| {
                let digits = f
                    .strip_prefix("sha256=")
                    .ok_or_else(|| bad("the fragment must be sha256=FINGERPRINT"))?;
                parse_fingerprint(digits).ok_or_else(|| bad("the fingerprint must be 64 hex digits (colons allowed)"))
            })
            .transpose()?;
        Ok(Self {
            host: host.to_string(),
            port,
            pin,
        })
    }

    /// `host:port`, for messages.
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for WorkerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "quic://{}", self.label())?;
        if let Some(pin) = &self.pin {
            write!(f, "#sha256={}", crate::tls::hex(pin))?;
        }
        Ok(())
    }
}

/// 32 bytes from 64 hex digits, with or without colons between the bytes.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: String = text.chars().filter(|&c| c != ':').collect();
    if digits.len() != 64 || !digits.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pinned_and_plain_addresses() {
        let pin = "ab".repeat(32);
        let a = WorkerAddress::parse(&format!("quic://10.0.0.2:4433#sha256={pin}")).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.pin), ("10.0.0.2", 4433, Some([0xab; 32])));
        assert_eq!(a.to_string(), format!("quic://10.0.0.2:4433#sha256={pin}"));
        let v6 = WorkerAddress::parse("quic://[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port, v6.pin), ("::1", 9000, None));
        assert_eq!(v6.label(), "[::1]:9000");
        for bad in [
            "http://h:1",
            "quic://h",
            "quic://:1",
            "quic://h:99999",
            "quic://h:1#sha256=12",
            "quic://h:1#md5=00",
        ] {
            let err = WorkerAddress::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
