//! The one bound every byte stream in a session satisfies: the client's socket (or, in tests,
//! one end of [`tokio::io::duplex`]) and the backend connection alike. Naming it once keeps the
//! drivers generic over the transport, so they run over an in-memory pipe with paused time as
//! readily as over TCP.

use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional async byte stream that can move between tasks.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}
