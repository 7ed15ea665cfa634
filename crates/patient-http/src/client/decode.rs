//! Content codings: streamed response decompression (gzip, deflate, br),
//! chunk by chunk under a size limit, and request compression (gzip).

use std::io::{self, Write};

use bytes::Bytes;
use http::{header, HeaderMap};

/// The default of `request_compression_min_size`: request bodies of at least
/// this many bytes are gzipped when request compression is on.
pub(crate) const COMPRESS_MIN_SIZE: usize = 1024;

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
#[derive(Debug)]
pub(crate) enum DecodeError {
    /// The decoded body passed the limit.
    TooLarge,
    /// The body is not valid in its coding.
    Invalid(io::Error),
}

/// Collects decoded output, failing a write that would pass the limit (so
/// a small compressed chunk cannot expand without bound).
struct Sink {
    out: Vec<u8>,
    produced: usize,
    limit: usize,
    exceeded: bool,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() > self.limit - self.produced {
            self.exceeded = true;
            return Err(io::Error::other("the decoded body exceeds the size limit"));
        }
        self.out.extend_from_slice(buf);
        self.produced += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Kind {
    Gzip(flate2::write::MultiGzDecoder<Sink>),
    /// A "deflate" body before its first two bytes tell zlib from raw.
    Deflate {
        head: Vec<u8>,
        sink: Option<Sink>,
    },
    Zlib(flate2::write::ZlibDecoder<Sink>),
    RawDeflate(flate2::write::DeflateDecoder<Sink>),
    Brotli(brotli_decompressor::DecompressorWriter<Sink>),
}

/// A streaming decoder: compressed chunks in, decoded bytes out as soon as
/// they are available.
pub(crate) struct Decoder {
    kind: Kind,
    /// Whether any input arrived (an empty body is not a truncated one).
    fed: bool,
}

impl Decoder {
    /// A decoder whose output is limited to `limit` bytes (`None`: no limit).
    pub(crate) fn new(coding: Coding, limit: Option<usize>) -> Decoder {
        let sink = Sink {
            out: Vec::new(),
            produced: 0,
            limit: limit.unwrap_or(usize::MAX),
            exceeded: false,
        };
        let kind = match coding {
            Coding::Gzip => Kind::Gzip(flate2::write::MultiGzDecoder::new(sink)),
            Coding::Deflate => Kind::Deflate {
                head: Vec::new(),
                sink: Some(sink),
            },
            Coding::Brotli => {
                Kind::Brotli(brotli_decompressor::DecompressorWriter::new(sink, 4096))
            }
        };
        Decoder { kind, fed: false }
    }

    /// Decodes one chunk; returns what it decoded to (possibly nothing yet).
    pub(crate) fn push(&mut self, input: &[u8]) -> Result<Bytes, DecodeError> {
        if input.is_empty() {
            return Ok(Bytes::new());
        }
        self.fed = true;
        if let Kind::Deflate { head, sink } = &mut self.kind {
            head.extend_from_slice(input);
            if head.len() < 2 {
                return Ok(Bytes::new());
            }
            let head = std::mem::take(head);
            let Some(sink) = sink.take() else {
                return Err(DecodeError::Invalid(io::Error::other("decoder reused")));
            };
            self.kind = if is_zlib(&head) {
                Kind::Zlib(flate2::write::ZlibDecoder::new(sink))
            } else {
                Kind::RawDeflate(flate2::write::DeflateDecoder::new(sink))
            };
            return self.write(&head);
        }
        self.write(input)
    }

    fn write(&mut self, input: &[u8]) -> Result<Bytes, DecodeError> {
        let result = match &mut self.kind {
            Kind::Gzip(d) => feed(d, input),
            Kind::Zlib(d) => feed(d, input),
            Kind::RawDeflate(d) => feed(d, input),
            Kind::Brotli(d) => feed(d, input),
            Kind::Deflate { .. } => Ok(()),
        };
        self.output(result)
    }

