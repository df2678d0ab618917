//! A fake nginx `auth_http` service (ngx_mail_auth_http_module's protocol) on 127.0.0.1:0: it
//! records every request (path and headers) and answers each with what the test's function
//! says, after an optional delay. Hand-written HTTP/1.1 over a `TcpStream`, with keep-alive, so
//! nothing of the client under test (hyper) is shared with the server that judges it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// One request as received.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// Every header field in order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl AuthRequest {
    /// The value of header `name` (any case); panics if it occurs more than once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        let mut found = self.headers.iter().filter(|(n, _)| *n == name);
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{name} twice in {self:?}");
        first
    }
}

/// The answer to one request: `200 OK` with these header fields, after `delay`.
#[derive(Clone, Debug, Default)]
pub struct AuthReply {
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
}

impl AuthReply {
    /// `Auth-Status: OK` naming `backend`.
    pub fn ok(backend: SocketAddr) -> AuthReply {
        AuthReply::default()
            .with("Auth-Status", "OK")
            .with("Auth-Server", &backend.ip().to_string())
            .with("Auth-Port", &backend.port().to_string())
    }

    /// `Auth-Status: OK` naming no backend (the router goes on with its other ways).
    pub fn ok_without_backend() -> AuthReply {
        AuthReply::default().with("Auth-Status", "OK")
    }

    /// A refusal: `Auth-Status: <text>`.
    pub fn refuse(text: &str) -> AuthReply {
        AuthReply::default().with("Auth-Status", text)
    }

    pub fn with(mut self, name: &str, value: &str) -> AuthReply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn after(mut self, delay: Duration) -> AuthReply {
        self.delay = delay;
        self
    }
}

type Answer = dyn Fn(&AuthRequest) -> AuthReply + Send + Sync;

/// The fake service; stops when dropped.
pub struct AuthHttp {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<AuthRequest>>>,
    connections: Arc<AtomicUsize>,
    tasks: JoinSet<()>,
}

impl AuthHttp {
    pub async fn start(answer: impl Fn(&AuthRequest) -> AuthReply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer: Arc<Answer> = Arc::new(answer);
        let mut tasks = JoinSet::new();
        let (r, c) = (requests.clone(), connections.clone());
        tasks.spawn(async move {
            let mut open = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (r, answer) = (r.clone(), answer.clone());
                open.spawn(async move {
                    let _ = serve(tcp, &r, &*answer).await;
                });
            }
        });
        AuthHttp {
            addr,
            requests,
            connections,
            tasks,
        }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<AuthRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for AuthHttp {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Requests on one connection until the client closes it.
async fn serve(
    tcp: TcpStream,
    requests: &Mutex<Vec<AuthRequest>>,
    answer: &Answer,
) -> std::io::Result<()> {
    let mut s = BufReader::new(tcp);
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        assert_eq!(parts.next(), Some("HTTP/1.1"), "request line {line:?}");
        let mut headers = Vec::new();
        loop {
            let mut field = String::new();
            if s.read_line(&mut field).await? == 0 {
                return Ok(());
            }
            let field = field.trim_end_matches(['\r', '\n']);
            if field.is_empty() {
                break;
            }
            let (name, value) = field
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header field {field:?}"));
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let request = AuthRequest {
            method,
            path,
            headers,
        };
        // A GET has no body; read one anyway if announced, so the next request parses.
        if let Some(length) = request
            .headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
        {
            let mut body = vec![0u8; length];
            s.read_exact(&mut body).await?;
        }
        requests.lock().unwrap().push(request.clone());
        let reply = answer(&request);
        tokio::time::sleep(reply.delay).await;
        let mut out = String::from("HTTP/1.1 200 OK\r\n");
        for (name, value) in &reply.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("Content-Length: 0\r\n\r\n");
        s.get_mut().write_all(out.as_bytes()).await?;
    }
}
