//! Encryption throughput: `Encryptor` (JSON text, AES-256-GCM, Base64 and
//! the `{"__encrypted__": true, "value": …}` envelope, and back) versus the
//! raw AES-256-GCM seal and open of `ring` on the same JSON bytes, same run.
//!
//! ```text
//! cargo run --release -p patient-bench --bin encryption [-- --sizes 1024,65536,1048576 --rounds 5 --ms 400]
//! ```
//!
//! Prints one line per size and side (`side=raw` or `side=encryptor`) with
//! `mb_s` (encrypt then decrypt, the payload counted once), `encrypt_mb_s`
//! (encrypt only) and `decrypt_mb_s` (decrypt only; for raw AES-GCM the
//! round trip less the encryption, as opening in place consumes the ciphertext); one `side=parts` line with the throughput of the
//! pieces around the cipher (JSON serialize/parse, Base64 encode/decode); and
//! one ratio line per size against the target (`ratio>=0.8`). Figures are
//! the median of the rounds; raw and encryptor alternate within each round.

use std::{
    hint::black_box,
    process::ExitCode,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use patient_bench::{
    args::Args,
    report::{push_ratio, Line},
    stats::median,
};
use patient_store::Encryptor;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde_json::{json, Value};

const BENCH: &str = "encryption";
const TARGET_RATIO: f64 = 0.8;
const TARGET: &str = "ratio>=0.8";
const MB: f64 = 1_000_000.0;

const USAGE: &str = "usage: encryption [--sizes BYTES,…] [--rounds R] [--ms MS]

Encrypts and decrypts payloads whose JSON text is about BYTES long (default
1024,65536,1048576) through Encryptor and through raw ring AES-256-GCM, for
MS milliseconds per measurement (default 400), R rounds (default 5).";

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1), &["--sizes", "--ms"], &[]) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.has("--help") || args.has("-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let settings = (
        args.list("--sizes", &[1024usize, 65_536, 1_048_576]),
        args.get("--rounds", 5usize),
        args.get("--ms", 400u64),
    );
    let (sizes, rounds, ms) = match settings {
        (Ok(sizes), Ok(rounds), Ok(ms)) => (sizes, rounds.max(1), ms.max(1)),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&sizes, rounds, Duration::from_millis(ms)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            println!("{}", Line::new(BENCH).text("error", error));
            ExitCode::from(3)
        }
    }
}

fn run(sizes: &[usize], rounds: usize, budget: Duration) -> Result<bool, String> {
    let encryptor =
        Encryptor::aes_gcm(&["benchmark secret of 32 bytes...."]).map_err(|e| e.to_string())?;
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| "bad raw key".to_owned())?,
    );
    let mut all_pass = true;
    for &size in sizes {
        let value = payload(size);
        let json = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
        check_round_trip(&encryptor, &value)?;

        let mut raw = Samples::default();
        let mut ours = Samples::default();
        let mut parts = Parts::default();
        for _ in 0..rounds {
            raw.push(measure_raw(&key, &json, budget)?);
            ours.push(measure_encryptor(&encryptor, &value, json.len(), budget)?);
            parts.push(&value, &json, budget);
        }

        let raw_line = raw.line(size, json.len(), "raw");
        let ours_line = ours.line(size, json.len(), "encryptor");
        println!("{raw_line}");
        println!("{ours_line}");
        println!("{}", parts.line(size, json.len()));
        let ratio = match (ours.mb_s(), raw.mb_s()) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let pass = ratio.is_some_and(|r| r >= TARGET_RATIO);
        all_pass &= pass;
        let line = Line::new(BENCH).text("size", size);
        let line = push_ratio(line, "ratio", ratio);
        let line = push_ratio(
            line,
            "ratio_encrypt",
            ratio_of(ours.encrypt_mb_s(), raw.encrypt_mb_s()),
        );
        let line = push_ratio(
            line,
            "ratio_decrypt",
            ratio_of(ours.decrypt_mb_s(), raw.decrypt_mb_s()),
        );
        println!("{}", line.text("target", TARGET).text("pass", pass));
    }
    Ok(all_pass)
}

