//! The proxy run in-process on port 0, and the YAML that configures it.

use std::net::SocketAddr;
use std::path::Path;

use mailfront::server::{self, Control, Server};

use super::TIMEOUT;
use super::fake_backend::{FakeBackend, FakeKind, PROXY_HOSTNAME};
use super::pki::{IssuedCert, Pki};

/// A proxy running in-process.
pub struct Proxy {
    pub addresses: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub control: Control,
    pub metrics: mailfront::metrics::Metrics,
    handle: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts the proxy from YAML (listen addresses should use port 0).
    pub async fn start(yaml: &str, base: &Path) -> Proxy {
        let config = mailfront::config::Config::from_yaml(yaml)
            .unwrap()
            .validate(base)
            .unwrap();
        let registry = prometheus::Registry::new();
        let server = Server::new(config.clone(), &registry).unwrap();
        let metrics = server.metrics().clone();
        let bound = server::bind(&config).await.unwrap();
        let addresses = bound.addresses();
        let admin = bound.admin_address();
        let control = Control::default();
        let c = control.clone();
        let handle = tokio::spawn(async move {
            server.run(bound, c).await.unwrap();
        });
        Proxy {
            addresses,
            admin,
            control,
            metrics,
            handle,
        }
    }

    /// Starts the proxy from a config file that it then watches (SIGHUP: `reload`).
    pub async fn start_file(path: &Path) -> Proxy {
        let (config, hash) = mailfront::config::load_hashed(Some(path)).unwrap();
        let registry = prometheus::Registry::new();
        let server = Server::new(config.clone(), &registry)
            .unwrap()
            .with_source(Some(path.to_owned()), hash);
        Self::run(server, &config).await
    }

    /// As [`Proxy::start_file`], with a logger whose level a reload may change.
    pub async fn start_file_with_log(
        path: &Path,
        log: std::sync::Arc<dyn mailfront::logging::LogControl>,
    ) -> Proxy {
        let (config, hash) = mailfront::config::load_hashed(Some(path)).unwrap();
        let registry = prometheus::Registry::new();
        let server = Server::new(config.clone(), &registry)
            .unwrap()
            .with_source(Some(path.to_owned()), hash)
            .with_log(log);
        Self::run(server, &config).await
    }

    async fn run(server: Server, config: &mailfront::config::RuntimeConfig) -> Proxy {
        let metrics = server.metrics().clone();
        let bound = server::bind(config).await.unwrap();
        let addresses = bound.addresses();
        let admin = bound.admin_address();
        let control = Control::default();
        let c = control.clone();
        let handle = tokio::spawn(async move {
            server.run(bound, c).await.unwrap();
        });
        Proxy {
            addresses,
            admin,
            control,
            metrics,
            handle,
        }
    }

    /// Asks for a reload (as SIGHUP does) and returns its report; the listeners' addresses are
    /// updated from it.
    pub async fn reload(&mut self) -> std::sync::Arc<server::ReloadReport> {
        let mut reports = self.control.reloads();
        reports.borrow_and_update();
        self.control.reload.notify_one();
        tokio::time::timeout(TIMEOUT, reports.changed())
            .await
            .unwrap()
            .unwrap();
        let report = reports.borrow().clone().unwrap();
        if let server::ReloadReport::Applied { addresses, .. } = &*report {
            self.addresses = addresses.clone();
        }
        report
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addresses
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    /// A graceful shutdown, waited for: it must finish within [`TIMEOUT`]. A test that still
    /// holds an authenticated session drops it first, or the drain waits out
    /// `timeouts.shutdown_grace` (30 s by default) and this fails instead of hiding the wait.
    pub async fn stop(mut self) {
        self.control.shutdown.cancel();
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async {}));
        tokio::time::timeout(TIMEOUT, handle)
            .await
            .expect("the proxy did not stop within TIMEOUT: a session still open?")
            .unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.control.shutdown.cancel();
    }
}

/// YAML for one listener.
pub fn listener_yaml(name: &str, protocol: &str, tls: &str, backend: SocketAddr) -> String {
    format!(
        "  - name: {name}\n    protocol: {protocol}\n    listen: \"127.0.0.1:0\"\n    tls: {tls}\n    backend: \"{backend}\"\n"
    )
}

/// A full config with the given certificates and listeners.
pub fn config_yaml(certs: &[&IssuedCert], listeners: &[String], extra: &str) -> String {
    let mut yaml = format!("hostname: {PROXY_HOSTNAME}\ntls:\n  certificates:\n");
    if certs.is_empty() {
        yaml = format!("hostname: {PROXY_HOSTNAME}\ntls:\n  certificates: []\n");
    }
    for c in certs {
        yaml.push_str(&format!(
            "    - cert: {}\n      key: {}\n",
            c.cert.display(),
            c.key.display()
        ));
    }
    yaml.push_str("  reload_interval: 100ms\nlisteners:\n");
    for l in listeners {
        yaml.push_str(l);
    }
    yaml.push_str("metrics:\n  listen: \"127.0.0.1:0\"\n");
    yaml.push_str(extra);
    yaml
}

/// The most common setup: a test CA with one certificate for mx.example.test, a fake backend,
/// and the proxy with one implicit-TLS listener in front of it.
pub struct OneListener {
    pub pki: Pki,
    pub cert: IssuedCert,
    pub backend: FakeBackend,
    pub proxy: Proxy,
}

pub async fn one_listener(kind: FakeKind, name: &str, protocol: &str) -> OneListener {
    let pki = Pki::new();
    let cert = pki.issue("mx", &["mx.example.test"], false);
    let backend = FakeBackend::start(kind).await;
    let yaml = config_yaml(
        &[&cert],
        &[listener_yaml(name, protocol, "implicit", backend.addr)],
        "",
    );
    let proxy = Proxy::start(&yaml, pki.dir.path()).await;
    OneListener {
        pki,
        cert,
        backend,
        proxy,
    }
}
