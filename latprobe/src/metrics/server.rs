//! The HTTP side of `--listen`: hyper's HTTP/1.1 server on a thread and
//! runtime of its own, so no scrape, however slow, takes time from the
//! measuring loop.
//!
//! Bounded on every side: at most `MAX_CONNECTIONS` at once (more are closed
//! at once), request heads of at most `MAX_REQUEST_BYTES` that must arrive
//! within `HEAD_TIME`, one request per connection, and a connection that is
//! not done within `CONNECTION_TIME` (a reader that never reads) is dropped.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Semaphore};

use super::exposition::{self, Exposition};

const MAX_CONNECTIONS: usize = 16;
/// hyper's smallest read buffer; a longer request head is refused.
const MAX_REQUEST_BYTES: usize = 8192;
const HEAD_TIME: Duration = Duration::from_secs(5);
const CONNECTION_TIME: Duration = Duration::from_secs(10);
/// What OpenMetrics 1.0 says its text format is.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `latest` on `listener` from now on; returns where.
pub fn spawn(listener: std::net::TcpListener, latest: watch::Receiver<Arc<Exposition>>) -> Result<SocketAddr> {
    let bound = listener.local_addr().context("--listen: reading the bound address")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("--listen: starting the server's runtime")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || runtime.block_on(serve(listener, latest)))
        .context("--listen: starting the server's thread")?;
    Ok(bound)
}

async fn serve(listener: std::net::TcpListener, latest: watch::Receiver<Arc<Exposition>>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return crate::output::warn(&format!("--listen: cannot serve: {e}")),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, say: try again later, not in a spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let latest = latest.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let current = latest.borrow().clone();
                async move { Ok::<_, Infallible>(respond(&request, current)) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIME)
                .max_buf_size(MAX_REQUEST_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
            drop(slot);
        });
    }
}

fn respond<B>(request: &Request<B>, current: Arc<Exposition>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, exposition::encode(current)),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "latprobe serves /metrics only\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}
