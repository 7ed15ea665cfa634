//! The `patient-upstream` binary prints its addresses and stops on stdin EOF.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::fetch;

#[tokio::test]
async fn serves_until_stdin_closes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patient-upstream"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut fields = line.split_whitespace();
    let listening: SocketAddr = fields
        .next()
        .unwrap()
        .strip_prefix("listening=")
        .unwrap()
        .parse()
        .unwrap();
    let fault: SocketAddr = fields
        .next()
        .unwrap()
        .strip_prefix("fault=")
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(listening, fault);

    assert_eq!(fetch(listening, "/fast").await.text(), "ok");

    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "patient-upstream did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn rejects_unknown_arguments() {
    let output = Command::new(env!("CARGO_BIN_EXE_patient-upstream"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
