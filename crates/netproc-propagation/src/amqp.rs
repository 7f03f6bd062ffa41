//! Deliveries through RabbitMQ, for targets the authority cannot dial:
//! both sides dial out to the broker. The broker is not trusted: events
//! are signed by the authority as over mTLS, and every reply is signed by
//! the target's own reply key, bound to the authority, the authority
//! process's reply queue, the target and the correlation id.
//!
//! Topology (names under one prefix, see `docs/propagation.md`):
//!
//! - `<prefix>.target.<name>`: one quorum queue per target, declared by
//!   the authority, with `x-message-ttl` below the events' freshness
//!   window, `x-max-length` with `reject-publish` (a full queue is an
//!   error for that target, never a silent drop), a delivery limit, and
//!   dead-lettering to `<prefix>.dead`;
//! - `<prefix>.replies`: a direct exchange; each authority process binds
//!   its own exclusive queue `<prefix>.authority.<random>` to it and names
//!   that queue in every request;
//! - `<prefix>.dead`: a fanout exchange; each authority process binds an
//!   exclusive queue to it and so learns that a request expired unread.
//!
//! At most one of this authority's requests waits unread in a target's
//! queue: before publishing, the transport asks the broker how many
//! messages are ready there and waits while there is one (until a reply,
//! a dead-lettered expiry, or the authority's timeout). Requests are
//! persistent, mandatory and confirmed; a delivery is sent only once the
//! broker confirmed it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use netproc_auth::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::event::decode_exact;
use crate::target::PropagationTarget;
use crate::transport::{Outgoing, Transport, TransportError};
use crate::wire::Delivery;

/// The largest request or reply this transport reads (bytes); larger
/// messages are refused as poison.
pub const MAX_AMQP_MESSAGE: usize = 16 * 1024 * 1024;

/// What a reply signature covers first: no signature for anything else
/// verifies as a reply.
const REPLY_DOMAIN: &[u8] = b"netproc.propagation.amqp-reply.v1\0";

/// The request format this transport writes.
const REQUEST_VERSION: u8 = 1;

/// A broker connection or its topology failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// A prefix or target name that cannot name a queue.
    #[error("invalid AMQP name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The broker refused or the connection failed (the URL's password is
    /// never part of the message).
    #[error("broker: {0}")]
    Broker(String),
    /// An `amqps://` CA file could not be read.
    #[error("broker CA file: {0}")]
    Ca(String),
}

/// Where the broker is and how the queues are shaped: the same on the
/// authority and on its targets.
#[derive(Clone)]
#[non_exhaustive]
pub struct AmqpConfig {
    url: String,
    /// The names' common prefix (`netproc` by default).
    pub prefix: String,
    /// PEM of the CA that signed the broker's certificate (`amqps://`).
    pub ca_pem: Option<String>,
    /// How long a request may wait in a target's queue before it is
    /// dead-lettered; below the targets' freshness window (5 min by
    /// default), so no target ever reads a request it must refuse as
    /// stale. 4 min by default.
    pub message_ttl: Duration,
    /// The target queues' length limit (`x-max-length`, 64 by default):
    /// beyond it, publishing is refused (`reject-publish`).
    pub max_length: u32,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "…"))
            .field("message_ttl", &self.message_ttl)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl AmqpConfig {
    /// The broker at `url` (`amqp://user:password@host:5672/%2f`, or
    /// `amqps://…` with [`ca_pem`](Self::ca_pem)), names under `netproc`.
    pub fn new(url: impl Into<String>) -> AmqpConfig {
        AmqpConfig {
            url: url.into(),
            prefix: "netproc".into(),
            ca_pem: None,
            message_ttl: Duration::from_secs(240),
            max_length: 64,
        }
    }

    /// The broker's URL with any password replaced by `***`, for logs.
    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The queue of `target`: `<prefix>.target.<target>`, checked for
    /// AMQP (at most 255 bytes, not under `amq.`, and only ASCII letters,
    /// digits, `.`, `_`, `-`, `:` so permission patterns stay simple).
    pub fn target_queue(&self, target: &str) -> Result<String, AmqpError> {
        check_name(&self.prefix)?;
        check_name(target)?;
        let name = format!("{}.target.{target}", self.prefix);
        check_name(&name)?;
        Ok(name)
    }

    fn replies_exchange(&self) -> String {
        format!("{}.replies", self.prefix)
    }

    fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    async fn connect(&self, name: &str) -> Result<Connection, AmqpError> {
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_pem.clone(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(broker)?;
        let props = ConnectionProperties::default().with_connection_name(name.into());
        tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect_with_config(&self.url, props, tls, runtime),
        )
        .await
        .map_err(|_| AmqpError::Broker("connecting timed out".into()))?
        .map_err(broker)
    }
}

