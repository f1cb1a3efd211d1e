//! [`Trunk`]: a scripted carrier trunk. The SBC recognises a trunk by its source address, so
//! a trunk is a UA on its own UDP socket at an address the test chooses (127.0.0.20:5060...),
//! sending everything to the SBC, without registration or authentication.
//!
//! `Trunk` dereferences to [`Ua`]: `invite`, `wait_invite`, `answer`, `bye`,
//! `wait_request_and_answer`... are the phone's.

use std::net::SocketAddr;
use std::ops::Deref;

use crate::ua::{host_str, PhoneConfig, Ua};

/// A scripted carrier. See [`Ua`] for the methods.
pub struct Trunk {
    ua: Ua,
}

impl Trunk {
    /// A trunk UA bound to `local` (UDP), sending to `sbc`. Its From is
    /// `sip:carrier@<local ip>`.
    pub async fn start(local: SocketAddr, sbc: SocketAddr) -> anyhow::Result<Trunk> {
        let mut cfg = PhoneConfig::new("carrier", &host_str(local.ip()), "", sbc);
        cfg.local_ip = local.ip();
        cfg.local_port = local.port();
        cfg.user_agent = "sbc-tests-trunk".to_string();
        Self::start_with(cfg).await
    }

    /// A trunk from a full UA config (another user name, TCP...).
    pub async fn start_with(cfg: PhoneConfig) -> anyhow::Result<Trunk> {
        Ok(Trunk {
            ua: Ua::new(cfg).await?,
        })
    }

    /// The trunk's SIP address (where the SBC must send calls for the carrier).
    pub fn addr(&self) -> SocketAddr {
        self.ua.endpoint().local_addr()
    }

    pub fn ua(&self) -> &Ua {
        &self.ua
    }
}

impl Deref for Trunk {
    type Target = Ua;
    fn deref(&self) -> &Ua {
        &self.ua
    }
}
