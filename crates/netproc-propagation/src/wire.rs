//! The delivery exchange: what an authority sends a target and what comes
//! back. Both are postcard, carried in an `Extension` operation named
//! [`EXTENSION`] (see `docs/wire-contract.md`).

use serde::{Deserialize, Serialize};

use crate::event::decode_exact;
use crate::{Ack, SignedEvent};

/// The extension operation's name.
pub const EXTENSION: &str = "netproc.propagation.deliver";

/// The second delivery extension: the same [`Delivery`] and
/// [`DeliveryReply`], with every event in the second format
/// ([`EpochEvent`](crate::EpochEvent), fenced by epoch). A target that
/// registers it announces the format; one that predates it answers
/// `invalid_operation` ("no extension named …"), and the authority sends it
/// the first format.
pub const EXTENSION_V2: &str = "netproc.propagation.deliver.v2";

/// The third delivery extension: the second format's events, whose kinds
/// may also be the certificate deny list's
/// ([`EventKind::DenyCert`](crate::EventKind::DenyCert),
/// [`AllowCert`](crate::EventKind::AllowCert),
/// [`DenyList`](crate::EventKind::DenyList)). A target registers it to
/// announce it decodes them; others never receive them (the authority
/// sends them a no-op in their place, so their cursor moves on).
pub const EXTENSION_V3: &str = "netproc.propagation.deliver.v3";

/// Events in a request, at most. A larger request is refused whole.
pub const MAX_EVENTS_PER_DELIVERY: usize = 1024;

/// One request: events for one target, in `seq` order. An empty list is a
/// probe: the reply carries the target's cursor and nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Delivery {
    /// The events, each signed on its own.
    pub events: Vec<SignedEvent>,
}

impl Delivery {
    /// A request carrying `events`.
    pub fn new(events: Vec<SignedEvent>) -> Delivery {
        Delivery { events }
    }

    /// The postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding a Vec of byte vectors into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a request; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Delivery, postcard::Error> {
        decode_exact(bytes)
    }
}

/// A target's answer to one [`Delivery`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeliveryReply {
    /// The target's cursor after handling the request: every `seq` at or
    /// below it is done (applied, or consumed by a content rejection).
    pub cursor: u64,
    /// One acknowledgement per event, in order.
    pub acks: Vec<Ack>,
    /// Key ids a snapshot in this request carried but the target skipped,
    /// because they are configured locally there.
    pub conflicts: Vec<String>,
}

impl DeliveryReply {
    /// The postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a reply; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<DeliveryReply, postcard::Error> {
        decode_exact(bytes)
    }
}
