//! The admin server's connection handling: a cap on open connections and a
//! timeout on request headers, so that slow or idle clients cannot use up
//! the file descriptors that the MQTT source, the sinks and reloads need.
//! The timeout on request bodies is a middleware of the router, see
//! [`super::request`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::events::Events;

/// Maximum number of admin connections open at once. Each one uses a file
/// descriptor of the process, which the MQTT source, the sinks and config
/// reloads need too, so an unbounded number of idle clients would starve
/// them. Connections past the cap wait in the kernel's listen backlog,
/// where they use no descriptor of this process, until one closes. 128 is
/// far more than a scraper, a probe and an operator need at once.
pub const MAX_CONNECTIONS: usize = 128;

/// Time a client has to send the request line and headers, from the
/// accept or from the end of the previous response on a keep-alive
/// connection. An idle connection is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Limits of one server. The defaults are the constants above.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` over HTTP/1 until `shutdown` turns true,
/// then lets the requests in progress finish and returns.
pub(super) async fn run(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    events: Arc<Events>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // One permit per open connection. It is taken before the accept, so
    // that connections past the cap stay in the kernel's backlog.
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();

    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(&e, &events).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };

        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            // Released when the connection ends, which admits the next one.
            let _permit = permit;
            tokio::pin!(connection);
            let ended = tokio::select! {
                result = connection.as_mut() => Some(result),
                () = stopped(&mut stop) => None,
            };
            let result = match ended {
                Some(result) => result,
                None => {
                    // Finishes the request in progress, then closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
        // Frees the results of the connections that ended.
        while connections.try_join_next().is_some() {}
    }

    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Waits until `shutdown` turns true, or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard that wait_for returns is dropped here, so that it is not
    // held across the caller's next await.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Handles a failed accept. A connection that the client reset before the
/// accept concerns that client only. Any other error, such as too many open
/// files, is logged, and the loop pauses before the next accept, because
/// it would fail the same way at once.
async fn accept_failed(error: &std::io::Error, events: &Events) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    if events.admit("admin-accept-failed") {
        tracing::error!(error = %error, "admin server cannot accept a connection; retrying in 1 s");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    use super::*;

    /// Starts a server of `GET /` on a free port, and returns its address,
    /// its stop signal and its task.
    async fn start(limits: ConnectionLimits) -> (SocketAddr, watch::Sender<bool>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(
            listener,
            app,
            limits,
            Arc::new(Events::default()),
            shutdown,
        ));
        (address, stop, task)
    }

    /// Reads until the server closes the connection, at most 10 s.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("the server closed the connection within 10 s")
            .expect("the read succeeded");
        String::from_utf8_lossy(&raw).into_owned()
    }

    #[tokio::test]
    async fn connections_past_cap_wait() {
        let limits = ConnectionLimits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(60),
        };
        let (address, stop, task) = start(limits).await;

        // The kernel hands out connections in the order they were made, so
        // the two idle ones take both places.
        let first = TcpStream::connect(address).await.unwrap();
        let _second = TcpStream::connect(address).await.unwrap();
        let mut third = TcpStream::connect(address).await.unwrap();
        third.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
        assert!(early.is_err(), "answered past the cap: {early:?}");

        // Closing an idle connection lets the third one in.
        drop(first);
        let response = read_to_close(&mut third).await;
        assert!(response.starts_with("HTTP/1.0 200 OK"), "{response}");

        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server stopped within 10 s")
            .unwrap();
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let limits = ConnectionLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(100),
        };
        let (address, stop, task) = start(limits).await;

        let mut idle = TcpStream::connect(address).await.unwrap();
        let response = read_to_close(&mut idle).await;
        assert!(!response.contains(" 200 "), "{response}");

        // The one place it held is free again.
        let mut next = TcpStream::connect(address).await.unwrap();
        next.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let response = read_to_close(&mut next).await;
        assert!(response.starts_with("HTTP/1.0 200 OK"), "{response}");

        stop.send_replace(true);
        task.await.unwrap();
    }
}
