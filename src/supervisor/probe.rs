//! Readiness probes: HTTP(S) GET, TCP connect, unix socket connect, or a command.

use std::time::Duration;

use super::error::ProbeError;
use super::service::Probe;

/// A probe with whatever it needs prepared once (an HTTP client with its TLS material).
pub struct Prober {
    probe: Probe,
    http: Option<reqwest::Client>,
    /// Modification times of the TLS files the client was built from: a renewed
    /// certificate is picked up at the next check.
    tls_stamp: Vec<Option<std::time::SystemTime>>,
    timeout: Duration,
}

impl Prober {
    /// Prepares `probe`. TLS material that cannot be read is reported at each check, so
    /// a service whose certificates appear later still becomes ready.
    pub fn new(probe: Probe, timeout: Duration) -> Self {
        Self {
            probe,
            http: None,
            tls_stamp: Vec::new(),
            timeout,
        }
    }

    /// The client for an HTTP probe with this TLS material, built again when a file changed.
    fn http_client(
        &mut self,
        ca: &Option<String>,
        cert: &Option<String>,
        key: &Option<String>,
        insecure: bool,
    ) -> Result<reqwest::Client, ProbeError> {
        let stamp: Vec<_> = [ca, cert, key]
            .into_iter()
            .map(|f| {
                f.as_ref()
                    .and_then(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            })
            .collect();
        if let Some(client) = &self.http
            && stamp == self.tls_stamp
        {
            return Ok(client.clone());
        }
        self.tls_stamp = stamp;
        let mut builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .no_proxy()
            .pool_max_idle_per_host(1)
            .tls_danger_accept_invalid_certs(insecure);
        let read = |what: &'static str, path: &String| {
            std::fs::read(path).map_err(|source| ProbeError::ReadTls {
                what,
                path: path.clone(),
                source,
            })
        };
        let unusable = |what: &'static str, path: &String| {
            let path = path.clone();
            move |source| ProbeError::BadTls { what, path, source }
        };
        if let Some(ca) = ca {
            let pem = read("CA", ca)?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(unusable("CA", ca))?;
            builder = builder.add_root_certificate(cert);
        }
        if let (Some(cert), Some(key)) = (cert, key) {
            let mut pem = read("cert", cert)?;
            pem.extend(read("key", key)?);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(unusable("client cert", cert))?;
            builder = builder.identity(identity);
        }
        let client = builder.build().map_err(ProbeError::Client)?;
        self.http = Some(client.clone());
        Ok(client)
    }

    /// Runs the probe once. The error is a short reason for `kdist status`.
    pub async fn check(&mut self) -> Result<(), ProbeError> {
        let timeout = self.timeout;
        match self.probe.clone() {
            Probe::Http {
                url,
                ca,
                cert,
                key,
                insecure,
            } => {
                let client = self.http_client(&ca, &cert, &key, insecure)?;
                let response = client.get(&url).send().await.map_err(|source| {
                    // the TLS material may have been rotated: rebuild next time
                    self.http = None;
                    ProbeError::Get {
                        url: url.clone(),
                        source,
                    }
                })?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(ProbeError::Status {
                        url,
                        status: response.status().to_string(),
                    })
                }
            }
            Probe::Tcp { address } => {
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address))
                    .await
                    .map_err(|_| ProbeError::ConnectTimeout {
                        address: address.clone(),
                    })?
                    .map(drop)
                    .map_err(|source| ProbeError::Connect { address, source })
            }
            Probe::Unix { path } => {
                tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                    .await
                    .map_err(|_| ProbeError::ConnectTimeout {
                        address: path.clone(),
                    })?
                    .map(drop)
                    .map_err(|source| ProbeError::Connect {
                        address: path,
                        source,
                    })
            }
            Probe::Command { argv } => {
                let (program, args) = argv.split_first().ok_or(ProbeError::EmptyCommand)?;
                let mut command = tokio::process::Command::new(program);
                command
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true);
                let status = tokio::time::timeout(timeout, command.status())
                    .await
                    .map_err(|_| ProbeError::CommandTimeout {
                        program: program.clone(),
                    })?
                    .map_err(|source| ProbeError::Command {
                        program: program.clone(),
                        source,
                    })?;
                if status.success() {
                    Ok(())
                } else {
                    Err(ProbeError::CommandFailed {
                        program: program.clone(),
                        status: status.to_string(),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prober(probe: Probe) -> Prober {
        Prober::new(probe, Duration::from_secs(2))
    }

    #[tokio::test]
    async fn tcp_probe_follows_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mut p = prober(Probe::Tcp {
            address: address.clone(),
        });
        assert!(p.check().await.is_ok());
        drop(listener);
        let err = crate::report::error_chain(&p.check().await.unwrap_err());
        assert!(err.contains(&address) && err.contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn command_probe_uses_exit_status() {
        assert!(
            prober(Probe::Command {
                argv: vec!["true".into()]
            })
            .check()
            .await
            .is_ok()
        );
        assert!(
            prober(Probe::Command {
                argv: vec!["false".into()]
            })
            .check()
            .await
            .is_err()
        );
    }

    #[tokio::test]
    async fn http_probe_needs_2xx() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let mut p = prober(Probe::Http {
            url: format!("http://127.0.0.1:{port}/health"),
            ca: None,
            cert: None,
            key: None,
            insecure: false,
        });
        assert!(p.check().await.is_ok());
        assert!(p.check().await.unwrap_err().to_string().contains("503"));
    }
}
