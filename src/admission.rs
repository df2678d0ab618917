//! Admission: everything between an accepted socket and a served session, in one place. The
//! accept loop ([`crate::server`]) takes the listener's permit (`max_connections`) and hands the
//! socket to [`Admission::admit`]; what leaves here is a [`Session`] served by
//! [`crate::connection::serve_connection`], or a closed socket. In order:
//!
//! 1. The addresses are made canonical ([`canonical`]): an IPv4-mapped IPv6 address, which a
//!    dual-stack socket reports for an IPv4 peer, becomes the IPv4 address it stands for. This
//!    is the only place that happens; everything after it (`proxy_protocol_from`, both
//!    per-address limits, the close line, Received, PROXY v2, XCLIENT, IMAP ID) reads one form.
//! 2. Behind a load balancer (`proxy_protocol_from`), only the balancers may connect
//!    (Dovecot's `haproxy_trusted_networks` rule), and the PROXY header they send is read in the
//!    connection's own task; its source, made canonical in turn, is the client from then on.
//! 3. `limits.connections_per_ip`: this replica's count, then with `shared_state` the replicas'
//!    shared one. A refused client gets its protocol's refusal on a STARTTLS listener; on an
//!    implicit-TLS listener the socket just closes, before any handshake work.
//! 4. The session is served, counted in `mailfront_active_sessions`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Protocol, TlsMode};
use crate::connection::serve_connection;
use crate::limits::{AuthThrottle, PerIpLimiter};
use crate::metrics::ProxyHeaderResult;
use crate::proxy_header::{Header, HeaderError, HeaderReader};
use crate::session::{Admitted, ListenerContext, Session};

/// An address as every later reader sees it: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
/// RFC 4291 §2.5.5.2) is the IPv4 client it stands for, so an IPv4 client counts, matches and
/// is reported the same whether the listener is bound to `0.0.0.0` or to a dual-stack `[::]`.
/// Other IPv6 forms that embed an IPv4 address (NAT64, IPv4-compatible) stay IPv6 here: they are
/// the per-address limits' business ([`crate::limits::IpKey`]).
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// What turns an accepted connection into a session: the listener's settings in service, the
/// shared per-address tables and the shutdown signals.
#[derive(Clone)]
pub(crate) struct Admission {
    /// Replaced by the accept loop before each connection: a reload applies to the next one.
    pub(crate) context: Arc<ListenerContext>,
    pub(crate) per_ip: PerIpLimiter,
    pub(crate) auth_throttle: AuthThrottle,
    pub(crate) shutdown: CancellationToken,
    pub(crate) hard_stop: CancellationToken,
}

impl Admission {
    /// One accepted socket and its listener permit, held until the connection is done with
    /// (a refusal being written included, so refusals are bounded by `max_connections` like
    /// sessions are). Never waits: anything slow runs in a task of `tracker`.
    pub(crate) fn admit(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        tracker: &TaskTracker,
    ) {
        let context = &self.context;
        let peer = canonical(peer);
        // The address the client reached (for the PROXY header); the bound address if the
        // socket cannot say, which only differs for wildcard binds.
        let local = canonical(tcp.local_addr().unwrap_or(context.config.listen));
        if !context.config.proxy_protocol_from.is_empty() {
            // Only the balancers may connect, and their header names the client. Refused before
            // any read, so a stranger cannot claim an address.
            if !crate::cidr::any_contains(&context.config.proxy_protocol_from, peer.ip()) {
                context.metrics.proxy_header(ProxyHeaderResult::Untrusted);
                tracing::debug!(listener = %context.config.name, peer = %peer, "connection from outside proxy_protocol_from: closing");
                return;
            }
            // The header is read in the connection's own task: a slow balancer holds one
            // permit, never the accept loop.
            let admission = self.clone();
            tracker.spawn(async move {
                admission.after_proxy_header(tcp, peer, local).await;
                drop(permit);
            });
            return;
        }
        // Before any handshake: a refused address costs no TLS work (and, on an implicit-TLS
        // listener, no task).
        let session = self.session(peer, local, None);
        if session.is_none() && context.config.tls == TlsMode::Implicit {
            return;
        }
        let admission = self.clone();
        tracker.spawn(async move {
            match session {
                Some(session) => admission.serve(tcp, session).await,
                None => refuse_per_ip(tcp, &admission.context).await,
            }
            drop(permit);
        });
    }

