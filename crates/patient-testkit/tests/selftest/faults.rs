//! Each fault breaks a bare hyper client the way its documentation says.

use std::{net::SocketAddr, time::Duration};

use http_body_util::BodyExt;
use patient_testkit::{Fault, Upstream};

use crate::{get, h1};

fn fault_addr(upstream: &Upstream, fault: Fault) -> (SocketAddr, String) {
    let url = url::Url::parse(&upstream.fault_url(fault)).unwrap();
    assert_eq!(url.path(), fault.path());
    (upstream.fault_addr(), url.path().to_owned())
}

/// Sends the request; returns whether the head arrived and whether the body
/// was read completely.
async fn outcome(upstream: &Upstream, fault: Fault) -> (bool, bool) {
    let (addr, path) = fault_addr(upstream, fault);
    let mut sender = h1(addr).await;
    let Ok(response) = sender.send_request(get(addr, &path)).await else {
        return (false, false);
    };
    (true, response.into_body().collect().await.is_ok())
}

#[tokio::test]
async fn body_faults_fail_after_the_head() {
    let upstream = Upstream::start().await.unwrap();
    for fault in [
        Fault::ResetMidBody,
        Fault::MalformedChunked,
        Fault::ShortBody,
    ] {
        assert_eq!(outcome(&upstream, fault).await, (true, false), "{fault:?}");
    }
}

#[tokio::test]
async fn head_faults_fail_before_the_head() {
    let upstream = Upstream::start().await.unwrap();
    for fault in [Fault::CloseBeforeHeaders, Fault::OversizedHeaders] {
        assert_eq!(outcome(&upstream, fault).await, (false, false), "{fault:?}");
    }
}

#[tokio::test]
async fn trickle_headers_outlasts_a_one_second_timeout() {
    let upstream = Upstream::start().await.unwrap();
    let (addr, path) = fault_addr(&upstream, Fault::TrickleHeaders);
    let mut sender = h1(addr).await;
    let result = tokio::time::timeout(
        Duration::from_secs(1),
        sender.send_request(get(addr, &path)),
    )
    .await;
    assert!(result.is_err(), "the head arrived within 1 s");
}

#[tokio::test]
async fn unknown_fault_path_is_404() {
    let upstream = Upstream::start().await.unwrap();
    let addr = upstream.fault_addr();
    let mut sender = h1(addr).await;
    let response = sender.send_request(get(addr, "/nope")).await.unwrap();
    assert_eq!(response.status(), 404);
}
