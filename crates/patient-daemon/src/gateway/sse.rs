//! Server-sent events as they pass through: chunks cut into whole events
//! (an event split across reads is put back together, several events in
//! one read come apart), each told apart as a comment or a content event,
//! with what marks an OpenAI-style stream's end and its token usage.
//!
//! Written here rather than taken from a crate: the SSE crates parse into
//! owned fields, while a proxy must hand on each event's exact bytes
//! (without copying them when a read holds whole events) and look at only
//! a few of its fields.

use bytes::{Buf, Bytes, BytesMut};

/// The largest event held while waiting for its end, bytes: an event
/// stream that never ends an event is cut there.
pub const MAX_EVENT: usize = 4 << 20;

/// One event, its bytes exactly as the upstream sent them (blank line
/// included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event's bytes.
    pub raw: Bytes,
}

impl SseEvent {
    /// The event from its bytes.
    pub fn new(raw: Bytes) -> Self {
        SseEvent { raw }
    }

    /// The `data` lines, joined by newlines; `None` when there are none.
    pub fn data(&self) -> Option<String> {
        let mut data: Option<String> = None;
        for (field, value) in self.fields() {
            if field == "data" {
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                }
            }
        }
        data
    }

    /// The `event` field, if any.
    pub fn name(&self) -> Option<&str> {
        self.fields()
            .filter(|(f, _)| *f == "event")
            .map(|(_, v)| v)
            .last()
    }

    /// Whether it is only comments (`: ping`) or empty: not content.
    pub fn is_comment(&self) -> bool {
        self.fields().next().is_none()
    }

    /// The fields of the event: `(name, value)`, comments left out.
    fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        let text = std::str::from_utf8(&self.raw).unwrap_or("");
        text.split(['\n', '\r'])
            .filter(|line| !line.is_empty() && !line.starts_with(':'))
            .map(|line| match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            })
    }
}

/// What an OpenAI-style content event says about the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventFacts {
    /// `data: [DONE]`, or a choice with a `finish_reason`.
    pub ends: bool,
    /// Prompt and completion tokens of a `usage` object.
    pub usage: Option<(u64, u64)>,
}

/// Reads what marks the end and the usage from an event's data.
pub fn facts(event: &SseEvent) -> EventFacts {
    let Some(data) = event.data() else {
        return EventFacts::default();
    };
    let data = data.trim();
    if data == "[DONE]" {
        return EventFacts {
            ends: true,
            usage: None,
        };
    }
    // Only events that may say something are parsed.
    if !data.contains("finish_reason") && !data.contains("usage") {
        return EventFacts::default();
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else {
        return EventFacts::default();
    };
    let ends = value
        .get("choices")
        .and_then(|c| c.as_array())
        .is_some_and(|choices| {
            choices
                .iter()
                .any(|c| c.get("finish_reason").is_some_and(|r| !r.is_null()))
        })
        // The Responses API ends with `response.completed`.
        || value.get("type").and_then(|t| t.as_str()) == Some("response.completed");
    let usage_of = |u: &serde_json::Value| {
        let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
        match (n("prompt_tokens"), n("completion_tokens")) {
            (Some(p), Some(c)) => Some((p, c)),
            _ => match (n("input_tokens"), n("output_tokens")) {
                (Some(p), Some(c)) => Some((p, c)),
                _ => None,
            },
        }
    };
    let usage = value
        .get("usage")
        .and_then(usage_of)
        .or_else(|| value.pointer("/response/usage").and_then(usage_of));
    EventFacts { ends, usage }
}

/// Cuts a byte stream into whole events.
#[derive(Debug, Default)]
pub struct EventSplitter {
    /// The start of an event whose end has not come yet.
    pending: BytesMut,
}

/// An event stream that held more than [`MAX_EVENT`] bytes without ending
/// an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge;

impl EventSplitter {
    /// A splitter with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the start of an event is held.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The whole events that `chunk` completes, in order; the start of the
    /// next event is kept. Events wholly inside `chunk` are slices of it,
    /// not copies.
    pub fn push(&mut self, mut chunk: Bytes, out: &mut Vec<SseEvent>) -> Result<(), EventTooLarge> {
        if !self.pending.is_empty() {
            // The end of the pending event may be in this chunk, or even
            // straddle the two (`\n` | `\n`): look from a few bytes back.
            let from = self.pending.len().saturating_sub(3);
            self.pending.extend_from_slice(&chunk);
            match boundary(&self.pending[from..]) {
                None => {
                    return if self.pending.len() > MAX_EVENT {
                        Err(EventTooLarge)
                    } else {
                        Ok(())
                    };
                }
                Some(end) => {
                    let whole = self.pending.split_to(from + end).freeze();
                    out.push(SseEvent::new(whole));
                    chunk = std::mem::take(&mut self.pending).freeze();
                }
            }
        }
        while let Some(end) = boundary(&chunk) {
            out.push(SseEvent::new(chunk.split_to(end)));
        }
        if !chunk.is_empty() {
            if chunk.len() > MAX_EVENT {
                return Err(EventTooLarge);
            }
            self.pending.extend_from_slice(&chunk);
            chunk.advance(chunk.len());
        }
        Ok(())
    }

    /// At the end of the stream: the last event when it came without its
    /// blank line, completed with one so that clients dispatch it.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if self.pending.is_empty() {
            return None;
        }
        let mut last = std::mem::take(&mut self.pending);
        if last.iter().all(|b| b.is_ascii_whitespace()) {
            return None;
        }
        match last.last() {
            Some(b'\n') | Some(b'\r') => last.extend_from_slice(b"\n"),
            _ => last.extend_from_slice(b"\n\n"),
        }
        Some(SseEvent::new(last.freeze()))
    }
}

