//! [`Phone`]: a scripted SIP phone (UAC + UAS) for end-to-end tests.
//!
//! All the SIP behaviour lives in [`Ua`] (shared with the trunk); a phone is a UA that
//! registers and authenticates. `Phone` dereferences to [`Ua`], so `phone.invite(..)`,
//! `phone.register(..)`, `phone.wait_invite(..)` etc. are the [`Ua`] methods.

use std::ops::Deref;

pub use crate::ua::{Call, IncomingCall, InviteOpts, PhoneConfig, Ua};

/// A scripted phone. See [`Ua`] for the methods.
pub struct Phone {
    ua: Ua,
}

impl Phone {
    /// Opens the phone's socket: binds UDP on `cfg.local_ip`, or connects TCP/TLS to
    /// `cfg.sbc` (a stream phone has exactly one connection, its flow, RFC 5626).
    pub async fn new(cfg: PhoneConfig) -> anyhow::Result<Phone> {
        Ok(Phone {
            ua: Ua::new(cfg).await?,
        })
    }

    pub fn ua(&self) -> &Ua {
        &self.ua
    }
}

impl Deref for Phone {
    type Target = Ua;
    fn deref(&self) -> &Ua {
        &self.ua
    }
}
