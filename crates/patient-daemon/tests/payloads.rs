//! Payload stores and encryption in the daemon, against real components: a
//! real daemon and upstream, the SQLite file read directly (its raw bytes,
//! WAL included), the file store's directory, a real Redis
//! (`PATIENT_TEST_REDIS_URL`) and Ruby's Active Support for the gem's
//! format.

mod common;

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use common::{redis_url, Daemon, Receiver, TempDir};
use patient_daemon::{
    db::Db,
    payloads::Payloads,
    server::{purge, ServeError},
    Flags, Settings,
};
use patient_store::{
    activesupport::{KeyDigest, Options, Serializer},
    store::{FileStore, S3Config, S3Store, SqlStore},
    Encryptor, PayloadStore, PayloadStores,
};
use patient_testkit::Upstream;
use serde_json::{json, Value};
use sqlx::{Connection, Row, SqliteConnection};

/// A 1 MiB response body.
const LARGE: usize = 1 << 20;

/// The stored `request` and `outcome` columns of task `id`, read from the
/// SQLite file with a connection of the test's own.
async fn stored_row(dir: &Path, id: &str) -> (Value, Option<Value>) {
    let url = format!("sqlite://{}", dir.join("patient.db").display());
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    let row = sqlx::query("SELECT request, outcome FROM patient_tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let request: String = row.get("request");
    let outcome: Option<String> = row.get("outcome");
    conn.close().await.unwrap();
    (
        serde_json::from_str(&request).unwrap(),
        outcome.map(|o| serde_json::from_str(&o).unwrap()),
    )
}

/// Every byte of the SQLite database: the main file, its WAL and its
/// shared-memory index, whichever exist.
fn database_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for name in ["patient.db", "patient.db-wal", "patient.db-shm"] {
        if let Ok(bytes) = std::fs::read(dir.join(name)) {
            all.extend_from_slice(&bytes);
        }
    }
    assert!(all.len() > 4096, "the database files exist");
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The bytes of a wire body (`text`, or Base64 for `binary`).
fn body_bytes(body: &Value) -> Vec<u8> {
    let value = body["value"].as_str().expect("a body value");
    match body["encoding"].as_str() {
        Some("binary") => STANDARD.decode(value).unwrap(),
        Some("text") => value.as_bytes().to_vec(),
        other => panic!("unexpected encoding {other:?}"),
    }
}

/// The files of the file store (no temporary files).
fn store_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_is_stored_by_reference_and_comes_back_whole() {
    let upstream = Upstream::start().await.unwrap();
    let receiver = Receiver::start(&[]).await;
    let daemon = Daemon::start(&[
        ("PATIENT_PAYLOAD_STORE__KIND", "file"),
        ("PATIENT_PAYLOAD_STORE__THRESHOLD", "4096"),
    ])
    .await;
    let dir = daemon.dir();
    let store_dir = dir.path().join("payloads");

    let url = upstream.url(&format!("/bytes?n={LARGE}"));
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": url},
            "callback": "BigCallback",
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = task["id"].as_str().unwrap();
    let done = daemon.wait_delivery(id, "delivered").await;
    assert_eq!(done["state"], "completed", "{done}");

    // The row holds a reference, not the body; the body is in the store.
    let (request, outcome) = stored_row(dir.path(), id).await;
    assert_eq!(request["url"], url, "a small request stays inline");
    let outcome = outcome.unwrap();
    let reference = &outcome["response"];
    assert!(PayloadStores::is_storage_ref(reference), "{reference}");
    assert_eq!(reference["$ref"]["store"], "file");
    assert_eq!(outcome["error"], Value::Null);
    assert_eq!(outcome["task_id"], id);
    let key = reference["$ref"]["key"].as_str().unwrap();
    assert!(
        outcome.to_string().len() < 1024,
        "the row is small: {outcome}"
    );
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(store_dir.join(format!("{key}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["status"], 200);

    // Whole from the API and in the webhook.
    let expected = common::call("GET", &url, &[], None).await.body.to_vec();
    assert_eq!(expected.len(), LARGE);
    let shown = &done["outcome"]["response"];
    assert_eq!(shown["status"], 200, "{}", shown["status"]);
    assert!(
        body_bytes(&shown["body"]) == expected,
        "the API shows the body"
    );
    assert!(shown == &stored, "the API shows what the store holds");
    let delivered = receiver.wait(1).await;
    common::verify_webhook(common::SECRET, &delivered[0]).unwrap();
    let webhook = delivered[0].json();
    assert_eq!(webhook["data"]["task_id"], id);
    assert!(
        webhook["data"]["response"] == stored,
        "the webhook carries it inline"
    );
    assert!(body_bytes(&webhook["data"]["response"]["body"]) == expected);

    // A large request goes to the store as well, and runs.
    let big_body = "b".repeat(20_000);
    let posted = daemon
        .submit(&json!({
            "request": {"http_method": "post", "url": upstream.url("/mirror"),
                        "headers": {"content-type": "application/octet-stream"},
                        "body": {"encoding": "binary", "value": STANDARD.encode(&big_body), "charset": "ASCII-8BIT"}},
        }))
        .await;
    let posted_id = posted["id"].as_str().unwrap();
    assert_eq!(
        posted["request"]["body"]["value"],
        STANDARD.encode(&big_body)
    );
    let posted_done = daemon.wait_finished(posted_id).await;
    assert_eq!(posted_done["state"], "completed", "{posted_done}");
    assert!(body_bytes(&posted_done["outcome"]["response"]["body"]) == big_body.as_bytes());
    assert_eq!(
        posted_done["request"]["body"]["value"],
        STANDARD.encode(&big_body)
    );
    let (request, _) = stored_row(dir.path(), posted_id).await;
    assert!(PayloadStores::is_storage_ref(&request), "{request}");
    // Both tasks' outcomes and the second one's request.
    assert_eq!(
        store_files(&store_dir).len(),
        3,
        "{:?}",
        store_files(&store_dir)
    );

    // A payload missing from the store: 503 in the contract's shape.
    std::fs::remove_file(store_dir.join(format!("{key}.json"))).unwrap();
    let reply = daemon.get(&format!("/v1/tasks/{id}")).await;
    let error = reply.assert_error(503, "unavailable");
    assert!(error["message"].as_str().unwrap().contains(key), "{error}");
    let reply = daemon.get("/v1/tasks?limit=10").await;
    reply.assert_error(503, "unavailable");
    daemon.stop().await.unwrap();

    // Purging the tasks deletes what they stored.
    let db = Db::open(&format!(
        "sqlite://{}",
        dir.path().join("patient.db").display()
    ))
    .await
    .unwrap();
    let payloads = Payloads::new(
        Some(Arc::new(PayloadStores::new().with_store(
            "file",
            Arc::new(FileStore::new(&store_dir).unwrap()),
        ))),
        None,
    );
    assert_eq!(store_files(&store_dir).len(), 2);
    purge(&db, Duration::ZERO, &payloads).await;
    assert_eq!(store_files(&store_dir), Vec::<String>::new());
    assert!(db.get(id).await.unwrap().is_none());
}

/// Writes `value` to a secret file in `dir` and returns its path.
fn secret_file(dir: &TempDir, name: &str, value: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_tasks_leave_nothing_in_clear_and_rotation_keeps_old_ones_readable() {
    const OLD: &str = "the first payload secret, 32+ bytes";
    const NEW: &str = "the rotated payload secret, 32+ bytes";
    let upstream = Upstream::start().await.unwrap();
    let receiver = Receiver::start(&[]).await;
    let secrets = TempDir::new("secrets");
    let old_file = secret_file(&secrets, "old", OLD);
    let new_file = secret_file(&secrets, "new", NEW);
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let token = format!("tok-{unique}");
    let note = format!("note-{unique}");
    let body = format!("confidential-{unique}");
    let with_old = [
        ("PATIENT_SECRETS__OLD__FILE", old_file.as_str()),
        ("PATIENT_ENCRYPTION__SECRETS", "old"),
    ];
    let daemon = Daemon::start(&with_old).await;
    let dir = daemon.dir();

    let submitted = daemon
        .submit(&json!({
            "request": {"http_method": "post", "url": upstream.url("/echo"),
                        "headers": {"authorization": format!("Bearer {token}"), "x-account-note": note,
                                    "content-type": "text/plain"},
                        "body": {"encoding": "text", "value": body, "charset": "UTF-8"}},
            "callback": "SecretCallback",
            "deliver": {"webhook": {"url": receiver.url}},
        }))
        .await;
    let id = submitted["id"].as_str().unwrap().to_owned();
    let done = daemon.wait_delivery(&id, "delivered").await;
    assert_eq!(done["state"], "completed", "{done}");

    // The API shows the request and outcome decrypted, a credential header
    // never in clear; the upstream got the request decrypted, header and
    // body included.
    let show = |task: &Value| {
        assert_eq!(task["request"]["headers"]["x-account-note"], note, "{task}");
        assert_eq!(
            task["request"]["headers"]["authorization"], "<redacted>",
            "{task}"
        );
        assert_eq!(task["request"]["body"]["value"], body, "{task}");
        assert_eq!(task["outcome"]["response"]["status"], 200, "{task}");
        let echo: Value = serde_json::from_str(
            task["outcome"]["response"]["body"]["value"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(echo["headers"]["authorization"], format!("Bearer {token}"));
        assert_eq!(echo["headers"]["x-account-note"], note);
        assert_eq!(echo["body"], body);
    };
    show(&done);
    show(&daemon.task(&id).await);
    let listed = daemon.get("/v1/tasks?limit=5").await.json();
    assert_eq!(
        listed["tasks"][0]["outcome"], done["outcome"],
        "lists show outcomes decrypted too"
    );

    // The database holds envelopes only: none of the values in clear, in
    // the main file or the WAL.
    let (request, outcome) = stored_row(dir.path(), &id).await;
    assert!(Encryptor::is_encrypted(&request), "{request}");
    let outcome = outcome.unwrap();
    assert!(Encryptor::is_encrypted(&outcome["response"]), "{outcome}");
    let raw = database_bytes(dir.path());
    for clear in [&token, &note, &body] {
        assert!(!contains(&raw, clear), "{clear} is in the database file");
    }

    // The webhook carries the envelope, which the secret decrypts.
    let delivered = receiver.wait(1).await;
    common::verify_webhook(common::SECRET, &delivered[0]).unwrap();
    let data = delivered[0].json()["data"].clone();
    assert!(Encryptor::is_encrypted(&data["response"]), "{data}");
    assert!(!delivered[0]
        .body
        .windows(body.len())
        .any(|w| w == body.as_bytes()));
    let decrypted = Encryptor::aes_gcm(&[OLD])
        .unwrap()
        .decrypt(&data["response"])
        .unwrap();
    assert_eq!(decrypted, done["outcome"]["response"]);
    daemon.stop().await.unwrap();
    let raw = database_bytes(dir.path());
    for clear in [&token, &note, &body] {
        assert!(
            !contains(&raw, clear),
            "{clear} is in the database file after the stop"
        );
    }

    // Rotation: a new first secret, the old one second: the old task still
    // reads, and new tasks are written with the new secret.
    let rotated = [
        ("PATIENT_SECRETS__OLD__FILE", old_file.as_str()),
        ("PATIENT_SECRETS__NEW__FILE", new_file.as_str()),
        ("PATIENT_ENCRYPTION__SECRETS", "new,old"),
    ];
    let daemon = Daemon::start_in(Arc::clone(&dir), &rotated).await;
    show(&daemon.task(&id).await);
    let fresh = daemon
        .submit(&json!({
            "request": {"http_method": "post", "url": upstream.url("/mirror"),
                        "headers": {"content-type": "text/plain"},
                        "body": {"encoding": "text", "value": body, "charset": "UTF-8"}},
        }))
        .await;
    let fresh_id = fresh["id"].as_str().unwrap().to_owned();
    let fresh_done = daemon.wait_finished(&fresh_id).await;
    assert_eq!(fresh_done["outcome"]["response"]["body"]["value"], body);
    let (fresh_request, _) = stored_row(dir.path(), &fresh_id).await;
    let new_only = Encryptor::aes_gcm(&[NEW]).unwrap();
    assert_eq!(
        new_only.decrypt(&fresh_request).unwrap()["body"]["value"],
        body
    );
    assert!(Encryptor::aes_gcm(&[OLD])
        .unwrap()
        .decrypt(&fresh_request)
        .is_err());
    daemon.stop().await.unwrap();

    // With the old secret dropped, its task cannot be read: a 503 in the
    // contract's shape, never a 500; the new one still reads.
    let new_only = [
        ("PATIENT_SECRETS__NEW__FILE", new_file.as_str()),
        ("PATIENT_ENCRYPTION__SECRETS", "new"),
    ];
    let daemon = Daemon::start_in(Arc::clone(&dir), &new_only).await;
    daemon
        .get(&format!("/v1/tasks/{id}"))
        .await
        .assert_error(503, "unavailable");
    assert_eq!(
        daemon.task(&fresh_id).await["outcome"]["response"]["body"]["value"],
        body
    );
    daemon.stop().await.unwrap();
}

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_store_holds_large_outcomes_and_a_redis_list_gets_its_own_copy() {
    let Some(url) = redis_url() else { return };
    let mut redis = redis_connection(&url).await;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("patient-test:payloads:{unique}:");
    let list = format!("patient-test:list:{unique}");
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[
        ("PATIENT_REDIS_URL", &url),
        ("PATIENT_PAYLOAD_STORE__KIND", "redis"),
        ("PATIENT_PAYLOAD_STORE__NAME", "shared"),
        ("PATIENT_PAYLOAD_STORE__PREFIX", &prefix),
        ("PATIENT_PAYLOAD_STORE__THRESHOLD", "2048"),
    ])
    .await;
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/bytes?n=100000")},
            "callback": "ListCallback",
            "deliver": {"redis": {"list": list}},
        }))
        .await;
    let id = task["id"].as_str().unwrap();
    let done = daemon.wait_delivery(id, "delivered").await;
    let response = done["outcome"]["response"].clone();
    assert_eq!(
        body_bytes(&response["body"]).len(),
        100_000,
        "{}",
        response["status"]
    );

    let (_, outcome) = stored_row(daemon.dir().path(), id).await;
    let stored_ref = outcome.unwrap()["response"].clone();
    assert_eq!(stored_ref["$ref"]["store"], "shared", "{stored_ref}");
    let stored_key = format!("{prefix}{}", stored_ref["$ref"]["key"].as_str().unwrap());
    let stored: String = redis::cmd("GET")
        .arg(&stored_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(serde_json::from_str::<Value>(&stored).unwrap() == response);

    // The list entry's reference is the receiver's copy under another key.
    let entry: String = redis::cmd("RPOP")
        .arg(&list)
        .query_async(&mut redis)
        .await
        .unwrap();
    let event: Value = serde_json::from_str(&entry).unwrap();
    assert_eq!(event["task_id"], id);
    let delivered_ref = &event["response"];
    assert!(PayloadStores::is_storage_ref(delivered_ref), "{event}");
    assert_ne!(delivered_ref, &stored_ref);
    let delivered_key = format!("{prefix}{}", delivered_ref["$ref"]["key"].as_str().unwrap());
    let copy: String = redis::cmd("GET")
        .arg(&delivered_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(serde_json::from_str::<Value>(&copy).unwrap() == response);

    // The consumer deletes its copy once done: the task still reads.
    let _: () = redis::cmd("DEL")
        .arg(&delivered_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(daemon.task(id).await["outcome"]["response"] == response);
    daemon.stop().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&stored_key)
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// Fetches (from the file store directory) and decrypts the payload of a
/// Sidekiq job as the PatientHttp gem's `CallbackWorker` does, with Ruby's
/// Active Support and the gem's key derivation (`KeyGenerator`'s digest
/// SHA-1, or SHA-256 as in a Rails 7 app).
const RUBY_CALLBACK_WORKER: &str = r##"
require "json"
require "active_support"
require "active_support/key_generator"
require "active_support/message_encryptor"

dir, serializer, digest, *keys = ARGV
digest_class = {"sha1" => OpenSSL::Digest::SHA1, "sha256" => OpenSSL::Digest::SHA256}.fetch(digest)
generate = lambda do |key|
  salt = "patient_http_payload_encryption"
  len = ActiveSupport::MessageEncryptor.key_len
  if ActiveSupport::KeyGenerator.respond_to?(:hash_digest_class) || digest == "sha1"
    ActiveSupport::KeyGenerator.new(key, hash_digest_class: digest_class).generate_key(salt, len)
  else
    # Active Support before 7.0 ignores `hash_digest_class:` (SHA-1 always):
    # derive as 7.0's `KeyGenerator#generate_key` does.
    OpenSSL::PKCS5.pbkdf2_hmac(key, salt, 2**16, len, digest_class.new)
  end
end
options = {cipher: "aes-256-gcm"}
options[:serializer] = JSON if serializer == "json"
encryptor = ActiveSupport::MessageEncryptor.new(generate.call(keys.first), **options)
keys[1..].each { |key| encryptor.rotate(generate.call(key)) }

job = JSON.parse($stdin.read)
data = job["args"][0]
if data.is_a?(Hash) && data.key?("$ref")
  data = JSON.parse(File.read(File.join(dir, "#{data["$ref"]["key"]}.json")))
end
if data.is_a?(Hash) && data["__encrypted__"]
  data = JSON.parse(encryptor.decrypt_and_verify(data["value"].unpack1("m")))
end
puts JSON.generate("kind" => job["args"][1], "callback" => job["args"][2], "payload" => data)
"##;

/// Runs [`RUBY_CALLBACK_WORKER`] on `job`; `None` when Ruby with Active
/// Support is not installed.
fn ruby_worker(
    dir: &Path,
    serializer: &str,
    digest: KeyDigest,
    keys: &[&str],
    job: &str,
) -> Option<Value> {
    let available = Command::new("ruby")
        .args([
            "-e",
            "require 'active_support'; require 'active_support/message_encryptor'",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(
            std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "PATIENT_REQUIRE_SERVICES=1 but ruby with Active Support is not installed"
        );
        eprintln!("notice: skipping the Ruby side: ruby with Active Support is not installed");
        return None;
    }
    let mut child = Command::new("ruby")
        .args(["-e", RUBY_CALLBACK_WORKER, "--"])
        .arg(dir)
        .arg(serializer)
        .arg(digest.as_str())
        .args(keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "ruby: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(serde_json::from_slice(&output.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidekiq_jobs_carry_what_the_gem_decrypts_with_active_support() {
    const KEY: &str = "the gem's encryption_key";
    let Some(url) = redis_url() else { return };
    let mut redis = redis_connection(&url).await;
    let queue = format!("patient-payloads-{}", uuid::Uuid::new_v4().simple());
    let upstream = Upstream::start().await.unwrap();
    let secrets = TempDir::new("secrets");
    let key_file = secret_file(&secrets, "gem", KEY);
    let daemon = Daemon::start(&[
        ("PATIENT_REDIS_URL", &url),
        ("PATIENT_SECRETS__GEM__FILE", &key_file),
        ("PATIENT_ENCRYPTION__SECRETS", "gem"),
        ("PATIENT_ENCRYPTION__FORMAT", "active_support"),
        ("PATIENT_PAYLOAD_STORE__KIND", "file"),
        ("PATIENT_PAYLOAD_STORE__NAME", "files"),
        ("PATIENT_PAYLOAD_STORE__THRESHOLD", "8192"),
    ])
    .await;
    let store_dir = daemon.dir().path().join("payloads");
    let small = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/json")},
            "callback": "SmallCallback", "callback_args": {"doc": 1},
            "deliver": {"sidekiq": {"queue": queue}},
        }))
        .await;
    let large = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url("/bytes?n=50000")},
            "callback": "LargeCallback", "callback_args": {"doc": 2},
            "deliver": {"sidekiq": {"queue": queue}},
        }))
        .await;
    let mut shown = Vec::new();
    for task in [&small, &large] {
        let id = task["id"].as_str().unwrap();
        let done = daemon.wait_delivery(id, "delivered").await;
        shown.push(done["outcome"]["response"].clone());
    }

    let jobs: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("queue:{queue}"))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2);
    let rust = Encryptor::active_support(&[KEY], Serializer::Marshal).unwrap();
    for (callback, expected) in [("SmallCallback", &shown[0]), ("LargeCallback", &shown[1])] {
        let job = jobs
            .iter()
            .find(|j| j.contains(callback))
            .unwrap_or_else(|| panic!("no job for {callback}: {jobs:?}"));
        let parsed: Value = serde_json::from_str(job).unwrap();
        assert_eq!(parsed["args"][1], "response");
        let data = &parsed["args"][0];
        // Small: the envelope itself; large: a reference to it.
        let envelope = if callback == "LargeCallback" {
            assert!(PayloadStores::is_storage_ref(data), "{data}");
            assert_eq!(data["$ref"]["store"], "files");
            let key = data["$ref"]["key"].as_str().unwrap();
            serde_json::from_str(
                &std::fs::read_to_string(store_dir.join(format!("{key}.json"))).unwrap(),
            )
            .unwrap()
        } else {
            data.clone()
        };
        assert!(Encryptor::is_encrypted(&envelope), "{envelope}");
        assert!(&rust.decrypt(&envelope).unwrap() == expected, "{callback}");
        if let Some(ruby) = ruby_worker(&store_dir, "marshal", KeyDigest::Sha1, &[KEY], job) {
            assert_eq!(ruby["kind"], "response");
            assert_eq!(ruby["callback"], callback);
            assert!(
                &ruby["payload"] == expected,
                "Ruby loads what the API shows"
            );
        }
    }
    assert_eq!(body_bytes(&shown[1]["body"]).len(), 50_000);
    daemon.stop().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("queue:{queue}"))
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// A Rails 7 app's gem derives its keys with SHA-256: with
/// `encryption.key_digest = "sha256"` the stored request and outcome and the
/// Sidekiq job are written with SHA-256 keys, which Ruby's `KeyGenerator`
/// with `hash_digest_class: OpenSSL::Digest::SHA256` reads. The same data
/// started with the default digest (SHA-1) answers `503` naming the digest,
/// and reads again once the digest is set back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_key_digest_writes_what_a_rails_7_app_decrypts() {
    const KEY: &str = "a Rails 7 app's encryption_key";
    let Some(url) = redis_url() else { return };
    let mut redis = redis_connection(&url).await;
    let queue = format!("patient-payloads-{}", uuid::Uuid::new_v4().simple());
    let upstream = Upstream::start().await.unwrap();
    let secrets = TempDir::new("secrets");
    let key_file = secret_file(&secrets, "rails", KEY);
    let body = format!("confidential-{}", uuid::Uuid::new_v4().simple());
    let settings = |digest: &'static str| {
        [
            ("PATIENT_REDIS_URL", url.clone()),
            ("PATIENT_SECRETS__RAILS__FILE", key_file.clone()),
            ("PATIENT_ENCRYPTION__SECRETS", "rails".to_owned()),
            ("PATIENT_ENCRYPTION__FORMAT", "active_support".to_owned()),
            // Empty: the default.
            ("PATIENT_ENCRYPTION__KEY_DIGEST", digest.to_owned()),
        ]
    };
    let sha256 = settings("sha256");
    let sha256: Vec<(&str, &str)> = sha256.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = Daemon::start(&sha256).await;
    let dir = daemon.dir();
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "post", "url": upstream.url("/mirror"),
                        "headers": {"content-type": "text/plain"},
                        "body": {"encoding": "text", "value": body, "charset": "UTF-8"}},
            "callback": "Rails7Callback",
            "deliver": {"sidekiq": {"queue": queue}},
        }))
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = daemon.wait_delivery(&id, "delivered").await;
    let response = done["outcome"]["response"].clone();
    assert_eq!(response["body"]["value"], body, "{done}");
    daemon.stop().await.unwrap();

    // The row holds envelopes of SHA-256 keys; with the SHA-1 key of the
    // same secret they are refused, naming both digests.
    let rails7 =
        Encryptor::active_support_with(&[KEY], Options::new().with_key_digest(KeyDigest::Sha256))
            .unwrap();
    let sha1 = Encryptor::active_support(&[KEY], Serializer::Marshal).unwrap();
    let (request, outcome) = stored_row(dir.path(), &id).await;
    let outcome = outcome.unwrap();
    for envelope in [&request, &outcome["response"]] {
        assert!(Encryptor::is_encrypted(envelope), "{envelope}");
        let error = sha1.decrypt(envelope).unwrap_err().to_string();
        assert!(
            error.contains("derived with sha256") && error.contains("key digest is sha1"),
            "{error}"
        );
    }
    assert_eq!(rails7.decrypt(&request).unwrap()["body"]["value"], body);
    assert!(rails7.decrypt(&outcome["response"]).unwrap() == response);

    // The Sidekiq job: what a Rails 7 app's `CallbackWorker` decrypts.
    let jobs: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("queue:{queue}"))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job: Value = serde_json::from_str(&jobs[0]).unwrap();
    assert!(Encryptor::is_encrypted(&job["args"][0]), "{job}");
    assert!(rails7.decrypt(&job["args"][0]).unwrap() == response);
    if let Some(ruby) = ruby_worker(dir.path(), "marshal", KeyDigest::Sha256, &[KEY], &jobs[0]) {
        assert_eq!(ruby["callback"], "Rails7Callback");
        assert!(ruby["payload"] == response, "Ruby loads what the API shows");
    }
    let _: () = redis::cmd("DEL")
        .arg(format!("queue:{queue}"))
        .query_async(&mut redis)
        .await
        .unwrap();

    // Started with the default digest: the task is unavailable, and the
    // message says which digest it was written with.
    let default = settings("");
    let default: Vec<(&str, &str)> = default.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = Daemon::start_in(Arc::clone(&dir), &default).await;
    let error = daemon
        .get(&format!("/v1/tasks/{id}"))
        .await
        .assert_error(503, "unavailable");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("derived with sha256") && message.contains("set the key digest to sha256"),
        "{message}"
    );
    assert!(!message.contains(&body), "{message}");
    daemon.stop().await.unwrap();
    let daemon = Daemon::start_in(Arc::clone(&dir), &sha256).await;
    assert_eq!(
        daemon.task(&id).await["request"]["body"]["value"],
        body,
        "set back to sha256, the task reads"
    );
    daemon.stop().await.unwrap();
}

