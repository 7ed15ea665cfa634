//! The dispatch thread starts with the first blocking call and is joined
//! when the last clone of the client is dropped. One test in its own
//! binary: it counts the process's threads by name.

#![cfg(target_os = "linux")]

mod common;

use common::Daemon;
use patient_client::DaemonClient;
use patient_http::{Dispatch, Task};
use patient_testkit::Upstream;
use patient_wire::Request;

/// Threads of this process named `patient-client`.
fn dispatch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "patient-client")
        .count()
}

#[test]
fn the_dispatch_thread_lives_as_long_as_the_client() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = runtime.block_on(Upstream::start()).unwrap();
    let daemon = runtime.block_on(Daemon::start(|_| {}));
    let request = Request::get(up.url("/fast")).build().unwrap();

    let client = DaemonClient::new(&daemon.url, None).unwrap();
    assert_eq!(dispatch_threads(), 0, "no thread before the first dispatch");
    let clone = client.clone();
    let first = client.dispatch(Task::new(request.clone(), "One")).unwrap();
    assert_eq!(dispatch_threads(), 1);
    let second = clone.dispatch(Task::new(request, "Two")).unwrap();
    assert_ne!(first, second);
    assert_eq!(dispatch_threads(), 1, "clones share the thread");

    drop(client);
    assert_eq!(dispatch_threads(), 1, "a clone still holds it");
    drop(clone);
    assert_eq!(dispatch_threads(), 0, "joined when the last clone goes");
    runtime.block_on(daemon.stop());
}
