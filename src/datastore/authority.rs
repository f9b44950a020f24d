//! A relay in front of the listeners that makes etcd's Go clients acceptable to h2.
//!
//! etcd's Go client (the one in kube-apiserver and etcdctl) sends the socket path, e.g.
//! `/var/lib/kdist/run/datastore.sock`, as the HTTP/2 `:authority` of requests on a
//! unix socket, and `http://127.0.0.1:2379` (with the scheme) on TCP. Neither is a valid
//! authority, and h2 — the HTTP/2 server under tonic — resets such streams with
//! PROTOCOL_ERROR. So each connection is relayed: frames
//! from the client are decoded, an invalid `:authority` becomes `localhost`, and the
//! frames are re-encoded to the server over an in-memory pipe; the other direction is
//! copied as bytes. TLS connections are decrypted first and relayed the same way.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use h2::Codec;
use h2::frame::{BytesStr, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const PREFACE_LEN: usize = 24;
const PIPE_BYTES: usize = 256 * 1024;
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The server end of one relayed connection.
pub(crate) struct Relayed(DuplexStream);

impl AsyncRead for Relayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Relayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Relayed {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// A listener whose connections get relayed.
pub(crate) enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
    /// TCP with a TLS handshake before the relay.
    Tls(TcpListener, TlsAcceptor),
}

enum AnyStream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(TcpStream, TlsAcceptor),
}

impl AnyListener {
    async fn accept(&self) -> io::Result<AnyStream> {
        match self {
            AnyListener::Unix(l) => l.accept().await.map(|(s, _)| AnyStream::Unix(s)),
            AnyListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                AnyStream::Tcp(s)
            }),
            AnyListener::Tls(l, acceptor) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                AnyStream::Tls(s, acceptor.clone())
            }),
        }
    }
}

/// Accepts on `listener` until `shutdown`, yielding relayed connections to serve.
pub(crate) fn incoming(
    listener: AnyListener,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Relayed>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "datastore: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (server_end, relay_end) = tokio::io::duplex(PIPE_BYTES);
            match stream {
                AnyStream::Unix(s) => tokio::spawn(relay(s, relay_end)),
                AnyStream::Tcp(s) => tokio::spawn(relay(s, relay_end)),
                // the handshake runs in the connection's task, never in the accept loop
                AnyStream::Tls(s, acceptor) => tokio::spawn(async move {
                    let peer = s.peer_addr().ok();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s)).await {
                        Ok(Ok(tls)) => relay(tls, relay_end).await,
                        // dropping relay_end ends the connection on the server side too
                        Ok(Err(err)) => {
                            tracing::info!(?peer, error = %err, "datastore: TLS handshake refused");
                        }
                        Err(_) => tracing::info!(?peer, "datastore: TLS handshake timed out"),
                    }
                }),
            };
            if tx.send(Ok(Relayed(server_end))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn relay<S>(client: S, inner: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut inner_read, mut inner_write) = tokio::io::split(inner);
    let down = async move {
        let _ = tokio::io::copy(&mut inner_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    let up = async move {
        let mut preface = [0u8; PREFACE_LEN];
        if let Err(err) = client_read.read_exact(&mut preface).await {
            let _ = inner_write.shutdown().await;
            return Err(err);
        }
        inner_write.write_all(&preface).await?;
        let mut reader: Codec<_, Bytes> =
            Codec::new(tokio::io::join(client_read, tokio::io::sink()));
        let mut writer: Codec<_, Bytes> =
            Codec::new(tokio::io::join(tokio::io::empty(), inner_write));
        let result = forward(&mut reader, &mut writer).await;
        // However the client went away, the server must see the end of its input, or
        // it keeps the connection (and graceful shutdown waits for it) forever.
        let _ = SinkExt::flush(&mut writer).await;
        let _ = writer.get_mut().writer_mut().shutdown().await;
        result
    };
    let (up, ()) = tokio::join!(up, down);
    if let Err(err) = up {
        tracing::debug!(error = %err, "datastore: connection ended");
    }
}

fn recv_err(e: impl std::fmt::Debug) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

fn send_err(e: h2::SendError) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

fn fix_authority(mut frame: Frame) -> Frame {
    if let Frame::Headers(headers) = &mut frame {
        let pseudo = headers.pseudo_mut();
        let invalid = pseudo
            .authority
            .as_ref()
            .is_some_and(|a| tonic::codegen::http::uri::Authority::try_from(a.as_ref()).is_err());
        if invalid {
            pseudo.authority = BytesStr::try_from(Bytes::from_static(b"localhost")).ok();
        }
    }
    frame
}

async fn forward<R, W>(reader: &mut Codec<R, Bytes>, writer: &mut Codec<W, Bytes>) -> io::Result<()>
where
    R: AsyncRead + AsyncWrite + Unpin,
    W: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(frame) = reader.next().await {
        writer
            .feed(fix_authority(frame.map_err(recv_err)?))
            .await
            .map_err(send_err)?;
        // Pass on whatever else already arrived before waking the server.
        while let Some(Some(frame)) = reader.next().now_or_never() {
            writer
                .feed(fix_authority(frame.map_err(recv_err)?))
                .await
                .map_err(send_err)?;
        }
        SinkExt::flush(writer).await.map_err(send_err)?;
    }
    Ok(())
}
