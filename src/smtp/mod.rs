//! SMTP support: sans-I/O codec, rewriters and the session driver.
//!
//! The pieces a session driver combines, in the order a session uses them:
//! - [`reply::ReplyReceiver`] frames backend replies (greeting, then one per command, in order).
//! - [`receiver::CommandReceiver`] frames client lines, one at a time, so the driver can switch
//!   modes between lines; [`command::Command::from_line`] types a command line and
//!   [`command::SaslResponse::from_line`] a line inside an AUTH exchange (a bare LF ending
//!   either, or a bare CR or NUL inside, makes it invalid).
//! - [`policy::decide`] is the gate: forward, answer locally, discard a BDAT chunk, or STARTTLS.
//! - [`canonical::encode`] writes every forwarded command anew from its parse (canonical verb,
//!   single spaces, within a limit every backend reads whole): a client's bytes never reach the
//!   backend as a command.
//! - [`cleartext::respond`] answers the cleartext dialogue of a `starttls` listener while no
//!   backend is connected (before TLS nothing reaches one).
//! - [`ehlo::rewrite_ehlo`] rewrites the backend's EHLO reply; [`ehlo::BackendCapabilities`]
//!   feeds the gate.
//! - After a backend 354, [`data::DataScanner`] streams the content and finds its end (and
//!   refuses smuggling); for BDAT, [`bdat::ChunkReader`] counts the chunk,
//!   [`bdat::ContentScanner`] refuses bare CR/LF across chunks, and
//!   [`bdat::first_chunk_command`] grows the first chunk by the Received field from
//!   [`received::received_header`].
//! - [`local_reply`] holds every reply mailfront writes itself.
//! - [`session::serve`] is the driver that runs all of the above over a client and a backend.

pub mod bdat;
pub mod canonical;
pub mod cleartext;
pub mod command;
pub mod data;
pub mod ehlo;
pub mod local_reply;
pub mod machine;
pub mod policy;
pub mod received;
pub mod receiver;
pub mod reply;
pub mod session;
pub mod xclient;