fn ratio_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// A response-shaped payload whose JSON text is about `size` bytes: the body
/// is printable ASCII text without characters JSON must escape.
fn payload(size: usize) -> Value {
    let mut shell = json!({
        "status": 200,
        "headers": {"content-type": "text/plain; charset=utf-8", "x-request-id": "b5c3"},
        "body": {"encoding": "text", "value": "", "charset": "UTF-8"},
        "duration": 0.125,
        "request_id": "b5c3",
        "url": "https://api.example.com/reports/42",
        "http_method": "get",
        "callback_args": {"report_id": 42},
        "redirects": []
    });
    let overhead = shell.to_string().len();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let text: String = (0..size.saturating_sub(overhead))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Letters, digits and spaces.
            const ALPHABET: &[u8] =
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      ";
            char::from(ALPHABET[(state % ALPHABET.len() as u64) as usize])
        })
        .collect();
    shell["body"]["value"] = Value::String(text);
    shell
}

fn check_round_trip(encryptor: &Encryptor, value: &Value) -> Result<(), String> {
    let sealed = encryptor.encrypt(value).map_err(|e| e.to_string())?;
    let opened = encryptor.decrypt(&sealed).map_err(|e| e.to_string())?;
    if &opened == value {
        Ok(())
    } else {
        Err("the round trip changed the payload".to_owned())
    }
}

/// Throughput of one round, in MB/s of JSON text.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Encrypt only.
    encrypt_mb_s: f64,
    /// Decrypt only (for raw AES-GCM derived: the round trip less the
    /// encryption, as opening in place consumes the ciphertext).
    decrypt_mb_s: f64,
    /// Encrypt then decrypt, the payload counted once.
    mb_s: f64,
}

impl Sample {
    fn new(encrypt_mb_s: f64, mb_s: f64) -> Sample {
        let decrypt_s_per_mb = 1.0 / mb_s - 1.0 / encrypt_mb_s;
        Sample {
            encrypt_mb_s,
            decrypt_mb_s: if decrypt_s_per_mb > 0.0 {
                1.0 / decrypt_s_per_mb
            } else {
                f64::INFINITY
            },
            mb_s,
        }
    }
}

#[derive(Default)]
struct Samples(Vec<Sample>);

impl Samples {
    fn push(&mut self, sample: Sample) {
        self.0.push(sample);
    }

    fn mb_s(&self) -> Option<f64> {
        median(self.0.iter().map(|s| s.mb_s).collect())
    }

    fn encrypt_mb_s(&self) -> Option<f64> {
        median(self.0.iter().map(|s| s.encrypt_mb_s).collect())
    }

    fn decrypt_mb_s(&self) -> Option<f64> {
        median(self.0.iter().map(|s| s.decrypt_mb_s).collect())
    }

    fn line(&self, size: usize, json_bytes: usize, side: &str) -> Line {
        Line::new(BENCH)
            .text("size", size)
            .text("side", side)
            .text("json_bytes", json_bytes)
            .round("mb_s", self.mb_s().unwrap_or(0.0))
            .round("encrypt_mb_s", self.encrypt_mb_s().unwrap_or(0.0))
            .round("decrypt_mb_s", self.decrypt_mb_s().unwrap_or(0.0))
            .text("rounds", self.0.len())
    }
}

/// MB/s of `bytes` per call of `f`, calling it for about `budget` in
/// batches of at least 1 ms (so the clock is read rarely).
fn rate(
    bytes: usize,
    budget: Duration,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let mut batch = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..batch {
            f()?;
        }
        if start.elapsed() >= Duration::from_millis(1) {
            break;
        }
        batch *= 2;
    }
    let start = Instant::now();
    let mut calls = 0u64;
    while calls == 0 || start.elapsed() < budget {
        for _ in 0..batch {
            f()?;
        }
        calls += batch;
    }
    Ok(bytes as f64 * calls as f64 / MB / start.elapsed().as_secs_f64())
}