    /// Ends the body: returns the last decoded bytes, or an error when the
    /// compressed body is incomplete.
    pub(crate) fn finish(&mut self) -> Result<Bytes, DecodeError> {
        if !self.fed {
            return Ok(Bytes::new());
        }
        let result = match &mut self.kind {
            Kind::Gzip(d) => d.try_finish(),
            Kind::Zlib(d) => d.try_finish(),
            Kind::RawDeflate(d) => d.try_finish(),
            Kind::Brotli(d) => d.close(),
            // One byte of "deflate" is never a whole body.
            Kind::Deflate { .. } => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated deflate body",
            )),
        };
        self.output(result)
    }

    fn sink(&mut self) -> Option<&mut Sink> {
        match &mut self.kind {
            Kind::Gzip(d) => Some(d.get_mut()),
            Kind::Zlib(d) => Some(d.get_mut()),
            Kind::RawDeflate(d) => Some(d.get_mut()),
            Kind::Brotli(d) => Some(d.get_mut()),
            Kind::Deflate { sink, .. } => sink.as_mut(),
        }
    }

    /// The output so far, or the error (over the limit, or invalid data).
    fn output(&mut self, result: io::Result<()>) -> Result<Bytes, DecodeError> {
        let Some(sink) = self.sink() else {
            return Ok(Bytes::new());
        };
        match result {
            Ok(()) => Ok(Bytes::from(std::mem::take(&mut sink.out))),
            Err(_) if sink.exceeded => Err(DecodeError::TooLarge),
            Err(e) => Err(DecodeError::Invalid(e)),
        }
    }
}

/// Writes all of `input` into a decoder and flushes its output; bytes after
/// the end of the compressed stream are ignored.
fn feed<W: Write>(decoder: &mut W, mut input: &[u8]) -> io::Result<()> {
    while !input.is_empty() {
        let n = decoder.write(input)?;
        if n == 0 {
            break;
        }
        input = &input[n..];
    }
    decoder.flush()
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

    /// Decodes `data` fed `chunk` bytes at a time.
    fn decode(
        coding: Coding,
        data: &[u8],
        chunk: usize,
        limit: Option<usize>,
    ) -> Result<Vec<u8>, DecodeError> {
        let mut decoder = Decoder::new(coding, limit);
        let mut out = Vec::new();
        for piece in data.chunks(chunk) {
            out.extend_from_slice(&decoder.push(piece)?);
        }
        out.extend_from_slice(&decoder.finish()?);
        Ok(out)
    }

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .map(|i| b"patient streams "[(i % 16) as usize])
            .collect()
    }

    #[test]
    fn gzip_zlib_and_raw_deflate_decode_in_any_chunking() {
        let data = sample();
        let gz = gzip(&data).unwrap();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        let z = z.finish().unwrap();
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&data).unwrap();
        let raw = raw.finish().unwrap();
        for chunk in [1, 7, 4096, usize::MAX] {
            assert_eq!(decode(Coding::Gzip, &gz, chunk, None).unwrap(), data);
            assert_eq!(decode(Coding::Deflate, &z, chunk, None).unwrap(), data);
            assert_eq!(decode(Coding::Deflate, &raw, chunk, None).unwrap(), data);
        }
    }

    #[test]
    fn output_comes_out_chunk_by_chunk() {
        let data = sample();
        let gz = gzip(&data).unwrap();
        let mut decoder = Decoder::new(Coding::Gzip, None);
        let half = gz.len() / 2;
        let first = decoder.push(&gz[..half]).unwrap();
        assert!(!first.is_empty() && first.len() < data.len());
        let rest = decoder.push(&gz[half..]).unwrap();
        let tail = decoder.finish().unwrap();
        assert_eq!(first.len() + rest.len() + tail.len(), data.len());
    }

    #[test]
    fn the_limit_cuts_the_output() {
        let data = sample();
        let gz = gzip(&data).unwrap();
        assert_eq!(
            decode(Coding::Gzip, &gz, 512, Some(data.len()))
                .unwrap()
                .len(),
            data.len()
        );
        assert!(matches!(
            decode(Coding::Gzip, &gz, 512, Some(data.len() - 1)),
            Err(DecodeError::TooLarge)
        ));
    }

    #[test]
    fn invalid_and_truncated_bodies_fail() {
        assert!(matches!(
            decode(Coding::Gzip, b"not gzip at all", 4, None),
            Err(DecodeError::Invalid(_))
        ));
        let gz = gzip(&sample()).unwrap();
        assert!(matches!(
            decode(Coding::Gzip, &gz[..gz.len() - 4], 4096, None),
            Err(DecodeError::Invalid(_))
        ));
        // An empty body is not an error.
        assert!(decode(Coding::Gzip, b"", 1, None).unwrap().is_empty());
    }
}