/// The length of the first event in `bytes` (its blank line included):
/// the end of the first `\n\n`, `\r\n\r\n`, `\r\r` or `\n\r\n`.
fn boundary(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                match bytes.get(i + 1) {
                    Some(b'\n') => return Some(i + 2),
                    Some(b'\r') if bytes.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                    _ => {}
                }
                i += 1;
            }
            b'\r' => {
                match (bytes.get(i + 1), bytes.get(i + 2), bytes.get(i + 3)) {
                    (Some(b'\n'), Some(b'\r'), Some(b'\n')) => return Some(i + 4),
                    (Some(b'\r'), _, _) => return Some(i + 2),
                    _ => {}
                }
                i += 1;
            }
            _ => {
                // Skip to the next line end quickly.
                match bytes[i..].iter().position(|&b| b == b'\n' || b == b'\r') {
                    Some(p) => i += p,
                    None => return None,
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> (Vec<String>, Option<String>) {
        let mut s = EventSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(Bytes::copy_from_slice(c), &mut out).unwrap();
        }
        let events = out
            .iter()
            .map(|e| String::from_utf8(e.raw.to_vec()).unwrap())
            .collect();
        let last = s
            .finish()
            .map(|e| String::from_utf8(e.raw.to_vec()).unwrap());
        (events, last)
    }

    #[test]
    fn events_split_across_reads_are_put_back_together() {
        let (events, last) =
            split_all(&[b"data: {\"a\":", b"1}\n", b"\ndata: b\n\nda", b"ta: c\n\n"]);
        assert_eq!(
            events,
            ["data: {\"a\":1}\n\n", "data: b\n\n", "data: c\n\n"]
        );
        assert_eq!(last, None);
    }

    #[test]
    fn crlf_and_cr_blank_lines_end_events() {
        let (events, _) = split_all(&[b"data: a\r\n\r", b"\ndata: b\r\rdata: c\n\r\n"]);
        assert_eq!(events, ["data: a\r\n\r\n", "data: b\r\r", "data: c\n\r\n"]);
    }

    #[test]
    fn a_trailing_event_without_its_blank_line_is_completed() {
        let (events, last) = split_all(&[b"data: a\n\ndata: [DONE]\n"]);
        assert_eq!(events, ["data: a\n\n"]);
        assert_eq!(last.as_deref(), Some("data: [DONE]\n\n"));
        let (_, last) = split_all(&[b"data: x"]);
        assert_eq!(last.as_deref(), Some("data: x\n\n"));
    }

    #[test]
    fn whole_events_of_a_read_are_slices_of_it() {
        let chunk = Bytes::from_static(b"data: a\n\ndata: b\n\n");
        let mut s = EventSplitter::new();
        let mut out = Vec::new();
        s.push(chunk.clone(), &mut out).unwrap();
        assert_eq!(out[0].raw.as_ptr(), chunk.as_ptr());
        assert!(!s.has_pending());
    }

    #[test]
    fn comments_fields_and_facts() {
        let ping = SseEvent::new(Bytes::from_static(b": ping\n\n"));
        assert!(ping.is_comment());
        let e = SseEvent::new(Bytes::from_static(
            b"event: message\ndata: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\n",
        ));
        assert!(!e.is_comment());
        assert_eq!(e.name(), Some("message"));
        assert!(facts(&e).ends);
        let usage = SseEvent::new(Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n",
        ));
        assert_eq!(facts(&usage).usage, Some((3, 5)));
        assert!(!facts(&usage).ends);
        let delta = SseEvent::new(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":null}]}\n\n",
        ));
        assert!(!facts(&delta).ends);
        assert!(facts(&SseEvent::new(Bytes::from_static(b"data: [DONE]\n\n"))).ends);
    }

    #[test]
    fn an_event_that_never_ends_is_refused_past_the_bound() {
        let mut s = EventSplitter::new();
        let mut out = Vec::new();
        let big = Bytes::from(vec![b'x'; MAX_EVENT / 2 + 1]);
        assert!(s.push(big.clone(), &mut out).is_ok());
        assert_eq!(s.push(big, &mut out), Err(EventTooLarge));
    }
}
