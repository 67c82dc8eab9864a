//! A stand-in MQTT 3.1.1 broker that accepts every connection and never
//! confirms a publish. A client that waits for PUBACK, as dead-letter
//! replay does, stays blocked in the middle of its work while the test
//! acts, without a sleep.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// CONNACK: session not present, connection accepted.
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
const PINGRESP: [u8; 2] = [0xd0, 0x00];
const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PINGREQ: u8 = 12;

/// The listener on a free port of 127.0.0.1. Dropping it closes the
/// listener and every connection.
pub struct SilentBroker {
    address: SocketAddr,
    publishes: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl SilentBroker {
    /// Starts listening. Must run inside a tokio runtime.
    ///
    /// # Panics
    ///
    /// Panics when no port of 127.0.0.1 can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port of 127.0.0.1");
        let address = listener.local_addr().expect("local address of the listener");
        let (count, publishes) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            // Dropping the set, when the task is aborted, ends every
            // connection.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, count.clone()));
            }
        });
        Self { address, publishes, task }
    }

    /// Returns `HOST:PORT`, for `--broker`.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Waits until at least `count` PUBLISH packets arrived over all
    /// connections.
    ///
    /// # Panics
    ///
    /// Panics when they do not arrive within `timeout`.
    pub async fn wait_publishes(&mut self, count: usize, timeout: Duration) {
        let arrived = tokio::time::timeout(timeout, self.publishes.wait_for(|n| *n >= count)).await.is_ok_and(|waited| waited.is_ok());
        if !arrived {
            panic!("{count} PUBLISH packets did not arrive within {timeout:?}; got {}", *self.publishes.borrow());
        }
    }
}

impl Drop for SilentBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replies to CONNECT and PINGREQ, counts PUBLISH packets and sends nothing
/// else, until the client closes the connection.
async fn serve(mut stream: TcpStream, publishes: watch::Sender<usize>) {
    while let Some(packet_type) = read_packet(&mut stream).await {
        let reply: &[u8] = match packet_type {
            CONNECT => &CONNACK,
            PINGREQ => &PINGRESP,
            PUBLISH => {
                publishes.send_modify(|n| *n += 1);
                continue;
            }
            _ => continue,
        };
        if stream.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// Reads one MQTT packet and returns its type, or `None` when the
/// connection ends.
async fn read_packet(stream: &mut TcpStream) -> Option<u8> {
    let first = stream.read_u8().await.ok()?;
    // The remaining length: up to four bytes, seven bits each, low first.
    let mut length = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await.ok()?;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(first >> 4)
}