    /// A session for `client`, or `None` when its address is at `limits.connections_per_ip`
    /// (counted and logged here; the caller closes or refuses).
    fn session(
        &self,
        client: SocketAddr,
        local: SocketAddr,
        via: Option<SocketAddr>,
    ) -> Option<Session> {
        let context = &self.context;
        let Some(per_ip_guard) = self.per_ip.try_acquire(client.ip()) else {
            context.metrics.refused_per_ip.inc();
            tracing::debug!(listener = %context.config.name, client = %client, limit = context.limits.connections_per_ip, "per-address limit of unauthenticated sessions reached: refusing");
            return None;
        };
        Some(Session::admitted(
            context.clone(),
            client,
            local,
            Admitted {
                via,
                hard_stop: self.hard_stop.clone(),
                // A child, so a session can never cancel the whole server's shutdown signal.
                draining: self.shutdown.child_token(),
                per_ip: Some(per_ip_guard),
                auth_throttle: Some(self.auth_throttle.clone()),
            },
        ))
    }

    /// With `shared_state`, the replicas' shared count of unauthenticated sessions on a session
    /// the local count admitted (one bounded round trip, in the session's own task, never the
    /// accept loop's). `false`: the address is at its limit across replicas (counted and
    /// logged here; the caller refuses); with the store down, `true`.
    async fn shared_admit(&self, session: &mut Session) -> bool {
        let Some(guard) = session.per_ip_mut() else {
            return true;
        };
        if guard.share().await {
            return true;
        }
        let context = &self.context;
        context.metrics.refused_per_ip.inc();
        tracing::debug!(listener = %context.config.name, client = %session.client_addr(), limit = context.limits.connections_per_ip, "per-address limit of unauthenticated sessions reached across replicas: refusing");
        false
    }

    /// A connection from a trusted balancer: reads its PROXY header, then serves the client it
    /// names, whose address from then on is the session's everywhere (limits included).
    async fn after_proxy_header(&self, mut tcp: TcpStream, peer: SocketAddr, local: SocketAddr) {
        let context = &self.context;
        // `tls.handshake_timeout` bounds the header too: it delays the handshake.
        let timeout = context.handshaker.timeout();
        // Nothing is served yet: a graceful shutdown closes the connection at once.
        let header = tokio::select! {
            header = read_proxy_header(&mut tcp, timeout) => header,
            () = self.shutdown.cancelled() => return,
        };
        let (client, local) = match header {
            Ok(Header::Proxy {
                source,
                destination,
            }) => {
                context.metrics.proxy_header(ProxyHeaderResult::Proxy);
                (source, destination)
            }
            Ok(Header::Unknown) => {
                // §2.1/§2.2: the receiver then uses the connection's own endpoints.
                context.metrics.proxy_header(ProxyHeaderResult::Unknown);
                tracing::debug!(listener = %context.config.name, peer = %peer, "PROXY header without addresses: serving the balancer's own address");
                (peer, local)
            }
            Ok(Header::Local) => {
                // A balancer's health check (v2 LOCAL): nothing to serve, nothing to log.
                context.metrics.proxy_header(ProxyHeaderResult::Local);
                return;
            }
            Err(e) => {
                context.metrics.proxy_header(e.result());
                tracing::info!(listener = %context.config.name, peer = %peer, error = %e, "PROXY protocol header refused: closing");
                return;
            }
        };
        let (client, local) = (canonical(client), canonical(local));
        match self.session(client, local, Some(peer)) {
            Some(session) => self.serve(tcp, session).await,
            None => refuse_per_ip(tcp, context).await,
        }
    }

    /// A session the local count admitted: the shared count next, then the session itself.
    async fn serve(&self, tcp: TcpStream, mut session: Session) {
        if !self.shared_admit(&mut session).await {
            drop(session);
            refuse_per_ip(tcp, &self.context).await;
            return;
        }
        let active = self.context.metrics.active.clone();
        active.inc();
        serve_connection(tcp, session).await;
        active.dec();
    }
}