fn broker(e: lapin::Error) -> AmqpError {
    // lapin's errors never carry the URL.
    AmqpError::Broker(e.to_string())
}

fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

fn check_name(name: &str) -> Result<(), AmqpError> {
    let bad = |reason| {
        Err(AmqpError::InvalidName {
            name: name.chars().take(64).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name.starts_with("amq.") {
        return bad("the amq. prefix is reserved by the broker");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return bad("only ASCII letters, digits, '.', '_', '-' and ':'");
    }
    Ok(())
}

/// A request in a target's queue: who asks, where to answer, and the
/// [`Delivery`] as over mTLS. Nothing in it is trusted by the target
/// beyond what the events' signatures say. The encoding is postcard of
/// the fields in order (`docs/wire-contract.md`); a new field is a new
/// `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmqpRequest {
    /// The request format (1).
    pub version: u8,
    /// The events' format (1, 2, 3), as the mTLS extension names it.
    pub format: u8,
    /// The authority's signing public key: bound into the reply.
    pub authority: [u8; 32],
    /// The authority process's reply queue.
    pub reply_to: String,
    /// Unique among the authority process's deliveries.
    pub correlation_id: u64,
    /// The target the authority meant (the events say it again, signed).
    pub target: String,
    /// The encoded [`Delivery`].
    pub delivery: Vec<u8>,
}

/// What a target answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AmqpOutcome {
    /// The encoded [`DeliveryReply`](crate::DeliveryReply).
    Reply(Vec<u8>),
    /// The events' format is newer than this target reads.
    Unsupported,
    /// The target could not handle it: `undecodable` (the delivery inside
    /// the request) or `failed` (its state database).
    Failed(String),
}

/// A target's signed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmqpReply {
    /// The request's correlation id.
    pub correlation_id: u64,
    /// The answering target (its own name, not the request's).
    pub target: String,
    /// What happened.
    pub outcome: AmqpOutcome,
    /// Ed25519 by the target's reply key over
    /// [`signed_message`](AmqpReply::signed_message).
    pub signature: Vec<u8>,
}

impl AmqpReply {
    /// The bytes a reply's signature covers: a domain tag, then the
    /// authority's signing public key, the reply queue, the target, the
    /// correlation id and the outcome (which holds the cursor and acks).
    pub fn signed_message(
        authority: &[u8; 32],
        reply_to: &str,
        target: &str,
        correlation_id: u64,
        outcome: &AmqpOutcome,
    ) -> Vec<u8> {
        reply_message(authority, reply_to, target, correlation_id, outcome)
    }

    /// The postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a reply (at most [`MAX_AMQP_MESSAGE`] bytes, nothing after).
    pub fn decode(bytes: &[u8]) -> Option<AmqpReply> {
        decode_bounded(bytes)
    }
}

impl AmqpRequest {
    /// The postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a request (at most [`MAX_AMQP_MESSAGE`] bytes, nothing after).
    pub fn decode(bytes: &[u8]) -> Option<AmqpRequest> {
        decode_bounded(bytes)
    }
}

