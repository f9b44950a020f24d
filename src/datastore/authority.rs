//! Makes etcd's Go clients acceptable to h2.
//!
//! etcd's Go client (the one in kube-apiserver and etcdctl) sends the socket path, e.g.
//! `/var/lib/kdist/run/datastore.sock`, as the HTTP/2 `:authority` of requests on a
//! unix socket, and `http://127.0.0.1:2379` (with the scheme) on TCP. Neither is a valid
//! authority, and h2 — the HTTP/2 server under tonic — resets such streams with
//! PROTOCOL_ERROR. So what the server reads from a connection is rewritten as it is
//! read: frames from the client are decoded, an invalid `:authority` becomes
//! `localhost`, and the frames are re-encoded into the server's read buffer. The server
//! writes straight to the socket. No extra task or pipe sits between client and server:
//! each hop of that kind cost a task wake-up per request and per response. TLS
//! connections are decrypted first (the handshake runs on the connection's own task) and
//! rewritten the same way.
//!
//! h2 refusing such authorities is hyperium/h2#442 (closed; the fix proposed in
//! hyperium/h2#487 is not merged). The frame codec used here is h2's `unstable` API
//! (`Codec`, `frame::Headers::pseudo_mut`, `BytesStr`; exposed "for testing" in
//! hyperium/h2#49, no semver promise), which is why Cargo.toml pins h2 exactly. The
//! tests below include one that fails once h2 accepts the Go client's authority by
//! itself, the moment to drop this module.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use h2::Codec;
use h2::frame::{BytesStr, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Empty, Join, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const PREFACE_LEN: usize = 24;
/// Frames re-encoded for one read of the server at most; keeps the buffer bounded.
const FRAMES_PER_READ: usize = 32;
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client connection as the server sees it: reads rewritten, writes passed through.
pub(crate) struct Rewritten {
    /// The connection preface, handed to the server before any frame.
    preface: Option<([u8; PREFACE_LEN], usize)>,
    /// Decodes the client's frames; owns the socket, which writes go to directly.
    reader: Codec<AnyStream, Bytes>,
    /// Re-encodes frames into a buffer (never touches the socket).
    encoder: Codec<Join<Empty, Vec<u8>>, Bytes>,
    /// Re-encoded bytes not yet read by the server, from `pos`.
    pending: Vec<u8>,
    pos: usize,
    /// An error from the client side to report once `pending` is drained.
    error: Option<io::Error>,
}

impl Rewritten {
    fn new(stream: AnyStream, preface: [u8; PREFACE_LEN]) -> Self {
        Rewritten {
            preface: Some((preface, 0)),
            reader: Codec::new(stream),
            encoder: Codec::new(tokio::io::join(tokio::io::empty(), Vec::new())),
            pending: Vec::new(),
            pos: 0,
            error: None,
        }
    }

    /// Moves re-encoded bytes into `buf`; false when there are none.
    fn drain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.pos >= self.pending.len() {
            return false;
        }
        let n = buf.remaining().min(self.pending.len() - self.pos);
        buf.put_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        true
    }

    fn encode(&mut self, frame: Frame, cx: &mut Context<'_>) -> io::Result<()> {
        // The encoder writes into a Vec, so it is never pending.
        match self.encoder.poll_ready(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => return Err(io::Error::other("frame encoder is not ready")),
        }
        self.encoder
            .buffer(fix_authority(frame))
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    fn take_encoded(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.encoder.flush(cx) {
            Poll::Ready(r) => r?,
            Poll::Pending => return Err(io::Error::other("frame encoder did not flush")),
        }
        self.pending.clear();
        self.pos = 0;
        std::mem::swap(&mut self.pending, self.encoder.get_mut().writer_mut());
        Ok(())
    }
}

impl AsyncRead for Rewritten {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((preface, sent)) = &mut this.preface {
            let n = buf.remaining().min(PREFACE_LEN - *sent);
            buf.put_slice(&preface[*sent..*sent + n]);
            *sent += n;
            if *sent == PREFACE_LEN {
                this.preface = None;
            }
            return Poll::Ready(Ok(()));
        }
        if this.drain(buf) {
            return Poll::Ready(Ok(()));
        }
        if let Some(err) = this.error.take() {
            return Poll::Ready(Err(err));
        }
        // Everything that already arrived goes to the server in one read.
        let mut encoded = 0usize;
        while encoded < FRAMES_PER_READ {
            match Pin::new(&mut this.reader).poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    encoded += 1;
                    if let Err(err) = this.encode(frame, cx) {
                        this.error = Some(err);
                        break;
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    this.error = Some(io::Error::other(format!("{err:?}")));
                    break;
                }
                Poll::Ready(None) => break,
                Poll::Pending if encoded == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if encoded > 0 {
            this.take_encoded(cx)?;
        }
        if this.drain(buf) {
            return Poll::Ready(Ok(()));
        }
        if let Some(err) = this.error.take() {
            return Poll::Ready(Err(err));
        }
        // End of input: the server sees a read of zero bytes.
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewritten {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.reader.get_mut()).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.reader.get_mut()).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.reader.get_ref().is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.reader.get_mut()).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.reader.get_mut()).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Rewritten {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// A listener whose connections get their `:authority` rewritten.
pub(crate) enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
    /// TCP with a TLS handshake first.
    Tls(TcpListener, TlsAcceptor),
}

