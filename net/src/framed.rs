//! One bidirectional QUIC stream carrying wire frames.
//!
//! The node opens the stream and speaks first (`Hello`); the relay accepts it.
//! Sending refuses frames above the limit before writing anything; receiving
//! feeds the sans-IO [`FrameDecoder`], which refuses an oversized length prefix
//! before buffering its payload. Both halves count the bytes they move.

use samverkan_shared::wire::{Frame, FrameDecoder};

use crate::endpoint::Limits;
use crate::NetError;

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;
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
        FramedRecv {
            stream: recv,
            decoder: FrameDecoder::with_max_frame(limits.max_frame),
            chunk: vec![0; READ_CHUNK],
            bytes: 0,
        },
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
        let bytes = frame.try_encode(self.max_frame).map_err(NetError::TooLarge)?;
        self.stream.write_all(&bytes).await.map_err(|e| NetError::ConnectionLost(e.to_string()))?;
        self.bytes += bytes.len() as u64;
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

/// The receiving half.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
    chunk: Vec<u8>,
    bytes: u64,
}

impl FramedRecv {
    /// The next frame; `Ok(None)` when the peer ended the stream (or closed the
    /// connection normally) between frames.
    pub async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            match self.stream.read(&mut self.chunk).await {
                Ok(Some(n)) => {
                    self.bytes += n as u64;
                    self.decoder.push(&self.chunk[..n]);
                }
                Ok(None) => return self.ended(),
                Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close)))
                    if close.error_code == quinn::VarInt::from_u32(0) =>
                {
                    return self.ended()
                }
                Err(quinn::ReadError::ConnectionLost(quinn::ConnectionError::LocallyClosed)) => return self.ended(),
                Err(e) => return Err(NetError::ConnectionLost(e.to_string())),
            }
        }
    }

    fn ended(&self) -> Result<Option<Frame>, NetError> {
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