/// The bytes a reply signature covers.
fn reply_message(
    authority: &[u8; 32],
    reply_to: &str,
    target: &str,
    correlation_id: u64,
    outcome: &AmqpOutcome,
) -> Vec<u8> {
    let mut m = REPLY_DOMAIN.to_vec();
    // Postcard of a tuple: each string carries its length, so no two
    // different tuples give the same bytes.
    let body = postcard::to_stdvec(&(authority, reply_to, target, correlation_id, outcome))
        .unwrap_or_default();
    m.extend_from_slice(&body);
    m
}

fn decode_bounded<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    if bytes.len() > MAX_AMQP_MESSAGE {
        return None;
    }
    decode_exact(bytes).ok()
}

fn queue_args(config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    let ttl = i64::try_from(config.message_ttl.as_millis()).unwrap_or(i64::MAX);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(config.max_length)),
    );
    args.insert("x-overflow".into(), long_string("reject-publish"));
    // A message that keeps failing is dropped (dead-lettered) after ten
    // deliveries instead of forever.
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(10));
    args.insert(
        "x-dead-letter-exchange".into(),
        long_string(&config.dead_exchange()),
    );
    args
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
}

fn short(s: &str) -> ShortString {
    s.into()
}

// ---------------------------------------------------------------------
// The authority's side.

/// The authority's side of the broker transport: publishes each delivery
/// into its target's queue and waits for that target's signed reply on
/// this process's reply queue. Connects lazily and again after a failure.
#[derive(Clone)]
pub struct AmqpTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("config", &self.shared.config)
            .field("reply_queue", &self.shared.reply_queue)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: AmqpConfig,
    /// The authority's signing public key (bound into replies).
    authority: [u8; 32],
    reply_queue: String,
    /// Target name → (its queue, its reply public key).
    targets: HashMap<String, (String, [u8; 32])>,
    pending: Mutex<HashMap<u64, (String, oneshot::Sender<AmqpOutcome>)>>,
    /// Woken by every reply and every dead-lettered request.
    changed: Notify,
    link: tokio::sync::Mutex<Option<Link>>,
}

struct Link {
    conn: Connection,
    channel: Channel,
    consumers: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.consumers.abort();
    }
}

