//! `PropagationLayer` in a real axum server, called over TCP.

use std::{net::SocketAddr, time::Duration};

use axum::{routing::get, Extension, Json, Router};
use patient_http::propagation::{PropagationLayer, RequestContext};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The context as the handler sees it.
async fn show(Extension(ctx): Extension<RequestContext>) -> Json<Value> {
    Json(json!({
        "remaining_ms": ctx.remaining().map(|d| d.as_millis() as u64),
        "priority": ctx.priority.as_str(),
    }))
}

async fn start() -> SocketAddr {
    let app = Router::new()
        .route("/", get(show))
        .layer(PropagationLayer::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// Sends a GET with extra header lines and returns the status and JSON body.
async fn get_with(addr: SocketAddr, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

fn remaining_ms(body: &Value) -> Option<u64> {
    body["remaining_ms"].as_u64()
}

#[tokio::test]
async fn headers_set_the_context() {
    let addr = start().await;
    let (status, body) = get_with(
        addr,
        &[("X-Request-Timeout", "5"), ("X-Request-Priority", "high")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["priority"], "high");
    let left = remaining_ms(&body).expect("a deadline");
    assert!((4_000..=5_000).contains(&left), "{body}");

    let (_, body) = get_with(
        addr,
        &[("x-request-timeout", "2.5"), ("x-request-priority", "LOW")],
    )
    .await;
    assert_eq!(body["priority"], "low");
    let left = remaining_ms(&body).expect("a deadline");
    assert!((1_500..=2_500).contains(&left), "{body}");
}

#[tokio::test]
async fn absent_headers_mean_no_deadline_and_normal_priority() {
    let addr = start().await;
    let (status, body) = get_with(addr, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"remaining_ms": null, "priority": "normal"}));
}

#[tokio::test]
async fn garbage_is_ignored() {
    let addr = start().await;
    for (timeout, priority) in [
        ("soon", "urgent"),
        ("-3", ""),
        ("inf", "highest"),
        ("NaN", "0"),
        ("1e999", "normal!"),
        ("5 s", "high low"),
    ] {
        let (status, body) = get_with(
            addr,
            &[
                ("X-Request-Timeout", timeout),
                ("X-Request-Priority", priority),
            ],
        )
        .await;
        assert_eq!(status, 200, "{timeout:?} {priority:?}");
        assert_eq!(
            body,
            json!({"remaining_ms": null, "priority": "normal"}),
            "{timeout:?} {priority:?}"
        );
    }
}

#[tokio::test]
async fn expired_deadline_is_refused_before_the_handler() {
    let addr = start().await;
    let (status, body) = get_with(
        addr,
        &[("X-Request-Timeout", "0"), ("X-Request-Priority", "normal")],
    )
    .await;
    assert_eq!(status, 408);
    assert_eq!(body["error"]["code"], "deadline_expired", "{body}");
}
