//! One bidirectional QUIC stream carrying wire frames.
//!
//! The node opens the stream and speaks first (`Hello`); the relay accepts it.
//! Sending refuses frames above the limit before writing anything; receiving
//! feeds the sans-IO [`FrameDecoder`], which refuses an oversized length prefix
//! before buffering its payload. Both halves count the bytes they move.
//!
//! [`FramedRecv::recv_with_limit`] reads one frame with a smaller limit: the
//! relay reads a connection's first frame (`Hello` or `Join`) with
//! [`MAX_PREAUTH_FRAME`], so a peer it does not know yet can make it hold a few
//! kilobytes, not the configured maximum frame. The decoder's buffer grows only
//! with bytes that arrived, at most [`READ_CHUNK`] at a time beyond the frame.

use samverkan_shared::wire::{Frame, FrameDecoder, Received};

use crate::endpoint::Limits;
use crate::NetError;

/// Bytes read from the stream at a time.
pub const READ_CHUNK: usize = 64 * 1024;
/// Largest first frame (`Hello` or `Join`) the relay reads before it knows the
/// peer is enrolled: 4 KiB, far above what those frames need (about 200 bytes)
/// and far below the 64 MiB a sync frame may have.
pub const MAX_PREAUTH_FRAME: usize = 4 * 1024;
/// Bytes of encoded frames [`FramedSend::send_all`] gathers before writing
/// them to the stream: a few packets' worth, so that batching saves writes and
/// packets without holding a large copy of a long outbox.
pub const WRITE_BATCH: usize = 16 * 1024;
/// How long `finish` waits for the peer to acknowledge the last bytes.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sync stream on a connection (node side).
pub async fn open(conn: &quinn::Connection, limits: &Limits) -> Result<(FramedSend, FramedRecv), NetError> {
    let (send, recv) = conn.open_bi().await.map_err(|e| NetError::ConnectionLost(e.to_string()))?;
    Ok(halves(send, recv, limits))
}

/// Accepts the sync stream the node opens (relay side), waiting at most the handshake timeout.
pub async fn accept(conn: &quinn::Connection, limits: &Limits) -> Result<(FramedSend, FramedRecv), NetError> {
    match tokio::time::timeout(limits.handshake_timeout, conn.accept_bi()).await {
        Ok(Ok((send, recv))) => Ok(halves(send, recv, limits)),
        Ok(Err(e)) => Err(NetError::ConnectionLost(e.to_string())),
        Err(_) => Err(NetError::NoStream(limits.handshake_timeout)),
    }
}

fn halves(send: quinn::SendStream, recv: quinn::RecvStream, limits: &Limits) -> (FramedSend, FramedRecv) {
    (
        FramedSend { stream: send, max_frame: limits.max_frame, bytes: 0 },
        FramedRecv { stream: recv, decoder: FrameDecoder::with_max_frame(limits.max_frame), bytes: 0 },
    )
}

/// The sending half.
#[derive(Debug)]
pub struct FramedSend {
    stream: quinn::SendStream,
    max_frame: usize,
    bytes: u64,
}