impl AmqpTransport {
    /// A transport for `targets` (name → the public half of its reply
    /// key), for the authority whose signing public key is `authority`.
    /// Nothing is dialled until the first delivery.
    pub fn new(
        config: AmqpConfig,
        authority: [u8; 32],
        targets: impl IntoIterator<Item = (String, [u8; 32])>,
    ) -> Result<AmqpTransport, AmqpError> {
        let mut r = [0u8; 8];
        netproc_pki::random_bytes(&mut r).map_err(|e| AmqpError::Broker(e.to_string()))?;
        let reply_queue = format!("{}.authority.{}", config.prefix, hex(&r));
        check_name(&reply_queue)?;
        let mut map = HashMap::new();
        for (name, key) in targets {
            let queue = config.target_queue(&name)?;
            map.insert(name, (queue, key));
        }
        Ok(AmqpTransport {
            shared: Arc::new(Shared {
                config,
                authority,
                reply_queue,
                targets: map,
                pending: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                link: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Connects and declares the topology now (the first delivery would).
    pub async fn connect(&self) -> Result<(), AmqpError> {
        self.shared.channel().await.map(drop)
    }

    /// This process's reply queue.
    pub fn reply_queue(&self) -> &str {
        &self.shared.reply_queue
    }
}

impl Shared {
    /// The live channel, connecting and declaring first if needed.
    async fn channel(self: &Arc<Self>) -> Result<Channel, AmqpError> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.conn.status().connected()
            && l.channel.status().connected()
            && !l.consumers.is_finished()
        {
            return Ok(l.channel.clone());
        }
        *link = None;
        let fresh = self.open().await;
        metrics::gauge!("netproc_propagation_broker_connected", "side" => "authority")
            .set(if fresh.is_ok() { 1.0 } else { 0.0 });
        let fresh = fresh?;
        let channel = fresh.channel.clone();
        *link = Some(fresh);
        Ok(channel)
    }

    async fn open(self: &Arc<Self>) -> Result<Link, AmqpError> {
        let c = &self.config;
        let conn = c.connect("netproc-authority").await?;
        let channel = conn.create_channel().await.map_err(broker)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker)?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                short(&c.replies_exchange()),
                lapin::ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        channel
            .exchange_declare(
                short(&c.dead_exchange()),
                lapin::ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        for (queue, _) in self.targets.values() {
            channel
                .queue_declare(
                    short(queue),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    queue_args(c),
                )
                .await
                .map_err(broker)?;
        }
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(short(&self.reply_queue), exclusive, FieldTable::default())
            .await
            .map_err(broker)?;
        channel
            .queue_bind(
                short(&self.reply_queue),
                short(&c.replies_exchange()),
                short(&self.reply_queue),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let dead_queue = format!("{}.dead", self.reply_queue);
        channel
            .queue_declare(short(&dead_queue), exclusive, FieldTable::default())
            .await
            .map_err(broker)?;
        channel
            .queue_bind(
                short(&dead_queue),
                short(&c.dead_exchange()),
                short(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let mut replies = channel
            .basic_consume(
                short(&self.reply_queue),
                short("replies"),
                no_ack,
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let mut dead = channel
            .basic_consume(
                short(&dead_queue),
                short("dead"),
                no_ack,
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let shared = Arc::clone(self);
        let consumers = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = replies.next() => match r {
                        Some(Ok(d)) => shared.on_reply(&d.data),
                        _ => break,
                    },
                    d = dead.next() => match d {
                        Some(Ok(d)) => shared.on_dead(&d.data),
                        _ => break,
                    },
                }
            }
            tracing::warn!(
                "the broker connection of the AMQP transport closed; reconnecting at the next delivery"
            );
            metrics::gauge!("netproc_propagation_broker_connected", "side" => "authority").set(0.0);
            shared.changed.notify_waiters();
        });
        tracing::info!(url = %c.display_url(), reply_queue = %self.reply_queue, targets = self.targets.len(), "connected to the broker");
        Ok(Link {
            conn,
            channel,
            consumers,
        })
    }

    /// A reply: checked (known request, same target, signature by that
    /// target's reply key over this authority and reply queue), then
    /// handed to the waiting delivery.
    fn on_reply(&self, data: &[u8]) {
        let refuse = |reason: &'static str| {
            metrics::counter!("netproc_propagation_amqp_replies_refused_total", "reason" => reason)
                .increment(1);
            tracing::warn!(
                reason,
                "refused a reply from the broker (unsigned, wrongly signed or mismatched)"
            );
        };
        let Some(reply) = decode_bounded::<AmqpReply>(data) else {
            return refuse("undecodable");
        };
        let Some((_, key)) = self.targets.get(&reply.target) else {
            return refuse("unknown_target");
        };
        let message = reply_message(
            &self.authority,
            &self.reply_queue,
            &reply.target,
            reply.correlation_id,
            &reply.outcome,
        );
        if !netproc_pki::verify_ed25519(key, &message, &reply.signature) {
            return refuse("bad_signature");
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.get(&reply.correlation_id) {
            Some((target, _)) if *target != reply.target => {
                drop(pending);
                return refuse("mismatched");
            }
            Some(_) => {
                if let Some((_, tx)) = pending.remove(&reply.correlation_id) {
                    let _ = tx.send(reply.outcome);
                }
            }
            // Late (the delivery gave up) or a duplicate: nothing waits.
            None => {}
        }
        drop(pending);
        self.changed.notify_waiters();
    }

    /// A request that expired unread in a target's queue.
    fn on_dead(&self, data: &[u8]) {
        if let Some(request) = decode_bounded::<AmqpRequest>(data)
            && request.reply_to == self.reply_queue
        {
            metrics::counter!("netproc_propagation_amqp_expired_total").increment(1);
            tracing::info!(target_name = %request.target, correlation_id = request.correlation_id, "a delivery expired unread in its queue; it is signed afresh and sent again");
        }
        self.changed.notify_waiters();
    }

    /// Waits until no request waits unread in `queue` (another
    /// publication would only queue behind it, and go stale).
    async fn wait_queue_empty(self: &Arc<Self>, queue: &str) -> Result<Channel, AmqpError> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let channel = self.channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let q = channel
                .queue_declare(short(queue), passive, FieldTable::default())
                .await
                .map_err(broker)?;
            if q.message_count() == 0 {
                return Ok(channel);
            }
            // A reply, an expiry, or a second later: ask again.
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    }
}

/// Forgets a correlation id when its delivery is dropped.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Transport for AmqpTransport {
    fn deliver<'a>(&'a self, delivery: Outgoing) -> BoxFuture<'a, Result<Vec<u8>, TransportError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let target = delivery.target;
            let Some((queue, _)) = shared.targets.get(&target) else {
                return Err(TransportError::UnknownTarget(target));
            };
            let failed = |e: AmqpError| TransportError::failed(target.clone(), e);
            let channel = shared.wait_queue_empty(queue).await.map_err(failed)?;
            let request = AmqpRequest {
                version: REQUEST_VERSION,
                format: delivery.format,
                authority: shared.authority,
                reply_to: shared.reply_queue.clone(),
                correlation_id: delivery.correlation_id,
                target: target.clone(),
                delivery: delivery.request,
            };
            let body = postcard::to_stdvec(&request).unwrap_or_default();
            let (tx, rx) = oneshot::channel();
            shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(delivery.correlation_id, (target.clone(), tx));
            let _guard = PendingGuard {
                shared,
                id: delivery.correlation_id,
            };
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_correlation_id(short(&delivery.correlation_id.to_string()))
                .with_reply_to(short(&shared.reply_queue));
            let confirm = channel
                .basic_publish(
                    short(""),
                    short(queue),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    props,
                )
                .await
                .map_err(|e| failed(broker(e)))?
                .await
                .map_err(|e| failed(broker(e)))?;
            match confirm {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(failed(AmqpError::Broker(format!(
                        "unroutable: no queue {queue}"
                    ))));
                }
                Confirmation::Nack(_) => {
                    return Err(failed(AmqpError::Broker(format!(
                        "the broker refused the message (queue {queue} full?)"
                    ))));
                }
                Confirmation::NotRequested => {
                    return Err(failed(AmqpError::Broker("no publisher confirm".into())));
                }
            }
            // Sent: now the signed reply, or the authority's timeout.
            match rx.await {
                Ok(AmqpOutcome::Reply(bytes)) => Ok(bytes),
                Ok(AmqpOutcome::Unsupported) => Err(TransportError::Unsupported { target }),
                Ok(AmqpOutcome::Failed(reason)) => Err(TransportError::failed(
                    target,
                    format!("the target could not handle the delivery: {reason}"),
                )),
                Err(_) => Err(TransportError::failed(target, "the transport closed")),
            }
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------
// The target's side.

/// A target's side of the broker transport: consumes its queue, applies
/// each request through the same [`PropagationTarget`] path as over mTLS
/// (committed before the message is acknowledged), and publishes a reply
/// signed with its reply key. One request at a time (prefetch 1: the
/// authority sends the next only after the reply).
pub struct AmqpReceiver {
    config: AmqpConfig,
    queue: String,
    target: Arc<PropagationTarget>,
    reply_key: netproc_pki::Ed25519Key,
}

impl std::fmt::Debug for AmqpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpReceiver")
            .field("config", &self.config)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpReceiver {
    /// The receiver of `target`, answering with `reply_key` (whose public
    /// half the authority lists for this target).
    pub fn new(
        config: AmqpConfig,
        target: Arc<PropagationTarget>,
        reply_key: netproc_pki::Ed25519Key,
    ) -> Result<AmqpReceiver, AmqpError> {
        let queue = config.target_queue(target.name())?;
        Ok(AmqpReceiver {
            config,
            queue,
            target,
            reply_key,
        })
    }

    /// Consumes until `shutdown` completes, reconnecting with backoff
    /// (100 ms doubling to 10 s) while the broker is away; the gauge
    /// `netproc_propagation_broker_connected{side="target"}` says which.
    /// On shutdown it stops consuming and finishes the request in hand.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        let connected =
            || metrics::gauge!("netproc_propagation_broker_connected", "side" => "target");
        connected().set(0.0);
        loop {
            let served = tokio::select! {
                () = &mut shutdown => return,
                r = self.connect() => r,
            };
            match served {
                Ok((conn, channel, consumer)) => {
                    connected().set(1.0);
                    backoff = Duration::from_millis(100);
                    tracing::info!(url = %self.config.display_url(), queue = %self.queue, "consuming credential deliveries from the broker");
                    let stop = self.consume(&channel, consumer, &mut shutdown).await;
                    connected().set(0.0);
                    let _ = conn.close(200, short("bye")).await;
                    if stop {
                        return;
                    }
                    tracing::warn!(queue = %self.queue, "the broker connection closed; reconnecting");
                }
                Err(e) => {
                    tracing::warn!(error = %e, url = %self.config.display_url(), retry_in_ms = backoff.as_millis() as u64, "cannot consume from the broker");
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel, lapin::Consumer), AmqpError> {
        let conn = self.config.connect("netproc-target").await?;
        let channel = conn.create_channel().await.map_err(broker)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker)?;
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(broker)?;
        // Passive: the authority declares it (and its arguments).
        channel
            .queue_declare(
                short(&self.queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        let consumer = channel
            .basic_consume(
                short(&self.queue),
                short("netproc-target"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
        Ok((conn, channel, consumer))
    }

    /// Handles deliveries until the connection ends (false) or shutdown
    /// (true).
    async fn consume(
        &self,
        channel: &Channel,
        mut consumer: lapin::Consumer,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.as_mut() => return true,
                d = consumer.next() => d,
            };
            let Some(Ok(message)) = next else {
                return false;
            };
            // Never interrupted by shutdown: the request in hand finishes.
            if let Err(e) = self.handle(channel, &message.data).await {
                tracing::warn!(error = %e, "cannot answer a delivery; the broker redelivers it");
                return false;
            }
            if let Err(e) = message.acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(error = %e, "cannot acknowledge a delivery");
                return false;
            }
        }
    }

    /// Applies one request and publishes the signed reply. Poison (an
    /// undecodable request) is counted and acknowledged away without one.
    async fn handle(&self, channel: &Channel, data: &[u8]) -> Result<(), AmqpError> {
        let poison = |reason: &'static str| {
            metrics::counter!("netproc_propagation_amqp_poison_total", "reason" => reason)
                .increment(1);
            tracing::warn!(
                reason,
                queue = %self.queue,
                "refused a message in the credential queue"
            );
        };
        let Some(request) = decode_bounded::<AmqpRequest>(data) else {
            poison("undecodable");
            return Ok(());
        };
        if check_name(&request.reply_to).is_err() {
            poison("bad_reply_to");
            return Ok(());
        }
        let outcome = match (request.version, Delivery::decode(&request.delivery)) {
            (REQUEST_VERSION, _) if request.format > crate::delivery::NEWEST_FORMAT => {
                AmqpOutcome::Unsupported
            }
            (REQUEST_VERSION, Ok(delivery)) => {
                let target = Arc::clone(&self.target);
                let with_epoch = request.format > 1;
                let applied = tokio::task::spawn_blocking(move || {
                    if with_epoch {
                        target.deliver_epoch(&delivery, SystemTime::now())
                    } else {
                        target.deliver(&delivery, SystemTime::now())
                    }
                })
                .await;
                match applied {
                    Ok(Ok(reply)) => AmqpOutcome::Reply(reply.encode()),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot apply a credential delivery");
                        AmqpOutcome::Failed("failed".into())
                    }
                    Err(_) => AmqpOutcome::Failed("failed".into()),
                }
            }
            (REQUEST_VERSION, Err(_)) => {
                poison("undecodable");
                AmqpOutcome::Failed("undecodable".into())
            }
            _ => AmqpOutcome::Unsupported,
        };
        let name = self.target.name();
        let message = reply_message(
            &request.authority,
            &request.reply_to,
            name,
            request.correlation_id,
            &outcome,
        );
        let reply = AmqpReply {
            correlation_id: request.correlation_id,
            target: name.to_owned(),
            signature: self.reply_key.sign(&message).to_vec(),
            outcome,
        };
        let body = postcard::to_stdvec(&reply).unwrap_or_default();
        // Not mandatory: an authority process that is gone has no queue,
        // and its successor probes afresh.
        let confirm = channel
            .basic_publish(
                short(&self.config.replies_exchange()),
                short(&request.reply_to),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_correlation_id(short(&request.correlation_id.to_string())),
            )
            .await
            .map_err(broker)?
            .await
            .map_err(broker)?;
        match confirm {
            Confirmation::Nack(_) => Err(AmqpError::Broker("the reply was refused".into())),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_are_checked_for_amqp() {
        let c = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.target_queue("s1").unwrap(), "netproc.target.s1");
        assert!(c.target_queue("").is_err());
        assert!(c.target_queue("a b").is_err());
        assert!(c.target_queue(&"x".repeat(250)).is_err());
        let mut amq = c.clone();
        amq.prefix = "amq.netproc".into();
        assert!(amq.target_queue("s1").is_err());
    }

    #[test]
    fn the_password_never_shows() {
        let c = AmqpConfig::new("amqps://svc:s3cret@broker:5671/%2f");
        assert_eq!(c.display_url(), "amqps://svc:***@broker:5671/%2f");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }

    #[test]
    fn a_reply_signature_binds_every_field() {
        let key = netproc_pki::Ed25519Key::generate().unwrap();
        let outcome = AmqpOutcome::Reply(vec![1, 2, 3]);
        let m = reply_message(&[7; 32], "p.authority.1", "s1", 9, &outcome);
        let sig = key.sign(&m);
        let pk = key.public_key();
        assert!(netproc_pki::verify_ed25519(&pk, &m, &sig));
        for other in [
            reply_message(&[8; 32], "p.authority.1", "s1", 9, &outcome),
            reply_message(&[7; 32], "p.authority.2", "s1", 9, &outcome),
            reply_message(&[7; 32], "p.authority.1", "s2", 9, &outcome),
            reply_message(&[7; 32], "p.authority.1", "s1", 10, &outcome),
            reply_message(
                &[7; 32],
                "p.authority.1",
                "s1",
                9,
                &AmqpOutcome::Reply(vec![1, 2]),
            ),
        ] {
            assert!(!netproc_pki::verify_ed25519(&pk, &other, &sig));
        }
    }

    proptest! {
        #[test]
        fn request_and_reply_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_bounded::<AmqpRequest>(&bytes);
            let _ = decode_bounded::<AmqpReply>(&bytes);
        }

        #[test]
        fn requests_round_trip(format in 1u8..4, id in any::<u64>(), delivery in proptest::collection::vec(any::<u8>(), 0..256)) {
            let r = AmqpRequest { version: 1, format, authority: [3; 32], reply_to: "p.authority.ab".into(), correlation_id: id, target: "s1".into(), delivery };
            let bytes = postcard::to_stdvec(&r).unwrap();
            prop_assert_eq!(decode_bounded::<AmqpRequest>(&bytes), Some(r));
            // Trailing bytes are refused.
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert_eq!(decode_bounded::<AmqpRequest>(&longer), None);
        }
    }
}