fn measure_raw(key: &LessSafeKey, json: &[u8], budget: Duration) -> Result<Sample, String> {
    let mut buffer = json.to_vec();
    buffer.reserve(16);
    let mut counter = 0u64;
    let mut nonce = move || {
        counter += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
        nonce
    };
    // Encrypt only: seal the buffer in place again and again.
    let mut scratch = json.to_vec();
    let encrypt = rate(json.len(), budget / 2, || {
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce()),
                Aad::empty(),
                &mut scratch,
            )
            .map_err(|_| "seal failed".to_owned())?;
        let _ = black_box(tag);
        Ok(())
    })?;
    let round_trip = rate(json.len(), budget / 2, || {
        let n = nonce();
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buffer)
            .map_err(|_| "seal failed".to_owned())?;
        buffer.extend_from_slice(tag.as_ref());
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buffer)
            .map_err(|_| "open failed".to_owned())?;
        let len = black_box(plain).len();
        buffer.truncate(len);
        Ok(())
    })?;
    if buffer != json {
        return Err("the raw round trip changed the payload".to_owned());
    }
    Ok(Sample::new(encrypt, round_trip))
}

fn measure_encryptor(
    encryptor: &Encryptor,
    value: &Value,
    json_bytes: usize,
    budget: Duration,
) -> Result<Sample, String> {
    let encrypt = rate(json_bytes, budget / 2, || {
        let sealed = encryptor
            .encrypt(black_box(value))
            .map_err(|e| e.to_string())?;
        black_box(sealed);
        Ok(())
    })?;
    let sealed = encryptor.encrypt(value).map_err(|e| e.to_string())?;
    let decrypt = rate(json_bytes, budget / 4, || {
        let opened = encryptor
            .decrypt(black_box(&sealed))
            .map_err(|e| e.to_string())?;
        black_box(opened);
        Ok(())
    })?;
    let round_trip = rate(json_bytes, budget / 4, || {
        let sealed = encryptor
            .encrypt(black_box(value))
            .map_err(|e| e.to_string())?;
        let opened = encryptor.decrypt(&sealed).map_err(|e| e.to_string())?;
        black_box(opened);
        Ok(())
    })?;
    Ok(Sample {
        encrypt_mb_s: encrypt,
        decrypt_mb_s: decrypt,
        mb_s: round_trip,
    })
}

/// Throughput of the pieces around the cipher, for diagnosis.
#[derive(Default)]
struct Parts {
    json_serialize: Vec<f64>,
    json_parse: Vec<f64>,
    base64_encode: Vec<f64>,
    base64_decode: Vec<f64>,
}

fn mb_s_of(bytes: usize, budget: Duration, mut f: impl FnMut()) -> f64 {
    rate(bytes, budget, || {
        f();
        Ok(())
    })
    .unwrap_or(0.0)
}

impl Parts {
    fn push(&mut self, value: &Value, json: &[u8], budget: Duration) {
        let part = budget / 4;
        let encoded = STANDARD.encode(json);
        self.json_serialize.push(mb_s_of(json.len(), part, || {
            black_box(serde_json::to_vec(black_box(value)).map(|v| v.len()).ok());
        }));
        self.json_parse.push(mb_s_of(json.len(), part, || {
            black_box(serde_json::from_slice::<Value>(black_box(json)).is_ok());
        }));
        self.base64_encode.push(mb_s_of(json.len(), part, || {
            black_box(STANDARD.encode(black_box(json)).len());
        }));
        self.base64_decode.push(mb_s_of(json.len(), part, || {
            black_box(STANDARD.decode(black_box(&encoded)).map(|v| v.len()).ok());
        }));
    }

    fn line(&self, size: usize, json_bytes: usize) -> Line {
        let m = |v: &Vec<f64>| median(v.clone()).unwrap_or(0.0);
        Line::new(BENCH)
            .text("size", size)
            .text("side", "parts")
            .text("json_bytes", json_bytes)
            .round("json_serialize_mb_s", m(&self.json_serialize))
            .round("json_parse_mb_s", m(&self.json_parse))
            .round("base64_encode_mb_s", m(&self.base64_encode))
            .round("base64_decode_mb_s", m(&self.base64_decode))
    }
}