/// Loads settings from `env` (over the test defaults) and starts a daemon
/// on them; the error it stops with.
async fn start_error(env: &[(&str, &str)]) -> String {
    let dir = TempDir::new("bad");
    let mut vars = common::base_env();
    for (k, v) in env {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let settings = match Settings::load(
        None,
        vars,
        &Flags {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().to_owned()),
        },
    ) {
        Ok(settings) => settings,
        Err(e) => return e.to_string(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    match tokio::time::timeout(
        Duration::from_secs(20),
        patient_daemon::run_until(settings, listener, std::future::pending()),
    )
    .await
    .expect("the daemon refuses to start")
    {
        Err(ServeError::Settings(message)) => message,
        Err(other) => other.to_string(),
        Ok(()) => panic!("the daemon started on {env:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payload_settings_are_refused_at_start_naming_the_setting() {
    let secrets = TempDir::new("secrets");
    let short = secret_file(&secrets, "short", "too short");
    for (env, setting) in [
        (
            &[("PATIENT_PAYLOAD_STORE__KIND", "tape")][..],
            "`payload_store.kind`",
        ),
        (
            &[("PATIENT_ENCRYPTION__SECRETS", "nowhere")],
            "`encryption.secrets`",
        ),
        (
            &[
                ("PATIENT_PAYLOAD_STORE__KIND", "file"),
                ("PATIENT_PAYLOAD_STORE__THRESHOLD", "0"),
            ],
            "`payload_store.threshold`",
        ),
        (
            &[
                ("PATIENT_SECRETS__SHORT__FILE", short.as_str()),
                ("PATIENT_ENCRYPTION__SECRETS", "short"),
            ],
            "`encryption.secrets`",
        ),
    ] {
        let message = start_error(env).await;
        assert!(message.contains(setting), "{env:?}: {message}");
        assert!(
            !message.contains("too short"),
            "the value is never shown: {message}"
        );
    }
    // An unknown key digest is refused naming the setting and the values it
    // takes, whatever its case or spelling.
    for digest in ["sha512", "SHA256", "sha-256", "sha1 "] {
        let message = start_error(&[
            ("PATIENT_SECRETS__SHORT__FILE", short.as_str()),
            ("PATIENT_ENCRYPTION__SECRETS", "short"),
            ("PATIENT_ENCRYPTION__FORMAT", "active_support"),
            ("PATIENT_ENCRYPTION__KEY_DIGEST", digest),
        ])
        .await;
        assert!(
            message.contains("`encryption.key_digest`")
                && message.contains(&format!("{digest:?} is not \"sha1\" or \"sha256\"")),
            "{digest:?}: {message}"
        );
    }
    // A Redis store that cannot be reached stops the start too.
    let message = start_error(&[
        ("PATIENT_PAYLOAD_STORE__KIND", "redis"),
        ("PATIENT_PAYLOAD_STORE__URL", "redis://127.0.0.1:1/"),
    ])
    .await;
    assert!(message.contains("payload store"), "{message}");
}

/// The value of `var`, or `None` (with a notice) when the service is not
/// running; with `PATIENT_REQUIRE_SERVICES=1` a missing service fails.
fn service(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            let hint = "start it with `eval \"$(scripts/services.sh start)\"`";
            assert!(
                std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{what} is required (PATIENT_REQUIRE_SERVICES=1) but {var} is not set; {hint}"
            );
            let _ = writeln!(
                std::io::stderr(),
                "notice: skipping the {what} payload store case: {var} is not set; {hint}"
            );
            None
        }
    }
}

/// Runs one large task on a daemon with the store of `env` (named
/// `name`), checks the row holds a reference to what `store` holds, then
/// purges the task and checks the store no longer holds it.
async fn large_outcome_in(name: &str, env: &[(&str, &str)], store: Arc<dyn PayloadStore>) {
    let upstream = Upstream::start().await.unwrap();
    let mut env = env.to_vec();
    env.extend([
        ("PATIENT_PAYLOAD_STORE__NAME", name),
        ("PATIENT_PAYLOAD_STORE__THRESHOLD", "4096"),
    ]);
    let daemon = Daemon::start(&env).await;
    let task = daemon
        .submit(&json!({"request": {"http_method": "get", "url": upstream.url("/bytes?n=20000")}}))
        .await;
    let id = task["id"].as_str().unwrap();
    let done = daemon.wait_finished(id).await;
    assert_eq!(done["state"], "completed", "{name}: {}", done["state"]);
    let response = &done["outcome"]["response"];
    assert_eq!(body_bytes(&response["body"]).len(), 20_000, "{name}");

    let (_, outcome) = stored_row(daemon.dir().path(), id).await;
    let reference = outcome.unwrap()["response"].clone();
    assert_eq!(reference["$ref"]["store"], name, "{reference}");
    let key = reference["$ref"]["key"].as_str().unwrap().to_owned();
    let held: Value =
        serde_json::from_str(&store.fetch(&key).await.unwrap().expect("stored")).unwrap();
    assert!(
        &held == response,
        "{name}: the store holds what the API shows"
    );
    let dir = daemon.dir();
    daemon.stop().await.unwrap();

    let db = Db::open(&format!(
        "sqlite://{}",
        dir.path().join("patient.db").display()
    ))
    .await
    .unwrap();
    let payloads = Payloads::new(
        Some(Arc::new(
            PayloadStores::new().with_store(name, store.clone()),
        )),
        None,
    );
    purge(&db, Duration::ZERO, &payloads).await;
    assert_eq!(store.fetch(&key).await.unwrap(), None, "{name}: purged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_and_sql_stores_hold_large_outcomes_until_the_purge() {
    // SQLite, in a file of its own.
    let files = TempDir::new("sql-store");
    let sqlite = format!("sqlite:{}", files.path().join("payloads.db").display());
    let table = format!("payloads_{}", uuid::Uuid::new_v4().simple());
    let store = SqlStore::connect(&sqlite, table.clone()).await.unwrap();
    large_outcome_in(
        "sqlite",
        &[
            ("PATIENT_PAYLOAD_STORE__KIND", "sql"),
            ("PATIENT_PAYLOAD_STORE__URL", &sqlite),
            ("PATIENT_PAYLOAD_STORE__TABLE", &table),
        ],
        Arc::new(store),
    )
    .await;

    if let Some(url) = service("PATIENT_TEST_POSTGRES_URL", "PostgreSQL") {
        let store = SqlStore::connect(&url, table.clone()).await.unwrap();
        large_outcome_in(
            "postgres",
            &[
                ("PATIENT_PAYLOAD_STORE__KIND", "sql"),
                ("PATIENT_PAYLOAD_STORE__URL", &url),
                ("PATIENT_PAYLOAD_STORE__TABLE", &table),
            ],
            Arc::new(store),
        )
        .await;
    }

    if let Some(endpoint) = service("PATIENT_TEST_S3_ENDPOINT", "S3 (moto)") {
        let prefix = format!("patient-daemon-test/{}/", uuid::Uuid::new_v4().simple());
        let store = S3Store::new(S3Config {
            endpoint: endpoint.clone(),
            bucket: "patient-daemon-test".into(),
            prefix: prefix.clone(),
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            path_style: true,
            ..S3Config::default()
        })
        .unwrap();
        store.create_bucket().await.unwrap();
        let secrets = TempDir::new("s3-secrets");
        let key_id = secret_file(&secrets, "key_id", "test");
        let secret = secret_file(&secrets, "secret", "test");
        large_outcome_in(
            "s3",
            &[
                ("PATIENT_SECRETS__S3_KEY_ID__FILE", &key_id),
                ("PATIENT_SECRETS__S3_SECRET__FILE", &secret),
                ("PATIENT_PAYLOAD_STORE__KIND", "s3"),
                ("PATIENT_PAYLOAD_STORE__ENDPOINT", &endpoint),
                ("PATIENT_PAYLOAD_STORE__BUCKET", "patient-daemon-test"),
                ("PATIENT_PAYLOAD_STORE__PREFIX", &prefix),
                ("PATIENT_PAYLOAD_STORE__ACCESS_KEY_ID", "s3_key_id"),
                ("PATIENT_PAYLOAD_STORE__SECRET_ACCESS_KEY", "s3_secret"),
            ],
            Arc::new(store),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_deletes_the_stored_outcome_it_replaces() {
    let upstream = Upstream::start().await.unwrap();
    let daemon = Daemon::start(&[
        ("PATIENT_PAYLOAD_STORE__KIND", "file"),
        ("PATIENT_PAYLOAD_STORE__THRESHOLD", "2048"),
    ])
    .await;
    let store_dir = daemon.dir().path().join("payloads");
    let text = "x".repeat(3000);
    let task = daemon
        .submit(&json!({
            "request": {"http_method": "get", "url": upstream.url(&format!("/status/404?body={text}"))},
            "raise_error_responses": true,
        }))
        .await;
    let id = task["id"].as_str().unwrap();
    let failed = daemon.wait_finished(id).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(
        failed["outcome"]["error"]["response"]["body"]["value"],
        text
    );
    // The request (its URL is long) and the error are stored.
    let first = store_files(&store_dir);
    let (request, outcome) = stored_row(daemon.dir().path(), id).await;
    let request_file = format!("{}.json", request["$ref"]["key"].as_str().unwrap());
    let error_file = format!(
        "{}.json",
        outcome.unwrap()["error"]["$ref"]["key"].as_str().unwrap()
    );
    let mut both = vec![request_file.clone(), error_file.clone()];
    both.sort();
    assert_eq!(first, both);

    let retried = daemon
        .post(&format!("/v1/tasks/{id}/retry"), &json!({}))
        .await;
    assert_eq!(retried.status, 200, "{}", retried.text());
    assert_eq!(retried.json()["outcome"], Value::Null);
    let again = daemon
        .wait_task(id, "failed again", |t| t["state"] == "failed")
        .await;
    assert_eq!(again["outcome"]["error"]["response"]["body"]["value"], text);
    // The request stays; the first error is gone, the new one stored.
    let second = store_files(&store_dir);
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.contains(&request_file), "{second:?}");
    assert!(!second.contains(&error_file), "{second:?}");
    daemon.stop().await.unwrap();
}