enum AnyStream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, before any byte of it is read.
enum Accepted {
    Plain(AnyStream),
    Tls(TcpStream, TlsAcceptor),
}

impl Accepted {
    /// The connection ready for HTTP/2; None when its TLS handshake failed or timed out.
    async fn open(self) -> Option<AnyStream> {
        let (tcp, acceptor) = match self {
            Accepted::Plain(stream) => return Some(stream),
            Accepted::Tls(tcp, acceptor) => (tcp, acceptor),
        };
        let peer = tcp.peer_addr().ok();
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Some(AnyStream::Tls(Box::new(tls))),
            Ok(Err(err)) => {
                tracing::info!(?peer, error = %err, "datastore: TLS handshake refused");
                None
            }
            Err(_) => {
                tracing::info!(?peer, "datastore: TLS handshake timed out");
                None
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match Pin::get_mut($self) {
            AnyStream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            AnyStream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            AnyStream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for AnyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for AnyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            AnyStream::Unix(s) => s.is_write_vectored(),
            AnyStream::Tcp(s) => s.is_write_vectored(),
            AnyStream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl AnyListener {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            AnyListener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| Accepted::Plain(AnyStream::Unix(s))),
            AnyListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Accepted::Plain(AnyStream::Tcp(s))
            }),
            AnyListener::Tls(l, acceptor) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Accepted::Tls(s, acceptor.clone())
            }),
        }
    }
}

