//! Bodies: reading a response under `max_response_size`, response
//! decompression (gzip, deflate, br) and request compression (gzip).

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Request bodies of at least this many bytes are gzipped when request
/// compression is on.
pub(crate) const COMPRESS_MIN_SIZE: usize = 1024;

/// Why reading a body stopped.
pub(crate) enum ReadError {
    /// More than the limit arrived.
    TooLarge { read: usize },
    /// The connection failed.
    Hyper(hyper::Error),
    /// No data arrived within the stall timeout.
    Stalled { after: std::time::Duration },
}

/// Reads the whole body, failing as soon as more than `limit` bytes arrived.
/// A body of one frame is returned without copying.
pub(crate) async fn read_limited(
    mut body: Incoming,
    limit: usize,
    content_length: Option<u64>,
    stall: Option<std::time::Duration>,
) -> Result<Bytes, ReadError> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        let next = match stall {
            None => body.frame().await,
            Some(after) => tokio::time::timeout(after, body.frame())
                .await
                .map_err(|_| ReadError::Stalled { after })?,
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(ReadError::Hyper)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if data.is_empty() {
            continue;
        }
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(ReadError::TooLarge { read: total });
        }
        match (&mut first, &mut rest) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let hint = content_length
                    .map_or(0, |n| n as usize)
                    .min(limit)
                    .max(head.len() + data.len());
                let mut buf = BytesMut::with_capacity(hint);
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                first = None;
                rest = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    Ok(match (first, rest) {
        (_, Some(buf)) => buf.freeze(),
        (Some(data), None) => data,
        (None, None) => Bytes::new(),
    })
}

/// A content coding the client decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    Deflate,
    Brotli,
}

/// The response's single supported content coding, if any.
pub(crate) fn response_coding(headers: &HeaderMap) -> Option<Coding> {
    let value = headers.get(header::CONTENT_ENCODING)?.to_str().ok()?.trim();
    if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
        Some(Coding::Gzip)
    } else if value.eq_ignore_ascii_case("deflate") {
        Some(Coding::Deflate)
    } else if value.eq_ignore_ascii_case("br") {
        Some(Coding::Brotli)
    } else {
        None
    }
}

/// Why decoding failed.
pub(crate) enum DecodeError {
    TooLarge,
    Invalid(io::Error),
}

/// Decodes `data`, failing once the output exceeds `limit`.
pub(crate) fn decode(coding: Coding, data: &[u8], limit: usize) -> Result<Bytes, DecodeError> {
    let cap = (limit as u64).saturating_add(1);
    let mut out = Vec::with_capacity((data.len() * 4).min(limit));
    let result = match coding {
        Coding::Gzip => flate2::read::MultiGzDecoder::new(data)
            .take(cap)
            .read_to_end(&mut out),
        Coding::Deflate if is_zlib(data) => flate2::read::ZlibDecoder::new(data)
            .take(cap)
            .read_to_end(&mut out),
        Coding::Deflate => flate2::read::DeflateDecoder::new(data)
            .take(cap)
            .read_to_end(&mut out),
        Coding::Brotli => brotli_decompressor::Decompressor::new(data, 4096)
            .take(cap)
            .read_to_end(&mut out),
    };
    result.map_err(DecodeError::Invalid)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge);
    }
    Ok(Bytes::from(out))
}

/// Whether a "deflate" body is zlib-wrapped (as the RFC says) rather than raw.
fn is_zlib(data: &[u8]) -> bool {
    data.len() >= 2
        && data[0] & 0x0f == 8
        && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0
}

/// Gzips a request body.
pub(crate) fn gzip(data: &[u8]) -> io::Result<Bytes> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    encoder.write_all(data)?;
    Ok(Bytes::from(encoder.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_round_trips_and_limits() {
        let data = vec![b'a'; 10_000];
        let gz = gzip(&data).unwrap();
        assert_eq!(
            decode(Coding::Gzip, &gz, 10_000).ok().unwrap().len(),
            10_000
        );
        assert!(matches!(
            decode(Coding::Gzip, &gz, 9_999),
            Err(DecodeError::TooLarge)
        ));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        let z = z.finish().unwrap();
        assert_eq!(
            decode(Coding::Deflate, &z, 10_000).ok().unwrap().len(),
            10_000
        );
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&data).unwrap();
        let raw = raw.finish().unwrap();
        assert_eq!(
            decode(Coding::Deflate, &raw, 10_000).ok().unwrap().len(),
            10_000
        );
        assert!(matches!(
            decode(Coding::Gzip, b"not gzip", 100),
            Err(DecodeError::Invalid(_))
        ));
    }
}