impl FramedSend {
    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), NetError> {
        self.send_all(std::slice::from_ref(frame)).await
    }

    /// Sends `frames` in order, as few stream writes as possible: frames are
    /// encoded into one buffer, handed to QUIC whole (no copy) once it holds
    /// [`WRITE_BATCH`] bytes and at the end, so the frames of one protocol step
    /// (`Authors` and its `Sync`, say) leave in the same packet rather than in
    /// one each. A frame above the limit is refused after the frames before it
    /// were written, as if they had been sent one by one.
    pub async fn send_all(&mut self, frames: &[Frame]) -> Result<(), NetError> {
        let mut buffer = Vec::new();
        for frame in frames {
            if let Err(e) = frame.try_encode_into(self.max_frame, &mut buffer) {
                if !buffer.is_empty() {
                    self.write(buffer).await?;
                }
                return Err(NetError::TooLarge(e));
            }
            if buffer.len() >= WRITE_BATCH {
                self.write(std::mem::take(&mut buffer)).await?;
            }
        }
        if !buffer.is_empty() {
            self.write(buffer).await?;
        }
        Ok(())
    }

    async fn write(&mut self, buffer: Vec<u8>) -> Result<(), NetError> {
        let len = buffer.len() as u64;
        self.stream.write_chunk(buffer.into()).await.map_err(|e| NetError::ConnectionLost(e.to_string()))?;
        self.bytes += len;
        Ok(())
    }

    /// Ends the stream and waits (briefly) until the peer has received everything sent.
    pub async fn finish(&mut self) -> Result<(), NetError> {
        if self.stream.finish().is_err() {
            return Ok(());
        }
        match tokio::time::timeout(FINISH_WAIT, self.stream.stopped()).await {
            Ok(Ok(_)) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(NetError::ConnectionLost(e.to_string())),
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// What one [`FramedRecv::read_step`] got.
#[derive(Debug)]
pub enum ReadStep {
    /// A complete frame, or `None` when the peer ended the stream between frames.
    Frame(Option<Received>),
    /// Bytes were read, but the frame they belong to is not complete yet.
    Partial,
}

/// The receiving half.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
    bytes: u64,
}

impl FramedRecv {
    /// The next frame, refusing one whose payload is larger than `max` bytes
    /// (or than the stream's maximum) as soon as its length prefix arrives,
    /// with [`NetError::Wire`] (`FrameTooLarge`); the frames after it are held
    /// to the stream's maximum again. If the call is cancelled before the frame
    /// arrived, the limit still applies to it.
    pub async fn recv_with_limit(&mut self, max: usize) -> Result<Option<Frame>, NetError> {
        self.decoder.limit_next_frame(max);
        self.recv().await
    }

    /// Bytes the frame decoder holds allocated now (see [`FrameDecoder::allocated`]).
    pub fn buffer_allocated(&self) -> usize {
        self.decoder.allocated()
    }

    /// The next frame; `Ok(None)` when the peer ended the stream (or closed the
    /// connection normally) between frames.
    pub async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        loop {
            // With no bound on the bytes read, a step ends only with a frame or the stream's end.
            if let ReadStep::Frame(received) = self.read_step(usize::MAX, usize::MAX).await? {
                return Ok(received.map(Received::into_frame).transpose()?);
            }
        }
    }

    /// Reads until the next frame is complete, the stream ends, or at least
    /// `read_up_to` bytes were read with the frame still incomplete
    /// ([`ReadStep::Partial`]): a caller that pays for what it reads (the
    /// relay's per-key budget) can stop reading in the middle of a large
    /// frame, so that QUIC flow control holds the sender back. Cancel-safe:
    /// what was read stays buffered for the next call. A frame whose payload
    /// is larger than `decode_up_to` bytes comes back undecoded, for the caller
    /// to decode where a long decode holds up nobody
    /// (see [`FrameDecoder::next_received`]).
    pub async fn read_step(&mut self, decode_up_to: usize, read_up_to: usize) -> Result<ReadStep, NetError> {
        let start = self.bytes;
        loop {
            if let Some(received) = self.decoder.next_received(decode_up_to)? {
                return Ok(ReadStep::Frame(Some(received)));
            }
            if self.bytes - start >= read_up_to as u64 {
                return Ok(ReadStep::Partial);
            }
            // QUIC's own buffer, read in place (cancel-safe, like `read`): no
            // copy buffer of READ_CHUNK kept for every connection.
            match self.stream.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    self.bytes += chunk.bytes.len() as u64;
                    self.decoder.push(&chunk.bytes);
                }
                Ok(None) => return self.ended().map(ReadStep::Frame),
                Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close)))
                    if close.error_code == quinn::VarInt::from_u32(0) =>
                {
                    return self.ended().map(ReadStep::Frame)
                }
                Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::LocallyClosed)) => {
                    return self.ended().map(ReadStep::Frame)
                }
                Err(e) => return Err(NetError::ConnectionLost(e.to_string())),
            }
        }
    }

    fn ended(&self) -> Result<Option<Received>, NetError> {
        match self.decoder.buffered() {
            0 => Ok(None),
            n => Err(NetError::ConnectionLost(format!("stream ended inside a frame ({n} bytes of it received)"))),
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use samverkan_shared::wire::{WireError, LENGTH_PREFIX};

    use super::*;
    use crate::endpoint;
    use crate::tls::{self, TlsIdentity};

    const LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

    /// A server and a client endpoint connected over QUIC on loopback:
    /// (server endpoint, server's connection, client endpoint, client's connection).
    async fn connected(limits: &Limits) -> (quinn::Endpoint, quinn::Connection, quinn::Endpoint, quinn::Connection) {
        let server_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let server_identity = TlsIdentity::new(&server_key, tls::SERVER_NAME).unwrap();
        let server = endpoint::server_endpoint("127.0.0.1:0".parse().unwrap(), &server_identity, limits).unwrap();
        let addr = server.local_addr().unwrap();
        let client_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let client_identity = TlsIdentity::new(&client_key, "test-client").unwrap();
        let client = endpoint::client_endpoint(addr).unwrap();
        let connecting =
            endpoint::connect(&client, addr, &client_identity, server_key.verifying_key().to_bytes(), limits);
        let accepting = async { server.accept().await.unwrap().await.unwrap() };
        let (server_conn, client_conn) = tokio::join!(accepting, connecting);
        (server, server_conn, client, client_conn.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_frame_above_the_preauth_limit_is_refused_without_buffering() {
        let limits = Limits::default();
        tokio::time::timeout(LIMIT, async {
            let (_server, server_conn, _client, client_conn) = connected(&limits).await;
            let (mut send, _client_recv) = open(&client_conn, &limits).await.unwrap();
            // Announce 64 MiB and send the first megabyte of it.
            let announced = 64u32 << 20;
            let mut bytes = announced.to_be_bytes().to_vec();
            bytes.extend(vec![0x06; 1 << 20]);
            let writer = tokio::spawn(async move {
                let _ = send.stream.write_all(&bytes).await;
                send
            });
            let (_server_send, mut recv) = accept(&server_conn, &limits).await.unwrap();
            let error = recv.recv_with_limit(MAX_PREAUTH_FRAME).await.unwrap_err();
            assert!(
                matches!(
                    &error,
                    NetError::Wire(WireError::FrameTooLarge { len, max })
                        if *len == u64::from(announced) && *max == MAX_PREAUTH_FRAME
                ),
                "{error}"
            );
            assert!(recv.bytes() <= (READ_CHUNK + LENGTH_PREFIX) as u64, "read {} bytes", recv.bytes());
            assert!(recv.buffer_allocated() <= READ_CHUNK, "allocated {}", recv.buffer_allocated());
            server_conn.close(0u32.into(), b"bye");
            let _ = writer.await;
        })
        .await
        .expect("finished in time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_all_delivers_frames_in_order_and_refuses_an_oversized_one_after_those_before_it() {
        let limits = Limits { max_frame: 64 * 1024, ..Limits::default() };
        tokio::time::timeout(LIMIT, async {
            let (_server, server_conn, _client, client_conn) = connected(&limits).await;
            let (mut send, _client_recv) = open(&client_conn, &limits).await.unwrap();
            let doc: samverkan_shared::ids::DocId = "00112233445566778899aabbccddeeff".parse().unwrap();
            // Enough frames to cross WRITE_BATCH several times, then one above the limit.
            let frames: Vec<Frame> =
                (0..40u8).map(|i| Frame::Sync { doc: doc.clone(), message: vec![i; 1000] }).collect();
            let too_large = Frame::Sync { doc: doc.clone(), message: vec![0; 65 * 1024] };
            let mut all = frames.clone();
            all.push(too_large);
            all.push(Frame::InSync);
            let error = send.send_all(&all).await.unwrap_err();
            assert!(matches!(error, NetError::TooLarge(WireError::FrameTooLarge { .. })), "{error}");
            let sent = send.bytes();
            let (_server_send, mut recv) = accept(&server_conn, &limits).await.unwrap();
            endpoint::admit(&server_conn, &limits);
            for frame in &frames {
                assert_eq!(recv.recv().await.unwrap().as_ref(), Some(frame));
            }
            assert_eq!(recv.bytes(), sent, "nothing after the refused frame was written");
            server_conn.close(0u32.into(), b"bye");
        })
        .await
        .expect("finished in time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_small_first_frame_the_stream_takes_frames_up_to_its_maximum() {
        let limits = Limits::default();
        tokio::time::timeout(LIMIT, async {
            let (_server, server_conn, _client, client_conn) = connected(&limits).await;
            let (mut send, _client_recv) = open(&client_conn, &limits).await.unwrap();
            let first = Frame::InSync;
            let doc = "00112233445566778899aabbccddeeff".parse().unwrap();
            let big = Frame::Sync { doc, message: vec![9; 3 << 20] };
            // Sent back to back: the large frame's prefix may arrive with the first frame.
            let frames = vec![first.clone(), big.clone()];
            let writer = tokio::spawn(async move {
                for frame in &frames {
                    send.send(frame).await.unwrap();
                }
                send
            });
            let (_server_send, mut recv) = accept(&server_conn, &limits).await.unwrap();
            assert_eq!(recv.recv_with_limit(MAX_PREAUTH_FRAME).await.unwrap(), Some(first));
            // Admitted (as the relay does after authentication): the full window, frames up to the maximum.
            endpoint::admit(&server_conn, &limits);
            assert_eq!(recv.recv().await.unwrap(), Some(big));
            let _send = writer.await.unwrap();
            server_conn.close(0u32.into(), b"bye");
        })
        .await
        .expect("finished in time");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_frame_is_read_in_steps_and_handed_back_undecoded_and_a_small_one_decoded() {
        let limits = Limits::default();
        tokio::time::timeout(LIMIT, async {
            let (_server, server_conn, _client, client_conn) = connected(&limits).await;
            let (mut send, _client_recv) = open(&client_conn, &limits).await.unwrap();
            let doc: samverkan_shared::ids::DocId = "00112233445566778899aabbccddeeff".parse().unwrap();
            let big = Frame::Sync { doc: doc.clone(), message: vec![7; 3 << 20] };
            let small = Frame::Sync { doc, message: vec![1; 100] };
            let frames = vec![big.clone(), small.clone()];
            let writer = tokio::spawn(async move {
                send.send_all(&frames).await.unwrap();
                send
            });
            let (_server_send, mut recv) = accept(&server_conn, &limits).await.unwrap();
            endpoint::admit(&server_conn, &limits);
            let (mut partial, mut steps) = (0, 0);
            let raw = loop {
                steps += 1;
                assert!(steps < 10_000, "a step reads at least its bound or ends with a frame");
                let before = recv.bytes();
                match recv.read_step(64 * 1024, 256 * 1024).await.unwrap() {
                    ReadStep::Partial => {
                        partial += 1;
                        let read = recv.bytes() - before;
                        assert!((256 * 1024..256 * 1024 + READ_CHUNK as u64).contains(&read), "read {read}");
                    }
                    ReadStep::Frame(Some(Received::Undecoded(raw))) => break raw,
                    other => panic!("expected the large frame undecoded, got {other:?}"),
                }
            };
            assert!(partial >= 10, "3 MiB in quarter-MiB steps: {partial} partial steps");
            assert_eq!(raw.len(), big.encode().len() - LENGTH_PREFIX);
            assert_eq!(raw.decode().unwrap(), big);
            match recv.read_step(64 * 1024, 256 * 1024).await.unwrap() {
                ReadStep::Frame(Some(Received::Frame(frame))) => assert_eq!(frame, small),
                other => panic!("expected the small frame decoded, got {other:?}"),
            }
            let _send = writer.await.unwrap();
            server_conn.close(0u32.into(), b"bye");
        })
        .await
        .expect("finished in time");
    }
}