/// Accepts on `listener` until `shutdown`, yielding connections to serve once their
/// preface has arrived (read on a task of its own, so a silent client holds up nobody).
pub(crate) fn incoming(
    listener: AnyListener,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Rewritten>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let accepted = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "datastore: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let opened = tokio::select! {
                    opened = accepted.open() => opened,
                    _ = shutdown.cancelled() => return,
                };
                let Some(mut stream) = opened else { return };
                let mut preface = [0u8; PREFACE_LEN];
                let read = tokio::select! {
                    read = stream.read_exact(&mut preface) => read,
                    _ = shutdown.cancelled() => return,
                };
                match read {
                    Ok(_) => {
                        let _ = tx.send(Ok(Rewritten::new(stream, preface))).await;
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "datastore: connection ended before its preface")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use h2::frame::{Data, Headers, Pseudo, Settings, StreamId};
    use tokio::io::AsyncWriteExt;
    use tonic::codegen::http::{HeaderMap, HeaderValue, Method};

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// What etcd's Go client sends on a unix socket.
    const SOCKET_PATH: &str = "/var/lib/kdist/run/datastore.sock";

    fn bytes_str(text: &str) -> BytesStr {
        BytesStr::try_from(Bytes::copy_from_slice(text.as_bytes())).unwrap()
    }

    /// A gRPC request's HEADERS frame on `stream`, as etcd's client sends it.
    fn request(stream: u32, authority: Option<&str>) -> Headers {
        let pseudo = Pseudo {
            method: Some(Method::POST),
            scheme: Some(bytes_str("http")),
            authority: authority.map(bytes_str),
            path: Some(bytes_str("/etcdserverpb.KV/Range")),
            ..Pseudo::default()
        };
        let mut fields = HeaderMap::new();
        fields.insert("content-type", HeaderValue::from_static("application/grpc"));
        fields.insert("te", HeaderValue::from_static("trailers"));
        let mut headers = Headers::new(StreamId::from(stream), pseudo, fields);
        headers.set_end_headers();
        headers
    }

    fn relayed(authority: Option<&str>) -> Frame {
        fix_authority(Frame::Headers(request(1, authority)))
    }

    #[test]
    fn invalid_authorities_become_localhost() {
        for invalid in [
            SOCKET_PATH,
            "http://127.0.0.1:2379",
            "unix:///var/lib/kdist/run/datastore.sock",
            "",
            "127.0.0.1:2379/x",
            "host name:2379",
        ] {
            assert_eq!(
                relayed(Some(invalid)),
                Frame::Headers(request(1, Some("localhost"))),
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn valid_or_absent_authorities_pass_unchanged() {
        for valid in [
            "localhost",
            "127.0.0.1:2379",
            "[::1]:2379",
            "etcd-0.example:2379",
            "10.0.0.1",
        ] {
            assert_eq!(
                relayed(Some(valid)),
                Frame::Headers(request(1, Some(valid))),
                "{valid:?}"
            );
        }
        assert_eq!(relayed(None), Frame::Headers(request(1, None)));
    }

    #[test]
    fn stream_flags_and_fields_are_kept_and_other_frames_pass() {
        let mut headers = request(7, Some(SOCKET_PATH));
        headers.set_end_stream();
        let Frame::Headers(fixed) = fix_authority(Frame::Headers(headers)) else {
            panic!("a HEADERS frame stays one");
        };
        assert_eq!(fixed.stream_id(), StreamId::from(7));
        assert!(fixed.is_end_stream() && fixed.is_end_headers());
        let (pseudo, fields) = fixed.into_parts();
        assert_eq!(pseudo.path.as_deref(), Some("/etcdserverpb.KV/Range"));
        assert_eq!(pseudo.scheme.as_deref(), Some("http"));
        assert_eq!(pseudo.method, Some(Method::POST));
        assert_eq!(fields["content-type"], "application/grpc");
        assert_eq!(fields.len(), 2);

        let data = Data::new(
            StreamId::from(1),
            Bytes::from_static(SOCKET_PATH.as_bytes()),
        );
        assert_eq!(
            fix_authority(Frame::Data(data)),
            Frame::Data(Data::new(
                StreamId::from(1),
                Bytes::from_static(SOCKET_PATH.as_bytes())
            ))
        );
        assert_eq!(
            fix_authority(Frame::Settings(Settings::ack())),
            Frame::Settings(Settings::ack())
        );
    }

    /// A unix-socket listener in a temporary directory and a client connected to it.
    async fn connected() -> (
        tempfile::TempDir,
        ReceiverStream<io::Result<Rewritten>>,
        UnixStream,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datastore.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let accepted = incoming(AnyListener::Unix(listener), CancellationToken::new());
        let client = UnixStream::connect(&path).await.unwrap();
        (dir, accepted, client)
    }

    /// The relay hands the server the preface as sent, then every frame the client
    /// sent with the authority fixed, in order, however many arrived at once.
    #[tokio::test]
    async fn the_relay_rewrites_frames_on_a_real_socket() {
        let (_dir, mut accepted, mut client) = connected().await;
        client.write_all(PREFACE).await.unwrap();
        let mut client = Codec::<_, Bytes>::new(client);
        client
            .send(Frame::Settings(Settings::default()))
            .await
            .unwrap();
        // more frames than one read of the server takes (FRAMES_PER_READ)
        let streams: Vec<u32> = (0..FRAMES_PER_READ as u32 + 8).map(|i| 2 * i + 1).collect();
        for &stream in &streams {
            client
                .feed(Frame::Headers(request(stream, Some(SOCKET_PATH))))
                .await
                .unwrap();
            let mut data = Data::new(
                StreamId::from(stream),
                Bytes::from(format!("body {stream}")),
            );
            data.set_end_stream(true);
            client.feed(Frame::Data(data)).await.unwrap();
        }
        SinkExt::flush(&mut client).await.unwrap();
        client.get_mut().shutdown().await.unwrap();

        let mut server = accepted.next().await.unwrap().unwrap();
        let mut preface = [0u8; PREFACE_LEN];
        server.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, PREFACE);
        let mut server = Codec::<_, Bytes>::new(server);
        assert_eq!(
            server.next().await.unwrap().unwrap(),
            Frame::Settings(Settings::default())
        );
        for &stream in &streams {
            assert_eq!(
                server.next().await.unwrap().unwrap(),
                Frame::Headers(request(stream, Some("localhost")))
            );
            let mut data = Data::new(
                StreamId::from(stream),
                Bytes::from(format!("body {stream}")),
            );
            data.set_end_stream(true);
            assert_eq!(server.next().await.unwrap().unwrap(), Frame::Data(data));
        }
        // the client closed its side: the server sees the end, not an error
        assert!(server.next().await.is_none());
    }

    /// Sends etcd's unix-socket request (after the preface, already sent) to an h2
    /// server on `server_io`; returns the authority of the request the server
    /// accepted, or the reason of the reset the client got instead.
    async fn serve_one<T>(server_io: T, client: UnixStream) -> Result<String, h2::Reason>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, _respond) = connection.accept().await?.ok()?;
            Some(request.uri().authority()?.to_string())
        });
        let mut client = Codec::<_, Bytes>::new(client);
        client
            .send(Frame::Settings(Settings::default()))
            .await
            .unwrap();
        client
            .send(Frame::Headers(request(1, Some(SOCKET_PATH))))
            .await
            .unwrap();
        let reset = tokio::select! {
            accepted = server => return Ok(accepted.unwrap().expect("the server accepts the request")),
            reset = async {
                while let Some(frame) = client.next().await {
                    if let Ok(Frame::Reset(reset)) = frame {
                        return reset.reason();
                    }
                }
                // closed by a server that accepted the request: its branch answers
                std::future::pending::<h2::Reason>().await
            } => reset,
        };
        Err(reset)
    }

    #[tokio::test]
    async fn h2_accepts_the_go_clients_request_through_the_relay() {
        let (_dir, mut accepted, mut client) = connected().await;
        // the relay yields a connection once its preface arrived
        client.write_all(PREFACE).await.unwrap();
        let server_io = accepted.next().await.unwrap().unwrap();
        assert_eq!(
            serve_one(server_io, client).await,
            Ok("localhost".to_string())
        );
    }

    /// Without the relay h2 refuses the request: this is why the relay exists, and
    /// the test that tells when an h2 upgrade makes it unnecessary (hyperium/h2#487).
    #[tokio::test]
    async fn h2_alone_resets_the_go_clients_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).await.unwrap();
        let (server_io, _) = listener.accept().await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        assert_eq!(
            serve_one(server_io, client).await,
            Err(h2::Reason::PROTOCOL_ERROR)
        );
    }
}
