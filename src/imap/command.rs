//! PLACEHOLDER (replaced by the real receiver at merge): compile-only stub of the contract.
#![allow(dead_code, unused_variables)]
use crate::imap::codec::Step;
use crate::imap::id::IdCommand;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub line: usize,
    pub literal: usize,
    pub command: usize,
    pub sasl_line: usize,
}
impl Default for Limits {
    fn default() -> Self {
        Limits { line: 8192, literal: 65536, command: 73728, sasl_line: 12288 }
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    Login { username: Vec<u8>, password: Vec<u8> },
    Authenticate { mechanism: Vec<u8>, initial_response: Option<Vec<u8>> },
    Id(IdCommand),
    Other { name: Vec<u8> },
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("x")]
    LineTooLong { limit: usize },
    #[error("x")]
    LiteralTooBig { size: u64, limit: usize },
    #[error("x")]
    CommandTooLong { limit: usize },
    #[error("x")]
    InvalidTag,
    #[error("x")]
    InvalidCommandName,
    #[error("x")]
    ForbiddenOctet,
    #[error("x")]
    MalformedLiteral,
    #[error("x")]
    Syntax,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub tag: Option<Vec<u8>>,
    pub error: CommandError,
    pub fatal: bool,
}
impl Rejection {
    pub fn reply(&self) -> Vec<u8> {
        Vec::new()
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslLine {
    Cancel,
    Response(Vec<u8>),
    Invalid,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    LiteralRequested { tag: Vec<u8>, name: Vec<u8>, size: usize },
    Command { tag: Vec<u8>, command: Command },
    Sasl(SaslLine),
    Rejected(Rejection),
}
#[derive(Debug, Clone)]
pub struct CommandReceiver {}
impl CommandReceiver {
    pub fn new(limits: Limits) -> Self {
        CommandReceiver {}
    }
    pub fn next(&mut self, buf: &[u8]) -> Step<Event> {
        Step { consumed: 0, event: None }
    }
    pub fn accept_literal(&mut self) {}
    pub fn refuse_literal(&mut self) {}
    pub fn awaits_literal_decision(&self) -> bool {
        false
    }
    pub fn begin_sasl(&mut self) {}
    pub fn end_sasl(&mut self) {}
    pub fn in_sasl(&self) -> bool {
        false
    }
    pub fn is_idle(&self) -> bool {
        true
    }
}
pub fn encode(tag: &[u8], command: &Command, literal_plus: bool) -> Option<Vec<Vec<u8>>> {
    None
}
pub fn encode_sasl(line: &SaslLine) -> Vec<u8> {
    Vec::new()
}
