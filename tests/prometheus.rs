//! Prometheus exposition on METRICS_PORT when ENABLE_METRICS=true. Its own test
//! binary: the metrics recorder is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_exposition_counts_connections_events_and_latency() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = TestServer::start_with(|c| {
        c.enable_metrics = true;
        c.metrics_port = port;
    })
    .await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    t.exec("INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', 'a', 'a')")
        .await;
    ws.change().await;
    let status: serde_json::Value = reqwest::get(t.url("/ws/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "healthy");
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for metric in [
        "aether_ws_connections",
        "aether_events_decoded_total",
        "aether_events_delivered_total",
        "aether_delivery_latency_seconds_bucket",
        "aether_ws_frames_out_total",
        "aether_replication_lag_bytes",
    ] {
        assert!(text.contains(metric), "{metric} missing from:\n{text}");
    }
}