/// Writing the one refusal line: it fits any socket buffer, so only a peer that is gone or
/// hostile makes this wait at all.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes a connection whose address is at `limits.connections_per_ip`. On a STARTTLS listener
/// the protocol's refusal goes out in cleartext first, in place of the greeting, so a real client
/// reports "try again later" instead of a broken connection. On an implicit-TLS listener the
/// socket just closes: answering would need the TLS handshake, and the limit exists so that a
/// flood from one address costs no handshake CPU.
async fn refuse_per_ip(mut tcp: TcpStream, listener: &ListenerContext) {
    if listener.config.tls == TlsMode::Starttls {
        let refusal = match listener.config.protocol {
            Protocol::Smtp => crate::smtp::local_reply::too_many_connections(&listener.hostname),
            Protocol::Imap => crate::imap::reply::bye_too_many_connections(),
            Protocol::Pop3 => crate::pop3::reply::err_too_many_connections(),
        };
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            tcp.write_all(&refusal).await?;
            tcp.shutdown().await
        })
        .await;
    }
}

/// Why a load balancer's PROXY header was not accepted.
#[derive(Debug, thiserror::Error)]
enum ProxyHeaderFailure {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY protocol header: {0}")]
    Io(std::io::Error),
}

impl ProxyHeaderFailure {
    fn result(&self) -> ProxyHeaderResult {
        match self {
            ProxyHeaderFailure::Header(HeaderError::Missing) => ProxyHeaderResult::Missing,
            ProxyHeaderFailure::Header(HeaderError::Malformed(_)) | ProxyHeaderFailure::Io(_) => {
                ProxyHeaderResult::Malformed
            }
            ProxyHeaderFailure::Header(HeaderError::TooLong(_)) => ProxyHeaderResult::TooLong,
            ProxyHeaderFailure::Timeout(_) => ProxyHeaderResult::Timeout,
        }
    }
}

/// Reads a load balancer's PROXY header (`proxy_protocol_from`) within `timeout`
/// (`tls.handshake_timeout`: the header comes before the handshake it delays). Reads only
/// what [`HeaderReader::wanted`] allows, so every octet after the header (the TLS ClientHello,
/// or the client's first command) is left in the socket for the session.
async fn read_proxy_header<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> Result<Header, ProxyHeaderFailure> {
    let mut reader = HeaderReader::new();
    let read = async {
        let mut buf = [0u8; 512];
        loop {
            let want = reader.wanted().min(buf.len());
            let Some(slot) = buf.get_mut(..want) else {
                return Err(ProxyHeaderFailure::Header(reader.closed_early()));
            };
            let n = match io.read(slot).await {
                Ok(0) => return Err(ProxyHeaderFailure::Header(reader.closed_early())),
                Ok(n) => n,
                Err(e) => return Err(ProxyHeaderFailure::Io(e)),
            };
            let (_, result) = reader.feed(buf.get(..n).unwrap_or_default());
            if let Some(header) = result? {
                return Ok(header);
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(ProxyHeaderFailure::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::Network;
    use crate::limits::IpKey;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_mapped_address_is_admitted_as_its_ipv4_address() {
        let admitted = canonical(addr("[::ffff:192.0.2.7]:40000"));
        assert_eq!(admitted, addr("192.0.2.7:40000"));
        // Matched by an IPv4 `proxy_protocol_from`, counted as the IPv4 client in both
        // per-address limits.
        let balancers = [Network::parse("192.0.2.0/24").unwrap()];
        assert!(crate::cidr::any_contains(&balancers, admitted.ip()));
        assert_eq!(
            IpKey::of(admitted.ip()),
            IpKey::V4("192.0.2.7".parse().unwrap())
        );
        let limiter = PerIpLimiter::new(1);
        let _held = limiter.try_acquire(admitted.ip()).unwrap();
        assert!(limiter.try_acquire(addr("192.0.2.7:1").ip()).is_none());
        let throttle = AuthThrottle::new(1, Duration::from_secs(60));
        let _charge = throttle.try_charge(admitted.ip()).unwrap();
        assert!(throttle.throttled(addr("192.0.2.7:1").ip()));
    }

    #[test]
    fn every_other_address_is_admitted_as_it_came() {
        for s in [
            "192.0.2.7:1",
            "[2001:db8::7]:1",
            // IPv4-compatible (deprecated) and NAT64 forms are ordinary IPv6 here; the limits
            // key NAT64 by the IPv4 address it embeds.
            "[::192.0.2.7]:1",
            "[64:ff9b::192.0.2.7]:1",
            "[::1]:1",
        ] {
            assert_eq!(canonical(addr(s)), addr(s), "{s}");
        }
    }
}
